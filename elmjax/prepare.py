"""Records -> preprocessed segments -> tokenizers -> tokenized conversations -> shards.

    python -m elmjax.prepare --config=configs/ecgbyte_1024.py[:demo] [--config.x.y=...]

Steps (each resumable; a rerun redoes only what is missing):

1. the data set: the built-in synthetic one is generated when missing (``data.generate_ecgs``);
2. records -> 250 Hz segments of ``data.seg_len`` samples (:func:`elmjax.ecg.preprocess.run`,
   parallel, with its own ``report.json`` of skipped records);
3. conversations from the configured source (:mod:`elmjax.data.sources`), linked to the
   segments of their record, split by patient, capped, optionally grouped per segment;
4. the ECG-Byte tokenizer: loaded, imported from the reference's pickle, or trained on the
   TRAIN split's segments only;
5. the text tokenizer: a local Hugging Face directory, or (demo) one trained on the train text;
6. every needed segment -> ECG ids (batched, multi-core); every conversation -> an example
   through :func:`elmjax.tokenize.text.build_example` (the one function that evaluation and chat
   call too) -> ArrayRecord shards ``{split}-NNNNN-of-MMMMM.array_record`` written in parallel;
7. ``manifest.json``: counts, token-length statistics, the config hash and both tokenizer
   hashes; ``report.json``: every skipped example and why.

``representation="signal"`` / ``"image"`` (the LLaVA-style paths): the text side is the same
(tokenizer, chat template, system prompt, answer masks, budget), but no ECG-Byte tokenizer is
trained (step 4 is skipped) and the ECG block of each example is ``data.ecg_tokens`` (default 1,
the paper's pooled vector) copies of one placeholder id, ``text_vocab_size + 0`` (an
:class:`~elmjax.tokenize.text.EcgVocab` with one ECG id; ``text.ecg_markers`` as configured).
Each example also stores its ECG input as ``ecg``: the float16 segment ``[leads, seg_len]``
(``data.leads`` selects the rows), or the uint8 ``[S, S, 3]`` printout of
:func:`elmjax.ecg.render.model_images` (``data.image_layout``, default ``"6x2"``;
``data.image_size`` S, default 224: rendered at true paper scale, area-resized, never
cropped). The worker that writes a shard makes its examples' inputs from the segments, so
rendering runs on ``data.workers`` cores and memory holds one shard, not the dataset. The
manifest adds ``placeholder_id``, ``ecg_tokens`` and ``ecg_input`` (kind, shape,
stored dtype). Train these shards with ``fit="pad"`` or packed ECG slots (see
:mod:`elmjax.data.pipeline`).

Outputs under ``workdir``: ``segments/``, ``tokenizers/{ecgbyte.json,text/}``, ``shards/``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from elmjax.data import pipeline, records, sources
from elmjax.ecg import preprocess, render, synth
from elmjax.ecg.io import CANONICAL_LEADS
from elmjax.tokenize import ecgbyte, text

SHARD_FORMAT = "elmjax-shards/1"
SPLITS = ("train", "valid", "test")
REPRESENTATIONS = ("symbolic", "signal", "image")
MIN_IMAGE_SIZE = 32  # smaller images cannot show a 12-lead printout (or hold a 16-px patch grid)
# Defaults of the signal / image settings (absent from symbolic configs)
DEFAULT_ECG_TOKENS = 1  # the paper: one pooled vector per ECG, one placeholder token
DEFAULT_IMAGE_LAYOUT = "6x2"  # the reference's ecg_plot layout
DEFAULT_IMAGE_SIZE = 224


class PrepareError(RuntimeError):
    """A preparation step cannot go on (the message says what to fix)."""


# ----------------------------------------------------------------------------------------------
# Settings and hashes
# ----------------------------------------------------------------------------------------------


# data keys of the signal / image representations: hashed only for those (with their defaults
# resolved), so symbolic shards keep their hash whether or not a config names these keys
_REPR_KEYS = ("ecg_tokens", "image_layout", "image_size")


def ecg_input_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The signal / image settings of ``cfg`` with defaults resolved ({} for symbolic)."""
    if cfg.representation == "symbolic":
        return {}
    out = {"ecg_tokens": cfg.data.get("ecg_tokens", DEFAULT_ECG_TOKENS)}
    if cfg.representation == "image":
        out["image_layout"] = cfg.data.get("image_layout", DEFAULT_IMAGE_LAYOUT)
        out["image_size"] = cfg.data.get("image_size", DEFAULT_IMAGE_SIZE)
    return out


def shard_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that determine the shards' content (hashed into the manifest)."""
    symbolic = cfg.representation == "symbolic"
    settings = {
        "representation": cfg.representation,
        # download_hint does not change the shards; group_distinct only when set (older
        # shards stay valid); the signal / image keys only for those representations
        "data": {
            k: v
            for k, v in cfg.data.to_dict().items()
            if k != "download_hint" and (k != "group_distinct" or v) and k not in _REPR_KEYS
        }
        | ecg_input_settings(cfg),
        "text": cfg.text.to_dict(),
        "budget": cfg.budget,
        "truncation": cfg.truncation,
        "seed": cfg.seed,
        "model_checkpoint": cfg.get("model", {}).get("checkpoint", ""),
    }
    if symbolic:  # signal / image shards hold no ECG-Byte ids
        settings["ecg_tokenizer"] = cfg.ecg_tokenizer.to_dict()
    return settings


def settings_hash(settings: dict[str, Any]) -> str:
    """sha256 of the settings' canonical JSON."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def directory_hash(path: Path) -> str:
    """sha256 over the names and bytes of the files of a directory (the text tokenizer)."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(file.relative_to(path).as_posix().encode())
        h.update(file.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Steps 1-3: data, segments, conversations
# ----------------------------------------------------------------------------------------------


def ensure_data(cfg: ml_collections.ConfigDict) -> Path:
    """The data root; generates the synthetic set there when the config asks and it is missing."""
    root = Path(cfg.data.root)
    if cfg.data.source == "synthetic" and not (root / "ptbxl_database.csv").exists():
        if cfg.data.generate_ecgs <= 0:
            raise PrepareError(f"{root}: no synthetic data set and data.generate_ecgs is 0")
        print(f"generating {cfg.data.generate_ecgs} synthetic ECGs in {root}")
        synth.generate_corpus(
            root, num_ecgs=cfg.data.generate_ecgs, seed=cfg.seed, workers=cfg.data.workers
        )
    if not root.is_dir():
        hint = cfg.data.get("download_hint", "")
        raise PrepareError(f"data.root {root} does not exist" + (f": {hint}" if hint else ""))
    labels = root / "synth_labels.jsonl"  # one line per generated ECG
    if cfg.data.source == "synthetic" and cfg.data.generate_ecgs > 0 and labels.exists():
        with open(labels, encoding="utf-8") as f:
            n = sum(1 for line in f if line.strip())
        if n != cfg.data.generate_ecgs:
            raise PrepareError(
                f"{root} holds {n} synthetic ECGs but data.generate_ecgs is "
                f"{cfg.data.generate_ecgs}: delete {root} to generate the set again, or set "
                "data.root to another directory"
            )
    return root


def make_segments(cfg: ml_collections.ConfigDict, root: Path, workdir: Path) -> Path:
    """Preprocesses the records into ``workdir/segments`` (resumable)."""
    out = workdir / "segments"
    pp_cfg = preprocess.PreprocessConfig(
        target_fs=cfg.data.target_fs, seg_len=cfg.data.seg_len, mode=cfg.data.preprocess_mode
    )
    report = preprocess.run(cfg.data.layout, root, out, pp_cfg, workers=cfg.data.workers)
    counts = report["counts"]
    print(
        f"segments: {counts['segments']} from {counts['records_ok']} records "
        f"({counts['records_skipped']} skipped, see {out / 'report.json'})"
    )
    return out


def _template_id(meta: dict[str, Any]) -> int | None:
    try:
        return int(meta.get("template_id"))
    except (TypeError, ValueError):
        return None


def select_questions(
    convs: list[sources.Conversation],
    question_types: Sequence[str] = (),
    attributes: Sequence[str] = (),
    template_ids: Sequence[int] = (),
) -> tuple[list[sources.Conversation], dict[str, Any]]:
    """Keeps the QA items of the given question types and templates, about the given attributes.

    Each argument is a list of allowed values of an ECG-QA field; an empty list allows
    everything. ``question_types``: ``question_type`` (e.g. ``single-verify``);
    ``template_ids``: ``template_id``; ``attributes``: the ``attribute`` list (e.g.
    ``["atrial fibrillation"]``) must have every entry allowed. Items without an attribute
    list (ECG-QA's query questions, such as "What is the rhythm?") pass the attribute test:
    select them by template. Returns the kept items and counts of the dropped ones.
    """
    types, attrs, templates = set(question_types), set(attributes), set(template_ids)
    kept, dropped = [], collections.Counter()
    for c in convs:
        meta = c.meta
        if types and meta.get("question_type") not in types:
            dropped["question_type"] += 1
        elif templates and _template_id(meta) not in templates:
            dropped["template_id"] += 1
        elif attrs and meta.get("attribute") and not set(meta["attribute"]) <= attrs:
            dropped["attribute"] += 1
        else:
            kept.append(c)
    if (types or attrs or templates) and not kept:
        raise PrepareError(
            f"data.question_types={sorted(types)}, data.template_ids={sorted(templates)} and "
            f"data.attributes={sorted(attrs)} leave no QA item of {len(convs)}"
        )
    return kept, {"kept": len(kept), "dropped": dict(dropped)}


def load_conversations(
    cfg: ml_collections.ConfigDict, root: Path
) -> tuple[list[sources.Conversation], dict[str, Any]]:
    """Reads the configured source into conversations, filtered by the question selection."""
    convs, report = _read_source(cfg, root)
    types = tuple(cfg.data.get("question_types", ()) or ())
    attrs = tuple(cfg.data.get("attributes", ()) or ())
    templates = tuple(int(t) for t in cfg.data.get("template_ids", ()) or ())
    if types or attrs or templates:
        convs, report["selected"] = select_questions(convs, types, attrs, templates)
        report["kept"] = len(convs)
    return convs, report


def _read_source(
    cfg: ml_collections.ConfigDict, root: Path
) -> tuple[list[sources.Conversation], dict[str, Any]]:
    name, qa_root = cfg.data.source, Path(cfg.data.qa_root or root)
    variants = tuple(cfg.data.get("qa_variants", sources.ECGQA_VARIANTS))
    unknown = set(variants) - set(sources.ECGQA_VARIANTS)
    if unknown or not variants:
        raise PrepareError(
            f"data.qa_variants {list(variants)}: use one or both of {list(sources.ECGQA_VARIANTS)}"
        )
    if name == "synthetic":
        return sources.load_synthetic(root, variants=variants)
    if name in ("ecgqa-ptbxl", "ecgqa-mimic"):
        dataset = "ptbxl" if name == "ecgqa-ptbxl" else "mimic-iv-ecg"
        ecgqa_dir = qa_root / "ecgqa" if (qa_root / "ecgqa").is_dir() else qa_root
        return sources.load_ecgqa(ecgqa_dir, root, dataset, variants=variants)
    if name == "pulse":
        return sources.load_pulse(qa_root / "ECGInstruct.json", {cfg.data.layout: str(root)})
    if name == "ecg-chat":
        files = [qa_root / "pretrain_mimic.json", qa_root / "ecg_instruct_45k.json"]
        convs, reports = [], []
        for file in files:
            if file.exists():
                c, r = sources.load_ecg_chat(file, root)
                convs.extend(c)
                reports.append(r)
        if not reports:
            raise PrepareError(f"{qa_root}: none of {[f.name for f in files]} found")
        return convs, {"source": name, "files": reports}
    raise PrepareError(f"unknown data.source {name!r}; use one of {', '.join(SOURCES)}")


def segment_index(seg_dir: Path, root: Path) -> tuple[dict[str, list[int]], list, Any]:
    """Record (relative to the data root) -> its segment rows in order, plus the rows/fetch."""
    rows, fetch = preprocess.load_segments(seg_dir)
    by_record: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    root_abs = root.resolve()
    for i, row in enumerate(rows):
        path = Path(row["path"])
        try:
            key = path.resolve().relative_to(root_abs).as_posix()
        except ValueError:
            key = row["path"]
        by_record[key].append((int(row["segment"]), i))
    return {k: [i for _, i in sorted(v)] for k, v in by_record.items()}, rows, fetch


def link_and_split(
    cfg: ml_collections.ConfigDict,
    convs: list[sources.Conversation],
    segs_by_record: dict[str, list[int]],
) -> tuple[dict[str, list[sources.Conversation]], dict[str, Any]]:
    """Links conversations to segments, splits by patient and applies the caps."""
    report: dict[str, Any] = {}
    if cfg.data.segments == "all":
        counts = {k: len(v) for k, v in segs_by_record.items()}
        convs, report["segments"] = sources.expand_segments(convs, counts)
    elif cfg.data.segments == "first":
        kept = [dataclasses.replace(c, segment=0) for c in convs if segs_by_record.get(c.record)]
        report["segments"] = {
            "conversations": len(convs),
            "without_segments": len(convs) - len(kept),
        }
        convs = kept
    else:
        raise PrepareError(f"data.segments must be 'all' or 'first', got {cfg.data.segments!r}")

    fractions = dict(cfg.data.split_fractions)
    if cfg.data.split == "published":
        splits, report["split"] = sources.split_published(convs, fractions, cfg.seed)
    elif cfg.data.split == "patient":
        splits = sources.split_by_patient(convs, fractions, cfg.seed)
        report["split"] = {"overlap": sources.patient_overlap(splits)}
    else:
        raise PrepareError(f"data.split must be 'published' or 'patient', got {cfg.data.split!r}")

    caps = dict(cfg.data.max_examples)
    rng = np.random.default_rng(cfg.seed)
    for split in list(splits):
        items = splits[split]
        cap = caps.get(split)
        if cap is not None and len(items) > cap:
            keep = np.sort(rng.choice(len(items), cap, replace=False))
            splits[split] = [items[i] for i in keep]
            report.setdefault("capped", {})[split] = {"from": len(items), "to": cap}
    return splits, report


def group_per_segment(
    convs: list[sources.Conversation], k: int, seed: int, distinct: str = ""
) -> list[sources.Conversation]:
    """Joins up to ``k`` single-QA conversations about the same segment into multi-turn ones.

    Questions are shuffled within their segment (seeded) before grouping, so a group is not
    always the same question types in the same order. ``k <= 1`` returns the input unchanged.

    ``distinct`` names a question ``meta`` key (ECG-QA: ``"attribute_type"``) that no two
    questions of a group may share. Training is teacher-forced, so a later answer in a group
    sees the earlier reference answers: "What is the rhythm?" -> "sinus bradycardia" gives away
    "Does it show sinus tachycardia?", and the model learns to read the answer from the text
    instead of the ECG (which evaluation, one question per example, never offers). Questions
    without the key group freely. Each question joins the first group that still lacks its
    value and has room.
    """
    if k <= 1:
        return convs
    groups: dict[tuple[str, int | None], list[sources.Conversation]] = collections.defaultdict(list)
    for c in convs:
        groups[(c.record, c.segment)].append(c)
    rng = np.random.default_rng(seed)
    out = []
    for key in sorted(groups, key=lambda x: (x[0], -1 if x[1] is None else x[1])):
        members = groups[key]
        order = rng.permutation(len(members))
        members = [members[i] for i in order]
        parts: list[list[sources.Conversation]] = []
        for c in members:
            value = c.meta.get(distinct) if distinct else None
            for part in parts:
                if len(part) < k and (
                    value is None or all(m.meta.get(distinct) != value for m in part)
                ):
                    part.append(c)
                    break
            else:
                parts.append([c])
        for part in parts:
            turns = tuple(t for c in part for t in c.turns)
            meta = {
                "source": part[0].meta.get("source"),
                "grouped": [c.example_id for c in part],
                "questions": [c.meta for c in part],
            }
            out.append(
                dataclasses.replace(
                    part[0], example_id=part[0].example_id + f"+{len(part)}", turns=turns, meta=meta
                )
            )
    return out


# ----------------------------------------------------------------------------------------------
# Steps 4-5: tokenizers
# ----------------------------------------------------------------------------------------------


def lead_indices(cfg: ml_collections.ConfigDict) -> list[int] | None:
    """Rows of the canonical 12-lead order that ``data.leads`` keeps (None: all 12)."""
    leads = tuple(cfg.data.get("leads", ()) or ())
    if not leads:
        return None
    by_name = {name.lower(): i for i, name in enumerate(CANONICAL_LEADS)}
    unknown = [lead for lead in leads if lead.lower() not in by_name]
    if unknown:
        raise PrepareError(
            f"data.leads: unknown lead(s) {unknown}; use names from {list(CANONICAL_LEADS)}"
        )
    idx = [by_name[lead.lower()] for lead in leads]
    if len(set(idx)) != len(idx):
        raise PrepareError(f"data.leads {list(leads)} names a lead twice")
    return idx


def _segment_batches(rows_idx: Sequence[int], fetch, batch: int = 512, leads=None):
    """Float32 ``[b, 12, L]`` batches of the given segment rows, in order (``leads``: rows kept)."""
    for start in range(0, len(rows_idx), batch):
        part = rows_idx[start : start + batch]
        x = np.stack([np.asarray(fetch(i), dtype=np.float32) for i in part])
        yield part, x if leads is None else x[:, leads]


def model_vocab_size(cfg: ml_collections.ConfigDict) -> int:
    """Embedding rows of the configured LLM checkpoint (0 without one).

    ECG ids go after ``max(tokenizer vocabulary, embedding rows)``: Qwen 2.5's embedding has
    more rows than its tokenizer has tokens, and those spare rows must not be reused.
    """
    checkpoint = cfg.get("model", {}).get("checkpoint", "")
    if not checkpoint:
        return 0
    config = Path(checkpoint) / "config.json"
    if not config.exists():
        hint = cfg.model.get("download_hint", "") or (
            "download the model's Hugging Face files (config.json, model.safetensors*, "
            "tokenizer*) into that directory, or set --config.model.checkpoint=DIR"
        )
        raise PrepareError(f"model.checkpoint {checkpoint}: no config.json there. To fix: {hint}")
    return int(json.loads(config.read_text()).get("vocab_size", 0))


def ecg_tokenizer(
    cfg: ml_collections.ConfigDict, workdir: Path, train_rows: Sequence[int], fetch
) -> ecgbyte.ECGByteTokenizer:
    """Loads, imports or trains (on ``train_rows`` only) the ECG-Byte tokenizer."""
    out = workdir / "tokenizers" / "ecgbyte.json"
    tc = cfg.ecg_tokenizer
    if tc.path:
        return ecgbyte.ECGByteTokenizer.load(tc.path)
    if tc.reference_pickle:
        tok = ecgbyte.ECGByteTokenizer.from_reference_pickle(tc.reference_pickle)
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.save(out)
        return tok
    if out.exists():  # made by an earlier run of this workdir (same settings: see _check_settings)
        print(f"ECG tokenizer: reusing {out}")
        return ecgbyte.ECGByteTokenizer.load(out)
    rng = np.random.default_rng(cfg.seed)
    rows = np.asarray(sorted(set(train_rows)))
    if len(rows) > tc.max_train_ecgs:
        rows = np.sort(rng.choice(rows, tc.max_train_ecgs, replace=False))
    if len(rows) == 0:
        raise PrepareError("no training segments to train the ECG tokenizer on")
    centred = tc.get("centred_norm", False)  # configs older than the option: min-max
    symbols = np.concatenate(
        [
            ecgbyte.discretise(x, per_lead=tc.per_lead_norm, centred=centred).symbols
            for _, x in _segment_batches(rows.tolist(), fetch, leads=lead_indices(cfg))
        ]
    )
    t0 = time.perf_counter()
    tok = ecgbyte.ECGByteTokenizer.train(
        symbols,
        tc.num_merges,
        per_lead_norm=tc.per_lead_norm,
        centred_norm=centred,
        lead_boundaries=tc.lead_boundaries,
        mode=tc.encode_mode,
        workers=cfg.data.workers,
    )
    print(
        f"ECG tokenizer: {tc.num_merges} merges on {len(rows)} train segments in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    return tok


def text_tokenizer(
    cfg: ml_collections.ConfigDict, workdir: Path, train: Sequence[sources.Conversation]
) -> tuple[text.TextTokenizer, Path]:
    """The LLM tokenizer: ``text.tokenizer`` if given, else one trained on the train text."""
    if cfg.text.tokenizer:
        path = Path(cfg.text.tokenizer)
        return text.load_text_tokenizer(path, template=cfg.text.family or None), path
    path = workdir / "tokenizers" / "text"
    if not (path / "tokenizer.json").exists():
        corpus = [cfg.text.system_prompt] + [t["text"] for c in train for t in c.turns]
        text.train_local_tokenizer(
            corpus, path, vocab_size=cfg.text.train_vocab_size, family=cfg.text.family
        )
        print(f"text tokenizer: trained a {cfg.text.train_vocab_size}-id byte-level BPE -> {path}")
    return text.load_text_tokenizer(path, template=cfg.text.family or None), path


def ecg_ids_of(
    cfg: ml_collections.ConfigDict, tok: ecgbyte.ECGByteTokenizer, x: np.ndarray
) -> list[Any]:
    """ECG-Byte payloads of ``x [B, leads, L]`` (leads already selected): a lead-major id stream
    each (``truncation="head"``), or per-lead ids + token lengths (``"time"``)."""
    per_lead = cfg.truncation == "time"
    encoded = tok.encode_signal(
        x, mode=cfg.ecg_tokenizer.encode_mode, leads=per_lead, workers=cfg.data.workers
    )
    if per_lead:
        return [(ids, [tok.token_lengths(lead) for lead in ids]) for ids in encoded]
    return list(encoded)


def encode_segments(
    cfg: ml_collections.ConfigDict, tok: ecgbyte.ECGByteTokenizer, rows_idx: Sequence[int], fetch
) -> dict[int, Any]:
    """Segment row -> its ECG ids (:func:`ecg_ids_of`)."""
    out: dict[int, Any] = {}
    bar = tqdm(total=len(rows_idx), desc="ECG -> ids", unit="seg", disable=not len(rows_idx))
    for part, x in _segment_batches(list(rows_idx), fetch, leads=lead_indices(cfg)):
        for i, payload in zip(part, ecg_ids_of(cfg, tok, x), strict=True):
            out[i] = payload
        bar.update(len(part))
    bar.close()
    return out


def ecg_input_spec(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """What each example of a signal / image representation stores as its ``ecg`` field.

    ``signal``: the preprocessed segment, float16 ``[leads, seg_len]`` (mV at
    ``data.target_fs``; the pipeline hands it to the model as float32). ``image``: the
    printout (:func:`elmjax.ecg.render.model_images`), uint8 ``[S, S, 3]``.
    """
    leads = lead_indices(cfg)
    n_leads = len(CANONICAL_LEADS) if leads is None else len(leads)
    if cfg.representation == "signal":
        return {"kind": "signal", "shape": [n_leads, int(cfg.data.seg_len)], "dtype": "float16"}
    size = int(ecg_input_settings(cfg)["image_size"])
    return {
        "kind": "image",
        "shape": [size, size, 3],
        "dtype": "uint8",
        "layout": ecg_input_settings(cfg)["image_layout"],
        "leads": [CANONICAL_LEADS[i] for i in (leads or range(len(CANONICAL_LEADS)))],
    }


def ecg_inputs_of(spec: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """The ``ecg`` arrays of ``spec`` (:func:`ecg_input_spec` plus ``fs``) for ``x [B, leads, L]``
    (leads already selected): float16 signals, or rendered uint8 printouts."""
    if spec["kind"] == "signal":
        arrays = np.asarray(x).astype(np.float16)
    else:
        arrays = render.model_images(
            x, fs=spec["fs"], size=spec["shape"][0], layout=spec["layout"], leads=spec["leads"]
        )
    if tuple(arrays.shape[1:]) != tuple(spec["shape"]):
        raise PrepareError(f"ECG inputs {arrays.shape[1:]}, expected {spec['shape']}")
    return arrays


def ecg_input_arrays(
    spec: dict[str, Any], rows_idx: Sequence[int], fetch, batch: int = 64
) -> dict[int, np.ndarray]:
    """Segment row -> its ``ecg`` array (:func:`ecg_inputs_of`; ``spec["lead_rows"]``: the
    rows of the canonical 12 kept), batched."""
    out: dict[int, np.ndarray] = {}
    for part, x in _segment_batches(list(rows_idx), fetch, batch=batch, leads=spec["lead_rows"]):
        out.update(zip(part, ecg_inputs_of(spec, x), strict=True))
    return out


def check_placeholder_block(
    input_ids: np.ndarray, placeholder_id: int, n: int, name: str = ""
) -> None:
    """Host-side check (as :func:`elmjax.models.elm.check_placeholders` does per row) that an
    example holds exactly ``n`` placeholder ids, in one contiguous block."""
    where = np.flatnonzero(np.asarray(input_ids) == placeholder_id)
    if len(where) != n or (n and where[-1] - where[0] != n - 1):
        raise PrepareError(
            f"example {name!r}: {len(where)} placeholder id(s) {placeholder_id} at "
            f"{where.tolist()[:8]}, expected exactly {n} in one block"
        )


# ----------------------------------------------------------------------------------------------
# Step 6: examples and shards
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """Everything one worker needs to write one shard (picklable)."""

    path: str
    split: str
    items: tuple  # (conversation dict, ecg payload or None, segment row)
    text_tokenizer: str
    family: str
    vocab: text.EcgVocab
    budget: int
    policy: str
    system: str | None
    ecg_tokens: int = 0  # signal / image: placeholders every example must hold (0: symbolic)
    segments: str = ""  # the segments directory the rows index
    store_signal: bool = False  # keep each example's preprocessed segment as ``signal``
    ecg_input: dict | None = None  # signal / image: ecg_input_spec + fs + lead_rows


_TOKENIZERS: dict[tuple[str, str], text.TextTokenizer] = {}


def _cached_tokenizer(path: str, family: str) -> text.TextTokenizer:
    if (path, family) not in _TOKENIZERS:
        _TOKENIZERS[(path, family)] = text.load_text_tokenizer(path, template=family or None)
    return _TOKENIZERS[(path, family)]


_SEGMENTS: dict[str, Any] = {}


def _cached_fetch(seg_dir: str):
    """This process's reader of a segments directory (workers open it once, not per shard)."""
    if seg_dir not in _SEGMENTS:
        _SEGMENTS[seg_dir] = preprocess.load_segments(seg_dir)[1]
    return _SEGMENTS[seg_dir]


def make_example(
    tok: text.TextTokenizer,
    conversation: sources.Conversation,
    ecg: Any,
    *,
    vocab: text.EcgVocab,
    budget: int,
    policy: str,
    system: str | None,
    signal: np.ndarray | None = None,
    ecg_input: np.ndarray | None = None,
) -> dict[str, Any]:
    """A conversation + its ECG ids -> the record stored in a shard.

    For the signal / image representations ``ecg`` is ``ecg_tokens`` zeros (the one id of a
    one-entry :class:`~elmjax.tokenize.text.EcgVocab`: the placeholder) and ``ecg_input`` the
    array stored as the record's ``ecg`` field.
    """
    if isinstance(ecg, tuple):
        ids, lengths = ecg
    else:
        ids, lengths = ecg, None
    ex = text.build_example(
        tok,
        conversation.turns,
        ids,
        budget=budget,
        policy=policy,
        system=system,
        ecg_vocab=vocab,
        token_lengths=lengths,
        name=conversation.example_id,
    )
    record = {
        "input_ids": ex.input_ids.astype(np.int32),
        "loss_mask": ex.loss_mask.astype(np.uint8),
        "answer_spans": np.asarray(ex.answer_spans, np.int32).reshape(-1, 2),
        "ecg_kept": ex.ecg_kept,
        "ecg_dropped": ex.ecg_dropped,
        "example_id": conversation.example_id,
        "conversation": json.dumps(conversation.to_dict(), sort_keys=True),
    }
    if signal is not None:
        record["signal"] = np.asarray(signal, np.float16)
    if ecg_input is not None:
        record["ecg"] = np.asarray(ecg_input)
    return record


def write_shard_task(task: ShardTask) -> dict[str, Any]:
    """Builds and writes one shard; returns its statistics and skipped examples."""
    tok = _cached_tokenizer(task.text_tokenizer, task.family)
    fetch = _cached_fetch(task.segments) if task.store_signal or task.ecg_input else None
    # signal / image inputs are made here, one shard at a time (in the worker processes): the
    # main process never holds a whole dataset of rendered images
    inputs = (
        ecg_input_arrays(task.ecg_input, sorted({row for *_, row in task.items}), fetch)
        if task.ecg_input
        else {}
    )
    built, skipped = [], []
    for conv_dict, ecg, row in task.items:
        conv = sources.Conversation.from_dict(conv_dict)
        signal = np.asarray(fetch(row), np.float16) if task.store_signal else None
        ecg_input = inputs.get(row)
        try:
            built.append(
                make_example(
                    tok,
                    conv,
                    ecg,
                    vocab=task.vocab,
                    budget=task.budget,
                    policy=task.policy,
                    system=task.system,
                    signal=signal,
                    ecg_input=ecg_input,
                )
            )
        except text.TextTooLongError as e:
            skipped.append(
                {"example_id": conv.example_id, "reason": "text too long", "detail": str(e)}
            )
            continue
        if task.ecg_tokens and built[-1]["ecg_kept"] < task.ecg_tokens:
            built.pop()  # a cut placeholder block would not match the encoder's vectors
            skipped.append(
                {
                    "example_id": conv.example_id,
                    "reason": "placeholders do not fit",
                    "detail": f"the text leaves no room for {task.ecg_tokens} placeholder "
                    f"token(s) in the budget of {task.budget} tokens",
                }
            )
        elif ecg is not None and built[-1]["ecg_kept"] == 0:
            built.pop()  # the text leaves no room for a single ECG token: useless to train on
            skipped.append(
                {
                    "example_id": conv.example_id,
                    "reason": "no ECG token fits",
                    "detail": f"the text fills the budget of {task.budget} tokens",
                }
            )
    if task.ecg_tokens:
        placeholder = task.vocab.to_llm([0])[0]
        for r in built:
            check_placeholder_block(r["input_ids"], placeholder, task.ecg_tokens, r["example_id"])
    records.write_shard(task.path, built)
    lengths = [len(r["input_ids"]) for r in built]
    stats = {
        "path": Path(task.path).name,
        "examples": len(built),
        "lengths": lengths,
        "ecg_kept": [r["ecg_kept"] for r in built],
        "ecg_dropped": [r["ecg_dropped"] for r in built],
        "answer_tokens": int(sum(int(r["loss_mask"].sum()) for r in built)),
        "skipped": skipped,
    }
    done = Path(task.path).with_suffix(".done.json")
    done.write_text(json.dumps(stats))
    return stats


def _summary(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    v = np.asarray(values, dtype=np.float64)
    return {
        "mean": round(float(v.mean()), 1),
        "p50": float(np.percentile(v, 50)),
        "p95": float(np.percentile(v, 95)),
        "max": float(v.max()),
    }


def _run_shard_tasks(tasks: list[ShardTask], workers: int) -> list[dict[str, Any]]:
    if not tasks:
        return []
    if workers <= 1 or len(tasks) <= 1:
        return [write_shard_task(t) for t in tqdm(tasks, desc="shards", unit="shard")]
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(
            tqdm(pool.map(write_shard_task, tasks), total=len(tasks), desc="shards", unit="shard")
        )


def plan_shards(
    cfg: ml_collections.ConfigDict, out: Path, splits: dict[str, list[sources.Conversation]]
) -> list[tuple[str, Path, list[sources.Conversation]]]:
    """Every shard as ``(split, path, conversations)``, in order."""
    per = int(cfg.data.examples_per_shard)
    plan = []
    for split in SPLITS:
        convs = splits.get(split, [])
        n_shards = -(-len(convs) // per)
        for j in range(n_shards):
            path = out / f"{split}-{j:05d}-of-{n_shards:05d}.array_record"
            plan.append((split, path, convs[j * per : (j + 1) * per]))
    return plan


def _is_done(path: Path) -> bool:
    return path.exists() and path.with_suffix(".done.json").exists()


def write_shards(
    cfg: ml_collections.ConfigDict,
    plan: list[tuple[str, Path, list[sources.Conversation]]],
    ecg_ids: dict[int, Any],
    segment_rows: dict[str, int],
    seg_dir: Path,
    text_path: Path,
    vocab: text.EcgVocab,
) -> dict[str, Any]:
    """Writes the shards of ``plan`` not yet finished; returns per-split statistics.

    ``ecg_ids``: segment row -> its ECG-Byte ids (symbolic) or its placeholder block. The
    signal / image input of each example (:func:`ecg_input_spec`) is made by the worker that
    writes its shard, from the segments in ``seg_dir``.
    """
    symbolic = cfg.representation == "symbolic"
    ecg_input = None
    if not symbolic:
        ecg_input = ecg_input_spec(cfg) | {
            "fs": float(cfg.data.target_fs),
            "lead_rows": lead_indices(cfg),
        }
    tasks, stats = [], collections.defaultdict(list)
    for split, path, convs in plan:
        if _is_done(path):
            stats[split].append(json.loads(path.with_suffix(".done.json").read_text()))
            continue
        items = []
        for c in convs:
            row = segment_rows[c.example_id]
            items.append((c.to_dict(), ecg_ids[row], row))
        tasks.append(
            ShardTask(
                str(path),
                split,
                tuple(items),
                str(text_path),
                cfg.text.family,
                vocab,
                cfg.budget,
                # placeholders are never cut ("time" needs per-lead ECG-Byte ids)
                cfg.truncation if symbolic else "head",
                cfg.text.system_prompt or None,
                0 if symbolic else int(ecg_input_settings(cfg)["ecg_tokens"]),
                str(seg_dir),
                bool(cfg.data.store_signal),
                ecg_input,
            )
        )
    if tasks:
        print(f"writing {len(tasks)} of {len(plan)} shards")
    for task, result in zip(tasks, _run_shard_tasks(tasks, cfg.data.workers), strict=True):
        stats[task.split].append(result)
    summary: dict[str, Any] = {}
    for split in SPLITS:
        done = sorted(stats.get(split, []), key=lambda s: s["path"])
        lengths = [n for s in done for n in s["lengths"]]
        kept = [n for s in done for n in s["ecg_kept"]]
        dropped = [n for s in done for n in s["ecg_dropped"]]
        total_ecg = sum(kept) + sum(dropped)
        summary[split] = {
            "examples": sum(s["examples"] for s in done),
            "shards": [s["path"] for s in done],
            "tokens": _summary(lengths),
            "ecg_tokens_kept": _summary(kept),
            "ecg_fraction_dropped": round(sum(dropped) / total_ecg, 4) if total_ecg else 0.0,
            "answer_tokens": sum(s["answer_tokens"] for s in done),
            "skipped": [x for s in done for x in s["skipped"]],
        }
    return summary


# ----------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------


def _check_settings(out: Path, settings: dict[str, Any]) -> str:
    """Refuses to mix shards made with other settings in one directory."""
    digest = settings_hash(settings)
    stamp = out / "settings.json"
    if stamp.exists():
        old = json.loads(stamp.read_text())
        if old.get("hash") != digest:
            raise PrepareError(
                f"{out} holds shards prepared with other settings (hash {old.get('hash')}, now "
                f"{digest}); use another workdir or delete {out}"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"hash": digest, "settings": settings}, indent=1, default=str))
    return digest


SOURCES = ("synthetic", "ecgqa-ptbxl", "ecgqa-mimic", "pulse", "ecg-chat")


def _check_ecg_input_settings(cfg: ml_collections.ConfigDict) -> None:
    """The signal / image settings (``data.ecg_tokens``, ``data.image_*``)."""
    settings = ecg_input_settings(cfg)
    n = settings["ecg_tokens"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PrepareError(
            f"data.ecg_tokens must be a whole number >= 1 (placeholder tokens per ECG: 1 for a "
            f"pooled encoder, N for N encoder tokens), got {n!r}"
        )
    if cfg.representation != "image":
        return
    layout, size = settings["image_layout"], settings["image_size"]
    if layout not in render.LAYOUTS:
        raise PrepareError(
            f"unknown data.image_layout {layout!r}; use one of {', '.join(render.LAYOUTS)}"
        )
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_IMAGE_SIZE:
        raise PrepareError(
            f"data.image_size {size!r} is too small: use a whole number of pixels >= "
            f"{MIN_IMAGE_SIZE} (the vision tower's input side, e.g. 224)"
        )


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Refuses unknown choices before any work is done."""
    if cfg.representation not in REPRESENTATIONS:
        raise PrepareError(
            f"unknown representation {cfg.representation!r}; use one of "
            f"{', '.join(REPRESENTATIONS)}"
        )
    symbolic = cfg.representation == "symbolic"
    choices = {
        "data.source": (cfg.data.source, SOURCES),
        "data.segments": (cfg.data.segments, ("all", "first")),
        "data.split": (cfg.data.split, ("published", "patient")),
        "truncation": (cfg.truncation, text.POLICIES),
        "text.family": (cfg.text.family, text.FAMILIES),
    }
    if symbolic:
        choices["ecg_tokenizer.encode_mode"] = (cfg.ecg_tokenizer.encode_mode, ecgbyte.MODES)
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise PrepareError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
    if not symbolic:
        _check_ecg_input_settings(cfg)
    elif cfg.truncation == "time" and not cfg.ecg_tokenizer.lead_boundaries:
        raise PrepareError(
            "truncation='time' cuts every lead at the same second, which needs an ECG tokenizer "
            "whose tokens never span two leads: set ecg_tokenizer.lead_boundaries=True"
        )
    lead_indices(cfg)
    if cfg.budget < 16:
        raise PrepareError(f"budget {cfg.budget} is too small for any chat example")
    model_vocab_size(cfg)  # a configured model checkpoint must exist
    if cfg.text.tokenizer and not Path(cfg.text.tokenizer).is_dir():
        hint = cfg.get("model", {}).get("download_hint", "") or (
            "put the LLM's tokenizer files (tokenizer.json or tokenizer.model, "
            "tokenizer_config.json) there, or set --config.text.tokenizer=DIR"
        )
        raise PrepareError(
            f"text.tokenizer {cfg.text.tokenizer} is not a directory. To fix: {hint}"
        )


def prepare(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Runs every step for ``cfg``; returns the manifest (also ``workdir/shards/manifest.json``)."""
    check_config(cfg)
    t0 = time.perf_counter()
    workdir = Path(cfg.workdir)
    out = workdir / "shards"
    settings = shard_settings(cfg)
    digest = _check_settings(out, settings)

    root = ensure_data(cfg)
    seg_dir = make_segments(cfg, root, workdir)
    segs_by_record, _, fetch = segment_index(seg_dir, root)
    convs, source_report = load_conversations(cfg, root)
    splits, link_report = link_and_split(cfg, convs, segs_by_record)
    # Grouping packs more answers into each training sequence. Evaluation splits keep one
    # question per example: in a group, earlier reference answers would hint at later ones.
    if "train" in splits:
        splits["train"] = group_per_segment(
            splits["train"],
            cfg.data.group_questions,
            cfg.seed,
            cfg.data.get("group_distinct", ""),
        )
    segment_rows = {
        c.example_id: segs_by_record[c.record][c.segment]
        for items in splits.values()
        for c in items
    }
    counts = {split: len(items) for split, items in splits.items()}
    print(f"conversations: {source_report.get('kept', len(convs))} kept -> examples {counts}")

    symbolic = cfg.representation == "symbolic"
    train_rows = [segment_rows[c.example_id] for c in splits.get("train", [])]
    # signal / image: no ECG-Byte tokenizer; a one-id ECG block whose id is the placeholder
    ecg_tok = ecg_tokenizer(cfg, workdir, train_rows, fetch) if symbolic else None
    text_tok, text_path = text_tokenizer(cfg, workdir, splits.get("train", []))
    vocab = text.EcgVocab(
        max(text_tok.vocab_size, model_vocab_size(cfg)),
        ecg_tok.vocab_size if symbolic else 1,
        markers=cfg.text.ecg_markers,
        text_pad_id=text_tok.pad_id,
    )

    plan = plan_shards(cfg, out, splits)
    pending = [convs for _, path, convs in plan if not _is_done(path)]
    needed = sorted({segment_rows[c.example_id] for convs in pending for c in convs})
    t_enc = time.perf_counter()
    if symbolic:
        ecg_ids = encode_segments(cfg, ecg_tok, needed, fetch)
    else:  # the signals / images themselves are made shard by shard in write_shards
        placeholders = np.zeros(ecg_input_settings(cfg)["ecg_tokens"], np.int32)
        ecg_ids = {row: placeholders for row in needed}
    seconds_encode = time.perf_counter() - t_enc
    t_write = time.perf_counter()
    split_stats = write_shards(cfg, plan, ecg_ids, segment_rows, seg_dir, text_path, vocab)
    seconds_write = time.perf_counter() - t_write

    manifest = {
        "format": SHARD_FORMAT,
        "config_hash": digest,
        "representation": cfg.representation,
        "budget": cfg.budget,
        "truncation": cfg.truncation,
        "ecg_tokenizer": None
        if not symbolic
        else {
            "path": str(cfg.ecg_tokenizer.path or workdir / "tokenizers" / "ecgbyte.json"),
            "fingerprint": ecg_tok.fingerprint(),
            "vocab_size": ecg_tok.vocab_size,
        },
        "text_tokenizer": {
            "path": str(text_path),
            "hash": directory_hash(text_path),
            "family": text_tok.template,
            "vocab_size": text_tok.vocab_size,
        },
        "vocab": {
            "text_vocab_size": vocab.text_vocab_size,
            "ecg_vocab_size": vocab.ecg_vocab_size,
            "markers": vocab.markers,
            "text_pad_id": vocab.text_pad_id,
            "pad_id": vocab.pad_id,
            "total_size": vocab.total_size,
        },
        "splits": {
            split: {k: v for k, v in s.items() if k != "skipped"} | {"skipped": len(s["skipped"])}
            for split, s in split_stats.items()
        },
        "seconds": {
            "encode_ecgs": round(seconds_encode, 2),
            "write_shards": round(seconds_write, 2),
            "total_this_run": round(time.perf_counter() - t0, 2),
        },
    }
    if not symbolic:
        manifest["placeholder_id"] = int(vocab.to_llm([0])[0])
        manifest["ecg_tokens"] = int(ecg_input_settings(cfg)["ecg_tokens"])
        manifest["ecg_input"] = ecg_input_spec(cfg) | {"fs": float(cfg.data.target_fs)}
    report = {
        "source": source_report,
        "link_and_split": link_report,
        "skipped_examples": {split: s["skipped"] for split, s in split_stats.items()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for split, s in manifest["splits"].items():
        print(
            f"{split:>5s}: {s['examples']} examples in {len(s['shards'])} shards, tokens mean "
            f"{s['tokens']['mean']} (max {s['tokens']['max']:.0f}), ECG ids dropped "
            f"{s['ecg_fraction_dropped']:.0%}, {s['skipped']} skipped"
        )
    print(f"prepared in {manifest['seconds']['total_this_run']:.1f} s -> {out}")
    return manifest


def load_manifest(workdir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared workdir, checked to be ours."""
    path = Path(workdir) / "shards" / "manifest.json"
    if not path.exists():
        raise PrepareError(f"{path} not found: run python -m elmjax.prepare first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != SHARD_FORMAT:
        raise PrepareError(f"{path}: not an elmjax shard manifest ({manifest.get('format')!r})")
    return manifest


def split_paths(workdir: str | Path, split: str) -> list[str]:
    """The shard files of a split of a prepared workdir."""
    return pipeline.shard_paths(Path(workdir) / "shards", split)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/X.py[:arg] is required")
    cfg = _CONFIG.value
    if _WORKDIR.value:
        cfg.workdir = _WORKDIR.value
    try:
        prepare(cfg)
    except (PrepareError, sources.SourceFormatError, sources.UnsafePathError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Flags live here, not at import time, so other modules can import this one.
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "configs/X.py[:arg]", lock_config=False
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: config.workdir)")
    app.run(main)
