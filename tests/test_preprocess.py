"""Vectorised ECG preprocessing: parity with the per-lead reference port, filter/resampling
behaviour on known signals, segmentation, batching, low sampling rates, and the batch CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, ecg_like, write_wfdb
from scipy import signal

from elmjax.ecg import io, reference_loop, synth
from elmjax.ecg import preprocess as pp

STANDARD = pp.PreprocessConfig()
REFERENCE = pp.PreprocessConfig(mode="reference")


def realistic(seconds: float, fs: float = 500.0, seed: int = 0) -> np.ndarray:
    """A [12, n] float32 ECG-like signal in mV with baseline wander, DC offset, mains hum and
    noise (beats from conftest.ecg_like)."""
    n = int(round(seconds * fs))
    t = np.arange(n) / fs
    rng = np.random.default_rng(seed)
    x = ecg_like(n, fs, seed=seed).T
    x += 0.3 * np.sin(2 * np.pi * 0.2 * t + rng.uniform(0, 2 * np.pi, (12, 1)))
    x += rng.normal(0, 0.3, (12, 1))
    x += 0.05 * np.sin(2 * np.pi * 50 * t) + 0.01 * rng.standard_normal((12, n))
    return x.astype(np.float32)


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    """RMS of a - b relative to the RMS of b around its mean."""
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.std(b))


def tone_amplitude(y: np.ndarray, freq: float, t: np.ndarray) -> tuple[float, float]:
    """(amplitude, phase) of the least-squares fit of a sinusoid at ``freq`` (plus offset)."""
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t), np.ones_like(t)])
    s, c, _ = np.linalg.lstsq(basis.T, y, rcond=None)[0]
    return float(np.hypot(s, c)), float(np.arctan2(c, s))


# ---------------------------------------------------------------------------------------------
# Parity with the per-lead reference port
# ---------------------------------------------------------------------------------------------


PARITY_CASES = [
    (500.0, 10.0),
    (500.0, 9.998),
    (360.0, 10.0),
    (400.0, 10.24),
    (1000.0, 10.0),
    (250.0, 10.0),
]


@pytest.mark.parametrize(("fs", "seconds"), PARITY_CASES)
def test_reference_mode_matches_reference_loop(fs, seconds):
    batch = np.stack([realistic(seconds, fs, seed) for seed in range(3)])
    cfg = pp.PreprocessConfig(mode="reference", seg_len=1250)
    got = pp.preprocess_segments(batch, fs, cfg)
    want = [reference_loop.preprocess_record(x, fs, 250.0, 1250) for x in batch]
    np.testing.assert_array_equal(got.record, np.repeat(np.arange(3), [len(w) for w in want]))
    want = np.concatenate(want)
    assert got.data.dtype == np.float32 and got.data.shape == want.shape
    np.testing.assert_allclose(got.data, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_reference_stages_match_reference_loop_stage_by_stage():
    x = realistic(10.0, 500.0, seed=4)[None]
    filtered = pp.filter_ecg(x, 500.0, REFERENCE)
    np.testing.assert_allclose(filtered[0], reference_loop.advanced_ecg_filter(x[0], 500.0))
    x_odd = filtered[..., :4999]  # odd length: waverec is one sample long, Fourier-fixed
    np.testing.assert_allclose(
        pp.denoise_wavelet(x_odd, REFERENCE)[0], reference_loop.wavelet_denoise(x_odd[0])
    )
    np.testing.assert_allclose(
        pp.resample(filtered, 500.0, 250.0, "reference")[0],
        reference_loop.nsample_ecg(filtered[0], 500.0, 250.0).astype(np.float32),
        rtol=1e-6,
        atol=1e-6,
    )


# ---------------------------------------------------------------------------------------------
# Standard vs reference, and both vs the ideal filter
# ---------------------------------------------------------------------------------------------


def test_standard_filter_matches_ideal_zero_phase_filter_where_reference_does_not():
    """The ideal output is the zero-phase cascade applied to a 60-s recording; both modes see
    only its middle 10 s. In the middle 6 s the standard filter is within 2 % (RMS) of the ideal;
    the reference's sequential filtfilt passes leave high-pass transients several times larger."""
    fs = 500.0
    long = realistic(60.0, fs, seed=1).astype(np.float64)
    sos = pp._cascade_sos(pp._filter_plan(fs, STANDARD))
    ideal = signal.sosfiltfilt(sos, long, axis=-1)[:, 25000:30000]
    window = long[None, :, 25000:30000]
    interior = slice(1000, 4000)
    std_err = rel_rms(pp.filter_ecg(window, fs, STANDARD)[0, :, interior], ideal[:, interior])
    ref_err = rel_rms(pp.filter_ecg(window, fs, REFERENCE)[0, :, interior], ideal[:, interior])
    assert std_err < 0.02
    assert ref_err > 3 * std_err


def test_standard_and_reference_agree_in_the_interior():
    """Tolerance: the modes differ by design, so whole pipelines on realistic ECGs agree only
    loosely in the interior (middle 60 %): correlation >= 0.98 and relative RMS difference
    <= 0.25 (measured 0.994 and 0.14). The sources, each checked on its own:
    * filters: the same |H(f)|^2. On a burst that is zero near both edges (no edge effects) they
      agree to 1e-4; on signals that do not start at zero the reference's filtfilt passes start
      the 0.05 Hz high-pass from a wrong state, and its transient reaches the interior;
    * wavelet threshold: universal from cD1 vs median(|cD4|) / 0.6745: within 5 % (measured 1.6 %);
    * resampling: the reference's linspace grids put output sample k at k (n-1)/(m-1) input
      samples instead of k n/m (up to half an input sample late at the end): a slow sine agrees
      to 0.02, a realistic ECG to 8 % in the interior (steep QRS slopes; measured 3.8 %)."""
    fs = 500.0
    x = np.stack([realistic(10.0, fs, seed) for seed in range(3)])
    std, ref = pp.preprocess(x, fs, STANDARD), pp.preprocess(x, fs, REFERENCE)
    mid = slice(500, 2000)
    assert std.shape == ref.shape == (3, 12, 2500)
    assert np.corrcoef(std[..., mid].ravel(), ref[..., mid].ravel())[0, 1] >= 0.98
    assert rel_rms(std[..., mid], ref[..., mid]) <= 0.25

    t = np.arange(5000) / fs
    tones = 0.8 * np.sin(2 * np.pi * 7 * t) + 0.3 * np.sin(2 * np.pi * 23 * t)
    envelope = np.zeros(5000)
    envelope[1250:3750] = signal.windows.tukey(2500, 0.5)
    burst = np.tile(tones * envelope + 0.2 * np.sin(2 * np.pi * 50 * t) * envelope, (1, 12, 1))
    f_std, f_ref = pp.filter_ecg(burst, fs, STANDARD), pp.filter_ecg(burst, fs, REFERENCE)
    assert rel_rms(f_std, f_ref) < 1e-4

    filtered = pp.filter_ecg(x, fs, REFERENCE)
    interior = slice(1000, 4000)
    w_std, w_ref = pp.denoise_wavelet(filtered, STANDARD), pp.denoise_wavelet(filtered, REFERENCE)
    assert rel_rms(w_std[..., interior], w_ref[..., interior]) < 0.05

    slow = np.sin(2 * np.pi * 0.7 * t)[None, None]
    r_std, r_ref = pp.resample(slow, fs, 250.0), pp.resample(slow, fs, 250.0, "reference")
    assert np.abs(r_std - r_ref)[..., 100:-100].max() < 0.02
    r_std, r_ref = pp.resample(filtered, fs, 250.0), pp.resample(filtered, fs, 250.0, "reference")
    assert rel_rms(r_std[..., mid], r_ref[..., mid]) < 0.08


# ---------------------------------------------------------------------------------------------
# Known signals
# ---------------------------------------------------------------------------------------------


def test_filter_removes_mains_and_drift_and_keeps_10hz():
    fs = 500.0
    t = np.arange(10000) / fs
    tone = np.sin(2 * np.pi * 10 * t)
    hum = 0.5 * np.sin(2 * np.pi * 50 * t) + 0.5 * np.sin(2 * np.pi * 60 * t + 1.0)
    drift = 1.0 + 0.5 * np.sin(2 * np.pi * 0.1 * t + 1.0)
    x = np.tile(tone + hum + drift, (2, 12, 1))
    y = pp.filter_ecg(x, fs, STANDARD)[1, 5]
    mid = slice(2000, 8000)
    assert tone_amplitude(y[mid], 10, t[mid])[0] == pytest.approx(1.0, abs=2e-3)
    assert tone_amplitude(y[mid], 50, t[mid])[0] < 1e-3
    assert tone_amplitude(y[mid], 60, t[mid])[0] < 1e-3
    assert np.abs(y[mid] - tone[mid]).max() < 0.02  # the DC and the 0.1 Hz drift are gone

    y_ref = pp.filter_ecg(x, fs, REFERENCE)[1, 5]  # mains and tone the same in reference mode
    assert tone_amplitude(y_ref[mid], 10, t[mid])[0] == pytest.approx(1.0, abs=5e-3)
    assert tone_amplitude(y_ref[mid], 50, t[mid])[0] < 1e-3


@pytest.mark.parametrize("fs", [500.0, 360.0, 400.0, 125.0, 1000.0])
def test_resample_keeps_5hz_amplitude_phase_and_length(fs):
    n = int(10 * fs)
    x = np.sin(2 * np.pi * 5 * np.arange(n) / fs + 0.7)[None, None]
    y = pp.resample(x, fs, 250.0, "standard")[0, 0]
    assert y.dtype == np.float32 and len(y) == 2500 == pp.output_length(n, fs, STANDARD)
    t = np.arange(2500) / 250.0
    np.testing.assert_allclose(y[20:-20], np.sin(2 * np.pi * 5 * t + 0.7)[20:-20], atol=2e-3)
    amplitude, phase = tone_amplitude(y.astype(np.float64), 5, t)
    assert amplitude == pytest.approx(1.0, abs=2e-3)
    assert phase == pytest.approx(0.7, abs=2e-3)
    assert len(pp.resample(x, fs, 250.0, "reference")[0, 0]) == int(n * 250 / fs)


def test_resample_lengths_of_odd_inputs():
    assert pp.resample_ratio(360.0, 250.0) == (25, 36)
    assert pp.resample_ratio(400, 250) == (5, 8)
    x = np.zeros((1, 12, 1028), np.float32)
    assert pp.resample(x, 125.0, 250.0).shape == (1, 12, 2056)
    assert pp.resample(x[..., :1001], 360.0, 250.0).shape[-1] == 696  # ceil(1001 * 25 / 36)
    assert pp.resample(x[..., :1001], 360.0, 250.0, "reference").shape[-1] == 695  # truncated


def test_segmentation_counts_and_nan_segments():
    x = realistic(10.0, 500.0)[None]
    assert pp.preprocess(x, 500.0).shape == (1, 12, 2500)
    assert pp.preprocess_segments(x, 500.0, pp.PreprocessConfig(seg_len=2500)).data.shape == (
        1,
        12,
        2500,
    )
    two = pp.preprocess_segments(x, 500.0, pp.PreprocessConfig(seg_len=1250))
    assert two.data.shape == (2, 12, 1250) and two.index.tolist() == [0, 1]

    y = np.ones((2, 12, 2800), np.float32)  # remainder of 300 dropped
    y[1, 3, 1300] = np.nan  # second record, second 1250-window
    segs = pp.segment(y, 1250)
    assert segs.record.tolist() == [0, 0, 1] and segs.index.tolist() == [0, 1, 0]
    assert segs.data.shape == (3, 12, 1250) and np.isfinite(segs.data).all()
    assert pp.segment(y[0], 2500).data.shape == (1, 12, 2500)
    assert pp.segment(y, 3000).data.shape == (0, 12, 3000)


@pytest.mark.parametrize("cfg", [STANDARD, REFERENCE], ids=["standard", "reference"])
def test_batched_equals_one_by_one(cfg):
    x = np.stack([realistic(10.0, 500.0, seed) for seed in range(4)])
    batched = pp.preprocess(x, 500.0, cfg)
    for i in range(4):
        single = pp.preprocess(x[i], 500.0, cfg)
        assert single.shape == (12, 2500)
        np.testing.assert_allclose(batched[i], single, rtol=1e-6, atol=1e-6)


def test_zero_lead_stays_zero_and_outputs_are_float32():
    x = realistic(10.0, 500.0)[None]
    x[0, 4] = 0.0  # a missing lead is zero-filled by the reader
    for cfg in (STANDARD, REFERENCE):
        y = pp.preprocess(x, 500.0, cfg)
        assert y.dtype == np.float32 and np.isfinite(y).all()
        assert not y[0, 4].any()


def test_low_sampling_rates_warn_and_give_finite_output():
    x = realistic(8.224, 125.0)[None]  # the MIMIC-II segment: 1028 samples at 125 Hz
    with pytest.warns(UserWarning, match=r"fs=125 Hz: band-pass upper edge 100 Hz .* 56\.25"):
        y = pp.preprocess(x, 125.0, STANDARD)
    assert y.shape == (1, 12, 2056) and np.isfinite(y).all()
    with pytest.warns(UserWarning, match="fs=125 Hz"):
        y_ref = pp.preprocess(x, 125.0, REFERENCE)
    assert y_ref.shape == (1, 12, 2056) and np.isfinite(y_ref).all()
    with pytest.warns(UserWarning) as caught:
        y = pp.filter_ecg(realistic(10.0, 100.0)[None], 100.0, STANDARD)
    messages = sorted(str(w.message) for w in caught)
    assert (
        messages[0].startswith("fs=100 Hz: band-pass upper edge 100 Hz") and "45 Hz" in messages[0]
    )
    assert messages[1].startswith("fs=100 Hz: notch filter(s) at [50.0, 60.0] Hz")
    assert len(messages) == 2 and np.isfinite(y).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.filter_ecg(realistic(2.0, 360.0)[None], 360.0, STANDARD)  # no warning at 360 Hz


def test_real_mimic2_record_at_125hz(shared_data):
    record = io.read_record(shared_data / "wfdb" / "3000003_0003")
    with pytest.warns(UserWarning, match="fs=125"):
        segs = pp.preprocess_segments(record.signal, record.fs, pp.PreprocessConfig(seg_len=1250))
    assert segs.data.shape == (1, 12, 1250) and np.isfinite(segs.data).all()
    assert np.abs(segs.data[0, 1]).max() > 0.1 and not segs.data[0, 0].any()  # II kept, I zero


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        pp.PreprocessConfig(mode="fast")
    with pytest.raises(ValueError, match="seg_len"):
        pp.PreprocessConfig(seg_len=0)
    with pytest.raises(ValueError, match="band"):
        pp.PreprocessConfig(band=(40.0, 1.0))
    assert json.loads(json.dumps(STANDARD.to_dict()))["notch"] == [50.0, 60.0]


# ---------------------------------------------------------------------------------------------
# Batch CLI
# ---------------------------------------------------------------------------------------------

GOOD = ["a/r00", "a/r01", "a/r02", "a/r03", "b/r04", "b/r05_360hz"]
BAD = {"a/bad_flat": "flat line", "b/bad_nodat": "not found", "b/short": "too short"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A wfdb-dir dataset: six good 10-s records (one at 360 Hz) and three bad ones."""
    root = tmp_path_factory.mktemp("corpus")
    for i, name in enumerate(GOOD):
        fs = 360.0 if name.endswith("360hz") else 500.0
        folder, base = name.split("/")
        write_wfdb(root / folder, base, realistic(10.0, fs, seed=i).T, fs=fs)
    flat = realistic(10.0, 500.0, seed=9).T
    flat[:, 2] = 0.0
    write_wfdb(root / "a", "bad_flat", flat)
    nodat = write_wfdb(root / "b", "bad_nodat", realistic(10.0, 500.0).T)
    os.remove(f"{nodat}.dat")
    write_wfdb(root / "b", "short", realistic(3.0, 500.0).T)
    return root


def run_cli(corpus: Path, out: Path, **kwargs):
    kwargs = {"workers": 1, "chunk_size": 4, "progress": False, **kwargs}
    cfg = kwargs.pop("cfg", pp.PreprocessConfig(seg_len=1250))
    return pp.run("wfdb-dir", corpus, out, cfg, **kwargs)


def test_cli_writes_segments_manifest_and_report(corpus, tmp_path):
    out = tmp_path / "out"
    report = run_cli(corpus, out)
    counts = report["counts"]
    assert counts["records_listed"] == 9 and counts["chunks"] == 3
    assert counts["records_ok"] == 6 and counts["segments"] == 12
    assert counts["records_skipped"] == 3
    reasons = {s["record_id"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == set(BAD)
    for record_id, words in BAD.items():
        assert words in reasons[record_id]
    assert json.loads((out / "report.json").read_text())["counts"] == counts

    chunk0 = np.load(out / "segments" / "chunk-00000.npy", mmap_mode="r")
    assert chunk0.dtype == np.float32 and chunk0.shape[1:] == (12, 1250)
    rows, fetch = pp.load_segments(out)
    assert len(rows) == 12
    assert [r["record_id"] for r in rows[::2]] == GOOD and [r["segment"] for r in rows[:2]] == [
        0,
        1,
    ]
    assert rows[-1]["source_fs"] == 360.0 and rows[0]["leads_missing"] == []

    record = io.read_record(corpus / "b" / "r05_360hz")
    want = pp.preprocess_segments(record.signal, record.fs, pp.PreprocessConfig(seg_len=1250))
    np.testing.assert_array_equal(fetch(11), want.data[1])
    np.testing.assert_array_equal(fetch(rows[10]), want.data[0])


def test_cli_resumes_without_redoing_chunks_and_refuses_other_settings(corpus, tmp_path):
    out = tmp_path / "out"
    run_cli(corpus, out)
    files = sorted((out / "segments").iterdir())
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    manifest = (out / "manifest.jsonl").read_text()

    again = run_cli(corpus, out)
    assert (
        again["counts"]["chunks_reused"] == 3 and again["counts"]["chunks_processed_this_run"] == 0
    )
    assert {f.name: f.stat().st_mtime_ns for f in files} == stamps
    assert (out / "manifest.jsonl").read_text() == manifest

    (out / "segments" / "chunk-00001.json").unlink()  # as if interrupted before it finished
    resumed = run_cli(corpus, out)
    assert resumed["counts"]["chunks_processed_this_run"] == 1
    assert (out / "segments" / "chunk-00000.npy").stat().st_mtime_ns == stamps["chunk-00000.npy"]
    assert (out / "manifest.jsonl").read_text() == manifest

    with pytest.raises(pp.SettingsMismatchError, match="different settings.*preprocess"):
        run_cli(corpus, out, cfg=pp.PreprocessConfig(seg_len=2500))
    with pytest.raises(pp.SettingsMismatchError, match="chunk_size"):
        run_cli(corpus, out, chunk_size=2)


def test_cli_module_with_two_workers_matches_one_worker(corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(corpus, one)
    command = [sys.executable, "-m", "elmjax.ecg.preprocess", "--layout", "wfdb-dir"]
    command += ["--input", str(corpus), "--out", str(two), "--seg-len", "1250", "--quiet"]
    command += ["--workers", "2", "--chunk-size", "4"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (one / "manifest.jsonl").read_text() == (two / "manifest.jsonl").read_text()
    for i in range(3):
        name = f"segments/chunk-{i:05d}.npy"
        np.testing.assert_array_equal(np.load(one / name), np.load(two / name))

    refused = subprocess.run(
        [*command, "--mode", "reference"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "different settings" in refused.stderr


def test_cli_on_a_synthetic_ptbxl_corpus_skips_a_record_without_data(tmp_path):
    data, out = tmp_path / "synth", tmp_path / "out"
    synth.generate_corpus(data, num_ecgs=6, seed=1, workers=1, progress=False)
    with open(data / "ptbxl_database.csv", newline="") as f:
        table = {row["ecg_id"]: row for row in csv.DictReader(f)}
    assert sorted(table, key=int) == ["1", "2", "3", "4", "5", "6"]
    gone = data / table["3"]["filename_hr"]
    os.remove(f"{gone}.dat")

    argv = ["--layout", "ptbxl", "--input", str(data), "--out", str(out), "--seg-len", "1250"]
    assert pp.main([*argv, "--workers", "1", "--chunk-size", "4", "--quiet"]) == 0

    report = json.loads((out / "report.json").read_text())
    counts = report["counts"]
    assert (counts["records_listed"], counts["records_ok"], counts["records_skipped"]) == (6, 5, 1)
    assert counts["segments"] == 10  # 10 s at 250 Hz = two 1250-sample segments per record
    [skipped] = report["skipped"]
    assert skipped["record_id"] == "3"
    assert skipped["path"] == f"{gone}.dat"
    assert skipped["reason"] == f"data file named by {gone}.hea not found"

    rows, fetch = pp.load_segments(out)
    kept = ["1", "2", "4", "5", "6"]
    assert [(r["record_id"], r["segment"]) for r in rows] == [(i, s) for i in kept for s in (0, 1)]
    for row in rows:
        source = table[row["record_id"]]
        assert row["patient_id"] == str(int(float(source["patient_id"])))
        assert row["report"] == source["report"]
        assert row["path"] == str(data / source["filename_hr"])
        assert row["source_fs"] == 500.0 and row["source_samples"] == 5000
        assert row["leads_missing"] == []
    assert any(r["patient_id"] != r["record_id"] for r in rows)  # ids from the table
    assert all(fetch(i).shape == (12, 1250) and np.isfinite(fetch(i)).all() for i in range(10))
