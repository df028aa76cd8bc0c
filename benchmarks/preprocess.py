"""Benchmark: ECG preprocessing throughput (12 x 5000 @ 500 Hz -> 250 Hz segments).

Measures, in one run and one process (one core):

* the per-lead reference loop (:mod:`elmjax.ecg.reference_loop`), the baseline;
* the vectorised ``mode="reference"`` and ``mode="standard"`` of :mod:`elmjax.ecg.preprocess`,

each with a per-stage breakdown (filter / wavelet / resample, ms per ECG), and prints ECGs/s and
the ratio against the baseline. Then the filter accuracy of both modes against the ideal
zero-phase filter, and the batch CLI end to end on a generated WFDB corpus at ``--workers 1``
and ``--workers 2`` (scaling).

Usage: ``python benchmarks/preprocess.py [--batch 64] [--corpus 512] [--skip-cli]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # per-core figures: no hidden threads

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import wfdb  # noqa: E402
from scipy import signal  # noqa: E402

from elmjax.ecg import io, reference_loop  # noqa: E402
from elmjax.ecg import preprocess as pp  # noqa: E402

FS = 500.0
N = 5000
REPO = Path(__file__).resolve().parents[1]


def synthetic_ecg(seconds: float, fs: float, seed: int) -> np.ndarray:
    """A realistic-looking float32 [12, n] ECG in mV: P-QRS-T Gaussians per beat with a
    jittered RR interval and per-lead gains, baseline wander, DC offset, mains hum and noise."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fs))
    t = np.arange(n) / fs
    rr = rng.uniform(0.6, 1.1)
    beats = np.arange(rng.uniform(0, rr), seconds, rr)
    beats = beats + rng.normal(0, 0.02, beats.shape)
    waves = [(-0.2, 0.025, 0.15), (-0.03, 0.01, -0.1), (0.0, 0.012, 1.0), (0.03, 0.01, -0.25)]
    waves.append((0.25, 0.05, 0.3))
    gains = rng.uniform(-1.5, 1.5, (12, 1))
    clean = np.zeros(n)
    for beat in beats:
        for offset, width, amplitude in waves:
            clean += amplitude * np.exp(-0.5 * ((t - beat - offset) / width) ** 2)
    x = gains * clean
    x += 0.3 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t + rng.uniform(0, 6.3, (12, 1)))
    x += rng.normal(0, 0.3, (12, 1))
    x += 0.05 * np.sin(2 * np.pi * 50 * t) + 0.02 * np.sin(2 * np.pi * 60 * t)
    x += 0.01 * rng.standard_normal((12, n))
    return x.astype(np.float32)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def ms_per_ecg(fn: Callable[[], object], n_ecgs: int, repeats: int) -> float:
    """Best-of-``repeats`` milliseconds per ECG of ``fn``, which processes ``n_ecgs`` ECGs."""
    return best_of(fn, repeats) / n_ecgs * 1e3


def time_loop(batch: np.ndarray, repeats: int) -> dict[str, float]:
    """ms per ECG of the per-lead reference loop, whole pipeline and per stage."""
    b = len(batch)
    filtered = [reference_loop.advanced_ecg_filter(x, FS) for x in batch]
    denoised = [reference_loop.wavelet_denoise(x) for x in filtered]
    stages = {
        "total": lambda: [reference_loop.preprocess_record(x, FS) for x in batch],
        "filter": lambda: [reference_loop.advanced_ecg_filter(x, FS) for x in batch],
        "wavelet": lambda: [reference_loop.wavelet_denoise(x) for x in filtered],
        "resample": lambda: [reference_loop.nsample_ecg(x, FS, 250.0) for x in denoised],
    }
    return {name: ms_per_ecg(fn, b, repeats) for name, fn in stages.items()}


def time_vectorised(batch: np.ndarray, cfg: pp.PreprocessConfig, repeats: int) -> dict:
    """ms per ECG of the vectorised pipeline on the whole batch, whole and per stage."""
    filtered = pp.filter_ecg(batch, FS, cfg)
    denoised = pp.denoise_wavelet(filtered, cfg)
    stages = {
        "total": lambda: pp.preprocess_segments(batch, FS, cfg),
        "filter": lambda: pp.filter_ecg(batch, FS, cfg),
        "wavelet": lambda: pp.denoise_wavelet(filtered, cfg),
        "resample": lambda: pp.resample(denoised, FS, 250.0, cfg.mode),
    }
    return {name: ms_per_ecg(fn, len(batch), repeats) for name, fn in stages.items()}


def filter_accuracy(n_records: int) -> dict[str, float]:
    """Relative RMS error vs the ideal zero-phase filter in the middle 6 s of 10-s windows cut
    from 60-s recordings (the ideal: the cascade applied to the whole 60 s)."""
    sos = pp._cascade_sos(pp._filter_plan(FS, pp.PreprocessConfig()))
    errors: dict[str, list[float]] = {"standard": [], "reference": []}
    for seed in range(n_records):
        long = synthetic_ecg(60.0, FS, seed).astype(np.float64)
        ideal = signal.sosfiltfilt(sos, long, axis=-1)[:, 25000:30000][:, 1000:4000]
        window = long[None, :, 25000:30000]
        for mode in errors:
            y = pp.filter_ecg(window, FS, pp.PreprocessConfig(mode=mode))[0, :, 1000:4000]
            errors[mode].append(float(np.sqrt(np.mean((y - ideal) ** 2)) / np.std(ideal)))
    return {mode: float(np.mean(v)) for mode, v in errors.items()}


def write_corpus(root: Path, n_records: int) -> None:
    """n_records 12-lead 10-s WFDB records (format 16) in a wfdb-dir layout."""
    names = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    for i in range(n_records):
        folder = root / f"p{i // 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        wfdb.wrsamp(
            f"r{i:05d}",
            fs=FS,
            units=["mV"] * 12,
            sig_name=names,
            p_signal=synthetic_ecg(10.0, FS, seed=1000 + i).T.astype(np.float64),
            fmt=["16"] * 12,
            adc_gain=[1000.0] * 12,
            baseline=[0] * 12,
            write_dir=str(folder),
        )


def time_cli(corpus: Path, out: Path, workers: int, mode: str) -> dict:
    """Runs the CLI as a user would (a fresh interpreter); returns wall time and its report."""
    command = [sys.executable, "-m", "elmjax.ecg.preprocess", "--layout", "wfdb-dir"]
    command += ["--input", str(corpus), "--out", str(out), "--seg-len", "2500", "--quiet"]
    command += ["--workers", str(workers), "--mode", mode, "--chunk-size", "64"]
    t0 = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    wall = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    return {"wall": wall, "report": report}


def main() -> None:
    """Runs all measurements and prints the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="ECGs per vectorised call")
    parser.add_argument("--loop-records", type=int, default=16, help="ECGs for the baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus", type=int, default=1024, help="WFDB records for the CLI")
    parser.add_argument("--skip-cli", action="store_true")
    args = parser.parse_args()

    print(f"# ECG preprocessing benchmark — {time.strftime('%Y-%m-%d')}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"input: 12 x {N} float32 @ {FS:g} Hz -> 250 Hz, seg_len 2500 (one segment per ECG)\n")

    batch = np.stack([synthetic_ecg(N / FS, FS, seed) for seed in range(args.batch)])
    results = {"reference loop (baseline)": time_loop(batch[: args.loop_records], args.repeats)}
    for mode in ("reference", "standard"):
        cfg = pp.PreprocessConfig(mode=mode)
        results[f'vectorised mode="{mode}"'] = time_vectorised(batch, cfg, args.repeats)

    base = results["reference loop (baseline)"]["total"]
    print("| implementation (1 process) | ms/ECG | filter | wavelet | resample | ECGs/s |", end="")
    print(" vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['total']:.2f} | {r['filter']:.2f} | {r['wavelet']:.2f} | "
            f"{r['resample']:.2f} | {1e3 / r['total']:.0f} | {base / r['total']:.1f}x |"
        )

    standard = pp.PreprocessConfig()
    print("\nstandard mode, ms/ECG by batch size:", end="")
    for b in (1, 8, 64):
        if b <= len(batch):
            sub = batch[:b]
            ms = best_of(lambda sub=sub: pp.preprocess_segments(sub, FS, standard), args.repeats)
            print(f"  B={b}: {ms / b * 1e3:.2f}", end="")
    print()

    accuracy = filter_accuracy(4)
    print(
        "\nfilter error vs the ideal zero-phase filter (relative RMS, middle 6 s of 10-s windows "
        f"of 60-s recordings): standard {accuracy['standard']:.2%}, "
        f"reference {accuracy['reference']:.2%}"
    )

    if args.skip_cli:
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        t0 = time.perf_counter()
        write_corpus(corpus, args.corpus)
        seconds = time.perf_counter() - t0
        print(f"\nCLI: corpus of {args.corpus} WFDB records written in {seconds:.1f} s")
        entries, _ = io.list_entries("wfdb-dir", corpus)
        sample = entries[:64]
        t0 = time.perf_counter()
        for entry in sample:
            io.load_entry(entry)
        read_ms = (time.perf_counter() - t0) / len(sample) * 1e3
        print(f"reading alone (io.load_entry): {read_ms:.2f} ms/record\n")
        print(
            "| CLI, standard mode | wall s | records/s end to end | records/s in the pool |", end=""
        )
        print(" speed-up vs 1 worker |")
        print("|---|---|---|---|---|")
        walls = {}
        for workers in (1, 2):
            r = time_cli(corpus, Path(tmp) / f"out-{workers}", workers, "standard")
            assert r["report"]["counts"]["segments"] == args.corpus
            walls[workers] = r["wall"]
            pool_rate = r["report"]["timing"]["records_per_second_this_run"]
            print(
                f"| --workers {workers} | {r['wall']:.1f} | {args.corpus / r['wall']:.0f} | "
                f"{pool_rate:.0f} | {walls[1] / r['wall']:.2f}x |"
            )
        print(
            "\n(wall: a fresh interpreter, listing, config, chunks, manifest; 'in the pool': chunk "
            "processing only, including the workers' ~1 s start-up of importing scipy and wfdb)"
        )


if __name__ == "__main__":
    main()
