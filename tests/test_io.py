"""Reading real and purpose-built WFDB/HDF5 records, dataset layouts, and every bad input."""

from __future__ import annotations

import csv
import shutil

import h5py
import numpy as np
import pytest
import wfdb
from conftest import LEADS_UPPER, ecg_like, write_wfdb

from elmjax.ecg import io

# ---------------------------------------------------------------------------------------------
# Real PhysioNet records
# ---------------------------------------------------------------------------------------------


def test_mitbih_record_maps_mlii_to_ii_and_reports_missing(shared_data):
    rec = io.read_record(shared_data / "wfdb" / "100")
    raw = wfdb.rdrecord(str(shared_data / "wfdb" / "100"))
    assert rec.signal.shape == (12, 650000) and rec.signal.dtype == np.float32
    assert rec.fs == 360.0
    assert rec.leads_present == ("II", "V5")
    assert len(rec.leads_missing) == 10 and "I" in rec.leads_missing
    np.testing.assert_allclose(rec.signal[1], raw.p_signal[:, 0], atol=1e-6)
    np.testing.assert_allclose(rec.signal[10], raw.p_signal[:, 1], atol=1e-6)
    assert not rec.signal[0].any() and not rec.signal[6].any()  # zero-filled, not invented
    assert rec.meta["age"] == 69 and rec.meta["sex"] == "M"
    assert rec.meta["source_leads"] == ["MLII", "V5"]


def test_mimic2_format80_record_drops_unspecified_v_lead(shared_data):
    rec = io.read_record(shared_data / "wfdb" / "3000003_0003.hea")
    raw = wfdb.rdrecord(str(shared_data / "wfdb" / "3000003_0003"))
    assert rec.fs == 125.0 and rec.n_samples == 1028
    assert rec.leads_present == ("II",)
    assert rec.meta["dropped_channels"] == ["V"]
    np.testing.assert_allclose(rec.signal[1], raw.p_signal[:, 0], atol=1e-6)
    assert rec.duration == pytest.approx(1028 / 125)


# ---------------------------------------------------------------------------------------------
# Formats, lead orders, units
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "gain"), [("16", 1000.0), ("212", 200.0), ("80", 40.0)])
def test_storage_formats_round_trip(tmp_path, fmt, gain):
    x = ecg_like(2000) * (0.9 if fmt == "80" else 1.0)
    base = write_wfdb(tmp_path, "r", x, fmt=fmt, gain=gain)
    rec = io.read_record(base)
    assert rec.leads_present == io.CANONICAL_LEADS and rec.leads_missing == ()
    np.testing.assert_allclose(rec.signal, x.T, atol=0.51 / gain + 1e-6)


def test_ptb_style_lowercase_names_are_reordered_and_frank_leads_dropped(tmp_path):
    names = ["v6", "i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5"]
    names += ["vx", "vy", "vz"]
    x = ecg_like(1000, c=15)
    rec = io.read_record(write_wfdb(tmp_path, "s0010_re", x, names=names))
    canonical = [n.lower() for n in io.CANONICAL_LEADS]
    for row, name in enumerate(canonical):
        np.testing.assert_allclose(rec.signal[row], x[:, names.index(name)], atol=1e-3)
    assert rec.meta["dropped_channels"] == ["vx", "vy", "vz"]


def test_microvolt_units_are_converted_to_millivolts(tmp_path):
    x = ecg_like(1000, c=2)
    base = write_wfdb(tmp_path, "uv", x * 1000, names=["I", "II"], gain=1.0, units="uV")
    rec = io.read_record(base)
    np.testing.assert_allclose(rec.signal[:2], x.T, atol=1e-3)
    assert rec.leads_present == ("I", "II")


def test_canonical_lead_names():
    assert io.canonical_lead("avr") == "aVR"
    assert io.canonical_lead("AVL") == "aVL"
    assert io.canonical_lead("MLII") == "II"
    assert io.canonical_lead("DIII") == "III"
    assert io.canonical_lead("Lead V4") == "V4"
    assert io.canonical_lead("V7") is None
    assert io.canonical_lead("ABP") is None


# ---------------------------------------------------------------------------------------------
# Bad input: each names the file and the problem
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    return write_wfdb(tmp_path, "good", ecg_like(1000))


def _edit_header(base, old, new):
    hea = base.with_name(base.name + ".hea")
    text = hea.read_text()
    assert old in text
    hea.write_text(text.replace(old, new, 1))


def test_truncated_dat(good):
    dat = good.with_name("good.dat")
    dat.write_bytes(dat.read_bytes()[:5000])
    with pytest.raises(io.ECGReadError, match=r"good\.dat: data file is truncated.*5000 bytes"):
        io.read_record(good)


def test_header_data_length_mismatch(good):
    _edit_header(good, " 1000", " 500")  # header now declares fewer samples than the file holds
    with pytest.raises(io.ECGReadError, match=r"good\.dat: header/data length mismatch.*1000"):
        io.read_record(good)


def test_missing_dat(good):
    good.with_name("good.dat").unlink()
    with pytest.raises(io.ECGReadError, match=r"good\.dat: data file named by .* not found"):
        io.read_record(good)


def test_missing_header(tmp_path):
    with pytest.raises(io.ECGReadError, match=r"nothere\.hea: header file not found"):
        io.read_record(tmp_path / "nothere")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (" 500 ", " abc ", "sampling frequency 'abc' is not a number"),
        (" 1000", " 1e3x", "signal length '1e3x' is not an integer"),
        ("1000.0(0)/mV", "gainX(0)/mV", "ADC gain 'gainX.*is not a number"),
    ],
)
def test_non_numeric_header_fields(good, old, new, message):
    _edit_header(good, old, new)
    with pytest.raises(io.ECGReadError, match=r"good\.hea: " + message):
        io.read_record(good)


def test_zero_length_record(good):
    _edit_header(good, " 1000", " 0")
    good.with_name("good.dat").write_bytes(b"")
    with pytest.raises(io.ECGReadError, match="zero samples"):
        io.read_record(good)


def test_unknown_lead_name(tmp_path):
    base = write_wfdb(tmp_path, "u", ecg_like(500, c=3), names=["I", "II", "FOO"])
    with pytest.raises(io.ECGReadError, match=r"u: unknown lead name 'FOO' \(channel 2\)"):
        io.read_record(base)
    rec = io.read_record(base, unknown_leads="drop")
    assert rec.leads_present == ("I", "II") and rec.meta["dropped_channels"] == ["FOO"]


def test_duplicated_lead_name(tmp_path):
    base = write_wfdb(tmp_path, "d", ecg_like(500, c=3), names=["I", "MLII", "ii"])
    with pytest.raises(
        io.ECGReadError, match=r"duplicated lead II: channel 1 'MLII' and channel 2"
    ):
        io.read_record(base)


def _with_lead(tmp_path, lead: int, values) -> object:
    x = ecg_like(1000)
    x[:, lead] = values
    return write_wfdb(tmp_path, "bad", x)


def test_all_nan_lead(tmp_path):
    base = _with_lead(tmp_path, 3, np.nan)
    with pytest.raises(io.ECGReadError, match=r"bad: lead aVR: all samples are NaN"):
        io.read_record(base)
    rec = io.read_record(base, bad_leads="drop")
    assert "aVR" in rec.leads_missing and rec.meta["bad_leads"]["aVR"] == "all samples are NaN"
    assert not rec.signal[3].any() and len(rec.leads_present) == 11


def test_flat_lead(tmp_path):
    base = _with_lead(tmp_path, 7, 0.25)
    with pytest.raises(io.ECGReadError, match=r"lead V2: flat line"):
        io.read_record(base)
    assert "V2" in io.read_record(base, bad_leads="drop").leads_missing


def test_absurd_amplitude(tmp_path):
    x = ecg_like(1000)
    x[400:410, 1] = 25.0
    base = write_wfdb(tmp_path, "big", x, gain=100.0)
    with pytest.raises(io.ECGReadError, match=r"lead II: amplitude reaches 25.0 mV \(limit 20"):
        io.read_record(base)
    assert io.read_record(base, max_abs_mv=30).leads_missing == ()


def test_nan_gap(tmp_path):
    x = ecg_like(1000)
    clean = x[:, 1].copy()
    x[100:120, 1] = np.nan
    base = write_wfdb(tmp_path, "gap", x)
    with pytest.raises(io.ECGReadError, match=r"lead II has 20 NaN samples .*from sample 100"):
        io.read_record(base)
    rec = io.read_record(base, nan_gaps="interpolate")
    assert rec.meta["nan_filled"] == {"II": 20}
    assert np.isfinite(rec.signal).all()
    # linear fill between the neighbours of the gap
    np.testing.assert_allclose(
        rec.signal[1, 100:120], np.linspace(clean[99], clean[120], 22)[1:-1], atol=2e-3
    )


def test_no_usable_lead(tmp_path):
    base = write_wfdb(tmp_path, "none", np.full((500, 2), np.nan), names=["I", "II"])
    with pytest.raises(io.ECGReadError, match="no usable ECG lead"):
        io.read_record(base, bad_leads="drop")


def test_bad_option_value(good):
    with pytest.raises(ValueError, match="bad_leads must be one of"):
        io.read_record(good, bad_leads="ignore")


# ---------------------------------------------------------------------------------------------
# Dataset layouts
# ---------------------------------------------------------------------------------------------


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def ptbxl_root(tmp_path, shared_data):
    """A PTB-XL tree with the real table header: 3 good records, 1 bad, 1 missing file."""
    with open(shared_data / "formats" / "ptbxl_database.header_and_first5rows.csv") as f:
        header = next(csv.reader(f))
    rows = []
    for ecg_id, patient in [(1, 15709.0), (2, 13243.0), (3, 15709.0), (4, 20372.0), (5, 99.0)]:
        rel = f"records500/00000/{ecg_id:05d}_hr"
        row = dict.fromkeys(header, "")
        row.update(
            ecg_id=ecg_id,
            patient_id=patient,
            report=f"report {ecg_id}",
            filename_hr=rel,
            filename_lr=rel.replace("500", "100").replace("_hr", "_lr"),
            strat_fold=ecg_id,
        )
        rows.append([row[c] for c in header])
        x = ecg_like(5000, seed=ecg_id)
        if ecg_id == 4:
            x[:, 2] = np.nan  # a bad record
        if ecg_id != 5:  # 5's file is missing
            write_wfdb(tmp_path / "records500" / "00000", f"{ecg_id:05d}_hr", x)
    _write_csv(tmp_path / "ptbxl_database.csv", header, rows)
    return tmp_path


def test_ptbxl_layout_yields_every_good_record_and_reports_bad_ones(ptbxl_root):
    skipped: list[dict] = []
    out = list(io.iter_dataset("ptbxl", ptbxl_root, on_error="skip", skipped=skipped))
    assert [(r[0], r[1], r[3]) for r in out] == [
        ("1", "15709", "report 1"),
        ("2", "13243", "report 2"),
        ("3", "15709", "report 3"),
    ]
    assert all(r[2].fs == 500 and r[2].signal.shape == (12, 5000) for r in out)
    reasons = {s["record_id"]: s["reason"] for s in skipped}
    assert reasons["4"] == "lead III: all samples are NaN"
    assert "ptbxl_database.csv: file not found" in reasons["5"]
    assert skipped[0]["path"].endswith("00005_hr")


def test_ptbxl_layout_raise_mode_names_the_file(ptbxl_root):
    with pytest.raises(io.ECGReadError, match=r"00005_hr: record 5: .*file not found"):
        list(io.iter_dataset("ptbxl", ptbxl_root))
    (ptbxl_root / "ptbxl_database.csv").write_text("ecg_id,foo\n1,2\n")
    with pytest.raises(io.ECGReadError, match=r"ptbxl_database.csv: missing columns"):
        io.list_entries("ptbxl", ptbxl_root)


def test_mimic_layout_joins_machine_reports(tmp_path, shared_data):
    shutil.copy(shared_data / "formats" / "mimic_iv_ecg_record_list.sample.csv", tmp_path / "x")
    shutil.copy(
        shared_data / "formats" / "mimic_iv_ecg_machine_measurements.sample.csv",
        tmp_path / "machine_measurements.csv",
    )
    with open(tmp_path / "x") as f:
        rows = list(csv.reader(f))
    rows.append(["10000099", "40000001", "40000001", "2180-07-24 08:44:00", "files/p1000/gone/1"])
    _write_csv(tmp_path / "record_list.csv", rows[0], rows[1:])
    # MIMIC-IV-ECG's native order puts aVF before aVL; the reader must not care.
    names = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
    x = ecg_like(5000)
    write_wfdb(tmp_path / "files/p1000/p10000032/s40689238", "40689238", x, names=names)
    skipped: list[dict] = []
    out = list(io.iter_dataset("mimic", tmp_path, on_error="skip", skipped=skipped))
    assert len(out) == 1
    record_id, patient, rec, report = out[0]
    assert (record_id, patient) == ("40689238", "10000032")
    assert report == "Sinus rhythm Possible right atrial abnormality Borderline ECG"
    np.testing.assert_allclose(rec.signal[4], x[:, 5], atol=1e-3)  # aVL
    np.testing.assert_allclose(rec.signal[5], x[:, 4], atol=1e-3)  # aVF
    assert [s["record_id"] for s in skipped] == ["40000001"]


def test_code15_layout_trims_padding_and_skips_missing_tracings(tmp_path):
    tracings = np.zeros((3, 4096, 12), np.float32)
    body = ecg_like(2800, fs=400).astype(np.float32)
    tracings[0, 648 : 648 + 2800] = body  # a 7 s exam, zero-padded (centred) to 4096
    tracings[1, 48:4048] = ecg_like(4000, fs=400, seed=1)
    with h5py.File(tmp_path / "exams_part0.hdf5", "w") as f:
        f["tracings"] = tracings
        f["exam_id"] = np.array([1001, 1002, 0])  # trailing zero placeholder row
    header = ["exam_id", "age", "is_male", "nn_predicted_age", "1dAVb", "RBBB", "LBBB", "SB"]
    header += ["ST", "AF", "patient_id", "death", "timey", "normal_ecg", "trace_file"]
    rows = [
        [1001, 60, True, 61.2, False, True, False, False, False, True, 7, "", "", False, "x"],
        [1002, 30, False, 33.0, False, False, False, False, False, False, 8, "", "", True, "x"],
        [1003, 40, False, 41.0, False, False, False, False, False, False, 9, "", "", True, "x"],
    ]
    _write_csv(tmp_path / "exams.csv", header, rows)
    skipped: list[dict] = []
    out = list(io.iter_dataset("code15", tmp_path, on_error="skip", skipped=skipped))
    assert [(r[0], r[1]) for r in out] == [("1001", "7"), ("1002", "8")]
    rec = out[0][2]
    assert rec.fs == 400 and rec.n_samples == 2800
    np.testing.assert_allclose(rec.signal, body.T, atol=1e-6)
    assert rec.meta["zero_padding_trimmed"] == 4096 - 2800 and rec.meta["sex"] == "M"
    assert out[0][3] == "right bundle branch block, atrial fibrillation."
    assert out[1][3] == "normal ecg."
    assert out[1][2].n_samples == 4000
    assert skipped == [
        {
            "record_id": "1003",
            "path": str(tmp_path / "x"),
            "reason": f"{tmp_path / 'exams.csv'}: no tracing",
        }
    ]


def test_wfdb_dir_layout_recurses_and_skips_bad(tmp_path):
    write_wfdb(tmp_path / "a", "r1", ecg_like(1000))
    write_wfdb(tmp_path / "b" / "c", "r2", ecg_like(1000, seed=2), fs=250)
    bad = write_wfdb(tmp_path / "b", "r3", ecg_like(1000))
    bad.with_name("r3.dat").unlink()
    entries, _ = io.list_entries("wfdb-dir", tmp_path)
    assert [e.record_id for e in entries] == ["a/r1", "b/c/r2", "b/r3"]
    skipped: list[dict] = []
    out = list(io.iter_dataset("wfdb-dir", tmp_path, on_error="skip", skipped=skipped))
    assert [(r[0], r[2].fs) for r in out] == [("a/r1", 500.0), ("b/c/r2", 250.0)]
    assert skipped[0]["record_id"] == "b/r3" and "not found" in skipped[0]["reason"]


def test_layout_errors():
    with pytest.raises(ValueError, match="layout must be one of"):
        io.list_entries("ptb", ".")
    with pytest.raises(io.ECGReadError, match="dataset directory not found"):
        io.list_entries("ptbxl", "/nonexistent/dir")
    with pytest.raises(ValueError, match="needs a `skipped` list"):
        next(io.iter_dataset("ptbxl", ".", on_error="skip"))


def test_lead_upper_names_match_canonical_order():
    assert [io.canonical_lead(n) for n in LEADS_UPPER] == list(io.CANONICAL_LEADS)
