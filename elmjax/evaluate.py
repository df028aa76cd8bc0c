"""Answer accuracy of a trained ELM on a prepared split, with and without the ECG.

    python -m elmjax.evaluate --config=configs/ecgbyte_1024.py:demo [--workdir=DIR]
        [--split=test] [--limit=N] [--step=S]

evaluates a run directory's last checkpoint (or ``--step``) and writes
``WORKDIR/eval/<split>/metrics.json`` and ``accuracy.png`` (accuracy per finding, with and
without the ECG). Training runs the same evaluation at its end when ``eval.after_training``.

Greedy decoding reproduces a reference answer exactly if and only if, at every answer position,
the model's most likely next token given the *reference* prefix is the reference token (by
induction over the answer: each greedy step then sees the same prefix as the reference). So the
exact-match accuracy of greedy generation is computed here with ONE forward pass per example,
teacher-forced, instead of an autoregressive loop: the same number, exactly, at a fraction of
the cost. The answer's end-of-turn token is part of the check, so an answer that would run on
counts as wrong, as it would in generation.

Prompts are the prepared examples themselves (``input_ids[:answer_start]``), so evaluation sees
exactly what training saw, ECG truncation included.

``without_ecg``: the same questions with the ECG ids removed from the prompt (the ``<ecg>``
``</ecg>`` markers stay, empty). A model that reads the ECG falls to chance there; one that has
learnt only the answer priors of the text does not.
"""

from __future__ import annotations

import collections
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from elmjax import prepare
from elmjax.data import pipeline, records
from elmjax.models import elm
from elmjax.models.llm import LLM
from elmjax.tokenize import text


def load_split(workdir: str | Path, split: str, limit: int | None = None) -> list[dict]:
    """The prepared examples of a split, in shard order (at most ``limit``)."""
    out: list[dict] = []
    for path in prepare.split_paths(workdir, split):
        out.extend(records.read_shard(path))
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def drop_ecg(ids: np.ndarray, spans: np.ndarray, vocab: text.EcgVocab):
    """``ids`` without its ECG ids, and the answer spans moved accordingly."""
    is_ecg = vocab.is_ecg(ids)
    before = np.concatenate([[0], np.cumsum(is_ecg)])  # ECG ids among ids[:i]
    return ids[~is_ecg], spans - before[spans]


def _finding(meta: dict[str, Any]) -> str:
    """A question's finding: its one ECG-QA attribute, else its attribute type."""
    attribute = meta.get("attribute")
    if isinstance(attribute, list) and len(attribute) == 1 and isinstance(attribute[0], str):
        return attribute[0]
    return meta.get("attribute_type") or "other"


def answer_labels(conversation: dict[str, Any]) -> list[str]:
    """The finding each answer of a conversation is about (:func:`_finding`)."""
    meta = conversation.get("meta", {})
    if "questions" in meta:  # grouped conversation
        return [_finding(q) for q in meta["questions"]]
    n = sum(t["role"] == "assistant" for t in conversation["turns"])
    return [_finding(meta)] * n


def _batches(examples: Sequence[Any], batch_size: int):
    for start in range(0, len(examples), batch_size):
        yield examples[start : start + batch_size]


def exact_match(
    model: LLM | elm.ELM,
    examples: Sequence[dict],
    vocab: text.EcgVocab,
    *,
    seq_len: int,
    without_ecg: bool = False,
    batch_size: int = 32,
    bucket: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy exact-match accuracy (x100) of every answer, overall and per finding.

    Rows run shortest first, each batch padded to its longest row rounded up to a multiple of
    ``bucket`` (at most ``seq_len``): a few shapes, so a few compilations, and no row pays for
    ``seq_len`` positions it does not have (ECG-less rows are a fifth as long)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def predict(state, tokens, positions, segment_ids, ecg):
        model = nnx.merge(graphdef, state)
        if ecg is None:  # symbolic, or an ELM's prompt without its placeholders
            model = model.llm if isinstance(model, elm.ELM) else model
            logits = model(tokens, positions=positions, segment_ids=segment_ids)
        else:
            logits = model(tokens, ecg, positions=positions, segment_ids=segment_ids)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    correct: dict[str, list[bool]] = collections.defaultdict(list)
    bar = tqdm(
        total=len(examples),
        desc="eval" + (" (no ECG)" if without_ecg else ""),
        disable=not progress,
    )
    rows = []
    for n, ex in enumerate(examples):
        ids, spans = ex["input_ids"].astype(np.int32), ex["answer_spans"].astype(np.int64)
        if without_ecg:
            ids, spans = drop_ecg(ids, spans, vocab)
        if len(ids) > seq_len:
            name = json.loads(ex["conversation"]).get("example_id", f"example {n}")
            raise ValueError(f"{name}: {len(ids)} tokens, more than seq_len={seq_len}")
        # signal / image: the ECG input (dropped with its placeholders when without_ecg)
        ecg = None if without_ecg or "ecg" not in ex else pipeline.ecg_model_input(ex["ecg"])
        rows.append((ids, spans, ex["conversation"], ecg))
    rows.sort(key=lambda r: len(r[0]))
    for chunk in _batches(rows, batch_size):
        width = min(seq_len, -(-len(chunk[-1][0]) // bucket) * bucket)
        b = batch_size  # fixed batch: the last one is padded
        tokens = np.full((b, width), vocab.pad_id, np.int32)
        segment_ids = np.zeros((b, width), np.int32)
        ecg = None
        if chunk[0][3] is not None:
            ecg = np.zeros((b, *chunk[0][3].shape), chunk[0][3].dtype)
        for i, (ids, _, _, row_ecg) in enumerate(chunk):
            tokens[i, : len(ids)] = ids
            segment_ids[i, : len(ids)] = 1
            if ecg is not None:
                ecg[i] = row_ecg
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), (b, width))
        pred = np.asarray(predict(state, tokens, positions, segment_ids, ecg))
        for i, (ids, spans, conv, _) in enumerate(chunk):
            labels = answer_labels(json.loads(conv))
            for k, (start, end) in enumerate(spans):
                ok = bool(np.all(pred[i, start - 1 : end - 1] == ids[start:end]))
                correct["all"].append(ok)
                correct[labels[k] if k < len(labels) else "other"].append(ok)
        bar.update(len(chunk))
    bar.close()
    return {
        name: {"accuracy": 100.0 * float(np.mean(v)), "answers": len(v)}
        for name, v in sorted(correct.items())
    }


def evaluate_split(
    model: LLM | elm.ELM,
    workdir: str | Path,
    split: str = "test",
    *,
    seq_len: int,
    limit: int | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Accuracy with and without the ECG on ``split``; writes ``WORKDIR/eval/<split>/``."""
    manifest = prepare.load_manifest(workdir)
    v = manifest["vocab"]
    vocab = text.EcgVocab(
        v["text_vocab_size"],
        v["ecg_vocab_size"],
        markers=v["markers"],
        text_pad_id=v["text_pad_id"],
    )
    examples = load_split(workdir, split, limit)
    with_ecg = exact_match(model, examples, vocab, seq_len=seq_len, batch_size=batch_size)
    no_ecg = exact_match(
        model, examples, vocab, seq_len=seq_len, batch_size=batch_size, without_ecg=True
    )
    metrics = {
        "split": split,
        "examples": len(examples),
        "answers": with_ecg["all"]["answers"],
        "accuracy": with_ecg["all"]["accuracy"],
        "accuracy_without_ecg": no_ecg["all"]["accuracy"],
        "by_finding": {
            name: {
                "answers": with_ecg[name]["answers"],
                "accuracy": with_ecg[name]["accuracy"],
                "accuracy_without_ecg": no_ecg[name]["accuracy"],
            }
            for name in with_ecg
            if name != "all"
        },
        "method": "greedy exact match, computed teacher-forced (identical to greedy decoding)",
    }
    if jax.process_index() == 0:  # every process computed the same numbers; one writes them
        out = Path(workdir) / "eval" / split
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        plot_accuracy(metrics, out / "accuracy.png")
    return metrics


def plot_accuracy(metrics: dict[str, Any], path: str | Path) -> None:
    """Bar chart of the accuracy per finding, with and without the ECG."""
    import matplotlib  # noqa: PLC0415 (only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = [*metrics["by_finding"], "all"]
    rows = [*metrics["by_finding"].values(), metrics]
    with_ecg = [r["accuracy"] for r in rows]
    without = [r["accuracy_without_ecg"] for r in rows]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    ax.barh(y - 0.2, with_ecg, 0.4, label="with the ECG", color="tab:red")
    ax.barh(y + 0.2, without, 0.4, label="ECG tokens removed", color="tab:gray")
    for yi, v in zip(y, with_ecg, strict=True):
        ax.text(v + 0.5, yi - 0.2, f"{v:.1f}", va="center", fontsize=8)
    ax.set_yticks(y, [f"{n} ({r['answers']})" for n, r in zip(names, rows, strict=True)])
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("exact-match accuracy (%)")
    ax.set_title(f"{metrics['split']} split: {metrics['answers']} answers")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(metrics: dict[str, Any]) -> None:
    """Accuracy per finding, with and without the ECG."""
    print(f"\n{metrics['split']} split: {metrics['answers']} answers")
    print(f"  {'finding':<28s} {'answers':>8s} {'with ECG':>9s} {'without':>9s}")
    for name, m in metrics["by_finding"].items():
        print(
            f"  {name:<28s} {m['answers']:8d} {m['accuracy']:8.1f}% "
            f"{m['accuracy_without_ecg']:8.1f}%"
        )
    print(
        f"  {'all':<28s} {metrics['answers']:8d} {metrics['accuracy']:8.1f}% "
        f"{metrics['accuracy_without_ecg']:8.1f}%"
    )


def main(argv: Sequence[str]) -> None:
    from elmjax import train  # noqa: PLC0415 (train imports this module lazily too)

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config=configs/X.py[:arg] is required")
    workdir = _WORKDIR.value or cfg.workdir
    try:
        model, step = train.load_trained(cfg, workdir, step=_STEP.value)
        results = evaluate_split(
            model,
            workdir,
            _SPLIT.value,
            seq_len=cfg.budget,
            limit=_LIMIT.value or None,
            batch_size=cfg.eval.batch_size,
        )
    except (train.ConfigError, prepare.PrepareError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"checkpoint: step {step} of {workdir}")
    print_table(results)
    print(f"wrote {Path(workdir) / 'eval' / _SPLIT.value}/metrics.json and accuracy.png")


if __name__ == "__main__":
    from absl import app, flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "configs/X.py[:arg]", lock_config=False
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: the config's)")
    _SPLIT = flags.DEFINE_string("split", "test", "prepared split to evaluate")
    _LIMIT = flags.DEFINE_integer("limit", 0, "examples (0: all)")
    _STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the last)")
    app.run(main)
