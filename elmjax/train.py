"""Training: ``python -m elmjax.train --config=configs/ecgbyte_1024.py[:demo] [--workdir=DIR]``.

One program for a laptop CPU, one GPU or a multi-host TPU pod:

1. the config is validated before anything compiles (:func:`check_config`);
2. the shards are prepared when missing (:func:`elmjax.prepare.prepare`, same config);
3. the mesh ``(data, fsdp, tensor)`` is built over all devices of all processes
   (``jax.distributed.initialize()`` first when the run is multi-process);
4. the model is born sharded: loaded from its Hugging Face checkpoint straight into its
   shardings, or initialised under ``jit`` with ``out_shardings``; LoRA adapters are added
   and only they (plus, if asked, the ECG vocabulary rows) are trained;
5. each host streams its own slice of the shards (:mod:`elmjax.data.pipeline`); the global
   batch is assembled with ``jax.make_array_from_process_local_data``;
6. one jitted train step (donated state, gradient accumulation over micro-batches, loss
   averaged per answer token over the global batch, global-norm clipping, AdamW);
7. every ``log_every`` steps: TensorBoard scalars (loss, lr, grad norm, tokens/s, MFU) and the
   tqdm bar; every ``eval_every``: validation loss; every ``checkpoint_every``: an async
   checkpoint with the data iterator's position. A rerun resumes from the last complete
   checkpoint; SIGTERM (preemption) saves and exits 0; a non-finite loss stops the run before
   anything broken is saved.

The run directory (``--workdir``, default ``runs/<config name>``) holds ``config.json``,
``shards/`` (with ``segments/`` and ``tokenizers/``), ``checkpoints/``, ``tensorboard/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from ml_collections import config_flags
from tqdm import tqdm

from elmjax import checkpoint, parallel, prepare
from elmjax.data import pipeline
from elmjax.models import ecg_encoders, elm, hf, lora, vision
from elmjax.models.llm import LLM, LLMConfig
from elmjax.models.projector import Projector, ProjectorConfig
from elmjax.models.transformer import EncoderConfig

SCHEDULES = ("noam", "cosine", "constant")

# bf16 dense peak TFLOP/s per device, for MFU when train.peak_tflops is 0.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


class ConfigError(ValueError):
    """A config that cannot run (raised before anything compiles)."""


class NonFiniteLossError(RuntimeError):
    """The loss or the updated parameters became NaN or infinite; nothing broken was saved."""

    def __init__(self, step: int, loss: float, last_saved: int | None):
        self.step, self.loss, self.last_saved = step, loss, last_saved
        super().__init__(
            f"step {step}: the loss is {loss} or the updated parameters are not finite; "
            f"stopping without saving this state (last good checkpoint: step {last_saved}). "
            "Lower train.lr or check the data."
        )


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Everything that can be checked without data or devices; raises :class:`ConfigError`."""
    try:
        prepare.check_config(cfg)
    except prepare.PrepareError as e:
        raise ConfigError(str(e)) from e
    t = cfg.train
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"unknown train.schedule {t.schedule!r}; use one of {SCHEDULES}")
    if t.batch_size < 1 or t.grad_accum < 1 or t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size {t.batch_size} must be a positive multiple of train.grad_accum "
            f"{t.grad_accum}"
        )
    if t.steps < 0 or (t.steps == 0 and t.epochs <= 0):
        raise ConfigError("set train.steps > 0, or train.epochs > 0 with train.steps = 0")
    if t.fit not in ("pack", "pad"):
        raise ConfigError(f"train.fit must be 'pack' or 'pad', got {t.fit!r}")
    if cfg.lora.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0, got {cfg.lora.rank}")
    if (
        cfg.lora.rank == 0
        and cfg.model.checkpoint
        and cfg.model.frozen_dtype != cfg.model.param_dtype
    ):
        raise ConfigError("full fine-tuning (lora.rank=0) trains every weight: use one param dtype")
    if not cfg.model.checkpoint:
        try:
            LLMConfig(**dict(cfg.model.random), vocab_size=8)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.random: {e}") from e
    remat = cfg.model.remat
    if isinstance(remat, str) and remat and not hasattr(jax.checkpoint_policies, remat):
        raise ConfigError(
            f"model.remat {remat!r} is not a jax.checkpoint_policies name; use '' (off) or e.g. "
            "'nothing_saveable', 'dots_saveable'"
        )
    if cfg.representation != "symbolic":
        check_encoder_config(cfg)
    mesh = dict(cfg.mesh)
    if set(mesh) != set(parallel.MESH_AXES):
        raise ConfigError(
            f"mesh must have exactly the axes {parallel.MESH_AXES}, got {sorted(mesh)}"
        )


SIGNAL_ENCODERS = tuple(ecg_encoders.ENCODERS)
IMAGE_ENCODERS = vision.KINDS


def check_encoder_config(cfg: ml_collections.ConfigDict) -> None:
    """The ``encoder`` / ``projector`` sections of a signal or image run."""
    if "encoder" not in cfg or "projector" not in cfg:
        raise ConfigError(
            f"representation {cfg.representation!r} needs 'encoder' and 'projector' config "
            "sections (see configs/signal_stmem_1024.py)"
        )
    e = cfg.encoder
    names = SIGNAL_ENCODERS if cfg.representation == "signal" else IMAGE_ENCODERS
    if e.name not in names:
        raise ConfigError(
            f"encoder.name {e.name!r} is not a {cfg.representation} encoder; use one of {names}"
        )
    if e.output not in ("pooled", "tokens"):
        raise ConfigError(f"encoder.output must be 'pooled' or 'tokens', got {e.output!r}")
    if e.checkpoint and not Path(e.checkpoint).is_dir():
        hint = e.get("download_hint", "")
        raise ConfigError(
            f"encoder.checkpoint {e.checkpoint} does not exist" + (f": {hint}" if hint else "")
        )
    if cfg.train.fit != "pad":
        raise ConfigError(
            f"representation {cfg.representation!r} trains one example per row: set train.fit='pad'"
        )
    if cfg.projector.kind not in ("linear", "mlp"):
        raise ConfigError(f"projector.kind must be 'linear' or 'mlp', got {cfg.projector.kind!r}")


def check_mesh_fits(cfg: ml_collections.ConfigDict, n_devices: int) -> None:
    """The mesh must divide the devices, and the batch must divide over the data axes."""
    sizes = [cfg.mesh[a] for a in parallel.MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1 or n_devices % known:
        raise ConfigError(f"mesh {dict(cfg.mesh)} does not divide the {n_devices} devices")
    data_ways = (n_devices // known if cfg.mesh.data == -1 else cfg.mesh.data) * (
        n_devices // known if cfg.mesh.fsdp == -1 else cfg.mesh.fsdp
    )
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % data_ways:
        raise ConfigError(
            f"the micro-batch of {micro} rows does not divide over {data_ways} data-parallel "
            f"devices (mesh {dict(cfg.mesh)}); change train.batch_size or train.grad_accum"
        )


# ----------------------------------------------------------------------------------------------
# Model and optimiser
# ----------------------------------------------------------------------------------------------


def build_model(cfg: ml_collections.ConfigDict, manifest: dict, mesh) -> LLM | elm.ELM:
    """The model of a run, born sharded on ``mesh``: the LLM (+ LoRA) sized for the manifest's
    vocabulary; for the signal and image representations wrapped with its encoder and
    projector in an :class:`~elmjax.models.elm.ELM`."""
    model = build_llm(cfg, manifest, mesh)
    if cfg.representation == "symbolic":
        return model
    encoder, width = build_encoder(cfg)
    projector = Projector(
        ProjectorConfig(
            in_dim=width,
            out_dim=model.config.hidden_size,
            kind=cfg.projector.kind,
            dtype=cfg.model.dtype,
            param_dtype=cfg.model.param_dtype,
        ),
        rngs=nnx.Rngs(cfg.seed + 3),
    )
    out = elm.ELM(encoder, projector, model, manifest["placeholder_id"])
    with jax.set_mesh(mesh):
        parallel.shard_model_state(out, mesh)
    return out


def build_encoder(cfg: ml_collections.ConfigDict) -> tuple[nnx.Module, int]:
    """The ECG encoder of a signal / image run and its feature width.

    ``encoder.checkpoint``: a pretrained encoder (signal: the ``WORKDIR/encoder`` export of
    ``python -m elmjax.pretrain``; image: a Hugging Face ViT / CLIP / SigLIP directory); empty:
    a fresh one (``encoder.tiny``: the CPU-sized one of the demos).
    """
    e = cfg.encoder
    rngs = nnx.Rngs(cfg.seed + 2)
    if cfg.representation == "signal":
        if e.checkpoint:
            from elmjax import pretrain  # noqa: PLC0415 (pretrain imports this module lazily)

            enc = pretrain.load_pretrained_encoder(e.checkpoint)
            if enc.config.output != e.output:
                enc = ecg_encoders.replace_config(enc, output=e.output)
        else:
            leads = tuple(cfg.data.get("leads", ()) or ())
            make = ecg_encoders.tiny_config if e.tiny else ecg_encoders.default_config
            conf = make(
                e.name,
                seq_len=cfg.data.seg_len,
                num_leads=len(leads) or 12,
                output=e.output,
            )
            enc = ecg_encoders.make_encoder(e.name, conf, rngs=rngs)
        return enc, enc.feature_dim
    if e.checkpoint:
        tower, vcfg = vision.load_vision(e.checkpoint, dtype=cfg.model.dtype, output=e.output)
    else:
        size = int(cfg.data.get("image_size", prepare.DEFAULT_IMAGE_SIZE))
        width = 64 if e.tiny else 768
        vcfg = vision.VisionConfig(
            kind=e.name,
            encoder=EncoderConfig(
                hidden_size=width,
                num_layers=2 if e.tiny else 12,
                num_heads=4 if e.tiny else 12,
                intermediate_size=4 * width,
                activation="quick_gelu" if e.name == "clip" else "gelu",
                dtype=cfg.model.dtype,
                initializer_range=0.02,
            ),
            image_size=size,
            patch_size=16,
            output=e.output,
        )
        tower = vision.make_tower(vcfg, rngs=rngs)
    return elm.ImageEncoder(tower), vcfg.feature_dim


def build_llm(cfg: ml_collections.ConfigDict, manifest: dict, mesh) -> LLM:
    """The LLM (+ LoRA) sized for the manifest's vocabulary, born sharded on ``mesh``."""
    vocab = manifest["vocab"]
    m = cfg.model
    remat = m.remat or False  # "" (the configs' off) -> False; True or a policy name stay
    common = dict(
        dtype=m.dtype,
        scan_layers=m.scan_layers,
        remat=remat,
        train_extra_vocab=m.train_extra_vocab,
    )
    if m.checkpoint:
        rows = int(hf.read_config(m.checkpoint).get("vocab_size", 0))
        if vocab["text_vocab_size"] != max(rows, vocab["text_vocab_size"]) or rows <= 0:
            raise ConfigError(
                f"the shards were prepared for a text vocabulary of {vocab['text_vocab_size']} "
                f"but {m.checkpoint} has {rows} embedding rows; prepare them again"
            )
        model, llm_cfg = hf.load_hf(
            m.checkpoint,
            dtype=m.dtype,
            param_dtype=m.frozen_dtype,
            extra_vocab=vocab["total_size"] - rows,
            mesh=mesh,
            seed=cfg.seed,
            scan_layers=m.scan_layers,
            remat=remat,
            train_extra_vocab=m.train_extra_vocab,
        )
    else:
        llm_cfg = LLMConfig(
            **dict(m.random),
            vocab_size=vocab["text_vocab_size"],
            extra_vocab=vocab["total_size"] - vocab["text_vocab_size"],
            param_dtype=m.param_dtype,
            **common,
        )
        model = parallel.create_sharded(lambda: LLM(llm_cfg, rngs=nnx.Rngs(cfg.seed)), mesh)
    if cfg.lora.rank > 0:
        with jax.set_mesh(mesh):
            lora.apply_lora(
                model,
                tuple(cfg.lora.targets),
                rank=cfg.lora.rank,
                alpha=cfg.lora.alpha,
                dropout=cfg.lora.dropout,
                rngs=nnx.Rngs(cfg.seed + 1),
            )
            parallel.shard_model_state(model, mesh)
    return model


def trainable(cfg: ml_collections.ConfigDict):
    """The nnx filter of what the optimiser updates."""
    if cfg.representation == "symbolic":
        return lora.trainable_filter(cfg.model.train_extra_vocab, lora=cfg.lora.rank > 0)
    return elm.trainable_filter(
        train_encoder=cfg.encoder.train,
        lora=cfg.lora.rank > 0,
        train_projector=True,
        train_llm=cfg.lora.rank == 0,
        train_extra_vocab=cfg.model.train_extra_vocab,
    )


def llm_of(model: LLM | elm.ELM) -> LLM:
    """The decoder of a model (itself, or an ELM's)."""
    return model.llm if isinstance(model, elm.ELM) else model


def learning_rate(cfg: ml_collections.ConfigDict, total_steps: int, d_model: int):
    """The schedule: ``noam`` (the reference's: ``d^-0.5 min(s^-0.5, s w^-1.5)``, which ignores
    ``train.lr``), ``cosine`` (linear warm-up to ``train.lr``, cosine to 0) or ``constant``."""
    t = cfg.train
    warmup = max(1, t.warmup_steps)
    if t.schedule == "noam":

        def noam(step):
            s = jnp.maximum(step, 1).astype(jnp.float32)
            return d_model**-0.5 * jnp.minimum(s**-0.5, s * warmup**-1.5)

        return noam
    if t.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, t.lr, min(warmup, max(1, total_steps - 1)), max(total_steps, warmup + 1)
        )
    return optax.constant_schedule(t.lr)


def check_prepared_for(cfg: ml_collections.ConfigDict, manifest: dict, workdir: Path) -> None:
    """The shards of ``workdir`` must come from ``cfg``'s data settings."""
    if manifest["config_hash"] != prepare.settings_hash(prepare.shard_settings(cfg)):
        raise ConfigError(
            f"{workdir}/shards were prepared with other data settings; use another --workdir"
        )


def saved_part(state, wrt) -> dict[str, Any]:
    """What a checkpoint holds of ``(model, optimizer)`` state: the trainable parameters and
    the optimiser state."""
    return {"trainable": nnx.filter_state(state[0], wrt), "opt": state[1]}


def load_trained(
    cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, step: int | None = None
) -> tuple[LLM, int]:
    """The model of a run directory's checkpoint (the last complete one, or ``step``) and its
    step: the base built as :func:`train` builds it (random init or the HF checkpoint), then the
    trained parameters restored into their shardings."""
    check_config(cfg)
    workdir = Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ConfigError(f"{ckpt_dir}: no checkpoints; train first (python -m elmjax.train)")
    manifest = prepare.load_manifest(workdir)
    check_prepared_for(cfg, manifest, workdir)
    mesh = parallel.make_mesh(**dict(cfg.mesh))
    model = build_model(cfg, manifest, mesh)
    wrt = trainable(cfg)
    with jax.set_mesh(mesh):
        # Any schedule: only the optimiser state's structure matters here.
        opt = make_optimizer(cfg, optax.constant_schedule(0.0))
        optimizer = nnx.Optimizer(model, opt, wrt=wrt)
        parallel.shard_model_state(optimizer, mesh)
    ckpt = checkpoint.Checkpointer(ckpt_dir, keep=cfg.train.keep_checkpoints, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ConfigError(f"{ckpt_dir}: no complete checkpoint; train first")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ConfigError(f"{ckpt_dir}: no checkpoint of step {step} ({steps})")
        restored, _ = ckpt.restore(step, saved_part(nnx.state((model, optimizer)), wrt))
    finally:
        ckpt.close()
    nnx.update(model, restored["trainable"])
    return model, step


def make_optimizer(cfg: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
    t = cfg.train
    return optax.chain(
        optax.clip_by_global_norm(t.clip_norm),
        optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay),
    )


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


def answer_positions(loss_mask: jax.Array, k: int) -> jax.Array:
    """``[B, k]`` positions of each row's answer tokens first (then other positions)."""
    order = jnp.argsort(-(loss_mask > 0).astype(jnp.int32), axis=-1, stable=True)
    return order[:, :k].astype(jnp.int32)


def loss_sums(model: LLM, batch: dict[str, jax.Array], loss_positions: int):
    """Sum of per-token cross-entropy over answer tokens, and their number."""
    logits_positions = None
    targets, weights = batch["targets"], batch["loss_mask"]
    if loss_positions:
        logits_positions = answer_positions(weights, loss_positions)
        targets = jnp.take_along_axis(targets, logits_positions, axis=1)
        weights = jnp.take_along_axis(weights, logits_positions, axis=1)
    ecg = (batch["ecg"],) if "ecg" in batch else ()  # signal / image: the ELM's ECG input
    logits = model(
        batch["inputs"],
        *ecg,
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        logits_positions=logits_positions,
    )
    return elm.answer_loss(logits, targets, weights)


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The compiled functions of a run and what they need."""

    graphdef: Any
    train_step: Any
    eval_step: Any
    batch_sharding: NamedSharding


def make_step_fns(cfg, model: LLM, optimizer: nnx.Optimizer, mesh) -> tuple[StepFns, Any]:
    """Splits ``(model, optimizer)`` into a graphdef + state and jits the train/eval steps."""
    wrt = trainable(cfg)
    accum = cfg.train.grad_accum
    loss_positions = cfg.train.loss_positions
    graphdef, state = nnx.split((model, optimizer))
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    batch_sharding = NamedSharding(mesh, parallel.logical_to_mesh(("batch", "seq"), mesh))

    def train_step(state, batch, dropout_key):
        model, optimizer = nnx.merge(graphdef, state)
        if cfg.lora.rank > 0 and cfg.lora.dropout > 0:
            model.train()
            # match_shape: scan_layers stacks one dropout key per layer.
            nnx.reseed(model, dropout=dropout_key, policy="match_shape")

        # Pure functions inside the scan: NNX modules do not cross trace levels.
        model_def, params, rest = nnx.split(model, wrt, ...)

        def micro_loss(params, micro):
            # copy=True: Variables born at this trace level (nnx.scan of scan_layers refuses
            # Variables from the outer jit level).
            model = nnx.merge(model_def, params, rest, copy=True)
            return loss_sums(model, micro, loss_positions)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        # Micro-batch k takes rows k, k + accum, ...: each device keeps its own rows in every
        # micro-batch (contiguous blocks would make XLA all-gather the batch).
        micro = jax.tree.map(
            lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch
        )

        def body(carry, one):
            total, count, grads = carry
            (t, c), g = grad_fn(params, one)
            return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (total, count, grads), _ = jax.lax.scan(body, init, micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        optimizer.update(model, grads)
        model.eval()
        loss = total / denom
        # The state about to be returned (and maybe checkpointed) must be finite too.
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(nnx.state(model, wrt))])
        )
        metrics = {
            "loss": loss,
            "answer_tokens": count,
            # answer tokens beyond train.loss_positions in some row (must stay 0)
            "answers_dropped": jnp.sum(batch["loss_mask"]) - count,
            "tokens": jnp.sum(batch["segment_ids"] > 0),  # global, whatever each host packed
            "grad_norm": grad_norm,
            "finite": finite,
        }
        return nnx.state((model, optimizer)), metrics

    def eval_step(state, batch):
        model, _ = nnx.merge(graphdef, state)
        total, count = loss_sums(model, batch, loss_positions)
        return total, count

    fns = StepFns(
        graphdef,
        jax.jit(
            train_step,
            donate_argnums=0,
            in_shardings=(state_sharding, batch_sharding, None),
            out_shardings=(state_sharding, None),
        ),
        jax.jit(eval_step, in_shardings=(state_sharding, batch_sharding)),
        batch_sharding,
    )
    return fns, state


def host_slice(sharding: NamedSharding, rows: int, seq_len: int) -> tuple[int, int]:
    """``(index, count)``: this process feeds row block ``index`` of ``count`` equal blocks of a
    global batch of ``rows`` rows (its devices' rows). Processes whose devices hold the same rows
    (a tensor axis spanning hosts) get the same block, so they read the same examples."""
    held = sharding.addressable_devices_indices_map((rows, seq_len)).values()
    ranges = sorted({(s[0].start or 0, rows if s[0].stop is None else s[0].stop) for s in held})
    start, stop = ranges[0][0], max(b for _, b in ranges)
    n = stop - start
    covered = sorted(set().union(*(range(a, b) for a, b in ranges)))
    if covered != list(range(start, stop)) or rows % n or start % n:
        raise ConfigError(
            f"process {jax.process_index()} holds batch rows {ranges}, not one contiguous block "
            "of the global batch; order the mesh so that each host's devices are adjacent"
        )
    return start // n, rows // n


def global_batch(
    local: dict[str, np.ndarray], sharding: NamedSharding, rows: int | None = None
) -> dict[str, jax.Array]:
    """This host's rows -> global ``[rows, T]`` arrays sharded over the data axes (``rows``
    default: this host's rows times the process count)."""
    return {
        k: jax.make_array_from_process_local_data(
            sharding, local[k], None if rows is None else (rows, *local[k].shape[1:])
        )
        for k in (*pipeline.BATCH_KEYS, "ecg")
        if k in local
    }


def all_processes(value: Any) -> list[Any]:
    """A JSON-able ``value`` from every process, in process order (the same list on all)."""
    if jax.process_count() == 1:
        return [value]
    blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.int32(blob.size))))
    size = 1 << max(10, (longest - 1).bit_length())  # few sizes: few compiled gathers
    padded = np.zeros(size, np.uint8)
    padded[: blob.size] = blob
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, size)
    return [json.loads(bytes(row).rstrip(b"\0")) for row in gathered]


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (SIGTERM may reach hosts apart)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


# ----------------------------------------------------------------------------------------------
# Steps, FLOPs
# ----------------------------------------------------------------------------------------------


def estimate_rows(manifest: dict, workdir: Path, seq_len: int, fit: str) -> int:
    """Rows in one epoch of the train split (packing estimated from the example lengths)."""
    lengths = []
    for name in manifest["splits"]["train"]["shards"]:
        done = (workdir / "shards" / name).with_suffix(".done.json")
        lengths.extend(json.loads(done.read_text())["lengths"])
    if fit == "pad":
        return len(lengths)
    return max(1, math.ceil(sum(n - 1 for n in lengths) / seq_len / 0.97))


def flops_per_token(c: LLMConfig, seq_len: int, lora_rank: int) -> float:
    """Training FLOPs per token: forward ``2N`` + attention, backward ``2N`` (activation
    gradients) plus ``2N`` weight gradients when the base weights train (full fine-tuning)."""
    attn_params = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp_params = 3 * c.hidden_size * c.intermediate_size
    n = c.num_layers * (attn_params + mlp_params) + c.hidden_size * c.total_vocab
    attention = 2 * c.num_layers * seq_len * c.num_heads * c.head_dim  # QK^T and AV, causal
    forward = 2 * n + attention
    return forward * (2 if lora_rank > 0 else 3)


def peak_flops(cfg) -> float | None:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12 * jax.device_count()
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if kind.startswith(name):
            return tflops * 1e12 * jax.device_count()
    return None


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


class _Preempted:
    """SIGTERM flag: the loop saves a checkpoint and exits 0 at the next step boundary."""

    def __init__(self):
        self.flag = False
        self._old = signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum, frame):
        self.flag = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


COMPILATION_CACHE = Path.home() / ".cache" / "elmjax" / "jax_compilation_cache"


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for a command-line run, so that a later
    process with the same shapes (a re-evaluation, the next run of a sweep, ``make demo``
    again) loads the XLA executables instead of compiling them (on 2 CPU cores a generation
    prefill compiles in ~1 s and loads in ~0.3 s).

    Directory: ``$ELMJAX_COMPILATION_CACHE`` (``off`` disables it), else JAX's own
    ``JAX_COMPILATION_CACHE_DIR`` when set, else ``~/.cache/elmjax/jax_compilation_cache``.
    Executables that compiled in under 0.2 s are not stored. Returns the directory (None: off).
    """
    path = os.environ.get("ELMJAX_COMPILATION_CACHE")
    if path is not None and path.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    if path is None and jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = path or str(COMPILATION_CACHE)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return path


def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` for multi-process runs, before any computation:

    * ``ELMJAX_COORDINATOR`` (``host:port``), ``ELMJAX_NUM_PROCESSES``, ``ELMJAX_PROCESS_ID``:
      explicit (``launch/local_multiprocess.sh``);
    * ``ELMJAX_DISTRIBUTED=1``: JAX detects the cluster itself (``launch/tpu_pod.sh`` sets it:
      on Cloud TPU VMs the worker list is in the metadata server, not in the environment);
    * inside a multi-task ``srun`` step (SLURM), or on GKE TPU pods (``TPU_WORKER_HOSTNAMES``).
    """
    env = os.environ
    if env.get("ELMJAX_COORDINATOR"):
        jax.distributed.initialize(
            coordinator_address=env["ELMJAX_COORDINATOR"],
            num_processes=int(env["ELMJAX_NUM_PROCESSES"]),
            process_id=int(env["ELMJAX_PROCESS_ID"]),
        )
    elif (
        env.get("ELMJAX_DISTRIBUTED") == "1"
        or (env.get("SLURM_STEP_NODELIST") and int(env.get("SLURM_NTASKS", "1")) > 1)
        or env.get("TPU_WORKER_HOSTNAMES")
        or env.get("TPU_PROCESS_ADDRESSES")
    ):
        jax.distributed.initialize()


def train(
    cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, stop_at: int | None = None
) -> dict[str, Any]:
    """Runs (or resumes) training; returns the final metrics.

    ``stop_at``: stop (with a checkpoint) after this step, as a preemption would; a later call
    resumes. The schedule still spans ``train.steps`` (tests use it to check resumption).
    """
    check_config(cfg)
    workdir = Path(workdir)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.workdir = str(workdir)
    check_mesh_fits(cfg, jax.device_count())
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=1))

    shards_manifest = workdir / "shards" / "manifest.json"
    if not shards_manifest.exists():
        if jax.process_count() > 1:
            raise ConfigError(f"{shards_manifest} missing: run python -m elmjax.prepare first")
        prepare.prepare(cfg)
    manifest = prepare.load_manifest(workdir)
    check_prepared_for(cfg, manifest, workdir)

    mesh = parallel.make_mesh(**dict(cfg.mesh))
    model = build_model(cfg, manifest, mesh)
    llm_cfg = llm_of(model).config
    rows = estimate_rows(manifest, workdir, cfg.budget, cfg.train.fit)
    total_steps = cfg.train.steps or max(1, int(cfg.train.epochs * rows / cfg.train.batch_size))
    schedule = learning_rate(cfg, total_steps, llm_cfg.hidden_size)
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(model, make_optimizer(cfg, schedule), wrt=trainable(cfg))
        parallel.shard_model_state(optimizer, mesh)
    fns, state = make_step_fns(cfg, model, optimizer, mesh)
    wrt = trainable(cfg)

    # This host's block of the global batch (hosts sharing rows read the same examples).
    shard_index, shard_count = host_slice(fns.batch_sharding, cfg.train.batch_size, cfg.budget)
    per_host = cfg.train.batch_size // shard_count
    pcfg = pipeline.PipelineConfig(
        seq_len=cfg.budget,
        batch_size=per_host,
        fit=cfg.train.fit,
        seed=cfg.seed,
        pad_id=manifest["vocab"]["pad_id"],
    )
    train_ds = pipeline.make_dataset(
        prepare.split_paths(workdir, "train"),
        pcfg,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    data_iter = iter(train_ds)

    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints)
    step = 0
    tokens_seen = 0
    latest = ckpt.latest_step()
    if latest is not None:
        restored, meta = ckpt.restore(latest, saved_part(state, wrt))
        model_now, opt_now = nnx.merge(fns.graphdef, state)
        nnx.update(model_now, restored["trainable"])
        nnx.update(opt_now, restored["opt"])
        state = nnx.state((model_now, opt_now))
        data_states = meta["data"] if isinstance(meta["data"], list) else [meta["data"]]
        if len(data_states) != jax.process_count():
            raise ConfigError(
                f"the checkpoint at step {latest} holds the data positions of "
                f"{len(data_states)} processes; resume it with {len(data_states)} processes"
            )
        data_iter.set_state(data_states[jax.process_index()])
        step, tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        if is_main:
            print(f"resumed from {workdir / 'checkpoints'} at step {step}")

    writer = None
    if is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tensorboard"))
    fpt = flops_per_token(llm_cfg, cfg.budget, cfg.lora.rank)
    peak = peak_flops(cfg)
    preempted = _Preempted()
    key = jax.random.key(cfg.seed)
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not is_main)
    window = {"loss": 0.0, "tokens": 0, "n": 0, "t0": time.perf_counter()}
    metrics: dict[str, Any] = {}
    losses: dict[int, float] = {}  # every step of this call
    # Debug: ELMJAX_STEP_LOG=DIR appends each step's loss and a hash of each row this process
    # fed to DIR/steps-<process>.jsonl (the tests check what each host read).
    step_log = os.environ.get("ELMJAX_STEP_LOG")
    if step_log:
        Path(step_log).mkdir(parents=True, exist_ok=True)

    saved = {"step": latest}

    def save(step):
        if saved["step"] == step:
            return
        meta = {
            "step": step,
            "tokens_seen": tokens_seen,
            "data": all_processes(data_iter.get_state()),  # one per process
            "config_hash": manifest["config_hash"],
        }
        ckpt.save(step, saved_part(state, wrt), meta, force=True)
        saved["step"] = step

    try:
        while step < total_steps:
            local = next(data_iter)
            batch = global_batch(local, fns.batch_sharding, cfg.train.batch_size)
            state, out = fns.train_step(state, batch, jax.random.fold_in(key, step))
            step += 1
            real_tokens = int(out["tokens"])
            tokens_seen += real_tokens
            loss = losses[step] = float(out["loss"])
            if step_log:
                rows = [hashlib.sha1(row.tobytes()).hexdigest()[:16] for row in local["inputs"]]
                with open(Path(step_log) / f"steps-{jax.process_index()}.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss, "rows": rows}) + "\n")
            if not bool(out["finite"]):
                raise NonFiniteLossError(step, loss, saved["step"])
            if float(out["answers_dropped"]) > 0:
                raise ConfigError(
                    f"step {step}: a row of the batch holds more answer tokens than "
                    f"train.loss_positions={cfg.train.loss_positions}, so "
                    f"{int(out['answers_dropped'])} would get no loss; raise "
                    "train.loss_positions (or set 0 for the LM head at every position)"
                )
            window["loss"] += loss
            window["tokens"] += real_tokens
            window["n"] += 1
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total_steps:
                seconds = time.perf_counter() - window["t0"]
                metrics = {
                    "loss": window["loss"] / window["n"],
                    "lr": float(schedule(step)),
                    "grad_norm": float(out["grad_norm"]),
                    "tokens_per_second": window["tokens"] / seconds,
                }
                if peak:
                    metrics["mfu"] = metrics["tokens_per_second"] * fpt / peak
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}"
                )
                if writer:
                    for k, v in metrics.items():
                        writer.add_scalar(f"train/{k}", v, step)
                window = {"loss": 0.0, "tokens": 0, "n": 0, "t0": time.perf_counter()}
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                metrics["valid_loss"] = validation_loss(cfg, fns, state, workdir, manifest)
                if writer:
                    writer.add_scalar("valid/loss", metrics["valid_loss"], step)
            sigterm = any_process(preempted.flag)  # all hosts stop at the same step
            stopping = sigterm or (stop_at is not None and step >= stop_at)
            if step % cfg.train.checkpoint_every == 0 or stopping:
                save(step)
            if stopping:
                if is_main and sigterm:
                    print(f"SIGTERM: saved step {step}, exiting")
                break
        else:
            save(step)
    finally:
        bar.close()
        preempted.restore()
        ckpt.close()
        if writer:
            writer.close()
        data_iter.close() if hasattr(data_iter, "close") else None
    metrics["step"] = step
    metrics["tokens_seen"] = tokens_seen
    metrics["losses"] = losses
    if cfg.get("eval", {}).get("after_training") and step >= total_steps:
        from elmjax import evaluate  # noqa: PLC0415 (only runs that evaluate need it)

        model_now, _ = nnx.merge(fns.graphdef, state)
        results = evaluate.evaluate_run(
            model_now, cfg, workdir, cfg.eval.split, **evaluate.eval_settings(cfg)
        )
        if is_main:
            evaluate.print_table(results)
        metrics["eval"] = {
            k: results[k] for k in ("accuracy", "accuracy_without_ecg") if k in results
        }
    return metrics


def validation_loss(cfg, fns: StepFns, state, workdir: Path, manifest: dict) -> float:
    """Mean per-token loss over the first ``eval_batches`` batches of the validation split."""
    try:
        paths = prepare.split_paths(workdir, "valid")
    except FileNotFoundError:
        return float("nan")
    rows = cfg.train.batch_size
    shard_index, shard_count = host_slice(fns.batch_sharding, rows, cfg.budget)
    pcfg = pipeline.PipelineConfig(
        seq_len=cfg.budget,
        batch_size=rows // shard_count,
        fit=cfg.train.fit,
        shuffle=False,
        num_epochs=1,
        drop_remainder=True,
        pad_id=manifest["vocab"]["pad_id"],
    )
    dataset = pipeline.make_dataset(paths, pcfg, shard_index=shard_index, shard_count=shard_count)
    batches = list(itertools.islice(dataset, cfg.train.eval_batches))
    # Every process must run the same number of (collective) eval steps.
    n = min(all_processes(len(batches)))
    total = count = 0.0
    for local in batches[:n]:
        t, c = fns.eval_step(state, global_batch(local, fns.batch_sharding, rows))
        total, count = total + float(t), count + float(c)
    return total / count if count else float("nan")  # nan: no full validation batch


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every file at INFO
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config=configs/X.py[:arg] is required")
    workdir = _WORKDIR.value or cfg.workdir
    try:
        check_config(cfg)
        maybe_initialize_distributed()
        enable_compilation_cache()
        metrics = train(cfg, workdir)
    except (ConfigError, prepare.PrepareError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:  # the per-step losses: TensorBoard (or ELMJAX_STEP_LOG)
        print(json.dumps({k: v for k, v in metrics.items() if k != "losses"}, default=float))


if __name__ == "__main__":
    # Flags live here, not at import time, so other modules can import this one.
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "configs/X.py[:arg]", lock_config=False
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>)")
    app.run(main)
