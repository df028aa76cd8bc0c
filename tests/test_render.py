"""Tests for elmjax.ecg.render: 12-lead ECG printouts on ECG paper."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from elmjax.ecg import render

FS = 250.0


def ecg(seconds: float = 10.0, seed: int = 0) -> np.ndarray:
    """A float32 ECG-like signal [12, n] in mV: a narrow R wave and a broad T wave per beat."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * FS)) / FS
    phase = t % 0.85
    beat = np.exp(-0.5 * ((phase - 0.25) / 0.01) ** 2) + 0.3 * np.exp(
        -0.5 * ((phase - 0.5) / 0.045) ** 2
    )
    gains = rng.uniform(0.4, 1.5, size=(12, 1)) * np.where(np.arange(12) == 3, -1, 1)[:, None]
    return (gains * beat).astype(np.float32)


def red_mask(img: np.ndarray) -> np.ndarray:
    """Pixels of the major grid colour (0.9, 0.3, 0.3), allowing for anti-aliasing."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return (r > 0.8) & (g < 0.5) & (b < 0.5) & (np.abs(g - b) < 0.08)


def blue_mask(img: np.ndarray) -> np.ndarray:
    """Pixels of the trace colour (0, 0, 0.7)."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return (b > 0.45) & (r < 0.3) & (g < 0.3)


def test_png_written_with_true_scale_grid_and_trace(tmp_path):
    path = tmp_path / "nested" / "dir" / "ecg.png"
    dpi = 100.0
    fig = render.plot_ecg(ecg(), FS, title="record 42", path=path, dpi=dpi)
    assert path.exists()
    img = imread(path)
    assert img.dtype == np.float32 and img.shape[2] in (3, 4)
    width_px, height_px = fig.canvas.get_width_height()
    assert img.shape[:2] == (height_px, width_px)

    # True scale: 10 s + 0.4 s calibration lead-in at 25 mm/s; 4 rows of 4 mV at 10 mm/mV.
    assert abs(img.shape[1] - 10.4 * 25 / 25.4 * dpi) <= 1
    grid_rows = round(16 * 10 / 25.4 * dpi)
    assert img.shape[0] > grid_rows  # plus the header with the title
    grid = img[-grid_rows:, :, :3]

    red, blue = red_mask(grid), blue_mask(grid)
    assert red.mean() > 0.05, red.mean()
    assert blue.sum() > 5000, blue.sum()
    assert not blue_mask(img[: img.shape[0] - grid_rows - 2, :, :3]).any()  # no trace in header

    # Major vertical lines every 5 mm: columns that are mostly red, spaced 0.2 s apart.
    columns = np.flatnonzero(red.mean(axis=0) > 0.5)
    starts = columns[np.r_[True, np.diff(columns) > 1]]
    spacing = np.diff(starts)
    np.testing.assert_allclose(np.median(spacing), 5 / 25.4 * dpi, atol=1)
    assert len(starts) >= 50  # 10.4 s / 0.2 s
    # Minor grid colour (0.95, 0.85, 0.85) is present between major lines.
    r, g, b = grid[..., 0], grid[..., 1], grid[..., 2]
    minor = (r > 0.9) & (g > 0.78) & (g < 0.92) & (np.abs(g - b) < 0.05)
    assert minor.mean() > 0.05, minor.mean()


def test_labels_title_and_lead_names_in_figure():
    labels = {"rhythm": "sinus bradycardia", "findings": ["LBBB", "first degree AV block"]}
    fig = render.plot_ecg(ecg(), FS, title="synthetic 7", labels=labels)
    texts = [t.get_text() for t in fig.texts]
    assert any("synthetic 7" in t for t in texts)
    joined = "\n".join(texts)
    assert "rhythm: sinus bradycardia" in joined
    assert "findings: LBBB, first degree AV block" in joined
    names = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(names) == sorted(list(render.LEADS) + ["II"])  # 12 panels + rhythm strip

    fig = render.plot_ecg(ecg(), FS, labels=["atrial fibrillation", "ST elevation"])
    assert any("atrial fibrillation; ST elevation" in t.get_text() for t in fig.texts)
    fig = render.plot_ecg(ecg(), FS, labels="normal ECG")
    assert [t.get_text() for t in fig.texts] == ["normal ECG"]
    long_label = " ".join(f"finding{i}" for i in range(60))
    fig = render.plot_ecg(ecg(), FS, labels=long_label)
    (text,) = [t.get_text() for t in fig.texts]
    assert text.count("\n") >= 2 and text.replace("\n", " ") == long_label  # wrapped, all kept


def test_header_grows_with_labels_but_grid_keeps_its_scale():
    plain = render.plot_ecg(ecg(), FS)
    labelled = render.plot_ecg(ecg(), FS, title="t", labels={f"k{i}": "v" for i in range(5)})
    w0, h0 = plain.get_size_inches()
    w1, h1 = labelled.get_size_inches()
    assert w0 == w1 and h1 > h0
    for fig in (plain, labelled):
        bbox = fig.axes[0].get_window_extent()
        assert bbox.height / fig.dpi == pytest.approx(16 * 10 / 25.4)
        assert bbox.width / fig.dpi == pytest.approx(10.4 * 25 / 25.4)


def test_traces_are_the_signal_on_their_baselines():
    x = ecg(seconds=4.0)
    fig = render.plot_ecg(x, FS, center=False, layout="6x2")
    paper = render.layout_panels(12, x.shape[1], FS, "6x2")
    segments = fig.axes[0].collections[-1].get_segments()
    assert len(segments) == 12 + 6 + 6  # panels, then calibration pulses and column marks
    for panel, seg in zip(paper.panels, segments, strict=False):
        np.testing.assert_allclose(seg[:, 1], x[panel.lead] + panel.baseline, atol=1e-6)
        np.testing.assert_allclose(seg[0, 0], panel.x0)
        np.testing.assert_allclose(np.diff(seg[:, 0]), 1 / FS)


def test_layout_3x4_places_quarters_in_time_order():
    n = 2500
    paper = render.layout_panels(12, n, FS, "3x4", rhythm_lead=1)
    assert len(paper.panels) == 13 and paper.height_mv == 16.0
    assert paper.width_s == pytest.approx(0.4 + 10.0)
    for lead, panel in enumerate(paper.panels[:12]):
        column, row = divmod(lead, 3)
        assert (panel.start, panel.stop) == (column * n // 4, (column + 1) * n // 4)
        assert panel.x0 == pytest.approx(0.4 + panel.start / FS)  # time-aligned on the paper
        assert panel.baseline == paper.row_baselines[row]
    rhythm = paper.panels[12]
    assert (rhythm.lead, rhythm.start, rhythm.stop) == (1, 0, n)
    assert rhythm.baseline == paper.row_baselines[3] == 2.0

    no_strip = render.layout_panels(12, n, FS, "3x4", rhythm_lead=None, calibration=False)
    assert len(no_strip.panels) == 12 and no_strip.height_mv == 12.0
    assert no_strip.width_s == pytest.approx(10.0) and no_strip.lead_in_s == 0.0


def test_6x2_layout_size(tmp_path):
    fig = render.plot_ecg(ecg(seconds=5.0), FS, layout="6x2", dpi=100, path=tmp_path / "a.png")
    img = imread(tmp_path / "a.png")
    assert abs(img.shape[1] - (0.4 + 10.0) * 25 / 25.4 * 100) <= 1
    assert abs(img.shape[0] - 6 * 3 * 10 / 25.4 * 100) <= 1  # no header without title/labels
    assert len(fig.axes[0].texts) == 12


def test_500hz_and_nan_gaps_render(tmp_path):
    x = np.repeat(ecg(), 2, axis=1)  # 500 Hz
    x[4, 100:300] = np.nan
    render.plot_ecg(x, 500.0, path=tmp_path / "ecg.png")
    assert imread(tmp_path / "ecg.png").shape[1] == pytest.approx(10.4 * 25 / 25.4 * 120, abs=1)


@pytest.mark.parametrize(
    "shape", [(2500,), (2500, 12), (11, 2500), (2, 12, 2500), (12, 3)], ids=str
)
def test_wrong_shape_raises(shape):
    with pytest.raises(ValueError, match=r"shape \[n_leads, n_samples\]"):
        render.plot_ecg(np.zeros(shape, np.float32), FS)


def test_other_bad_arguments_raise():
    with pytest.raises(ValueError, match="fs"):
        render.plot_ecg(ecg(), 0)
    with pytest.raises(ValueError, match="layout"):
        render.plot_ecg(ecg(), FS, layout="4x3")
    with pytest.raises(ValueError, match="rhythm_lead"):
        render.plot_ecg(ecg(), FS, rhythm_lead="V7")
    with pytest.raises(ValueError, match="labels"):
        render.plot_ecg(ecg(), FS, labels=42)
    # Custom lead names must match the signal's rows.
    with pytest.raises(ValueError, match="shape"):
        render.plot_ecg(ecg(), FS, leads=("I", "II", "III"))
