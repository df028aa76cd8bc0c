"""The paper's ECG preprocessing, vectorised over ``[batch, 12, n]`` arrays, and its batch CLI.

Pipeline, at the recording's own sampling rate ``fs``: notch filters at 50 and 60 Hz (Q = 30), a
4th-order Butterworth band-pass 0.5–100 Hz and a 4th-order Butterworth high-pass 0.05 Hz, all
zero-phase (:func:`filter_ecg`); db6 wavelet denoising, level 4, soft threshold, approximation
kept (:func:`denoise_wavelet`); resampling to 250 Hz (:func:`resample`); non-overlapping
segments of ``seg_len`` samples, remainder dropped, segments with NaN/inf skipped
(:func:`segment`). :func:`preprocess` runs the first three steps; :func:`preprocess_segments`
all four. Every step works on the last axis of a whole batch at once: no Python loop over records
or leads.

Two modes (``PreprocessConfig.mode``):

``"reference"`` reproduces the reference framework (ECG-Bench, paper era) to float32 precision,
defects included (parity with :mod:`elmjax.ecg.reference_loop` is tested):

* filters: four sequential ``scipy.signal.filtfilt`` passes with ``(b, a)`` polynomial
  coefficients (notch 50, notch 60, band-pass, high-pass), float64, filtfilt's default short
  odd-extension padding;
* wavelet threshold ``median(|cD4|) / 0.6745`` from the *coarsest* detail band (``coeffs[1]``),
  no ``sqrt(2 ln n)`` factor; a reconstruction one sample too long (odd ``n``) is Fourier-resampled
  back to ``n``; NaN/inf set to 0;
* cubic ``interp1d`` from ``linspace(0, n/fs, n)`` to ``linspace(0, n/fs, int(n*250/fs))``:
  no anti-aliasing, the output length truncated, and a stretched time axis (output sample ``k``
  sits at ``k (n-1)/(m-1)`` input samples instead of ``k n/m``: half an input sample late at
  the end of the record).

``"standard"`` (the default) fixes what is wrong there:

* filters: the four filters are designed as second-order sections and applied as ONE zero-phase
  filter: the signal, padded on each side by its 2-s mirror image (even reflection, which keeps
  a record that starts or ends inside a QRS free of a long step), is multiplied in the
  frequency domain by ``|H(f)|^2`` of the whole cascade (what ``filtfilt`` does away from the
  edges), float32. The reference's sequential passes each restart the slow 0.05 Hz high-pass
  from a short edge extension and filtfilt's "constant before the edge" initial state; its
  transients reach the middle of a 10-s record. In the middle 6 s of 10-s windows cut from
  longer synthetic ECGs with baseline wander, the reference's filter output is 25-40 % (RMS)
  away from the ideal zero-phase filter of the whole recording, this one 1-4 %
  (``benchmarks/preprocess.py`` and ``tests/test_preprocess.py`` measure it);
* wavelet threshold: Donoho–Johnstone universal threshold ``sigma * sqrt(2 ln n)`` with
  ``sigma = median(|cD1|) / 0.6745`` estimated from the *finest* detail band (the noise),
  reconstruction trimmed to ``n``; NaN stays NaN (such segments are then skipped);
* resampling: polyphase ``scipy.signal.resample_poly`` with ``up/down`` the reduced ratio
  ``250/fs`` (anti-aliasing FIR, linear edge padding); output length ``ceil(n * up / down)``.

Band edges at or above Nyquist (e.g. 125 Hz recordings, Nyquist 62.5 Hz) are handled in both
modes: the band-pass upper edge is clamped to 0.9 x Nyquist and notches at or above Nyquist are
dropped, each with a ``warnings.warn`` naming the rate; the reference itself crashed there.

The CLI turns a whole dataset into float32 segment files::

    python -m elmjax.ecg.preprocess --layout ptbxl|mimic|code15|wfdb-dir --input DIR \\
        --out DIR --seg-len 2500 [--workers N] [--mode standard|reference]

It lists the records (:func:`elmjax.ecg.io.list_entries`), cuts them into fixed chunks, and
processes the chunks in a process pool; every chunk is written atomically as
``out/segments/chunk-NNNNN.npy`` (float32 ``[k, 12, seg_len]``, mmap-able) plus
``chunk-NNNNN.json`` (one row per segment, and the chunk's skipped records). A rerun skips
finished chunks and refuses settings that differ from ``out/config.json``. At the end it writes
``out/manifest.jsonl`` (one row per segment) and ``out/report.json`` (counts, every skipped
record with why, settings, timing). :func:`load_segments` reads the result back.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pywt
import scipy.fft
from scipy import interpolate, signal
from tqdm import tqdm

from elmjax.ecg import io

MODES: tuple[str, ...] = ("standard", "reference")

_PAD_SECONDS = 2.0  # mirror padding of the standard frequency-domain filter, each side
_SAFE_NYQUIST_FRACTION = 0.9  # band-pass upper edges at/above Nyquist are clamped to this
_MAD_TO_SIGMA = 0.6745  # median(|N(0, 1)|)
_REFERENCE_EPSILON = 1e-10  # the reference zeroes detail coefficients at or below this


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Settings of the preprocessing pipeline.

    Attributes:
      target_fs: output sampling frequency in Hz.
      seg_len: segment length in samples at ``target_fs`` (1250 = 5 s, 2500 = 10 s at 250 Hz).
      mode: "standard" (corrected, the default) or "reference" (reproduces the reference
        framework); see the module docstring.
      notch: mains frequencies (Hz) removed by IIR notch filters; () for none.
      notch_q: quality factor of the notch filters.
      band: (low, high) edges of the Butterworth band-pass in Hz; None for none.
      highpass: cutoff of the extra Butterworth high-pass in Hz; None for none.
      order: order of the Butterworth filters.
      wavelet: PyWavelets wavelet used for denoising.
      level: wavelet decomposition level.
    """

    target_fs: float = 250.0
    seg_len: int = 2500
    mode: str = "standard"
    notch: tuple[float, ...] = (50.0, 60.0)
    notch_q: float = 30.0
    band: tuple[float, float] | None = (0.5, 100.0)
    highpass: float | None = 0.05
    order: int = 4
    wavelet: str = "db6"
    level: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if int(self.seg_len) != self.seg_len or self.seg_len <= 0:
            raise ValueError(f"seg_len must be a positive integer, got {self.seg_len!r}")
        if self.target_fs <= 0:
            raise ValueError(f"target_fs must be positive, got {self.target_fs!r}")
        if self.band is not None and not 0 < self.band[0] < self.band[1]:
            raise ValueError(f"band must be (low, high) with 0 < low < high, got {self.band!r}")
        if self.highpass is not None and self.highpass <= 0:
            raise ValueError(f"highpass must be positive, got {self.highpass!r}")
        if self.mode == "reference" and (self.band is None or self.highpass is None):
            raise ValueError("mode='reference' needs both band and highpass (as the reference)")
        pywt.Wavelet(self.wavelet)  # raises on an unknown wavelet name
        object.__setattr__(self, "seg_len", int(self.seg_len))
        object.__setattr__(self, "notch", tuple(float(f) for f in self.notch))
        if self.band is not None:
            object.__setattr__(self, "band", (float(self.band[0]), float(self.band[1])))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        out = dataclasses.asdict(self)
        out["notch"] = list(self.notch)
        out["band"] = None if self.band is None else list(self.band)
        return out


# ----------------------------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FilterPlan:
    """The filters that apply at one sampling rate, after clamping to its Nyquist frequency."""

    fs: float
    notches: tuple[float, ...]
    q: float
    band: tuple[float, float] | None
    highpass: float | None
    order: int


def _filter_plan(fs: float, cfg: PreprocessConfig) -> _FilterPlan:
    """Fits the configured filters to ``fs``: warns about and drops notches at/above Nyquist,
    clamps a band-pass upper edge at/above Nyquist to 0.9 x Nyquist."""
    if fs <= 0:
        raise ValueError(f"sampling frequency must be positive, got {fs!r}")
    nyquist = 0.5 * fs
    dropped = [f for f in cfg.notch if f >= nyquist]
    if dropped:
        warnings.warn(
            f"fs={fs:g} Hz: notch filter(s) at {dropped} Hz are at or above Nyquist "
            f"({nyquist:g} Hz) and were dropped",
            stacklevel=3,
        )
    band = cfg.band
    if band is not None and band[1] >= nyquist:
        high = _SAFE_NYQUIST_FRACTION * nyquist
        warnings.warn(
            f"fs={fs:g} Hz: band-pass upper edge {band[1]:g} Hz is at or above Nyquist "
            f"({nyquist:g} Hz); clamped to {high:g} Hz",
            stacklevel=3,
        )
        if band[0] >= high:
            raise ValueError(f"fs={fs:g} Hz is too low for a band-pass from {band[0]:g} Hz")
        band = (band[0], high)
    if cfg.highpass is not None and cfg.highpass >= nyquist:
        raise ValueError(f"fs={fs:g} Hz is too low for a high-pass at {cfg.highpass:g} Hz")
    notches = tuple(f for f in cfg.notch if f < nyquist)
    return _FilterPlan(float(fs), notches, cfg.notch_q, band, cfg.highpass, cfg.order)


@functools.lru_cache(maxsize=64)
def _cascade_sos(plan: _FilterPlan) -> np.ndarray:
    """Second-order sections of the whole filter cascade (float64 ``[sections, 6]``)."""
    parts = [np.zeros((0, 6))]
    for freq in plan.notches:
        parts.append(signal.tf2sos(*signal.iirnotch(freq, plan.q, plan.fs)))
    if plan.band is not None:
        parts.append(signal.butter(plan.order, plan.band, "bandpass", fs=plan.fs, output="sos"))
    if plan.highpass is not None:
        parts.append(signal.butter(plan.order, plan.highpass, "highpass", fs=plan.fs, output="sos"))
    return np.concatenate(parts)


@functools.lru_cache(maxsize=64)
def _zero_phase_gain(plan: _FilterPlan, nfft: int) -> np.ndarray:
    """``|H(f)|^2`` of the cascade on the ``rfft`` grid of length ``nfft`` (float32)."""
    sos = _cascade_sos(plan)
    freqs = np.fft.rfftfreq(nfft, d=1.0 / plan.fs)
    if len(sos) == 0:
        return np.ones(freqs.shape, np.float32)
    _, response = signal.sosfreqz(sos, worN=freqs, fs=plan.fs)
    return (np.abs(response) ** 2).astype(np.float32)


def _filter_standard(x: np.ndarray, plan: _FilterPlan) -> np.ndarray:
    """One zero-phase pass of the cascade in the frequency domain, float32."""
    x = np.asarray(x, np.float32)
    n = x.shape[-1]
    pad = int(round(_PAD_SECONDS * plan.fs))
    nfft = scipy.fft.next_fast_len(n + 2 * pad, real=True)
    left = (nfft - n) // 2
    centred = x - x.mean(axis=-1, keepdims=True)  # the cascade removes DC; keeps float32 exact
    widths = [(0, 0)] * (x.ndim - 1) + [(left, nfft - n - left)]
    spectrum = scipy.fft.rfft(np.pad(centred, widths, mode="reflect"), axis=-1)
    spectrum *= _zero_phase_gain(plan, nfft)
    return scipy.fft.irfft(spectrum, nfft, axis=-1)[..., left : left + n]


def _filter_reference(x: np.ndarray, plan: _FilterPlan) -> np.ndarray:
    """The reference's four sequential ``filtfilt`` passes with ``(b, a)`` coefficients."""
    y = np.asarray(x, np.float64)
    for freq in plan.notches:
        b, a = signal.iirnotch(freq, plan.q, plan.fs)
        y = signal.filtfilt(b, a, y, axis=-1)
    nyquist = 0.5 * plan.fs
    b, a = signal.butter(plan.order, [plan.band[0] / nyquist, plan.band[1] / nyquist], "band")
    y = signal.filtfilt(b, a, y, axis=-1)
    b, a = signal.butter(plan.order, plan.highpass / nyquist, "high")
    return signal.filtfilt(b, a, y, axis=-1)


def filter_ecg(x: np.ndarray, fs: float, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """Zero-phase notch + band-pass + high-pass filtering along the last axis.

    Args:
      x: ``[..., n]`` signal (e.g. ``[batch, 12, n]``) in mV.
      fs: sampling frequency in Hz.
      cfg: settings (default :class:`PreprocessConfig`); ``cfg.mode`` picks the method.

    Returns:
      ``[..., n]``: float32 in "standard" mode, float64 in "reference" mode.

    Warns:
      UserWarning: when a notch is dropped or the band-pass edge is clamped for ``fs``.
    """
    cfg = cfg or PreprocessConfig()
    plan = _filter_plan(fs, cfg)
    if cfg.mode == "reference":
        return _filter_reference(x, plan)
    return _filter_standard(x, plan)


# ----------------------------------------------------------------------------------------------
# Wavelet denoising
# ----------------------------------------------------------------------------------------------


def _soft_threshold(c: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """Soft thresholding that maps 0 to 0 also for a zero threshold (pywt returns NaN there)."""
    return np.sign(c) * np.maximum(np.abs(c) - threshold, 0)


def _denoise_reference(x: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    y = np.asarray(x, np.float64)
    n = y.shape[-1]
    coeffs = pywt.wavedec(y, cfg.wavelet, level=cfg.level, axis=-1)
    threshold = np.median(np.abs(coeffs[-cfg.level]), axis=-1, keepdims=True) / _MAD_TO_SIGMA
    details = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for c in coeffs[1:]:
            shrunk = pywt.threshold(c, threshold, mode="soft")
            keep = np.isfinite(shrunk) & (np.abs(c) > _REFERENCE_EPSILON)
            details.append(np.where(keep, shrunk, 0.0))
    out = pywt.waverec([coeffs[0], *details], cfg.wavelet, axis=-1)
    if out.shape[-1] != n:
        out = signal.resample(out, n, axis=-1)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _denoise_standard(x: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    y = np.asarray(x, np.float32)
    n = y.shape[-1]
    coeffs = pywt.wavedec(y, cfg.wavelet, level=cfg.level, axis=-1)
    sigma = np.median(np.abs(coeffs[-1]), axis=-1, keepdims=True) / _MAD_TO_SIGMA
    threshold = (sigma * math.sqrt(2.0 * math.log(n))).astype(np.float32)
    details = [_soft_threshold(c, threshold) for c in coeffs[1:]]
    return pywt.waverec([coeffs[0], *details], cfg.wavelet, axis=-1)[..., :n]


def denoise_wavelet(x: np.ndarray, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """Wavelet soft-threshold denoising along the last axis, one threshold per lead.

    Args:
      x: ``[..., n]`` signal.
      cfg: settings (default :class:`PreprocessConfig`): wavelet, level and mode. "standard"
        uses the universal threshold from the finest detail band, "reference" the reference's
        ``median(|cD_level|) / 0.6745``.

    Returns:
      ``[..., n]``: float32 in "standard" mode, float64 in "reference" mode.
    """
    cfg = cfg or PreprocessConfig()
    if cfg.mode == "reference":
        return _denoise_reference(x, cfg)
    return _denoise_standard(x, cfg)


# ----------------------------------------------------------------------------------------------
# Resampling and segmentation
# ----------------------------------------------------------------------------------------------


def resample_ratio(fs: float, target_fs: float) -> tuple[int, int]:
    """``(up, down)``: ``target_fs / fs`` as a reduced fraction (rates read to 1/1000 Hz)."""
    ratio = Fraction(target_fs).limit_denominator(1000) / Fraction(fs).limit_denominator(1000)
    return ratio.numerator, ratio.denominator


def output_length(n: int, fs: float, cfg: PreprocessConfig | None = None) -> int:
    """Number of samples :func:`preprocess` returns for ``n`` input samples at ``fs``."""
    cfg = cfg or PreprocessConfig()
    if fs == cfg.target_fs:
        return n
    if cfg.mode == "reference":
        return int(n * cfg.target_fs / fs)
    up, down = resample_ratio(fs, cfg.target_fs)
    return -(-n * up // down)


def resample(
    x: np.ndarray, fs: float, target_fs: float = 250.0, mode: str = "standard"
) -> np.ndarray:
    """Resamples along the last axis.

    Args:
      x: ``[..., n]`` signal at ``fs``.
      fs: its sampling frequency in Hz.
      target_fs: the wanted sampling frequency in Hz.
      mode: "standard" — polyphase ``resample_poly`` (anti-aliased), ``ceil(n*up/down)``
        samples; "reference" — the reference's cubic ``interp1d`` on linspace grids,
        ``int(n * target_fs / fs)`` samples.

    Returns:
      float32 ``[..., m]``; a float32 copy of ``x`` when ``fs == target_fs``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if fs == target_fs:
        return np.array(x, np.float32)
    if mode == "reference":
        n = x.shape[-1]
        duration = n / fs
        t_in = np.linspace(0, duration, n, endpoint=True)
        t_out = np.linspace(0, duration, int(n * target_fs / fs), endpoint=True)
        spline = interpolate.interp1d(
            t_in, x, kind="cubic", axis=-1, bounds_error=False, fill_value="extrapolate"
        )
        return spline(t_out).astype(np.float32)
    up, down = resample_ratio(fs, target_fs)
    y = signal.resample_poly(np.asarray(x, np.float32), up, down, axis=-1, padtype="line")
    return y.astype(np.float32, copy=False)


class Segments(NamedTuple):
    """Segments cut from a batch of records.

    Attributes:
      data: float32 ``[k, 12, seg_len]``.
      record: ``[k]`` index of each segment's record in the batch.
      index: ``[k]`` position of each segment within its record (0 = first ``seg_len``
        samples); positions of skipped (non-finite) segments are missing.
    """

    data: np.ndarray
    record: np.ndarray
    index: np.ndarray


def segment(x: np.ndarray, seg_len: int) -> Segments:
    """Cuts ``[B, 12, m]`` (or ``[12, m]``) into non-overlapping segments of ``seg_len``.

    The remainder ``m % seg_len`` is dropped and segments containing NaN/inf are skipped.

    Returns:
      :class:`Segments` in record-major order.
    """
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[None]
    batch, leads, m = x.shape
    k = m // seg_len
    windows = x[..., : k * seg_len].reshape(batch, leads, k, seg_len).transpose(0, 2, 1, 3)
    finite = np.isfinite(windows).all(axis=(2, 3))  # [B, k]
    record, index = np.nonzero(finite)
    return Segments(windows[record, index].astype(np.float32), record, index)


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def preprocess(x: np.ndarray, fs: float, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """Filters, denoises and resamples a batch of ECGs (everything but segmentation).

    Args:
      x: ``[B, 12, n]`` or ``[12, n]`` signal in mV at ``fs`` (any number of leads works).
      fs: sampling frequency in Hz, shared by the batch.
      cfg: settings (default :class:`PreprocessConfig`).

    Returns:
      float32 ``[B, 12, m]`` (``[12, m]`` for a 2-D input) at ``cfg.target_fs``, with
      ``m = output_length(n, fs, cfg)``.
    """
    cfg = cfg or PreprocessConfig()
    x = np.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(f"expected [B, leads, n] or [leads, n], got shape {x.shape}")
    filtered = filter_ecg(x, fs, cfg)
    denoised = denoise_wavelet(filtered, cfg)
    return resample(denoised, fs, cfg.target_fs, cfg.mode)


def preprocess_segments(x: np.ndarray, fs: float, cfg: PreprocessConfig | None = None) -> Segments:
    """:func:`preprocess` then :func:`segment` with ``cfg.seg_len``."""
    cfg = cfg or PreprocessConfig()
    return segment(preprocess(x, fs, cfg), cfg.seg_len)


# ----------------------------------------------------------------------------------------------
# Batch CLI: dataset -> chunked segment files
# ----------------------------------------------------------------------------------------------

_CHUNK_NAME = "chunk-{:05d}"
_MAX_BATCH_SAMPLES = 1 << 23  # records per preprocess call are limited to ~8M samples


class SettingsMismatchError(ValueError):
    """The output directory holds results written with different settings."""


@dataclasses.dataclass(frozen=True)
class _ChunkTask:
    """What a worker needs for one chunk: entries (paths and ids), never arrays."""

    chunk: int
    entries: tuple[io.Entry, ...]
    segments_dir: str
    cfg: PreprocessConfig
    read_kwargs: dict


def _atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Writes a file through ``write(fileobj)`` to a temporary name, then renames it."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=1, sort_keys=False).encode()
    _atomic_write_bytes(path, lambda f: f.write(data))


def _load_records(entries: Sequence[io.Entry], read_kwargs: dict) -> tuple[list, list[dict]]:
    """Loads entries; returns ``[(position, entry, record)]`` and the skipped ones with why."""
    loaded, skipped = [], []
    for position, entry in enumerate(entries):
        try:
            loaded.append((position, entry, io.load_entry(entry, **read_kwargs)))
        except io.ECGReadError as e:
            skipped.append(_skip(entry, e.path, e.problem))
        except Exception as e:  # a reader bug must not stop a whole dataset
            skipped.append(_skip(entry, entry.path, f"unexpected {type(e).__name__}: {e}"))
    return loaded, skipped


def _segment_row(entry: io.Entry, record: io.Record, index: int) -> dict[str, Any]:
    return {
        "record_id": entry.record_id,
        "patient_id": entry.patient_id,
        "segment": int(index),
        "report": entry.report,
        "source_fs": float(record.fs),
        "source_samples": int(record.signal.shape[-1]),
        "leads_missing": list(record.leads_missing),
        "path": record.path,
    }


def _skip(entry: io.Entry, path: str, reason: str) -> dict[str, str]:
    return {"record_id": entry.record_id, "path": path, "reason": reason}


def _group_by_shape(loaded: list, cfg: PreprocessConfig) -> tuple[dict, list[dict]]:
    """Groups loaded records by (fs, n) for batching; records too short for a segment are
    returned as skipped instead."""
    groups: dict[tuple[float, int], list] = {}
    skipped = []
    for position, entry, record in loaded:
        n = record.signal.shape[-1]
        if output_length(n, record.fs, cfg) < cfg.seg_len:
            seconds = cfg.seg_len / cfg.target_fs
            reason = f"too short: {n / record.fs:g} s is less than one {seconds:g}-s segment"
            skipped.append(_skip(entry, record.path, reason))
            continue
        groups.setdefault((record.fs, n), []).append((position, entry, record))
    return groups, skipped


def _process_group(group: list, cfg: PreprocessConfig) -> dict[int, Segments]:
    """Preprocesses records that share (fs, n) in batches; returns segments per position."""
    fs, n = group[0][2].fs, group[0][2].signal.shape[-1]
    per_batch = max(1, _MAX_BATCH_SAMPLES // (12 * n))
    out = {}
    for start in range(0, len(group), per_batch):
        part = group[start : start + per_batch]
        batch = np.stack([record.signal for _, _, record in part])
        segs = preprocess_segments(batch, fs, cfg)
        for i, (position, _, _) in enumerate(part):
            mask = segs.record == i
            out[position] = Segments(segs.data[mask], segs.record[mask], segs.index[mask])
    return out


def _process_groups(groups: dict, cfg: PreprocessConfig) -> tuple[dict, list[dict], list[str]]:
    """Runs every group; a group that fails is reported record by record, never raised.
    Returns segments per position, the skipped records and the warnings raised."""
    results: dict[int, Segments] = {}
    skipped = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for group in groups.values():
            try:
                results.update(_process_group(group, cfg))
            except Exception as e:
                reason = f"preprocessing failed: {type(e).__name__}: {e}"
                skipped.extend(_skip(entry, record.path, reason) for _, entry, record in group)
    return results, skipped, sorted({str(w.message) for w in caught})


def _process_chunk(task: _ChunkTask) -> dict[str, Any]:
    """Worker: loads, preprocesses and writes one chunk atomically; returns its summary."""
    t0 = time.perf_counter()
    loaded, skipped = _load_records(task.entries, task.read_kwargs)
    t_load = time.perf_counter() - t0
    groups, too_short = _group_by_shape(loaded, task.cfg)
    results, failed, notes = _process_groups(groups, task.cfg)
    skipped += too_short + failed

    arrays, rows, n_ok = [], [], 0
    for position, entry, record in loaded:  # dataset order
        segs = results.get(position)
        if segs is None:
            continue
        if len(segs.data) == 0:
            skipped.append(_skip(entry, record.path, "every segment had non-finite values"))
            continue
        n_ok += 1
        arrays.append(segs.data)
        rows.extend(_segment_row(entry, record, j) for j in segs.index)
    empty = np.zeros((0, 12, task.cfg.seg_len), np.float32)
    data = np.concatenate(arrays) if arrays else empty

    name = _CHUNK_NAME.format(task.chunk)
    segments_dir = Path(task.segments_dir)
    _atomic_write_bytes(segments_dir / f"{name}.npy", lambda f: np.save(f, data))
    summary = {
        "chunk": task.chunk,
        "file": f"segments/{name}.npy",
        "n_entries": len(task.entries),
        "n_records_ok": n_ok,
        "n_segments": len(rows),
        "rows": rows,
        "skipped": skipped,
        "warnings": notes,
        "seconds_load": t_load,
        "seconds_total": time.perf_counter() - t0,
    }
    _atomic_write_json(segments_dir / f"{name}.json", summary)  # written last: marks it done
    return summary


def _chunk_done(segments_dir: Path, chunk: int) -> bool:
    name = _CHUNK_NAME.format(chunk)
    return (segments_dir / f"{name}.json").exists() and (segments_dir / f"{name}.npy").exists()


def _settings(
    layout: str,
    cfg: PreprocessConfig,
    chunk_size: int,
    read_kwargs: dict,
    entries: Sequence[io.Entry],
) -> dict[str, Any]:
    """Everything that determines the output files, with a digest of the record listing."""
    listing = "\n".join(f"{e.record_id}\t{e.index}" for e in entries)  # not paths: movable
    return {
        "layout": layout,
        "preprocess": cfg.to_dict(),
        "chunk_size": chunk_size,
        "read": dict(sorted(read_kwargs.items())),
        "n_entries": len(entries),
        "entries_sha256": hashlib.sha256(listing.encode()).hexdigest(),
    }


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _check_or_write_config(out: Path, settings: dict[str, Any]) -> None:
    """Stores the settings in ``out/config.json``, or refuses if it holds different ones."""
    path = out / "config.json"
    digest = _settings_hash(settings)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("hash") != digest:
            old = stored.get("settings", {})
            keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise SettingsMismatchError(
                f"{out} holds results made with different settings (differing: "
                f"{', '.join(keys) or 'hash'}; stored hash {stored.get('hash')}, now {digest}). "
                "Use another --out directory, or delete this one to start over."
            )
        return
    _atomic_write_json(path, {"hash": digest, "settings": settings})


def _run_tasks(tasks: list[_ChunkTask], workers: int, progress: bool) -> None:
    """Runs chunk tasks in-process (1 worker) or in a process pool; each writes its files."""
    bar = tqdm(total=len(tasks), desc="chunks", unit="chunk", disable=not progress)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                _process_chunk(task)
                bar.update()
        else:
            # forkserver, not fork: the caller may run threads (tqdm, JAX) that fork would copy.
            context = multiprocessing.get_context("forkserver")
            pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
            try:
                futures = [pool.submit(_process_chunk, task) for task in tasks]
                for future in concurrent.futures.as_completed(futures):
                    future.result()  # re-raises a worker's failure
                    bar.update()
            except BaseException:  # Ctrl-C or a failed worker: stop now; finished chunks stay
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()
    finally:
        bar.close()


def run(
    layout: str,
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: PreprocessConfig | None = None,
    *,
    workers: int = 1,
    chunk_size: int = 256,
    read_kwargs: dict | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Preprocesses a whole dataset into chunked segment files (what the CLI runs).

    Args:
      layout: one of :data:`elmjax.ecg.io.LAYOUTS`.
      input_dir: the dataset's root directory.
      out_dir: output directory (created; resumable).
      cfg: preprocessing settings.
      workers: worker processes (1 runs in this process).
      chunk_size: records per chunk file.
      read_kwargs: passed to :func:`elmjax.ecg.io.load_entry` (``bad_leads``, ``nan_gaps``, ...).
      progress: show a tqdm progress bar over chunks.

    Returns:
      The report (also written to ``out/report.json``).

    Raises:
      SettingsMismatchError: ``out_dir`` holds results made with different settings.
      elmjax.ecg.io.ECGReadError: the dataset itself cannot be listed.
    """
    t0 = time.perf_counter()
    cfg = cfg or PreprocessConfig()
    read_kwargs = dict(read_kwargs or {})
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    entries, unlisted = io.list_entries(layout, input_dir)
    out = Path(out_dir)
    segments_dir = out / "segments"
    segments_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(layout, cfg, chunk_size, read_kwargs, entries)
    _check_or_write_config(out, settings)
    for stale in segments_dir.glob("*.tmp-*"):
        stale.unlink()  # left by an interrupted run; never a finished chunk

    n_chunks = math.ceil(len(entries) / chunk_size)
    tasks = [
        _ChunkTask(
            i,
            tuple(entries[i * chunk_size : (i + 1) * chunk_size]),
            str(segments_dir),
            cfg,
            read_kwargs,
        )
        for i in range(n_chunks)
        if not _chunk_done(segments_dir, i)
    ]
    t_work = time.perf_counter()
    _run_tasks(tasks, workers, progress)
    seconds_work = time.perf_counter() - t_work
    report = _finish(out, n_chunks, unlisted, settings, len(tasks), workers)
    report["timing"].update(
        {
            "seconds_this_run": time.perf_counter() - t0,
            "seconds_processing_this_run": seconds_work,
            "records_per_second_this_run": (
                sum(len(t.entries) for t in tasks) / seconds_work if tasks else None
            ),
        }
    )
    _atomic_write_json(out / "report.json", report)
    return report


def _finish(
    out: Path,
    n_chunks: int,
    unlisted: list[dict],
    settings: dict[str, Any],
    n_done_now: int,
    workers: int,
) -> dict[str, Any]:
    """Writes ``manifest.jsonl`` from all chunk files (one chunk in memory at a time) and
    returns the report."""
    skipped, notes = list(unlisted), set()
    counts = {"records_ok": 0, "segments": 0}
    timing = {"seconds_load_all_chunks": 0.0, "seconds_worker_all_chunks": 0.0}

    def write_manifest(f) -> None:
        for i in range(n_chunks):
            chunk = json.loads((out / "segments" / f"{_CHUNK_NAME.format(i)}.json").read_text())
            for row, fields in enumerate(chunk["rows"]):
                f.write(
                    (json.dumps({"chunk": chunk["file"], "row": row, **fields}) + "\n").encode()
                )
            skipped.extend(chunk["skipped"])
            notes.update(chunk["warnings"])
            counts["records_ok"] += chunk["n_records_ok"]
            counts["segments"] += chunk["n_segments"]
            timing["seconds_load_all_chunks"] += chunk["seconds_load"]
            timing["seconds_worker_all_chunks"] += chunk["seconds_total"]

    _atomic_write_bytes(out / "manifest.jsonl", write_manifest)
    return {
        "counts": {
            "records_listed": settings["n_entries"] + len(unlisted),
            "records_ok": counts["records_ok"],
            "records_skipped": len(skipped),
            "segments": counts["segments"],
            "chunks": n_chunks,
            "chunks_processed_this_run": n_done_now,
            "chunks_reused": n_chunks - n_done_now,
        },
        "skipped": skipped,
        "warnings": sorted(notes),
        "settings": settings,
        "config_hash": _settings_hash(settings),
        "workers": workers,
        "timing": timing,
    }


def load_segments(
    out_dir: str | os.PathLike,
) -> tuple[list[dict[str, Any]], Callable[[int | dict], np.ndarray]]:
    """Reads a CLI output directory back.

    Returns:
      ``(rows, fetch)``: the manifest rows (one dict per segment: ``chunk``, ``row``,
      ``record_id``, ``patient_id``, ``segment``, ``report``, ``source_fs``, ...), and
      ``fetch(i_or_row)`` giving that segment as a read-only float32 ``[12, seg_len]`` view of
      the memory-mapped chunk file.
    """
    out = Path(out_dir)
    with open(out / "manifest.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    arrays: dict[str, np.ndarray] = {}

    def fetch(item: int | dict) -> np.ndarray:
        row = rows[item] if isinstance(item, int) else item
        if row["chunk"] not in arrays:
            arrays[row["chunk"]] = np.load(out / row["chunk"], mmap_mode="r")
        return arrays[row["chunk"]][row["row"]]

    return rows, fetch


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m elmjax.ecg.preprocess",
        description="Filter, denoise, resample and segment a whole ECG dataset.",
    )
    parser.add_argument("--layout", required=True, choices=io.LAYOUTS)
    parser.add_argument("--input", required=True, help="dataset root directory")
    parser.add_argument("--out", required=True, help="output directory (resumable)")
    parser.add_argument("--seg-len", type=int, default=2500, help="samples at the target rate")
    parser.add_argument("--target-fs", type=float, default=250.0)
    parser.add_argument("--mode", choices=MODES, default="standard")
    parser.add_argument("--workers", type=int, default=_default_workers())
    parser.add_argument("--chunk-size", type=int, default=256, help="records per chunk file")
    parser.add_argument("--unknown-leads", choices=("error", "drop"), default="error")
    parser.add_argument("--bad-leads", choices=("error", "drop"), default="error")
    parser.add_argument("--nan-gaps", choices=("error", "interpolate"), default="error")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)

    cfg = PreprocessConfig(target_fs=args.target_fs, seg_len=args.seg_len, mode=args.mode)
    read_kwargs = {
        "unknown_leads": args.unknown_leads,
        "bad_leads": args.bad_leads,
        "nan_gaps": args.nan_gaps,
    }
    try:
        report = run(
            args.layout,
            args.input,
            args.out,
            cfg,
            workers=args.workers,
            chunk_size=args.chunk_size,
            read_kwargs=read_kwargs,
            progress=not args.quiet,
        )
    except (SettingsMismatchError, io.ECGReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        counts = report["counts"]
        print(
            f"{counts['segments']} segments from {counts['records_ok']} records; "
            f"{counts['records_skipped']} skipped (see {Path(args.out) / 'report.json'})"
        )
    return 0


if __name__ == "__main__":
    # Run from the importable module so that worker processes can unpickle _process_chunk.
    from elmjax.ecg.preprocess import main as _main

    sys.exit(_main())
