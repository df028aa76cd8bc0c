"""Tests for elmjax.ecg.perturb: seeded ECG perturbations for the robustness study."""

from __future__ import annotations

import numpy as np
import pytest

from elmjax.ecg import perturb

FS = 250.0


def ecg(n: int = 2500, batch: tuple[int, ...] = (), seed: int = 0) -> np.ndarray:
    """A float32 ECG-like test signal [*batch, 12, n] in mV: spiky beats plus a slow wave."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / FS
    shape = batch + (12, 1)
    gain = rng.uniform(0.3, 1.5, size=shape)
    beats = np.exp(-0.5 * ((t % 0.8 - 0.4) / 0.015) ** 2)
    wave = 0.15 * np.sin(2 * np.pi * 1.25 * t + rng.uniform(0, 2 * np.pi, size=shape))
    return (gain * beats + wave).astype(np.float32)


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    clean = clean.astype(np.float64)
    noise = noisy.astype(np.float64) - clean
    return 10 * np.log10(np.mean(clean**2, axis=-1) / np.mean(noise**2, axis=-1))


def power_spectrum(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies and power of the rFFT along the last axis."""
    return np.fft.rfftfreq(d.shape[-1], 1 / FS), np.abs(np.fft.rfft(d, axis=-1)) ** 2


# Every perturbation as (name, call(x, rng) -> array), for the shared properties below.
CALLS = {
    "noise": lambda x, rng: perturb.add_noise(x, 10.0, rng),
    "wander": lambda x, rng: perturb.add_baseline_wander(x, FS, 0.3, rng),
    "powerline": lambda x, rng: perturb.add_powerline(x, FS, 0.1, rng, harmonics=1),
    "bursts": lambda x, rng: perturb.add_motion_bursts(x, FS, rng),
    "dropout": lambda x, rng: perturb.drop_leads(x, rng, n_leads=3)[0],
    "scale": lambda x, rng: perturb.scale_amplitude(x, rng, per_lead=True)[0],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_deterministic_input_untouched_and_shape_kept(name, dtype):
    call = CALLS[name]
    x = ecg().astype(dtype)
    before = x.copy()
    a = call(x, 7)
    b = call(x, np.random.default_rng(7))
    c = call(x, 8)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, x)
    assert a.shape == x.shape and a.dtype == dtype


@pytest.mark.parametrize("name", sorted(CALLS))
def test_batched_items_differ(name):
    x = np.broadcast_to(ecg(n=1000), (4, 12, 1000)).copy()  # four identical items
    y = CALLS[name](x, 3)
    assert y.shape == (4, 12, 1000)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(y[i], y[j]), (i, j)


def test_rng_must_be_seed_or_generator():
    with pytest.raises(ValueError, match="rng"):
        perturb.add_noise(ecg(), 10.0, None)


@pytest.mark.parametrize("target", [-5.0, 0.0, 6.0, 20.0, 40.0])
def test_noise_snr_matches_target(target):
    x = ecg(n=5000, batch=(2,))
    y = perturb.add_noise(x, target, 0)
    measured = snr_db(x, y)
    assert measured.shape == (2, 12)
    np.testing.assert_allclose(measured, target, atol=0.01)


def test_noise_is_white_and_gaussian_like():
    x = ecg(n=20000)
    d = perturb.add_noise(x, 0.0, 1).astype(np.float64) - x
    assert abs(np.mean(d)) < 0.05 * np.std(d)
    z = d / d.std(axis=-1, keepdims=True)  # each lead has its own noise level
    kurtosis = np.mean(z**4)
    assert 2.9 < kurtosis < 3.1
    freqs, p = power_spectrum(d[0])
    low, high = p[(freqs > 1) & (freqs < 60)].mean(), p[freqs > 65].mean()
    assert 0.8 < low / high < 1.25  # flat spectrum


def test_noise_leaves_flat_leads_flat():
    x = ecg()
    x[3] = 0.0
    y = perturb.add_noise(x, 10.0, 0)
    assert np.all(y[3] == 0.0)


def test_powerline_peak_at_mains_frequency_and_no_dc():
    n = 2500  # 10 s: 50 and 60 Hz fall exactly on FFT bins
    x = ecg(n=n)
    for freq in (50.0, 60.0):
        d = perturb.add_powerline(x, FS, 0.2, 5, freq_hz=freq).astype(np.float64) - x
        freqs, p = power_spectrum(d)
        assert np.all(freqs[np.argmax(p, axis=-1)] == freq)
        assert np.all(p[:, 0] < 1e-6 * p.max(axis=-1))
        # The interference is a pure sinusoid of the given amplitude.
        amplitude = 2 * np.sqrt(p.max(axis=-1)) / n
        np.testing.assert_allclose(amplitude, 0.2, rtol=1e-4)
        np.testing.assert_allclose(p.max(axis=-1), p.sum(axis=-1), rtol=1e-6)


def test_powerline_harmonics():
    x = ecg(n=2500)
    d = perturb.add_powerline(x, FS, 0.2, 5, freq_hz=50.0, harmonics=3).astype(np.float64) - x
    freqs, p = power_spectrum(d)
    p50 = p[:, freqs == 50.0][:, 0]
    p100 = p[:, freqs == 100.0][:, 0]
    np.testing.assert_allclose(p100 / p50, 0.25, rtol=1e-3)  # amplitude 1/2 -> power 1/4
    assert np.all(p[:, freqs == 150.0] < 1e-6 * p50[:, None])  # 150 Hz >= Nyquist: left out
    assert np.all(p[:, (freqs != 50.0) & (freqs != 100.0)].sum(axis=-1) < 1e-3 * p50)


def test_baseline_wander_is_slow_with_given_peak():
    n = int(120 * FS)  # long, so that the FFT resolves 0.05 Hz
    x = ecg(n=n)
    d = perturb.add_baseline_wander(x, FS, 0.4, 2).astype(np.float64) - x
    np.testing.assert_allclose(np.max(np.abs(d), axis=-1), 0.4, rtol=1e-4)
    freqs, p = power_spectrum(d * np.hanning(n))
    below = p[:, freqs <= 0.55].sum(axis=-1) / p.sum(axis=-1)
    assert np.all(below > 0.999), below
    assert np.all(p[:, freqs >= 1.0].sum(axis=-1) < 1e-5 * p.sum(axis=-1))


def test_motion_bursts_are_localised():
    n, length, n_bursts = 2500, 125, 2
    x = ecg(n=n, batch=(3,))
    y = perturb.add_motion_bursts(
        x, FS, 4, n_bursts=n_bursts, duration_s=length / FS, amplitude_mv=1.5
    )
    changed = y != x  # [3, 12, n]
    for item in range(3):
        assert 1 <= np.count_nonzero(changed[item].any(axis=-1)) <= n_bursts  # few leads hit
        assert 0 < changed[item].sum() <= n_bursts * length  # most samples untouched
        for lead in np.flatnonzero(changed[item].any(axis=-1)):
            idx = np.flatnonzero(changed[item, lead])
            runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
            assert len(runs) <= n_bursts and all(len(r) <= n_bursts * length for r in runs)
        d = y[item].astype(np.float64) - x[item]
        assert 0.7 < np.max(np.abs(d)) <= 1.5 * n_bursts + 1e-4  # large relative to the ECG


def test_motion_bursts_single_burst_has_exact_peak_and_smooth_envelope():
    x = ecg(n=2500)
    y = perturb.add_motion_bursts(x, FS, 9, n_bursts=1, duration_s=1.0, amplitude_mv=2.0)
    d = y.astype(np.float64) - x
    lead = int(np.argmax(np.abs(d).max(axis=-1)))
    idx = np.flatnonzero(d[lead])
    assert len(idx) == 250 and idx[-1] - idx[0] == 249  # one contiguous 1 s window
    np.testing.assert_allclose(np.abs(d[lead]).max(), 2.0, rtol=1e-5)
    burst = d[lead, idx]
    assert np.abs(burst[:5]).max() < 0.1 and np.abs(burst[-5:]).max() < 0.1  # tapered edges
    assert np.count_nonzero(d) == 250
    freqs, p = power_spectrum(d[lead])
    in_band = p[(freqs >= 0.5) & (freqs <= 12.0)].sum() / p.sum()
    assert in_band > 0.95, in_band


def test_lead_dropout_zeroes_exactly_the_reported_leads():
    x = ecg(batch=(5,))
    y, dropped = perturb.drop_leads(x, 11, n_leads=4)
    assert dropped.shape == (5, 12) and dropped.dtype == bool
    np.testing.assert_array_equal(dropped.sum(axis=-1), 4)
    assert np.all(y[dropped] == 0.0)
    np.testing.assert_array_equal(y[~dropped], x[~dropped])
    assert len({tuple(row) for row in dropped}) > 1  # items drop different leads
    _, by_fraction = perturb.drop_leads(x, 11, fraction=0.25)
    np.testing.assert_array_equal(by_fraction.sum(axis=-1), 3)


def test_amplitude_scale_multiplies_by_reported_gains():
    x = ecg(batch=(3,))
    y, gains = perturb.scale_amplitude(x, 2, gain_range=(0.5, 2.0), per_lead=True)
    assert gains.shape == (3, 12)
    assert np.all((gains >= 0.5) & (gains <= 2.0))
    assert len(np.unique(gains)) == 36
    np.testing.assert_allclose(y, x * gains[..., None], rtol=1e-6)
    y1, g1 = perturb.scale_amplitude(x, 2, gain_range=(0.8, 1.2))
    assert np.all(g1 == g1[:, :1]) and len(np.unique(g1)) == 3  # one gain per item
    np.testing.assert_allclose(y1, x * g1[..., None], rtol=1e-6)


def test_apply_perturbations_matches_single_functions_and_records():
    x = ecg(batch=(2,))
    specs = [
        {"kind": "noise", "snr_db": 12},
        {"kind": "lead_dropout", "n_leads": 2},
        {"kind": "amplitude_scale", "gain_range": [0.9, 1.1]},
    ]
    before = x.copy()
    y, records = perturb.apply_perturbations(x, FS, specs, seed=3)
    np.testing.assert_array_equal(x, before)
    assert y.shape == x.shape and y.dtype == np.float32
    assert [r["kind"] for r in records] == ["noise", "lead_dropout", "amplitude_scale"]
    assert records[0] == {"kind": "noise", "snr_db": 12}
    dropped, gains = records[1]["dropped"], records[2]["gains"]
    assert np.all(y[dropped] == 0.0)
    assert gains.shape == (2, 12) and np.all((gains >= 0.9) & (gains <= 1.1))
    # Same result as chaining the functions with the spawned streams.
    streams = np.random.default_rng(3).spawn(3)
    expected = perturb.add_noise(x.astype(np.float64), 12, streams[0])
    expected, _ = perturb.drop_leads(expected, streams[1], n_leads=2)
    expected, _ = perturb.scale_amplitude(expected, streams[2], gain_range=[0.9, 1.1])
    np.testing.assert_array_equal(y, expected.astype(np.float32))
    y2, _ = perturb.apply_perturbations(x, FS, specs, seed=3)
    np.testing.assert_array_equal(y, y2)
    # Appending a spec keeps the draws of the earlier ones.
    y3, records3 = perturb.apply_perturbations(
        x, FS, specs + [{"kind": "powerline", "amplitude_mv": 0.0}], seed=3
    )
    np.testing.assert_array_equal(records3[1]["dropped"], dropped)
    np.testing.assert_allclose(y3, y, atol=1e-6)


@pytest.mark.parametrize("name", sorted(perturb.PRESETS))
def test_presets_run(name):
    x = ecg()
    y, records = perturb.apply_perturbations(x, FS, name, seed=0)
    assert len(records) == len(perturb.PRESETS[name])
    if name == "clean":
        np.testing.assert_array_equal(y, x)
    else:
        assert not np.array_equal(y, x)
    if name.startswith("noise_"):
        np.testing.assert_allclose(snr_db(x, y), records[0]["snr_db"], atol=0.01)


def test_presets_get_stronger_with_level():
    x = ecg()
    error = {
        level: np.mean((perturb.apply_perturbations(x, FS, f"combined_{level}", 0)[0] - x) ** 2)
        for level in ("mild", "moderate", "severe")
    }
    assert error["mild"] < error["moderate"] < error["severe"]


@pytest.mark.parametrize(
    ("specs", "key"),
    [
        ([{"kind": "nosie", "snr_db": 3}], "'nosie'"),
        ([{"snr_db": 3}], "'kind'"),
        ([{"kind": "noise"}], "'snr_db'"),
        ([{"kind": "noise", "snr_db": 3, "snr": 3}], "'snr'"),
        ([{"kind": "noise", "snr_db": "loud"}], "snr_db"),
        ([{"kind": "noise", "snr_db": float("nan")}], "snr_db"),
        ([{"kind": "baseline_wander", "amplitude_mv": -1}], "amplitude_mv"),
        ([{"kind": "baseline_wander", "amplitude_mv": 1, "band_hz": (0.5, 0.1)}], "band_hz"),
        ([{"kind": "powerline", "amplitude_mv": 0.1, "freq_hz": 200}], "freq_hz"),
        ([{"kind": "powerline", "amplitude_mv": 0.1, "harmonics": 1.5}], "harmonics"),
        ([{"kind": "motion_bursts", "n_bursts": -1}], "n_bursts"),
        ([{"kind": "motion_bursts", "duration_s": 0}], "duration_s"),
        ([{"kind": "motion_bursts", "band_hz": (1, 500)}], "band_hz"),
        ([{"kind": "lead_dropout", "n_leads": 13}], "n_leads"),
        ([{"kind": "lead_dropout", "fraction": 1.5}], "fraction"),
        ([{"kind": "lead_dropout"}], "n_leads or fraction"),
        ([{"kind": "amplitude_scale", "gain_range": (0, 2)}], "gain_range"),
        ([{"kind": "amplitude_scale", "per_lead": "yes"}], "per_lead"),
        ("combined_extreme", "combined_extreme"),
        ([["noise", 3]], "specs[0]"),
        ({"kind": "noise", "snr_db": 3}, "list of dicts"),
    ],
)
def test_bad_specs_raise_value_error_naming_the_key(specs, key):
    with pytest.raises(ValueError) as info:
        perturb.apply_perturbations(ecg(n=500), FS, specs, seed=0)
    assert key in str(info.value)


def test_bad_signal_shape_and_fs():
    with pytest.raises(ValueError, match="shape"):
        perturb.add_noise(np.zeros(100), 10.0, 0)
    with pytest.raises(ValueError, match="fs"):
        perturb.apply_perturbations(ecg(n=500), 0.0, "noise_mild", seed=0)
