"""LoRA adapters on the LLM's linear layers, PEFT-compatible.

``apply_lora(model, targets=..., rank=16, alpha=32, dropout=0.05, rngs=...)`` replaces every
``llm.Linear`` whose attribute name (``q_proj``, ..., ``down_proj``) or dotted path (e.g.
``layers.*.self_attn.q_proj``) matches one of ``targets`` (fnmatch patterns) by a
``LoRALinear`` that shares its ``kernel``/``bias`` Variables (no copy) and adds

    y = x @ W (+ b) + scale * dropout(x) @ A @ B,    scale = alpha / rank,

with ``A [in, r]`` and ``B [r, out]`` as ``nnx.LoRAParam`` (float32). Initialisation is PEFT's
``init_lora_weights=True``: ``A`` is kaiming-uniform with ``a = sqrt(5)`` (torch ``nn.Linear``'s
default, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``) and ``B`` is zero, so a fresh adapter leaves the
model unchanged. Stacked (``scan_layers``) layers get stacked factors ``[L, in, r]``,
``[L, r, out]`` and one dropout RNG stream per layer.

Dropout is created in eval mode: it is active only after ``model.train()`` (``model.eval()``
turns it off again), drawing from the ``dropout`` stream of ``rngs`` (or its default stream;
with neither, or ``dropout=0``, there is no dropout at all).

Training only the adapters::

    opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=trainable_filter(train_extra_vocab))
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable_filter(...)))(model, ...)

``trainable_filter(False)`` is ``nnx.LoRAParam``; ``trainable_filter(True)`` adds the
``llm.ExtraVocab`` rows. The paper's targets are all seven projections (``ALL_TARGETS``); the
reference HEAD used q/v only (``("q_proj", "v_proj")``).

``merge_lora(model, copy=True)`` returns a plain model with ``W + scale * A @ B`` folded into
each kernel (for export); ``copy=False`` merges in place.

PEFT names (for the export that maps adapters): ``base_model.model.<hf path>.lora_A.weight =
A.T [r, in]`` and ``lora_B.weight = B.T [out, r]``, with ``r``, ``lora_alpha`` and
``target_modules`` in ``adapter_config.json``; ``models.hf.param_map`` gives ``<hf path>``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from elmjax.models.llm import ExtraVocab, Linear

ALL_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


class LoRALinear(Linear):
    """A ``Linear`` plus a low-rank update ``scale * dropout(x) @ lora_a @ lora_b``."""

    def __init__(
        self,
        base: Linear,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        super().__init__(base.kernel, base.bias, dtype=base.dtype)
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        kernel = base.kernel[...]
        *stack, d_in, d_out = kernel.shape
        names = tuple(base.kernel.get_metadata()["out_sharding"])
        lead, (in_name, out_name) = names[:-2], names[-2:]
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on torch's [r, in] weight
        a = jax.random.uniform(rngs.params(), (*stack, d_in, rank), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, out_sharding=(*lead, in_name, None), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((*stack, rank, d_out), jnp.float32),
            out_sharding=(*lead, None, out_name),
            eager_sharding=False,
        )
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.dropout = nnx.data(_make_dropout(dropout, stack, rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        h = x.astype(self.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        a = self.lora_a[...].astype(self.dtype)
        b = self.lora_b[...].astype(self.dtype)
        return y + (h @ a @ b) * jnp.asarray(self.scale, self.dtype)

    def merged_kernel(self) -> jax.Array:
        """``W + scale * A @ B`` in the kernel's dtype."""
        w = self.kernel[...]
        delta = jnp.einsum("...ir,...ro->...io", self.lora_a[...], self.lora_b[...])
        return (w.astype(jnp.float32) + self.scale * delta).astype(w.dtype)


def _make_dropout(rate: float, stack: Sequence[int], rngs: nnx.Rngs) -> nnx.Dropout | None:
    if not rate or not ("dropout" in rngs or "default" in rngs):
        return None
    if not stack:
        return nnx.Dropout(rate, deterministic=True, rngs=rngs)

    @nnx.split_rngs(splits=stack[0])
    @nnx.vmap(in_axes=0, out_axes=0)
    def stacked(r):
        return nnx.Dropout(rate, deterministic=True, rngs=r)

    return stacked(nnx.Rngs(dropout=rngs.dropout()))


def _linears(model: nnx.Module, cls: type = Linear):
    """``(dotted path, parent module, attribute name, module)`` of each ``cls`` in ``model``."""
    found = []
    for path, parent in nnx.iter_modules(model):
        for name, child in vars(parent).items():
            if isinstance(child, cls):
                dotted = ".".join(str(p) for p in (*path, name))
                found.append((dotted, parent, name, child))
    return found


def apply_lora(
    model: nnx.Module,
    targets: Sequence[str] = ALL_TARGETS,
    *,
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.05,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Wraps the matching ``Linear`` layers in ``LoRALinear`` (in place); returns ``model``.

    Raises if no layer matches (a misspelt target list would otherwise train nothing).
    """
    hits = 0
    for dotted, parent, name, child in _linears(model):
        if isinstance(child, LoRALinear):
            continue
        if any(fnmatch.fnmatchcase(name, t) or fnmatch.fnmatchcase(dotted, t) for t in targets):
            lora = LoRALinear(child, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs)
            setattr(parent, name, lora)
            hits += 1
    if not hits:
        raise ValueError(f"no linear layer matches LoRA targets {list(targets)}")
    return model


def merge_lora(model: nnx.Module, *, copy: bool = True) -> nnx.Module:
    """A model without adapters: each ``LoRALinear`` becomes a ``Linear`` with the merged kernel.

    ``copy=True`` (default) leaves ``model`` untouched; ``copy=False`` merges in place.
    """
    if copy:
        model = nnx.clone(model)
    for _, parent, name, child in _linears(model, LoRALinear):
        child.kernel[...] = child.merged_kernel()
        setattr(parent, name, Linear(child.kernel, child.bias, dtype=child.dtype))
    return model


def lora_state(model: nnx.Module) -> Any:
    """Only the adapter parameters (for adapter-only checkpoints)."""
    return nnx.state(model, nnx.LoRAParam)


def trainable_filter(train_extra_vocab: bool = False, *, lora: bool = True) -> Any:
    """The optimiser / ``DiffState`` filter for LoRA (or full) fine-tuning.

    ``lora=True``: ``nnx.LoRAParam`` (+ ``ExtraVocab`` if ``train_extra_vocab``).
    ``lora=False`` (full fine-tuning): every ``nnx.Param`` (minus ``ExtraVocab`` unless
    ``train_extra_vocab``).
    """
    if lora:
        return nnx.Any(nnx.LoRAParam, ExtraVocab) if train_extra_vocab else nnx.LoRAParam
    return nnx.Param if train_extra_vocab else nnx.All(nnx.Param, nnx.Not(ExtraVocab))
