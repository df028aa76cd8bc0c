"""Encoder pretraining: ``python -m elmjax.pretrain --config=configs/pretrain_stmem.py[:demo]
[--workdir=DIR]``.

Stage 1 of "2-Stage Scratch": an ECG encoder (``models.ecg_encoders``) is trained from scratch
with its own objective on the preprocessed segments of the TRAIN split; stage 2 reads it back
with :func:`load_pretrained_encoder`.

1. the config is validated before anything compiles (:func:`check_config`);
2. data: the synthetic set is generated when missing and the records become 250 Hz segments in
   ``WORKDIR/segments`` (``prepare.ensure_data`` / ``prepare.make_segments``, the same steps as
   the LLM runs); every record becomes one item that ``prepare.link_and_split`` expands to its
   segments and splits as the LLM data is split (the dataset's published split, PTB-XL's
   ``strat_fold``, checked patient-disjoint; or by patient hash), with the same caps;
3. the objective (``pretrain.objective``):

   * ``mae`` (stmem / mtae / mlae): ``ecg_encoders.mae_loss``, MSE on the masked patches, mask
     ratio ``pretrain.mask_ratio`` (0.75), a fresh mask every step from
     ``fold_in(key(seed), step)``;
   * ``merl`` (merl_resnet, MERL): ECG features -> linear -> 256-d embedding ``e``; the report
     -> a FROZEN BERT (``pretrain.text_encoder``, a local HF directory, MedCPT-Query-Encoder
     in the paper) -> pooler output -> trainable MLP (768 -> 768 -> 256, GELU) -> ``t``;
     loss = CLIP(``e``, ``t``) + CLIP(``u1``, ``u2``), the uni-modal alignment: ``u1``, ``u2``
     are two dropout views of ``e`` (p = ``pretrain.view_dropout``) through two linear heads.
     CLIP is the symmetric InfoNCE over the GLOBAL batch with temperature
     ``pretrain.temperature`` (0.07) on L2-normalised vectors. The step is jitted over the
     global, sharded batch, so ``e @ t.T`` needs every device's rows: XLA inserts the
     all-gather that MERL does by hand under DDP, and the loss (hence the gradient) is the
     same for any number of devices. The text side is frozen, so the reports are tokenised
     and run through BERT ONCE on the host before training; the pooled 768-d outputs are
     cached in ``WORKDIR/text_cache/`` (keyed by the text encoder's files) and only the MLP
     after them trains;
4. the mesh ``(data, fsdp, tensor)`` (``parallel.make_mesh``): the batch is split over the data
   axes, parameters follow ``parallel.LOGICAL_RULES`` (replicated at ``fsdp = tensor = 1``);
   one jitted step (donated state, AdamW with warm-up + cosine, global-norm clipping);
   BatchNorm statistics (the ResNet) are computed over the global batch and carried in state;
5. every ``log_every`` steps TensorBoard scalars (``train/loss``, ``train/lr``) and the tqdm bar;
   every ``eval_every`` the validation loss (fixed masks / views); every ``checkpoint_every``
   an orbax checkpoint (``checkpoint.Checkpointer``). Batches are a pure function of
   ``(seed, step)`` (one seeded permutation per epoch), so a rerun resumes exactly from the
   last complete checkpoint; SIGTERM saves and exits 0;
6. the end: the encoder is exported to ``WORKDIR/encoder/`` (``encoder.json``: name + config
   fields; ``params.safetensors``: every Variable, BatchNorm statistics included).

The run directory (``--workdir``, default ``runs/<config name>``) holds ``config.json``,
``segments/``, ``text_cache/`` (MERL), ``checkpoints/``, ``tensorboard/``, ``encoder/``.

Departures from the reference: the validation loss uses fixed masks (comparable across
evaluations); MERL's ECG projection is a linear map of the pooled features (the reference's
1x1 convolution before the average pool is the same linear map, applied before pooling).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding
from ml_collections import config_flags
from tqdm import tqdm

from elmjax import checkpoint, parallel, prepare
from elmjax.data import sources
from elmjax.ecg import synth
from elmjax.models import ecg_encoders, text_encoder
from elmjax.models.transformer import EncoderConfig

OBJECTIVES = ("mae", "merl")
SIZES = ("paper", "tiny")
ENCODER_FILES = ("encoder.json", "params.safetensors")


class ConfigError(ValueError):
    """A config that cannot run (raised before anything compiles)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing broken was saved."""


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def encoder_config(cfg: ml_collections.ConfigDict):
    """The encoder's config dataclass: ``default_config`` (paper) or ``tiny_config``."""
    e = cfg.encoder
    over = dict(e.get("overrides", {}) or {})
    kw = dict(seq_len=cfg.data.seg_len, num_leads=12)
    if cfg.pretrain.objective == "mae":
        over.setdefault("mask_ratio", cfg.pretrain.mask_ratio)
    if e.size == "tiny":
        return ecg_encoders.tiny_config(e.name, **kw, **over)
    return ecg_encoders.default_config(e.name, **kw, **over)


def check_config(cfg: ml_collections.ConfigDict, *, check_files: bool = True) -> None:
    """Everything that can be checked without data or devices; raises :class:`ConfigError`."""
    p, t = cfg.pretrain, cfg.train
    if p.objective not in OBJECTIVES:
        raise ConfigError(f"pretrain.objective {p.objective!r} not in {OBJECTIVES}")
    if cfg.encoder.size not in SIZES:
        raise ConfigError(f"encoder.size {cfg.encoder.size!r} not in {SIZES}")
    name = cfg.encoder.name
    if p.objective == "mae" and name not in ecg_encoders.MAE_ENCODERS:
        raise ConfigError(
            f"objective 'mae' needs a masked autoencoder {ecg_encoders.MAE_ENCODERS}, got {name!r}"
        )
    if p.objective == "merl" and name not in ("merl_resnet", "vit1d"):
        raise ConfigError(f"objective 'merl' needs merl_resnet or vit1d, got {name!r}")
    try:
        encoder_config(cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"encoder: {e}") from e
    if t.batch_size < 2 or (t.steps <= 0 and t.epochs <= 0):
        raise ConfigError("train.batch_size must be >= 2 and train.steps or train.epochs > 0")
    if p.objective == "merl":
        if not 0.0 < p.temperature:
            raise ConfigError(f"pretrain.temperature must be > 0, got {p.temperature}")
        if not 0.0 <= p.view_dropout < 1.0:
            raise ConfigError(f"pretrain.view_dropout must be in [0, 1), got {p.view_dropout}")
        if check_files and p.text_encoder:
            check_text_encoder(p.text_encoder, p.get("text_encoder_hint", ""))
    if set(cfg.mesh) != set(parallel.MESH_AXES):
        raise ConfigError(f"mesh must have exactly the axes {parallel.MESH_AXES}")


def check_text_encoder(path: str, hint: str = "") -> None:
    """The text encoder directory must hold a BERT config, safetensors weights and a tokenizer."""
    d = Path(path)
    needs = {
        "config.json": (d / "config.json").is_file(),
        "*.safetensors": any(d.glob("*.safetensors")) if d.is_dir() else False,
        "tokenizer (tokenizer.json or vocab.txt)": (d / "tokenizer.json").is_file()
        or (d / "vocab.txt").is_file(),
    }
    missing = [k for k, ok in needs.items() if not ok]
    if missing:
        where = "does not exist" if not d.is_dir() else f"lacks {', '.join(missing)}"
        raise ConfigError(
            f"pretrain.text_encoder {path} {where}; it must be a local Hugging Face BERT "
            "directory (MERL: ncbi/MedCPT-Query-Encoder)" + (f": {hint}" if hint else "")
        )


MEDCPT_DIR = "checkpoints/MedCPT-Query-Encoder"
MEDCPT_HINT = (
    "`huggingface-cli download ncbi/MedCPT-Query-Encoder --local-dir "
    f"{MEDCPT_DIR}` (if it brings only pytorch_model.bin, save it once as safetensors with "
    "transformers: AutoModel.from_pretrained(DIR).save_pretrained(DIR)), or set "
    "--config.pretrain.text_encoder=DIR; --config.pretrain.text_encoder='' trains a tiny "
    "tokenizer and uses a RANDOM tiny BERT instead (demo only)"
)
MIMIC_HINT = (
    "download MIMIC-IV-ECG 1.0 (physionet.org/content/mimic-iv-ecg/1.0/) into data/mimic-iv-ecg "
    "or set --config.data.root=DIR (--config.data.layout=ptbxl for PTB-XL)"
)


def default_config(encoder: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of ``configs/pretrain_<encoder>.py`` (see there); ``arg``: ``demo``."""
    args = set(filter(None, (arg or "").split(",")))
    if args - {"demo"}:
        raise ValueError(f"unknown config arguments {sorted(args - {'demo'})}; known: demo")
    demo = "demo" in args
    merl = encoder == "merl_resnet"
    short = "merl" if merl else encoder
    c = ml_collections.ConfigDict()
    c.name = f"pretrain_{short}" + ("_demo" if demo else "")
    c.workdir = "runs/" + c.name
    c.seed = 0

    # --- data: records -> 250 Hz segments -> train / valid split (as elmjax.prepare) ---------
    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic" if demo else "mimic-iv-ecg"
    c.data.root = "runs/demo/data" if demo else "data/mimic-iv-ecg"
    c.data.layout = "ptbxl" if demo else "mimic"  # elmjax.ecg.io layout of the records
    c.data.generate_ecgs = 4000 if demo else 0  # the set configs/ecgbyte_1024.py:demo uses
    c.data.download_hint = "" if demo else MIMIC_HINT
    c.data.target_fs = 250.0
    c.data.seg_len = 1250  # 5 s at 250 Hz: the reference's ecg-qa_mimic-iv-ecg_mapped_1250
    c.data.preprocess_mode = "standard"
    c.data.segments = "all"  # every segment of every record
    # PTB-XL (the demo): its published strat_fold split; MIMIC-IV-ECG has none: by patient.
    c.data.split = "published" if demo else "patient"
    c.data.split_fractions = {"train": 0.8, "valid": 0.1, "test": 0.1}
    c.data.max_examples = {}  # caps per split (none)
    c.data.workers = 2

    # --- encoder -------------------------------------------------------------------------------
    c.encoder = ml_collections.ConfigDict()
    c.encoder.name = encoder
    # paper: ecg_encoders.default_config (ViT-B + 256-d decoder, ResNet-101); tiny: tiny_config
    c.encoder.size = "tiny" if demo else "paper"
    c.encoder.overrides = {"width": 32} if demo else {}  # fields (tiny: also width / depth)

    # --- objective -----------------------------------------------------------------------------
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.objective = "merl" if merl else "mae"
    c.pretrain.mask_ratio = 0.75  # MAE: patches masked (per group)
    c.pretrain.text_encoder = "" if demo else MEDCPT_DIR  # MERL: frozen BERT ('' = tiny random)
    c.pretrain.text_encoder_hint = MEDCPT_HINT
    c.pretrain.max_text_len = 64 if demo else 256  # report tokens
    c.pretrain.proj_dim = 256  # shared ECG-text space
    c.pretrain.temperature = 0.07
    c.pretrain.view_dropout = 0.1  # uni-modal alignment: dropout of the two ECG views
    # text_encoder='': the WordPiece vocabulary and the random BERT that stand in for MedCPT.
    c.pretrain.tiny_bert = ml_collections.ConfigDict(
        {"vocab_size": 1000, "hidden_size": 64, "num_layers": 2, "num_heads": 4}
    )

    # --- training ------------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32 if demo else 256  # global
    c.train.epochs = 50.0
    c.train.steps = 300 if demo else 0  # 0: epochs x (train segments // batch)
    c.train.lr = 1e-3 if demo else 1e-4  # AdamW peak, linear warm-up then cosine to 0
    c.train.warmup_steps = 30 if demo else 2000
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.weight_decay = 0.05
    c.train.clip_norm = 1.0
    c.train.log_every = 10
    c.train.eval_every = 100 if demo else 2000
    c.train.eval_batches = 4 if demo else 20
    c.train.checkpoint_every = 100 if demo else 2000
    c.train.keep_checkpoints = 3

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    return c


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SegmentSet:
    """The segments of one split: rows of the segments manifest, and their reports."""

    rows: np.ndarray  # [N] int, rows of the segments manifest
    reports: list[str]  # [N]


def split_segments(cfg: ml_collections.ConfigDict, workdir: Path) -> tuple[dict, Any]:
    """``({split: SegmentSet}, fetch)``: data set -> segments -> split as ``prepare`` splits.

    Every record becomes one item (its patient, and PTB-XL's published split from
    ``strat_fold`` when the table has it); ``prepare.link_and_split`` expands it to its
    segments, splits it (published or by patient) and caps it, as for the LLM data.
    """
    root = prepare.ensure_data(cfg)
    seg_dir = prepare.make_segments(cfg, root, workdir)
    segs_by_record, rows, fetch = prepare.segment_index(seg_dir, root)
    folds: dict[str, str] = {}
    if cfg.data.layout == "ptbxl" and (root / "ptbxl_database.csv").exists():
        import csv  # noqa: PLC0415

        with open(root / "ptbxl_database.csv", newline="") as f:
            for r in csv.DictReader(f):
                if r.get("strat_fold"):
                    folds[str(int(float(r["ecg_id"])))] = synth.split_of_fold(int(r["strat_fold"]))
    items = []
    for record, idx in sorted(segs_by_record.items()):
        row = rows[idx[0]]
        meta = {"source": "pretrain", "report": row.get("report") or ""}
        if str(row.get("record_id")) in folds:
            meta["split"] = folds[str(row["record_id"])]
        items.append(
            sources.Conversation(
                example_id=f"pretrain:{record}",
                record=record,
                layout=cfg.data.layout,
                patient_id=str(row.get("patient_id") or record),
                segment=None,
                turns=({"role": "user", "text": "ECG"}, {"role": "assistant", "text": "ECG"}),
                meta=meta,
            )
        )
    try:
        splits, _ = prepare.link_and_split(cfg, items, segs_by_record)
    except ValueError as e:
        raise ConfigError(f"splitting the segments: {e}") from e
    out = {}
    for name, convs in splits.items():
        idx = [segs_by_record[c.record][c.segment or 0] for c in convs]
        out[name] = SegmentSet(np.asarray(idx, np.int64), [c.meta["report"] for c in convs])
    return out, fetch


def batch_rows(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Indices (into a split of ``n``) of global batch ``step``: epoch ``e = step // (n //
    batch)`` reads a permutation seeded by ``(seed, e)`` in order (the remainder is dropped)."""
    per_epoch = n // batch
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[i * batch : (i + 1) * batch]


# ----------------------------------------------------------------------------------------------
# Text side (MERL)
# ----------------------------------------------------------------------------------------------


def make_tiny_text_encoder(out: Path, texts: Sequence[str], cfg: ml_collections.ConfigDict) -> Path:
    """The demo's stand-in for MedCPT: a WordPiece tokenizer trained on ``texts`` and a BERT
    with RANDOM weights (``pretrain.tiny_bert``), written as a HF directory. Its pooled output
    is a fixed random function of the report's tokens: different reports map to different
    vectors, so the contrastive loss is learnable, but there is no medical knowledge in it."""
    if (out / "config.json").exists():
        return out
    from tokenizers import BertWordPieceTokenizer  # noqa: PLC0415
    from transformers import BertTokenizerFast  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(list(texts), vocab_size=int(cfg.pretrain.tiny_bert.vocab_size))
    wp.save_model(str(out))
    BertTokenizerFast(vocab_file=str(out / "vocab.txt")).save_pretrained(str(out))
    tb = cfg.pretrain.tiny_bert
    bert_cfg = text_encoder.BertConfig(
        vocab_size=wp.get_vocab_size(),
        hidden_size=tb.hidden_size,
        num_layers=tb.num_layers,
        num_heads=tb.num_heads,
        intermediate_size=2 * tb.hidden_size,
        max_position_embeddings=max(cfg.pretrain.max_text_len, 64),
    )
    model = text_encoder.BertModel(bert_cfg, rngs=nnx.Rngs(cfg.seed))
    text_encoder.save_bert(model, out)
    return out


def text_features(
    text_dir: Path, reports: Sequence[str], max_len: int, cache: Path, batch: int = 64
) -> np.ndarray:
    """``[len(reports), D]`` float32 pooler outputs of the frozen BERT, computed once and cached
    (keyed by the reports, ``max_len`` and the text encoder's files)."""
    unique = sorted(set(reports))
    key = hashlib.sha256()
    key.update(prepare.directory_hash(text_dir).encode())
    key.update(json.dumps([unique, max_len]).encode())
    file = cache / f"pooled-{key.hexdigest()[:16]}.npz"
    if file.exists():
        with np.load(file) as z:
            table, ids = z["pooled"], z["ids"]
    else:
        from transformers import AutoTokenizer  # noqa: PLC0415

        tok = AutoTokenizer.from_pretrained(str(text_dir), local_files_only=True)
        enc = tok(unique, max_length=max_len, truncation=True, padding="max_length")
        ids = np.asarray(enc["input_ids"], np.int32)
        mask = np.asarray(enc["attention_mask"], np.int32)
        bert = text_encoder.load_bert(text_dir)
        run = nnx.jit(lambda m, i, a: m(i, a)[1])
        parts = [
            np.asarray(run(bert, ids[s : s + batch], mask[s : s + batch]))
            for s in range(0, len(unique), batch)
        ]
        table = np.concatenate(parts).astype(np.float32)
        if jax.process_index() == 0:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".tmp.npz")
            np.savez(tmp, pooled=table, ids=ids, reports=np.asarray(unique, dtype=object))
            os.replace(tmp, file)
    where = {r: i for i, r in enumerate(unique)}
    return table[[where[r] for r in reports]]


# ----------------------------------------------------------------------------------------------
# Model and losses
# ----------------------------------------------------------------------------------------------


def info_nce(a: jax.Array, b: jax.Array, temperature: float) -> jax.Array:
    """Symmetric InfoNCE (CLIP) of matching rows of ``a [B, D]`` and ``b [B, D]``:
    ``(CE(s, I) + CE(s.T, I)) / 2`` with ``s = norm(a) norm(b).T / temperature``. Called on
    global arrays inside jit, the logits span the whole batch (the all-gather)."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    logits = a @ b.T / temperature
    labels = jnp.arange(a.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return 0.5 * (jnp.mean(ce(logits, labels)) + jnp.mean(ce(logits.T, labels)))


def _dense(d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=use_bias, rngs=rngs)


class MERLHeads(nnx.Module):
    """MERL's trainable heads: ECG projection, the two uni-modal view heads, the text MLP."""

    def __init__(self, feature_dim: int, text_dim: int, proj_dim: int, *, rngs: nnx.Rngs):
        self.ecg_proj = _dense(feature_dim, proj_dim, rngs)
        self.view1 = _dense(proj_dim, proj_dim, rngs, use_bias=False)
        self.view2 = _dense(proj_dim, proj_dim, rngs, use_bias=False)
        self.text_fc1 = _dense(text_dim, text_dim, rngs)
        self.text_fc2 = _dense(text_dim, proj_dim, rngs)

    def text(self, pooled: jax.Array) -> jax.Array:
        return self.text_fc2(jax.nn.gelu(self.text_fc1(pooled), approximate=False))


class Pretrainer(nnx.Module):
    """The encoder and (MERL) its heads: everything the optimiser updates."""

    def __init__(self, cfg: ml_collections.ConfigDict, text_dim: int = 0, *, rngs: nnx.Rngs):
        self.objective = cfg.pretrain.objective
        self.encoder = ecg_encoders.make_encoder(cfg.encoder.name, encoder_config(cfg), rngs=rngs)
        if self.objective == "merl":
            self.heads = MERLHeads(
                self.encoder.config.feature_dim, text_dim, cfg.pretrain.proj_dim, rngs=rngs
            )
        self.temperature = float(cfg.pretrain.get("temperature", 0.07))
        self.view_dropout = float(cfg.pretrain.get("view_dropout", 0.1))

    def loss(self, batch: dict[str, jax.Array], rng: jax.Array, *, train: bool) -> jax.Array:
        if self.objective == "mae":
            return ecg_encoders.mae_loss(self.encoder, batch["signals"], rng)
        feats = self.encoder(batch["signals"], train=train)  # [B, F]
        e = self.heads.ecg_proj(feats)  # [B, 256]
        t = self.heads.text(batch["text"])  # [B, 256]
        k1, k2 = jax.random.split(rng)
        p = self.view_dropout

        def drop(key, x):
            if p == 0.0:
                return x
            return jnp.where(jax.random.bernoulli(key, 1.0 - p, x.shape), x / (1.0 - p), 0.0)

        u1 = self.heads.view1(drop(k1, e))
        u2 = self.heads.view2(drop(k2, e))
        return info_nce(e, t, self.temperature) + info_nce(u1, u2, self.temperature)


# ----------------------------------------------------------------------------------------------
# Export / import of the encoder
# ----------------------------------------------------------------------------------------------


def _config_to_json(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _config_from_json(name: str, fields: dict[str, Any]):
    cls = ecg_encoders.ENCODERS[name].config_class
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in fields:
            continue
        v = fields[f.name]
        if isinstance(v, dict):
            v = EncoderConfig(**v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[f.name] = v
    return cls(**kw)


def _flat(state: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(p): v for p, v in leaves}


def export_encoder(encoder: ecg_encoders.ECGEncoder, out: str | Path) -> Path:
    """Writes ``encoder.json`` (``{"name", "config"}``) and ``params.safetensors`` (every
    Variable of the encoder, BatchNorm statistics included) to ``out``."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in _flat(nnx.state(encoder)).items()}
    save_file(tensors, str(out / "params.safetensors"))
    meta = {"name": encoder.config.name, "config": _config_to_json(encoder.config)}
    (out / "encoder.json").write_text(json.dumps(meta, indent=1))
    return out


def load_pretrained_encoder(path: str | Path) -> ecg_encoders.ECGEncoder:
    """The encoder written by :func:`export_encoder` (``WORKDIR/encoder``), exactly."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    path = Path(path)
    missing = [f for f in ENCODER_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: missing {missing}; run python -m elmjax.pretrain first")
    meta = json.loads((path / "encoder.json").read_text())
    config = _config_from_json(meta["name"], meta["config"])
    abstract = nnx.eval_shape(lambda: ecg_encoders.make_encoder(meta["name"], config))
    graphdef, state = nnx.split(abstract)
    tensors = load_file(str(path / "params.safetensors"))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    values = []
    for p, v in leaves:
        key = jax.tree_util.keystr(p)
        if key not in tensors or tuple(tensors[key].shape) != tuple(v.shape):
            raise ValueError(f"{path}: {key} missing or of another shape than the config's")
        values.append(jnp.asarray(tensors[key], v.dtype))
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int):
    t = cfg.train
    warmup = max(1, min(t.warmup_steps, total_steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, warmup, max(total_steps, warmup + 1))
    opt = optax.chain(
        optax.clip_by_global_norm(t.clip_norm),
        optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay),
    )
    return opt, schedule


class _Preempted:
    def __init__(self):
        self.flag = False
        self._old = signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum, frame):
        self.flag = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


class Batches:
    """Global batch ``step`` of a split, this process's rows, as sharded global arrays."""

    def __init__(self, seg: SegmentSet, fetch, text: np.ndarray | None, sharding, rows: int):
        self.seg, self.fetch, self.text, self.rows = seg, fetch, text, rows
        self.sharding = sharding
        from elmjax.train import host_slice  # noqa: PLC0415

        two_d = NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[:1], None))
        self.index, self.count = host_slice(two_d, rows, 1)

    def get(self, idx: np.ndarray) -> dict[str, jax.Array]:
        per = self.rows // self.count
        mine = idx[self.index * per : (self.index + 1) * per]
        rows = self.seg.rows[mine]
        local = {"signals": np.stack([np.asarray(self.fetch(int(r)), np.float32) for r in rows])}
        if self.text is not None:
            local["text"] = self.text[mine]
        out = {}
        for k, v in local.items():
            spec = jax.sharding.PartitionSpec(*self.sharding.spec[:1], *([None] * (v.ndim - 1)))
            out[k] = jax.make_array_from_process_local_data(
                NamedSharding(self.sharding.mesh, spec), v, (self.rows, *v.shape[1:])
            )
        return out


@dataclasses.dataclass
class StepFns:
    """A run's model + optimiser state (sharded on the mesh) and its compiled steps:
    ``train_step(state, batch, key) -> (state, {"loss", "grad_norm"})`` (state donated) and
    ``eval_step(state, batch, key) -> loss``; batches are dicts of global arrays sharded
    along ``batch_sharding`` (``signals [B, C, L]``, MERL: ``text [B, D]`` pooled BERT)."""

    graphdef: Any
    state: Any
    train_step: Any
    eval_step: Any
    schedule: Any
    batch_sharding: NamedSharding


def make_step_fns(cfg: ml_collections.ConfigDict, text_dim: int, total: int, mesh) -> StepFns:
    """Builds the :class:`Pretrainer` born sharded on ``mesh``, AdamW, and the jitted steps."""
    model = parallel.create_sharded(
        lambda: Pretrainer(cfg, text_dim, rngs=nnx.Rngs(cfg.seed)), mesh
    )
    opt, schedule = make_optimizer(cfg, total)
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)
        parallel.shard_model_state(optimizer, mesh)
    graphdef, state = nnx.split((model, optimizer))
    state_sharding = jax.tree.map(lambda x: x.sharding, state)

    def train_step(state, batch, key):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(m):
            return m.loss(batch, key, train=True)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def eval_step(state, batch, key):
        model, _ = nnx.merge(graphdef, state)
        return model.loss(batch, key, train=False)

    step_fn = jax.jit(
        train_step,
        donate_argnums=0,
        in_shardings=(state_sharding, None, None),
        out_shardings=(state_sharding, None),
    )
    sharding = NamedSharding(mesh, parallel.logical_to_mesh(("batch",), mesh))
    return StepFns(graphdef, state, step_fn, jax.jit(eval_step), schedule, sharding)


def pretrain(
    cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at: int | None = None
) -> dict[str, Any]:
    """Runs (or resumes) pretraining; returns the final metrics (``losses``: every step of this
    call). ``stop_at``: stop with a checkpoint after this step, as a preemption would."""
    check_config(cfg)
    workdir = Path(workdir)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.workdir = str(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=1))
    splits, fetch = split_segments(cfg, workdir)
    train_set, valid_set = splits["train"], splits.get("valid")

    merl = cfg.pretrain.objective == "merl"
    text_tables: dict[str, np.ndarray | None] = {"train": None, "valid": None}
    text_dim = 0
    if merl:
        keep = {k: [i for i, r in enumerate(s.reports) if r.strip()] for k, s in splits.items()}
        splits = {
            k: SegmentSet(s.rows[keep[k]], [s.reports[i] for i in keep[k]])
            for k, s in splits.items()
        }
        train_set, valid_set = splits["train"], splits.get("valid")
        text_dir = Path(cfg.pretrain.text_encoder) if cfg.pretrain.text_encoder else None
        if text_dir is None:
            text_dir = make_tiny_text_encoder(workdir / "tiny_text_encoder", train_set.reports, cfg)
        for name, s in (("train", train_set), ("valid", valid_set)):
            if s is not None and len(s.rows):
                text_tables[name] = text_features(
                    text_dir, s.reports, cfg.pretrain.max_text_len, workdir / "text_cache"
                )
        text_dim = text_tables["train"].shape[1]

    b = cfg.train.batch_size
    if len(train_set.rows) < b:
        raise ConfigError(f"the train split has {len(train_set.rows)} segments < batch {b}")
    per_epoch = len(train_set.rows) // b
    total = cfg.train.steps or max(1, int(cfg.train.epochs * per_epoch))

    mesh = parallel.make_mesh(**dict(cfg.mesh))
    if b % math.prod(mesh.shape[a] for a in ("data", "fsdp")):
        raise ConfigError(f"train.batch_size {b} does not divide over the data axes of {mesh}")
    fns = make_step_fns(cfg, text_dim, total, mesh)
    state, step_fn, eval_fn = fns.state, fns.train_step, fns.eval_step
    graphdef, schedule, sharding = fns.graphdef, fns.schedule, fns.batch_sharding
    train_batches = Batches(train_set, fetch, text_tables["train"], sharding, b)
    valid_batches = None
    if valid_set is not None and len(valid_set.rows) >= b and cfg.train.eval_batches > 0:
        valid_batches = Batches(valid_set, fetch, text_tables["valid"], sharding, b)

    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints)
    step = 0
    latest = ckpt.latest_step()
    if latest is not None:
        restored, meta = ckpt.restore(latest, state)
        state, step = restored, int(meta["step"])
        if is_main:
            print(f"resumed from {workdir / 'checkpoints'} at step {step}")
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter  # noqa: PLC0415

        writer = SummaryWriter(str(workdir / "tensorboard"))
    key = jax.random.key(cfg.seed)
    preempted = _Preempted()
    bar = tqdm(total=total, initial=step, desc="pretrain", unit="step", disable=not is_main)
    losses: dict[int, float] = {}
    metrics: dict[str, Any] = {}
    window = []
    saved = {"step": latest}

    def save(step):
        if saved["step"] != step:
            ckpt.save(step, state, {"step": step, "total_steps": total}, force=True)
            saved["step"] = step

    def validation(state) -> float:
        n = min(cfg.train.eval_batches, len(valid_batches.seg.rows) // b)
        vkey = jax.random.key(cfg.seed + 1)  # fixed masks / views: comparable evaluations
        vals = [
            float(
                eval_fn(
                    state,
                    valid_batches.get(np.arange(i * b, (i + 1) * b)),
                    jax.random.fold_in(vkey, i),
                )
            )  # fmt: skip
            for i in range(n)
        ]
        return float(np.mean(vals))

    t0 = time.perf_counter()
    try:
        while step < total:
            idx = batch_rows(len(train_set.rows), b, step, cfg.seed)
            batch = train_batches.get(idx)
            state, out = step_fn(state, batch, jax.random.fold_in(key, step))
            step += 1
            loss = losses[step] = float(out["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"step {step}: loss {loss}; last good checkpoint: {saved['step']}"
                )
            window.append(loss)
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total:
                metrics = {"loss": float(np.mean(window)), "lr": float(schedule(step))}
                metrics["grad_norm"] = float(out["grad_norm"])
                window = []
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if writer:
                    for k, v in metrics.items():
                        writer.add_scalar(f"train/{k}", v, step)
            if valid_batches and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                metrics["valid_loss"] = validation(state)
                if writer:
                    writer.add_scalar("valid/loss", metrics["valid_loss"], step)
            stopping = preempted.flag or (stop_at is not None and step >= stop_at)
            if step % cfg.train.checkpoint_every == 0 or stopping or step == total:
                save(step)
            if stopping:
                break
    finally:
        bar.close()
        preempted.restore()
        ckpt.close()
        if writer:
            writer.close()
    metrics.update(step=step, total_steps=total, losses=losses, seconds=time.perf_counter() - t0)
    if step >= total:
        if valid_batches:
            metrics["valid_loss"] = validation(state)
        model_now, _ = nnx.merge(graphdef, state)
        if is_main:
            export_encoder(model_now.encoder, workdir / "encoder")
        metrics["encoder"] = str(workdir / "encoder")
    return metrics


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config=configs/pretrain_X.py[:demo] is required")
    workdir = _WORKDIR.value or cfg.workdir
    try:
        from elmjax.train import enable_compilation_cache, maybe_initialize_distributed  # noqa: PLC0415

        check_config(cfg)
        maybe_initialize_distributed()
        enable_compilation_cache()
        metrics = pretrain(cfg, workdir)
    except (ConfigError, prepare.PrepareError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        losses = metrics.pop("losses")
        if losses:
            metrics["first_loss"], metrics["last_loss"] = losses[min(losses)], losses[max(losses)]
        print(json.dumps(metrics, default=float))


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "configs/pretrain_X.py[:demo]", lock_config=False
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>)")
    app.run(main)
