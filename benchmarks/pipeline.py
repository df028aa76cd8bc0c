"""Benchmark: examples per second out of the grain pipeline (packed T=1024 rows).

Writes ArrayRecord shards of prepared examples (token ids + loss mask, lengths drawn uniformly
from [min_len, T]), then times, in one run:

* a baseline: the textbook per-element grain graph (``MapDataset.source -> shuffle -> map ->
  FirstFitPackIterDataset -> batch``, 16 packing bins), what one writes from grain's docs;
* :func:`elmjax.data.pipeline.make_dataset` with ``fit="pack"`` in this process
  (``worker_count=0``) and with ``--workers`` grain worker processes.

Prints examples/s and rows/s for each, and the ratio against the baseline.

Usage: ``python benchmarks/pipeline.py [--examples 40000] [--seq-len 1024] [--workers 2]``
"""

from __future__ import annotations

import argparse
import functools
import platform
import tempfile
import time
from pathlib import Path

import grain
import numpy as np

from elmjax.data import pipeline, records


def write_corpus(directory: Path, n: int, seq_len: int, min_len: int, n_shards: int) -> list:
    rng = np.random.default_rng(0)
    lengths = rng.integers(min_len, seq_len + 1, n)
    per = -(-n // n_shards)
    paths = []
    for s in range(n_shards):
        path = directory / f"train-{s:05d}-of-{n_shards:05d}.array_record"
        examples = []
        for i in range(s * per, min(n, (s + 1) * per)):
            ids = rng.integers(0, 32000, lengths[i]).astype(np.int32)
            mask = np.zeros(lengths[i], np.uint8)
            mask[-8:] = 1
            examples.append({"input_ids": ids, "loss_mask": mask, "example_id": f"e{i}"})
        records.write_shard(path, examples)
        paths.append(str(path))
    return paths


def textbook(paths: list[str], seq_len: int, batch_size: int, n_batches: int) -> float:
    """The per-element grain graph (source -> shuffle -> map -> FirstFitPack -> batch)."""
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths)).shuffle(seed=0)
    ds = ds.repeat(None).map(functools.partial(pipeline.next_token_example, seq_len=seq_len))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={k: seq_len for k in pipeline.SEQUENCE_KEYS}, num_packing_bins=16
    )
    it = iter(it.batch(batch_size))
    next(it)
    t0 = time.perf_counter()
    examples = 0
    for _ in range(n_batches):
        batch = next(it)
        seg = batch["inputs_segment_ids"]
        examples += sum(len(np.unique(row[row > 0])) for row in seg)
    return examples / (time.perf_counter() - t0)


def timed_pipeline(paths, seq_len, batch_size, workers, n_batches):
    cfg = pipeline.PipelineConfig(
        seq_len=seq_len, batch_size=batch_size, seed=0, num_epochs=None, worker_count=workers
    )
    it = iter(pipeline.make_dataset(paths, cfg, shard_index=0, shard_count=1))
    for _ in range(3):  # warm-up (worker start-up)
        next(it)
    t0 = time.perf_counter()
    examples = 0
    for _ in range(n_batches):
        batch = next(it)
        examples += pipeline.token_stats(batch)["examples"]
    seconds = time.perf_counter() - t0
    it.close()
    return examples / seconds, n_batches * batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=40_000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_corpus(Path(tmp), args.examples, args.seq_len, args.min_len, 8)
        base = textbook(paths, args.seq_len, args.batch_size, max(20, args.batches // 5))
        print(f"per-element grain graph      {base:10.0f} examples/s (baseline)")
        results = {}
        for workers in sorted({0, args.workers}):
            ex_s, rows_s = timed_pipeline(
                paths, args.seq_len, args.batch_size, workers, args.batches
            )
            results[workers] = ex_s
            print(
                f"grain pipeline, {workers} workers  {ex_s:10.0f} examples/s "
                f"{rows_s:8.0f} rows/s  {ex_s / base:5.1f}x baseline"
            )


if __name__ == "__main__":
    main()
