"""Synthetic 12-lead ECGs with exact labels, and an ECG-QA-style corpus built from them.

This is the project's embedded default data set: nothing is downloaded, everything is simulated.

Signal model
------------
The heart is a dipole ``d(t)`` in Frank coordinates (X to the patient's left, Y to the feet, Z to
the back). Each beat is a sum of wave components; each is an asymmetric Gaussian in time (with an
optional flat top) times a fixed 3-D vector: the P wave; the Q, R, S (and bundle-branch-block)
parts of the QRS; an ST plateau (injury current); the T wave. Atrial fibrillation replaces the P
waves by 4-9 Hz fibrillatory waves. The Dower matrix projects ``d(t)`` onto I, II and V1..V6;
III, aVR, aVL and aVF are derived from I and II, so Einthoven's law holds exactly, also after
noise (noise is added to the 8 independent leads only).

Labels
------
Every label is measured on what was generated, never copied from the parameters: intervals come
from the beat schedule and from the wave components (onset and end where the spatial magnitude
of a wave crosses 5% of its peak); heart rate from the beat times; ST deviation (at J+60 ms),
T amplitude, limb-lead QRS peak-to-peak and the frontal axis (from net QRS areas in I and aVF)
from the noise-free signal. Categorical findings follow from these with the usual clinical
thresholds, so labels and signal cannot disagree.

Corpus
------
``python -m elmjax.ecg.synth --out DIR --num-ecgs N --seed S`` writes a PTB-XL-layout corpus
(WFDB records at 500 and 100 Hz, ``ptbxl_database.csv``), ECG-QA-format question/answer files
(``ecgqa/ptbxl/{template,paraphrased}/{train,valid,test}/00000.json``) whose answers are balanced
per question text, and ``synth_labels.jsonl`` with every parameter and label.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import multiprocessing
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import resample_poly
from scipy.special import erf
from tqdm import tqdm

from elmjax.ecg.io import CANONICAL_LEADS

LEADS: tuple[str, ...] = CANONICAL_LEADS  # one lead order for the whole project
WFDB_LEAD_NAMES: tuple[str, ...] = tuple(name.upper() for name in LEADS)  # PTB-XL spelling
LIMB_LEADS: tuple[str, ...] = LEADS[:6]
FS = 500  # Hz, sampling rate of the records500 files
LR_FS = 100  # Hz, sampling rate of the records100 files
SPLITS: tuple[str, ...] = ("train", "valid", "test")

# Dower (1988) transform from Frank XYZ to the 8 independent leads; columns X, Y, Z.
DOWER = np.array(
    [
        [0.632, -0.235, 0.059],  # I
        [0.235, 1.066, -0.132],  # II
        [-0.515, 0.157, -0.917],  # V1
        [0.044, 0.164, -1.387],  # V2
        [0.882, 0.098, -1.277],  # V3
        [1.213, 0.127, -0.601],  # V4
        [1.125, 0.127, -0.086],  # V5
        [0.831, 0.076, 0.230],  # V6
    ]
)
INDEPENDENT_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")

# Clinical territories and the thresholds that turn measurements into findings.
TERRITORIES: dict[str, tuple[str, ...]] = {
    "inferior": ("II", "III", "aVF"),
    "anterior": ("V1", "V2", "V3", "V4"),
    "lateral": ("I", "aVL", "V5", "V6"),
}
ST_ELEVATION_MV = 0.1  # ST at J+60 ms >= this: elevation
ST_DEPRESSION_MV = 0.05  # ST at J+60 ms <= -this: depression (aVR not counted)
T_INVERSION_MV = 0.1  # T amplitude <= -this: inverted (aVR not counted)
TERRITORY_MIN_LEADS = 2  # a territory is positive when at least this many of its leads are
LOW_VOLTAGE_MV = 0.5  # every limb lead's QRS peak-to-peak below this: low voltage
FIRST_DEGREE_AVB_MS = 200.0  # PR above this: first-degree AV block
WIDE_QRS_MS = 120.0  # QRS at least this: complete bundle branch block
BRADYCARDIA_BPM = 60.0
TACHYCARDIA_BPM = 100.0
LEFT_AXIS_DEG = -30.0
RIGHT_AXIS_DEG = 90.0
ST_OFFSET_MS = 60.0  # ST is measured this long after the J point

_LEAD_INDEX = {name: i for i, name in enumerate(LEADS)}
_EDGE_FRACTION = 0.05  # wave onset/end: spatial magnitude crosses this fraction of its peak
_EDGE_Z = math.sqrt(2.0 * math.log(1.0 / _EDGE_FRACTION))  # Gaussian half-width at that level
_SUPPORT = 4.0  # components are evaluated within +-4 sigma of their flat top
_FINE_STEP = 1e-4  # s, grid on which template waves are measured
_ROOT_PI_2 = math.sqrt(math.pi / 2.0)

# Injury-current directions (X, Y, Z), chosen so that the ST change stays in its territory
# over the sampled range (reciprocal changes elsewhere follow from the projection).
# ST elevation: the injury current points towards the territory.
_ST_ELEVATION_VECTORS = {
    "inferior": (0.1, 0.97, 0.2),
    "anterior": (0.06, -0.12, -0.99),
    "lateral": (0.75, 0.31, 0.58),
}
# ST depression (subendocardial injury) points away from the territory; listed here is the
# direction of the territory, the injury vector is its negative.
_ST_DEPRESSION_VECTORS = {
    "inferior": (-0.44, 0.9, -0.05),
    "anterior": (0.0, 0.0, -1.0),
    "lateral": (0.85, 0.24, 0.45),
}
_P_DIRECTION = (0.5, 0.85, 0.05)
_AF_DIRECTION = (-0.35, 0.45, -0.8)


def derive_leads(independent: np.ndarray) -> np.ndarray:
    """The 12 canonical leads from the 8 independent ones.

    Args:
      independent: ``[8, n]`` leads I, II, V1..V6.

    Returns:
      ``[12, n]`` in :data:`LEADS` order, with III = II - I, aVR = -(I + II) / 2,
      aVL = I - II / 2, aVF = II - I / 2.
    """
    lead_i, lead_ii = independent[0], independent[1]
    limb = [lead_i, lead_ii, lead_ii - lead_i, -(lead_i + lead_ii) / 2]
    limb += [lead_i - lead_ii / 2, lead_ii - lead_i / 2]
    return np.concatenate([np.stack(limb), independent[2:]], axis=0)


LEAD_MATRIX = derive_leads(DOWER)  # [12, 3]: XYZ -> the 12 canonical leads


def split_of_fold(fold: int) -> str:
    """The PTB-XL split of a ``strat_fold``: 1-8 train, 9 valid, 10 test."""
    return "test" if int(fold) == 10 else "valid" if int(fold) == 9 else "train"


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PatientTraits:
    """What stays the same across one patient's ECGs.

    Attributes:
      patient_id: the patient's number.
      age: years.
      sex: 0 male, 1 female (PTB-XL coding).
      height_cm, weight_kg: body size (only written to the database table).
      axis_deg: the patient's usual frontal QRS axis.
      qrs_z: posterior component of the main QRS vector, relative to its frontal magnitude.
      limb_qrs_mv: the patient's usual largest limb-lead QRS peak-to-peak.
      t_direction: unit direction of the normal T vector (X, Y, Z).
      t_mv: magnitude of the normal T vector.
      p_mv: magnitude of the P vector.
      qtc_ms: the patient's rate-corrected QT (Fridericia).
      resp_hz: breathing rate.
    """

    patient_id: int = 1
    age: int = 55
    sex: int = 0
    height_cm: float = 175.0
    weight_kg: float = 78.0
    axis_deg: float = 45.0
    qrs_z: float = 0.5
    limb_qrs_mv: float = 1.2
    t_direction: tuple[float, float, float] = (0.6, 0.55, -0.45)
    t_mv: float = 0.4
    p_mv: float = 0.15
    qtc_ms: float = 410.0
    resp_hz: float = 0.25


@dataclasses.dataclass(frozen=True)
class ECGParams:
    """Everything that defines one simulated ECG (the defaults give a normal ECG).

    Attributes:
      rhythm: ``"sinus"`` or ``"af"`` (atrial fibrillation: no P waves, fibrillatory waves,
        irregularly irregular RR). Sinus bradycardia / tachycardia follow from ``heart_rate``.
      heart_rate: mean ventricular rate, bpm.
      rsa: respiratory sinus arrhythmia, RR modulation as a fraction of RR (sinus).
      rr_jitter: beat-to-beat RR noise, fraction of RR (sinus).
      af_rr_cv: RR coefficient of variation in atrial fibrillation.
      af_wave_mv: fibrillatory wave amplitude (vector magnitude).
      af_wave_hz: mean fibrillatory wave frequency.
      resp_hz: breathing rate.
      resp_amplitude: QRS/T amplitude modulation with breathing (fraction).
      resp_rotation_deg: frontal rotation of the heart vector with breathing.
      pr_ms: P onset to QRS onset (sinus).
      p_ms: P wave duration.
      p_mv: P vector magnitude.
      qrs_type: ``"normal"``, ``"rbbb"`` (late rightward-anterior forces, rSR' in V1) or
        ``"lbbb"`` (broad R in I/V6, QS in V1, discordant T).
      qrs_ms: QRS duration.
      axis_deg: frontal QRS axis from net QRS areas, atan2(2/sqrt(3) aVF, I).
      qrs_z: posterior component of the main QRS vector, relative to its frontal magnitude.
      limb_qrs_mv: largest limb-lead QRS peak-to-peak (below 0.5: low voltage).
      qtc_ms: QT corrected with Fridericia's formula (wide QRS lengthens QT further).
      t_direction: direction of the normal T vector (X, Y, Z).
      t_mv: magnitude of the normal T vector.
      st_mv: ST deviation: > 0 elevation, < 0 depression; at least two leads of
        ``st_territory`` reach ``abs(st_mv)`` (before the T wave's own share).
      st_territory: ``"inferior"``, ``"anterior"``, ``"lateral"`` or None.
      t_inversion_territory: territory with inverted T waves, or None.
      t_inversion_mv: depth of the inverted T waves (at least two territory leads).
      n_pvc: premature ventricular complexes to place inside the recording.
      pvc_coupling: PVC onset after the preceding QRS onset, as a fraction of RR.
      pvc_vector: main vector of the (unifocal) PVCs, mV.
      noise_mv: white noise standard deviation.
      emg_mv: muscle (EMG) noise, bursts of high-frequency noise.
      wander_mv: baseline wander amplitude.
      mains_mv: mains hum amplitude.
      mains_hz: mains frequency (50 or 60).
    """

    rhythm: str = "sinus"
    heart_rate: float = 70.0
    rsa: float = 0.03
    rr_jitter: float = 0.01
    af_rr_cv: float = 0.2
    af_wave_mv: float = 0.06
    af_wave_hz: float = 6.0
    resp_hz: float = 0.25
    resp_amplitude: float = 0.05
    resp_rotation_deg: float = 3.0
    pr_ms: float = 160.0
    p_ms: float = 100.0
    p_mv: float = 0.15
    qrs_type: str = "normal"
    qrs_ms: float = 92.0
    axis_deg: float = 45.0
    qrs_z: float = 0.5
    limb_qrs_mv: float = 1.2
    qtc_ms: float = 410.0
    t_direction: tuple[float, float, float] = (0.6, 0.55, -0.45)
    t_mv: float = 0.4
    st_mv: float = 0.0
    st_territory: str | None = None
    t_inversion_territory: str | None = None
    t_inversion_mv: float = 0.25
    n_pvc: int = 0
    pvc_coupling: float = 0.6
    pvc_vector: tuple[float, float, float] = (-1.0, 0.8, -0.8)
    noise_mv: float = 0.01
    emg_mv: float = 0.0
    wander_mv: float = 0.05
    mains_mv: float = 0.005
    mains_hz: float = 50.0


def sample_patient(rng: np.random.Generator, patient_id: int = 1) -> PatientTraits:
    """Draws one patient's shared traits (age, sex, body size, baseline axis, wave shapes)."""
    sex = int(rng.random() < 0.5)
    direction = np.array(PatientTraits.t_direction) + rng.normal(0.0, 0.1, 3)
    return PatientTraits(
        patient_id=int(patient_id),
        age=int(np.clip(round(rng.normal(58, 17)), 18, 95)),
        sex=sex,
        height_cm=round(float(rng.normal(164 if sex else 177, 7)), 0),
        weight_kg=round(float(rng.normal(68 if sex else 82, 12)), 0),
        axis_deg=float(np.clip(rng.normal(40, 18), -15, 78)),
        qrs_z=float(rng.uniform(0.3, 0.8)),
        limb_qrs_mv=float(rng.uniform(0.8, 1.8)),
        t_direction=tuple(float(v) for v in direction / np.linalg.norm(direction)),
        t_mv=float(rng.uniform(0.3, 0.5)),
        p_mv=float(rng.uniform(0.1, 0.2)),
        qtc_ms=float(np.clip(rng.normal(418 if sex else 408, 10), 385, 440)),
        resp_hz=float(rng.uniform(0.15, 0.35)),
    )


def sample_params(
    rng: np.random.Generator, patient: PatientTraits | None = None, **fixed: Any
) -> ECGParams:
    """Draws the parameters of one ECG, with findings in a sensible class balance.

    A quarter of the ECGs are healthy: sinus rhythm 62-97 bpm, normal axis, no finding at all.
    For the others, rhythm: 40% sinus 62-97 bpm, 20% bradycardia 42-56, 20% tachycardia
    105-122, 20% atrial fibrillation 65-125; independently: 20% first-degree AV block (PR
    215-320 ms), 15% RBBB and 15% LBBB (QRS 126-165 ms), 15% left (-42..-80 deg) and 15% right
    (102..150 deg) axis deviation (otherwise near the patient's axis), 12% low voltage, 25% ST
    elevation and 15% ST depression in a random territory, 15% T-wave inversion, 15% with 1-3
    PVCs. Targets keep a margin from the clinical thresholds, so the measured findings almost
    always equal the drawn ones (the labels are measured in any case).

    Args:
      rng: the random generator.
      patient: shared traits; a new random patient when None.
      **fixed: :class:`ECGParams` fields to set instead of drawing them. Fields that depend on
        them (the heart rate on ``rhythm``, ``qrs_ms`` on ``qrs_type``, ...) are drawn
        accordingly.

    Returns:
      The parameters.
    """
    unknown = set(fixed) - {f.name for f in dataclasses.fields(ECGParams)}
    if unknown:
        raise ValueError(f"unknown ECGParams fields: {sorted(unknown)}")
    patient = patient or sample_patient(rng)
    values: dict[str, Any] = {}

    def pick(name: str, draw: Callable[[], Any]) -> Any:
        value = draw()  # always drawn, so fixing one field leaves the others' draws unchanged
        values[name] = fixed.get(name, value)
        return values[name]

    healthy = bool(rng.random() < 0.25)
    rate_class = str(rng.choice(["normal", "brady", "tachy", "af"], p=[0.4, 0.2, 0.2, 0.2]))
    rate_class = "normal" if healthy else rate_class
    rhythm = pick("rhythm", lambda: "af" if rate_class == "af" else "sinus")
    if rhythm == "af":
        rate_range = (65.0, 125.0)
    else:
        rate_class = "normal" if rate_class == "af" else rate_class
        rate_range = {"normal": (62.0, 97.0), "brady": (42.0, 56.0), "tachy": (105.0, 122.0)}[
            rate_class
        ]
    pick("heart_rate", lambda: float(rng.uniform(*rate_range)))
    pick("rsa", lambda: float(rng.uniform(0.01, 0.05)))
    pick("rr_jitter", lambda: float(rng.uniform(0.004, 0.012)))
    pick("af_rr_cv", lambda: float(rng.uniform(0.15, 0.3)))
    pick("af_wave_mv", lambda: float(rng.uniform(0.03, 0.1)))
    pick("af_wave_hz", lambda: float(rng.uniform(4.5, 8.5)))
    pick("resp_hz", lambda: patient.resp_hz * float(rng.uniform(0.9, 1.1)))
    pick("resp_amplitude", lambda: float(rng.uniform(0.02, 0.08)))
    pick("resp_rotation_deg", lambda: float(rng.uniform(1.0, 4.0)))
    avb = rng.random() < 0.2 and not healthy
    pick("pr_ms", lambda: float(rng.uniform(215, 320) if avb else rng.uniform(125, 185)))
    pick("p_ms", lambda: float(rng.uniform(80, 110)))
    pick("p_mv", lambda: patient.p_mv * float(rng.uniform(0.9, 1.1)))
    qrs_type = str(rng.choice(["normal", "rbbb", "lbbb"], p=[0.7, 0.15, 0.15]))
    qrs_type = pick("qrs_type", lambda: "normal" if healthy else qrs_type)
    wide = qrs_type != "normal"
    pick("qrs_ms", lambda: float(rng.uniform(126, 165) if wide else rng.uniform(80, 104)))
    axis_class = str(rng.choice(["patient", "left", "right"], p=[0.7, 0.15, 0.15]))
    axis_class = "patient" if healthy else axis_class
    axis_draws = {
        "patient": lambda: float(np.clip(patient.axis_deg + rng.normal(0, 5), -18, 78)),
        "left": lambda: float(rng.uniform(-80, -42)),
        "right": lambda: float(rng.uniform(102, 150)),
    }
    pick("axis_deg", axis_draws[axis_class])
    lbbb = qrs_type == "lbbb"
    pick("qrs_z", lambda: float(rng.uniform(0.9, 1.3)) if lbbb else patient.qrs_z)
    low = rng.random() < 0.12 and not healthy
    pick(
        "limb_qrs_mv",
        lambda: float(
            rng.uniform(0.25, 0.42)
            if low
            else max(0.7, patient.limb_qrs_mv * rng.uniform(0.9, 1.1))
        ),
    )
    pick("qtc_ms", lambda: patient.qtc_ms + float(rng.normal(0, 5)))
    pick("t_direction", lambda: patient.t_direction)
    pick("t_mv", lambda: patient.t_mv * float(rng.uniform(0.9, 1.1)))
    st_kind = str(rng.choice(["none", "elevation", "depression"], p=[0.6, 0.25, 0.15]))
    st_kind = "none" if healthy else st_kind
    territory = str(rng.choice(list(TERRITORIES)))
    st_draws = {
        "none": lambda: 0.0,
        "elevation": lambda: float(rng.uniform(0.15, 0.35)),
        "depression": lambda: -float(rng.uniform(0.08, 0.12)),
    }
    st_mv = pick("st_mv", st_draws[st_kind])
    pick("st_territory", lambda: territory if st_mv != 0 else None)
    t_territory = str(rng.choice(list(TERRITORIES)))
    inverted = rng.random() < 0.15 and not healthy
    pick("t_inversion_territory", lambda: t_territory if inverted else None)
    pick("t_inversion_mv", lambda: float(rng.uniform(0.15, 0.4)))
    has_pvc = rng.random() < 0.15 and not healthy
    pick("n_pvc", lambda: int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])) if has_pvc else 0)
    pick("pvc_coupling", lambda: float(rng.uniform(0.55, 0.7)))
    direction = rng.normal(0, 1, 3)
    direction = direction / np.linalg.norm(direction) * rng.uniform(1.2, 2.0)
    pick("pvc_vector", lambda: tuple(float(v) for v in direction))
    pick("noise_mv", lambda: float(np.exp(rng.uniform(np.log(0.004), np.log(0.02)))))
    emg = rng.random() < 0.4
    pick("emg_mv", lambda: float(rng.uniform(0.005, 0.025)) if emg else 0.0)
    pick("wander_mv", lambda: float(rng.uniform(0.02, 0.15)))
    hum = rng.random() < 0.5
    pick("mains_mv", lambda: float(rng.uniform(0.002, 0.015)) if hum else 0.0)
    pick("mains_hz", lambda: float(rng.choice([50.0, 60.0])))
    return ECGParams(**values)


# ----------------------------------------------------------------------------------------------
# Wave components
# ----------------------------------------------------------------------------------------------
# A set of components is an array [K, 7]: centre (s), sigma_left (s), sigma_right (s),
# flat half-width (s), and the vector X, Y, Z (mV).


def _wave(
    centre: float, sigma_left: float, sigma_right: float, vector: Sequence[float], flat: float = 0.0
) -> np.ndarray:
    return np.array([centre, sigma_left, sigma_right, flat, *vector], dtype=np.float64)


def _waves(rows: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack(rows) if len(rows) else np.zeros((0, 7))


def _unit(vector: Sequence[float]) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return vector / np.linalg.norm(vector)


def _render(waves: np.ndarray, fs: float, n: int, t0: float = 0.0) -> np.ndarray:
    """Sums the components on the grid ``t0 + i / fs``, ``i < n``; returns ``[3, n]`` (XYZ).

    Each component is evaluated only within +-4 sigma of its flat top, all at once on a padded
    ``[K, W]`` index grid, and accumulated with ``np.bincount``.
    """
    out = np.zeros((3, n))
    if len(waves) == 0 or n == 0:
        return out
    centre, sigma_left, sigma_right, flat = waves[:, 0], waves[:, 1], waves[:, 2], waves[:, 3]
    first = np.ceil((centre - flat - _SUPPORT * sigma_left - t0) * fs).astype(np.int64)
    last = np.floor((centre + flat + _SUPPORT * sigma_right - t0) * fs).astype(np.int64)
    first, last = np.maximum(first, 0), np.minimum(last, n - 1)
    keep = last >= first
    if not keep.any():
        return out
    waves, first, last = waves[keep], first[keep], last[keep]
    width = int((last - first).max()) + 1
    index = first[:, None] + np.arange(width)[None, :]  # [K, W]
    valid = index <= last[:, None]
    t = t0 + index / fs
    left_edge = (waves[:, 0] - waves[:, 3])[:, None]
    right_edge = (waves[:, 0] + waves[:, 3])[:, None]
    z = np.where(t < left_edge, (t - left_edge) / waves[:, 1:2], 0.0)
    z = np.where(t > right_edge, (t - right_edge) / waves[:, 2:3], z)
    shape = np.where(valid, np.exp(-0.5 * z * z), 0.0)
    index = np.where(valid, index, 0).ravel()
    for axis in range(3):
        weights = (shape * waves[:, 4 + axis, None]).ravel()
        out[axis] = np.bincount(index, weights=weights, minlength=n)
    return out


def _fine_curve(waves: np.ndarray) -> tuple[float, np.ndarray]:
    """The components alone on the fine grid: ``(t0, xyz [3, m])``."""
    low = float(np.min(waves[:, 0] - waves[:, 3] - _SUPPORT * waves[:, 1]))
    high = float(np.max(waves[:, 0] + waves[:, 3] + _SUPPORT * waves[:, 2]))
    n = int(math.ceil((high - low) / _FINE_STEP)) + 1
    return low, _render(waves, 1.0 / _FINE_STEP, n, t0=low)


def _extent(waves: np.ndarray) -> tuple[float, float, float]:
    """Onset, end and peak time of a wave: where its spatial magnitude first and last reaches
    5% of its peak, and where it peaks (measured on a 0.1 ms grid)."""
    t0, xyz = _fine_curve(waves)
    magnitude = np.sqrt((xyz**2).sum(axis=0))
    above = np.flatnonzero(magnitude >= _EDGE_FRACTION * magnitude.max())
    return (
        t0 + above[0] * _FINE_STEP,
        t0 + above[-1] * _FINE_STEP,
        t0 + int(np.argmax(magnitude)) * _FINE_STEP,
    )


def _cumulative_area(waves: np.ndarray, t: float) -> np.ndarray:
    """Integral of each component's shape from -inf to ``t``, ``[K]`` (s); components without
    a flat top (the QRS parts)."""
    centre, sigma_left, sigma_right = waves[:, 0], waves[:, 1], waves[:, 2]
    rising = sigma_left * _ROOT_PI_2 * (1.0 + erf((t - centre) / (sigma_left * math.sqrt(2.0))))
    falling = _ROOT_PI_2 * (
        sigma_left + sigma_right * erf((t - centre) / (sigma_right * math.sqrt(2.0)))
    )
    return np.where(t <= centre, rising, falling)


def _areas(waves: np.ndarray, start: float = -np.inf, stop: float = np.inf) -> np.ndarray:
    """Integral of each component's shape from ``start`` to ``stop``, ``[K]`` (s)."""
    return _cumulative_area(waves, stop) - _cumulative_area(waves, start)


# ----------------------------------------------------------------------------------------------
# One beat
# ----------------------------------------------------------------------------------------------

# QRS parts relative to the QRS onset before alignment: (time, sigma_left, sigma_right,
# fixed vector, weight of the main vector). The main vector is solved for the axis.
_QRS_PARTS: dict[str, tuple[tuple[float, float, float, tuple[float, float, float], float], ...]] = {
    "normal": (
        (0.016, 0.007, 0.007, (-0.12, 0.04, -0.18), 0.0),  # septal: q in I/V6, r in V1
        (0.042, 0.011, 0.010, (0.0, 0.0, 0.0), 1.0),  # main left-ventricular forces
        (0.068, 0.010, 0.011, (-0.22, -0.15, 0.30), 0.0),  # terminal basal forces: s waves
    ),
    "rbbb": (
        (0.016, 0.007, 0.007, (-0.12, 0.04, -0.18), 0.0),
        (0.040, 0.011, 0.010, (0.0, 0.0, 0.0), 1.0),
        (0.066, 0.010, 0.010, (-0.15, -0.10, 0.25), 0.0),
        (0.100, 0.016, 0.016, (-0.55, 0.05, -0.75), 0.0),  # late right-anterior: R' in V1
    ),
    "lbbb": (
        (0.020, 0.010, 0.010, (0.20, 0.0, 0.10), 0.0),  # initial leftward: no septal q
        (0.060, 0.020, 0.018, (0.0, 0.0, 0.0), 1.0),  # slow leftward-posterior activation
        (0.105, 0.020, 0.020, (0.0, 0.0, 0.15), 0.8),  # second peak: notched broad R
    ),
}
_QRS_TYPES = tuple(_QRS_PARTS)


@dataclasses.dataclass(frozen=True)
class _Beat:
    """Wave components of one normal beat and one PVC, times relative to the QRS onset."""

    p: np.ndarray
    ventricular: np.ndarray  # QRS + ST + T
    pvc: np.ndarray
    qrs: np.ndarray
    t: np.ndarray
    pvc_qrs: np.ndarray
    qrs_end: float
    r_time: float
    t_peak: float
    qt: float
    pvc_qrs_end: float
    pvc_r_time: float


def _solve_main_vector(
    fixed: np.ndarray, weights: np.ndarray, areas: np.ndarray, axis_deg: float, qrs_z: float
) -> np.ndarray:
    """The main QRS vector whose frontal net-area axis, with the other parts, is ``axis_deg``.

    Net QRS area in a lead is the lead vector dotted with sum_k area_k * vector_k, and
    vector_k = fixed_k + weight_k * main (``fixed`` ``[K, 3]``, ``weights`` and ``areas``
    ``[K]``). With the main vector's Z fixed, the frontal condition (I, 2/sqrt(3) aVF) =
    s (cos a, sin a) is a 2x2 linear system in its X and Y.
    """
    fixed_area = (areas[:, None] * fixed).sum(axis=0)
    main_area = float((areas * weights).sum())
    frontal = np.stack([LEAD_MATRIX[0], 2.0 / math.sqrt(3.0) * LEAD_MATRIX[5]])  # [2, 3]
    angle = math.radians(axis_deg)
    target = main_area * np.array([math.cos(angle), math.sin(angle)])
    rhs = (target - frontal @ fixed_area) / main_area - frontal[:, 2] * qrs_z
    xy = np.linalg.solve(frontal[:, :2], rhs)
    return np.array([xy[0], xy[1], qrs_z])


def _align(waves: np.ndarray, duration_s: float | None = None) -> tuple[np.ndarray, float, float]:
    """Stretches a complex in time to ``duration_s`` (if given) and shifts its onset to 0;
    returns ``(waves, end, peak)``."""
    waves = waves.copy()
    if duration_s is not None:
        onset, end, _ = _extent(waves)
        waves[:, :4] *= duration_s / (end - onset)
    onset, end, peak = _extent(waves)
    waves[:, 0] -= onset
    return waves, end - onset, peak - onset


def _build_qrs(params: ECGParams) -> tuple[np.ndarray, float, float]:
    if params.qrs_type not in _QRS_PARTS:
        raise ValueError(f"qrs_type must be one of {list(_QRS_TYPES)}, got {params.qrs_type!r}")
    parts = _QRS_PARTS[params.qrs_type]
    waves = _waves([_wave(t, sl, sr, vector) for t, sl, sr, vector, _ in parts])
    weights = np.array([w for *_, w in parts])
    fixed = waves[:, 4:].copy()
    # The axis is measured on net areas inside the QRS (onset to end), which depends on the
    # solution: solve with whole areas, then re-solve with the areas inside the resulting
    # QRS until it settles.
    areas = _areas(waves)
    for _ in range(4):
        main = _solve_main_vector(fixed, weights, areas, params.axis_deg, params.qrs_z)
        waves[:, 4:] = fixed + weights[:, None] * main[None, :]
        onset, end, _ = _extent(waves)
        areas = _areas(waves, onset, end)
    waves, end, peak = _align(waves, params.qrs_ms / 1000.0)
    _, xyz = _fine_curve(waves)
    limb = LEAD_MATRIX[:6] @ xyz
    waves[:, 4:] *= params.limb_qrs_mv / float((limb.max(axis=1) - limb.min(axis=1)).max())
    return waves, end, peak


def _territory_gain(direction: np.ndarray, territory: str, target: float) -> float:
    """Gain g such that g * direction projects to at least ``target`` on two territory leads."""
    if territory not in TERRITORIES:
        raise ValueError(f"territory must be one of {list(TERRITORIES)}, got {territory!r}")
    projection = LEAD_MATRIX[[_LEAD_INDEX[name] for name in TERRITORIES[territory]]] @ direction
    needed = np.sort(target / projection[projection > 0])
    return float(needed[min(TERRITORY_MIN_LEADS, len(needed)) - 1])


def _t_vector(params: ECGParams, qrs: np.ndarray) -> np.ndarray:
    """The T vector: concordant normally, discordant in bundle branch block, then pushed away
    from ``t_inversion_territory`` until two of its leads reach ``-t_inversion_mv``."""
    t_vector = params.t_mv * _unit(params.t_direction)
    if params.qrs_type == "lbbb":
        t_vector = -0.8 * params.t_mv * _unit(qrs[1, 4:]) + 0.2 * t_vector
    elif params.qrs_type == "rbbb":
        t_vector = t_vector - 0.6 * params.t_mv * _unit(qrs[3, 4:])
    if params.t_inversion_territory is not None:
        territory = params.t_inversion_territory
        if territory not in TERRITORIES:
            raise ValueError(f"territory must be one of {list(TERRITORIES)}, got {territory!r}")
        away = _unit(_ST_ELEVATION_VECTORS[territory])
        rows = LEAD_MATRIX[[_LEAD_INDEX[name] for name in TERRITORIES[territory]]]
        along, t_now = rows @ away, rows @ t_vector
        needed = np.sort((t_now[along > 0] + params.t_inversion_mv) / along[along > 0])
        t_vector = (
            t_vector - max(0.0, float(needed[min(TERRITORY_MIN_LEADS, len(needed)) - 1])) * away
        )
    return t_vector


def _st_vector(params: ECGParams) -> np.ndarray | None:
    """The injury-current vector, or None without ST deviation."""
    if params.st_mv == 0 or params.st_territory is None:
        return None
    if params.st_mv > 0:
        direction = _unit(_ST_ELEVATION_VECTORS.get(params.st_territory, (1.0, 0.0, 0.0)))
        return _territory_gain(direction, params.st_territory, params.st_mv) * direction
    direction = _unit(_ST_DEPRESSION_VECTORS.get(params.st_territory, (1.0, 0.0, 0.0)))
    return -_territory_gain(direction, params.st_territory, -params.st_mv) * direction


def _qt_seconds(params: ECGParams, qrs_end: float) -> float:
    """QT from QTc (Fridericia) at the mean RR, lengthened by a wide QRS."""
    rr = 60.0 / params.heart_rate
    return params.qtc_ms / 1000.0 * rr ** (1.0 / 3.0) + max(0.0, qrs_end - 0.1)


def _build_pvc(params: ECGParams, qt: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    main = np.asarray(params.pvc_vector, dtype=np.float64)
    size = float(np.linalg.norm(main))
    side = np.cross(main, (0.0, 0.0, 1.0))
    side = _unit(side if np.linalg.norm(side) > 1e-6 * size else (1.0, 0.0, 0.0))
    second = 0.5 * main + 0.6 * size * side
    qrs = _waves([_wave(0.045, 0.022, 0.020, main), _wave(0.105, 0.024, 0.024, 0.8 * second)])
    qrs, end, peak = _align(qrs)
    scale = qt / 0.4
    sigma_left, sigma_right = 0.06 * scale, 0.05 * scale
    centre = end + 0.27 * scale - _EDGE_Z * sigma_right
    t = _wave(centre, sigma_left, sigma_right, -0.3 * (main + second) / 2.0)
    return qrs, _waves([*qrs, t]), end, peak


def _build_beat(params: ECGParams) -> _Beat:
    """Wave components of one beat, aligned so that the QRS starts at 0 and its measured
    duration, axis and limb voltage equal the parameters."""
    qrs, qrs_end, r_time = _build_qrs(params)
    qt = _qt_seconds(params, qrs_end)
    scale = qt / 0.4
    t_left, t_right = 0.048 * scale, 0.042 * scale
    t_peak = qt - _EDGE_Z * t_right
    t = _waves([_wave(t_peak, t_left, t_right, _t_vector(params, qrs))])
    injury = _st_vector(params)
    st = []
    if injury is not None:
        start = qrs_end + 0.02
        flat = max(0.0, (t_peak - start) / 2.0)
        st = [_wave(start + flat, 0.008, t_right, injury, flat=flat)]
    p_ms = min(params.p_ms, params.pr_ms - 10.0)
    p_sigma = p_ms / 1000.0 / (2.0 * _EDGE_Z)
    p_centre = -params.pr_ms / 1000.0 + _EDGE_Z * p_sigma
    p = _waves([_wave(p_centre, p_sigma, p_sigma, params.p_mv * _unit(_P_DIRECTION))])
    pvc_qrs, pvc, pvc_end, pvc_peak = _build_pvc(params, qt)
    return _Beat(
        p=p,
        ventricular=_waves([*qrs, *st, *t]),
        pvc=pvc,
        qrs=qrs,
        t=t,
        pvc_qrs=pvc_qrs,
        qrs_end=qrs_end,
        r_time=r_time,
        t_peak=t_peak,
        qt=qt,
        pvc_qrs_end=pvc_end,
        pvc_r_time=pvc_peak,
    )


# ----------------------------------------------------------------------------------------------
# Beat schedule, rendering and noise
# ----------------------------------------------------------------------------------------------


def _schedule(
    params: ECGParams, beat: _Beat, duration: float, resp_phase: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """QRS onset times (s) and a PVC flag per beat, from before 0 to past ``duration``."""
    rr0 = 60.0 / params.heart_rate
    times = [-rr0 * (1.0 + rng.random())]
    while times[-1] < duration + 0.5:
        t = times[-1]
        if params.rhythm == "af":
            sigma = math.sqrt(math.log(1.0 + params.af_rr_cv**2))
            rr = rr0 * math.exp(sigma * rng.standard_normal() - sigma**2 / 2.0)
            rr = min(max(rr, beat.qt + 0.06), 2.2)
        else:
            breathing = math.sin(2.0 * math.pi * params.resp_hz * t + resp_phase)
            rr = (
                rr0
                * (1.0 + params.rsa * breathing)
                * (1.0 + params.rr_jitter * rng.standard_normal())
            )
        times.append(t + rr)
    times = np.array(times)
    is_pvc = np.zeros(len(times), dtype=bool)
    # A PVC replaces beat j + 1: it comes early after beat j, and beat j + 2 keeps its sinus
    # time, which leaves a compensatory pause. PVCs stay inside the recording, 3+ beats apart.
    eligible = np.flatnonzero((times >= 0.2) & (times <= duration - 1.6))
    eligible = eligible[eligible + 2 < len(times)]
    chosen: list[int] = []
    for j in rng.permutation(eligible):
        if len(chosen) == params.n_pvc:
            break
        if all(abs(int(j) - c) >= 3 for c in chosen):
            chosen.append(int(j))
    for j in chosen:
        rr = times[j + 1] - times[j]
        times[j + 1] = times[j] + min(max(params.pvc_coupling * rr, beat.qt + 0.04), 0.85 * rr)
        is_pvc[j + 1] = True
    return times, is_pvc


def _rotation_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _place_beats(
    params: ECGParams, beat: _Beat, onsets: np.ndarray, is_pvc: np.ndarray, resp_phase: float
) -> np.ndarray:
    """All components of the recording: each beat's template shifted to its onset, scaled and
    rotated in the frontal plane with breathing."""
    normal = beat.ventricular if params.rhythm == "af" else _waves([*beat.p, *beat.ventricular])
    rows = []
    for onset, pvc in zip(onsets, is_pvc, strict=True):
        breathing = math.sin(2.0 * math.pi * params.resp_hz * onset + resp_phase)
        rotation = _rotation_z(math.radians(params.resp_rotation_deg) * breathing)
        waves = (beat.pvc if pvc else normal).copy()
        waves[:, 0] += onset
        waves[:, 4:] = (1.0 + params.resp_amplitude * breathing) * waves[:, 4:] @ rotation.T
        rows.append(waves)
    return np.concatenate(rows, axis=0)


def _fibrillatory_waves(
    params: ECGParams, n: int, fs: float, rng: np.random.Generator
) -> np.ndarray:
    """Atrial fibrillation waves ``[3, n]``: a sinusoid with wandering frequency and amplitude."""
    t = np.arange(n) / fs
    drift_hz = rng.uniform(0.1, 1.0, 4)
    drift_phase = rng.uniform(0, 2 * np.pi, 4)
    drift = np.sin(2 * np.pi * drift_hz[:, None] * t + drift_phase[:, None]).sum(axis=0) / 2.0
    frequency = params.af_wave_hz * (1.0 + 0.12 * drift)
    phase = 2 * np.pi * np.cumsum(frequency) / fs + rng.uniform(0, 2 * np.pi)
    envelope = 0.75 + 0.25 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6.3))
    return params.af_wave_mv * _unit(_AF_DIRECTION)[:, None] * (envelope * np.sin(phase))[None]


def _noise(params: ECGParams, n: int, fs: float, rng: np.random.Generator) -> np.ndarray:
    """Noise on the 8 independent leads ``[8, n]``: white, EMG bursts, baseline wander (slow
    sinusoids plus breathing) and mains hum."""
    t = np.arange(n) / fs
    noise = rng.normal(0.0, params.noise_mv, (8, n))
    if params.emg_mv > 0:
        white = rng.standard_normal((8, n + 1))
        burst = np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 2 * np.pi))
        noise += params.emg_mv * np.clip(0.3 + burst, 0.0, None) * np.diff(white, axis=1)
    if params.wander_mv > 0:
        hz = rng.uniform(0.05, 0.45, (8, 3, 1))
        phase = rng.uniform(0, 2 * np.pi, (8, 3, 1))
        weight = rng.uniform(0.3, 1.0, (8, 3, 1))
        slow = (weight * np.sin(2 * np.pi * hz * t + phase)).sum(axis=1) / weight.sum(axis=1)
        breath = np.sin(2 * np.pi * params.resp_hz * t + rng.uniform(0, 2 * np.pi))
        noise += params.wander_mv * (slow + rng.uniform(0.2, 0.6, (8, 1)) * breath) / 1.4
    if params.mains_mv > 0:
        phase = rng.uniform(0, 2 * np.pi, (8, 1))
        level = params.mains_mv * rng.uniform(0.5, 1.0, (8, 1))
        noise += level * np.sin(2 * np.pi * params.mains_hz * t + phase)
    return noise


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def _morphology(clean: np.ndarray, fs: float, beat: _Beat, onsets: np.ndarray) -> dict | None:
    """Per-lead ST at J+60, T amplitude and QRS peak-to-peak (medians over beats) and the axis
    (net QRS areas summed over beats), measured on the clean 12-lead signal; None when no
    normal beat is fully inside."""
    n = clean.shape[1]
    start = np.round(onsets * fs).astype(np.int64)
    width = int(round(beat.qrs_end * fs)) + 1
    st_index = np.round((onsets + beat.qrs_end + ST_OFFSET_MS / 1000.0) * fs).astype(np.int64)
    t_index = np.round((onsets + beat.t_peak) * fs).astype(np.int64)
    inside = (start >= 0) & (st_index < n) & (t_index < n)
    if not inside.any():
        return None
    window = start[inside, None] + np.arange(width)[None, :]  # [B, W]
    qrs = clean[:, window]  # [12, B, W]
    net = qrs.sum(axis=(1, 2)) / fs  # [12]
    axis = math.degrees(math.atan2(2.0 / math.sqrt(3.0) * net[5], net[0]))
    ptp = np.median(qrs.max(axis=2) - qrs.min(axis=2), axis=1)
    return {
        "st": np.median(clean[:, st_index[inside]], axis=1),
        "t": np.median(clean[:, t_index[inside]], axis=1),
        "ptp": ptp,
        "axis": axis,
        "beats": int(inside.sum()),
    }


def _leads_where(values: np.ndarray, test: Callable[[float], bool], skip=("aVR",)) -> list[str]:
    return [name for name, v in zip(LEADS, values, strict=True) if name not in skip and test(v)]


def _territories(leads: Sequence[str]) -> list[str]:
    return [
        name
        for name, members in TERRITORIES.items()
        if sum(lead in leads for lead in members) >= TERRITORY_MIN_LEADS
    ]


def _axis_category(axis: float) -> str:
    if LEFT_AXIS_DEG <= axis <= RIGHT_AXIS_DEG:
        return "normal heart axis"
    if -90.0 <= axis < LEFT_AXIS_DEG:
        return "left axis deviation"
    if RIGHT_AXIS_DEG < axis <= 180.0:
        return "right axis deviation"
    return "extreme axis deviation"


def _qrs_category(qrs_type: str, qrs_ms: float) -> str:
    wide = qrs_ms >= WIDE_QRS_MS
    if qrs_type == "rbbb":
        return (
            "complete right bundle branch block" if wide else "incomplete right bundle branch block"
        )
    if qrs_type == "lbbb":
        return (
            "complete left bundle branch block" if wide else "incomplete left bundle branch block"
        )
    return "non-specific intraventricular conduction disturbance" if wide else "normal"


def _rate_category(heart_rate: float) -> str:
    if heart_rate < BRADYCARDIA_BPM:
        return "below 60 bpm"
    return "above 100 bpm" if heart_rate > TACHYCARDIA_BPM else "60 to 100 bpm"


def _round(value: float, digits: int) -> float:
    return float(round(float(value), digits))


def _measure(
    params: ECGParams,
    beat: _Beat,
    clean: np.ndarray,
    fs: float,
    duration: float,
    onsets: np.ndarray,
    is_pvc: np.ndarray,
) -> dict[str, Any]:
    """All labels of one ECG, measured on the beat schedule and the clean signal."""
    r_times = onsets + np.where(is_pvc, beat.pvc_r_time, beat.r_time)
    inside = (r_times >= 0) & (r_times < duration)
    rr = np.diff(r_times)[inside[:-1] | inside[1:]]
    rr_mean = float(rr.mean())
    heart_rate = 60.0 / rr_mean
    rr_cv = float(rr.std() / rr_mean) if len(rr) > 1 else 0.0

    shape = _morphology(clean, fs, beat, onsets[~is_pvc])
    if shape is None:  # no whole normal beat inside: measure one beat alone
        alone = _place_beats(params, beat, np.array([1.0]), np.array([False]), 0.0)
        alone_clean = LEAD_MATRIX @ _render(alone, fs, int(round(3.0 * fs)))
        shape = _morphology(alone_clean, fs, beat, np.array([1.0]))

    sinus = params.rhythm != "af"
    qrs_ms = beat.qrs_end * 1000.0
    pr_ms = None
    if sinus:
        p_onset, _, _ = _extent(beat.p)
        pr_ms = -p_onset * 1000.0
    _, t_end, _ = _extent(beat.t)
    qt_ms = t_end * 1000.0
    qtc_ms = qt_ms / math.sqrt(rr_mean)
    if not sinus:
        rhythm = "atrial fibrillation"
    elif heart_rate < BRADYCARDIA_BPM:
        rhythm = "sinus bradycardia"
    elif heart_rate > TACHYCARDIA_BPM:
        rhythm = "sinus tachycardia"
    else:
        rhythm = "sinus rhythm"

    st, t_amp, ptp = shape["st"], shape["t"], shape["ptp"]
    st_up = _leads_where(st, lambda v: v >= ST_ELEVATION_MV, skip=())
    st_down = _leads_where(st, lambda v: v <= -ST_DEPRESSION_MV)
    t_inverted_all = _leads_where(t_amp, lambda v: v <= -T_INVERSION_MV)
    t_territories = _territories(t_inverted_all)
    t_inverted = [
        lead for lead in t_inverted_all if any(lead in TERRITORIES[z] for z in t_territories)
    ]
    low_voltage = bool((ptp[:6] < LOW_VOLTAGE_MV).all())
    pvc_inside = inside & is_pvc
    r_index = np.round(r_times[inside] * fs).astype(int)
    pvc_index = np.round(r_times[pvc_inside] * fs).astype(int)
    _, pvc_end, _ = _extent(beat.pvc_qrs)
    labels: dict[str, Any] = {
        "rhythm": rhythm,
        "heart_rate": _round(heart_rate, 2),
        "rate_category": _rate_category(heart_rate),
        "rr_mean_ms": _round(rr_mean * 1000.0, 2),
        "rr_cv": _round(rr_cv, 4),
        "p_waves": sinus,
        "pr_ms": None if pr_ms is None else _round(pr_ms, 1),
        "qrs_ms": _round(qrs_ms, 1),
        "wide_qrs": bool(qrs_ms >= WIDE_QRS_MS),
        "qt_ms": _round(qt_ms, 1),
        "qtc_ms": _round(qtc_ms, 1),
        "axis_deg": _round(shape["axis"], 2),
        "axis": _axis_category(shape["axis"]),
        "qrs_morphology": _qrs_category(params.qrs_type, qrs_ms),
        "first_degree_av_block": bool(pr_ms is not None and pr_ms > FIRST_DEGREE_AVB_MS),
        "st_mv": {name: _round(v, 4) for name, v in zip(LEADS, st, strict=True)},
        "st_elevation_leads": st_up,
        "st_depression_leads": st_down,
        "st_elevation_territories": _territories(st_up),
        "st_depression_territories": _territories(st_down),
        "t_mv": {name: _round(v, 4) for name, v in zip(LEADS, t_amp, strict=True)},
        "t_inversion_leads": t_inverted,
        "t_inversion_territories": t_territories,
        "limb_qrs_ptp_mv": {
            name: _round(v, 4) for name, v in zip(LIMB_LEADS, ptp[:6], strict=True)
        },
        "low_voltage": low_voltage,
        "n_pvc": int(pvc_inside.sum()),
        "pvc_qrs_ms": _round(pvc_end * 1000.0, 1) if pvc_inside.any() else None,
        "r_peaks": [int(i) for i in r_index],
        "pvc_peaks": [int(i) for i in pvc_index],
        "beats_measured": shape["beats"],
    }
    labels["normal"] = is_normal(labels)
    return labels


def is_normal(labels: Mapping[str, Any]) -> bool:
    """True when the measured labels show no finding at all."""
    return (
        labels["rhythm"] == "sinus rhythm"
        and not labels["first_degree_av_block"]
        and labels["qrs_morphology"] == "normal"
        and labels["axis"] == "normal heart axis"
        and not labels["low_voltage"]
        and not labels["st_elevation_leads"]
        and not labels["st_depression_leads"]
        and not labels["t_inversion_leads"]
        and labels["n_pvc"] == 0
    )


# ----------------------------------------------------------------------------------------------
# Simulation
# ----------------------------------------------------------------------------------------------


def simulate(
    params: ECGParams,
    fs: float = FS,
    duration: float = 10.0,
    rng: np.random.Generator | int | Sequence[int] | None = None,
    noise: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Simulates one 12-lead ECG and measures its labels.

    Args:
      params: what to simulate.
      fs: sampling rate, Hz.
      duration: length, s (at least 2).
      rng: a generator, or a seed for ``np.random.default_rng`` (beat timing, respiration
        phase, fibrillatory waves and noise all come from it).
      noise: add noise (white, EMG, baseline wander, mains). Without it the result is the
        clean signal the labels are measured on; the beats are identical either way.

    Returns:
      ``(signal, labels)``: float32 ``[12, round(duration * fs)]`` in mV, rows in
      :data:`LEADS` order; and a dict of measured labels: ``rhythm``, ``heart_rate``,
      ``rr_mean_ms``, ``rr_cv``, ``p_waves``, ``pr_ms`` (None in AF), ``qrs_ms``, ``qt_ms``,
      ``qtc_ms`` (Bazett), ``axis_deg``, ``axis``, ``qrs_morphology``,
      ``first_degree_av_block``, ``st_mv`` (per lead, J+60 ms), ``st_elevation_leads``,
      ``st_depression_leads``, ``st_elevation_territories``, ``st_depression_territories``,
      ``t_mv`` (per lead, at the T peak), ``t_inversion_leads``, ``t_inversion_territories``,
      ``limb_qrs_ptp_mv``, ``low_voltage``, ``n_pvc``, ``pvc_qrs_ms``, ``r_peaks`` and
      ``pvc_peaks`` (sample indices), ``beats_measured``, ``normal``.
    """
    if duration < 2.0:
        raise ValueError(f"duration must be at least 2 s, got {duration}")
    if params.rhythm not in ("sinus", "af"):
        raise ValueError(f"rhythm must be 'sinus' or 'af', got {params.rhythm!r}")
    if not 20.0 <= params.heart_rate <= 250.0:
        raise ValueError(f"heart_rate must be within 20..250 bpm, got {params.heart_rate}")
    rng = np.random.default_rng(rng)
    n = int(round(duration * fs))
    beat = _build_beat(params)
    resp_phase = float(rng.uniform(0, 2 * np.pi))
    onsets, is_pvc = _schedule(params, beat, duration, resp_phase, rng)
    xyz = _render(_place_beats(params, beat, onsets, is_pvc, resp_phase), fs, n)
    if params.rhythm == "af":
        xyz += _fibrillatory_waves(params, n, fs, rng)
    independent = DOWER @ xyz  # [8, n]
    clean = derive_leads(independent)
    labels = _measure(params, beat, clean, fs, duration, onsets, is_pvc)
    if noise:
        independent = independent + _noise(params, n, fs, rng)
    return derive_leads(independent).astype(np.float32), labels


# ----------------------------------------------------------------------------------------------
# Reports and SCP codes
# ----------------------------------------------------------------------------------------------

_RHYTHM_PHRASES = {
    "sinus rhythm": (
        "Sinus rhythm at {hr} bpm.",
        "Normal sinus rhythm, rate {hr} bpm.",
        "Sinus rhythm, heart rate {hr}/min.",
    ),
    "sinus bradycardia": (
        "Sinus bradycardia at {hr} bpm.",
        "Sinus bradycardia, rate {hr} bpm.",
        "Slow sinus rhythm (sinus bradycardia), {hr}/min.",
    ),
    "sinus tachycardia": (
        "Sinus tachycardia at {hr} bpm.",
        "Sinus tachycardia, rate {hr} bpm.",
        "Fast sinus rhythm (sinus tachycardia), {hr}/min.",
    ),
    "atrial fibrillation": (
        "Atrial fibrillation with a ventricular rate of about {hr} bpm.",
        "Atrial fibrillation, mean ventricular rate {hr} bpm.",
        "Irregularly irregular rhythm without P waves: atrial fibrillation at {hr}/min.",
    ),
}
_AXIS_PHRASES = {
    "normal heart axis": ("Normal axis.", "Normal QRS axis ({axis} degrees).", "Axis normal."),
    "left axis deviation": (
        "Left axis deviation.",
        "Left axis deviation (QRS axis {axis} degrees).",
        "The QRS axis is deviated to the left ({axis} degrees).",
    ),
    "right axis deviation": (
        "Right axis deviation.",
        "Right axis deviation (QRS axis {axis} degrees).",
        "The QRS axis is deviated to the right ({axis} degrees).",
    ),
    "extreme axis deviation": (
        "Extreme axis deviation.",
        "Extreme axis deviation (QRS axis {axis} degrees).",
        "Northwest QRS axis ({axis} degrees).",
    ),
}
_FINDING_PHRASES = {
    "avb": (
        "First-degree AV block (PR {pr} ms).",
        "Prolonged PR interval of {pr} ms: first-degree AV block.",
        "1st degree AV block, PR {pr} ms.",
    ),
    "qrs": (
        "{Qrs} (QRS {qrs} ms).",
        "{Qrs}, QRS duration {qrs} ms.",
        "{Qrs} with a QRS of {qrs} ms.",
    ),
    "low": (
        "Low QRS voltage in the limb leads.",
        "Low limb-lead voltages.",
        "Low voltage QRS in the limb leads.",
    ),
    "ste": (
        "ST elevation in {leads}.",
        "ST-segment elevation in leads {leads}.",
        "ST elevation: {leads}.",
    ),
    "std": (
        "ST depression in {leads}.",
        "ST-segment depression in leads {leads}.",
        "ST depression: {leads}.",
    ),
    "twi": (
        "T-wave inversion in {leads}.",
        "Inverted T waves in {leads}.",
        "Negative T waves in {leads}.",
    ),
    "pvc": (
        "{n} premature ventricular {complexes}.",
        "Ventricular ectopy: {n} {pvcs}.",
        "{n} ventricular premature {beats}.",
    ),
    "normal": ("Normal ECG.", "Otherwise normal ECG.", "No other abnormality."),
}


def make_report(labels: Mapping[str, Any], rng: np.random.Generator) -> str:
    """A short English report of the measured labels, with seeded phrase variety, e.g.
    "Sinus rhythm at 72 bpm. Left axis deviation. First-degree AV block (PR 240 ms)."."""

    def say(options: Sequence[str], **values: Any) -> str:
        return options[int(rng.integers(len(options)))].format(**values)

    sentences = [say(_RHYTHM_PHRASES[labels["rhythm"]], hr=int(round(labels["heart_rate"])))]
    sentences.append(say(_AXIS_PHRASES[labels["axis"]], axis=int(round(labels["axis_deg"]))))
    if labels["first_degree_av_block"]:
        sentences.append(say(_FINDING_PHRASES["avb"], pr=int(round(labels["pr_ms"]))))
    if labels["qrs_morphology"] != "normal":
        name = labels["qrs_morphology"]
        sentences.append(
            say(
                _FINDING_PHRASES["qrs"],
                Qrs=name[0].upper() + name[1:],
                qrs=int(round(labels["qrs_ms"])),
            )
        )
    if labels["low_voltage"]:
        sentences.append(say(_FINDING_PHRASES["low"]))
    for key, leads in (
        ("ste", labels["st_elevation_leads"]),
        ("std", labels["st_depression_leads"]),
        ("twi", labels["t_inversion_leads"]),
    ):
        if leads:
            sentences.append(say(_FINDING_PHRASES[key], leads=", ".join(leads)))
    n = labels["n_pvc"]
    if n:
        plural = n > 1
        sentences.append(
            say(
                _FINDING_PHRASES["pvc"],
                n=["One", "Two", "Three", "Four", "Five"][n - 1] if n <= 5 else str(n),
                complexes="complexes" if plural else "complex",
                pvcs="PVCs" if plural else "PVC",
                beats="beats" if plural else "beat",
            )
        )
    if labels["normal"]:
        sentences.append(_FINDING_PHRASES["normal"][0])
    elif len(sentences) == 2 and labels["rhythm"] == "sinus rhythm":
        sentences.append(say(_FINDING_PHRASES["normal"][1:]))
    return " ".join(sentences)


def scp_codes(labels: Mapping[str, Any]) -> dict[str, float]:
    """PTB-XL SCP codes for the measured labels (likelihood 100 for diagnostic statements,
    0 for rhythm and form statements, as PTB-XL does)."""
    codes: dict[str, float] = {}
    if labels["normal"]:
        codes["NORM"] = 100.0
    rhythm = {
        "sinus rhythm": "SR",
        "sinus bradycardia": "SBRAD",
        "sinus tachycardia": "STACH",
        "atrial fibrillation": "AFIB",
    }[labels["rhythm"]]
    codes[rhythm] = 0.0
    if labels["first_degree_av_block"]:
        codes["1AVB"] = 100.0
    conduction = {
        "complete right bundle branch block": "CRBBB",
        "complete left bundle branch block": "CLBBB",
        "incomplete right bundle branch block": "IRBBB",
        "incomplete left bundle branch block": "ILBBB",
        "non-specific intraventricular conduction disturbance": "IVCD",
    }.get(labels["qrs_morphology"])
    if conduction:
        codes[conduction] = 100.0
    if labels["low_voltage"]:
        codes["LVOLT"] = 0.0
    if labels["st_elevation_leads"]:
        codes["STE_"] = 0.0
    if labels["st_depression_leads"]:
        codes["STD_"] = 0.0
    if labels["t_inversion_leads"]:
        codes["INVT"] = 0.0
    if labels["n_pvc"]:
        codes["PVC"] = 0.0
    return codes


_HEART_AXIS_CODES = {
    "normal heart axis": "MID",
    "left axis deviation": "LAD",
    "right axis deviation": "RAD",
    "extreme axis deviation": "",
}


# ----------------------------------------------------------------------------------------------
# Question answering (ECG-QA format)
# ----------------------------------------------------------------------------------------------

_FINDINGS: dict[str, tuple[str, Callable[[Mapping[str, Any]], bool]]] = {
    "sinus rhythm": ("rhythm", lambda x: x["rhythm"] == "sinus rhythm"),
    "sinus bradycardia": ("rhythm", lambda x: x["rhythm"] == "sinus bradycardia"),
    "sinus tachycardia": ("rhythm", lambda x: x["rhythm"] == "sinus tachycardia"),
    "atrial fibrillation": ("rhythm", lambda x: x["rhythm"] == "atrial fibrillation"),
    "first degree av block": ("conduction", lambda x: x["first_degree_av_block"]),
    "complete right bundle branch block": (
        "conduction",
        lambda x: x["qrs_morphology"] == "complete right bundle branch block",
    ),
    "complete left bundle branch block": (
        "conduction",
        lambda x: x["qrs_morphology"] == "complete left bundle branch block",
    ),
    "left axis deviation": ("heart_axis", lambda x: x["axis"] == "left axis deviation"),
    "right axis deviation": ("heart_axis", lambda x: x["axis"] == "right axis deviation"),
    "low qrs voltage in the limb leads": ("voltage", lambda x: x["low_voltage"]),
    "ventricular premature complex": ("extra_systole", lambda x: x["n_pvc"] > 0),
    "st elevation": ("st_segment", lambda x: bool(x["st_elevation_territories"])),
    "st depression": ("st_segment", lambda x: bool(x["st_depression_territories"])),
    "inverted t-waves": ("t_wave", lambda x: bool(x["t_inversion_territories"])),
}
_TERRITORY_FINDINGS = {
    "st elevation": ("st_segment", "st_elevation_territories"),
    "st depression": ("st_segment", "st_depression_territories"),
    "inverted t-waves": ("t_wave", "t_inversion_territories"),
}
_LEAD_FINDINGS = {
    "st elevation": ("st_elevation_leads", LEADS),
    "st depression": ("st_depression_leads", tuple(x for x in LEADS if x != "aVR")),
}
# Pairs for single-choose; True where both at once is impossible (answers A / B / none).
_CHOOSE_PAIRS = (
    ("sinus bradycardia", "sinus tachycardia", True),
    ("left axis deviation", "right axis deviation", True),
    ("complete right bundle branch block", "complete left bundle branch block", True),
    ("atrial fibrillation", "sinus rhythm", True),
    ("atrial fibrillation", "first degree av block", True),
    ("first degree av block", "left axis deviation", False),
    ("atrial fibrillation", "low qrs voltage in the limb leads", False),
    ("ventricular premature complex", "complete left bundle branch block", False),
    ("st elevation", "inverted t-waves", False),
    ("right axis deviation", "ventricular premature complex", False),
    ("sinus tachycardia", "st depression", False),
    ("complete right bundle branch block", "first degree av block", False),
    ("low qrs voltage in the limb leads", "st elevation", False),
)
_CHOOSE_LEAD_PAIRS = (
    ("st elevation", "II", "V2"),
    ("st elevation", "III", "I"),
    ("st elevation", "aVF", "V3"),
    ("st elevation", "aVL", "V5"),
    ("st depression", "V5", "II"),
    ("st depression", "I", "V2"),
    ("st depression", "aVL", "III"),
)


@dataclasses.dataclass(frozen=True)
class Question:
    """One distinct question (template x attribute) and how to answer it from labels.

    Attributes:
      template_id, question_id: ids (ours, not ECG-QA's).
      question_type: ``single-verify``, ``single-choose`` or ``single-query``.
      attribute_type: what the question is about.
      text: the template question text.
      paraphrases: other wordings of the same question.
      attribute: ECG-QA ``attribute`` value (list of str or None).
      answers: the answer space; items are balanced over it.
      answer_of: labels -> answer, or None where the ECG cannot be asked this.
    """

    template_id: int
    question_id: int
    question_type: str
    attribute_type: str
    text: str
    paraphrases: tuple[str, ...]
    attribute: list[str] | None
    answers: tuple[str, ...]
    answer_of: Callable[[Mapping[str, Any]], str | None]


def _yes_no(test: Callable[[Mapping[str, Any]], bool]) -> Callable[[Mapping[str, Any]], str]:
    return lambda labels: "yes" if test(labels) else "no"


def _choose(
    a: str, b: str, test_a, test_b, exclusive: bool
) -> Callable[[Mapping[str, Any]], str | None]:
    def answer(labels: Mapping[str, Any]) -> str | None:
        has_a, has_b = bool(test_a(labels)), bool(test_b(labels))
        if has_a and has_b:
            return None if exclusive else "both"
        return a if has_a else b if has_b else "none"

    return answer


def _single_territory(key: str) -> Callable[[Mapping[str, Any]], str | None]:
    def answer(labels: Mapping[str, Any]) -> str | None:
        found = labels[key]
        return None if len(found) > 1 else f"{found[0]} leads" if found else "none"

    return answer


def _pvc_class(labels: Mapping[str, Any]) -> str:
    return ["none", "one"][labels["n_pvc"]] if labels["n_pvc"] < 2 else "two or more"


def question_bank() -> list[Question]:
    """Every distinct question, in a fixed order (question ids follow it)."""
    specs: list[
        tuple
    ] = []  # (template, type, attribute_type, text, paraphrases, attr, answers, fn)
    yes_no = ("yes", "no")
    for name, (kind, test) in _FINDINGS.items():
        specs.append(
            (
                1,
                "single-verify",
                kind,
                f"Does this ECG show {name}?",
                (
                    f"Is {name} present in this ECG?",
                    f"Does the ECG demonstrate {name}?",
                    f"Can {name} be seen on this ECG?",
                    f"Based on this ECG, is there {name}?",
                ),
                [name],
                yes_no,
                _yes_no(test),
            )
        )
    for name, (kind, key) in _TERRITORY_FINDINGS.items():
        for territory in TERRITORIES:
            specs.append(
                (
                    2,
                    "single-verify",
                    kind,
                    f"Does this ECG show {name} in the {territory} leads?",
                    (
                        f"Is there {name} in the {territory} leads of this ECG?",
                        f"Do the {territory} leads of this ECG show {name}?",
                        f"Can {name} be seen in the {territory} leads?",
                    ),
                    [name, f"{territory} leads"],
                    yes_no,
                    _yes_no(lambda x, k=key, z=territory: z in x[k]),
                )
            )
    for name, (key, leads) in _LEAD_FINDINGS.items():
        for lead in leads:
            specs.append(
                (
                    3,
                    "single-verify",
                    "st_segment",
                    f"Does this ECG show {name} in lead {lead}?",
                    (
                        f"Is {name} present in lead {lead}?",
                        f"Does lead {lead} of this ECG show {name}?",
                        f"Can {name} be observed in lead {lead} of this ECG?",
                    ),
                    [name, f"lead {lead}"],
                    yes_no,
                    _yes_no(lambda x, k=key, q=lead: q in x[k]),
                )
            )
    for a, b, exclusive in _CHOOSE_PAIRS:
        answers = (a, b, "none") if exclusive else (a, b, "both", "none")
        kind = _FINDINGS[a][0] if _FINDINGS[a][0] == _FINDINGS[b][0] else "finding"
        specs.append(
            (
                4,
                "single-choose",
                kind,
                f"Which of the following does this ECG show, {a} or {b}?",
                (
                    f"Does this ECG show {a} or {b}?",
                    f"Which finding is present in this ECG: {a} or {b}?",
                    f"Between {a} and {b}, which can be seen on this ECG?",
                ),
                [a, b],
                answers,
                _choose(a, b, _FINDINGS[a][1], _FINDINGS[b][1], exclusive),
            )
        )
    for name, lead_a, lead_b in _CHOOSE_LEAD_PAIRS:
        key = _LEAD_FINDINGS[name][0]
        a, b = f"lead {lead_a}", f"lead {lead_b}"
        specs.append(
            (
                5,
                "single-choose",
                "st_segment",
                f"In which lead does this ECG show {name}, {a} or {b}?",
                (
                    f"Which lead of this ECG shows {name}, {a} or {b}?",
                    f"Is {name} seen in {a} or in {b}?",
                    f"Where does this ECG show {name}: {a} or {b}?",
                ),
                [name, a, b],
                (a, b, "both", "none"),
                _choose(
                    a,
                    b,
                    lambda x, k=key, q=lead_a: q in x[k],
                    lambda x, k=key, q=lead_b: q in x[k],
                    False,
                ),
            )
        )
    specs += [
        (
            6,
            "single-query",
            "rhythm",
            "What is the rhythm of this ECG?",
            (
                "Which rhythm does this ECG show?",
                "What rhythm is seen on this ECG?",
                "Identify the rhythm of this ECG.",
            ),
            None,
            tuple(_RHYTHM_PHRASES),
            lambda x: x["rhythm"],
        ),
        (
            7,
            "single-query",
            "heart_axis",
            "What is the heart axis of this ECG?",
            (
                "Which heart axis does this ECG show?",
                "How is the QRS axis of this ECG?",
                "Identify the heart axis of this ECG.",
            ),
            None,
            ("normal heart axis", "left axis deviation", "right axis deviation"),
            lambda x: x["axis"],
        ),
        (
            8,
            "single-query",
            "conduction",
            "Which bundle branch block does this ECG show?",
            (
                "What bundle branch block is present in this ECG?",
                "Which bundle branch block can be seen on this ECG?",
                "Identify the bundle branch block in this ECG.",
            ),
            None,
            ("none", "complete right bundle branch block", "complete left bundle branch block"),
            lambda x: x["qrs_morphology"].replace("normal", "none"),
        ),
        (
            9,
            "single-query",
            "heart_rate",
            "What is the heart rate of this ECG?",
            (
                "How fast is the heart rate in this ECG?",
                "Which range does the heart rate of this ECG fall in?",
                "What heart rate does this ECG show?",
            ),
            None,
            ("below 60 bpm", "60 to 100 bpm", "above 100 bpm"),
            lambda x: x["rate_category"],
        ),
    ]
    for name, (kind, key) in _TERRITORY_FINDINGS.items():
        specs.append(
            (
                10,
                "single-query",
                kind,
                f"In which leads does this ECG show {name}?",
                (
                    f"Which leads of this ECG show {name}?",
                    f"Where is {name} seen on this ECG?",
                    f"Which territory shows {name} in this ECG?",
                ),
                [name],
                ("none", "inferior leads", "anterior leads", "lateral leads"),
                _single_territory(key),
            )
        )
    specs += [
        (
            11,
            "single-query",
            "extra_systole",
            "How many ventricular premature complexes does this ECG show?",
            (
                "How many premature ventricular beats are in this ECG?",
                "What is the number of ventricular premature complexes in this ECG?",
                "Count the ventricular premature complexes in this ECG.",
            ),
            None,
            ("none", "one", "two or more"),
            _pvc_class,
        ),
        (
            12,
            "single-query",
            "numeric_feature",
            "What is the QRS duration of this ECG?",
            (
                "How long is the QRS complex in this ECG?",
                "Which range does the QRS duration of this ECG fall in?",
                "How wide is the QRS complex of this ECG?",
            ),
            None,
            ("below 120 ms", "120 ms or more"),
            lambda x: "120 ms or more" if x["wide_qrs"] else "below 120 ms",
        ),
    ]
    return [
        Question(tid, qid, qtype, kind, text, paraphrases, attr, answers, fn)
        for qid, (tid, qtype, kind, text, paraphrases, attr, answers, fn) in enumerate(specs, 1)
    ]


def make_qa(
    records: Sequence[Mapping[str, Any]], seed: int = 0, max_per_class: int | None = None
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """ECG-QA-format question/answer items, balanced per question text within each split.

    For every distinct question and split, the same number k of ECGs is drawn for every answer
    in the question's answer space (k = the rarest answer's count, capped by ``max_per_class``;
    a question whose answer space is not fully present in a split is left out there). Items
    come in balanced groups (a yes/no pair, a choose quadruple, ...) that share one paraphrase,
    so also every paraphrased text has a uniform answer distribution: a model that reads only
    the text scores at chance.

    Args:
      records: dicts with ``ecg_id``, ``strat_fold`` and ``labels`` (from :func:`simulate`).
      seed: seeds the draws and the item order.
      max_per_class: at most this many ECGs per answer per question and split.

    Returns:
      ``{"template": {split: items}, "paraphrased": {split: items}}``; the two variants hold
      the same items (same ``sample_id``, answer, ECG) in the same order and differ only in
      the question text. Keys of an item: ``template_id, question_id, sample_id,
      question_type, attribute_type, question, answer, ecg_id, attribute``.
    """
    rng = np.random.default_rng([seed, 4])
    questions = question_bank()
    result: dict[str, dict[str, list[dict[str, Any]]]] = {"template": {}, "paraphrased": {}}
    sample_id = 0
    for split in SPLITS:
        members = [r for r in records if split_of_fold(r["strat_fold"]) == split]
        drawn: list[tuple[Question, str, int, int]] = []
        for question in questions:
            by_answer: dict[str, list[int]] = {answer: [] for answer in question.answers}
            for record in members:
                answer = question.answer_of(record["labels"])
                if answer in by_answer:
                    by_answer[answer].append(int(record["ecg_id"]))
            k = min(len(ids) for ids in by_answer.values())
            k = k if max_per_class is None else min(k, max_per_class)
            if k == 0:
                continue
            picks = {a: rng.permutation(ids)[:k].tolist() for a, ids in by_answer.items()}
            for g in range(k):
                paraphrase = int(rng.integers(len(question.paraphrases)))
                drawn += [(question, a, picks[a][g], paraphrase) for a in question.answers]
        template_items, paraphrased_items = [], []
        for index in rng.permutation(len(drawn)).tolist():
            question, answer, ecg_id, paraphrase = drawn[index]
            item = {
                "template_id": question.template_id,
                "question_id": question.question_id,
                "sample_id": sample_id,
                "question_type": question.question_type,
                "attribute_type": question.attribute_type,
                "question": question.text,
                "answer": [answer],
                "ecg_id": [ecg_id],
                "attribute": None if question.attribute is None else list(question.attribute),
            }
            template_items.append(item)
            paraphrased_items.append({**item, "question": question.paraphrases[paraphrase]})
            sample_id += 1
        result["template"][split] = template_items
        result["paraphrased"][split] = paraphrased_items
    return result


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------

PTBXL_COLUMNS: tuple[str, ...] = (
    "ecg_id",
    "patient_id",
    "age",
    "sex",
    "height",
    "weight",
    "nurse",
    "site",
    "device",
    "recording_date",
    "report",
    "scp_codes",
    "heart_axis",
    "infarction_stadium1",
    "infarction_stadium2",
    "validated_by",
    "second_opinion",
    "initial_autogenerated_report",
    "validated_by_human",
    "baseline_drift",
    "static_noise",
    "burst_noise",
    "electrodes_problems",
    "extra_beats",
    "pacemaker",
    "strat_fold",
    "filename_lr",
    "filename_hr",
)
_FOLD_CYCLE = (10, 9, 1, 2, 3, 4, 5, 6, 7, 8)  # test and valid get a patient first


def record_name(ecg_id: int, low_rate: bool = False) -> str:
    """PTB-XL record path without extension, e.g. ``records500/00000/00001_hr``."""
    folder = f"{ecg_id // 1000 * 1000:05d}"
    if low_rate:
        return f"records100/{folder}/{ecg_id:05d}_lr"
    return f"records500/{folder}/{ecg_id:05d}_hr"


@dataclasses.dataclass(frozen=True)
class _Planned:
    ecg_id: int
    patient: PatientTraits
    fold: int
    recording_date: str
    params: ECGParams
    sim_seed: tuple[int, int, int]


def _plan_corpus(num_ecgs: int, seed: int) -> list[_Planned]:
    """Patients (1-4 ECGs each), their folds, dates and every ECG's parameters."""
    rng = np.random.default_rng([seed, 0])
    visits: list[int] = []  # patient index per ECG
    while len(visits) < num_ecgs:
        count = int(rng.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.2, 0.1]))
        visits += [len(set(visits))] * min(count, num_ecgs - len(visits))
    n_patients = visits[-1] + 1 if visits else 0
    patients = [
        sample_patient(np.random.default_rng([seed, 3, p]), p + 1) for p in range(n_patients)
    ]
    folds = np.empty(n_patients, dtype=int)
    folds[rng.permutation(n_patients)] = np.resize(_FOLD_CYCLE, n_patients)
    order = rng.permutation(num_ecgs)  # interleave patients over ecg_ids
    ordered = sorted(range(num_ecgs), key=lambda i: order[i])
    start = datetime.datetime(1990, 1, 1, 8, 0, 0)
    gaps = rng.uniform(0.2, 2.0, num_ecgs).cumsum()  # days between recordings
    plan = []
    for position, visit in enumerate(ordered):
        ecg_id = position + 1
        patient = patients[visits[visit]]
        when = start + datetime.timedelta(days=float(gaps[position]))
        params = sample_params(np.random.default_rng([seed, 1, ecg_id]), patient)
        plan.append(
            _Planned(
                ecg_id=ecg_id,
                patient=patient,
                fold=int(folds[visits[visit]]),
                recording_date=when.strftime("%Y-%m-%d %H:%M:%S"),
                params=params,
                sim_seed=(seed, 2, ecg_id),
            )
        )
    return plan


ADC_GAIN = 1000.0  # adu per mV in the written records (PTB-XL's resolution, 1 uV)


def write_wfdb(path: str | Path, signal: np.ndarray, fs: int) -> None:
    """Writes ``signal`` (``[12, n]`` mV, :data:`LEADS` order) as a PTB-XL-style WFDB record at
    ``path`` (no extension): format 16, 1000 adu/mV, upper-case lead names.

    The files are byte for byte what ``wfdb.wrsamp(name, fs=fs, units=["mV"] * 12,
    sig_name=WFDB_LEAD_NAMES, p_signal=signal.T, fmt=["16"] * 12, adc_gain=[1000.0] * 12,
    baseline=[0] * 12)`` writes (the tests check this), about 50 times faster: wrsamp spends
    ~20 ms per record validating its header fields, which would dominate the corpus time.
    """
    path = Path(path)
    scaled = np.round(np.asarray(signal, dtype=np.float64) * ADC_GAIN)  # as wfdb's adc()
    if np.abs(scaled).max() > 32767:
        raise ValueError(f"{path}: signal exceeds the 16-bit range (+-32.767 mV)")
    digital = scaled.astype(np.int16)  # [12, n]
    checksums = digital.sum(axis=1, dtype=np.int64) % 65536
    lines = [f"{path.name} {len(digital)} {fs} {digital.shape[1]}"]
    for name, first, checksum in zip(WFDB_LEAD_NAMES, digital[:, 0], checksums, strict=True):
        lines.append(f"{path.name}.dat 16 {ADC_GAIN}(0)/mV 16 0 {first} {checksum} 0 {name}")
    path.with_name(path.name + ".hea").write_text("\n".join(lines) + "\n", encoding="ascii")
    digital.T.astype("<i2").tofile(path.with_name(path.name + ".dat"))


def _write_record(task: tuple[str, int, ECGParams, tuple[int, int, int], float]) -> dict[str, Any]:
    """Simulates one ECG, writes it at 500 and 100 Hz, and returns its labels."""
    out, ecg_id, params, sim_seed, duration = task
    signal, labels = simulate(params, fs=FS, duration=duration, rng=list(sim_seed))
    write_wfdb(Path(out) / record_name(ecg_id), signal, FS)
    low = resample_poly(signal.astype(np.float64), LR_FS, FS, axis=1)
    write_wfdb(Path(out) / record_name(ecg_id, low_rate=True), low, LR_FS)
    return labels


def _database_row(item: _Planned, labels: Mapping[str, Any], report: str) -> dict[str, Any]:
    extra = f"{labels['n_pvc']}VES" if labels["n_pvc"] else ""
    return {
        "ecg_id": item.ecg_id,
        "patient_id": f"{float(item.patient.patient_id):.1f}",
        "age": f"{float(item.patient.age):.1f}",
        "sex": item.patient.sex,
        "height": f"{item.patient.height_cm:.1f}",
        "weight": f"{item.patient.weight_kg:.1f}",
        "nurse": "",
        "site": "",
        "device": "elmjax-synth",
        "recording_date": item.recording_date,
        "report": report,
        "scp_codes": repr(scp_codes(labels)),
        "heart_axis": _HEART_AXIS_CODES[labels["axis"]],
        "infarction_stadium1": "",
        "infarction_stadium2": "",
        "validated_by": "",
        "second_opinion": "False",
        "initial_autogenerated_report": "True",
        "validated_by_human": "False",
        "baseline_drift": "",
        "static_noise": "",
        "burst_noise": "",
        "electrodes_problems": "",
        "extra_beats": extra,
        "pacemaker": "",
        "strat_fold": item.fold,
        "filename_lr": record_name(item.ecg_id, low_rate=True),
        "filename_hr": record_name(item.ecg_id),
    }


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def generate_corpus(
    out: str | Path,
    num_ecgs: int,
    seed: int = 0,
    duration: float = 10.0,
    workers: int = 1,
    progress: bool = True,
    max_per_class: int | None = None,
) -> dict[str, Any]:
    """Writes a PTB-XL-layout synthetic corpus with ECG-QA-format questions.

    Same arguments give byte-identical files, whatever ``workers`` is. Layout under ``out``:
    ``records500/NNNNN/EEEEE_hr.{hea,dat}`` and ``records100/NNNNN/EEEEE_lr.{hea,dat}`` (WFDB
    format 16, 1000 adu/mV, leads ``I II III AVR AVL AVF V1..V6``), ``ptbxl_database.csv``
    (PTB-XL's 28 columns), ``ecgqa/ptbxl/{template,paraphrased}/{train,valid,test}/00000.json``
    and ``synth_labels.jsonl`` (per ECG: ids, fold, split, report, SCP codes, parameters and
    measured labels).

    Args:
      out: output directory (created).
      num_ecgs: number of ECGs; ``ecg_id`` runs from 1.
      seed: the corpus seed.
      duration: seconds per ECG.
      workers: processes for simulating and writing records (1: in this process).
      progress: show a tqdm progress bar.
      max_per_class: passed to :func:`make_qa`.

    Returns:
      A summary: ``out``, ``num_ecgs``, ``num_patients``, ECGs per split, QA items per split.
    """
    if num_ecgs < 1:
        raise ValueError(f"num_ecgs must be at least 1, got {num_ecgs}")
    out = Path(out)
    plan = _plan_corpus(num_ecgs, seed)
    for item in plan:
        for low_rate in (False, True):
            (out / record_name(item.ecg_id, low_rate)).parent.mkdir(parents=True, exist_ok=True)
    tasks = [(str(out), p.ecg_id, p.params, p.sim_seed, float(duration)) for p in plan]
    bar = tqdm(total=num_ecgs, desc="synthetic ECGs", unit="ecg", disable=not progress)
    if workers > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            all_labels = []
            for labels in pool.map(_write_record, tasks, chunksize=8):
                all_labels.append(labels)
                bar.update()
    else:
        all_labels = []
        for task in tasks:
            all_labels.append(_write_record(task))
            bar.update()
    bar.close()

    records, rows = [], []
    for item, labels in zip(plan, all_labels, strict=True):
        report = make_report(labels, np.random.default_rng([seed, 5, item.ecg_id]))
        rows.append(_database_row(item, labels, report))
        records.append(
            {
                "ecg_id": item.ecg_id,
                "patient_id": item.patient.patient_id,
                "strat_fold": item.fold,
                "split": split_of_fold(item.fold),
                "filename_hr": record_name(item.ecg_id),
                "filename_lr": record_name(item.ecg_id, low_rate=True),
                "report": report,
                "scp_codes": scp_codes(labels),
                "sim_seed": list(item.sim_seed),
                "duration": float(duration),
                "patient": dataclasses.asdict(item.patient),
                "params": dataclasses.asdict(item.params),
                "labels": labels,
            }
        )
    with open(out / "ptbxl_database.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=PTBXL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "synth_labels.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(_json_ready(record)) + "\n")
    qa = make_qa(records, seed=seed, max_per_class=max_per_class)
    for variant, splits in qa.items():
        for split, items in splits.items():
            folder = out / "ecgqa" / "ptbxl" / variant / split
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "00000.json", "w", encoding="utf-8") as f:
                json.dump(items, f, indent=4)
                f.write("\n")
    return {
        "out": str(out),
        "num_ecgs": num_ecgs,
        "num_patients": len({r["patient_id"] for r in records}),
        "ecgs_per_split": {s: sum(r["split"] == s for r in records) for s in SPLITS},
        "qa_items_per_split": {s: len(qa["template"][s]) for s in SPLITS},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m elmjax.ecg.synth --out DIR --num-ecgs N --seed S``."""
    parser = argparse.ArgumentParser(
        prog="python -m elmjax.ecg.synth",
        description="Write a synthetic PTB-XL-layout ECG corpus with ECG-QA-format questions.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-ecgs", type=int, default=2000, help="number of ECGs")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per ECG")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--max-per-class", type=int, default=None, help="QA items per answer per question"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    summary = generate_corpus(
        args.out,
        args.num_ecgs,
        seed=args.seed,
        duration=args.duration,
        workers=args.workers,
        progress=not args.no_progress,
        max_per_class=args.max_per_class,
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
