"""The built-in demo: the longest real pipeline that exists, on data made here, offline.

    python -m elmjax.demo --workdir runs/demo          # what `make demo` runs

Steps (each prints what it did and how long it took):

1. Generate the built-in synthetic ECG-QA set (:mod:`elmjax.ecg.synth`): real WFDB records at
   500 Hz in the PTB-XL layout, a ``ptbxl_database.csv`` with patient ids, and ECG-QA-format
   question files with exact, class-balanced answers.
2. ``python -m elmjax.prepare --config=configs/ecgbyte_1024.py:demo``
   (:func:`elmjax.prepare.prepare`):
   preprocess the records (filters, wavelet denoising, 125 Hz, 10-s segments), train the
   ECG-Byte tokenizer on the train split and a small text tokenizer, and write the tokenized
   conversations as ArrayRecord shards for training.
3. Print a summary: findings, questions per split and type, answer balance, segments, skips,
   tokenizers and shards.
4. Write a PNG of one synthetic 12-lead ECG on ECG paper with its ground-truth labels, and one of
   its first preprocessed segment.

Outputs under ``--workdir``: ``data/`` (the corpus), ``ecgbyte/`` (segments, tokenizers,
shards), ``plots/`` and ``summary.json``. Re-running reuses the corpus and every finished step.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from elmjax import prepare
from elmjax.config import load_config
from elmjax.ecg import io, preprocess, render, synth

DEMO_ECGS = 4000  # the same set configs/ecgbyte_1024.py:demo trains on
DEMO_SEED = 0


def _corpus_is_complete(data: Path, num_ecgs: int, seed: int) -> bool:
    """True when ``data`` holds a corpus this demo wrote with the same size and seed."""
    stamp = data / "demo_corpus.json"
    if not stamp.exists():
        return False
    try:
        return json.loads(stamp.read_text()) == {"num_ecgs": num_ecgs, "seed": seed}
    except json.JSONDecodeError:
        return False


def make_corpus(data: Path, num_ecgs: int, seed: int, workers: int) -> dict[str, Any]:
    """Writes (or reuses) the synthetic corpus; returns the generator's summary."""
    if _corpus_is_complete(data, num_ecgs, seed):
        print(f"[1/4] reusing the synthetic corpus in {data}")
        return json.loads((data / "demo_corpus_summary.json").read_text())
    t0 = time.perf_counter()
    summary = synth.generate_corpus(data, num_ecgs=num_ecgs, seed=seed, workers=workers)
    seconds = time.perf_counter() - t0
    summary["seconds"] = round(seconds, 2)
    (data / "demo_corpus_summary.json").write_text(json.dumps(summary, indent=1))
    (data / "demo_corpus.json").write_text(json.dumps({"num_ecgs": num_ecgs, "seed": seed}))
    print(f"[1/4] wrote {num_ecgs} synthetic ECGs to {data} in {seconds:.1f} s")
    return summary


def read_labels(data: Path) -> list[dict[str, Any]]:
    """The generator's per-ECG ground truth (``synth_labels.jsonl``)."""
    with open(data / "synth_labels.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_questions(data: Path) -> dict[str, list[dict[str, Any]]]:
    """All template-style ECG-QA items per split."""
    out: dict[str, list[dict[str, Any]]] = {}
    for split in synth.SPLITS:
        items: list[dict[str, Any]] = []
        for path in sorted((data / "ecgqa" / "ptbxl" / "template" / split).glob("*.json")):
            items.extend(json.loads(path.read_text()))
        out[split] = items
    return out


def summarise(
    labels: list[dict[str, Any]], questions: dict[str, list[dict[str, Any]]], report: dict
) -> dict[str, Any]:
    """Counts of findings, questions and answers, and the preprocessing outcome."""
    findings = collections.Counter()
    for row in labels:
        lab = row["labels"]
        findings[f"rhythm: {lab['rhythm']}"] += 1
        findings[f"QRS: {lab['qrs_morphology']}"] += 1
        findings[f"axis: {lab['axis']}"] += 1
        findings["first-degree AV block"] += bool(lab["first_degree_av_block"])
        findings["ST elevation"] += bool(lab["st_elevation_leads"])
        findings["ST depression"] += bool(lab["st_depression_leads"])
        findings["T-wave inversion"] += bool(lab["t_inversion_leads"])
        findings["low QRS voltage"] += bool(lab["low_voltage"])
        findings["premature ventricular complexes"] += lab["n_pvc"] > 0
        findings["normal ECG"] += bool(lab["normal"])
    by_type = {
        split: dict(collections.Counter(q["question_type"] for q in items))
        for split, items in questions.items()
    }
    verify = [
        q for items in questions.values() for q in items if q["question_type"] == "single-verify"
    ]
    yes = sum(q["answer"] == ["yes"] for q in verify)
    counts = report["counts"]
    return {
        "ecgs": len(labels),
        "patients": len({row["patient_id"] for row in labels}),
        "ecgs_per_split": dict(collections.Counter(row["split"] for row in labels)),
        "findings": dict(findings.most_common()),
        "questions_per_split_and_type": by_type,
        "verify_yes_fraction": round(yes / max(len(verify), 1), 3),
        "segments": counts["segments"],
        "records_skipped": counts["records_skipped"],
    }


def print_summary(summary: dict[str, Any]) -> None:
    """Human-readable version of :func:`summarise`."""
    print(f"\n  {summary['ecgs']} ECGs from {summary['patients']} patients, ", end="")
    print(", ".join(f"{k}: {v}" for k, v in summary["ecgs_per_split"].items()))
    print("  findings (ECGs with each):")
    for name, n in summary["findings"].items():
        print(f"    {name:<40s} {n:5d}")
    print("  questions per split and type:")
    for split, types in summary["questions_per_split_and_type"].items():
        parts = ", ".join(f"{t} {n}" for t, n in sorted(types.items()))
        print(f"    {split:<6s} {sum(types.values()):6d}  ({parts})")
    print(f"  yes/no questions answered 'yes': {summary['verify_yes_fraction']:.1%} (balanced)")
    print(f"  preprocessed segments: {summary['segments']}, skipped records: ", end="")
    print(summary["records_skipped"])


def plot_example(
    data: Path, segments_dir: Path, labels: list[dict[str, Any]], plots: Path
) -> list[Path]:
    """Plots the most eventful test-split ECG (raw record + labels) and its first segment."""
    plots.mkdir(parents=True, exist_ok=True)
    test = [row for row in labels if row["split"] == "test"] or labels

    def score(row: dict[str, Any]) -> int:
        lab = row["labels"]
        return (not lab["normal"]) + bool(lab["st_elevation_leads"]) + (lab["n_pvc"] > 0)

    row = max(test, key=lambda r: (score(r), -r["ecg_id"]))
    record = io.read_record(data / row["filename_hr"])
    lab = row["labels"]
    findings = {
        "rhythm": f"{lab['rhythm']}, {lab['heart_rate']:.0f} bpm",
        "QRS": f"{lab['qrs_morphology']} ({lab['qrs_ms']:.0f} ms)",
        "axis": f"{lab['axis']} ({lab['axis_deg']:.0f} deg)",
        "PR": f"{lab['pr_ms']:.0f} ms" if lab["pr_ms"] is not None else "no P waves",
        "ST up": ", ".join(lab["st_elevation_leads"]) or "none",
        "ST down": ", ".join(lab["st_depression_leads"]) or "none",
        "T inv": ", ".join(lab["t_inversion_leads"]) or "none",
        "PVCs": str(lab["n_pvc"]),
        "low voltage": "yes" if lab["low_voltage"] else "no",
        "report": row["report"],
    }
    raw_png = plots / f"ecg_{row['ecg_id']:05d}.png"
    fig = render.plot_ecg(
        record.signal,
        record.fs,
        title=f"synthetic ECG {row['ecg_id']} (patient {row['patient_id']}, {row['split']} split)",
        labels=findings,
        path=raw_png,
    )
    fig.clear()
    paths = [raw_png]
    rows, fetch = preprocess.load_segments(segments_dir)
    match = [i for i, r in enumerate(rows) if str(r["record_id"]) == str(row["ecg_id"])]
    if match:
        seg = np.asarray(fetch(match[0]), dtype=np.float32)
        seg_png = plots / f"ecg_{row['ecg_id']:05d}_preprocessed.png"
        fig = render.plot_ecg(
            seg,
            preprocess.PreprocessConfig().target_fs,
            title=f"ECG {row['ecg_id']} after preprocessing (250 Hz, first segment)",
            path=seg_png,
        )
        fig.clear()
        paths.append(seg_png)
    return paths


def demo_config(workdir: Path, data: Path, seed: int, workers: int, num_ecgs: int = DEMO_ECGS):
    """``configs/ecgbyte_1024.py:demo`` pointed at this demo's directories and set size."""
    cfg = load_config("ecgbyte_1024:demo")
    cfg.workdir = str(workdir / "ecgbyte")
    cfg.data.root = str(data)
    cfg.data.generate_ecgs = num_ecgs
    cfg.data.workers = workers
    cfg.seed = seed
    return cfg


def print_prepared(manifest: dict[str, Any]) -> None:
    """Tokenizers and shards in a few lines."""
    ecg, txt, v = manifest["ecg_tokenizer"], manifest["text_tokenizer"], manifest["vocab"]
    print(
        f"  ECG-Byte tokenizer: {ecg['vocab_size']} ids ({ecg['vocab_size'] - 26} merges); "
        f"text tokenizer: {txt['vocab_size']} ids ({txt['family']} chat format); "
        f"LLM vocabulary: {v['total_size']} ids"
    )
    for split, s in manifest["splits"].items():
        print(
            f"  {split:<6s} {s['examples']:6d} examples in {len(s['shards'])} shards; "
            f"T = {manifest['budget']}: {s['ecg_tokens_kept']['mean']:.0f} ECG tokens kept "
            f"per example ({s['ecg_fraction_dropped']:.0%} of the ECG cut, "
            f"'{manifest['truncation']}' policy), {s['skipped']} skipped"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m elmjax.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", default="runs/demo", help="where everything is written")
    parser.add_argument("--num-ecgs", type=int, default=DEMO_ECGS)
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    workdir = Path(args.workdir)
    data, plots = workdir / "data", workdir / "plots"
    make_corpus(data, args.num_ecgs, args.seed, args.workers)

    t1 = time.perf_counter()
    cfg = demo_config(workdir, data, args.seed, args.workers, args.num_ecgs)
    print("[2/4] python -m elmjax.prepare --config=configs/ecgbyte_1024.py:demo")
    manifest = prepare.prepare(cfg)
    segments_dir = Path(cfg.workdir) / "segments"
    report = json.loads((segments_dir / "report.json").read_text())
    print(f"  prepared in {time.perf_counter() - t1:.1f} s")

    labels, questions = read_labels(data), read_questions(data)
    summary = summarise(labels, questions, report)
    summary["prepared"] = {
        split: {k: s[k] for k in ("examples", "tokens", "ecg_tokens_kept", "skipped")}
        for split, s in manifest["splits"].items()
    }
    print("[3/4] summary")
    print_summary(summary)
    print_prepared(manifest)

    paths = plot_example(data, segments_dir, labels, plots)
    print("[4/4] plots: " + ", ".join(str(p) for p in paths))
    summary["plots"] = [str(p) for p in paths]
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"done in {summary['seconds']:.1f} s; summary in {workdir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
