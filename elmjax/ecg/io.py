"""Reading real ECG recordings into one canonical 12-lead form.

Every reader here returns a :class:`Record`: a float32 ``[12, n]`` signal in millivolts in the
canonical lead order ``I, II, III, aVR, aVL, aVF, V1..V6`` (:data:`CANONICAL_LEADS`), whatever
order, case or naming the source used. Leads the source does not have are zero-filled and listed
in ``leads_missing``; nothing is ever derived or invented silently.

Bad input raises :class:`ECGReadError`, whose message names the file and the problem. The dataset
layouts (:func:`list_entries`, :func:`load_entry`, :func:`iter_dataset`) can instead skip bad
records and report them, so that a corpus with some bad records still yields every good one.

Supported layouts (each yields ``(record_id, patient_id, Record, report_text)``):

* ``ptbxl`` — ``ptbxl_database.csv`` + ``records500/`` (``filename_hr``, 500 Hz).
* ``mimic`` — MIMIC-IV-ECG: ``record_list.csv`` + ``files/pXXXX/...``; reports from the
  ``report_0 .. report_17`` columns of ``machine_measurements.csv``, joined with spaces.
* ``code15`` — CODE-15%: ``exams.csv`` + ``exams_part*.hdf5`` (``tracings`` ``[N, 4096, 12]`` in
  mV at 400 Hz, ``exam_id`` ``[N]``). The centred zero padding of short exams is trimmed. CODE-15%
  has no text reports, so the report is written from its six labels.
* ``wfdb-dir`` — any directory tree of WFDB records; the record id is the path relative to the
  root. Segment headers of multi-segment records are not listed on their own.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import wfdb

CANONICAL_LEADS: tuple[str, ...] = (
    "I",
    "II",
    "III",
    "aVR",
    "aVL",
    "aVF",
    "V1",
    "V2",
    "V3",
    "V4",
    "V5",
    "V6",
)
LAYOUTS: tuple[str, ...] = ("ptbxl", "mimic", "code15", "wfdb-dir")

_LEAD_INDEX = {name.upper(): i for i, name in enumerate(CANONICAL_LEADS)}
# Other spellings of the twelve leads: MIT-BIH's modified limb leads, the Brazilian D1..D3.
_LEAD_ALIASES = {
    "MLI": "I",
    "MLII": "II",
    "MLIII": "III",
    "DI": "I",
    "DII": "II",
    "DIII": "III",
    "D1": "I",
    "D2": "II",
    "D3": "III",
}
# Channels that are not one of the twelve leads but are known to occur beside them: Frank XYZ
# leads (PTB), an unspecified precordial lead "V" (MIMIC-II), modified chest leads, and
# non-ECG signals. They are dropped and listed in ``meta["dropped_channels"]``.
_KNOWN_EXTRA_CHANNELS = {
    "V",
    "VX",
    "VY",
    "VZ",
    "X",
    "Y",
    "Z",
    "MCL1",
    "MCL6",
    "ABP",
    "ART",
    "PAP",
    "CVP",
    "PLETH",
    "PPG",
    "RESP",
    "SPO2",
    "CO2",
    "EDR",
}
# Physical units -> factor to millivolts.
_UNIT_TO_MV = {"MV": 1.0, "UV": 1e-3, "ΜV": 1e-3, "V": 1e3, "NV": 1e-6}
# Bytes per sample of the WFDB storage formats whose data-file size we can check exactly.
_BYTES_PER_SAMPLE = {
    "8": 1.0,
    "80": 1.0,
    "16": 2.0,
    "61": 2.0,
    "160": 2.0,
    "212": 1.5,
    "310": 4 / 3,
    "311": 4 / 3,
    "24": 3.0,
    "32": 4.0,
}
_FLAT_PTP_MV = 0.01  # a lead whose peak-to-peak stays below 10 uV carries no ECG
_NUMERIC = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


class ECGReadError(ValueError):
    """A recording could not be read; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclasses.dataclass(frozen=True)
class Record:
    """One ECG recording in canonical 12-lead form.

    Attributes:
      signal: float32 ``[12, n]`` in millivolts, rows in :data:`CANONICAL_LEADS` order; rows of
        missing (or dropped bad) leads are zero.
      fs: sampling frequency in Hz.
      leads_present: canonical names of the leads that carry data.
      leads_missing: canonical names of the zero-filled leads.
      meta: what else the source said: ``comments``, ``age``, ``sex``, ``source_leads``,
        ``units``, ``dropped_channels``, ``bad_leads``, ``nan_filled``, ...
      path: the file the record came from (for HDF5 sources ``file.hdf5#row``).
    """

    signal: np.ndarray
    fs: float
    leads_present: tuple[str, ...]
    leads_missing: tuple[str, ...]
    meta: Mapping[str, Any]
    path: str

    @property
    def n_samples(self) -> int:
        """Number of samples per lead."""
        return int(self.signal.shape[-1])

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.n_samples / self.fs


@dataclasses.dataclass(frozen=True)
class Entry:
    """One record of a dataset layout, listed but not yet loaded (cheap to pass to workers).

    Attributes:
      layout: one of :data:`LAYOUTS`.
      record_id: the dataset's id (PTB-XL ``ecg_id``, MIMIC ``study_id``, CODE-15 ``exam_id``,
        or the relative path for ``wfdb-dir``).
      patient_id: the patient's id (the record id where the layout has none).
      report: the free-text report ("" where there is none).
      path: WFDB record path without extension, or the HDF5 file.
      index: row in the HDF5 file (CODE-15% only).
      meta: per-record metadata from the dataset's tables (age, sex, labels, ...).
    """

    layout: str
    record_id: str
    patient_id: str
    report: str
    path: str
    index: int | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Lead names and validation
# ----------------------------------------------------------------------------------------------


def canonical_lead(name: str) -> str | None:
    """The canonical name of a lead label (case-insensitive), or None if it is not one of the
    twelve standard leads: ``"avr"`` -> ``"aVR"``, ``"MLII"`` -> ``"II"``, ``"DI"`` -> ``"I"``.
    """
    key = re.sub(r"[\s_\-]", "", str(name)).upper()
    if key.startswith("LEAD"):
        key = key[4:]
    key = _LEAD_ALIASES.get(key, key)
    index = _LEAD_INDEX.get(key)
    return None if index is None else CANONICAL_LEADS[index]


def _check_option(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _fill_nan_gaps(lead: np.ndarray) -> np.ndarray:
    """Linearly interpolates NaN samples of one lead; edges take the nearest valid value."""
    bad = np.isnan(lead)
    good = np.flatnonzero(~bad)
    out = lead.copy()
    out[bad] = np.interp(np.flatnonzero(bad), good, lead[good])
    return out


def _first_nan_run(lead: np.ndarray) -> tuple[int, int]:
    """(start, length) of the first run of NaNs in a lead that has some."""
    bad = np.isnan(lead)
    start = int(np.argmax(bad))
    stop = start + int(np.argmax(~bad[start:])) if not bad[start:].all() else len(lead)
    return start, stop - start


def assemble_record(
    path: str | os.PathLike,
    channels: np.ndarray,
    names: Sequence[str],
    fs: float,
    *,
    units: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
    unknown_leads: str = "error",
    bad_leads: str = "error",
    nan_gaps: str = "error",
    max_abs_mv: float = 20.0,
) -> Record:
    """Maps raw channels onto the canonical 12 leads and validates them.

    Args:
      path: the source file, for error messages.
      channels: ``[n, C]`` physical values (samples first, as WFDB and CODE-15 store them).
      names: the C channel names as the source spells them.
      fs: sampling frequency in Hz.
      units: the C physical units ("mV", "uV", "V"); None means millivolts.
      meta: extra metadata to keep.
      unknown_leads: "error" raises on a channel name that is neither one of the 12 leads nor a
        known non-12-lead channel (Frank XYZ, "V", ABP, ...); "drop" drops it. Known extra
        channels are always dropped; both end up in ``meta["dropped_channels"]``.
      bad_leads: what to do with an all-NaN, flat (peak-to-peak < 10 uV) or absurd (above
        ``max_abs_mv``) lead: "error" raises, "drop" zero-fills it, moves it to
        ``leads_missing`` and records why in ``meta["bad_leads"]``.
      nan_gaps: what to do with NaN samples inside an otherwise valid lead: "error" raises,
        "interpolate" fills them linearly and counts them in ``meta["nan_filled"]``.
      max_abs_mv: amplitude above which a lead is considered corrupt or in the wrong units.

    Returns:
      The validated :class:`Record`.

    Raises:
      ECGReadError: naming ``path`` and the problem.
    """
    _check_option("unknown_leads", unknown_leads, ("error", "drop"))
    _check_option("bad_leads", bad_leads, ("error", "drop"))
    _check_option("nan_gaps", nan_gaps, ("error", "interpolate"))
    path = str(path)
    channels = np.asarray(channels)
    if channels.ndim != 2 or channels.shape[1] != len(names):
        raise ECGReadError(
            path, f"expected [samples, {len(names)}] channels, got shape {channels.shape}"
        )
    n = channels.shape[0]
    if n == 0:
        raise ECGReadError(path, "record has zero samples")
    if not (isinstance(fs, int | float) and math.isfinite(fs) and fs > 0):
        raise ECGReadError(path, f"invalid sampling frequency {fs!r}")

    signal = np.zeros((len(CANONICAL_LEADS), n), np.float32)
    source_of: dict[str, int] = {}
    dropped: list[str] = []
    for c, raw_name in enumerate(names):
        lead = canonical_lead(raw_name)
        if lead is None:
            key = re.sub(r"[\s_\-]", "", str(raw_name)).upper()
            if key not in _KNOWN_EXTRA_CHANNELS and unknown_leads == "error":
                raise ECGReadError(
                    path,
                    f"unknown lead name {raw_name!r} (channel {c}); expected one of "
                    f"{', '.join(CANONICAL_LEADS)} (pass unknown_leads='drop' to ignore it)",
                )
            dropped.append(str(raw_name))
            continue
        if lead in source_of:
            first = source_of[lead]
            raise ECGReadError(
                path,
                f"duplicated lead {lead}: channel {first} {names[first]!r} and channel {c} "
                f"{raw_name!r}",
            )
        unit = "mV" if units is None or not units[c] else str(units[c])
        factor = _UNIT_TO_MV.get(unit.strip().upper())
        if factor is None:
            raise ECGReadError(path, f"lead {lead} has unknown units {unit!r}")
        source_of[lead] = c
        with np.errstate(invalid="ignore", over="ignore"):
            signal[_LEAD_INDEX[lead.upper()]] = channels[:, c].astype(np.float64) * factor

    info: dict[str, Any] = dict(meta or {})
    info["source_leads"] = [str(x) for x in names]
    if dropped:
        info["dropped_channels"] = dropped
    problems: dict[str, str] = {}
    filled: dict[str, int] = {}
    for lead in source_of:
        row = signal[_LEAD_INDEX[lead.upper()]]
        nan = np.isnan(row) | np.isinf(row)
        row[np.isinf(row)] = np.nan
        if nan.all():
            problems[lead] = "all samples are NaN"
            continue
        valid = row[~nan]
        peak = float(np.abs(valid).max())
        if peak > max_abs_mv:
            problems[lead] = (
                f"amplitude reaches {peak:.1f} mV (limit {max_abs_mv:g} mV): wrong units or "
                "corrupt data"
            )
        elif float(valid.max() - valid.min()) < _FLAT_PTP_MV:
            problems[lead] = "flat line (peak-to-peak below 0.01 mV): no ECG on this lead"
        elif nan.any():
            if nan_gaps == "error":
                start, length = _first_nan_run(row)
                raise ECGReadError(
                    path,
                    f"lead {lead} has {int(nan.sum())} NaN samples (first gap: {length} samples "
                    f"from sample {start}); pass nan_gaps='interpolate' to fill them",
                )
            signal[_LEAD_INDEX[lead.upper()]] = _fill_nan_gaps(row)
            filled[lead] = int(nan.sum())
    if problems and bad_leads == "error":
        lead, why = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more bad leads)" if len(problems) > 1 else ""
        raise ECGReadError(path, f"lead {lead}: {why}{more}")
    for lead in problems:
        signal[_LEAD_INDEX[lead.upper()]] = 0.0
    if problems:
        info["bad_leads"] = problems
    if filled:
        info["nan_filled"] = filled
    present = tuple(x for x in CANONICAL_LEADS if x in source_of and x not in problems)
    if not present:
        raise ECGReadError(path, "no usable ECG lead: " + (str(problems) or f"channels {names}"))
    missing = tuple(x for x in CANONICAL_LEADS if x not in present)
    return Record(signal, float(fs), present, missing, info, path)


# ----------------------------------------------------------------------------------------------
# WFDB
# ----------------------------------------------------------------------------------------------


def _record_base(path: str | os.PathLike) -> str:
    """'dir/rec', 'dir/rec.hea' and 'dir/rec.dat' all name the record 'dir/rec'."""
    text = os.fspath(path)
    root, ext = os.path.splitext(text)
    return root if ext.lower() in (".hea", ".dat", ".mat") else text


def _check_header_fields(hea: str, lines: list[str]) -> None:
    """Rejects header fields that wfdb would silently replace by defaults (e.g. a non-numeric
    sampling frequency becomes 250 Hz)."""
    fields = lines[0].split()
    if len(fields) < 2:
        raise ECGReadError(hea, f"record line {lines[0]!r} has no signal count")
    nsig = fields[1]
    if not nsig.isdigit():
        raise ECGReadError(hea, f"number of signals {nsig!r} is not an integer")
    if len(fields) > 2:
        fs = fields[2].split("/")[0].split("(")[0]
        if not _NUMERIC.match(fs):
            raise ECGReadError(hea, f"sampling frequency {fields[2]!r} is not a number")
    if len(fields) > 3 and not fields[3].isdigit():
        raise ECGReadError(hea, f"signal length {fields[3]!r} is not an integer")
    if "/" in fields[0]:
        return  # multi-segment layout header: its segments carry the signal lines
    for line in lines[1 : 1 + int(nsig)]:
        parts = line.split()
        if len(parts) < 2:
            raise ECGReadError(hea, f"signal line {line!r} is incomplete")
        fmt = re.match(r"^\d+", parts[1])
        if not fmt:
            raise ECGReadError(hea, f"storage format {parts[1]!r} in {line!r} is not a number")
        if len(parts) > 2:
            gain = re.split(r"[(/]", parts[2])[0]
            if not _NUMERIC.match(gain):
                raise ECGReadError(hea, f"ADC gain {parts[2]!r} in {line!r} is not a number")
        for field in parts[3:5]:
            if not re.match(r"^[+-]?\d+$", field):
                raise ECGReadError(hea, f"integer field {field!r} in {line!r} is not an integer")


def _read_header_bytes(hea: str) -> bytes:
    try:
        with open(hea, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ECGReadError(hea, "header file not found") from None


def _header_lines(hea: str, raw: bytes | None = None) -> list[str]:
    """The non-empty, non-comment lines of a header (``raw``: its bytes, if already read)."""
    text = (_read_header_bytes(hea) if raw is None else raw).decode("latin-1")
    lines = [x.strip() for x in text.splitlines()]
    lines = [x for x in lines if x and not x.startswith("#")]
    if not lines:
        raise ECGReadError(hea, "header file is empty")
    return lines


def _check_data_files(base: str, header: wfdb.Record | _Header) -> None:
    """Compares each data file's size with what the header declares, so a truncated file or a
    header/data length mismatch is named precisely instead of failing deep inside wfdb."""
    directory = os.path.dirname(base)
    per_file: dict[str, list[int]] = {}
    for c, name in enumerate(header.file_name or []):
        per_file.setdefault(name, []).append(c)
    for name, chans in per_file.items():
        dat = os.path.join(directory, name)
        if not os.path.exists(dat):
            raise ECGReadError(dat, f"data file named by {base}.hea not found")
        fmt = str(header.fmt[chans[0]])
        bps = _BYTES_PER_SAMPLE.get(fmt)
        if bps is None or header.sig_len is None:
            continue
        spf = header.samps_per_frame or [1] * header.n_sig
        frame = sum(int(spf[c]) for c in chans)
        offset = int((header.byte_offset or [0] * header.n_sig)[chans[0]] or 0)
        expected = offset + math.ceil(header.sig_len * frame * bps)
        size = os.path.getsize(dat)
        if size < expected:
            raise ECGReadError(
                dat,
                f"data file is truncated: {base}.hea declares {header.sig_len} samples x "
                f"{frame} signals in format {fmt} ({expected} bytes) but the file has {size} bytes",
            )
        # Formats 212/310/311 pad the last group; allow one extra group of bytes.
        if size > expected + 4:
            have = int((size - offset) / (frame * bps))
            raise ECGReadError(
                dat,
                f"header/data length mismatch: {base}.hea declares {header.sig_len} samples but "
                f"the file holds {have} samples per signal",
            )


_AGE_PATTERNS = (
    re.compile(r"<?age>?\s*[:=]\s*(\d+(?:\.\d+)?)", re.I),
    re.compile(r"^\s*(\d{1,3})\s+([MF])\b"),  # MIT-BIH: "69 M 1085 1629 x1"
)
_SEX_PATTERN = re.compile(r"<?sex>?\s*[:=]\s*(male|female|[mf])\b", re.I)


def _parse_comments(comments: Sequence[str]) -> dict[str, Any]:
    """Age and sex from header comments in the common PhysioNet styles."""
    out: dict[str, Any] = {}
    for line in comments:
        for pattern in _AGE_PATTERNS:
            m = pattern.search(line)
            if m and "age" not in out:
                out["age"] = float(m.group(1))
                if m.lastindex and m.lastindex >= 2:
                    out.setdefault("sex", m.group(2).upper())
        m = _SEX_PATTERN.search(line)
        if m and "sex" not in out:
            out["sex"] = m.group(1)[0].upper()
    return out


# ----------------------------------------------------------------------------------------------
# Fast path: a strict parser of WFDB header text and a direct reader of the common data layout
# ----------------------------------------------------------------------------------------------
#
# wfdb.rdheader spends ~3 ms per 12-lead header in pandas lookups, and read_record used to parse
# every header twice (rdheader, then rdrecord again). The parser below accepts a strict subset of
# the header syntax and gives exactly the field values wfdb.rdheader gives for it (the tests
# compare them field by field); anything else returns None and goes through wfdb unchanged.

_RX_TOKEN_SEP = re.compile(r"[ \t]+")  # what separates header fields (wfdb's [ \t]+)
_RX_RECORD_NAME = re.compile(r"[-\w]+")
_RX_FS = re.compile(r"(\d+(?:\.\d*)?)(?:/(\d+(?:\.\d*)?)(?:\((-?\d+(?:\.\d*)?)\))?)?")
_RX_TIME = re.compile(r"\d{1,2}(?::\d{1,2}){0,2}(?:\.\d{1,6})?")
_RX_DATE = re.compile(r"\d{1,2}/\d{1,2}/\d{1,4}")
_RX_FILE = re.compile(r"[-\w]+(?:\.\w*)?")
_RX_FORMAT = re.compile(r"(\d+)(?:x(\d+))?(?::(\d+))?(?:\+(\d+))?")
_RX_GAIN = re.compile(r"(-?\d+(?:\.\d*)?(?:e[+-]?\d+)?)(?:\((-?\d+)\))?(?:/([\w^\-?%/]+))?")
_RX_UINT = re.compile(r"\d+")
_RX_INT = re.compile(r"-?\d+")
_WFDB_DEFAULT_GAIN = 200.0  # adu per physical unit when the header's gain is 0 (WFDB spec)
# Storage formats read directly: format -> (numpy dtype of the stored values, the digital value
# that marks an invalid sample, which wfdb turns into NaN). Format 24 is read as bytes.
_DIRECT_FORMATS = {
    "16": ("<i2", -(2**15)),
    "24": ("u1", -(2**23)),
    "32": ("<i4", -(2**31)),
    "80": ("u1", -(2**7)),
}


@dataclasses.dataclass(frozen=True)
class _Header:
    """A single-segment WFDB header, field for field as ``wfdb.rdheader`` reads it (same names,
    same types, same defaults): per-signal fields are lists with one item per signal."""

    record_name: str
    n_sig: int
    fs: int | float
    counter_freq: float | None
    base_counter: float | None
    sig_len: int
    base_time: datetime.time | None
    base_date: datetime.date | None
    file_name: list[str]
    fmt: list[str]
    samps_per_frame: list[int]
    skew: list[int | None]
    byte_offset: list[int | None]
    adc_gain: list[float]
    baseline: list[int]
    units: list[str]
    adc_res: list[int]
    adc_zero: list[int]
    init_value: list[int]
    checksum: list[int]
    block_size: list[int]
    sig_name: list[str]
    comments: list[str]


def _wfdb_number(text: str) -> int | float:
    """wfdb's reading of fs: a float, made an int when it is one (to 8 decimals)."""
    value = float(text)
    return int(value) if round(value, 8) == float(int(value)) else value


def _wfdb_time(text: str) -> datetime.time:
    """wfdb's reading of a base time: ``SS``, ``MM:SS`` or ``HH:MM:SS``, optionally ``.ffffff``."""
    layout = ("%S", "%M:%S", "%H:%M:%S")[text.count(":")] + (".%f" if "." in text else "")
    return datetime.datetime.strptime(text, layout).time()


def _parse_record_line(line: str) -> dict[str, Any] | None:
    """``name nsig fs[/counterfreq[(basecount)]] nsamp [basetime [basedate]]``, or None."""
    tokens = _RX_TOKEN_SEP.split(line)
    if not 4 <= len(tokens) <= 6:
        return None  # no fs or no length (wfdb would infer it), or trailing junk
    name, n_sig, fs, sig_len, *when = tokens
    fs_match = _RX_FS.fullmatch(fs)
    if not (
        _RX_RECORD_NAME.fullmatch(name)  # also rejects multi-segment "name/nseg"
        and _RX_UINT.fullmatch(n_sig)
        and fs_match
        and _RX_UINT.fullmatch(sig_len)
        and (len(when) < 1 or _RX_TIME.fullmatch(when[0]))
        and (len(when) < 2 or _RX_DATE.fullmatch(when[1]))
    ):
        return None
    counter_freq, base_counter = fs_match.group(2), fs_match.group(3)
    try:
        base_time = _wfdb_time(when[0]) if when else None
        base_date = None
        if len(when) > 1:
            base_date = datetime.datetime.strptime(when[1], "%d/%m/%Y").date()
    except ValueError:
        return None  # e.g. 31/02: wfdb reports it
    return {
        "record_name": name,
        "n_sig": int(n_sig),
        "fs": _wfdb_number(fs_match.group(1)),
        "counter_freq": None if counter_freq is None else float(counter_freq),
        "base_counter": None if base_counter is None else float(base_counter),
        "sig_len": int(sig_len),
        "base_time": base_time,
        "base_date": base_date,
    }


def _parse_signal_line(line: str) -> dict[str, Any] | None:
    """``file fmt[xspf][:skew][+offset] gain[(baseline)][/units] adcres adczero initval checksum
    blocksize description`` (every field present), or None."""
    tokens = _RX_TOKEN_SEP.split(line, maxsplit=8)
    if len(tokens) != 9:
        return None
    file_name, fmt, gain, adc_res, adc_zero, init_value, checksum, block_size, name = tokens
    fmt_match = _RX_FORMAT.fullmatch(fmt)
    gain_match = _RX_GAIN.fullmatch(gain)
    if not (
        _RX_FILE.fullmatch(file_name)
        and fmt_match
        and gain_match
        and _RX_UINT.fullmatch(adc_res)
        and _RX_INT.fullmatch(adc_zero)
        and _RX_INT.fullmatch(init_value)
        and _RX_INT.fullmatch(checksum)
        and _RX_UINT.fullmatch(block_size)
        and not any(c in name for c in "\t\n\r\f\v")  # wfdb's description stops at these
    ):
        return None
    fmt, spf, skew, offset = fmt_match.groups()
    adc_gain, baseline, units = gain_match.groups()
    return {
        "file_name": file_name,
        "fmt": fmt,
        "samps_per_frame": 1 if spf is None else int(spf),
        "skew": None if skew is None else int(skew),
        "byte_offset": None if offset is None else int(offset),
        "adc_gain": float(adc_gain) if float(adc_gain) != 0 else _WFDB_DEFAULT_GAIN,
        "baseline": int(adc_zero if baseline is None else baseline),  # WFDB: default ADC zero
        "units": units or "mV",
        "adc_res": int(adc_res),
        "adc_zero": int(adc_zero),
        "init_value": int(init_value),
        "checksum": int(checksum),
        "block_size": int(block_size),
        "sig_name": name,
    }


def _parse_header(text: str) -> _Header | None:
    """The header of a single-segment record whose every line is in the strict syntax above;
    None for anything else (multi-segment records, omitted fields, odd syntax)."""
    lines = (line.strip() for line in text.splitlines())
    lines = [line for line in lines if line]
    fields = [line for line in lines if not line.startswith("#")]
    comments = [line.strip(" \t#") for line in lines if line.startswith("#")]
    record = _parse_record_line(fields[0]) if fields else None
    if record is None or record["n_sig"] == 0 or record["n_sig"] != len(fields) - 1:
        return None
    signals = [_parse_signal_line(line) for line in fields[1:]]
    if any(s is None for s in signals):
        return None
    per_signal = {key: [s[key] for s in signals] for key in signals[0]}
    return _Header(**record, **per_signal, comments=comments)


def _read_direct(base: str, header: _Header) -> np.ndarray | None:
    """The physical ``[n, C]`` float64 signal, exactly as ``wfdb.rdrecord`` computes it, for the
    common layout: every signal in one data file, interleaved, same format (16, 24, 32 or 80),
    one sample per frame, no skew. None for anything else."""
    fmt = header.fmt[0]
    offsets = {offset or 0 for offset in header.byte_offset}
    if (
        fmt not in _DIRECT_FORMATS
        or len(set(header.fmt)) != 1
        or len(set(header.file_name)) != 1
        or len(offsets) != 1
        or any(spf != 1 for spf in header.samps_per_frame)
        or any(skew for skew in header.skew)
    ):
        return None
    dtype, invalid = _DIRECT_FORMATS[fmt]
    n_values = header.sig_len * header.n_sig * (3 if fmt == "24" else 1)
    dat = os.path.join(os.path.dirname(base), header.file_name[0])
    raw = np.fromfile(dat, dtype=dtype, count=n_values, offset=offsets.pop())
    if raw.size != n_values:
        return None  # cannot happen after _check_data_files; let wfdb report it if it does
    if fmt == "24":  # little-endian 24-bit two's complement
        digital = raw[2::3].view(np.int8).astype(np.int32) << 16
        digital |= raw[1::3].astype(np.int32) << 8
        digital |= raw[0::3]
    elif fmt == "80":  # offset binary
        digital = raw.astype(np.int16) - 128
    else:
        digital = raw
    digital = digital.reshape(header.sig_len, header.n_sig)
    # wfdb's dac(): (digital - baseline) / gain in float64, invalid samples -> NaN.
    physical = digital.astype(np.float64)
    physical -= np.asarray(header.baseline, dtype=np.float64)
    physical /= np.asarray(header.adc_gain, dtype=np.float64)
    physical[digital == invalid] = np.nan
    return physical


def read_record(
    path: str | os.PathLike,
    *,
    unknown_leads: str = "error",
    bad_leads: str = "error",
    nan_gaps: str = "error",
    max_abs_mv: float = 20.0,
) -> Record:
    """Reads a WFDB record (any storage format wfdb reads: 16, 212, 80, 24, 32, FLAC, ...).

    Common records (one data file of interleaved format 16, 24, 32 or 80 samples, one sample per
    frame, no skew, every header field written out) are parsed and read directly, about ten times
    faster than through wfdb and with bit-identical results; everything else goes through wfdb.

    Args:
      path: the record path, with or without ``.hea`` / ``.dat``.
      unknown_leads, bad_leads, nan_gaps, max_abs_mv: see :func:`assemble_record`.

    Returns:
      A :class:`Record` with the signal in millivolts in canonical lead order; ``meta`` holds the
      header comments, age and sex when the comments give them, and the base date/time.

    Raises:
      ECGReadError: missing header or data file, truncated data file, header/data length
        mismatch, non-numeric header fields, zero-length record, unknown or duplicated lead
        names, and (unless told to drop or fill them) all-NaN, flat or absurd leads and NaN gaps.
    """
    return _read(
        path,
        direct=True,
        unknown_leads=unknown_leads,
        bad_leads=bad_leads,
        nan_gaps=nan_gaps,
        max_abs_mv=max_abs_mv,
    )


def _read_with_wfdb(path: str | os.PathLike, **kwargs: Any) -> Record:
    """:func:`read_record` without the fast path: wfdb parses the header and reads the data."""
    return _read(path, direct=False, **kwargs)


def _read(path: str | os.PathLike, *, direct: bool, **assemble_kwargs: Any) -> Record:
    base = _record_base(path)
    hea = base + ".hea"
    raw = _read_header_bytes(hea)
    _check_header_fields(hea, _header_lines(hea, raw))
    header: _Header | wfdb.Record | wfdb.MultiRecord | None = None
    if direct:  # decoded as wfdb decodes it
        header = _parse_header(raw.decode("ascii", errors="ignore"))
    if header is None:
        try:
            header = wfdb.rdheader(base)
        except Exception as e:  # wfdb raises bare ValueError/IndexError on malformed headers
            raise ECGReadError(hea, f"malformed header: {e}") from e
    if header.sig_len == 0:
        raise ECGReadError(hea, "record has zero samples")
    if not getattr(header, "seg_name", None):
        _check_data_files(base, header)
    channels = None
    if isinstance(header, _Header):
        try:
            channels = _read_direct(base, header)
        except OSError:
            pass  # unreadable data file: wfdb reads it below and reports the problem
    rec = header
    if channels is None:
        try:
            rec = wfdb.rdrecord(base, physical=True)
        except FileNotFoundError as e:
            raise ECGReadError(e.filename or base, "file not found") from e
        except Exception as e:
            raise ECGReadError(base, f"wfdb could not read the record: {e}") from e
        if getattr(rec, "seg_name", None):  # multi-segment: rdrecord returned a MultiRecord
            rec = rec.multi_to_single(physical=True)
        channels = rec.p_signal if rec.p_signal is not None else np.zeros((0, rec.n_sig))
    comments = list(rec.comments or [])
    meta: dict[str, Any] = {"comments": comments, **_parse_comments(comments)}
    if rec.base_date is not None or rec.base_time is not None:
        meta["base_datetime"] = f"{rec.base_date or ''} {rec.base_time or ''}".strip()
    return assemble_record(
        base, channels, rec.sig_name, rec.fs, units=rec.units, meta=meta, **assemble_kwargs
    )


# ----------------------------------------------------------------------------------------------
# Dataset layouts
# ----------------------------------------------------------------------------------------------


def _read_table(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts, checking the required columns exist."""
    if not path.exists():
        raise ECGReadError(path, "table not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise ECGReadError(path, f"missing columns {missing}; found {columns}")
        return list(reader)


def _int_id(value: str, path: Path, row: int, column: str) -> str:
    """'15709.0' -> '15709'; raises naming the table, row and column on garbage."""
    try:
        number = float(value)
    except ValueError:
        raise ECGReadError(path, f"row {row}: {column} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ECGReadError(path, f"row {row}: {column} is empty")
    return str(int(number))


def _wfdb_exists(base: Path) -> str | None:
    """None if the record's header exists, else the reason."""
    return None if base.with_name(base.name + ".hea").exists() else "file not found"


def _list_ptbxl(root: Path) -> tuple[list[Entry], list[dict]]:
    table = root / "ptbxl_database.csv"
    rows = _read_table(table, ("ecg_id", "patient_id", "report", "filename_hr"))
    entries, skipped = [], []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        ecg_id = _int_id(row["ecg_id"], table, i, "ecg_id")
        try:
            patient = _int_id(row["patient_id"], table, i, "patient_id")
        except ECGReadError:
            patient = f"ecg{ecg_id}"  # unknown patient: its own group, never merged with others
        base = root / row["filename_hr"]
        why = _wfdb_exists(base)
        if why:
            skipped.append({"record_id": ecg_id, "path": str(base), "reason": f"{table}: {why}"})
            continue
        meta = {k: row[k] for k in ("age", "sex", "scp_codes", "strat_fold") if k in row}
        entries.append(Entry("ptbxl", ecg_id, patient, row["report"], str(base), None, meta))
    return entries, skipped


def _list_mimic(root: Path) -> tuple[list[Entry], list[dict]]:
    table = root / "record_list.csv"
    rows = _read_table(table, ("subject_id", "study_id", "path"))
    reports: dict[str, str] = {}
    measurements = root / "machine_measurements.csv"
    if measurements.exists():
        for row in _read_table(measurements, ("study_id",)):
            parts = [(row.get(f"report_{k}") or "").strip() for k in range(18)]
            reports[row["study_id"].strip()] = " ".join(p for p in parts if p)
    entries, skipped = [], []
    for i, row in enumerate(rows, start=2):
        study = _int_id(row["study_id"], table, i, "study_id")
        subject = _int_id(row["subject_id"], table, i, "subject_id")
        base = root / row["path"]
        why = _wfdb_exists(base)
        if why:
            skipped.append({"record_id": study, "path": str(base), "reason": f"{table}: {why}"})
            continue
        meta = {"ecg_time": row.get("ecg_time", "")}
        entries.append(
            Entry("mimic", study, subject, reports.get(study, ""), str(base), None, meta)
        )
    return entries, skipped


_CODE15_LABELS = (
    ("1dAVb", "first degree AV block"),
    ("RBBB", "right bundle branch block"),
    ("LBBB", "left bundle branch block"),
    ("SB", "sinus bradycardia"),
    ("AF", "atrial fibrillation"),
    ("ST", "sinus tachycardia"),
)


def _truthy(value: str) -> bool:
    return str(value).strip().lower() in ("true", "1", "1.0", "yes")


def code15_report(row: Mapping[str, str]) -> str:
    """The report text written for a CODE-15% exam from its six labels and ``normal_ecg``."""
    found = [text for key, text in _CODE15_LABELS if _truthy(row.get(key, ""))]
    if found:
        return ", ".join(found) + "."
    return "normal ecg." if _truthy(row.get("normal_ecg", "")) else "no listed abnormality."


@functools.lru_cache(maxsize=64)
def _h5_file(path: str):
    import h5py

    return h5py.File(path, "r")


def _list_code15(root: Path) -> tuple[list[Entry], list[dict]]:
    table = root / "exams.csv"
    rows = _read_table(table, ("exam_id", "patient_id"))
    where: dict[str, tuple[str, int]] = {}
    for part in sorted(root.glob("exams_part*.hdf5")):
        try:
            ids = np.asarray(_h5_file(str(part))["exam_id"][:])
        except Exception as e:
            raise ECGReadError(part, f"cannot read dataset 'exam_id': {e}") from e
        for index, exam in enumerate(ids.tolist()):
            if int(exam) != 0:  # CODE-15% parts end with a zero placeholder row
                where.setdefault(str(int(exam)), (str(part), index))
    entries, skipped = [], []
    for i, row in enumerate(rows, start=2):
        exam = _int_id(row["exam_id"], table, i, "exam_id")
        patient = _int_id(row["patient_id"], table, i, "patient_id")
        if exam not in where:
            hint = row.get("trace_file") or "exams_part*.hdf5"
            skipped.append(
                {"record_id": exam, "path": str(root / hint), "reason": f"{table}: no tracing"}
            )
            continue
        part, index = where[exam]
        meta = {"age": row.get("age", ""), "sex": "M" if _truthy(row.get("is_male", "")) else "F"}
        meta.update({key: _truthy(row.get(key, "")) for key, _ in _CODE15_LABELS})
        entries.append(Entry("code15", exam, patient, code15_report(row), part, index, meta))
    return entries, skipped


def _list_wfdb_dir(root: Path) -> tuple[list[Entry], list[dict]]:
    headers = sorted(root.rglob("*.hea"))
    if not headers:
        raise ECGReadError(root, "no WFDB header (.hea) files found")
    segments: set[Path] = set()
    for hea in headers:
        try:
            lines = _header_lines(str(hea))
        except ECGReadError:
            continue  # reported when the record itself is loaded
        first = lines[0].split()
        if first and "/" in first[0]:  # multi-segment layout header: lines name segments
            for line in lines[1:]:
                name = line.split()[0]
                if name != "~":
                    segments.add(hea.with_name(name + ".hea"))
    entries = []
    for hea in headers:
        if hea in segments:
            continue
        base = hea.with_suffix("")
        record_id = base.relative_to(root).as_posix()
        entries.append(Entry("wfdb-dir", record_id, record_id, "", str(base)))
    return entries, []


_LISTERS = {
    "ptbxl": _list_ptbxl,
    "mimic": _list_mimic,
    "code15": _list_code15,
    "wfdb-dir": _list_wfdb_dir,
}


def list_entries(layout: str, root: str | os.PathLike) -> tuple[list[Entry], list[dict]]:
    """Lists the records of a dataset without loading them.

    Args:
      layout: one of :data:`LAYOUTS`.
      root: the dataset's root directory.

    Returns:
      ``(entries, skipped)``: the loadable entries in the dataset's own order, and a list of
      ``{"record_id", "path", "reason"}`` for table rows that point to files that do not exist.

    Raises:
      ECGReadError: the dataset's table is missing or lacks required columns.
    """
    _check_option("layout", layout, LAYOUTS)
    root = Path(root)
    if not root.is_dir():
        raise ECGReadError(root, "dataset directory not found")
    return _LISTERS[layout](root)


def load_entry(entry: Entry, **read_kwargs: Any) -> Record:
    """Loads one listed record (see :func:`read_record` for ``read_kwargs``).

    Raises:
      ECGReadError: naming the file and the problem.
    """
    if entry.layout != "code15":
        return read_record(entry.path, **read_kwargs)
    where = f"{entry.path}#{entry.index}"
    try:
        tracing = np.asarray(_h5_file(entry.path)["tracings"][entry.index], dtype=np.float32)
    except Exception as e:
        raise ECGReadError(where, f"cannot read 'tracings' row {entry.index}: {e}") from e
    if tracing.ndim != 2 or tracing.shape[1] != 12:
        raise ECGReadError(where, f"expected a [samples, 12] tracing, got shape {tracing.shape}")
    active = np.flatnonzero(np.any(tracing != 0, axis=1))
    if active.size == 0:
        raise ECGReadError(where, "tracing is all zeros")
    tracing = tracing[active[0] : active[-1] + 1]  # drop the centred zero padding
    meta = {**entry.meta, "zero_padding_trimmed": 4096 - int(tracing.shape[0])}
    return assemble_record(where, tracing, CANONICAL_LEADS, 400.0, meta=meta, **read_kwargs)


def iter_dataset(
    layout: str,
    root: str | os.PathLike,
    *,
    on_error: str = "raise",
    skipped: list[dict] | None = None,
    **read_kwargs: Any,
) -> Iterator[tuple[str, str, Record, str]]:
    """Yields ``(record_id, patient_id, Record, report_text)`` for every record of a dataset.

    Args:
      layout: one of :data:`LAYOUTS`.
      root: the dataset's root directory.
      on_error: "raise" stops at the first bad record with its :class:`ECGReadError`; "skip"
        skips it and appends ``{"record_id", "path", "reason"}`` to ``skipped``.
      skipped: the list that collects skipped records (required with ``on_error="skip"``).
      **read_kwargs: passed to :func:`read_record` (``bad_leads``, ``nan_gaps``, ...).
    """
    _check_option("on_error", on_error, ("raise", "skip"))
    if on_error == "skip" and skipped is None:
        raise ValueError("on_error='skip' needs a `skipped` list to report into")
    entries, missing = list_entries(layout, root)
    if missing:
        if on_error == "raise":
            first = missing[0]
            raise ECGReadError(first["path"], f"record {first['record_id']}: {first['reason']}")
        skipped.extend(missing)
    for entry in entries:
        try:
            record = load_entry(entry, **read_kwargs)
        except ECGReadError as e:
            if on_error == "raise":
                raise
            skipped.append({"record_id": entry.record_id, "path": e.path, "reason": e.problem})
            continue
        yield entry.record_id, entry.patient_id, record, entry.report
