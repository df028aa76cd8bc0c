"""Benchmark: ECG image rendering throughput (12-lead ECG -> [H, W, 3] uint8 model input).

Measures, in one run and one process (one core), on synthetic 12-lead ECGs from
:mod:`elmjax.ecg.synth` (5 s at 250 Hz, the reference framework's segment):

* the matplotlib path (:func:`elmjax.ecg.render.rasterize_matplotlib`: ``draw_grid`` /
  ``draw_traces`` / ``draw_lead_names`` on an Agg canvas read back as an array), the baseline;
* the rasteriser one ECG per call (:func:`elmjax.ecg.render.rasterize`);
* the rasteriser on a batch (:func:`elmjax.ecg.render.rasterize_batch`),

each at the same image size and layout, for ``"6x2"`` and ``"3x4"`` at true scale (4 px/mm:
1040 x 720 and 540 x 640 px) and for ``"6x2"`` stretched to 224 x 224. Prints images/s and the
ratio against the baseline, plus the one-off cost of the first call in a fresh process (numba
compiles the drawing kernel, or loads it from its on-disk cache).

Usage: ``python benchmarks/render.py [--batch 64] [--mpl-images 12] [--repeats 3]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # per-core figures: no hidden threads

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from elmjax.ecg import render, synth  # noqa: E402

FS = 250.0
SECONDS = 5.0


def synthetic_batch(n: int, seed: int = 0) -> np.ndarray:
    """n simulated 12-lead ECGs, float32 [n, 12, 1250] in mV (with noise)."""
    rng = np.random.default_rng(seed)
    signals = []
    for i in range(n):
        params = synth.sample_params(rng)
        x, _ = synth.simulate(params, fs=FS, duration=SECONDS, rng=seed * 100_003 + i)
        signals.append(x)
    return np.stack(signals)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    """Runs all measurements and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="ECGs per rasterize_batch call")
    parser.add_argument("--mpl-images", type=int, default=12, help="ECGs for the baseline")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"# ECG image rendering benchmark — {time.strftime('%Y-%m-%d')}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    t0 = time.perf_counter()
    batch = synthetic_batch(args.batch)
    print(
        f"input: {args.batch} synthetic 12-lead ECGs, 12 x {batch.shape[2]} float32 @ {FS:g} Hz "
        f"(made in {time.perf_counter() - t0:.1f} s); line width 1 px, lead names, calibration"
    )

    t0 = time.perf_counter()
    render.rasterize(batch[0], fs=FS)
    print(f"first call (numba compile or cache load): {time.perf_counter() - t0:.2f} s\n")

    cases = [
        ("6x2", {}),
        ("3x4", {}),
        ("6x2", {"height": 224, "width": 224}),
    ]
    print("| layout | image (W x H) | implementation | ms/image | images/s | vs matplotlib |")
    print("|---|---|---|---|---|---|")
    speedups = []
    for layout, size in cases:
        kwargs = {"fs": FS, "layout": layout, **size}
        shape = render.rasterize(batch[0], **kwargs).shape
        few = batch[: args.mpl_images]
        mpl = best_of(
            lambda few=few, kw=kwargs: [render.rasterize_matplotlib(x, **kw) for x in few], 1
        )
        mpl_ms = mpl / len(few) * 1e3
        one = best_of(lambda kw=kwargs: [render.rasterize(x, **kw) for x in batch], args.repeats)
        many = best_of(lambda kw=kwargs: render.rasterize_batch(batch, **kw), args.repeats)
        rows = [
            ("matplotlib (baseline)", mpl_ms),
            ("rasterize, 1 ECG per call", one / len(batch) * 1e3),
            (f"rasterize_batch, {len(batch)} per call", many / len(batch) * 1e3),
        ]
        for name, ms in rows:
            print(
                f"| {layout} | {shape[1]} x {shape[0]} | {name} | {ms:.2f} | {1e3 / ms:.0f} | "
                f"{mpl_ms / ms:.1f}x |"
            )
        speedups.append(mpl_ms / rows[-1][1])
    print(
        f"\nbatch speed-up over matplotlib: {min(speedups):.0f}x to {max(speedups):.0f}x "
        "(issue target: >= 20x)"
    )


if __name__ == "__main__":
    main()
