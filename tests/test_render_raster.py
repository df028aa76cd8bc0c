"""Tests for the numpy ECG rasteriser in elmjax.ecg.render (model-input images).

Most checks use the true-scale default of 4 px/mm: 100 px per second (25 mm/s) and 40 px per mV
(10 mm/mV), so expected pixel positions are written out as plain numbers from the documented
mapping ``col = floor(x_s * 100)``, ``row = floor((height_mv - y_mv) * 40)``.
"""

from __future__ import annotations

import numpy as np
import pytest

from elmjax.ecg import render

FS = 250.0
TRACE = (0, 0, 178)  # TRACE_COLOR (0, 0, 0.7) in uint8
MAJOR = (230, 76, 76)  # GRID_MAJOR_COLOR (0.9, 0.3, 0.3)
MINOR = (242, 217, 217)  # GRID_MINOR_COLOR (0.95, 0.85, 0.85)
PLAIN = {"center": False, "calibration": False, "lead_names": False}


def ecg(seconds: float = 5.0, seed: int = 0) -> np.ndarray:
    """A float32 ECG-like signal [12, n] in mV: a narrow R wave and a broad T wave per beat."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * FS)) / FS
    phase = (t + rng.uniform(0, 0.85)) % 0.85
    beat = np.exp(-0.5 * ((phase - 0.25) / 0.01) ** 2) + 0.3 * np.exp(
        -0.5 * ((phase - 0.5) / 0.045) ** 2
    )
    gains = rng.uniform(0.4, 1.2, size=(12, 1)) * np.where(np.arange(12) == 3, -1, 1)[:, None]
    return (gains * beat).astype(np.float32)


def color_mask(img: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Pixels of exactly ``color``."""
    return np.all(img == np.array(color, np.uint8), axis=-1)


def blue(img: np.ndarray) -> np.ndarray:
    return color_mask(img, TRACE)


def pixels(mask: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(*(a.tolist() for a in np.nonzero(mask)), strict=True))


def marks(col: int = 500) -> set[tuple[int, int]]:
    """The +-0.3 mV (+-12 px) marks where the right column's 6x2 panels start."""
    return {(r, col) for b in range(6) for r in range(48 + 120 * b, 73 + 120 * b)}


def test_dtype_shape_and_sizes():
    x = ecg()
    img = render.rasterize(x, fs=FS)
    # 6x2 of 5 s + 0.4 s lead-in = 10.4 s = 260 mm; 6 rows of 3 mV = 180 mm; 4 px/mm.
    assert img.dtype == np.uint8 and img.shape == (720, 1040, 3) and img.flags.c_contiguous
    assert render.rasterize(x, fs=FS, layout="3x4").shape == (640, 540, 3)  # 16 mV; 5.4 s
    assert render.rasterize(x, fs=FS, px_per_mm=2.0).shape == (360, 520, 3)
    assert render.rasterize(x, fs=FS, width=520).shape == (360, 520, 3)  # aspect kept
    assert render.rasterize(x, fs=FS, height=360).shape == (360, 520, 3)
    assert render.rasterize(x, fs=FS, height=224, width=224).shape == (224, 224, 3)
    assert render.rasterize(x, fs=FS, calibration=False).shape == (720, 1000, 3)
    geom = render.raster_geometry(x.shape[1], FS, "6x2", height=224, width=224)
    assert geom.px_per_s == pytest.approx(224 / 10.4) and geom.px_per_mv == pytest.approx(224 / 18)


def test_constant_lands_on_its_rows_and_columns():
    x = np.zeros((12, 1250), np.float32)
    x[7] = 1.0  # V2: right column, second row (baseline 13.5 mV)
    img = render.rasterize(x, fs=FS, grid=False, **PLAIN)  # 1000 x 720, no lead-in
    trace = blue(img)
    # Left column (I..aVF): 0 mV on baselines 16.5, 13.5, ... mV -> rows 60, 180, ..., 660;
    # columns of samples 0..1249: floor(i * 0.4) = 0..499.
    # Right column (V1..V6) from x0 = 5 s: columns 500..999; V2 at 14.5 mV -> row 140.
    expected = {(r, c) for r in (60, 180, 300, 420, 540, 660) for c in range(500)}
    expected |= {(r, c) for r in (60, 300, 420, 540, 660) for c in range(500, 1000)}
    expected |= {(140, c) for c in range(500, 1000)}
    assert pixels(trace) == expected | marks()
    geom = render.raster_geometry(1250, FS, "6x2", calibration=False)
    assert geom.pixel(7, 0.0, 1.0) == (140, 500)
    rows, cols = geom.pixel(7, np.arange(1250) / FS, np.ones(1250))
    assert set(rows.tolist()) == {140} and cols.tolist() == [
        500 + (4 * i) // 10 for i in range(1250)
    ]
    assert geom.pixel(0, 1249 / FS, -1.5) == (120, 499)  # the bottom of lead I's row


def test_step_is_a_continuous_vertical_run():
    x = np.zeros((12, 1250), np.float32)
    x[1, 500:] = 1.2  # lead II: 0 mV, then 1.2 mV from sample 500 (2 s) on
    img = render.rasterize(x, fs=FS, grid=False, **PLAIN)
    trace = blue(img)
    # Lead II baseline 13.5 mV -> row 180; 1.2 mV -> row 132. Sample 499 at column 199.6,
    # sample 500 at column 200: every row 132..180 is inked in column 199 or 200.
    band = trace[132:181, 199:201].any(axis=1)
    assert band.all(), np.flatnonzero(~band)
    assert trace[132, 200:500].all() and trace[180, :200].all()
    assert not trace[133:180, :199].any() and not trace[133:180, 201:500].any()
    assert not trace[61:132, :500].any()  # nothing between the step's top and lead I's row


def test_single_sample_spike_reaches_its_peak_pixel():
    x = np.zeros((12, 1250), np.float32)
    x[10, 600] = 1.5  # V5: right column, fifth row (baseline 4.5 mV -> row 540)
    img = render.rasterize(x, fs=FS, grid=False, **PLAIN)
    trace = blue(img)
    panel = trace[480:600, 500:]
    rows, cols = np.nonzero(panel)
    # The peak: 6 mV -> row 480, sample 600 -> column 500 + 240 = 740.
    assert rows.min() == 0 and set((cols[rows == 0] + 500).tolist()) == {740}
    # Both edges of the spike are unbroken: every row 480..540 is inked next to column 740.
    assert trace[480:541, 739:742].any(axis=1).all()
    assert not trace[421:480, 501:].any()  # nothing above the peak up to V4's baseline row


def test_ramp_places_3x4_quarters_in_time_order():
    n = 1250
    t = np.arange(n) / FS
    x = np.tile(t / 5.0, (12, 1)).astype(np.float64)  # 0 -> ~1 mV over 5 s in every lead
    img = render.rasterize(x, fs=FS, layout="3x4", grid=False, **PLAIN)
    assert img.shape == (640, 500, 3)  # 5 s (no lead-in) x 16 mV (3 rows + rhythm strip)
    geom = render.raster_geometry(n, FS, "3x4", calibration=False)
    trace = blue(img)
    for index, panel in enumerate(geom.paper.panels):
        i = np.arange(panel.start, panel.stop)
        rows, cols = geom.pixel(index, i / FS, x[panel.lead, i])
        assert trace[rows, cols].all(), index
        # The same mapping written out: x = i / 250 s -> column floor(i * 0.4); the quarter
        # columns of a lead are next to each other in time, not stacked at the left.
        np.testing.assert_array_equal(cols, (i * 2) // 5)
        expected_rows = np.floor((16 - (panel.baseline + i / FS / 5.0)) * 40 + 1e-6)
        np.testing.assert_array_equal(rows, expected_rows)
    # Leads I, aVR, V1, V4 share the top row (baseline 14 mV -> row 80) in time order.
    assert [p.lead for p in geom.paper.panels if p.baseline == 14.0] == [0, 3, 6, 9]
    aVR = geom.paper.panels[3]
    assert (aVR.start, geom.pixel(3, aVR.start / FS, 0.0)) == (312, (80, 124))  # 1.248 s
    assert trace[80, 0] and trace[70, 124]  # 0.2496 mV at 1.248 s -> row 70.016
    # The rhythm strip (lead II, baseline 2 mV -> row 560) spans the whole width.
    assert trace[520:561].any(axis=0).all()


def test_grid_lines_at_the_exact_pitch():
    x = np.full((12, 1250), np.nan)  # nothing but the paper (and the panel marks)
    img = render.rasterize(x, fs=FS, lead_names=False, calibration=False)  # 1000 x 720
    major, minor = color_mask(img, MAJOR), color_mask(img, MINOR)
    major_cols = np.flatnonzero((major | blue(img)).mean(axis=0) > 0.9)  # marks: column 500
    major_rows = np.flatnonzero(major.mean(axis=1) > 0.9)
    # Every 5 mm = 20 px, plus the right/bottom paper edges at the last pixel.
    assert major_cols.tolist() == [*range(0, 1000, 20), 999]
    assert major_rows.tolist() == [*range(0, 720, 20), 719]
    # Minor lines every 1 mm = 4 px in between.
    assert np.flatnonzero(minor.mean(axis=0) > 0.9).tolist() == [
        c for c in range(0, 1000, 4) if c % 20
    ]
    assert np.flatnonzero(minor.mean(axis=1) > 0.9).tolist() == [
        r for r in range(0, 720, 4) if r % 20
    ]
    assert pixels(blue(img)) == {
        (r, 500) for b in range(6) for r in range(48 + 120 * b, 73 + 120 * b)
    }
    # At 3 px/mm the major pitch is 15 px; at 224 x 224 the minor grid is left out.
    small = render.rasterize(x, fs=FS, px_per_mm=3.0, lead_names=False, calibration=False)
    small_major = color_mask(small, MAJOR) | blue(small)  # the marks: column 375
    assert np.flatnonzero(small_major.mean(axis=0) > 0.9).tolist() == [
        *range(0, 750, 15),
        749,
    ]
    tiny = render.rasterize(x, fs=FS, height=224, width=224)
    assert not color_mask(tiny, MINOR).any() and color_mask(tiny, MAJOR).any()
    assert color_mask(
        render.rasterize(x, fs=FS, height=224, width=224, minor_grid=True), MINOR
    ).any()
    bare = render.rasterize(x, fs=FS, grid=False, **PLAIN)
    assert (bare[~blue(bare)] == 255).all()


def test_calibration_pulse_and_panel_marks():
    x = np.full((12, 1250), np.nan)
    img = render.rasterize(x, fs=FS, lead_names=False, grid=False)
    trace = blue(img)
    # Row 1 (baseline 16.5 mV -> row 60): 0.1 s at 0 mV, 0.2 s at 1 mV (row 20), 0.1 s at 0.
    # Columns: 0 -> 10 -> 30 -> 40 (the lead-in box ends before column 40).
    lead_in = trace[:120, :40]
    expected = {(60, c) for c in range(11)} | {(r, 10) for r in range(20, 61)}
    expected |= {(20, c) for c in range(10, 31)} | {(r, 30) for r in range(20, 61)}
    expected |= {(60, c) for c in range(30, 40)}
    assert pixels(lead_in) == expected
    assert trace[:, 10].sum() == 6 * 41  # one pulse per row
    # The right column's panels start at 5.4 s (column 540) with a +-0.3 mV mark (+-12 px).
    assert pixels(trace[:120]) - expected == {(r, 540) for r in range(48, 73)}


def test_nan_and_inf_make_gaps():
    x = np.zeros((12, 1250), np.float32)
    x[0, :] = 0.5
    x[0, 400:600] = np.nan
    x[6, 100:105] = np.inf
    img = render.rasterize(x, fs=FS, grid=False, **PLAIN)
    row = blue(img)[40]  # lead I at 0.5 mV: 16.5 + 0.5 -> row 40
    # Sample 399 (column 159) is the last drawn before the gap, sample 600 (column 240) the
    # first after it; the segments touching a NaN are left out.
    assert row[:160].all() and not row[160:240].any() and row[240:500].all()
    v1 = blue(img)[60, 500:]  # V1 at 0 mV: samples 99 (column 39.6) and 105 (column 42) are
    assert v1[:40].all() and not v1[40:42].any() and v1[42:].all()  # the ends of the gap


def test_clip_keeps_traces_in_their_panels():
    x = np.full((12, 1250), np.nan)
    x[1] = 0.0
    x[1, 300:310] = 5.0  # 5 mV in lead II: above its 3 mV row (and above the paper)
    x[1, 700] = 1e9  # far off the paper: clipped cheaply, no blow-up
    clipped = blue(render.rasterize(x, fs=FS, grid=False, **PLAIN))[:, :500]
    loose = blue(render.rasterize(x, fs=FS, grid=False, clip=False, **PLAIN))[:, :500]
    # Lead II's box is rows 120..239 (15..12 mV); its 0 mV line is row 180.
    assert not clipped[:120].any() and not clipped[240:].any()
    for col in (119, 279):  # rising edges at samples 299-300 (column 119.6 -> 120) and 699-700
        assert clipped[120:181, col : col + 2].any(axis=1).all()  # unbroken up to the box top
        assert loose[0:181, col : col + 2].any(axis=1).all()  # up to the image top
    assert clipped[180, :119].all() and clipped[180, 125:279].all()


def test_line_width():
    x = np.zeros((12, 1250), np.float32)
    for width, rows in ((1, [60]), (2, [59, 60]), (3, [59, 60, 61]), (4, [58, 59, 60, 61])):
        img = render.rasterize(x, fs=FS, grid=False, line_width=width, **PLAIN)
        inked = np.flatnonzero(blue(img)[:, 250])
        assert inked.tolist()[: len(rows)] == rows, width


def test_lead_names_bitmap():
    x = np.zeros((12, 1250), np.float32)
    img = render.rasterize(x, fs=FS, grid=False, center=False, calibration=False)
    black = color_mask(img, (0, 0, 0))
    geom = render.raster_geometry(1250, FS, "6x2", calibration=False)
    for p in geom.paper.panels:
        name = render.LEADS[p.lead]
        ink = sum(row.count("#") for char in name for row in render.GLYPHS[char])
        # Bottom glyph row just above (x0 + 0.06 s, baseline + 0.6 mV); 7 rows; 6 px per char.
        bottom = round((18 - p.baseline - 0.6) * 40) - 1
        left = round((p.x0 + 0.06) * 100)
        region = black[bottom - 6 : bottom + 1, left : left + 6 * len(name)]
        assert region.sum() == ink == black[bottom - 20 : bottom + 20, left - 5 : left + 60].sum()
    assert black.sum() == sum(
        row.count("#") for name in render.LEADS for char in name for row in render.GLYPHS[char]
    )
    big = render.rasterize(x, fs=FS, font_scale=2, **PLAIN | {"lead_names": True})
    assert color_mask(big, (0, 0, 0)).sum() == 4 * black.sum()
    assert not color_mask(render.rasterize(x, fs=FS, **PLAIN), (0, 0, 0)).any()


def test_batch_equals_per_item():
    xs = np.stack([ecg(seed=s) for s in range(5)])
    xs[2, 4, 100:300] = np.nan
    for layout in ("6x2", "3x4"):
        batch = render.rasterize_batch(xs, fs=FS, layout=layout, chunk=2, line_width=2)
        assert batch.shape == (5, *render.rasterize(xs[0], fs=FS, layout=layout).shape)
        for i, x in enumerate(xs):
            np.testing.assert_array_equal(
                batch[i], render.rasterize(x, fs=FS, layout=layout, line_width=2)
            )
    assert render.rasterize_batch(xs[:0], fs=FS).shape == (0, 720, 1040, 3)
    # Integer input works like float input.
    ints = np.round(xs[:2] * 4).astype(np.int16)
    np.testing.assert_array_equal(
        render.rasterize_batch(ints, fs=FS), render.rasterize_batch(ints.astype(float), fs=FS)
    )


def test_centering_puts_each_panel_median_on_its_baseline():
    x = np.zeros((12, 1250), np.float32) + 0.7  # a DC offset, removed by centring
    x[:, ::5] += 2.0  # spikes do not move the median
    img = render.rasterize(x, fs=FS, grid=False, calibration=False, lead_names=False)
    trace = blue(img)
    for row in (60, 180, 300, 420, 540, 660):
        assert trace[row].mean() > 0.5


@pytest.mark.parametrize("layout", ["6x2", "3x4"])
def test_similar_to_the_matplotlib_path(layout):
    x = ecg(seconds=5.0, seed=3)
    kwargs = {"fs": FS, "layout": layout, "line_width": 2, "center": True}
    fast = render.rasterize(x, clip=False, **kwargs)
    slow = render.rasterize_matplotlib(x, **kwargs)
    assert fast.shape == slow.shape
    r, g, b = (slow[..., i].astype(int) for i in range(3))
    slow_trace = (b - r > 60) & (b - g > 60)  # anti-aliased blue
    fast_trace = blue(fast)

    def dilate(mask: np.ndarray) -> np.ndarray:
        out = mask.copy()
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                out |= np.roll(np.roll(mask, dr, axis=0), dc, axis=1)
        return out

    def overlap(a: np.ndarray, b: np.ndarray) -> float:
        return float((a & dilate(b)).sum() / a.sum())

    # Every trace pixel of one is within a pixel of the other's (measured: 0.999 both ways).
    assert overlap(fast_trace, slow_trace) > 0.97
    assert overlap(slow_trace, fast_trace) > 0.97
    assert 0.8 < fast_trace.sum() / slow_trace.sum() < 1.25
    # The check has teeth: the same image 2 px off (in rows or columns) scores below 0.9.
    assert overlap(np.roll(fast_trace, 2, axis=0), slow_trace) < 0.9
    assert overlap(np.roll(fast_trace, 3, axis=1), slow_trace) < 0.9
    # Major grid lines of the matplotlib image sit on the rasteriser's (within a pixel).
    fast_major = np.flatnonzero(color_mask(fast, MAJOR).mean(axis=0) > 0.5)
    slow_red = ((r > 200) & (g < 150) & (b < 150)).mean(axis=0) > 0.5
    assert len(fast_major) > 20
    assert all(slow_red[max(c - 1, 0) : c + 2].any() for c in fast_major)
    near = np.zeros_like(slow_red)
    for d in (-1, 0, 1):
        near[np.clip(fast_major + d, 0, near.size - 1)] = True
    assert not (slow_red & ~near).any()  # and no red column elsewhere


@pytest.mark.parametrize(
    "shape", [(1250,), (1250, 12), (11, 1250), (2, 12, 1250), (12, 1)], ids=str
)
def test_wrong_shape_raises(shape):
    with pytest.raises(ValueError, match=r"signal must have shape \[n_leads, n_samples\]"):
        render.rasterize(np.zeros(shape, np.float32), fs=FS)


@pytest.mark.parametrize("shape", [(12, 1250), (3, 11, 1250), (3, 12, 1)], ids=str)
def test_wrong_batch_shape_raises(shape):
    with pytest.raises(ValueError, match=r"signals must have shape \[batch, n_leads, n_samples\]"):
        render.rasterize_batch(np.zeros(shape, np.float32), fs=FS)


def test_other_bad_arguments_raise():
    x = ecg()
    cases = [
        ({"fs": 0}, "fs must be a positive"),
        ({"fs": FS, "layout": "4x3"}, "layout must be one of"),
        ({"fs": FS, "rhythm_lead": "V7"}, "rhythm_lead 'V7'"),
        ({"fs": FS, "line_width": 0}, "line_width"),
        ({"fs": FS, "line_width": 1.5}, "line_width"),
        ({"fs": FS, "height": 0}, "height must be a positive"),
        ({"fs": FS, "width": 100.0}, "width must be a positive"),
        ({"fs": FS, "px_per_mm": -1.0}, "px_per_mm"),
        ({"fs": FS, "font_scale": 0}, "font_scale"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            render.rasterize(x, **kwargs)
    names = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "X6")
    with pytest.raises(ValueError, match=r"'X6' has characters \['X'\].*lead_names=False"):
        render.rasterize(x, fs=FS, leads=names, rhythm_lead=None)
    assert render.rasterize(x, fs=FS, leads=names, rhythm_lead=None, lead_names=False).ndim == 3
    with pytest.raises(ValueError, match="real numeric"):
        render.rasterize_batch(x[None].astype(complex), fs=FS)
    with pytest.raises(ValueError, match="chunk"):
        render.rasterize_batch(x[None], fs=FS, chunk=0)
