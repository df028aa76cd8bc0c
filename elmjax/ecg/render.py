"""Plotting 12-lead ECGs on ECG paper for people to read.

:func:`plot_ecg` draws a standard printout: the red grid of ECG paper (1 mm minor squares, 5 mm
major squares), the traces in dark blue at 25 mm/s and 10 mm/mV, a 1 mV calibration pulse at the
start of each row, lead names, and a header with a title and labels (for example the
ground-truth findings of a synthetic ECG). Two layouts:

* ``"3x4"`` (default): the clinical sheet. Three rows of four columns, each column showing a
  quarter of the record in time order (I, II, III | aVR, aVL, aVF | V1, V2, V3 | V4, V5, V6),
  plus a full-length lead II rhythm strip at the bottom.
* ``"6x2"``: six rows and two columns, each panel showing the whole record, as in the
  reference framework's ``ecg_plot``-based images (I..aVF on the left, V1..V6 on the right).

The building blocks (:func:`layout_panels`, :func:`draw_grid`, :func:`draw_traces`,
:func:`draw_lead_names`) work on any matplotlib Axes whose data units are seconds (x) and
millivolts (y), so other renderers (such as model-input images) can reuse them with their own
figure size.

Figures are plain :class:`matplotlib.figure.Figure` objects drawn with the Agg canvas; they are
not registered with pyplot, so nothing global changes and nothing needs closing.

Model-input images
------------------
:func:`rasterize` (one ECG) and :func:`rasterize_batch` (``[N, 12, L]`` -> ``[N, H, W, 3]``)
draw the same sheet as the grid area of :func:`plot_ecg` straight into a uint8 RGB array, about
40-70 times faster than matplotlib (``benchmarks/render.py``); default layout ``"6x2"``, as in
the reference framework's images. Panel placement comes from :func:`layout_panels`, so both
paths put every panel in the same place. The background (paper, 1 mm / 5 mm grid, calibration
pulses, panel marks and the lead names in a 5 x 7 bitmap font, :data:`GLYPHS`) is built once per
geometry and copied; the traces are line segments between consecutive samples, drawn by one
small numba kernel (:func:`_draw_polylines`: clipping to the panel, a one-pixel-step DDA so that
steep QRS edges are unbroken, a square-to-round brush of ``line_width`` pixels); NaN samples
leave a gap. The pixel geometry is exact and documented in :class:`RasterGeometry`
(:func:`raster_geometry`, :meth:`RasterGeometry.pixel` maps (panel, time, mV) to (row, col)).
:func:`rasterize_matplotlib` renders the same sheet with matplotlib at the same pixel size: the
reference for visual checks and the benchmark's baseline.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numba
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from elmjax.ecg.io import CANONICAL_LEADS as LEADS

GRID_MAJOR_COLOR = (0.9, 0.3, 0.3)
GRID_MINOR_COLOR = (0.95, 0.85, 0.85)
TRACE_COLOR = (0.0, 0.0, 0.7)
PAPER_COLOR = (1.0, 1.0, 1.0)

MM_PER_S = 25.0  # paper speed
MM_PER_MV = 10.0  # gain
MM_PER_INCH = 25.4
MINOR_S, MAJOR_S = 0.04, 0.2  # 1 mm and 5 mm along time
MINOR_MV, MAJOR_MV = 0.1, 0.5  # 1 mm and 5 mm along voltage

LAYOUTS: tuple[str, ...] = ("3x4", "6x2")
CALIBRATION_S = 0.4  # lead-in before each row that holds the 1 mV calibration pulse


@dataclasses.dataclass(frozen=True)
class Panel:
    """One stretch of one lead placed on the paper.

    Attributes:
      lead: row of the signal array to draw.
      start: first sample drawn.
      stop: one past the last sample drawn.
      x0: paper position of sample ``start``, in seconds from the left edge.
      baseline: paper position of 0 mV, in mV from the bottom edge.
    """

    lead: int
    start: int
    stop: int
    x0: float
    baseline: float


@dataclasses.dataclass(frozen=True)
class PaperLayout:
    """Where every panel goes and how large the paper is.

    Attributes:
      panels: the panels, top row first.
      width_s: paper width in seconds (at 25 mm/s).
      height_mv: paper height in millivolts (at 10 mm/mV).
      row_baselines: the 0 mV line of every row, top row first.
      lead_in_s: width of the calibration lead-in at the left of every row (0 for none).
    """

    panels: tuple[Panel, ...]
    width_s: float
    height_mv: float
    row_baselines: tuple[float, ...]
    lead_in_s: float


def layout_panels(
    n_leads: int,
    n_samples: int,
    fs: float,
    layout: str = "3x4",
    *,
    rhythm_lead: int | None = 1,
    row_mv: float | None = None,
    calibration: bool = True,
) -> PaperLayout:
    """Places the leads of an ECG on the paper.

    Args:
      n_leads: number of leads (rows of the signal).
      n_samples: samples per lead.
      fs: sample rate in Hz.
      layout: ``"3x4"`` (columns of a quarter of the record each, leads in order down the
        columns, plus a rhythm strip) or ``"6x2"`` (two columns, each panel the whole record).
      rhythm_lead: signal row drawn as a full-length strip under a ``"3x4"`` layout, or None.
      row_mv: height of each row in mV; defaults to 4 mV for ``"3x4"``, 3 mV for ``"6x2"``.
      calibration: leave a lead-in at the left of each row for a calibration pulse.

    Returns:
      The :class:`PaperLayout`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if n_leads < 1 or n_samples < 1 or not fs > 0:
        raise ValueError(f"need n_leads, n_samples, fs > 0, got {n_leads}, {n_samples}, {fs}")
    lead_in = CALIBRATION_S if calibration else 0.0
    duration = n_samples / fs
    if layout == "3x4":
        columns, row_mv = 4, 4.0 if row_mv is None else row_mv
        rows = math.ceil(n_leads / columns)
        bounds = [round(c * n_samples / columns) for c in range(columns + 1)]
        n_rows = rows + (rhythm_lead is not None)
        height = n_rows * row_mv
        baselines = [height - (r + 0.5) * row_mv for r in range(n_rows)]
        panels = []
        for lead in range(n_leads):
            c, r = divmod(lead, rows)
            start, stop = bounds[c], bounds[c + 1]
            panels.append(Panel(lead, start, stop, lead_in + start / fs, baselines[r]))
        if rhythm_lead is not None:
            panels.append(Panel(rhythm_lead, 0, n_samples, lead_in, baselines[-1]))
        width = lead_in + duration
    else:
        columns, row_mv = 2, 3.0 if row_mv is None else row_mv
        rows = math.ceil(n_leads / columns)
        height = rows * row_mv
        baselines = [height - (r + 0.5) * row_mv for r in range(rows)]
        panels = []
        for lead in range(n_leads):
            c, r = divmod(lead, rows)
            panels.append(Panel(lead, 0, n_samples, lead_in + c * duration, baselines[r]))
        width = lead_in + columns * duration
    return PaperLayout(
        panels=tuple(panels),
        width_s=width,
        height_mv=height,
        row_baselines=tuple(baselines),
        lead_in_s=lead_in,
    )


def draw_grid(ax: Axes, width_s: float, height_mv: float, *, linewidth: float = 0.5) -> None:
    """Draws ECG-paper grid lines on ``ax`` over [0, width_s] x [0, height_mv] and sets limits.

    Minor lines every 0.04 s / 0.1 mV in :data:`GRID_MINOR_COLOR`, major lines every 0.2 s /
    0.5 mV in :data:`GRID_MAJOR_COLOR` drawn on top, ``linewidth`` in points (major lines are
    drawn 1.6 times as thick). The Axes' own frame and ticks are switched off.
    """
    xs = np.arange(int(math.floor(width_s / MINOR_S + 1e-9)) + 1) * MINOR_S
    ys = np.arange(int(math.floor(height_mv / MINOR_MV + 1e-9)) + 1) * MINOR_MV
    x_major = np.arange(len(xs)) % round(MAJOR_S / MINOR_S) == 0
    y_major = np.arange(len(ys)) % round(MAJOR_MV / MINOR_MV) == 0

    def segments(x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
        vertical = [np.array([[v, 0.0], [v, height_mv]]) for v in x]
        horizontal = [np.array([[0.0, v], [width_s, v]]) for v in y]
        return vertical + horizontal

    for is_major, color, width, z in (
        (False, GRID_MINOR_COLOR, linewidth, 0),
        (True, GRID_MAJOR_COLOR, 1.6 * linewidth, 1),
    ):
        lines = LineCollection(
            segments(xs[x_major == is_major], ys[y_major == is_major]),
            colors=[color],
            linewidths=width,
            zorder=z,
        )
        ax.add_collection(lines)
    ax.set_xlim(0.0, width_s)
    ax.set_ylim(0.0, height_mv)
    ax.set_axis_off()


def draw_traces(
    ax: Axes,
    signal: np.ndarray,
    fs: float,
    paper: PaperLayout,
    *,
    linewidth: float = 0.8,
    color: tuple[float, float, float] = TRACE_COLOR,
    center: bool = True,
) -> None:
    """Draws every panel of ``paper`` (plus calibration pulses and column marks) as one collection.

    Args:
      ax: Axes in seconds (x) and millivolts (y), e.g. prepared by :func:`draw_grid`.
      signal: ECG ``[n_leads, n_samples]`` in mV.
      fs: sample rate in Hz.
      paper: from :func:`layout_panels`.
      linewidth: trace width in points.
      color: trace colour.
      center: shift each panel by its median so that it sits on its row's baseline (removes
        DC offsets; wander within the panel stays visible).
    """
    lines = []
    for p in paper.panels:
        y = signal[p.lead, p.start : p.stop].astype(np.float64)
        if y.size == 0:
            continue
        if center and np.isfinite(y).any():
            y = y - np.nanmedian(y)
        t = p.x0 + np.arange(y.size) / fs
        lines.append(np.column_stack([t, y + p.baseline]))
    if paper.lead_in_s > 0:  # 1 mV x 0.2 s calibration pulse centred in the lead-in
        a = (paper.lead_in_s - 0.2) / 2
        b = a + 0.2
        for base in paper.row_baselines:
            lines.append(
                np.array(
                    [[0.0, base], [a, base], [a, base + 1], [b, base + 1], [b, base], [b + a, base]]
                )
            )
    for p in paper.panels:  # short mark where a panel starts after another in its row
        if p.x0 > paper.lead_in_s + 1e-9:
            lines.append(np.array([[p.x0, p.baseline - 0.3], [p.x0, p.baseline + 0.3]]))
    ax.add_collection(
        LineCollection(
            lines,
            colors=[color],
            linewidths=linewidth,
            capstyle="round",
            joinstyle="round",
            zorder=2,
        )
    )


def draw_lead_names(
    ax: Axes, paper: PaperLayout, names: Sequence[str], *, fontsize: float = 9.0
) -> None:
    """Prints each panel's lead name at its top left, above the trace's baseline."""
    for p in paper.panels:
        ax.text(
            p.x0 + 0.06,
            p.baseline + 0.6,
            names[p.lead],
            fontsize=fontsize,
            fontweight="bold",
            color="black",
            ha="left",
            va="bottom",
            zorder=3,
        )


def format_labels(labels: Mapping[str, Any] | Sequence[Any] | str | None) -> list[str]:
    """Turns labels into display lines: ``"key: value"`` per dict entry, else one ``;`` list.

    Dict values that are lists or tuples are joined with ``", "``.
    """
    if labels is None:
        return []
    if isinstance(labels, str):
        return [labels] if labels else []
    if isinstance(labels, Mapping):
        lines = []
        for key, value in labels.items():
            if isinstance(value, list | tuple):
                value = ", ".join(str(v) for v in value)
            lines.append(f"{key}: {value}")
        return lines
    if isinstance(labels, Sequence):
        return ["; ".join(str(item) for item in labels)] if labels else []
    raise ValueError(f"labels must be a dict, a list, a string or None, got {type(labels)}")


def plot_ecg(
    signal: Any,
    fs: float,
    *,
    title: str | None = None,
    labels: Mapping[str, Any] | Sequence[Any] | str | None = None,
    path: str | Path | None = None,
    leads: Sequence[str] = LEADS,
    layout: str = "3x4",
    rhythm_lead: str | None = "II",
    dpi: float = 120.0,
    center: bool = True,
) -> Figure:
    """Plots a 12-lead ECG as a clinical printout on red ECG paper.

    The paper is at true scale (25 mm/s, 10 mm/mV): the grid's part of the figure is
    ``width_s * 25 / 25.4`` inches wide and ``height_mv * 10 / 25.4`` inches tall, with 5 mm major
    squares. A header above the grid holds the title (bold) and the labels in a box.

    Args:
      signal: ECG ``[len(leads), n_samples]`` in mV.
      fs: sample rate in Hz.
      title: heading, e.g. the record id.
      labels: text shown under the title: a dict (one ``key: value`` line each, e.g. the
        ground-truth findings of a synthetic ECG), a list (joined with ``;``) or a string.
      path: if given, the figure is saved there as a PNG (parent folders are created).
      leads: names of the signal's rows, in order.
      layout: ``"3x4"`` (clinical sheet with rhythm strip) or ``"6x2"`` (whole record per panel).
      rhythm_lead: lead name for the ``"3x4"`` rhythm strip, or None for no strip (``"6x2"``
        has none).
      dpi: resolution of the figure and of the saved PNG.
      center: shift each panel by its median so that it sits on its baseline.

    Returns:
      The matplotlib Figure (with an Agg canvas; not registered with pyplot).

    Raises:
      ValueError: for a signal that is not ``[len(leads), n]`` with n >= 4, a bad ``fs``,
        layout, rhythm lead or labels type.
    """
    signal = np.asarray(signal, dtype=np.float64)
    leads = tuple(leads)
    if signal.ndim != 2 or signal.shape[0] != len(leads) or signal.shape[1] < 4:
        raise ValueError(
            f"signal must have shape [n_leads, n_samples] = [{len(leads)}, n] with n >= 4 "
            f"(one row per lead in {leads}), got shape {signal.shape}"
        )
    if not (
        isinstance(fs, int | float | np.integer | np.floating) and math.isfinite(fs) and fs > 0
    ):
        raise ValueError(f"fs must be a positive number of Hz, got {fs!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if rhythm_lead is not None and rhythm_lead not in leads:
        raise ValueError(f"rhythm_lead {rhythm_lead!r} is not one of the leads {leads}")
    label_lines = format_labels(labels)

    paper = layout_panels(
        len(leads),
        signal.shape[1],
        float(fs),
        layout,
        rhythm_lead=None if rhythm_lead is None else leads.index(rhythm_lead),
    )
    width_in = paper.width_s * MM_PER_S / MM_PER_INCH
    grid_in = paper.height_mv * MM_PER_MV / MM_PER_INCH

    # Header: title line and wrapped label lines, sized in inches from the font sizes.
    title_pt, label_pt, pad_in = 13.0, 9.5, 0.12
    chars_per_line = max(20, int(width_in * 72 / (0.55 * label_pt)) - 4)
    wrapped = [w for line in label_lines for w in textwrap.wrap(line, chars_per_line) or [""]]
    title_in = 1.5 * title_pt / 72 if title else 0.0
    labels_in = (len(wrapped) * 1.35 * label_pt / 72 + 2 * pad_in) if wrapped else 0.0
    header_in = title_in + labels_in + (2 * pad_in if title or wrapped else 0.0)
    height_in = grid_in + header_in

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor=PAPER_COLOR)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, grid_in / height_in))
    draw_grid(ax, paper.width_s, paper.height_mv)
    draw_traces(ax, signal, fs, paper, center=center)
    draw_lead_names(ax, paper, leads)

    top = height_in - pad_in
    if title:
        fig.text(
            pad_in / width_in,
            top / height_in,
            title,
            fontsize=title_pt,
            fontweight="bold",
            ha="left",
            va="top",
        )
        top -= title_in
    if wrapped:
        fig.text(
            (pad_in + 0.05) / width_in,
            (top - pad_in) / height_in,
            "\n".join(wrapped),
            fontsize=label_pt,
            ha="left",
            va="top",
            linespacing=1.35,
            bbox={"boxstyle": "round,pad=0.4", "facecolor": (0.97, 0.97, 0.97), "edgecolor": "0.6"},
        )
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=dpi, facecolor=PAPER_COLOR)
    return fig


# --------------------------------------------------------------------------------------------
# Fast rasteriser for model-input images (numpy, no matplotlib in the hot path).

# Pixel coordinates are rounded down after adding this, so that float noise (e.g. float32 mV
# values such as 1.2 -> 1.2000000477) cannot move a point that sits on a pixel edge.
RASTER_EPS = 1e-3
MIN_GRID_PITCH_PX = 3.0  # the automatic minor grid is drawn only if its squares are this large
LABEL_CAP_MM = 2.3  # cap height of the lead names (about 9 pt, as in draw_lead_names)

# 5 x 7 bitmap glyphs for the lead names ("#" = ink), one string per glyph row, top row first.
GLYPHS: dict[str, tuple[str, ...]] = {
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "a": (".....", ".....", ".###.", "....#", ".####", "#...#", ".####"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
}
GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7


def _rgb8(color: tuple[float, float, float]) -> np.ndarray:
    """A matplotlib-style float RGB colour as uint8 [3]."""
    return np.array([round(255 * c) for c in color], dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class RasterGeometry:
    """Exact pixel geometry of a rasterised ECG sheet.

    The paper ``[0, width_s] x [0, height_mv]`` of :attr:`paper` fills the whole image: paper
    point ``(x seconds, y mV)`` has the continuous pixel coordinates

    * column ``u = x * px_per_s`` with ``px_per_s = width / paper.width_s``,
    * row ``v = (paper.height_mv - y) * px_per_mv`` with ``px_per_mv = height / paper.height_mv``,

    and lies in pixel ``(row, col) = (floor(v + RASTER_EPS), floor(u + RASTER_EPS))`` (the top
    left pixel is ``(0, 0)``). Grid lines follow the same rule at every multiple of 1 mm (0.04 s,
    0.1 mV), one pixel wide; the lines on the right and bottom paper edges, which would fall
    just outside, are drawn in column ``W - 1`` and row ``H - 1``.
    Sample ``i`` of a panel is at record time ``t = i / fs`` and paper ``x = panel.x0 +
    t - panel.start / fs``; a value of ``mv`` millivolts (after centring, if any) is at paper
    ``y = panel.baseline + mv``. :meth:`pixel` does this mapping.

    A stroke of ``line_width`` ``w`` pixels centred at ``(v, u)`` covers rows
    ``floor(v - (w - 1) / 2 + RASTER_EPS)`` to that ``+ w - 1`` and the same for columns (corners
    of the square brush are dropped from ``w >= 4`` on, making it round).

    Attributes:
      paper: panel placement from :func:`layout_panels`.
      fs: sample rate in Hz.
      height: image height in pixels.
      width: image width in pixels.
    """

    paper: PaperLayout
    fs: float
    height: int
    width: int

    @property
    def px_per_s(self) -> float:
        """Pixels per second along the time axis (``px_per_s / 25`` pixels per mm)."""
        return self.width / self.paper.width_s

    @property
    def px_per_mv(self) -> float:
        """Pixels per millivolt along the voltage axis (``px_per_mv / 10`` pixels per mm)."""
        return self.height / self.paper.height_mv

    @property
    def row_mv(self) -> float:
        """Height of one row of panels in mV."""
        return self.paper.height_mv / len(self.paper.row_baselines)

    def col_coord(self, x_s: Any) -> np.ndarray:
        """Continuous column coordinate ``u`` of paper position ``x_s`` (seconds)."""
        return np.asarray(x_s, dtype=np.float64) * self.px_per_s

    def row_coord(self, y_mv: Any) -> np.ndarray:
        """Continuous row coordinate ``v`` of paper position ``y_mv`` (mV from the bottom)."""
        return (self.paper.height_mv - np.asarray(y_mv, dtype=np.float64)) * self.px_per_mv

    def pixel(self, panel: int, t: Any, mv: Any) -> tuple[np.ndarray, np.ndarray]:
        """Pixel ``(row, col)`` where panel ``panel`` draws record time ``t`` s at ``mv`` mV.

        Args:
          panel: index into ``paper.panels`` (for ``"6x2"`` the lead; for ``"3x4"`` the lead,
            and 12 for the rhythm strip).
          t: time in the record in seconds (sample ``i`` is at ``i / fs``), scalar or array.
          mv: value as drawn (after centring if the render centres), scalar or array.

        Returns:
          Integer arrays ``(row, col)`` of the centre pixel of a 1-pixel stroke (not clipped to
          the image: a point off the paper gives indices outside ``[0, H) x [0, W)``).
        """
        p = self.paper.panels[panel]
        x = p.x0 + (np.asarray(t, dtype=np.float64) * self.fs - p.start) / self.fs
        u = self.col_coord(x)
        v = self.row_coord(p.baseline + np.asarray(mv, dtype=np.float64))
        return (
            np.floor(v + RASTER_EPS).astype(np.int64),
            np.floor(u + RASTER_EPS).astype(np.int64),
        )

    def panel_box(self, panel: int) -> tuple[int, int, int, int]:
        """Half-open pixel box ``(row0, row1, col0, col1)`` that a panel's trace is clipped to.

        The panel's paper box is ``[x0, x0 + (stop - start) / fs] x [baseline - row_mv / 2,
        baseline + row_mv / 2]``; a pixel belongs to it if its centre ``(r + 0.5, c + 0.5)`` lies
        inside (half-open), so the boxes of neighbouring panels tile without overlap.
        """
        p = self.paper.panels[panel]
        right = p.x0 + (p.stop - p.start) / self.fs
        return self._box(p.x0, right, p.baseline - self.row_mv / 2, p.baseline + self.row_mv / 2)

    def _box(self, left: float, right: float, bottom: float, top: float) -> tuple[int, ...]:
        """Half-open pixel box of the pixels whose centres lie in a paper rectangle."""
        r0 = math.ceil(float(self.row_coord(top)) - 0.5 - RASTER_EPS)
        r1 = math.ceil(float(self.row_coord(bottom)) - 0.5 - RASTER_EPS)
        c0 = math.ceil(float(self.col_coord(left)) - 0.5 - RASTER_EPS)
        c1 = math.ceil(float(self.col_coord(right)) - 0.5 - RASTER_EPS)
        return (max(r0, 0), min(r1, self.height), max(c0, 0), min(c1, self.width))


def raster_geometry(
    n_samples: int,
    fs: float,
    layout: str = "6x2",
    *,
    n_leads: int = 12,
    height: int | None = None,
    width: int | None = None,
    px_per_mm: float = 4.0,
    rhythm_lead: int | None = 1,
    calibration: bool = True,
) -> RasterGeometry:
    """The pixel geometry :func:`rasterize` uses (panel placement from :func:`layout_panels`).

    Image size: with neither ``height`` nor ``width``, the paper at true scale with
    ``px_per_mm`` pixels per mm (rounded to whole pixels); with one of them, the other follows
    the paper's aspect ratio; with both, the paper is stretched to fill exactly that size (e.g.
    224 x 224 for a vision tower), so the grid squares need not be square.

    Args:
      n_samples: samples per lead.
      fs: sample rate in Hz.
      layout: ``"6x2"`` or ``"3x4"`` (see :func:`layout_panels`).
      n_leads: number of leads.
      height: image height in pixels, or None.
      width: image width in pixels, or None.
      px_per_mm: scale when neither size is given (4 px/mm is about 100 dpi).
      rhythm_lead: signal row of the ``"3x4"`` rhythm strip, or None for none.
      calibration: leave the lead-in for the calibration pulse at the left of every row.

    Raises:
      ValueError: for a bad layout, size or scale.
    """
    paper = layout_panels(
        n_leads, n_samples, fs, layout, rhythm_lead=rhythm_lead, calibration=calibration
    )
    for name, value in (("height", height), ("width", width)):
        if value is not None and (
            not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(f"{name} must be a positive number of pixels or None, got {value!r}")
    if not (isinstance(px_per_mm, int | float) and math.isfinite(px_per_mm) and px_per_mm > 0):
        raise ValueError(f"px_per_mm must be a positive number, got {px_per_mm!r}")
    width_mm = paper.width_s * MM_PER_S
    height_mm = paper.height_mv * MM_PER_MV
    if height is None and width is None:
        width, height = round(width_mm * px_per_mm), round(height_mm * px_per_mm)
    elif height is None:
        height = round(width * height_mm / width_mm)
    elif width is None:
        width = round(height * width_mm / height_mm)
    return RasterGeometry(
        paper=paper, fs=float(fs), height=max(int(height), 1), width=max(int(width), 1)
    )


def _brush(line_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column offsets of a ``line_width``-pixel brush, relative to its top left pixel."""
    k = np.arange(line_width)
    dr, dc = (a.ravel() for a in np.meshgrid(k, k, indexing="ij"))
    centre = (line_width - 1) / 2
    keep = (dr - centre) ** 2 + (dc - centre) ** 2 <= (line_width / 2) ** 2 + 1e-9
    return dr[keep].astype(np.int64), dc[keep].astype(np.int64)


@numba.njit(cache=True, nogil=True)
def _draw_polylines(
    out: np.ndarray,  # [N, H, W, 3] uint8, drawn into
    u: np.ndarray,  # [S] column coordinate of every point (shared by the N images)
    v: np.ndarray,  # [N, S] row coordinate of every point (NaN: not drawn)
    seg: np.ndarray,  # [G] index of each segment's first point; its second is seg + 1
    last: np.ndarray,  # [G] bool: the segment is the last of its polyline
    boxes: np.ndarray,  # [G, 4] half-open clip box (row0, row1, col0, col1) of each segment
    dr: np.ndarray,  # [B] brush row offsets
    dc: np.ndarray,  # [B] brush column offsets
    line_width: int,
    color: np.ndarray,  # [3] uint8
) -> None:
    """Draws line segments between consecutive points into ``out`` (the hot loop).

    Per image and segment ``(u0, v0) -> (u1, v1)``: skipped if an end is not finite (a gap);
    clipped (Liang-Barsky) to its box grown by ``line_width + 1`` pixels (so that a point far
    off the paper costs nothing); then sampled at ``n = ceil(max(|du|, |dv|))`` equal steps of at
    most one pixel, a DDA whose pixels are 8-connected (a steep QRS edge is an unbroken vertical
    run). A segment's end point is the next segment's start, so it is stamped only where the
    next segment is not drawn. Each point ``(v, u)`` stamps the brush at top left pixel
    ``(floor(v - (w - 1) / 2 + eps), floor(u - (w - 1) / 2 + eps))``; pixels outside the box are
    left alone.
    """
    offset = (line_width - 1) / 2 - RASTER_EPS
    grow = line_width + 1.0
    n_images, n_segments = v.shape[0], seg.shape[0]
    for i in range(n_images):
        for g in range(n_segments):
            a = seg[g]
            u0, v0, u1, v1 = u[a], v[i, a], u[a + 1], v[i, a + 1]
            if not (np.isfinite(v0) and np.isfinite(v1) and np.isfinite(u0) and np.isfinite(u1)):
                continue
            r0, r1, c0, c1 = boxes[g, 0], boxes[g, 1], boxes[g, 2], boxes[g, 3]
            du, dv = u1 - u0, v1 - v0
            t0, t1 = 0.0, 1.0
            visible = True
            for side in range(4):
                if side == 0:
                    p, q = -du, u0 - (c0 - grow)
                elif side == 1:
                    p, q = du, (c1 + grow) - u0
                elif side == 2:
                    p, q = -dv, v0 - (r0 - grow)
                else:
                    p, q = dv, (r1 + grow) - v0
                if p == 0.0:
                    if q < 0.0:
                        visible = False
                elif p < 0.0:
                    t0 = max(t0, q / p)
                else:
                    t1 = min(t1, q / p)
            if not visible or t0 > t1:
                continue
            au, av = u0 + t0 * du, v0 + t0 * dv
            su, sv = (t1 - t0) * du, (t1 - t0) * dv
            n = int(math.ceil(max(abs(su), abs(sv))))
            count = n
            if last[g] or not np.isfinite(v[i, a + 2]):
                count += 1  # the next segment does not start here: stamp the end point too
            for k in range(count):
                f = k / max(n, 1)
                r = int(math.floor(av + f * sv - offset))
                c = int(math.floor(au + f * su - offset))
                for b in range(dr.shape[0]):
                    rr, cc = r + dr[b], c + dc[b]
                    if r0 <= rr < r1 and c0 <= cc < c1:
                        out[i, rr, cc, 0] = color[0]
                        out[i, rr, cc, 1] = color[1]
                        out[i, rr, cc, 2] = color[2]


@dataclasses.dataclass(frozen=True, eq=False)
class _TracePlan:
    """Per-geometry index arrays for drawing the panels (computed once per geometry, cached).

    The panels' samples are gathered, panel after panel, into one ``[N, S]`` array by
    ``x.reshape(N, -1)[:, flat]``.
    """

    flat: np.ndarray  # [S] index of each drawn sample in a flattened [n_leads * n_samples] ECG
    u: np.ndarray  # [S] column coordinate
    v_base: np.ndarray  # [S] row coordinate of the panel's 0 mV line
    seg: np.ndarray  # [G] index (into S) of each segment's first point
    last: np.ndarray  # [G] bool: the segment is its panel's last
    boxes: np.ndarray  # [G, 4] clip box of each segment's panel (row0, row1, col0, col1)
    panel_slices: tuple[tuple[int, int], ...]  # [start, stop) of each panel in S


def _polyline_arrays(
    points: Sequence[np.ndarray], boxes: Sequence[tuple[int, ...]]
) -> tuple[np.ndarray, ...]:
    """Concatenates polylines ([k, 2] each) into the kernel's point/segment arrays.

    Returns ``(points [S, 2], seg [G], last [G], boxes [G, 4], slices)``.
    """
    seg, last, box, slices = [], [], [], []
    offset = 0
    for line, b in zip(points, boxes, strict=True):
        g = len(line) - 1
        seg.append(offset + np.arange(g))
        flag = np.zeros(g, bool)
        flag[-1:] = True
        last.append(flag)
        box.append(np.tile(np.asarray(b, np.int64), (g, 1)))
        slices.append((offset, offset + len(line)))
        offset += len(line)
    return (
        np.concatenate(points),
        np.concatenate(seg).astype(np.int64),
        np.concatenate(last),
        np.concatenate(box).reshape(-1, 4),
        tuple(slices),
    )


@functools.lru_cache(maxsize=16)
def _trace_plan(geom: RasterGeometry, clip: bool) -> _TracePlan:
    """Index arrays that gather a batch's panels into one [N, S] array and segment it."""
    leads, samples, points, boxes = [], [], [], []
    whole = (0, geom.height, 0, geom.width)
    n_samples = max(p.stop for p in geom.paper.panels)  # the record length
    for index, p in enumerate(geom.paper.panels):
        idx = np.arange(p.start, p.stop)
        leads.append(np.full(idx.size, p.lead))
        samples.append(idx)
        points.append(
            np.column_stack([p.x0 + (idx - p.start) / geom.fs, np.full(idx.size, p.baseline)])
        )
        boxes.append(geom.panel_box(index) if clip else whole)
    joined, seg, last, box, slices = _polyline_arrays(points, boxes)
    plan = _TracePlan(
        flat=np.concatenate(leads) * n_samples + np.concatenate(samples),
        u=geom.col_coord(joined[:, 0]),
        v_base=geom.row_coord(joined[:, 1]),
        seg=seg,
        last=last,
        boxes=box,
        panel_slices=slices,
    )
    return plan  # cached: callers must not modify its arrays


def _label_pixels(
    geom: RasterGeometry, names: Sequence[str], scale: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of the lead names in the bitmap font, placed like :func:`draw_lead_names`.

    Each name's bottom left is at paper ``(x0 + 0.06 s, baseline + 0.6 mV)``: its bottom glyph
    row is the pixel row just above that point and its first column the point's column; glyphs
    are ``5 x 7`` cells of ``scale x scale`` pixels with one empty cell column between them.
    """
    rows, cols = [], []
    for p in geom.paper.panels:
        name = names[p.lead]
        bottom = int(np.floor(geom.row_coord(p.baseline + 0.6) + RASTER_EPS)) - 1
        left = int(np.floor(geom.col_coord(p.x0 + 0.06) + RASTER_EPS))
        top = bottom - GLYPH_HEIGHT * scale + 1
        for i, char in enumerate(name):
            glyph = np.array([[c == "#" for c in row] for row in GLYPHS[char]])
            gr, gc = np.nonzero(np.kron(glyph, np.ones((scale, scale), bool)))
            rows.append(top + gr)
            cols.append(left + i * (GLYPH_WIDTH + 1) * scale + gc)
    rows_a = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    cols_a = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    keep = (rows_a >= 0) & (rows_a < geom.height) & (cols_a >= 0) & (cols_a < geom.width)
    return rows_a[keep], cols_a[keep]


def _grid_positions(geom: RasterGeometry) -> dict[str, np.ndarray]:
    """Pixel columns/rows of the minor and major grid lines (lines at multiples of 1 mm)."""
    paper = geom.paper
    xs = np.arange(int(math.floor(paper.width_s / MINOR_S + 1e-9)) + 1)
    ys = np.arange(int(math.floor(paper.height_mv / MINOR_MV + 1e-9)) + 1)
    cols = np.floor(geom.col_coord(xs * MINOR_S) + RASTER_EPS).astype(np.int64)
    rows = np.floor(geom.row_coord(ys * MINOR_MV) + RASTER_EPS).astype(np.int64)
    cols, rows = np.clip(cols, 0, geom.width - 1), np.clip(rows, 0, geom.height - 1)
    step = round(MAJOR_S / MINOR_S)
    return {
        "minor_cols": cols[xs % step != 0],
        "minor_rows": rows[ys % step != 0],
        "major_cols": cols[xs % step == 0],
        "major_rows": rows[ys % step == 0],
    }


@functools.lru_cache(maxsize=16)
def _background(
    geom: RasterGeometry,
    names: tuple[str, ...] | None,
    font_scale: int,
    calibration: bool,
    grid: bool,
    minor_grid: bool,
    line_width: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The image without traces ([H, W, 3] uint8: paper, grid, calibration pulses, panel marks,
    lead names) and the flat pixel indices of the lead names (redrawn over the traces).
    Cached per geometry and style; both arrays are read-only."""
    img = np.empty((1, geom.height, geom.width, 3), np.uint8)
    img[:] = _rgb8(PAPER_COLOR)
    if grid:
        g = _grid_positions(geom)
        if minor_grid:
            img[0][:, g["minor_cols"]] = _rgb8(GRID_MINOR_COLOR)
            img[0][g["minor_rows"], :] = _rgb8(GRID_MINOR_COLOR)
        img[0][:, g["major_cols"]] = _rgb8(GRID_MAJOR_COLOR)
        img[0][g["major_rows"], :] = _rgb8(GRID_MAJOR_COLOR)
    paper = geom.paper
    lines, boxes = [], []
    if calibration and paper.lead_in_s > 0:  # the same pulse as draw_traces
        a = (paper.lead_in_s - 0.2) / 2
        b = a + 0.2
        half = geom.row_mv / 2
        for base in paper.row_baselines:
            pulse = [[0.0, base], [a, base], [a, base + 1], [b, base + 1], [b, base], [b + a, base]]
            lines.append(np.array(pulse))
            boxes.append(geom._box(0.0, paper.lead_in_s, base - half, base + half))
    for p in paper.panels:  # short mark where a panel starts after another in its row
        if p.x0 > paper.lead_in_s + 1e-9:
            lines.append(np.array([[p.x0, p.baseline - 0.3], [p.x0, p.baseline + 0.3]]))
            boxes.append((0, geom.height, 0, geom.width))
    if lines:
        points, seg, last, box, _ = _polyline_arrays(lines, boxes)
        dr, dc = _brush(line_width)
        u = geom.col_coord(points[:, 0])
        v = geom.row_coord(points[:, 1])[None]
        _draw_polylines(img, u, v, seg, last, box, dr, dc, line_width, _rgb8(TRACE_COLOR))
    label_flat = np.zeros(0, np.int64)
    if names is not None:
        rows, cols = _label_pixels(geom, names, font_scale)
        img[0, rows, cols] = 0
        label_flat = rows * geom.width + cols
    img.flags.writeable = False
    label_flat.flags.writeable = False
    return img[0], label_flat


def _check_signal(signal: Any, leads: tuple[str, ...]) -> np.ndarray:
    """``signal`` as an array, or ValueError unless it is ``[len(leads), n]`` with n >= 2."""
    signal = np.asarray(signal)
    if signal.ndim != 2 or signal.shape[0] != len(leads) or signal.shape[1] < 2:
        raise ValueError(
            f"signal must have shape [n_leads, n_samples] = [{len(leads)}, n] with n >= 2 "
            f"(one row per lead in {leads}), got shape {signal.shape}"
        )
    return signal


def _check_rasterize_args(
    signals: np.ndarray,
    fs: Any,
    layout: str,
    leads: tuple[str, ...],
    rhythm_lead: str | None,
    line_width: Any,
    lead_names: bool,
    font_scale: Any,
    chunk: Any,
) -> None:
    """Raises ValueError naming the first bad argument of :func:`rasterize_batch`."""
    if signals.ndim != 3 or signals.shape[1] != len(leads) or signals.shape[2] < 2:
        raise ValueError(
            f"signals must have shape [batch, n_leads, n_samples] = [N, {len(leads)}, n] with "
            f"n >= 2 (one row per lead in {leads}), got shape {signals.shape}"
        )
    if not (
        isinstance(fs, int | float | np.integer | np.floating) and math.isfinite(fs) and fs > 0
    ):
        raise ValueError(f"fs must be a positive number of Hz, got {fs!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if rhythm_lead is not None and rhythm_lead not in leads:
        raise ValueError(f"rhythm_lead {rhythm_lead!r} is not one of the leads {leads}")
    if not isinstance(line_width, int | np.integer) or isinstance(line_width, bool):
        raise ValueError(f"line_width must be a whole number of pixels >= 1, got {line_width!r}")
    if line_width < 1:
        raise ValueError(f"line_width must be a whole number of pixels >= 1, got {line_width!r}")
    if font_scale is not None and (not isinstance(font_scale, int | np.integer) or font_scale < 1):
        raise ValueError(f"font_scale must be a whole number >= 1 or None, got {font_scale!r}")
    if not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"chunk must be a whole number >= 1, got {chunk!r}")
    if lead_names:
        for name in leads:
            missing = sorted(set(name) - set(GLYPHS))
            if missing:
                raise ValueError(
                    f"lead name {name!r} has characters {missing} that the bitmap font lacks "
                    f"(it has {''.join(GLYPHS)}); pass lead_names=False"
                )


def _center_panels(x: np.ndarray, panel_slices: Sequence[tuple[int, int]]) -> None:
    """Subtracts each panel's median (NaN-aware) in place from gathered samples ``x [N, S]``.

    Consecutive panels of equal length are one reshaped view and one median call (all twelve of
    ``"6x2"``; the quarters of ``"3x4"``).
    """
    runs: list[list[int]] = []  # [start, panel length, panel count]
    for start, stop in panel_slices:
        if (
            runs
            and runs[-1][1] == stop - start
            and runs[-1][0] + runs[-1][1] * runs[-1][2] == start
        ):
            runs[-1][2] += 1
        else:
            runs.append([start, stop - start, 1])
    for start, length, count in runs:
        part = x[:, start : start + length * count].reshape(x.shape[0], count, length)  # a view
        if np.isnan(part).any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN panels
                med = np.nanmedian(part, axis=2, keepdims=True)
            part -= np.nan_to_num(med)
        else:
            part -= np.median(part, axis=2, keepdims=True)


def rasterize_batch(
    signals: Any,
    *,
    fs: float,
    layout: str = "6x2",
    height: int | None = None,
    width: int | None = None,
    px_per_mm: float = 4.0,
    line_width: int = 1,
    leads: Sequence[str] = LEADS,
    rhythm_lead: str | None = "II",
    calibration: bool = True,
    lead_names: bool = True,
    font_scale: int | None = None,
    grid: bool = True,
    minor_grid: bool | None = None,
    center: bool = True,
    clip: bool = True,
    chunk: int = 64,
) -> np.ndarray:
    """Renders a batch of ECGs as ECG-paper images, vectorised (see :func:`rasterize`).

    Args:
      signals: ECGs ``[N, len(leads), n_samples]`` in mV (any real numeric array; NaN/inf =
        gap).
      chunk: ECGs drawn per vectorised step (bounds the temporary memory).
      Others: as :func:`rasterize`.

    Returns:
      uint8 ``[N, H, W, 3]``; item ``i`` equals ``rasterize(signals[i], ...)``.
    """
    signals = np.asarray(signals)
    if signals.dtype.kind not in "biuf":
        raise ValueError(f"signals must be a real numeric array, got dtype {signals.dtype}")
    leads = tuple(leads)
    _check_rasterize_args(
        signals, fs, layout, leads, rhythm_lead, line_width, lead_names, font_scale, chunk
    )
    geom = raster_geometry(
        signals.shape[2],
        float(fs),
        layout,
        n_leads=len(leads),
        height=height,
        width=width,
        px_per_mm=px_per_mm,
        rhythm_lead=None if rhythm_lead is None else leads.index(rhythm_lead),
        calibration=calibration,
    )
    if minor_grid is None:
        pitch = min(geom.px_per_s * MINOR_S, geom.px_per_mv * MINOR_MV)
        minor_grid = pitch >= MIN_GRID_PITCH_PX
    if font_scale is None:
        font_scale = max(1, round(LABEL_CAP_MM * geom.px_per_mv / MM_PER_MV / GLYPH_HEIGHT))
    background, label_flat = _background(
        geom,
        leads if lead_names else None,
        int(font_scale),
        bool(calibration),
        bool(grid),
        bool(minor_grid),
        int(line_width),
    )
    plan = _trace_plan(geom, bool(clip))
    dr, dc = _brush(int(line_width))
    trace = _rgb8(TRACE_COLOR)
    n, n_leads, n_samples = signals.shape
    out = np.empty((n, geom.height, geom.width, 3), np.uint8)
    out[:] = background
    for lo in range(0, n, int(chunk)):
        part = signals[lo : lo + chunk].reshape(-1, n_leads * n_samples)
        x = np.take(part, plan.flat, axis=1).astype(np.float64, copy=False)  # [c, S] mV
        x[~np.isfinite(x)] = np.nan
        if center:
            _center_panels(x, plan.panel_slices)
        v = np.ascontiguousarray(plan.v_base - x * geom.px_per_mv)  # [c, S] row coordinates
        _draw_polylines(
            out[lo : lo + chunk],
            plan.u,
            v,
            plan.seg,
            plan.last,
            plan.boxes,
            dr,
            dc,
            int(line_width),
            trace,
        )
    if label_flat.size:  # lead names stay on top of the traces, as in draw_lead_names
        out.reshape(n, geom.height * geom.width, 3)[:, label_flat] = 0
    return out


def rasterize(
    signal: Any,
    *,
    fs: float,
    layout: str = "6x2",
    height: int | None = None,
    width: int | None = None,
    px_per_mm: float = 4.0,
    line_width: int = 1,
    leads: Sequence[str] = LEADS,
    rhythm_lead: str | None = "II",
    calibration: bool = True,
    lead_names: bool = True,
    font_scale: int | None = None,
    grid: bool = True,
    minor_grid: bool | None = None,
    center: bool = True,
    clip: bool = True,
) -> np.ndarray:
    """Renders one ECG as an ECG-paper image with numpy (fast; for model inputs).

    The picture is that of :func:`plot_ecg`'s grid area (same panel placement from
    :func:`layout_panels`, same colours, calibration pulse and panel marks), drawn straight
    into a pixel array: the red grid (1 mm minor lines in :data:`GRID_MINOR_COLOR`, 5 mm major
    lines in :data:`GRID_MAJOR_COLOR`, one pixel wide, at 25 mm/s and 10 mm/mV), the traces in
    :data:`TRACE_COLOR` as line segments between consecutive samples, and the lead names in a
    5 x 7 bitmap font. The pixel geometry is exact and documented in :class:`RasterGeometry`
    (:func:`raster_geometry` gives it for the same arguments).

    Args:
      signal: ECG ``[len(leads), n_samples]`` in mV. NaN or infinite samples are not drawn
        (a gap: no segment touching them).
      fs: sample rate in Hz.
      layout: ``"6x2"`` (default; the reference framework's model-input images: I..aVF left,
        V1..V6 right, each panel the whole record) or ``"3x4"`` (clinical sheet plus rhythm
        strip).
      height: image height in pixels (see :func:`raster_geometry` for the defaults).
      width: image width in pixels.
      px_per_mm: scale when neither size is given.
      line_width: trace width in pixels (also of the calibration pulses and panel marks).
      leads: names of the signal's rows, in order.
      rhythm_lead: lead name of the ``"3x4"`` rhythm strip, or None.
      calibration: draw a 1 mV x 0.2 s calibration pulse in a 0.4 s lead-in on every row.
      lead_names: print the lead names (characters of :data:`GLYPHS` only).
      font_scale: pixels per font cell; default ``round(2.3 mm / 7 cells)``, at least 1.
      grid: draw the paper grid.
      minor_grid: draw the 1 mm lines; default only if they are at least
        :data:`MIN_GRID_PITCH_PX` pixels apart (at small sizes they would fill the paper).
      center: shift each panel by its median, as :func:`draw_traces` does.
      clip: clip each trace to its panel's box (:meth:`RasterGeometry.panel_box`); else only
        to the image.

    Returns:
      uint8 ``[H, W, 3]`` RGB image.

    Raises:
      ValueError: for a signal that is not ``[len(leads), n]`` with n >= 2, or a bad ``fs``,
        layout, rhythm lead, size, line width or lead name.
    """
    signal = _check_signal(signal, tuple(leads))
    return rasterize_batch(
        signal[None],
        fs=fs,
        layout=layout,
        height=height,
        width=width,
        px_per_mm=px_per_mm,
        line_width=line_width,
        leads=leads,
        rhythm_lead=rhythm_lead,
        calibration=calibration,
        lead_names=lead_names,
        font_scale=font_scale,
        grid=grid,
        minor_grid=minor_grid,
        center=center,
        clip=clip,
    )[0]


def rasterize_matplotlib(
    signal: Any,
    *,
    fs: float,
    layout: str = "6x2",
    height: int | None = None,
    width: int | None = None,
    px_per_mm: float = 4.0,
    line_width: float = 1.0,
    leads: Sequence[str] = LEADS,
    rhythm_lead: str | None = "II",
    calibration: bool = True,
    center: bool = True,
    dpi: float = 100.0,
) -> np.ndarray:
    """The matplotlib reference for :func:`rasterize`: the same sheet, same pixel size.

    Draws with :func:`draw_grid`, :func:`draw_traces` and :func:`draw_lead_names` on an Axes
    that fills a figure of exactly the :func:`raster_geometry` size (anti-aliased; traces are
    not clipped to their panels; the minor grid is always drawn). Line widths are given in
    pixels and converted to points at ``dpi``. Slow (tens of ms per image): for visual checks
    and as the benchmark baseline.

    Returns:
      uint8 ``[H, W, 3]`` RGB image.
    """
    leads = tuple(leads)
    signal = _check_signal(signal, leads)
    _check_rasterize_args(signal[None], fs, layout, leads, rhythm_lead, 1, False, None, 1)
    signal = signal.astype(np.float64)
    geom = raster_geometry(
        signal.shape[1],
        float(fs),
        layout,
        n_leads=len(leads),
        height=height,
        width=width,
        px_per_mm=px_per_mm,
        rhythm_lead=None if rhythm_lead is None else leads.index(rhythm_lead),
        calibration=calibration,
    )
    fig = Figure(figsize=(geom.width / dpi, geom.height / dpi), dpi=dpi, facecolor=PAPER_COLOR)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    point = 72.0 / dpi  # one pixel in points
    draw_grid(ax, geom.paper.width_s, geom.paper.height_mv, linewidth=point)
    draw_traces(ax, signal, fs, geom.paper, linewidth=line_width * point, center=center)
    cap_px = LABEL_CAP_MM * geom.px_per_mv / MM_PER_MV
    draw_lead_names(ax, geom.paper, leads, fontsize=cap_px / 0.72 * point)
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3]
    if img.shape[:2] != (geom.height, geom.width):  # figure size rounding: pad or crop
        out = np.full((geom.height, geom.width, 3), 255, np.uint8)
        h, w = min(img.shape[0], geom.height), min(img.shape[1], geom.width)
        out[:h, :w] = img[:h, :w]
        return out
    return img.copy()


# ----------------------------------------------------------------------------------------------
# Model-input images at a fixed size
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Box-filter taps ``(index [n_out, K], weight [n_out, K])`` along one axis.

    Output pixel ``j`` covers the source interval ``[j, j + 1) * n_in / n_out``; each source
    pixel it touches is weighted by its overlap with that interval, weights summing to 1.
    ``K`` is the most source pixels any output pixel touches (unused taps: weight 0).
    """
    edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    lo, hi = edges[:-1], edges[1:]
    first = np.minimum(np.floor(lo).astype(np.int64), n_in - 1)
    k = int((np.ceil(hi - 1e-9).astype(np.int64) - first).max())
    index = np.minimum(first[:, None] + np.arange(k)[None, :], n_in - 1)
    src = first[:, None] + np.arange(k)[None, :]
    overlap = np.clip(np.minimum(hi[:, None], src + 1) - np.maximum(lo[:, None], src), 0, None)
    weight = overlap / overlap.sum(axis=1, keepdims=True)
    return index, weight.astype(np.float32)


@numba.njit(cache=True, nogil=True)
def _resize_area_kernel(images, row_index, row_weight, col_index, col_weight, out):  # noqa: PLR0913
    """Separable box filter of uint8 ``images [N, H, W, C]`` into ``out [N, h, w, C]``.

    Rows first, then columns, float32 sums in tap order (zero-weight taps skipped: adding 0
    changes nothing), rounded half to even and clipped to uint8.
    """
    n, _, width, channels = images.shape
    height_out, taps_r = row_index.shape
    width_out, taps_c = col_index.shape
    rows = np.empty((height_out, width, channels), np.float32)
    for b in range(n):
        rows[:] = 0.0
        for i in range(height_out):
            for k in range(taps_r):
                wt = row_weight[i, k]
                if wt == 0.0:
                    continue
                src = row_index[i, k]
                for x in range(width):
                    for ch in range(channels):
                        rows[i, x, ch] += np.float32(images[b, src, x, ch]) * wt
        for i in range(height_out):
            for j in range(width_out):
                for ch in range(channels):
                    acc = np.float32(0.0)
                    for k in range(taps_c):
                        wt = col_weight[j, k]
                        if wt != 0.0:
                            acc += rows[i, col_index[j, k], ch] * wt
                    v = np.rint(acc)
                    out[b, i, j, ch] = np.uint8(min(max(v, 0.0), 255.0))


def resize_area(images: Any, height: int, width: int) -> np.ndarray:
    """Area (box-filter, antialiased) resize of uint8 ``[N, H, W, C]`` -> ``[N, height, width, C]``.

    Each output pixel is the mean of the source area under it (fractional pixels weighted by
    their overlap), as OpenCV's ``INTER_AREA`` for downsampling: thin ECG traces and grid lines
    fade into the average instead of vanishing or aliasing. Separable (rows, then columns), in
    one compiled pass per image (the hot step of preparing image shards).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height} x {width}")
    if images.shape[1:3] == (height, width):
        return images.copy()
    row_index, row_weight = _area_taps(images.shape[1], height)
    col_index, col_weight = _area_taps(images.shape[2], width)
    out = np.empty((images.shape[0], height, width, images.shape[3]), np.uint8)
    _resize_area_kernel(
        np.ascontiguousarray(images), row_index, row_weight, col_index, col_weight, out
    )
    return out


def model_images(
    signals: Any,
    *,
    fs: float,
    size: int,
    layout: str = "6x2",
    leads: Sequence[str] = LEADS,
    px_per_mm: float = 4.0,
    chunk: int = 32,
) -> np.ndarray:
    """ECGs ``[N, len(leads), L]`` (mV) -> uint8 ``[N, size, size, 3]`` vision-tower inputs.

    The whole printout (:func:`rasterize_batch` at true paper scale, ``px_per_mm`` pixels per
    mm, ``rhythm_lead`` II for ``"3x4"`` when lead II is drawn) is resized to ``size x size``
    with :func:`resize_area`: never cropped, as the reference's SigLIP / ViT processors do.
    Rendered ``chunk`` ECGs at a time to bound memory. Prepare, evaluation and chat call this,
    so the model always sees the same picture of an ECG.
    """
    signals = np.asarray(signals)
    leads = tuple(leads)
    rhythm = "II" if "II" in leads else None
    out = np.empty((signals.shape[0], size, size, 3), np.uint8)
    for lo in range(0, signals.shape[0], chunk):
        sheet = rasterize_batch(
            signals[lo : lo + chunk],
            fs=fs,
            layout=layout,
            px_per_mm=px_per_mm,
            leads=leads,
            rhythm_lead=rhythm,
        )
        out[lo : lo + chunk] = resize_area(sheet, size, size)
    return out
