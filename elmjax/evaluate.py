"""Evaluation of a trained run: generated answers, metrics, ECG-utilisation and robustness.

    python -m elmjax.evaluate --workdir=RUN [--config=configs/X.py[:arg]] [--split=test]
        [--seeds=0,1,2] [--ablate=zeros,shuffled,text_only] [--perturb=noise:snr=10,...]
        [--temperature=T --top_p=P] [--max_new_tokens=N] [--limit=N] [--step=S]
        [--paper_compat] [--nobertscore | --bertscore_model=DIR]

loads the run's checkpoint (``train.load_trained``) and, for every condition (the real ECG,
each ablation, each perturbation) and seed, generates every answer of the split
(:func:`predict` -> :func:`generate_answers`), scores them (``elmjax.metrics``) and writes
``RUN/eval/<split>/predictions.jsonl``, ``metrics.json`` and ``accuracy.png``
(:func:`evaluate_run`; training runs it at its end when ``eval.after_training``). The prompt
of an answer is the prepared example up to it (``input_ids[:answer_start]``), so evaluation
sees exactly what training saw; a changed ECG is re-encoded through ``elmjax.inputs``.

Generation (:func:`generate_answers`): batches from :func:`plan_batches`, where the questions
about one ECG (prompts that share most of their ids, and an ELM's ECG input) run together and
``elmjax.generate`` prefills their common prefix once. On several processes
(``jax.distributed``, as in training) every process generates every answer on the model's mesh
and process 0 writes the files.

:func:`exact_match` is the teacher-forced shortcut for greedy exact-match accuracy: greedy
decoding reproduces a reference answer exactly if and only if, at every answer position, the
model's most likely next token given the reference prefix is the reference token, so one
forward pass per example gives the same number (the answer's end-of-turn token included).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from elmjax import generate, inputs, metrics, prepare
from elmjax.config import load_run_config
from elmjax.data import pipeline, records
from elmjax.ecg import perturb
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


def _right_pad(rows: Sequence[np.ndarray], width: int, pad_id: int) -> np.ndarray:
    out = np.full((len(rows), width), pad_id, np.int32)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = ids
    return out


@functools.partial(jax.jit, static_argnames="graphdef")
def _embed_inputs(state, tokens, ecg, *, graphdef):
    """An ELM's ``embed_inputs`` (module level: compiled once per graph and shapes)."""
    return nnx.merge(graphdef, state).embed_inputs(tokens, ecg)


class Batch(NamedTuple):
    """One generation batch: prompt indices and their prefix-group labels (None: no sharing)."""

    rows: list[int]
    groups: list[int] | None


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def prefix_groups(
    prompts: Sequence[np.ndarray], keys: Sequence[Any] | None = None
) -> list[list[int]]:
    """Prompts that share most of their ids (and their ``key``: an ELM's ECG input), as
    groups of indices: prompts in id order (then adjacent ones share the longest prefixes),
    and a prompt joins the group before it while the group's common prefix stays at least half
    of every member's length (the questions about one ECG, or a conversation's turns)."""
    blobs = [np.asarray(p).astype(">u4").tobytes() for p in prompts]  # byte order = id order
    order = sorted(range(len(prompts)), key=lambda i: (b"" if keys is None else keys[i], blobs[i]))
    out: list[list[int]] = []
    shared = longest = 0  # the last group's common prefix and longest member
    for i in order:
        p = np.asarray(prompts[i])
        if out and (keys is None or keys[i] == keys[out[-1][-1]]):
            common = min(shared, _common_prefix(np.asarray(prompts[out[-1][-1]]), p))
            if 2 * common >= max(longest, len(p)):
                out[-1].append(i)
                shared, longest = common, max(longest, len(p))
                continue
        out.append([i])
        shared = longest = len(p)
    return out


def plan_batches(
    prompts: Sequence[np.ndarray],
    batch_size: int,
    *,
    share_prefixes: bool = True,
    keys: Sequence[Any] | None = None,
) -> list[Batch]:
    """The batches ``generate_answers`` runs, in order.

    Without ``share_prefixes``: prompts shortest first, ``batch_size`` at a time. With it:
    the ``prefix_groups`` of several prompts ordered by their shared prefix's length (then the
    longest member), then the prompts that share with none, shortest first,
    packed ``batch_size`` prompts at a time (a group may span two batches), each batch
    labelled with its groups, so that ``generate.generate`` runs each shared prefix once."""
    if not share_prefixes:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        return [Batch(list(c), None) for c in _batches(order, batch_size)]

    def extent(group):  # the groups of one prompt last: batches of them run unshared
        first = np.asarray(prompts[group[0]])
        shared = min(_common_prefix(first, np.asarray(prompts[i])) for i in group)
        return len(group) == 1, shared, max(len(prompts[i]) for i in group)

    groups = sorted(prefix_groups(prompts, keys), key=extent)
    flat = [(i, g) for g, group in enumerate(groups) for i in group]
    return [Batch([i for i, _ in c], [g for _, g in c]) for c in _batches(flat, batch_size)]


def _ecg_key(x: np.ndarray) -> bytes:
    return (
        hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest()
        + repr((x.shape, x.dtype.str)).encode()
    )


def generate_answers(
    model: LLM | elm.ELM,
    prompts: Sequence[np.ndarray],
    ecgs: Sequence[np.ndarray] | None = None,
    *,
    stop_ids: int | Sequence[int],
    pad_id: int,
    max_new_tokens: int = 32,
    sampling: generate.Sampling | None = None,
    seed: int = 0,
    batch_size: int = 32,
    share_prefixes: bool = True,
    progress: bool = True,
    desc: str = "generate",
) -> list[np.ndarray]:
    """The answer ids (stop id removed) the model generates for each prompt, in order.

    ``model``: an ``LLM``, or an ``ELM`` with ``ecgs`` (one model input per prompt, stored
    float16 signals or uint8 printouts: each row's ECG vectors fill that row's placeholders);
    an ``ELM`` without ``ecgs`` runs its plain LLM (prompts without placeholders). Prompts run
    in the batches of :func:`plan_batches` through :func:`elmjax.generate.generate` (one
    prefill, one compiled decode loop per batch). With ``share_prefixes`` (the default),
    prompts that share most of their ids, and their ECG input, are batched together and their
    common prefix is computed once per batch (the questions asked about one ECG); the answers
    are the same as without (up to float summation order). Sampling draws depend on ``seed``,
    the batch size and the batches (batch ``k`` uses seed ``seed * 1_000_003 + k``); greedy
    (``sampling`` None, the default) does not.
    """
    if ecgs is not None and len(ecgs) != len(prompts):
        raise ValueError(f"{len(ecgs)} ECG inputs for {len(prompts)} prompts")
    is_elm = isinstance(model, elm.ELM)
    if ecgs is not None and not is_elm:
        raise ValueError("ECG inputs need an ELM (signal / image representation)")
    llm = model.llm if is_elm else model
    if ecgs is not None:
        graphdef, state = nnx.split(model)

    keys = [_ecg_key(np.asarray(x)) for x in ecgs] if ecgs is not None and share_prefixes else None
    plan = plan_batches(prompts, batch_size, share_prefixes=share_prefixes, keys=keys)
    out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress)
    for k, (chunk, groups) in enumerate(plan):
        rows = [np.asarray(prompts[i], np.int32) for i in chunk]
        lengths = np.asarray([len(r) for r in rows], np.int32)
        width = int(lengths.max())
        kwargs: dict[str, Any] = {}
        if ecgs is not None:
            # one embed compile per (batch_size, width bucket): pad rows and width
            bucket = generate.bucket_len(width)
            tokens = _right_pad(rows + [rows[0][:0]] * (batch_size - len(rows)), bucket, pad_id)
            x = np.stack([pipeline.ecg_model_input(ecgs[i]) for i in chunk])
            x = np.concatenate([x, np.zeros((batch_size - len(rows), *x.shape[1:]), x.dtype)])
            embeds, mask = _embed_inputs(state, tokens, x, graphdef=graphdef)
            kwargs = dict(embeds=embeds[: len(rows), :width], embed_mask=mask[: len(rows), :width])
        g = generate.generate(
            llm,
            _right_pad(rows, width, pad_id),
            lengths=lengths,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            pad_id=pad_id,
            sampling=sampling or generate.Sampling(),
            seed=seed * 1_000_003 + k,
            groups=groups,
            **kwargs,
        )
        tokens_out, n_out, stopped = (np.asarray(a) for a in g)
        for j, i in enumerate(chunk):
            out[i] = tokens_out[j, : n_out[j] - int(stopped[j])]
        bar.update(len(chunk))
    bar.close()
    return out


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


# ----------------------------------------------------------------------------------------------
# Conditions: the real ECG, its ablations and its perturbations
# ----------------------------------------------------------------------------------------------

ABLATIONS = ("ecg", "zeros", "shuffled", "text_only")
# Short names of the perturbation kinds and parameters on the command line
_KIND_ALIASES = {
    "wander": "baseline_wander",
    "bursts": "motion_bursts",
    "dropout": "lead_dropout",
    "scale": "amplitude_scale",
}
_PARAM_ALIASES = {"snr": "snr_db", "amplitude": "amplitude_mv", "amp": "amplitude_mv"}


@dataclasses.dataclass(frozen=True)
class Condition:
    """What the model is shown in place of each example's ECG.

    ``ecg``: the real one; ``zeros``: a flat-line ECG (all leads 0 mV) through the run's own
    input path (its ECG-Byte ids, zeros, or the printout of flat traces); ``shuffled``: another
    patient's ECG (a seeded derangement of the split's segments); ``text_only``: no ECG at all
    (the ECG ids or placeholders removed, the ``<ecg>`` markers kept; an ELM runs its LLM
    alone); ``perturb``: the real ECG with :func:`elmjax.ecg.perturb.apply_perturbations`
    ``specs`` applied (seeded per example), then encoded as in training.
    """

    name: str
    specs: tuple = ()  # perturbation spec dicts, as (key, value) tuples

    @property
    def perturb(self) -> list[dict[str, Any]]:
        return [dict(spec) for spec in self.specs]


def parse_perturbation(item: str) -> Condition:
    """``"noise:snr=10"``, ``"wander"``, ``"powerline:amplitude_mv=0.1:harmonics=1"`` or a
    :data:`elmjax.ecg.perturb.PRESETS` name -> a perturbation condition.

    A kind without parameters takes the ``moderate`` level of the presets (noise 10 dB SNR,
    wander 0.3 mV, mains 0.05 mV); aliases: ``wander``, ``bursts``, ``dropout``, ``scale``,
    ``snr`` (``snr_db``), ``amp`` / ``amplitude`` (``amplitude_mv``).
    """
    item = item.strip()
    if item in perturb.PRESETS:
        specs = perturb.PRESETS[item]
    else:
        kind, *params = item.split(":")
        kind = _KIND_ALIASES.get(kind, kind)
        spec: dict[str, Any] = {"kind": kind}
        preset = perturb.PRESETS.get(f"{kind}_moderate")
        if preset and not params:
            spec = dict(preset[0])
        for param in params:
            key, eq, value = param.partition("=")
            if not eq:
                raise ValueError(f"--perturb {item!r}: {param!r} is not key=value")
            try:
                spec[_PARAM_ALIASES.get(key, key)] = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--perturb {item!r}: {key}={value!r} is not a number") from e
        specs = [spec]
    specs = perturb.validate_specs(specs)
    return Condition(item, tuple(tuple(sorted(spec.items())) for spec in specs))


def parse_conditions(ablate: str | Sequence[str], perturbations: str | Sequence[str] = ()):
    """The conditions of a run: ``ecg`` first, then the ablations, then the perturbations."""
    names = [a.strip() for a in (ablate.split(",") if isinstance(ablate, str) else ablate)]
    unknown = [n for n in names if n and n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown --ablate {unknown}; use some of {', '.join(ABLATIONS)}")
    out = [Condition("ecg")] + [Condition(n) for n in names if n and n != "ecg"]
    items = perturbations.split(",") if isinstance(perturbations, str) else perturbations
    out += [parse_perturbation(p) for p in items if p.strip()]
    seen = [c.name for c in out]
    if len(set(seen)) != len(seen):
        raise ValueError(f"a condition is named twice: {seen}")
    return out


def _derangement(patients: Sequence[str], seed: int) -> np.ndarray:
    """``perm`` with ``patients[perm[i]] != patients[i]`` wherever possible (seeded)."""
    n = len(patients)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    for i in range(n):  # swap away every clash with a partner that does not clash after it
        if patients[perm[i]] != patients[i]:
            continue
        for j in rng.permutation(n):
            if patients[perm[j]] != patients[i] and patients[perm[i]] != patients[j]:
                perm[i], perm[j] = perm[j], perm[i]
                break
    return perm


def condition_examples(
    condition: Condition,
    examples: Sequence[dict],
    run: inputs.RunInputs,
    *,
    seed: int = 0,
    batch: int = 64,
) -> list[dict]:
    """The examples as the model sees them under ``condition`` (see :class:`Condition`)."""
    if condition.name == "ecg":
        return list(examples)
    if condition.name == "text_only":
        out = []
        for ex in examples:
            ids, spans = drop_ecg(ex["input_ids"], ex["answer_spans"], run.vocab)
            out.append({"input_ids": ids, "answer_spans": spans})
        return out
    convs = [json.loads(ex["conversation"]) for ex in examples]
    if condition.name == "zeros":
        payload = run.payloads(np.zeros((12, run.seg_len), np.float32))[0]
        return [run.example(c, payload) for c in convs]
    sources_of = list(range(len(convs)))
    if condition.name == "shuffled":
        sources_of = _derangement([c["patient_id"] for c in convs], seed).tolist()
    out = []
    for start in range(0, len(convs), batch):
        part = range(start, min(start + batch, len(convs)))
        x = np.stack([run.segment(convs[sources_of[i]]) for i in part])
        if condition.specs:
            x = np.stack(
                [
                    perturb.apply_perturbations(
                        x[k], run.fs, condition.perturb, np.random.default_rng([seed, i])
                    )[0]
                    for k, i in enumerate(part)
                ]
            )
        out += [run.example(convs[i], p) for i, p in zip(part, run.payloads(x), strict=True)]
    return out


# ----------------------------------------------------------------------------------------------
# The evaluation of a run
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answer:
    """One reference answer of a split: example ``index``, its ``k``-th answer."""

    index: int
    k: int
    example_id: str
    question: str
    reference: str
    kind: str


def split_answers(examples: Sequence[dict], tok: text.TextTokenizer) -> list[Answer]:
    """Every reference answer of the examples, with its question and finding."""
    out = []
    for n, ex in enumerate(examples):
        conv = json.loads(ex["conversation"])
        kinds = answer_labels(conv)
        users = [t["text"] for t in conv["turns"] if t["role"] == "user"]
        for k, (start, end) in enumerate(np.asarray(ex["answer_spans"])):
            out.append(
                Answer(
                    n,
                    k,
                    conv.get("example_id", f"example {n}"),
                    users[k] if k < len(users) else "",
                    tok.decode(ex["input_ids"][start:end]).strip(),
                    kinds[k] if k < len(kinds) else "other",
                )
            )
    return out


def predict(
    model: LLM | elm.ELM,
    examples: Sequence[dict],
    answers: Sequence[Answer],
    run: inputs.RunInputs,
    *,
    use_ecg: bool = True,
    **kwargs: Any,
) -> list[str]:
    """The model's answer text to each question of ``answers``, from its example's prompt
    (the reference prefix: earlier answers of a conversation are the reference ones)."""
    prompts = [
        examples[a.index]["input_ids"][: examples[a.index]["answer_spans"][a.k][0]] for a in answers
    ]
    ecgs = None
    if use_ecg and isinstance(model, elm.ELM):
        ecgs = [examples[a.index]["ecg"] for a in answers]
    ids = generate_answers(
        model,
        prompts,
        ecgs,
        stop_ids=run.text_tokenizer.stop_ids,
        pad_id=run.vocab.pad_id,
        **kwargs,
    )
    return [run.text_tokenizer.decode(a).strip() for a in ids]


def answer_intervals(
    preds: Sequence[str], refs: Sequence[str], match: np.ndarray, paper_compat: bool
) -> dict[str, list[float]]:
    """Bootstrap 95 % intervals over answers (1,000 resamples, seed 0) of the accuracy and,
    for the default recipe, corpus BLEU-4 (recomputed per resample), ROUGE-L and METEOR."""
    out = {}
    ci = metrics.bootstrap_ci(100.0 * match.astype(float), seed=0)
    out["accuracy"] = [ci["low"], ci["high"]]
    if not paper_compat:  # the reference's recipe scores corpus-level only
        ci = metrics.bootstrap_metric(metrics.bleu4_by_index(preds, refs), len(refs), seed=0)
        out["bleu4"] = [ci["low"], ci["high"]]
        each = metrics.per_example_scores(preds, refs)
        for key in ("rouge_l", "meteor"):
            ci = metrics.bootstrap_ci(each[key], seed=0)
            out[key] = [ci["low"], ci["high"]]
    return out


def evaluate_run(
    model: LLM | elm.ELM,
    cfg: Any,
    workdir: str | Path,
    split: str = "test",
    *,
    conditions: Sequence[Condition] | None = None,
    seeds: Sequence[int] = (0,),
    sampling: generate.Sampling | None = None,
    max_new_tokens: int = 32,
    limit: int | None = None,
    batch_size: int = 32,
    paper_compat: bool = False,
    bertscore: bool = True,
    bertscore_model: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generates every answer of ``split`` under each condition and seed; scores them.

    Writes ``WORKDIR/eval/<split>/predictions.jsonl`` (one line per answer, condition and seed:
    question, reference, prediction, finding, exact match), ``metrics.json`` (per condition:
    every metric per seed, their mean / std / 95 % t-interval over seeds and bootstrap 95 %
    intervals over answers (:func:`answer_intervals`); the ECG-utilisation of every other
    condition: its drop from the real ECG with a paired permutation test) and
    ``accuracy.png``. Returns the metrics.
    """
    conditions = list(conditions or parse_conditions(ABLATIONS))
    if not seeds:
        raise ValueError("no seeds to evaluate with: give at least one (--seeds=0)")
    run = inputs.RunInputs(cfg, workdir)
    examples = load_split(workdir, split, limit)
    if not examples:
        raise ValueError(f"{workdir}: the {split} split has no examples")
    answers = split_answers(examples, run.text_tokenizer)
    refs = [a.reference for a in answers]
    kinds = [a.kind for a in answers]
    per_condition: dict[str, dict[str, Any]] = {}
    hits: dict[str, np.ndarray] = {}  # condition -> per-answer exact match of the first seed
    lines = []
    for cond in conditions:
        runs = {}
        for seed in seeds:
            shown = condition_examples(cond, examples, run, seed=seed)
            preds = predict(
                model,
                shown,
                answers,
                run,
                use_ecg=cond.name != "text_only",
                sampling=sampling,
                seed=seed,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                progress=progress,
                desc=f"{cond.name} (seed {seed})",
            )
            scores = metrics.compute_all(
                preds,
                refs,
                groups=kinds,
                paper_compat=paper_compat,
                bertscore=bertscore,
                bertscore_model=bertscore_model,
            )
            match = np.asarray(
                [
                    metrics.normalize_answer(p) == metrics.normalize_answer(r)
                    for p, r in zip(preds, refs, strict=True)
                ]
            )
            if cond.name not in hits:  # the first seed's answers: intervals over answers, tests
                hits[cond.name] = match
                first_preds = preds
            runs[seed] = scores
            for a, pred, ok in zip(answers, preds, match, strict=True):
                lines.append(
                    {
                        "example_id": a.example_id,
                        "answer": a.k,
                        "condition": cond.name,
                        "seed": seed,
                        "finding": a.kind,
                        "question": a.question,
                        "reference": a.reference,
                        "prediction": pred,
                        "correct": bool(ok),
                    }
                )
        intervals = answer_intervals(first_preds, refs, hits[cond.name], paper_compat)
        names = [k for k, _ in _COLUMNS if runs[seeds[0]].get(k) is not None]
        per_condition[cond.name] = {
            "perturbation": cond.perturb or None,
            "per_seed": {str(seed): runs[seed] for seed in seeds},
            "summary": {
                name: metrics.seed_summary([runs[seed][name] for seed in seeds]) for name in names
            },
            "accuracy_bootstrap95": intervals["accuracy"],
            "bootstrap95": intervals,
        }
    base = per_condition["ecg"]["summary"]
    utilisation = {}
    for cond in conditions[1:]:
        summary = per_condition[cond.name]["summary"]
        test = metrics.paired_permutation_test(hits["ecg"], hits[cond.name], seed=0)
        utilisation[cond.name] = {
            "drop": {name: base[name]["mean"] - summary[name]["mean"] for name in summary},
            "accuracy_p_value": test["p_value"],
        }
    result = {
        "split": split,
        "examples": len(examples),
        "answers": len(answers),
        "seeds": list(seeds),
        "decoding": dataclasses.asdict(sampling or generate.Sampling())
        | {"max_new_tokens": max_new_tokens},
        "recipe": "paper_compat" if paper_compat else "default",
        "conditions": per_condition,
        "ecg_utilisation": utilisation,
        "accuracy": base["accuracy"]["mean"],
    }
    if "text_only" in per_condition:
        result["accuracy_without_ecg"] = per_condition["text_only"]["summary"]["accuracy"]["mean"]
    if jax.process_index() == 0:  # every process computed the same numbers; one writes them
        out = Path(workdir) / "eval" / split
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        (out / "metrics.json").write_text(json.dumps(json_safe(result), indent=1))
        plot_accuracy(result, out / "accuracy.png")
    return result


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _first_seed(result: dict[str, Any], condition: str) -> dict[str, Any]:
    return result["conditions"][condition]["per_seed"][str(result["seeds"][0])]


def plot_accuracy(result: dict[str, Any], path: str | Path) -> None:
    """Accuracy per finding under each condition (first seed), and overall."""
    import matplotlib  # noqa: PLC0415 (only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    conds = list(result["conditions"])
    by_type = {c: _first_seed(result, c).get("accuracy_by_type", {}) for c in conds}
    findings = sorted(by_type["ecg"])
    names = [*findings, "all"]
    y = np.arange(len(names))
    height = 0.8 / len(conds)
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8.5, 0.35 * len(names) * max(2, len(conds)) / 2 + 1.5))
    for j, c in enumerate(conds):
        values = [by_type[c].get(f, np.nan) for f in findings]
        values.append(_first_seed(result, c)["accuracy"])
        ax.barh(y - 0.4 + (j + 0.5) * height, values, height, label=c, color=colors(j))
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("exact-match accuracy (%)")
    ax.set_title(f"{result['split']} split: {result['answers']} answers")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_COLUMNS = (
    ("accuracy", "accuracy"),
    ("bleu4", "BLEU-4"),
    ("rouge_l", "ROUGE-L"),
    ("meteor", "METEOR"),
    ("bertscore_f1", "BERTScore"),
)


def print_table(result: dict[str, Any]) -> None:
    """Every metric under every condition (mean over seeds, +- the 95 % t-interval with
    several seeds), the accuracy drop from the real ECG with its p-value, and the accuracy per
    finding."""
    seeds = result["seeds"]
    print(
        f"\n{result['split']} split: {result['answers']} answers, {len(seeds)} seed(s), "
        f"{'greedy' if not result['decoding']['temperature'] else 'sampled'} decoding, "
        f"{result['recipe']} metrics"
    )
    columns = [(k, n) for k, n in _COLUMNS if k in result["conditions"]["ecg"]["summary"]]
    width = 16 if len(seeds) > 1 else 10
    print(
        f"  {'condition':<22s}"
        + "".join(f"{n:>{width}s}" for _, n in columns)
        + f"{'acc. drop':>11s}{'p':>8s}"
    )
    for name, c in result["conditions"].items():
        cells = []
        for key, _ in columns:
            m = c["summary"][key]
            cell = f"{m['mean']:.1f}" + (f" +- {m['ci95']:.1f}" if len(seeds) > 1 else "")
            cells.append(f"{cell:>{width}s}")
        u = result["ecg_utilisation"].get(name)
        drop = f"{u['drop']['accuracy']:11.1f}{u['accuracy_p_value']:8.3f}" if u else ""
        print(f"  {name:<22s}" + "".join(cells) + drop)
    conds = list(result["conditions"])
    by_type = {c: _first_seed(result, c).get("accuracy_by_type", {}) for c in conds}
    if by_type["ecg"]:
        print(f"\n  accuracy by finding (seed {seeds[0]})")
        print(f"  {'finding':<36s}" + "".join(f"{c[:12]:>13s}" for c in conds))
        for f in sorted(by_type["ecg"]):
            print(
                f"  {f:<36s}" + "".join(f"{by_type[c].get(f, float('nan')):12.1f}%" for c in conds)
            )


def eval_settings(cfg: Any) -> dict[str, Any]:
    """``evaluate_run`` keyword arguments from a config's ``eval`` block (defaults for keys a
    config does not set)."""
    e = cfg.get("eval", {})
    return {
        "conditions": parse_conditions(e.get("ablate", ",".join(ABLATIONS)), e.get("perturb", "")),
        "seeds": tuple(int(x) for x in str(e.get("seeds", "0")).split(",") if x.strip()),
        "sampling": generate.Sampling(
            temperature=e.get("temperature", 0.0),
            top_k=e.get("top_k", 0),
            top_p=e.get("top_p", 1.0),
        ),
        "max_new_tokens": e.get("max_new_tokens", 32),
        "limit": e.get("limit", 0) or None,
        "batch_size": e.get("batch_size", 32),
        "paper_compat": e.get("paper_compat", False),
        "bertscore": e.get("bertscore", True),
        "bertscore_model": e.get("bertscore_model", "") or None,
    }


def main(argv: Sequence[str]) -> None:
    from elmjax import train  # noqa: PLC0415 (train imports this module lazily too)

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    cfg = _CONFIG.value
    workdir = _WORKDIR.value or (cfg.workdir if cfg is not None else None)
    if workdir is None:
        raise app.UsageError("give --workdir=RUN (its config.json is used) or --config")
    try:
        if cfg is None:
            cfg = load_run_config(workdir)
        e = cfg.eval
        for key, flag in (
            ("ablate", _ABLATE),
            ("perturb", _PERTURB),
            ("seeds", _SEEDS),
            ("temperature", _TEMPERATURE),
            ("top_k", _TOP_K),
            ("top_p", _TOP_P),
            ("max_new_tokens", _MAX_NEW),
            ("limit", _LIMIT),
            ("paper_compat", _PAPER_COMPAT),
            ("bertscore", _BERTSCORE),
            ("bertscore_model", _BERTSCORE_MODEL),
        ):
            if flag.present:
                e[key] = flag.value
        settings = eval_settings(cfg)
        train.maybe_initialize_distributed()  # every process generates all; process 0 writes
        train.enable_compilation_cache()
        model, step = train.load_trained(cfg, workdir, step=_STEP.value)
        result = evaluate_run(model, cfg, workdir, _SPLIT.value, **settings)
    except (train.ConfigError, prepare.PrepareError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() != 0:  # process 0 wrote the files and prints the table
        return
    print(f"checkpoint: step {step} of {workdir}")
    print_table(result)
    out = Path(workdir) / "eval" / _SPLIT.value
    print(f"wrote {out}/metrics.json, predictions.jsonl and accuracy.png")


if __name__ == "__main__":
    from absl import app, flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "configs/X.py[:arg] (default: RUN/config.json)", lock_config=False
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: the config's)")
    _SPLIT = flags.DEFINE_string("split", "test", "prepared split to evaluate")
    _STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the last)")
    _SEEDS = flags.DEFINE_string("seeds", "0", "comma-separated seeds (sampling, shuffles, noise)")
    _ABLATE = flags.DEFINE_string(
        "ablate", ",".join(ABLATIONS), "conditions besides the real ECG: zeros,shuffled,text_only"
    )
    _PERTURB = flags.DEFINE_string(
        "perturb", "", "perturbations, e.g. noise:snr=10,wander,powerline_severe (see --helpfull)"
    )
    _TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy decoding")
    _TOP_K = flags.DEFINE_integer("top_k", 0, "sampling: keep the k likeliest ids (0: all)")
    _TOP_P = flags.DEFINE_float("top_p", 1.0, "sampling: nucleus probability")
    _MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "answer tokens to generate at most")
    _LIMIT = flags.DEFINE_integer("limit", 0, "examples (0: all)")
    _PAPER_COMPAT = flags.DEFINE_bool(
        "paper_compat", False, "the reference's recipe: NLTK BLEU (method1), rouge-package ROUGE-L"
    )
    _BERTSCORE = flags.DEFINE_bool("bertscore", True, "compute BERTScore F1")
    _BERTSCORE_MODEL = flags.DEFINE_string(
        "bertscore_model", "", "local BERTScore model directory (default: MiniLM-L6 offline)"
    )
    app.run(main)
