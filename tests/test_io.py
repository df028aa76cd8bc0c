"""Reading real and purpose-built WFDB/HDF5 records, dataset layouts, and every bad input."""

from __future__ import annotations

import csv
import dataclasses
import datetime
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


# ---------------------------------------------------------------------------------------------
# Fast path: strict header parser + direct data reading, bit-identical to the wfdb path
# ---------------------------------------------------------------------------------------------


def _outcome(read, base, **kwargs):
    """What a reader gives: ("ok", Record) or ("error", message)."""
    try:
        return "ok", read(base, **kwargs)
    except io.ECGReadError as e:
        return "error", str(e)


def assert_same_as_wfdb(base, **kwargs) -> io.Record | None:
    """read_record and the wfdb-only path give bit-identical records (or the same error)."""
    fast_kind, fast = _outcome(io.read_record, base, **kwargs)
    slow_kind, slow = _outcome(io._read_with_wfdb, base, **kwargs)
    assert fast_kind == slow_kind, (fast, slow)
    if fast_kind == "error":
        assert fast == slow
        return None
    assert fast.signal.dtype == slow.signal.dtype == np.float32
    np.testing.assert_array_equal(fast.signal, slow.signal, strict=True)
    assert fast.signal.tobytes() == slow.signal.tobytes()  # also NaN payloads and signed zeros
    assert (fast.fs, type(fast.fs)) == (slow.fs, type(slow.fs))
    assert fast.leads_present == slow.leads_present
    assert fast.leads_missing == slow.leads_missing
    assert fast.meta == slow.meta and fast.path == slow.path
    return fast


def _uses_fast_path(base) -> bool:
    """True when read_record reads this record without wfdb."""
    text = base.with_name(base.name + ".hea").read_bytes().decode("ascii", "ignore")
    header = io._parse_header(text)
    return header is not None and io._read_direct(str(base), header) is not None


def _wrsamp(directory, name, x, *, fmt="16", gain=1000.0, baseline=0, units="mV", **kwargs):
    c = x.shape[1]
    wfdb.wrsamp(
        name,
        fs=kwargs.pop("fs", 500),
        units=[units] * c,
        sig_name=kwargs.pop("names", LEADS_UPPER[:c]),
        p_signal=x,
        fmt=[fmt] * c,
        adc_gain=[gain] * c if np.isscalar(gain) else list(gain),
        baseline=[baseline] * c if np.isscalar(baseline) else list(baseline),
        write_dir=str(directory),
        **kwargs,
    )
    return directory / name


@pytest.mark.parametrize(
    ("fmt", "gain", "baseline", "units", "scale"),
    [
        ("16", 1000.0, 0, "mV", 1.0),
        ("16", 200.0, 1024, "mV", 1.0),
        ("16", 655.36, -500, "mV", 1.0),
        ("16", [100.0, 250.0, 400.0] * 4, list(range(-6, 6)), "mV", 1.0),
        ("16", 1.0, 0, "uV", 1000.0),
        ("16", 1e6, 17, "V", 1e-3),
        ("80", 40.0, 3, "mV", 0.9),
        ("24", 100000.0, 12345, "mV", 1.0),
        ("32", 1e6, -7, "mV", 1.0),
    ],
)
def test_fast_path_matches_wfdb_for_wrsamp_records(tmp_path, fmt, gain, baseline, units, scale):
    x = ecg_like(3000) * scale
    x[1000:1010, 4] = np.nan  # written as the format's invalid-sample value
    base = _wrsamp(tmp_path, "r", x, fmt=fmt, gain=gain, baseline=baseline, units=units)
    assert _uses_fast_path(base)
    rec = assert_same_as_wfdb(base, nan_gaps="interpolate")
    assert rec.meta["nan_filled"] == {"aVL": 10}
    assert_same_as_wfdb(base)  # the same NaN-gap error from both


def test_fast_path_matches_wfdb_with_time_date_comments_and_byte_offset(tmp_path):
    x = ecg_like(2000, c=12)
    base = _wrsamp(
        tmp_path,
        "t",
        x,
        base_time=datetime.time(13, 5, 7, 250000),
        base_date=datetime.date(2001, 2, 3),
        comments=["<age>: 63 <sex>: F", "Reason for admission: none"],
    )
    rec = assert_same_as_wfdb(base)
    assert rec.meta["base_datetime"] == "2001-02-03 13:05:07.250000"
    assert rec.meta["age"] == 63 and rec.meta["sex"] == "F"
    # the same data behind a 24-byte prefix, declared as a byte offset on every signal
    dat = base.with_name("t.dat")
    dat.write_bytes(b"\x07" * 24 + dat.read_bytes())
    hea = base.with_name("t.hea")
    hea.write_text(hea.read_text().replace("t.dat 16 ", "t.dat 16+24 "))
    assert _uses_fast_path(base)
    np.testing.assert_array_equal(assert_same_as_wfdb(base).signal, rec.signal)


def test_fast_path_matches_wfdb_for_conftest_and_synth_records(tmp_path):
    from elmjax.ecg import synth

    x = ecg_like(5000, seed=3)
    write_wfdb(tmp_path, "conf", x, comments=["age: 40"])
    synth.write_wfdb(tmp_path / "syn", x.T, 500)
    for name in ("conf", "syn"):
        assert _uses_fast_path(tmp_path / name)
        rec = assert_same_as_wfdb(tmp_path / name)
        assert rec.leads_present == io.CANONICAL_LEADS
        np.testing.assert_allclose(rec.signal, x.T, atol=0.51e-3)


def test_fast_path_invalid_samples_become_nan_like_wfdb(tmp_path):
    base = write_wfdb(tmp_path, "inv", ecg_like(1000))
    digital = np.memmap(base.with_name("inv.dat"), dtype="<i2", mode="r+", shape=(1000, 12))
    digital[200:205, 7] = -32768  # WFDB's "no sample" value for format 16
    digital[0, 0] = -32767  # the lowest valid value stays a number
    digital.flush()
    del digital
    rec = assert_same_as_wfdb(base, nan_gaps="interpolate", max_abs_mv=40.0)
    assert rec.meta["nan_filled"] == {"V2": 5}
    assert rec.signal[0, 0] == np.float32(-32.767)
    kind, message = _outcome(io.read_record, base)
    assert kind == "error" and "lead V2 has 5 NaN samples" in message
    assert_same_as_wfdb(base)


def test_real_records_use_the_fast_path_or_fall_back(shared_data):
    mimic2 = shared_data / "wfdb" / "3000003_0003"  # format 80: read directly
    assert _uses_fast_path(mimic2)
    rec = assert_same_as_wfdb(mimic2)
    assert rec.meta["base_datetime"] == "19:46:25.757000"
    mitbih = shared_data / "wfdb" / "100"  # format 212: read by wfdb
    assert not _uses_fast_path(mitbih)
    assert assert_same_as_wfdb(mitbih).leads_present == ("II", "V5")


def test_format16_never_touches_wfdb_and_format212_falls_back(tmp_path, monkeypatch):
    x = ecg_like(1000)
    fmt16 = write_wfdb(tmp_path, "a", x)
    fmt212 = write_wfdb(tmp_path, "b", x, fmt="212", gain=200.0)
    want212 = io.read_record(fmt212)
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("wfdb must not be used here")

    monkeypatch.setattr(io.wfdb, "rdheader", broken)
    monkeypatch.setattr(io.wfdb, "rdrecord", broken)
    rec = io.read_record(fmt16)
    assert calls == [] and rec.leads_present == io.CANONICAL_LEADS
    with pytest.raises(io.ECGReadError, match="wfdb could not read the record"):
        io.read_record(fmt212)  # its header parses, its data goes to wfdb.rdrecord
    assert len(calls) == 1
    monkeypatch.undo()
    np.testing.assert_array_equal(io.read_record(fmt212).signal, want212.signal)


def test_unreadable_data_file_is_left_to_wfdb(tmp_path, monkeypatch):
    base = write_wfdb(tmp_path, "r", ecg_like(1000))
    want = io.read_record(base)

    def unreadable(*args):
        raise PermissionError("no access")

    monkeypatch.setattr(io, "_read_direct", unreadable)
    np.testing.assert_array_equal(io.read_record(base).signal, want.signal)


def test_fast_path_gives_the_same_errors(tmp_path):
    def fresh(name, **kwargs):
        return write_wfdb(tmp_path, name, ecg_like(1000), **kwargs)

    cases = {}
    cases["truncated"] = fresh("truncated")
    dat = tmp_path / "truncated.dat"
    dat.write_bytes(dat.read_bytes()[:5000])
    cases["mismatch"] = fresh("mismatch")
    _edit_header(cases["mismatch"], " 1000", " 500")
    cases["nodat"] = fresh("nodat")
    (tmp_path / "nodat.dat").unlink()
    cases["zero"] = fresh("zero")
    _edit_header(cases["zero"], " 1000", " 0")
    (tmp_path / "zero.dat").write_bytes(b"")
    cases["fs"] = fresh("fs")
    _edit_header(cases["fs"], " 500 ", " abc ")
    cases["date"] = fresh("date")
    _edit_header(cases["date"], " 1000", " 1000 10:00:00 31/02/2020")
    cases["names"] = write_wfdb(tmp_path, "names", ecg_like(500, c=3), names=["I", "II", "FOO"])
    x = ecg_like(1000)
    x[:, 3] = 0.25
    cases["flat"] = write_wfdb(tmp_path, "flat", x)
    cases["padding"] = fresh("padding")  # up to 4 extra bytes are tolerated by both
    with open(tmp_path / "padding.dat", "ab") as f:
        f.write(b"\0\0\0")
    messages = {}
    for name, base in cases.items():
        assert_same_as_wfdb(base)
        messages[name] = _outcome(io.read_record, base)[1]
    assert "data file is truncated" in messages["truncated"]
    assert "header/data length mismatch" in messages["mismatch"]
    assert "data file named by" in messages["nodat"]
    assert "zero samples" in messages["zero"]
    assert "sampling frequency 'abc'" in messages["fs"]
    assert "malformed header" in messages["date"]
    assert "unknown lead name 'FOO'" in messages["names"]
    assert "lead aVR: flat line" in messages["flat"]
    assert isinstance(messages["padding"], io.Record)
    assert_same_as_wfdb(cases["flat"], bad_leads="drop")
    assert_same_as_wfdb(cases["names"], unknown_leads="drop")


# Header texts the strict parser accepts; each must give exactly wfdb.rdheader's fields.
ACCEPTED_HEADERS = {
    "wrsamp": "r 2 500 1000\nr.dat 16 1000.0(0)/mV 16 0 -119 1508 0 I\n"
    "r.dat 16 1000.0(0)/mV 16 0 12 -3 0 II\n",
    "no_baseline_uses_adc_zero": "r 1 360 100\nr.dat 16 200/mV 11 1024 995 -22131 0 MLII\n",
    "no_units_is_mV": "r 1 250.0 100\nr.dat 16 200(5) 12 0 0 0 0 V1\n",
    "gain_zero_is_200": "r 1 250.5 100\nr.dat 16 0(3)/uV 12 0 0 0 0 V1\n",
    "exponent_gain": "r 1 500 100\nr.dat 16 1.5e3(-7)/mV 16 0 0 0 0 I\n",
    "bare_gain": "r 1 500 100\nr.dat 16 200 16 -12 0 0 0 I\n",
    "format_suffixes": "r 2 500 100\nr.dat 16x1:0+24 200/mV 16 0 0 0 0 I\n"
    "r.dat 16x2:3 200/mV 16 0 0 0 0 II\n",
    "counter_freq": "r 1 128/1000(5.5) 100\nr.dat 16 200/mV 16 0 0 0 0 I\n",
    "time_and_date": "r 1 500 100 8:05:02.5 1/2/2003\nr.dat 16 200/mV 16 0 0 0 0 I\n",
    "seconds_only": "r 1 500 100 7\nr.dat 16 200/mV 16 0 0 0 0 I\n",
    "comments_and_spacing": "# before\n\nr\t1  500 100\r\n#\n##  after ##\nr.dat\t16 200/mV "
    "16 0 0 0 0 chest lead V1\r\n#<age>: 50 \n",
    "non_ascii_is_dropped": "# caf\u00e9\nr 1 500 100\nr.dat 16 200/\u00b5V 16 0 0 0 0 I\n",
    "two_files_212": "r 2 500 100\na.dat 212 200 12 0 0 0 0 I\nb.dat 212 200 12 0 0 0 0 II\n",
}
# Header texts outside the strict syntax: parsed by wfdb (which may also reject them).
REJECTED_HEADERS = {
    "multi_segment": "r/2 1 500 200\ns1 100\ns2 100\n",
    "no_length": "r 1 500\nr.dat 16 200/mV 16 0 0 0 0 I\n",
    "no_fs": "r 1\nr.dat 16 200/mV 16 0 0 0 0 I\n",
    "short_signal_line": "r 1 500 100\nr.dat 16 200/mV I\n",
    "no_description": "r 1 500 100\nr.dat 16 200/mV 16 0 0 0 0\n",
    "tab_in_description": "r 1 500 100\nr.dat 16 200/mV 16 0 0 0 0 I\tx\n",
    "no_file": "r 1 500 100\n~ 16 200/mV 16 0 0 0 0 I\n",
    "plus_gain": "r 1 500 100\nr.dat 16 +200/mV 16 0 0 0 0 I\n",
    "negative_adc_res": "r 1 500 100\nr.dat 16 200/mV -16 0 0 0 0 I\n",
    "units_without_slash": "r 1 500 100\nr.dat 16 200mV 16 0 0 0 0 I\n",
    "three_digit_time": "r 1 500 100 123\nr.dat 16 200/mV 16 0 0 0 0 I\n",
    "bad_date": "r 1 500 100 0:0:0 31/02/2020\nr.dat 16 200/mV 16 0 0 0 0 I\n",
    "too_few_signal_lines": "r 2 500 100\nr.dat 16 200/mV 16 0 0 0 0 I\n",
    "zero_signals": "r 0 500 100\n",
    "junk_after_date": "r 1 500 100 0:0:0 1/1/2000 x\nr.dat 16 200/mV 16 0 0 0 0 I\n",
}


def _rdheader_fields(path):
    header = wfdb.rdheader(str(path))
    return {f.name: getattr(header, f.name) for f in dataclasses.fields(io._Header)}


def _typed(value):
    """A value with the types of its items, so that 500 and 500.0 compare different."""
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


@pytest.mark.parametrize("name", sorted(ACCEPTED_HEADERS))
def test_header_parser_gives_wfdb_rdheader_fields(tmp_path, name):
    hea = tmp_path / "r.hea"
    hea.write_bytes(ACCEPTED_HEADERS[name].encode("utf-8"))
    header = io._parse_header(hea.read_bytes().decode("ascii", "ignore"))
    assert header is not None
    want = _rdheader_fields(tmp_path / "r")
    got = dataclasses.asdict(header)
    assert {k: _typed(v) for k, v in got.items()} == {k: _typed(v) for k, v in want.items()}


def test_header_parser_gives_wfdb_rdheader_fields_of_real_headers(shared_data):
    for name in ("100", "3000003_0003"):
        text = (shared_data / "wfdb" / f"{name}.hea").read_bytes().decode("ascii", "ignore")
        got = dataclasses.asdict(io._parse_header(text))
        want = _rdheader_fields(shared_data / "wfdb" / name)
        assert {k: _typed(v) for k, v in got.items()} == {k: _typed(v) for k, v in want.items()}


@pytest.mark.parametrize("name", sorted(REJECTED_HEADERS))
def test_header_parser_leaves_other_syntax_to_wfdb(name):
    assert io._parse_header(REJECTED_HEADERS[name]) is None


def test_unusual_layouts_fall_back_and_match_wfdb(tmp_path):
    x = ecg_like(1000, c=3)
    names = ["I", "II", "III"]
    skewed = _wrsamp(tmp_path, "skew", x, names=names)
    _edit_header(skewed, "skew.dat 16 ", "skew.dat 16:2 ")  # first signal skewed by 2
    wfdb.wrsamp(
        "two",
        fs=500,
        units=["mV"] * 3,
        sig_name=names,
        p_signal=x,
        fmt=["16", "16", "212"],
        adc_gain=[1000.0, 1000.0, 200.0],
        baseline=[0] * 3,
        write_dir=str(tmp_path),
    )
    two_files = tmp_path / "two"
    assert (tmp_path / "two_1.dat").exists() and (tmp_path / "two_2.dat").exists()
    odd_syntax = _wrsamp(tmp_path, "odd", x, names=names)
    _edit_header(odd_syntax, "1000.0(0)/mV", "1000.0(0)mV")  # units without "/"
    for base in (skewed, two_files, odd_syntax):
        assert not _uses_fast_path(base)
        assert_same_as_wfdb(base, bad_leads="drop", nan_gaps="interpolate")
