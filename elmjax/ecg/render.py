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
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
