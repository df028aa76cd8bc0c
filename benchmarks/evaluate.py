"""Benchmark: evaluation answers/s, ``evaluate.generate_answers`` vs transformers ``generate``.

What is timed, per workload, batch by batch (below):

* elmjax: ``elmjax.evaluate.generate_answers(model, prompts, stop_ids=..., pad_id=...,
  max_new_tokens=..., batch_size=...)``, the function ``python -m elmjax.evaluate`` runs for
  every answer. Its batches come from ``evaluate.plan_batches``: prompts that share most of
  their ids (the questions about one ECG) are batched together and each group's common prefix
  is prefilled once (``generate.share_plan``); the prompts that share with none run shortest
  first. Each batch: one jitted prefill (prompt widths in ``generate.bucket_len`` steps,
  causal-blocked attention over the filled slots only), one compiled decode ``while_loop`` that
  ends when every row has produced a stop id or ``max_new_tokens`` ids. Greedy. The timed call
  includes bringing the answers to the host.
* elmjax unshared: the same with ``share_prefixes=False`` (on the same batches).
* transformers: ``LlamaForCausalLM.generate(input_ids, attention_mask=..., do_sample=False,
  max_new_tokens=..., eos_token_id=<the stop ids>, pad_token_id=...)`` under
  ``torch.inference_mode()``, float32, default (dynamic) cache and attention (sdpa), over the
  same batches (same order, same batch size), each batch left-padded to its longest prompt with
  an attention mask (what batched generation in transformers requires). ``generate`` too stops
  a batch once every row has produced a stop id. Its answers are cut at their first stop id,
  as ``generate_answers`` cuts its own.

All sides hold the same float32 weights and see the same batches. Timing: batch after batch,
the three sides run that batch back to back, in rotating order, so that the other jobs of a
shared machine weigh on all alike; each side's time is the sum over the batches (``--runs``
repeats the pass; the median is kept). The elmjax sides call ``generate_answers`` on each
batch's prompts, which forms exactly that batch (same shapes, same compiled functions as one
call over all prompts). Rates are answers (= examples) per second of wall time, and per second
of process CPU time.

Cold, not in the rates above: first, in the fresh process, one ``generate_answers`` call over
all prompts, compiles included (what a first evaluation pays; a later process with the
persistent compilation cache of the command-line tools loads most of them instead). Then the
unshared side's warm-up. The timed calls must not trace again (checked with
``elmjax.generate.TRACE_COUNTS``, printed). transformers runs the first batch once per thread
count. Threads: when another job holds one of the 2 cores, torch's two OpenMP threads wait for
each other at every small op (measured here: 15 decode steps of a 4-layer model took 10 s with
2 threads, 1 s with 1). So by default transformers runs every batch with 1 thread and with
torch's default count, and only the faster counts (its best case; ``--torch-threads N`` fixes
N); XLA's own thread pool has no such setting to sweep, and elmjax runs each batch once.

The greedy answers are compared answer by answer and position by position, elmjax against
transformers and shared against unshared (reported, not asserted: float32 summation order
differs, and random weights make near-ties). Also printed: the prompt positions each side's
prefills compute, padding included (elmjax's buckets and shared prefixes against
transformers' padding to the longest prompt of the batch), the decode steps, and how many
answers stopped.

Workloads:

1. ``random``: a Llama shaped like SmolLM2-135M (hidden 576, 9 heads, 3 kv heads,
   intermediate 1536, vocab 49152, tied) but with ``--layers`` layers (default 4, so that the
   whole script runs in a few minutes on 2 CPU cores; the real depth is 30), random weights
   (transformers' init, seed 0), saved with ``save_pretrained`` and loaded into elmjax with
   ``elmjax.models.hf.load_hf``. ``--prompts`` (128) prompts of random ids, lengths uniform in
   ``--prompt-len`` (200..500 tokens: a symbolic ECG-QA prompt), ``--max-new-tokens`` 16.
   **No stop id is ever hit: every answer is 16 ids, the worst case; and no two prompts share
   a prefix, so nothing is shared.** A randomly initialised Llama repeats one id: its first
   greedy id, then (mostly) the same id again, each row its own id. So the most frequent id at
   answer position 4 (the pilot rule for picking a stop id) occurs in one or two answers out of
   hundreds (the script prints it): no stop id makes a random model's answers end after a few
   ids, and a batch runs until its last row stops.
2. ``demo`` (when ``--demo-run`` holds a trained run, by default ``runs/ecgbyte_1024_demo``
   from ``make demo``): the real workload at a tiny size. The trained checkpoint (3 layers,
   width 128, vocabulary 1427 with the ECG tokens), loaded as ``python -m elmjax.evaluate``
   loads it (``elmjax.train.load_trained``), for elmjax; its ``export_hf`` float32 export for
   transformers. The whole prepared test split by default (1,258 questions about 392 ECGs,
   ``evaluate.predict``'s prompts: ECG-Byte ids, question; 84..510 tokens), the run's own stop
   id (end of turn) and pad id: real answers with real early stops (1..5 ids).
   ``--demo-limit N`` keeps N answers evenly spaced over the split (fewer questions per ECG).

``--breakdown`` also times the batch with the most prompt ids of each workload with
``max_new_tokens=1`` (the prefill and the first id) against the full answer length.

Usage::

    python benchmarks/evaluate.py                  # both workloads (about 4 minutes, 2 cores)
    python benchmarks/evaluate.py --prompts 256 --runs 3 --breakdown
    python benchmarks/evaluate.py --layers 30 --prompts 64    # the SmolLM2-135M depth (slow)
    python benchmarks/evaluate.py --small          # smoke run (tiny shapes, seconds)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from llm import SMALL, SMOLLM2_135M  # benchmarks/llm.py: the same model shapes

from elmjax import evaluate, generate
from elmjax.models import hf

DEMO_RUN = "runs/ecgbyte_1024_demo"
TORCH_DEFAULT_THREADS = [1]  # torch.get_num_threads() at start (set in main)


@dataclasses.dataclass
class Workload:
    name: str
    describe: str
    jax_model: Any
    torch_model: Any
    prompts: list[np.ndarray]
    stop_ids: tuple[int, ...] | None  # None: no stop id (every answer max_new_tokens long)
    pad_id: int
    max_new_tokens: int
    batch_size: int
    runs: int


# --------------------------------------------------------------------------------------------
# The two sides
# --------------------------------------------------------------------------------------------


def batches(prompts: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """The prompt indices of each batch, as ``generate_answers`` forms them."""
    return [b.rows for b in evaluate.plan_batches(prompts, batch_size)]


def elmjax_answers(w: Workload, share_prefixes: bool = True) -> list[np.ndarray]:
    # A stop id outside the vocabulary is never generated (argmax picks a real id).
    stop = w.stop_ids if w.stop_ids is not None else (w.jax_model.config.total_vocab,)
    return evaluate.generate_answers(
        w.jax_model,
        w.prompts,
        stop_ids=stop,
        pad_id=w.pad_id,
        max_new_tokens=w.max_new_tokens,
        batch_size=w.batch_size,
        share_prefixes=share_prefixes,
        progress=False,
    )


def torch_answers(w: Workload, only: Sequence[int] | None = None) -> list[np.ndarray]:
    """transformers' greedy answers (stop id removed), per prompt; ``only``: those batches."""
    import torch

    out: list[np.ndarray] = [np.zeros(0, np.int64)] * len(w.prompts)
    eos = list(w.stop_ids) if w.stop_ids is not None else None
    groups = batches(w.prompts, w.batch_size)
    for k, chunk in enumerate(groups):
        if only is not None and k not in only:
            continue
        width = max(len(w.prompts[i]) for i in chunk)
        ids = np.full((len(chunk), width), w.pad_id, np.int64)
        mask = np.zeros((len(chunk), width), np.int64)
        for j, i in enumerate(chunk):  # left padding
            ids[j, width - len(w.prompts[i]) :] = w.prompts[i]
            mask[j, width - len(w.prompts[i]) :] = 1
        with torch.inference_mode():
            gen = w.torch_model.generate(
                torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                do_sample=False,
                max_new_tokens=w.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=w.pad_id,
            )
        gen = gen[:, width:].numpy()
        for j, i in enumerate(chunk):
            row = gen[j]
            if eos is not None:
                hit = np.flatnonzero(np.isin(row, eos))
                row = row[: hit[0]] if hit.size else row
            out[i] = row
    return out


def new_tokens(answers: Sequence[np.ndarray], max_new: int) -> int:
    """Generated ids, stop ids included: a shorter answer than ``max_new`` ended with one."""
    return sum(len(a) + 1 if len(a) < max_new else max_new for a in answers)


def decode_steps(w: Workload, answers: Sequence[np.ndarray]) -> int:
    """Sum over batches of the longest generation (both sides run that many model steps)."""
    lengths = [min(len(a) + 1, w.max_new_tokens) for a in answers]
    return sum(max(lengths[i] for i in chunk) for chunk in batches(w.prompts, w.batch_size))


def prefill_positions(w: Workload) -> tuple[int, int, int]:
    """Prompt positions the prefills compute, padding included: elmjax (shared prefixes,
    ``generate.share_plan``), elmjax unshared (row and width buckets), transformers (padding
    to the longest prompt of the batch)."""
    mine = unshared = theirs = 0
    for batch in evaluate.plan_batches(w.prompts, w.batch_size):
        rows = [w.prompts[i] for i in batch.rows]
        lengths = np.array([len(p) for p in rows], np.int32)
        bb, p = generate.bucket_rows(len(rows)), generate.bucket_len(lengths.max())
        tokens = np.zeros((len(rows), lengths.max()), np.int32)
        for j, row in enumerate(rows):
            tokens[j, : len(row)] = row
        plan = generate.share_plan(tokens, lengths, batch.groups, rows=bb, width=p)
        unshared += bb * p
        mine += (
            bb * p
            if plan is None
            else len(plan.first) * plan.prefix_width + bb * (plan.suffix_width)
        )
        theirs += len(rows) * int(lengths.max())
    return mine, unshared, theirs


def agreement(mine: Sequence[np.ndarray], theirs: Sequence[np.ndarray]) -> dict:
    """Answers identical; and answer positions equal, of the longer answer's positions."""
    same = [len(a) == len(b) and bool(np.all(a == b)) for a, b in zip(mine, theirs, strict=True)]
    equal = sum(
        int(np.sum(a[: min(len(a), len(b))] == b[: min(len(a), len(b))]))
        for a, b in zip(mine, theirs, strict=True)
    )
    positions = sum(max(len(a), len(b), 1) for a, b in zip(mine, theirs, strict=True))
    return {"answers": float(np.mean(same)), "tokens": equal / positions}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def thread_counts(threads: int) -> list[int]:
    """transformers' thread counts to try: ``threads``, or 1 and torch's default."""
    return [threads] if threads else list(dict.fromkeys([1, TORCH_DEFAULT_THREADS[0]]))


def sub_workload(w: Workload, chunk: Sequence[int], **changes: Any) -> Workload:
    return dataclasses.replace(w, prompts=[w.prompts[i] for i in chunk], **changes)


def best_torch(w: Workload, counts: Sequence[int]) -> tuple[list[np.ndarray], float, float, int]:
    """transformers on ``w`` at each thread count -> answers, wall, CPU and count of the
    fastest."""
    import torch

    best = None
    for n in counts:
        torch.set_num_threads(n)
        out, wall, cpu = timed(lambda: torch_answers(w))
        if best is None or wall < best[1]:
            best = (out, wall, cpu, n)
    return best


SIDES = ("elmjax", "unshared", "torch")  # unshared: elmjax with share_prefixes=False


def run_side(side: str, w: Workload, counts: Sequence[int]) -> tuple[list, float, float, int]:
    """One side on ``w`` -> answers, wall, CPU, and transformers' fastest thread count (0)."""
    if side == "torch":
        return best_torch(w, counts)
    share = side == "elmjax"
    out, wall, cpu = timed(lambda: elmjax_answers(w, share_prefixes=share))
    return out, wall, cpu, 0


def run_workload(w: Workload, threads: int = 0, breakdown: bool = False) -> dict[str, Any]:
    print(f"\n## workload {w.name}: {w.describe}")
    lengths = np.array([len(p) for p in w.prompts])
    print(
        f"# {len(w.prompts)} prompts, {lengths.min()}..{lengths.max()} tokens "
        f"(mean {lengths.mean():.0f}), batch {w.batch_size}, max_new_tokens {w.max_new_tokens}, "
        f"stop ids {list(w.stop_ids) if w.stop_ids is not None else 'none (never stops)'}, "
        f"pad id {w.pad_id}"
    )
    plan = evaluate.plan_batches(w.prompts, w.batch_size)
    groups = evaluate.prefix_groups(w.prompts)
    print(
        f"# {len(groups)} prefix groups (sizes {dict(collections.Counter(map(len, groups)))}), "
        f"{len(plan)} batches"
    )
    counts = thread_counts(threads)
    r: dict[str, Any] = {"workload": w, "wall": {s: [] for s in SIDES}}
    r["cpu"] = {s: [] for s in SIDES}

    # Cold: one generate_answers call over all prompts in this fresh process, compiles
    # included (what a first evaluation pays). Then the unshared variant's warm-up.
    traces0 = collections.Counter(generate.TRACE_COUNTS)
    _, r["cold"], _ = timed(lambda: elmjax_answers(w))
    r["traces_first"] = dict(collections.Counter(generate.TRACE_COUNTS) - traces0)
    for b in plan:
        run_side("unshared", sub_workload(w, b.rows), counts)
    print(f"# elmjax cold call (compiles included): {r['cold']:.2f} s, traces {r['traces_first']}")
    t0 = time.perf_counter()
    for n in counts:  # transformers warm-up: the first batch at each thread count
        best_torch(sub_workload(w, plan[0].rows), [n])
    r["torch_warm"] = time.perf_counter() - t0
    print(f"# transformers warm-up (first batch at {counts} threads): {r['torch_warm']:.2f} s")

    # Timed: batch by batch, the sides back to back, in rotating order, so that the other jobs
    # on the machine weigh on all alike.
    traces0 = sum(generate.TRACE_COUNTS.values())
    answers = {s: [np.zeros(0, np.int64)] * len(w.prompts) for s in SIDES}
    wins = collections.Counter()
    for run in range(w.runs):
        tot = {s: [0.0, 0.0] for s in SIDES}
        for k, batch in enumerate(plan):
            sub = sub_workload(w, batch.rows)
            shift = (k + run) % len(SIDES)
            for side in SIDES[shift:] + SIDES[:shift]:
                out, wall, cpu, n = run_side(side, sub, counts)
                if side == "torch":
                    wins[n] += 1
                for j, i in enumerate(batch.rows):
                    answers[side][i] = out[j]
                tot[side][0] += wall
                tot[side][1] += cpu
        for side in SIDES:
            r["wall"][side].append(tot[side][0])
            r["cpu"][side].append(tot[side][1])
        print(
            f"# run {run}: "
            + "; ".join(f"{s} wall {tot[s][0]:.2f} s cpu {tot[s][1]:.2f} s" for s in SIDES),
            flush=True,
        )
    r["traces_timed"] = sum(generate.TRACE_COUNTS.values()) - traces0
    r["torch_wins"] = dict(sorted(wins.items()))
    for name in SIDES:
        r[name] = statistics.median(r["wall"][name])
        r[name + "_cpu"] = statistics.median(r["cpu"][name])
    mine, theirs = answers["elmjax"], answers["torch"]
    r["new_tokens"] = {
        "elmjax": new_tokens(mine, w.max_new_tokens),
        "torch": new_tokens(theirs, w.max_new_tokens),
    }
    r["steps"] = {"elmjax": decode_steps(w, mine), "torch": decode_steps(w, theirs)}
    r["prefill"] = prefill_positions(w)
    r["agree"] = agreement(mine, theirs)
    r["agree_unshared"] = agreement(mine, answers["unshared"])
    r["stopped"] = float(np.mean([len(a) < w.max_new_tokens for a in mine]))
    r["answer_len"] = float(np.mean([len(a) for a in mine]))
    r["echo"] = float(np.mean([len(a) > 1 and bool(np.all(a == a[0])) for a in mine]))
    fourth = collections.Counter(int(a[3]) for a in mine if len(a) > 3)
    r["pilot"] = fourth.most_common(1)[0] if fourth else None
    print(
        f"# timed calls traced {r['traces_timed']} times (0 = no recompile); transformers' "
        f"fastest thread count per batch: {r['torch_wins']}"
    )
    print(
        f"# answers: mean {r['answer_len']:.2f} ids (stop id excluded), {r['stopped']:.1%} "
        f"stopped; {r['echo']:.1%} are one id repeated; new ids generated elmjax "
        f"{r['new_tokens']['elmjax']} / transformers {r['new_tokens']['torch']}; decode steps "
        f"(sum over batches of the longest answer) {r['steps']['elmjax']} / "
        f"{r['steps']['torch']}"
    )
    if r["pilot"] is not None and w.stop_ids is None:
        print(
            f"# the most frequent 4th answer id ({r['pilot'][0]}) is the 4th id of "
            f"{r['pilot'][1]} of {len(mine)} answers ({len(fourth)} distinct 4th ids)"
        )
    mine_p, unshared_p, theirs_p = r["prefill"]
    print(
        f"# prefill positions computed (padding included): elmjax {mine_p:,} / unshared "
        f"{unshared_p:,} / transformers {theirs_p:,} ({mine_p / theirs_p:.2f}x)"
    )
    print(
        f"# greedy agreement with transformers: {r['agree']['answers']:.1%} of answers "
        f"identical, {r['agree']['tokens']:.1%} of answer positions; shared vs unshared: "
        f"{r['agree_unshared']['answers']:.1%} of answers identical"
    )
    if breakdown:
        r["breakdown"] = time_breakdown(w, counts)
    return r


def time_breakdown(w: Workload, counts: Sequence[int]) -> dict[str, float]:
    """Seconds of the batch with the most prompt ids on each side: ``max_new_tokens=1``
    (prefill and first id) and the workload's own ``max_new_tokens``; after a warm-up call of
    each. Also the longest answer's generated ids there (1: the decode loop had no step)."""
    big = max(batches(w.prompts, w.batch_size), key=lambda c: sum(len(w.prompts[i]) for i in c))
    out = {}
    for n in (1, w.max_new_tokens):
        sub = sub_workload(w, big, max_new_tokens=n)
        elmjax_answers(sub)  # warm-up (compiles the n = 1 decode loop)
        answers, out[f"elmjax_{n}"], _ = timed(lambda sub=sub: elmjax_answers(sub))
        out[f"torch_{n}"] = best_torch(sub, counts)[1]
    n = w.max_new_tokens
    out["generated"] = max(min(len(a) + 1, n) for a in answers)
    print(
        f"# batch with the most prompt ids ({len(big)} prompts, up to "
        f"{max(len(w.prompts[i]) for i in big)} tokens): max_new_tokens=1 elmjax "
        f"{out['elmjax_1']:.2f} s / transformers {out['torch_1']:.2f} s; max_new_tokens={n} "
        f"elmjax {out[f'elmjax_{n}']:.2f} s / transformers {out[f'torch_{n}']:.2f} s; its "
        f"longest answer {out['generated']} ids"
    )
    return out


# --------------------------------------------------------------------------------------------
# Models and workloads
# --------------------------------------------------------------------------------------------


def random_workload(args) -> Workload:
    import torch
    import transformers

    shapes = dict(SMALL if args.small else SMOLLM2_135M)
    if args.layers:
        shapes["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shapes)).float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        model, config = hf.load_hf(tmp, dtype="float32")
    lo, hi = args.prompt_len
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(lo, hi + 1, args.prompts)
    # ids from 1: 0 is the pad id
    prompts = [rng.integers(1, shapes["vocab_size"], n).astype(np.int32) for n in lengths]
    describe = (
        f"random-weight Llama, hidden {config.hidden_size}, {config.num_layers} layers, "
        f"vocab {config.total_vocab}, float32; random prompts; no stop (worst case)"
    )
    return Workload(
        "random",
        describe,
        model,
        ref,
        prompts,
        None,
        0,
        args.max_new_tokens,
        args.batch_size,
        args.runs,
    )


def demo_workload(args) -> Workload | None:
    run_dir = Path(args.demo_run)
    if not (run_dir / "checkpoints").is_dir():
        print(f"# no trained run in {run_dir}: the demo workload is skipped (make demo)")
        return None
    import transformers

    from elmjax import evaluate, inputs, train
    from elmjax.config import load_run_config

    cfg = load_run_config(run_dir)
    model, step = train.load_trained(cfg, run_dir)
    model.eval()
    run = inputs.RunInputs(cfg, run_dir)
    examples = evaluate.load_split(run_dir, "test")
    answers = evaluate.split_answers(examples, run.text_tokenizer)
    if args.demo_limit and args.demo_limit < len(answers):  # evenly spaced over the split
        keep = np.linspace(0, len(answers) - 1, args.demo_limit).round().astype(int)
        answers = [answers[i] for i in keep]
    prompts = [  # what evaluate.predict generates from (the "ecg" condition)
        np.asarray(examples[a.index]["input_ids"][: examples[a.index]["answer_spans"][a.k][0]])
        for a in answers
    ]
    with tempfile.TemporaryDirectory() as tmp:
        hf.export_hf(model, model.config, tmp, dtype="float32", overwrite=True)
        ref = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype="float32").eval()
    c = model.config
    describe = (
        f"trained demo checkpoint (step {step} of {run_dir}), hidden {c.hidden_size}, "
        f"{c.num_layers} layers, vocab {c.total_vocab}; test-split prompts; real stops"
    )
    return Workload(
        "demo",
        describe,
        model,
        ref,
        prompts,
        tuple(int(s) for s in run.text_tokenizer.stop_ids),
        int(run.vocab.pad_id),
        args.max_new_tokens,
        args.batch_size,
        args.demo_runs,
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def fmt_row(name: str, jax_v: float, torch_v: float, unit: str, higher=True) -> str:
    """A table row; the last column is elmjax's speed-up (>1: elmjax is faster)."""
    ratio = jax_v / torch_v if higher else torch_v / jax_v
    return f"| {name} | {_num(jax_v)} | {_num(torch_v)} | {unit} | {ratio:.2f}x |"


def table(results: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in results:
        w: Workload = r["workload"]
        n = len(w.prompts)
        head = f"{w.name}: {n} answers, batch {w.batch_size}, <= {w.max_new_tokens} new"
        rows += [
            fmt_row(head, n / r["elmjax"], n / r["torch"], "answers/s"),
            fmt_row(
                "  same, per process-CPU second",
                n / r["elmjax_cpu"],
                n / r["torch_cpu"],
                "answers/CPU-s",
            ),
            fmt_row(
                "  elmjax without prefix sharing",
                n / r["unshared"],
                n / r["torch"],
                "answers/s",
            ),
            fmt_row(
                "  elmjax cold (first pass, compiles included)",
                n / r["cold"],
                n / r["torch"],
                "answers/s",
            ),
            fmt_row(
                "  new ids generated per second",
                r["new_tokens"]["elmjax"] / r["elmjax"],
                r["new_tokens"]["torch"] / r["torch"],
                "ids/s",
            ),
            fmt_row("  wall time (median)", r["elmjax"], r["torch"], "s", higher=False),
            fmt_row(
                "  prompt positions computed (padding included)",
                r["prefill"][0],
                r["prefill"][2],
                "positions",
                higher=False,
            ),
        ]
        if "breakdown" in r:
            b, k = r["breakdown"], w.max_new_tokens
            rows.append(
                fmt_row(
                    "  biggest batch, prefill + 1st id", b["elmjax_1"], b["torch_1"], "s", False
                )
            )
            if b["generated"] > 1:  # else both calls did the same work (a difference is noise)
                rows.append(
                    fmt_row(
                        f"  biggest batch, the other {b['generated'] - 1} ids",
                        b[f"elmjax_{k}"] - b["elmjax_1"],
                        b[f"torch_{k}"] - b["torch_1"],
                        "s",
                        False,
                    )
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes and prompts (smoke run)")
    ap.add_argument("--layers", type=int, default=None, help="random model layers (default 4)")
    ap.add_argument("--prompts", type=int, default=None, help="random prompts (default 128)")
    ap.add_argument(
        "--prompt-len",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=None,
        help="random prompts' length range MIN,MAX (default 200,500)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--runs", type=int, default=1, help="timed runs of the random workload")
    ap.add_argument("--seed", type=int, default=0, help="random prompts' seed")
    ap.add_argument("--demo-run", default=DEMO_RUN, help="trained run directory (demo workload)")
    ap.add_argument(
        "--demo-limit",
        type=int,
        default=None,
        help="demo answers, evenly spaced (default 0: the whole test split, 1258)",
    )
    ap.add_argument("--demo-runs", type=int, default=1, help="timed runs of the demo workload")
    ap.add_argument(
        "--breakdown", action="store_true", help="also time the biggest batch with 1 new id"
    )
    ap.add_argument("--only", default="random,demo", help="comma list: random, demo")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="transformers threads (0: per batch, the faster of 1 and torch's default)",
    )
    args = ap.parse_args(argv)
    if args.small:
        args.layers = args.layers or 2
        args.prompts = args.prompts or 64
        args.prompt_len = args.prompt_len or (20, 60)
        args.max_new_tokens = args.max_new_tokens or 8
        args.batch_size = min(args.batch_size, 16)
        args.demo_limit = 64 if args.demo_limit is None else args.demo_limit
    args.layers = args.layers or 4
    args.prompts = args.prompts or 128
    args.demo_limit = 0 if args.demo_limit is None else args.demo_limit
    args.prompt_len = args.prompt_len or (200, 500)
    args.max_new_tokens = args.max_new_tokens or 16
    only = set(args.only.split(","))

    import torch
    import transformers

    TORCH_DEFAULT_THREADS[0] = torch.get_num_threads()
    print(f"# elmjax evaluation benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"# {platform.machine()} {cpu_name()} cpus={os.cpu_count()} "
        f"jax={jax.__version__} backend={jax.default_backend()} devices={jax.devices()} "
        f"torch={torch.__version__} transformers={transformers.__version__} "
        f"torch_threads={torch.get_num_threads()} load={os.getloadavg()}"
    )
    print(f"# args: {vars(args)}")

    results = []
    if "random" in only:
        results.append(run_workload(random_workload(args), args.torch_threads, args.breakdown))
    if "demo" in only:
        w = demo_workload(args)
        if w is not None:
            results.append(run_workload(w, args.torch_threads, args.breakdown))

    print()
    print("| benchmark | elmjax | transformers | unit | elmjax speed-up |")
    print("|---|---|---|---|---|")
    for row in table(results):
        print(row)
    print()
    for r in results:
        w = r["workload"]
        print(
            f"# {w.name}: answers identical {r['agree']['answers']:.1%}, answer positions "
            f"{r['agree']['tokens']:.1%}; {r['stopped']:.1%} stopped early; new ids "
            f"{r['new_tokens']['elmjax']:,} / {r['new_tokens']['torch']:,}; prefill positions "
            f"{r['prefill'][0]:,} (unshared {r['prefill'][1]:,}) / {r['prefill'][2]:,}; "
            f"elmjax cold pass {r['cold']:.1f} s"
        )
    print(f"# load at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
