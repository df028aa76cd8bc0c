"""Seeded, reproducible perturbations of ECG signals for the robustness study.

Every function here takes an ECG array ``x`` of shape ``[..., n_leads, n_samples]`` in millivolts
(any leading batch dimensions; usually ``[12, n]`` or ``[B, 12, n]``), returns a new array of the
same shape and never modifies its input. Randomness comes only from the ``rng`` argument, an
``np.random.Generator`` or an integer seed, so a result is a pure function of (input, parameters,
seed). Every item of a batch, and every lead of an item, gets its own random draws.

The study sweeps call :func:`apply_perturbations` with a list of spec dicts such as
``[{"kind": "noise", "snr_db": 10}, {"kind": "powerline", "amplitude_mv": 0.05}]`` or with the
name of one of the :data:`PRESETS`. :data:`PERTURBATIONS` lists the kinds and their parameters.

Output dtype: the input's floating dtype (float32 stays float32); integer input becomes float32.
Arithmetic is done in float64 and cast back once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

RngLike = np.random.Generator | int | np.integer


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _as_rng(rng: RngLike) -> np.random.Generator:
    """Returns ``rng`` itself if it is a Generator, else a new Generator seeded with it."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, bool) or not isinstance(rng, int | np.integer):
        raise ValueError(
            f"rng must be a numpy Generator or an integer seed (perturbations must be "
            f"reproducible), got {rng!r}"
        )
    return np.random.default_rng(int(rng))


def _as_signal(x: Any) -> tuple[np.ndarray, np.dtype]:
    """Returns ``x`` as a float64 array of shape ``[..., leads, n]`` and the output dtype."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have shape [..., n_leads, n_samples], got shape {x.shape}")
    out_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)
    return x.astype(np.float64), out_dtype


def _check_fs(fs: float) -> float:
    if not (
        isinstance(fs, int | float | np.integer | np.floating) and math.isfinite(fs) and fs > 0
    ):
        raise ValueError(f"fs must be a positive number of Hz, got {fs!r}")
    return float(fs)


def _check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """Checks that ``value`` is a finite real number in [low, high] (or (low, high])."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return value


def _check_int(name: str, value: Any, *, low: int, high: int | None = None) -> int:
    """Checks that ``value`` is an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and <= {high}"
        raise ValueError(f"{name} must be >= {low}{upper}, got {value}")
    return value


def _check_band(name: str, band: Any, fs: float) -> tuple[float, float]:
    """Checks a frequency band ``(low_hz, high_hz)`` with 0 <= low < high <= fs / 2."""
    if not isinstance(band, Sequence) or isinstance(band, str) or len(band) != 2:
        raise ValueError(f"{name} must be a pair (low_hz, high_hz), got {band!r}")
    low = _check_number(f"{name}[0]", band[0], low=0.0)
    high = _check_number(f"{name}[1]", band[1], high=fs / 2)
    if not low < high:
        raise ValueError(f"{name} must have low < high, got {band!r}")
    return low, high


def _time(n: int, fs: float) -> np.ndarray:
    """Sample times in seconds, shape [n]."""
    return np.arange(n) / fs


# --------------------------------------------------------------------------------------------
# The perturbations
# --------------------------------------------------------------------------------------------


def add_noise(x: Any, snr_db: float, rng: RngLike) -> np.ndarray:
    """Adds white Gaussian noise at an exact signal-to-noise ratio, per lead.

    For each lead of each item, the signal power is ``mean(x**2)`` over time and the noise is
    rescaled so that its realised power is exactly ``power / 10**(snr_db / 10)``; the measured
    SNR of the output therefore equals ``snr_db`` up to float rounding. A lead that is all zero
    (for example a dropped lead) has no signal power and gets no noise.

    Args:
      x: ECG ``[..., n_leads, n_samples]`` in mV.
      snr_db: target SNR in dB (any finite value; lower is noisier).
      rng: Generator or integer seed.

    Returns:
      The noisy ECG, same shape as ``x``.
    """
    snr_db = _check_number("snr_db", snr_db)
    x, dtype = _as_signal(x)
    rng = _as_rng(rng)
    noise = rng.standard_normal(x.shape)
    signal_power = np.mean(x**2, axis=-1, keepdims=True)
    noise_power = np.mean(noise**2, axis=-1, keepdims=True)
    target_power = signal_power / 10.0 ** (snr_db / 10.0)
    noise *= np.sqrt(target_power / np.maximum(noise_power, np.finfo(np.float64).tiny))
    return (x + noise).astype(dtype)


def add_baseline_wander(
    x: Any,
    fs: float,
    amplitude_mv: float,
    rng: RngLike,
    *,
    n_components: int = 3,
    band_hz: tuple[float, float] = (0.05, 0.5),
) -> np.ndarray:
    """Adds baseline wander: a sum of a few slow sinusoids per lead.

    Each lead gets ``n_components`` sinusoids with frequencies drawn uniformly from ``band_hz``,
    uniform random phases and random relative weights in [0.5, 1]; their sum is scaled so that
    its peak absolute value over the record is exactly ``amplitude_mv``.

    Args:
      x: ECG ``[..., n_leads, n_samples]`` in mV.
      fs: sample rate in Hz.
      amplitude_mv: peak deviation of the wander in mV (>= 0).
      rng: Generator or integer seed.
      n_components: number of sinusoids per lead (>= 1).
      band_hz: (low, high) frequency range of the sinusoids in Hz.

    Returns:
      The ECG with wander added, same shape as ``x``.
    """
    fs = _check_fs(fs)
    amplitude_mv = _check_number("amplitude_mv", amplitude_mv, low=0.0)
    n_components = _check_int("n_components", n_components, low=1)
    low, high = _check_band("band_hz", band_hz, fs)
    x, dtype = _as_signal(x)
    rng = _as_rng(rng)
    t = _time(x.shape[-1], fs)
    shape = x.shape[:-1] + (n_components, 1)
    freqs = rng.uniform(low, high, size=shape)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=shape)
    weights = rng.uniform(0.5, 1.0, size=shape)
    wander = np.zeros_like(x)
    for k in range(n_components):  # a few components; each term is vectorised over all leads
        wander += weights[..., k, :] * np.sin(
            2.0 * np.pi * freqs[..., k, :] * t + phases[..., k, :]
        )
    peak = np.max(np.abs(wander), axis=-1, keepdims=True)
    wander *= amplitude_mv / np.maximum(peak, np.finfo(np.float64).tiny)
    return (x + wander).astype(dtype)


def add_powerline(
    x: Any,
    fs: float,
    amplitude_mv: float,
    rng: RngLike,
    *,
    freq_hz: float = 50.0,
    harmonics: int = 0,
) -> np.ndarray:
    """Adds power-line interference: a mains sinusoid and optional harmonics.

    The fundamental has amplitude ``amplitude_mv``; the k-th multiple of ``freq_hz``
    (k = 2 .. harmonics + 1) has amplitude ``amplitude_mv / k``. Every lead gets its own uniform
    random phase per component. Harmonics at or above the Nyquist frequency are left out, as a
    recorder's anti-aliasing filter would remove them.

    Args:
      x: ECG ``[..., n_leads, n_samples]`` in mV.
      fs: sample rate in Hz.
      amplitude_mv: amplitude of the fundamental in mV (>= 0).
      rng: Generator or integer seed.
      freq_hz: mains frequency, usually 50 or 60 Hz; must be below fs / 2.
      harmonics: number of harmonics above the fundamental (>= 0).

    Returns:
      The ECG with interference added, same shape as ``x``.
    """
    fs = _check_fs(fs)
    amplitude_mv = _check_number("amplitude_mv", amplitude_mv, low=0.0)
    freq_hz = _check_number("freq_hz", freq_hz, low=0.0, low_open=True)
    if freq_hz >= fs / 2:
        raise ValueError(f"freq_hz must be below the Nyquist frequency {fs / 2} Hz, got {freq_hz}")
    harmonics = _check_int("harmonics", harmonics, low=0)
    x, dtype = _as_signal(x)
    rng = _as_rng(rng)
    t = _time(x.shape[-1], fs)
    multiples = [k for k in range(1, harmonics + 2) if k * freq_hz < fs / 2]
    phases = rng.uniform(0.0, 2.0 * np.pi, size=x.shape[:-1] + (harmonics + 1, 1))
    interference = np.zeros_like(x)
    for i, k in enumerate(multiples):  # one term per harmonic, vectorised over all leads
        interference += (amplitude_mv / k) * np.sin(
            2.0 * np.pi * k * freq_hz * t + phases[..., i, :]
        )
    return (x + interference).astype(dtype)


def add_motion_bursts(
    x: Any,
    fs: float,
    rng: RngLike,
    *,
    n_bursts: int = 3,
    duration_s: float = 0.6,
    amplitude_mv: float = 1.0,
    band_hz: tuple[float, float] = (1.0, 10.0),
) -> np.ndarray:
    """Adds electrode-motion artefacts: short bursts of large, band-limited noise.

    Each item gets ``n_bursts`` bursts, each in one lead drawn uniformly and at a start time
    drawn uniformly within the record (bursts may overlap). A burst is white noise band-passed
    to ``band_hz`` (by zeroing FFT bins), shaped by a smooth Hann envelope ``duration_s`` long,
    and scaled so that its peak absolute value is exactly ``amplitude_mv``. Samples outside the
    bursts are unchanged.

    Args:
      x: ECG ``[..., n_leads, n_samples]`` in mV.
      fs: sample rate in Hz.
      rng: Generator or integer seed.
      n_bursts: number of bursts per item (>= 0).
      duration_s: length of each burst in seconds (at least 4 samples; cut to the record).
      amplitude_mv: peak amplitude of each burst in mV (>= 0).
      band_hz: (low, high) pass band of the burst noise in Hz.

    Returns:
      The ECG with bursts added, same shape as ``x``.
    """
    fs = _check_fs(fs)
    n_bursts = _check_int("n_bursts", n_bursts, low=0)
    duration_s = _check_number("duration_s", duration_s, low=0.0, low_open=True)
    amplitude_mv = _check_number("amplitude_mv", amplitude_mv, low=0.0)
    low, high = _check_band("band_hz", band_hz, fs)
    x, dtype = _as_signal(x)
    rng = _as_rng(rng)
    n_leads, n = x.shape[-2:]
    length = min(int(round(duration_s * fs)), n)
    if length < 4:
        raise ValueError(
            f"duration_s must cover at least 4 samples of the record, got {duration_s} s "
            f"at {fs} Hz on {n} samples"
        )
    flat = x.reshape(-1, n_leads, n).copy()  # [M, leads, n]
    m = flat.shape[0]

    leads = rng.integers(0, n_leads, size=(m, n_bursts))
    starts = rng.integers(0, n - length + 1, size=(m, n_bursts))
    # Band-limited noise, generated on at least 2 s so that the pass band spans several bins.
    n_fft = max(length, int(round(2.0 * fs)))
    spectrum = np.fft.rfft(rng.standard_normal((m, n_bursts, n_fft)), axis=-1)
    freqs = np.fft.rfftfreq(n_fft, d=1.0 / fs)
    spectrum[..., (freqs < low) | (freqs > high)] = 0.0
    bursts = np.fft.irfft(spectrum, n=n_fft, axis=-1)[..., :length]
    bursts *= np.hanning(length + 2)[1:-1]  # smooth envelope, nonzero on every burst sample
    peak = np.max(np.abs(bursts), axis=-1, keepdims=True)
    bursts *= amplitude_mv / np.maximum(peak, np.finfo(np.float64).tiny)

    columns = starts[..., None] + np.arange(length)  # [M, bursts, length]
    items = np.broadcast_to(np.arange(m)[:, None, None], columns.shape)
    rows = np.broadcast_to(leads[..., None], columns.shape)
    np.add.at(flat, (items, rows, columns), bursts)
    return flat.reshape(x.shape).astype(dtype)


def drop_leads(
    x: Any,
    rng: RngLike,
    *,
    n_leads: int | None = None,
    fraction: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Zeroes a random subset of leads (lead dropout / detached electrodes).

    Give exactly one of ``n_leads`` (how many leads to drop) or ``fraction`` (the share of leads
    to drop, rounded to the nearest whole number of leads). Each item drops its own random set.

    Args:
      x: ECG ``[..., n_leads, n_samples]`` in mV.
      rng: Generator or integer seed.
      n_leads: number of leads to zero, 0 .. x.shape[-2].
      fraction: fraction of leads to zero, 0 .. 1.

    Returns:
      ``(y, dropped)``: the ECG with the chosen leads set to 0, and a bool mask
      ``[..., n_leads]`` that is True exactly for the zeroed leads.
    """
    x, dtype = _as_signal(x)
    total = x.shape[-2]
    if (n_leads is None) == (fraction is None):
        raise ValueError("give exactly one of n_leads or fraction")
    if n_leads is not None:
        count = _check_int("n_leads", n_leads, low=0, high=total)
    else:
        count = int(round(_check_number("fraction", fraction, low=0.0, high=1.0) * total))
    rng = _as_rng(rng)
    order = np.argsort(rng.random(x.shape[:-1]), axis=-1)  # a random permutation per item
    ranks = np.argsort(order, axis=-1)
    dropped = ranks < count  # [..., leads]
    y = np.where(dropped[..., None], 0.0, x)
    return y.astype(dtype), dropped


def scale_amplitude(
    x: Any,
    rng: RngLike,
    *,
    gain_range: tuple[float, float] = (0.5, 2.0),
    per_lead: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Multiplies the ECG by random gains (electrode impedance / calibration changes).

    Gains are drawn log-uniformly from ``gain_range``, so that for example 0.5x and 2x are
    equally likely. With ``per_lead=False`` each item gets one gain for all its leads.

    Args:
      x: ECG ``[..., n_leads, n_samples]`` in mV.
      rng: Generator or integer seed.
      gain_range: (low, high) gains with 0 < low <= high.
      per_lead: draw an independent gain for every lead instead of one per item.

    Returns:
      ``(y, gains)``: the scaled ECG and the gains ``[..., n_leads]`` with
      ``y == x * gains[..., None]`` (equal entries per item when ``per_lead`` is False).
    """
    if not isinstance(gain_range, Sequence) or isinstance(gain_range, str) or len(gain_range) != 2:
        raise ValueError(f"gain_range must be a pair (low, high), got {gain_range!r}")
    low = _check_number("gain_range[0]", gain_range[0], low=0.0, low_open=True)
    high = _check_number("gain_range[1]", gain_range[1], low=low)
    if not isinstance(per_lead, bool | np.bool_):
        raise ValueError(f"per_lead must be a bool, got {per_lead!r}")
    x, dtype = _as_signal(x)
    rng = _as_rng(rng)
    draw_shape = x.shape[:-1] if per_lead else x.shape[:-2] + (1,)
    log_gains = rng.uniform(math.log(low), math.log(high), size=draw_shape)
    gains = np.broadcast_to(np.exp(log_gains), x.shape[:-1]).copy()
    return (x * gains[..., None]).astype(dtype), gains


# --------------------------------------------------------------------------------------------
# Config-driven entry point
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerturbationKind:
    """One entry of :data:`PERTURBATIONS`.

    Attributes:
      name: the ``"kind"`` value of a spec.
      apply: ``apply(x, fs, rng, **params) -> (y, info)``; ``info`` is a dict of what was
        drawn that a study needs to know (for example the dropped leads), or empty.
      required: parameter names a spec must give.
      optional: parameter names a spec may give (defaults are those of the function).
    """

    name: str
    apply: Callable[..., tuple[np.ndarray, dict[str, Any]]]
    required: tuple[str, ...]
    optional: tuple[str, ...]


def _apply_noise(x, fs, rng, **params):
    return add_noise(x, rng=rng, **params), {}


def _apply_wander(x, fs, rng, **params):
    return add_baseline_wander(x, fs, rng=rng, **params), {}


def _apply_powerline(x, fs, rng, **params):
    return add_powerline(x, fs, rng=rng, **params), {}


def _apply_bursts(x, fs, rng, **params):
    return add_motion_bursts(x, fs, rng, **params), {}


def _apply_dropout(x, fs, rng, **params):
    y, dropped = drop_leads(x, rng, **params)
    return y, {"dropped": dropped}


def _apply_scale(x, fs, rng, **params):
    y, gains = scale_amplitude(x, rng, **params)
    return y, {"gains": gains}


PERTURBATIONS: dict[str, PerturbationKind] = {
    kind.name: kind
    for kind in (
        PerturbationKind("noise", _apply_noise, ("snr_db",), ()),
        PerturbationKind(
            "baseline_wander", _apply_wander, ("amplitude_mv",), ("n_components", "band_hz")
        ),
        PerturbationKind(
            "powerline", _apply_powerline, ("amplitude_mv",), ("freq_hz", "harmonics")
        ),
        PerturbationKind(
            "motion_bursts",
            _apply_bursts,
            (),
            ("n_bursts", "duration_s", "amplitude_mv", "band_hz"),
        ),
        PerturbationKind("lead_dropout", _apply_dropout, (), ("n_leads", "fraction")),
        PerturbationKind("amplitude_scale", _apply_scale, (), ("gain_range", "per_lead")),
    )
}
"""The perturbation kinds that :func:`apply_perturbations` accepts, by name."""


# Severity levels of the perturbation study (this project's choice; the paper gives none).
_LEVELS: dict[str, dict[str, dict[str, Any]]] = {
    "mild": {
        "noise": {"snr_db": 20.0},
        "baseline_wander": {"amplitude_mv": 0.1},
        "powerline": {"amplitude_mv": 0.02},
    },
    "moderate": {
        "noise": {"snr_db": 10.0},
        "baseline_wander": {"amplitude_mv": 0.3},
        "powerline": {"amplitude_mv": 0.05},
    },
    "severe": {
        "noise": {"snr_db": 5.0},
        "baseline_wander": {"amplitude_mv": 0.6},
        "powerline": {"amplitude_mv": 0.1, "harmonics": 1},
    },
}


def _build_presets() -> dict[str, list[dict[str, Any]]]:
    presets: dict[str, list[dict[str, Any]]] = {"clean": []}
    for level, kinds in _LEVELS.items():
        for kind, params in kinds.items():
            presets[f"{kind}_{level}"] = [{"kind": kind, **params}]
        presets[f"combined_{level}"] = [{"kind": kind, **params} for kind, params in kinds.items()]
    return presets


PRESETS: dict[str, list[dict[str, Any]]] = _build_presets()
"""Named spec lists of the perturbation study.

``clean`` (no perturbation); ``noise_L``, ``baseline_wander_L``, ``powerline_L`` (one kind) and
``combined_L`` (all three in that order) for each level ``L`` in ``mild``, ``moderate``,
``severe``: noise at 20 / 10 / 5 dB SNR, wander of 0.1 / 0.3 / 0.6 mV peak, 50 Hz mains of
0.02 / 0.05 / 0.1 mV (severe adds the 100 Hz harmonic).
"""


def validate_specs(specs: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checks perturbation specs and returns them as a list of plain dicts.

    Args:
      specs: a :data:`PRESETS` name, or a sequence of mappings, each with a ``"kind"`` from
        :data:`PERTURBATIONS` and that kind's parameters.

    Returns:
      The specs as a new list of dicts.

    Raises:
      ValueError: naming the spec and the bad key for an unknown preset, a spec that is not a
        mapping, a missing or unknown ``kind``, a missing required parameter or an unknown
        parameter. Parameter values are checked when the perturbation is applied.
    """
    if isinstance(specs, str):
        if specs not in PRESETS:
            raise ValueError(f"unknown perturbation preset {specs!r}; known: {sorted(PRESETS)}")
        specs = PRESETS[specs]
    if isinstance(specs, Mapping) or not isinstance(specs, Sequence):
        raise ValueError(f"specs must be a list of dicts or a preset name, got {specs!r}")
    checked = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise ValueError(f"specs[{i}] must be a dict with a 'kind' key, got {spec!r}")
        if "kind" not in spec:
            raise ValueError(f"specs[{i}] has no 'kind' key; known kinds: {sorted(PERTURBATIONS)}")
        kind = spec["kind"]
        if kind not in PERTURBATIONS:
            raise ValueError(
                f"specs[{i}] has unknown kind {kind!r} (key 'kind'); known kinds: "
                f"{sorted(PERTURBATIONS)}"
            )
        entry = PERTURBATIONS[kind]
        for key in spec:
            if key != "kind" and key not in entry.required + entry.optional:
                raise ValueError(
                    f"specs[{i}] (kind {kind!r}) has unknown parameter {key!r}; allowed: "
                    f"{list(entry.required + entry.optional)}"
                )
        for key in entry.required:
            if key not in spec:
                raise ValueError(f"specs[{i}] (kind {kind!r}) is missing parameter {key!r}")
        checked.append(dict(spec))
    return checked


def apply_perturbations(
    x: Any,
    fs: float,
    specs: str | Sequence[Mapping[str, Any]],
    seed: RngLike,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Applies a list of perturbation specs in order; the entry point of the study sweeps.

    Each spec gets its own random stream, spawned from ``seed`` by position, so the draws of
    spec ``i`` depend only on ``seed`` and ``i``: appending a spec does not change what the
    earlier ones do.

    Args:
      x: ECG ``[..., n_leads, n_samples]`` in mV (not modified).
      fs: sample rate in Hz.
      specs: a :data:`PRESETS` name or a list like
        ``[{"kind": "noise", "snr_db": 10}, {"kind": "lead_dropout", "n_leads": 2}]``.
      seed: integer seed or Generator.

    Returns:
      ``(y, records)``: the perturbed ECG and, per spec, a dict of the spec's entries plus what
      was drawn (``"dropped"`` mask for ``lead_dropout``, ``"gains"`` for ``amplitude_scale``).

    Raises:
      ValueError: for invalid specs or parameter values; the message names the spec index,
        the kind and the offending key.
    """
    specs = validate_specs(specs)
    fs = _check_fs(fs)
    x, dtype = _as_signal(x)
    streams = _as_rng(seed).spawn(len(specs))
    y = x
    records = []
    for i, (spec, stream) in enumerate(zip(specs, streams, strict=True)):
        params = {key: value for key, value in spec.items() if key != "kind"}
        try:
            y, info = PERTURBATIONS[spec["kind"]].apply(y, fs, stream, **params)
        except ValueError as err:
            raise ValueError(f"specs[{i}] (kind {spec['kind']!r}): {err}") from err
        records.append({**spec, **info})
    return np.asarray(y).astype(dtype), records
