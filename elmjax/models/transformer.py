"""A generic pre-LN transformer encoder in Flax NNX: the block of every ViT-style tower.

One block serves the image towers of ``models.vision`` (ViT, CLIP vision, SigLIP vision) and
the 1-D ECG encoders (ViT-1D, ST-MEM): whatever turns the input into a sequence of vectors
(patch convolution, lead patches, position embeddings, CLS tokens) lives in the caller; this
module only maps ``[B, T, D] -> [B, T, D]``.

Config
------
``EncoderConfig`` (frozen, hashable): ``hidden_size``, ``num_layers``, ``num_heads``,
``head_dim`` (None: ``hidden_size // num_heads``, see ``dim_per_head``), ``intermediate_size``
(MLP width), ``activation`` (``ACTIVATIONS``: ``gelu`` is the exact erf form,
``gelu_pytorch_tanh`` / ``gelu_new`` the tanh approximation, ``quick_gelu`` is CLIP's
``x * sigmoid(1.702 x)``), ``layer_norm_eps``, ``qkv_bias``, ``dtype`` / ``param_dtype``,
``remat`` and ``initializer_range``.

Block (transformers' ViT / CLIP / SigLIP encoder layer)::

    x = x + o_proj(attention(q_proj(ln1(x)), k_proj(ln1(x)), v_proj(ln1(x))))
    x = x + fc2(act(fc1(ln2(x))))

Module tree (flax leaf names ``kernel``/``bias``/``scale``; logical axis names in brackets)::

    layers[i]
      layer_norm1.scale, .bias                    [embed]
      self_attn.{q,k,v}_proj.kernel [D, H*Dh]     [embed, heads]   .bias [heads] (qkv_bias)
      self_attn.o_proj.kernel [H*Dh, D]           [heads, embed]   .bias [embed]
      layer_norm2.scale, .bias                    [embed]
      mlp.fc1.kernel [D, F]                       [embed, mlp]     .bias [mlp]
      mlp.fc2.kernel [F, D]                       [mlp, embed]     .bias [embed]

The projections are ``llm.Linear`` (kernel ``[in, out]``, HF ``weight`` transposed), so
``lora.apply_lora(encoder, targets=("q_proj", "v_proj", ...))`` adapts an encoder exactly as it
adapts the LLM. Only names in ``parallel.LOGICAL_RULES`` are used; activations are pinned to
``("batch", "seq", "embed")`` after each block.

Calling
-------
``Encoder(config, rngs=...)(x, mask=None, *, return_hidden_states=False)``:

- ``x [B, T, D]``; ``mask [B, T] bool`` marks real tokens (False = padding, never attended to;
  a padded query row attends uniformly and its output is not meaningful), or a full
  ``[B, T, T]`` mask. Attention is bidirectional (no causal mask).
- Returns ``[B, T, D]``; with ``return_hidden_states`` also a tuple of ``L + 1`` arrays: the
  input and the output of every block (transformers' ``hidden_states``).

``MultiHeadAttention`` also does cross-attention (``attn(x, kv=memory)``): SigLIP's pooling
head attends from one learned probe to the patch tokens.

Numerics
--------
``dtype`` is the compute dtype, ``param_dtype`` the storage dtype. LayerNorm (mean and biased
variance, as ``torch.nn.LayerNorm``), attention scores and softmax run in float32 (the
attention is ``llm.attend``). There is no dropout: towers here are used frozen or fine-tuned
without it (add it here if an encoder objective needs it). ``remat`` is False, True or a
``jax.checkpoint_policies`` name, per block. Fresh parameters: kernels Xavier-uniform (the
ViT / MAE / ST-MEM convention for encoders trained from scratch), biases zero, LayerNorm
``scale`` one. Parameters are created with ``eager_sharding=False``: a model builds the same
with or without a mesh (``parallel.create_sharded`` builds it sharded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from elmjax.models.llm import Linear, attend
from elmjax.parallel import constrain

ACTIVATIONS: tuple[str, ...] = (
    "gelu",
    "gelu_pytorch_tanh",
    "gelu_new",
    "quick_gelu",
    "relu",
    "silu",
    "tanh",
)
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name`` in transformers' ``ACT2FN``."""
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "relu":
        return jax.nn.relu
    if name == "silu":
        return jax.nn.silu
    if name == "tanh":
        return jnp.tanh
    raise ValueError(f"activation {name!r} not supported; supported: {', '.join(ACTIVATIONS)}")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shapes and numerics of a pre-LN transformer encoder (see the module docstring).

    Attributes:
      hidden_size: model width D.
      num_layers: number of blocks.
      num_heads: attention heads H.
      head_dim: per-head width Dh; None: ``hidden_size // num_heads``.
      intermediate_size: MLP width F.
      activation: MLP activation, one of ``ACTIVATIONS``.
      layer_norm_eps: LayerNorm epsilon.
      qkv_bias: biases on q/k/v (ViT's ``qkv_bias``; always on in CLIP / SigLIP).
      dtype: compute dtype; param_dtype: parameter storage dtype.
      remat: False, True (save nothing) or a ``jax.checkpoint_policies`` name, per block.
      initializer_range: std of the normal init of embeddings made by callers (CLS tokens,
        position embeddings); kernels are Xavier-uniform.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int | None = None
    intermediate_size: int = 128
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool | str = False
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_heads={self.num_heads}; set head_dim"
            )
        if self.head_dim is not None and self.head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {self.head_dim}")
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if isinstance(self.remat, str) and not hasattr(jax.checkpoint_policies, self.remat):
            raise ValueError(f"remat policy {self.remat!r} is not in jax.checkpoint_policies")

    @property
    def dim_per_head(self) -> int:
        """``head_dim``, or ``hidden_size // num_heads`` when it is None (kept None, so that
        ``dataclasses.replace(config, num_heads=...)`` re-derives it)."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def attn_dim(self) -> int:
        """Width of the concatenated heads, ``num_heads * dim_per_head``."""
        return self.num_heads * self.dim_per_head


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def param(value: jax.Array, names: Sequence[str | None], cls: type[nnx.Variable] = nnx.Param):
    """A Variable with logical axis names; sharding is applied by ``elmjax.parallel``."""
    return cls(value, out_sharding=tuple(names), eager_sharding=False)


def linear(
    d_in: int,
    d_out: int,
    names: tuple[str | None, str | None],
    *,
    use_bias: bool,
    config: EncoderConfig,
    rngs: nnx.Rngs,
) -> Linear:
    """A fresh ``llm.Linear`` ``[d_in, d_out]``: Xavier-uniform kernel, zero bias."""
    pdt = jnp.dtype(config.param_dtype)
    w = jax.nn.initializers.xavier_uniform()(rngs.params(), (d_in, d_out), pdt)
    bias = param(jnp.zeros((d_out,), pdt), names[1:]) if use_bias else None
    return Linear(param(w, names), bias, dtype=jnp.dtype(config.dtype))


class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm`` over the last axis, computed in float32: ``scale``, ``bias``."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Any = jnp.float32):
        pdt = jnp.dtype(param_dtype)
        self.eps = eps
        self.scale = param(jnp.ones((dim,), pdt), ("embed",))
        self.bias = param(jnp.zeros((dim,), pdt), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def _key_mask(mask: jax.Array | None, b: int, t: int, s: int) -> jax.Array:
    """``[B, S]`` key padding mask or ``[B, T, S]`` mask (or None) -> ``[B, T|1, S]`` bool."""
    if mask is None:
        return jnp.ones((b, 1, s), bool)
    mask = mask.astype(bool)
    if mask.ndim == 2:
        if mask.shape != (b, s):
            raise ValueError(f"key mask has shape {mask.shape}, expected {(b, s)}")
        return mask[:, None, :]
    if mask.shape != (b, t, s):
        raise ValueError(f"attention mask has shape {mask.shape}, expected {(b, t, s)}")
    return mask


class MultiHeadAttention(nnx.Module):
    """Bidirectional multi-head attention with biases; self- or cross-attention."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        c = config
        d, a = c.hidden_size, c.attn_dim
        self.q_proj = linear(d, a, ("embed", "heads"), use_bias=c.qkv_bias, config=c, rngs=rngs)
        self.k_proj = linear(d, a, ("embed", "heads"), use_bias=c.qkv_bias, config=c, rngs=rngs)
        self.v_proj = linear(d, a, ("embed", "heads"), use_bias=c.qkv_bias, config=c, rngs=rngs)
        self.o_proj = linear(a, d, ("heads", "embed"), use_bias=True, config=c, rngs=rngs)
        self.num_heads, self.head_dim = c.num_heads, c.dim_per_head
        self.scale = c.dim_per_head**-0.5

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, kv: jax.Array | None = None
    ) -> jax.Array:
        """``x [B, T, D]`` queries; ``kv [B, S, D]`` keys/values (default ``x``).

        ``mask``: ``[B, S]`` (True = real key) or ``[B, T, S]``; None attends to every key.
        Returns ``[B, T, D]``.
        """
        kv = x if kv is None else kv
        b, t, _ = x.shape
        s = kv.shape[1]
        h, dh = self.num_heads, self.head_dim
        q = constrain(self.q_proj(x).reshape(b, t, h, dh), ("batch", "seq", "heads", "head_dim"))
        k = constrain(self.k_proj(kv).reshape(b, s, h, dh), ("batch", "seq", "heads", "head_dim"))
        v = constrain(self.v_proj(kv).reshape(b, s, h, dh), ("batch", "seq", "heads", "head_dim"))
        out = attend(q, k, v, _key_mask(mask, b, t, s), scale=self.scale)
        return self.o_proj(out.reshape(b, t, h * dh))


class MLP(nnx.Module):
    """``fc2(act(fc1(x)))`` with biases."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        c = config
        d, f = c.hidden_size, c.intermediate_size
        self.fc1 = linear(d, f, ("embed", "mlp"), use_bias=True, config=c, rngs=rngs)
        self.fc2 = linear(f, d, ("mlp", "embed"), use_bias=True, config=c, rngs=rngs)
        self.activation = c.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        h = activation(self.activation)(self.fc1(x))
        return self.fc2(constrain(h, ("batch", "seq", "mlp")))


class EncoderBlock(nnx.Module):
    """One pre-LN block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        d, eps, pdt = config.hidden_size, config.layer_norm_eps, config.param_dtype
        self.layer_norm1 = LayerNorm(d, eps=eps, param_dtype=pdt)
        self.self_attn = MultiHeadAttention(config, rngs=rngs)
        self.layer_norm2 = LayerNorm(d, eps=eps, param_dtype=pdt)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        x = x + self.mlp(self.layer_norm2(x))
        return constrain(x, ("batch", "seq", "embed"))


def _remat_policy(remat: bool | str):
    return getattr(jax.checkpoint_policies, remat) if isinstance(remat, str) else None


class Encoder(nnx.Module):
    """``num_layers`` ``EncoderBlock``s (no final norm: the caller owns it)."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.layers = nnx.List([EncoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        return_hidden_states: bool = False,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
        """``x [B, T, D]`` -> ``[B, T, D]`` (and the ``L + 1`` hidden states if asked)."""
        c = self.config
        x = constrain(x.astype(jnp.dtype(c.dtype)), ("batch", "seq", "embed"))

        def run(layer, x, mask):
            return layer(x, mask)

        if c.remat:
            run = nnx.remat(run, policy=_remat_policy(c.remat))
        hidden = [x]
        for layer in self.layers:
            x = run(layer, x, mask)
            hidden.append(x)
        return (x, tuple(hidden)) if return_hidden_states else x
