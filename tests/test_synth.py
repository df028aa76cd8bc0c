"""Tests of the synthetic ECG generator: every label is checked against an independent, simple
measurement of the signal; the corpus against the PTB-XL and ECG-QA formats."""

from __future__ import annotations

import ast
import collections
import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import wfdb

from elmjax.ecg import io, synth

FS = 500
LEAD = {name: i for i, name in enumerate(synth.LEADS)}
QA_KEYS = [
    "template_id",
    "question_id",
    "sample_id",
    "question_type",
    "attribute_type",
    "question",
    "answer",
    "ecg_id",
    "attribute",
]


# ----------------------------------------------------------------------------------------------
# Independent measurements (simple, and unaware of how the simulator works)
# ----------------------------------------------------------------------------------------------


def detect_qrs(signal: np.ndarray, fs: float = FS) -> np.ndarray:
    """QRS detector: summed absolute 10-ms slope over all leads, smoothed over 30 ms,
    thresholded at 30% of its 99.5th percentile, 250 ms refractory period. Returns peak
    sample indices."""
    lag = int(0.01 * fs)
    slope = np.abs(signal[:, lag:] - signal[:, :-lag]).sum(axis=0)
    k = int(0.03 * fs)
    smooth = np.convolve(slope, np.ones(k) / k, mode="same")
    above = smooth > 0.3 * np.percentile(smooth, 99.5)
    starts = np.flatnonzero(np.diff(above.astype(int)) == 1) + 1
    peaks: list[int] = []
    for start in starts:
        peak = int(start + np.argmax(smooth[start : start + int(0.2 * fs)]))
        if not peaks or peak - peaks[-1] > 0.25 * fs:
            peaks.append(peak)
    return np.array(peaks)


def qrs_bounds(clean: np.ndarray, peak: int, fs: float = FS) -> tuple[int, int]:
    """QRS onset and end around a detected peak on a noise-free signal: the first and last
    sample within +-150 ms where the summed absolute 4-ms slope of the 12 leads exceeds 10%
    of its maximum (P and T waves are far slower, unless the QRS has low voltage)."""
    lag = int(0.004 * fs)
    lo, hi = peak - int(0.15 * fs), peak + int(0.15 * fs)
    slope = np.abs(clean[:, lo + lag : hi + lag] - clean[:, lo:hi]).sum(axis=0)
    fast = np.flatnonzero(slope > 0.1 * slope.max())
    return lo + int(fast[0]), lo + int(fast[-1]) + lag


def inner_peaks(signal: np.ndarray, margin_s: float = 0.6) -> np.ndarray:
    peaks = detect_qrs(signal)
    n = signal.shape[1]
    return peaks[(peaks > margin_s * FS) & (peaks < n - margin_s * FS)]


def clean_case(duration: float = 10.0, seed: int = 1, **fields) -> tuple[np.ndarray, dict]:
    return synth.simulate(synth.ECGParams(**fields), duration=duration, rng=seed, noise=False)


# ----------------------------------------------------------------------------------------------
# Signal
# ----------------------------------------------------------------------------------------------


def test_shape_units_and_einthoven_hold_exactly():
    for seed in range(6):
        params = synth.sample_params(np.random.default_rng(seed))
        signal, _ = synth.simulate(params, duration=10.0, rng=seed)
        assert signal.shape == (12, 5000) and signal.dtype == np.float32
        assert 0.2 < np.abs(signal).max() < 8.0  # millivolts
        i, ii, iii, avr, avl, avf = signal[:6]
        np.testing.assert_allclose(i + iii, ii, atol=1e-5)
        np.testing.assert_allclose(avr + avl + avf, 0.0, atol=1e-5)
        np.testing.assert_allclose(avl, i - ii / 2, atol=1e-5)


def test_lead_matrix_is_dower_plus_derived_leads():
    dower = synth.LEAD_MATRIX[[LEAD[x] for x in synth.INDEPENDENT_LEADS]]
    np.testing.assert_allclose(dower[0], [0.632, -0.235, 0.059])
    np.testing.assert_allclose(dower[2], [-0.515, 0.157, -0.917])
    np.testing.assert_allclose(dower[7], [0.831, 0.076, 0.230])
    m = synth.LEAD_MATRIX
    np.testing.assert_allclose(m[LEAD["III"]], m[LEAD["II"]] - m[LEAD["I"]])
    np.testing.assert_allclose(m[LEAD["aVF"]], m[LEAD["II"]] - m[LEAD["I"]] / 2)


def test_simulation_is_deterministic_per_seed():
    params = synth.sample_params(np.random.default_rng(4))
    a, labels_a = synth.simulate(params, rng=11)
    b, labels_b = synth.simulate(params, rng=11)
    c, _ = synth.simulate(params, rng=12)
    np.testing.assert_array_equal(a, b)
    assert labels_a == labels_b
    assert not np.array_equal(a, c)
    clean, labels_clean = synth.simulate(params, rng=11, noise=False)
    assert labels_clean == labels_a  # labels are measured on the clean signal
    assert 0 < np.abs(a - clean).std() < 0.3  # noise is there, and ECG-sized


@pytest.mark.parametrize("rate", [48.0, 75.0, 115.0])
def test_heart_rate_and_r_peaks_match_detected_beats(rate):
    params = synth.ECGParams(heart_rate=rate, noise_mv=0.015, emg_mv=0.01, wander_mv=0.1)
    signal, labels = synth.simulate(params, rng=5)
    peaks = detect_qrs(signal)
    detected = 60.0 * FS / np.diff(peaks).mean()
    assert abs(detected - labels["heart_rate"]) < max(3.0, 0.03 * rate)
    expected = "sinus bradycardia" if rate < 60 else "sinus tachycardia" if rate > 100 else None
    assert labels["rhythm"] == (expected or "sinus rhythm")
    for r in labels["r_peaks"]:
        if 0.1 * FS < r < signal.shape[1] - 0.1 * FS:
            assert np.abs(peaks - r).min() < 0.05 * FS


def average_beat(signal: np.ndarray, peaks: np.ndarray, before_s: float) -> np.ndarray:
    offsets = np.arange(-int(before_s * FS), 0)
    return signal[:, peaks[:, None] + offsets[None, :]].mean(axis=1)  # [12, W]


def test_atrial_fibrillation_is_irregular_and_has_no_p_waves():
    af_signal, af = clean_case(duration=20.0, rhythm="af", heart_rate=70.0, af_rr_cv=0.25)
    sinus_signal, sinus = clean_case(duration=20.0, rhythm="sinus", heart_rate=70.0)
    assert af["rhythm"] == "atrial fibrillation" and af["pr_ms"] is None
    cv = {}
    p_height = {}
    for name, signal in (("af", af_signal), ("sinus", sinus_signal)):
        peaks = inner_peaks(signal)
        rr = np.diff(peaks)
        cv[name] = rr.std() / rr.mean()
        # Lead II averaged over beats, 300..100 ms before the R peak: P wave or nothing.
        window = average_beat(signal, peaks, 0.3)[LEAD["II"], : int(0.2 * FS)]
        p_height[name] = window.max() - window.min()
    assert cv["af"] > 0.1 and cv["sinus"] < 0.06
    assert abs(cv["af"] - af["rr_cv"]) < 0.05 and abs(cv["sinus"] - sinus["rr_cv"]) < 0.02
    assert p_height["sinus"] > 0.1 and p_height["af"] < 0.06
    # The fibrillatory waves are there: V1 moves between beats in AF, not in sinus rhythm.
    assert af_signal[LEAD["V1"]].std() > 0


def measure_pr(clean: np.ndarray) -> float:
    """PR in ms: P onset (lead II falls below 10% of the P peak, going left) to QRS onset."""
    prs = []
    for peak in inner_peaks(clean):
        onset, _ = qrs_bounds(clean, peak)
        lead = clean[LEAD["II"], onset - int(0.4 * FS) : onset]
        p_peak = int(np.argmax(lead))
        below = np.flatnonzero(lead[:p_peak] < 0.1 * lead[p_peak])
        prs.append((len(lead) - below[-1]) / FS * 1000.0)
    return float(np.median(prs))


@pytest.mark.parametrize("pr_ms", [160.0, 280.0])
def test_first_degree_av_block_has_a_long_pr(pr_ms):
    clean, labels = clean_case(pr_ms=pr_ms)
    measured = measure_pr(clean)
    assert abs(measured - labels["pr_ms"]) < 20.0
    assert abs(labels["pr_ms"] - pr_ms) < 1.0
    assert labels["first_degree_av_block"] == (pr_ms > 200) == (measured > 200)


@pytest.mark.parametrize(
    ("qrs_type", "qrs_ms", "morphology"),
    [
        ("normal", 92.0, "normal"),
        ("rbbb", 140.0, "complete right bundle branch block"),
        ("lbbb", 150.0, "complete left bundle branch block"),
    ],
)
def test_bundle_branch_block_is_wide_with_its_v1_shape(qrs_type, qrs_ms, morphology):
    clean, labels = clean_case(
        qrs_type=qrs_type, qrs_ms=qrs_ms, qrs_z=1.1 if qrs_type == "lbbb" else 0.5
    )
    assert labels["qrs_morphology"] == morphology
    assert abs(labels["qrs_ms"] - qrs_ms) < 1.0
    widths, v1_late_max, v1_max, v1_min = [], [], [], []
    for peak in inner_peaks(clean):
        onset, end = qrs_bounds(clean, peak)
        widths.append((end - onset) / FS * 1000.0)
        v1 = clean[LEAD["V1"], onset : end + 1]
        v1_late_max.append(v1[len(v1) * 2 // 3 :].max())
        v1_max.append(v1.max())
        v1_min.append(v1.min())
    width = float(np.median(widths))
    assert abs(width - labels["qrs_ms"]) < 20.0
    assert (width >= 120.0) == (qrs_type != "normal")
    if qrs_type == "rbbb":
        assert np.median(v1_late_max) > 0.3  # terminal R' in V1
    if qrs_type == "lbbb":
        assert np.median(v1_min) < -0.8 and np.median(v1_max) < 0.15  # QS in V1


def measure_axis(clean: np.ndarray) -> float:
    net_i = net_avf = 0.0
    for peak in inner_peaks(clean):
        onset, end = qrs_bounds(clean, peak)
        net_i += clean[LEAD["I"], onset : end + 1].sum()
        net_avf += clean[LEAD["aVF"], onset : end + 1].sum()
    return float(np.degrees(np.arctan2(2 / np.sqrt(3) * net_avf, net_i)))


@pytest.mark.parametrize(
    ("axis", "category"),
    [(-60.0, "left axis deviation"), (45.0, "normal heart axis"), (125.0, "right axis deviation")],
)
def test_axis_from_net_qrs_areas(axis, category):
    for qrs_type in ("normal", "rbbb"):
        clean, labels = clean_case(
            axis_deg=axis, qrs_type=qrs_type, qrs_ms=140 if qrs_type == "rbbb" else 92
        )
        measured = measure_axis(clean)
        assert labels["axis"] == category
        assert abs(labels["axis_deg"] - axis) < 3.0  # breathing rotates the heart a little
        assert abs(measured - labels["axis_deg"]) < 4.0
        assert synth._axis_category(measured) == category


def test_axis_solve_is_exact_without_breathing():
    for axis in (-75.0, -35.0, 0.0, 60.0, 95.0, 150.0):
        for qrs_type in ("normal", "rbbb", "lbbb"):
            _, labels = clean_case(
                axis_deg=axis,
                qrs_type=qrs_type,
                qrs_ms=92.0 if qrs_type == "normal" else 140.0,
                resp_rotation_deg=0.0,
                resp_amplitude=0.0,
            )
            assert abs(labels["axis_deg"] - axis) < 0.5, (axis, qrs_type)


def st_at_j60(clean: np.ndarray) -> np.ndarray:
    """Per-lead median ST level 60 ms after the detected QRS end (the baseline is 0)."""
    values = []
    for peak in inner_peaks(clean):
        _, end = qrs_bounds(clean, peak)
        values.append(clean[:, end + int(0.06 * FS)])
    return np.median(values, axis=0)


@pytest.mark.parametrize("territory", ["inferior", "anterior", "lateral"])
def test_st_elevation_in_the_chosen_territory(territory):
    clean, labels = clean_case(st_mv=0.25, st_territory=territory)
    st = st_at_j60(clean)
    members = [LEAD[x] for x in synth.TERRITORIES[territory]]
    assert (st[members] >= 0.1).sum() >= 2
    assert labels["st_elevation_territories"] == [territory]
    for name in labels["st_elevation_leads"]:
        assert st[LEAD[name]] > 0.07
    if territory == "inferior":  # reciprocal depression in aVL
        assert st[LEAD["aVL"]] < -0.05 and "aVL" in labels["st_depression_leads"]
    normal = st_at_j60(clean_case()[0])
    assert np.abs(normal).max() < 0.05


@pytest.mark.parametrize("territory", ["inferior", "anterior", "lateral"])
def test_st_depression_in_the_chosen_territory(territory):
    clean, labels = clean_case(st_mv=-0.12, st_territory=territory)
    st = st_at_j60(clean)
    members = [LEAD[x] for x in synth.TERRITORIES[territory]]
    assert (st[members] <= -0.05).sum() >= 2
    assert labels["st_depression_territories"] == [territory]
    assert labels["st_elevation_territories"] == []


@pytest.mark.parametrize("territory", ["inferior", "anterior", "lateral"])
def test_t_wave_inversion_in_the_chosen_territory(territory):
    clean, labels = clean_case(t_inversion_territory=territory, t_inversion_mv=0.3)
    members = [LEAD[x] for x in synth.TERRITORIES[territory]]
    troughs = []
    for peak in inner_peaks(clean):
        _, end = qrs_bounds(clean, peak)
        troughs.append(clean[:, end + int(0.1 * FS) : end + int(0.4 * FS)].min(axis=1))
    trough = np.median(troughs, axis=0)
    assert (trough[members] <= -0.25).sum() >= 2
    assert territory in labels["t_inversion_territories"]
    assert all(labels["t_mv"][x] <= -0.1 for x in labels["t_inversion_leads"])


@pytest.mark.parametrize("limb_mv", [0.35, 1.2])
def test_low_voltage_from_limb_lead_peak_to_peak(limb_mv):
    clean, labels = clean_case(limb_qrs_mv=limb_mv)
    ptps = []
    for peak in inner_peaks(clean):
        window = clean[:6, peak - int(0.05 * FS) : peak + int(0.05 * FS)]  # the QRS only
        ptps.append(window.max(axis=1) - window.min(axis=1))
    ptp = np.median(ptps, axis=0)
    assert labels["low_voltage"] == (limb_mv < 0.5) == bool((ptp < 0.5).all())
    assert abs(ptp.max() - limb_mv) < 0.1


def test_premature_ventricular_complexes_are_counted():
    params = synth.ECGParams(heart_rate=70.0, n_pvc=2, pvc_coupling=0.6)
    signal, labels = synth.simulate(params, rng=3)
    peaks = detect_qrs(signal)
    rr = np.diff(peaks)
    premature = np.flatnonzero(rr < 0.8 * np.median(rr)) + 1  # beat after a short RR
    assert labels["n_pvc"] == 2 == len(premature)
    for index in premature:
        assert rr[index] > 1.2 * np.median(rr)  # compensatory pause after it
        assert np.abs(np.array(labels["pvc_peaks"]) - peaks[index]).min() < 0.06 * FS
    assert labels["pvc_qrs_ms"] >= 120.0


def test_sampled_findings_agree_with_measured_labels():
    """The sampler keeps a margin from every threshold, so the categorical labels (measured)
    equal the drawn findings for the rate, rhythm, axis, conduction and voltage."""
    counts = collections.Counter()
    for i in range(60):
        params = synth.sample_params(np.random.default_rng([21, i]))
        _, labels = synth.simulate(params, duration=10.0, rng=i, noise=False)
        rate = params.heart_rate
        if params.rhythm == "af":
            rhythm = "atrial fibrillation"
        else:
            rhythm = (
                "sinus bradycardia"
                if rate < 60
                else "sinus tachycardia"
                if rate > 100
                else "sinus rhythm"
            )
        axis = params.axis_deg
        assert labels["rhythm"] == rhythm
        assert labels["axis"] == synth._axis_category(axis)
        assert labels["first_degree_av_block"] == (params.rhythm == "sinus" and params.pr_ms > 200)
        assert labels["qrs_morphology"] == synth._qrs_category(params.qrs_type, params.qrs_ms)
        assert labels["low_voltage"] == (params.limb_qrs_mv < 0.5)
        assert labels["n_pvc"] <= params.n_pvc
        counts[rhythm] += 1
    assert len(counts) == 4  # every rhythm occurs


def test_sample_params_respects_fixed_fields():
    rng = np.random.default_rng(0)
    params = synth.sample_params(rng, rhythm="af", qrs_type="lbbb")
    assert params.rhythm == "af" and params.qrs_type == "lbbb" and params.qrs_ms >= 126
    with pytest.raises(ValueError, match="unknown"):
        synth.sample_params(rng, heartrate=70)
    with pytest.raises(ValueError, match="duration"):
        synth.simulate(synth.ECGParams(), duration=1.0)


def test_report_and_scp_codes_follow_labels():
    rng = np.random.default_rng(0)
    _, labels = clean_case(rhythm="af", heart_rate=90.0, qrs_type="rbbb", qrs_ms=140.0, n_pvc=1)
    report = synth.make_report(labels, rng)
    assert "fibrillation" in report and "right bundle branch block" in report.lower()
    codes = synth.scp_codes(labels)
    assert {"AFIB", "CRBBB"} <= set(codes) and "NORM" not in codes and "SR" not in codes
    _, normal = clean_case()
    assert normal["normal"] and synth.scp_codes(normal) == {"NORM": 100.0, "SR": 0.0}
    assert synth.make_report(normal, rng).endswith("Normal ECG.")


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------

NUM_ECGS = 80
SEED = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    synth.generate_corpus(out, NUM_ECGS, seed=SEED, duration=5.0, progress=False)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_corpus_is_byte_identical_for_same_args_whatever_the_workers(corpus, tmp_path):
    again = tmp_path / "again"
    synth.generate_corpus(again, NUM_ECGS, seed=SEED, duration=5.0, workers=2, progress=False)
    first, second = all_files(corpus), all_files(again)
    assert sorted(first) == sorted(second)
    assert all(first[name] == second[name] for name in first)
    other = tmp_path / "other"
    synth.generate_corpus(other, 4, seed=SEED + 1, duration=5.0, progress=False)
    name = "records500/00000/00001_hr.dat"
    assert (other / name).read_bytes() != first[name]


def test_wfdb_writer_matches_wfdb_wrsamp(tmp_path):
    signal, _ = synth.simulate(synth.sample_params(np.random.default_rng(8)), rng=8)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ref").mkdir()
    for fs, data in ((500, signal), (100, signal[:, ::5].astype(np.float64) * 0.5)):
        synth.write_wfdb(tmp_path / "ours" / f"rec{fs}", data, fs)
        wfdb.wrsamp(
            f"rec{fs}",
            fs=fs,
            units=["mV"] * 12,
            sig_name=list(synth.WFDB_LEAD_NAMES),
            p_signal=np.asarray(data, np.float64).T,
            fmt=["16"] * 12,
            adc_gain=[1000.0] * 12,
            baseline=[0] * 12,
            write_dir=str(tmp_path / "ref"),
        )
        for ext in ("hea", "dat"):
            ours = (tmp_path / "ours" / f"rec{fs}.{ext}").read_bytes()
            assert ours == (tmp_path / "ref" / f"rec{fs}.{ext}").read_bytes()


def test_wfdb_records_read_back_and_reproduce_from_the_labels_file(corpus):
    records = read_jsonl(corpus / "synth_labels.jsonl")
    assert [r["ecg_id"] for r in records] == list(range(1, NUM_ECGS + 1))
    for record in records[:5]:
        hr = wfdb.rdrecord(str(corpus / record["filename_hr"]))
        assert hr.fs == 500 and hr.sig_name == list(synth.WFDB_LEAD_NAMES)
        assert hr.units == ["mV"] * 12 and hr.fmt == ["16"] * 12
        x = hr.p_signal.T  # [12, n]
        assert x.shape == (12, 2500)
        np.testing.assert_allclose(x[0] + x[2], x[1], atol=2e-3)
        np.testing.assert_allclose(x[3] + x[4] + x[5], 0.0, atol=2e-3)
        params = synth.ECGParams(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in record["params"].items()}
        )
        signal, labels = synth.simulate(params, duration=record["duration"], rng=record["sim_seed"])
        np.testing.assert_allclose(x, signal, atol=0.5e-3 + 1e-6)
        assert labels == record["labels"]
        lr = wfdb.rdrecord(str(corpus / record["filename_lr"]))
        assert lr.fs == 100 and lr.p_signal.shape == (500, 12)
        decimated = lr.p_signal.T
        # 100 Hz is a proper low-passed decimation: it follows the 500 Hz signal's slow parts.
        smooth = np.convolve(signal[1], np.ones(5) / 5, mode="same")[::5]
        assert np.corrcoef(decimated[1], smooth)[0, 1] > 0.95


def test_database_csv_has_ptbxl_columns_and_codes(corpus, shared_data):
    formats = shared_data / "formats"
    with open(formats / "ptbxl_database.header_and_first5rows.csv", newline="") as f:
        ptbxl_columns = next(csv.reader(f))
    with open(formats / "ptbxl_scp_statements.csv", newline="") as f:
        known_codes = {row[0] for row in csv.reader(f)}
    with open(corpus / "ptbxl_database.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ptbxl_columns and len(ptbxl_columns) == 28
    assert [int(r["ecg_id"]) for r in rows] == list(range(1, NUM_ECGS + 1))
    labels = {r["ecg_id"]: r for r in read_jsonl(corpus / "synth_labels.jsonl")}
    for row in rows:
        codes = ast.literal_eval(row["scp_codes"])
        assert codes and set(codes) <= known_codes
        assert row["patient_id"].endswith(".0") and 1 <= int(row["strat_fold"]) <= 10
        assert row["filename_hr"] == synth.record_name(int(row["ecg_id"]))
        assert row["heart_axis"] in ("MID", "LAD", "RAD")
        record = labels[int(row["ecg_id"])]
        assert row["report"] == record["report"]
        assert ("AFIB" in codes) == (record["labels"]["rhythm"] == "atrial fibrillation")
    entries, skipped = io.list_entries("ptbxl", corpus)
    assert len(entries) == NUM_ECGS and not skipped
    loaded = io.load_entry(entries[0])
    assert loaded.signal.shape == (12, 2500) and loaded.fs == 500 and not loaded.leads_missing


def test_splits_are_by_patient(corpus):
    records = read_jsonl(corpus / "synth_labels.jsonl")
    folds_of = collections.defaultdict(set)
    for record in records:
        folds_of[record["patient_id"]].add(record["strat_fold"])
        assert record["split"] == synth.split_of_fold(record["strat_fold"])
    assert all(len(folds) == 1 for folds in folds_of.values())
    assert len(folds_of) < NUM_ECGS  # several ECGs per patient
    splits = {s: {r["patient_id"] for r in records if r["split"] == s} for s in synth.SPLITS}
    assert all(splits.values())
    assert not (splits["train"] & splits["valid"] or splits["train"] & splits["test"])
    assert not splits["valid"] & splits["test"]
    # Patient-level traits are shared by the patient's ECGs.
    by_patient = collections.defaultdict(list)
    for record in records:
        by_patient[record["patient_id"]].append(record["patient"])
    assert all(all(p == ps[0] for p in ps) for ps in by_patient.values())


def load_qa(corpus: Path) -> dict[str, dict[str, list[dict]]]:
    root = corpus / "ecgqa" / "ptbxl"
    return {
        variant: {
            s: json.loads((root / variant / s / "00000.json").read_text()) for s in synth.SPLITS
        }
        for variant in ("template", "paraphrased")
    }


def test_qa_schema_answers_and_balance(corpus):
    qa = load_qa(corpus)
    records = {r["ecg_id"]: r for r in read_jsonl(corpus / "synth_labels.jsonl")}
    bank = {q.question_id: q for q in synth.question_bank()}
    assert qa["template"]["train"], "no training questions"
    sample_ids = set()
    for variant, splits in qa.items():
        for split, items in splits.items():
            per_text = collections.defaultdict(collections.Counter)
            for item in items:
                assert list(item) == QA_KEYS
                assert item["question_type"] in ("single-verify", "single-choose", "single-query")
                assert isinstance(item["answer"], list) and len(item["answer"]) == 1
                assert item["attribute"] is None or isinstance(item["attribute"], list)
                (ecg_id,) = item["ecg_id"]
                record = records[ecg_id]
                assert record["split"] == split
                question = bank[item["question_id"]]
                assert item["template_id"] == question.template_id
                assert item["answer"][0] == question.answer_of(record["labels"])
                if item["question_type"] == "single-verify":
                    assert item["answer"][0] in ("yes", "no")
                if variant == "template":
                    assert item["question"] == question.text
                    sample_ids.add(item["sample_id"])
                else:
                    assert item["question"] in question.paraphrases
                per_text[item["question"]][item["answer"][0]] += 1
                per_text[("id", item["question_id"])][item["answer"][0]] += 1
            for key, counts in per_text.items():
                space = bank[key[1]].answers if isinstance(key, tuple) else None
                if space is not None:
                    assert set(counts) == set(space), key
                assert len(set(counts.values())) == 1, (key, counts)
    total = sum(len(items) for items in qa["template"].values())
    assert len(sample_ids) == total
    for split in synth.SPLITS:
        template, paraphrased = qa["template"][split], qa["paraphrased"][split]
        assert len(template) == len(paraphrased)
        for a, b in zip(template, paraphrased, strict=True):
            assert {k: v for k, v in a.items() if k != "question"} == {
                k: v for k, v in b.items() if k != "question"
            }
            assert a["question"] != b["question"]


def test_make_qa_balances_and_skips_missing_answers():
    def labels(rhythm: str) -> dict:
        _, base = clean_case(duration=3.0)
        return {**base, "rhythm": rhythm}

    sinus, af = labels("sinus rhythm"), labels("atrial fibrillation")
    records = [{"ecg_id": i, "strat_fold": 1, "labels": sinus} for i in range(1, 8)]
    records += [{"ecg_id": i, "strat_fold": 1, "labels": af} for i in range(8, 11)]
    qa = synth.make_qa(records, seed=0)
    items = qa["template"]["train"]
    af_question = [i for i in items if i["question"] == "Does this ECG show atrial fibrillation?"]
    assert collections.Counter(i["answer"][0] for i in af_question) == {"yes": 3, "no": 3}
    # The rhythm query needs all four rhythms: with two present it is left out.
    assert not [i for i in items if i["question"] == "What is the rhythm of this ECG?"]
    assert qa["template"]["test"] == [] and qa["template"]["valid"] == []
    capped = synth.make_qa(records, seed=0, max_per_class=1)["template"]["train"]
    assert sum(i["question"] == "Does this ECG show atrial fibrillation?" for i in capped) == 2


def test_command_line_writes_a_small_corpus(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "elmjax.ecg.synth", "--out", str(out), "--num-ecgs", "6"]
        + ["--seed", "1", "--duration", "3", "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["num_ecgs"] == 6
    assert (out / "records500" / "00000" / "00006_hr.hea").exists()
    assert (out / "records100" / "00000" / "00006_lr.dat").exists()
    assert (out / "ptbxl_database.csv").exists() and (out / "synth_labels.jsonl").exists()
    for variant in ("template", "paraphrased"):
        for split in synth.SPLITS:
            assert (out / "ecgqa" / "ptbxl" / variant / split / "00000.json").exists()


def test_dataclasses_round_trip_through_json():
    params = synth.sample_params(np.random.default_rng(1))
    data = json.loads(json.dumps(dataclasses.asdict(params)))
    rebuilt = synth.ECGParams(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    )
    assert rebuilt == params
