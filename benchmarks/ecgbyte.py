"""Benchmark: ECG-Byte tokenizer (training, signal -> ids encoding, compression).

Corpus: synthetic 12-lead ECGs from :mod:`elmjax.ecg.synth` (10 s at 500 Hz), preprocessed with
:func:`elmjax.ecg.preprocess.preprocess_segments` to 12 x 2500 segments at 250 Hz, discretised to
26 symbols, lead-major. Every figure is printed beside a naive baseline timed in the same run:

* training, 200 ECGs x 5000 merges: :func:`elmjax.tokenize.ecgbyte.train_bpe` against a
  reference-style trainer (numba, one concatenated sequence, all pairs recounted every merge:
  the reference's algorithm, on one core). The baseline runs the first ``--baseline-merges``
  merges and is extrapolated to 5000 in two ways: linearly (what the first merges cost, times
  5000 / K: an over-estimate, since the sequence shrinks) and weighted by the sequence length
  before each merge (a recount costs O(length); the lengths come from our trainer's per-merge
  occurrence counts);
* encoding signal -> ids, one process and one thread, both modes, against a reference-style
  per-ECG Python discretisation and pure-Python greedy trie encoder;
* compression (symbols per token) at 1000 and 5000 merges, on the training ECGs and on held-out
  ECGs, next to the reference's published figures for 200 ECGs;
* ``--big``: 20,000 ECGs x 5000 merges, wall time and peak memory of the training process
  (a subprocess; ``ru_maxrss``), with the baseline's first merges extrapolated likewise.

Usage: ``python benchmarks/ecgbyte.py [--big] [--cache DIR] [--workers N]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # no hidden BLAS threads in the per-core figures

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit  # noqa: E402
from tqdm import tqdm  # noqa: E402

from elmjax.ecg import preprocess, synth  # noqa: E402
from elmjax.tokenize import ecgbyte as eb  # noqa: E402

REFERENCE_TRAIN_SECONDS = 243.0  # the reference, 200 ECGs x 5000 merges, this machine type
REFERENCE_COMPRESSION = {1000: 7.48, 5000: 10.05}  # symbols per token, 200 ECGs
CHUNK = 64  # ECGs per generation task


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------


def _signal_chunk(task: tuple[int, int, int]) -> np.ndarray:
    seed, chunk, n = task
    rng = np.random.default_rng([seed, chunk])
    raw = [
        synth.simulate(synth.sample_params(rng), fs=synth.FS, duration=10.0, rng=rng)[0]
        for _ in range(n)
    ]
    return preprocess.preprocess_segments(np.stack(raw), float(synth.FS)).data[:, :, :2500]


def signals(n: int, seed: int, workers: int, desc: str):
    """Yields float32 ``[<=64, 12, 2500]`` chunks of ``n`` synthetic preprocessed ECGs."""
    tasks = [(seed, i, min(CHUNK, n - i * CHUNK)) for i in range((n + CHUNK - 1) // CHUNK)]
    with ProcessPoolExecutor(workers) as pool:
        yield from tqdm(pool.map(_signal_chunk, tasks), total=len(tasks), desc=desc, unit="chunk")


def corpus(n: int, seed: int, workers: int, cache: Path, keep_signal: bool):
    """``(signal float32 [n, 12, 2500] or None, symbols uint8 [n, 12, 2500])``, cached."""
    cache.mkdir(parents=True, exist_ok=True)
    sym_path = cache / f"symbols_{n}_{seed}.npy"
    sig_path = cache / f"signal_{n}_{seed}.npy"
    if sym_path.exists() and (sig_path.exists() or not keep_signal):
        return (np.load(sig_path) if keep_signal else None), np.load(sym_path)
    symbols = np.empty((n, 12, 2500), np.uint8)
    signal = np.empty((n, 12, 2500), np.float32) if keep_signal else None
    i = 0
    for chunk in signals(n, seed, workers, f"simulate {n} ECGs"):
        symbols[i : i + len(chunk)] = eb.discretise(chunk, workers=1).symbols
        if keep_signal:
            signal[i : i + len(chunk)] = chunk
        i += len(chunk)
    np.save(sym_path, symbols)
    if keep_signal:
        np.save(sig_path, signal)
    return signal, symbols


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------


@njit(cache=True)
def _naive_recount_merges(seq, num_merges, num_symbols, vocab):
    """The reference's algorithm on one sequence: per merge, count every adjacent pair (dense
    table), take the argmax (ties: smallest pair), merge left to right in place. Returns the
    merges and the sequence length before each merge."""
    counts = np.zeros(vocab * vocab, np.int32)
    merges = np.zeros((num_merges, 2), np.int32)
    lengths = np.zeros(num_merges, np.int64)
    n = seq.size
    for m in range(num_merges):
        lengths[m] = n
        for i in range(n - 1):
            counts[seq[i] * vocab + seq[i + 1]] += 1
        best, best_key = 0, -1
        for i in range(n - 1):  # read each count once, at its pair's first window, and reset
            key = seq[i] * vocab + seq[i + 1]
            c = counts[key]
            if c > best or (c == best and c > 0 and key < best_key):
                best, best_key = c, key
            counts[key] = 0
        if best < 2:
            return merges[:m], lengths[:m]
        a, b, new = best_key // vocab, best_key % vocab, num_symbols + m
        merges[m, 0], merges[m, 1] = a, b
        w, i = 0, 0
        while i < n:
            if i + 1 < n and seq[i] == a and seq[i + 1] == b:
                seq[w] = new
                i += 2
            else:
                seq[w] = seq[i]
                i += 1
            w += 1
        n = w
    return merges, lengths


def naive_train_time(symbols: np.ndarray, k: int, num_merges: int) -> tuple[float, np.ndarray]:
    """Seconds for the first ``k`` merges of the reference-style trainer, and its merges."""
    _naive_recount_merges(np.arange(40, dtype=np.int32) % 3, 2, 26, 26 + num_merges)  # compile
    seq = symbols.reshape(-1).astype(np.int32)
    t0 = time.perf_counter()
    merges, _ = _naive_recount_merges(seq, k, 26, 26 + num_merges)
    return time.perf_counter() - t0, merges


def extrapolate(seconds_k: float, k: int, merged_per_merge: np.ndarray, n: int) -> dict:
    """Baseline time for all merges: linear in merges, and weighted by the sequence length."""
    lengths = n - np.concatenate([[0], np.cumsum(merged_per_merge)[:-1]])
    total = len(merged_per_merge)
    return {
        "linear": seconds_k * total / k,
        "length_weighted": seconds_k * lengths.sum() / lengths[:k].sum(),
    }


def reference_style_encode(signal: np.ndarray, trie: dict) -> list[int]:
    """The reference's per-ECG path in Python: min-max over the ECG, 26 letters, ``''.join`` of
    the lead-major array, then greedy longest match over a dict trie."""
    lo, hi = signal.min(), signal.max()
    norm = np.clip((signal - lo) / (hi - lo + 1e-6), 0, 1)
    idx = np.minimum(np.floor(norm * 26), 25).astype(int)
    text = "".join(np.array(list("abcdefghijklmnopqrstuvwxyz"))[idx].flatten())
    out, i = [], 0
    while i < len(text):
        node, best, best_len, j = trie, None, 0, i
        while j < len(text) and text[j] in node:
            node = node[text[j]]
            j += 1
            if None in node:
                best, best_len = node[None], j - i
        out.append(best)
        i += best_len
    return out


def dict_trie(tokens: list[str]) -> dict:
    root: dict = {}
    for token_id, string in enumerate(tokens):
        node = root
        for ch in string:
            node = node.setdefault(ch, {})
        node[None] = token_id
    return root


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_train(symbols: np.ndarray, args) -> dict:
    eb.train_bpe(symbols[:2], 50, progress=False)  # compile (or load the cache)
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        merges, stats = eb.train_bpe(
            symbols, 5000, workers=args.workers, progress=False, return_stats=True
        )
        runs.append(time.perf_counter() - t0)
    k = args.baseline_merges
    seconds_k, naive_merges = naive_train_time(symbols, k, 5000)
    est = extrapolate(seconds_k, k, stats["merged_per_merge"], symbols.size)
    same = int((naive_merges == merges[:k]).all(axis=1).cumprod().sum())
    return {
        "ours_s": min(runs),
        "ours_runs_s": runs,
        "stats": {key: v for key, v in stats.items() if key != "merged_per_merge"},
        "naive_k": k,
        "naive_k_s": seconds_k,
        "naive_est_s": est,
        "first_merges_equal": same,
        "merges": merges,
    }


def bench_encode(tok: eb.ECGByteTokenizer, signal: np.ndarray, args) -> dict:
    out = {}
    for mode in eb.MODES:
        tok.encode_signal(signal[:2], mode=mode, workers=1)  # compile
        batch = 32

        def run(mode=mode, batch=batch):
            for i in range(0, len(signal), batch):
                tok.encode_signal(signal[i : i + batch], mode=mode, workers=1)

        def run_single(mode=mode):
            for x in signal[:64]:
                tok.encode_signal(x, mode=mode, workers=1)

        out[mode] = len(signal) / best_of(run, args.repeats)
        out[f"{mode}_single"] = 64 / best_of(run_single, args.repeats)
    trie = dict_trie(tok.token_strings)
    n = args.baseline_ecgs
    seconds = best_of(lambda: [reference_style_encode(x, trie) for x in signal[:n]], 1)
    out["naive"] = n / seconds
    ours = tok.encode_signal(signal[:n], mode="reference", workers=1)
    out["naive_equal"] = all(
        np.array_equal(a, reference_style_encode(x, trie))
        for a, x in zip(ours, signal[:n], strict=True)
    )
    return out


def compression(tok: eb.ECGByteTokenizer, symbols: np.ndarray) -> dict:
    out = {}
    for mode in eb.MODES:
        ids, _ = tok.encode_flat(symbols, mode=mode)
        out[mode] = symbols.size / ids.size
    return out


def big_child(path: str, workers: int | None) -> None:
    """Runs in a subprocess: loads the symbols, trains 5000 merges, prints JSON."""
    t0 = time.perf_counter()
    symbols = np.load(path)
    t_load = time.perf_counter() - t0
    eb.train_bpe(symbols[:2], 50, progress=False)
    t1 = time.perf_counter()
    merges, stats = eb.train_bpe(symbols, 5000, workers=workers, progress=True, return_stats=True)
    seconds = time.perf_counter() - t1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.save(path.replace(".npy", "_merged_per_merge.npy"), stats.pop("merged_per_merge"))
    print(
        json.dumps(
            {"seconds": seconds, "seconds_load": t_load, "peak_rss": rss, "stats": stats},
            default=float,
        )
    )


def machine() -> str:
    """CPU model, cores and memory of this machine."""
    model = platform.processor() or "?"
    with open("/proc/cpuinfo") as f:
        model = next(
            (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model
        )
    with open("/proc/meminfo") as f:
        mem_kb = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
    return f"{model}, {os.cpu_count()} CPUs, {mem_kb / 2**20:.0f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big", action="store_true", help="also 20,000 ECGs x 5000 merges")
    parser.add_argument("--big-ecgs", type=int, default=20000)
    parser.add_argument("--only-big", action="store_true")
    parser.add_argument("--cache", default="/tmp/elmjax_bench_ecgbyte")
    parser.add_argument("--workers", type=int, default=None, help="threads/processes (all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-merges", type=int, default=200)
    parser.add_argument("--baseline-ecgs", type=int, default=10)
    parser.add_argument("--big-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.big_child:
        big_child(args.big_child, args.workers)
        return
    cache = Path(args.cache)
    gen_workers = args.workers or len(os.sched_getaffinity(0))
    print(
        f"# ECG-Byte benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {machine()}, "
        f"load {os.getloadavg()[0]:.1f}; python "
        f"{platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
        f"{numba.get_num_threads()} numba threads"
    )
    results: dict = {}
    if not args.only_big:
        signal_train, sym_train = corpus(200, 0, gen_workers, cache, keep_signal=True)
        signal_test, sym_test = corpus(200, 1, gen_workers, cache, keep_signal=True)

        r = bench_train(sym_train, args)
        results["train200"] = r
        est = r["naive_est_s"]
        print("\n## Training, 200 ECGs x 5000 merges (6 M symbols)")
        print(f"ours: {r['ours_s']:.2f} s (runs {', '.join(f'{t:.2f}' for t in r['ours_runs_s'])})")
        print(f"  {r['stats']}")
        print(
            f"naive recount (reference algorithm, numba, 1 core): first {r['naive_k']} merges "
            f"{r['naive_k_s']:.2f} s -> 5000 merges ~{est['length_weighted']:.0f} s "
            f"(length-weighted), {est['linear']:.0f} s (linear); its first "
            f"{r['first_merges_equal']} merges equal ours"
        )
        print(
            f"speed-up: {est['length_weighted'] / r['ours_s']:.0f}x vs the naive baseline "
            f"(length-weighted), {REFERENCE_TRAIN_SECONDS / r['ours_s']:.0f}x vs the reference's "
            f"{REFERENCE_TRAIN_SECONDS:.0f} s"
        )

        print("\n## Compression (symbols per token), trained on the 200 ECGs")
        for merges in (1000, 5000):
            tok = eb.ECGByteTokenizer(r["merges"][:merges])
            on_train = compression(tok, sym_train)
            on_test = compression(tok, sym_test)
            results[f"compression{merges}"] = {"train": on_train, "test": on_test}
            print(
                f"{merges} merges: train bpe {on_train['bpe']:.2f}, reference "
                f"{on_train['reference']:.2f}; held-out bpe {on_test['bpe']:.2f}, reference "
                f"{on_test['reference']:.2f}   (reference, real ECGs: "
                f"{REFERENCE_COMPRESSION[merges]})"
            )

        tok = eb.ECGByteTokenizer(r["merges"])
        e = bench_encode(tok, signal_test, args)
        results["encode"] = e
        print("\n## Encoding signal -> ids, 12 x 2500, 5000 merges, one process, one thread")
        for mode in eb.MODES:
            print(
                f"{mode:>9}: {e[mode]:.0f} ECGs/s in batches of 32, {e[mode + '_single']:.0f} "
                f"ECGs/s one at a time; {e[mode] / e['naive']:.0f}x the baseline"
            )
        print(
            f"baseline (reference-style Python discretisation + dict-trie greedy): "
            f"{e['naive']:.1f} ECGs/s; same ids as ours: {e['naive_equal']}"
        )

    if args.big or args.only_big:
        n = args.big_ecgs
        _, symbols = corpus(n, 2, gen_workers, cache, keep_signal=False)
        path = str(cache / f"symbols_{n}_2.npy")
        del symbols
        print(f"\n## Training, {n} ECGs x 5000 merges ({n * 30000 / 1e6:.0f} M symbols)")
        cmd = [sys.executable, __file__, "--big-child", path]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        child = subprocess.run(cmd, capture_output=True, text=True, check=True)
        big = json.loads(child.stdout.strip().splitlines()[-1])
        results["big"] = big
        print(
            f"ours: {big['seconds']:.0f} s ({big['stats']['seconds_setup']:.1f} s setup), peak RSS "
            f"of the training process {big['peak_rss'] / 2**30:.2f} GiB (symbols alone "
            f"{n * 30000 / 2**30:.2f} GiB)\n  {big['stats']}"
        )
        k = max(2, args.baseline_merges // 40)
        seconds_k, _ = naive_train_time(np.load(path, mmap_mode="r"), k, 5000)
        merged = np.load(path.replace(".npy", "_merged_per_merge.npy"))
        est = extrapolate(seconds_k, k, merged, n * 30000)
        print(
            f"naive recount: first {k} merges {seconds_k:.1f} s -> 5000 merges "
            f"~{est['length_weighted'] / 3600:.1f} h (length-weighted), "
            f"{est['linear'] / 3600:.1f} h (linear); speed-up "
            f"{est['length_weighted'] / big['seconds']:.0f}x"
        )


if __name__ == "__main__":
    main()
