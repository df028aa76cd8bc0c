"""Shared test fixtures: paths to the real data in ../shared and small WFDB writers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import wfdb

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ELMJAX_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
LEADS_UPPER = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def write_wfdb(
    directory: Path | str,
    name: str,
    signal: np.ndarray,
    names: list[str] | None = None,
    fs: float = 500,
    fmt: str = "16",
    gain: float = 1000.0,
    units: str = "mV",
    comments: list[str] | None = None,
) -> Path:
    """Writes ``signal`` ([n, C] in ``units``) as a WFDB record and returns its base path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = names or LEADS_UPPER[: signal.shape[1]]
    c = signal.shape[1]
    wfdb.wrsamp(
        name,
        fs=fs,
        units=[units] * c,
        sig_name=list(names),
        p_signal=np.asarray(signal, np.float64),
        fmt=[fmt] * c,
        adc_gain=[gain] * c,
        baseline=[0] * c,
        comments=comments or [],
        write_dir=str(directory),
    )
    return directory / name


def ecg_like(n: int = 5000, fs: float = 500, c: int = 12, seed: int = 0) -> np.ndarray:
    """A smooth, ECG-sized test signal [n, c] in mV (distinct per channel)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fs
    phase = rng.uniform(0, 2 * np.pi, size=(1, c))
    beats = np.exp(-0.5 * ((t[:, None] % 0.8 - 0.4) / 0.02) ** 2)
    return 0.8 * beats * rng.uniform(0.5, 1.5, size=(1, c)) + 0.1 * np.sin(
        2 * np.pi * 1.3 * t[:, None] + phase
    )


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"shared test data not found at {SHARED_DATA} (set ELMJAX_SHARED)")
    return SHARED_DATA
