"""Answer accuracy of a trained ELM on a prepared split, with and without the ECG.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from elmjax import prepare
from elmjax.data import records
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


def _batches(examples: Sequence[dict], batch_size: int):
    for start in range(0, len(examples), batch_size):
        yield examples[start : start + batch_size]


def exact_match(
    model: LLM,
    examples: Sequence[dict],
    vocab: text.EcgVocab,
    *,
    seq_len: int,
    without_ecg: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy exact-match accuracy (x100) of every answer, overall and per finding."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def predict(state, tokens, positions, segment_ids):
        logits = nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    correct: dict[str, list[bool]] = collections.defaultdict(list)
    bar = tqdm(
        total=len(examples),
        desc="eval" + (" (no ECG)" if without_ecg else ""),
        disable=not progress,
    )
    for chunk in _batches(examples, batch_size):
        rows = []
        for ex in chunk:
            ids, spans = ex["input_ids"].astype(np.int32), ex["answer_spans"].astype(np.int64)
            if without_ecg:
                ids, spans = drop_ecg(ids, spans, vocab)
            rows.append((ids, spans, json.loads(ex["conversation"])))
        b = batch_size  # fixed shape: one compilation
        tokens = np.full((b, seq_len), vocab.pad_id, np.int32)
        segment_ids = np.zeros((b, seq_len), np.int32)
        for i, (ids, _, _) in enumerate(rows):
            tokens[i, : len(ids)] = ids
            segment_ids[i, : len(ids)] = 1
        positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (b, seq_len))
        pred = np.asarray(predict(state, tokens, positions, segment_ids))
        for i, (ids, spans, conv) in enumerate(rows):
            labels = answer_labels(conv)
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
    model: LLM,
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
    out = Path(workdir) / "eval" / split
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


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
