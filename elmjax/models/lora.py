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
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
        a = self.lora_a[...].astype(self.dtype)
        b = self.lora_b[...].astype(self.dtype)
        drop, seed, rate = self.dropout, None, 0.0
        if drop is not None and not drop.deterministic and drop.rate:
            seed, rate = jax.random.bits(drop.rngs(), (2,), jnp.uint32), drop.rate
        return y + lora_delta(x.astype(self.dtype), a, b, seed, rate=rate, scale=self.scale)

    def merged_kernel(self) -> jax.Array:
        """``W + scale * A @ B`` in the kernel's dtype."""
        w = self.kernel[...]
        delta = jnp.einsum("...ir,...ro->...io", self.lora_a[...], self.lora_b[...])
        return (w.astype(jnp.float32) + self.scale * delta).astype(w.dtype)


# --------------------------------------------------------------------------------------------
# The adapter's update with a fused dropout mask and a hand-written backward pass
# --------------------------------------------------------------------------------------------


def _mix32(h: jax.Array) -> jax.Array:
    """``lowbias32``, a bijective 32-bit integer hash with low avalanche bias."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def keep_mask(seed: jax.Array, shape: Sequence[int], rate: float) -> jax.Array:
    """The dropout keep mask (``True`` = kept) for ``seed`` (2 x uint32): counter-based.

    Each element's flat index is hashed twice with the two seed words, and the element is
    dropped when the 32-bit hash falls below ``round(rate * 2**32)``, so the drop probability
    is ``rate`` to within 2**-32. Unlike ``jax.random.bernoulli`` (threefry: about 7 ms for a
    ``[4, 512, 576]`` mask on this CPU) the mask is a handful of integer operations per
    element that XLA fuses into the masked multiply, so no mask array is materialised, and the
    backward pass regenerates it from the seed instead of keeping it alive. Flat indices wrap
    modulo 2**32 (masks repeat only in tensors above 4 G elements).
    """
    if rate >= 1.0:
        return jnp.zeros(shape, bool)
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, tuple(shape), dim) * jnp.uint32(stride)
        stride = (stride * shape[dim]) % (1 << 32)
    h = _mix32(_mix32(idx ^ seed[0]) + seed[1])
    threshold = round(rate * (1 << 32))
    return h >= jnp.uint32(threshold)


def _dropped(x: jax.Array, seed: jax.Array | None, rate: float) -> jax.Array:
    if seed is None or not rate:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep = keep_mask(seed, x.shape, rate)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def lora_delta(x, a, b, seed, rate: float, scale: float):
    """``scale * dropout(x) @ a @ b`` over ``x [..., in]``, ``a [in, r]``, ``b [r, out]``.

    The backward pass is written out because autodiff's gradient of ``a``,
    ``dot(dropout(x), du)`` contracting the token axes, makes XLA transpose the large
    activation ``dropout(x)`` (``[tokens, in]``, recomputed with its mask) into a copy; here
    the small ``du [tokens, r]`` is the transposed operand instead. ``seed`` is ``None``
    (no dropout) or 2 x uint32 (``keep_mask``).
    """
    return _lora_fwd(x, a, b, seed, rate, scale)[0]


def _lora_fwd(x, a, b, seed, rate, scale):
    u = _dropped(x, seed, rate) @ a
    y = (u @ b) * jnp.asarray(scale, u.dtype)
    return y, (x, a, b, seed, u)


def _lora_bwd(rate, scale, res, g):
    x, a, b, seed, u = res
    lead = tuple(range(x.ndim - 1))
    gs = g * jnp.asarray(scale, g.dtype)
    db = jax.lax.dot_general(u, gs, ((lead, lead), ((), ())))  # [r, out]
    du = gs @ b.T  # [..., r]
    h = _dropped(x, seed, rate)
    da = jax.lax.dot_general(du, h, ((lead, lead), ((), ()))).T  # [in, r], du transposed
    dx = _dropped(du @ a.T, seed, rate)
    dseed = None if seed is None else np.zeros(seed.shape, jax.dtypes.float0)
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype), dseed


lora_delta.defvjp(_lora_fwd, _lora_bwd)


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
