"""Benchmark: shard preparation rate of each representation (``python -m elmjax.prepare``).

On a synthetic set of ``--ecgs`` ECGs (generated once into ``--root``; 10 s at 125 Hz as the
demos), runs the whole ``prepare`` of the symbolic, signal and image paths with ``--workers``
processes, each into a fresh workdir, and prints from its manifest the seconds spent making
the ECG side (ECG-Byte ids: ``encode_ecgs``) and writing the shards (``write_shards``: for the
image path this is where every printout is rendered, in the workers), with examples/s and
ECG segments/s of the shard writing. Images are 224 x 224 (the paper's towers), layout 6 x 2.

Usage: ``python benchmarks/prepare.py [--ecgs 1000] [--workers 1,2] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

from elmjax import prepare
from elmjax.config import load_config

CONFIGS = {
    "symbolic": "ecgbyte_1024:demo",
    "signal": "signal_stmem_1024:demo",
    "image": "image_vit_1024:demo",
}


def run(representation: str, workers: int, root: Path, work: Path, ecgs: int) -> dict:
    cfg = load_config(CONFIGS[representation])
    cfg.workdir = str(work / f"{representation}-w{workers}")
    cfg.data.root = str(root)
    cfg.data.generate_ecgs = ecgs
    cfg.data.workers = workers
    cfg.data.examples_per_shard = 512  # several shards, so that the workers share them
    if representation == "image":
        cfg.data.image_size = 224
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        manifest = prepare.prepare(cfg)
    examples = sum(s["examples"] for s in manifest["splits"].values())
    rows = sum(len(s["shards"]) for s in manifest["splits"].values())
    return {"seconds": manifest["seconds"], "examples": examples, "shards": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ecgs", type=int, default=1000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--only", default="symbolic,signal,image")
    parser.add_argument("--keep", default="", help="work directory to keep (default: temporary)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        root = work / "data"
        print(f"{args.ecgs} synthetic ECGs, {os.cpu_count()} CPUs; data and runs under {work}")
        print(
            f"{'path':<9s} {'workers':>7s} {'examples':>8s} {'ECG side':>9s} {'shards':>8s} "
            f"{'examples/s':>10s} {'total':>7s}"
        )
        for representation in args.only.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                r = run(representation, workers, root, work, args.ecgs)
                sec = r["seconds"]
                print(
                    f"{representation:<9s} {workers:7d} {r['examples']:8d} "
                    f"{sec['encode_ecgs']:8.1f}s {sec['write_shards']:7.1f}s "
                    f"{r['examples'] / sec['write_shards']:10.0f} {sec['total_this_run']:6.1f}s",
                    flush=True,
                )
                if args.keep:
                    (work / "results.jsonl").open("a").write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
