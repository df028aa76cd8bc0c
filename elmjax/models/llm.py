"""One decoder LLM in Flax NNX for Llama 3, Qwen 2 and Gemma 2, chosen by its config.

Config
------
``LLMConfig`` (frozen, hashable) holds the architecture, the extra vocabulary and the numerics;
``LLMConfig.from_hf(config_json_dict, **overrides)`` reads a transformers ``config.json`` (old
``rope_theta`` + ``rope_scaling`` keys and transformers 5's ``rope_parameters`` alike). The
family switches: Qwen 2 has q/k/v biases; Gemma 2 scales embeddings by ``sqrt(hidden)`` (cast
to the compute dtype, as transformers does), uses ``(1 + w)`` RMSNorm, norms before *and* after
attention and MLP, ``gelu_pytorch_tanh``, ``query_pre_attn_scalar``, tanh soft-capping of
attention scores and final logits, and a sliding window on the layers whose ``layer_types``
entry is ``"sliding_attention"`` (transformers' default: the even layers 0, 2, 4, ...).

Module tree (HF module names; flax leaf names ``embedding``/``kernel``/``bias``/``scale``)::

    embed_tokens.embedding [V, D]      embed_tokens.extra [E, D]  (ExtraVocab, if E > 0)
    layers[i] (or one stacked layer with a leading [L] axis when scan_layers)
      input_layernorm.scale, post_attention_layernorm.scale
      (gemma2) pre_feedforward_layernorm.scale, post_feedforward_layernorm.scale
      self_attn.{q,k,v,o}_proj.kernel [in, out] (+ .bias)     mlp.{gate,up,down}_proj.kernel
    norm.scale
    lm_head.kernel [D, V]  lm_head.extra [D, E]               (only when not tied)

``models.hf.param_map`` lists the HF tensor name of every parameter (and the transposes).

Extra vocabulary
----------------
``extra_vocab`` rows (ECG ids, markers, pad) follow the ``vocab_size`` text rows: id
``vocab_size + j`` is extra row ``j``; logits have ``vocab_size + extra_vocab`` columns. The rows
live in their own ``ExtraVocab`` Variable (a subclass of ``nnx.Param``), initialised like
transformers' ``resize_token_embeddings(mean_resizing=True)``: drawn from a Gaussian with the
mean of the old rows and 1e-9 times their covariance (so, in effect, the mean row), or the mean
itself when that covariance is not positive definite. When embeddings are tied the head uses
the same rows; otherwise ``lm_head.extra`` is mean-resized from the head. Trainable or not is a
choice of optimiser filter: ``wrt=nnx.Param`` includes them, ``nnx.LoRAParam`` does not, and
``models.lora.trainable_filter(train_extra_vocab)`` builds the usual one.

Calling the model
-----------------
``model(tokens, *, positions=None, segment_ids=None, embeds=None, embed_mask=None, cache=None,
logits_positions=None, return_hidden=False)``:

- ``tokens [B, T] int32``; ``positions [B, T] int32`` (RoPE positions; default ``arange(T)``,
  offset by the cache's write index when decoding); ``segment_ids [B, T] int32`` (default all 1):
  0 is padding (never attended to), equal nonzero ids attend to each other causally (packed
  sequences: positions restart at 0 in each segment).
- ``embeds [B, T, D]`` with ``embed_mask [B, T] bool``: these vectors replace the token
  embeddings where the mask is set (ECG encoder / vision projector outputs). They are used as
  given (no Gemma ``sqrt(D)`` scaling), like transformers' ``inputs_embeds``.
- ``logits_positions [B, K] int32``: the head runs only at these positions -> ``[B, K, V]``.
- ``return_hidden=True`` returns the final-norm hidden states ``[B, T|K, D]`` instead of
  logits; ``model.logits(hidden)`` applies the head (for chunked losses).
- Returns float32 logits ``[B, T, V]`` (or ``[B, K, V]``); with a cache, ``(logits, cache)``.

Attention is a plain einsum with a boolean mask (segment, causal by slot, sliding window by
position distance), GQA by grouping query heads, softmax in float32.
``jax.nn.dot_product_attention`` has no soft-capping, which Gemma 2 needs, so it is not used.

KV cache
--------
``cache = model.init_cache(batch, max_len, dtype=None)`` -> ``KVCache`` (a pytree):
``k, v [L, B, S, kv_heads, head_dim]``, ``segment_ids [B, S]`` (0 = empty or padding),
``positions [B, S]`` and ``index`` (scalar int32, the next slot to write). A call with a cache
writes the T new tokens' K/V at slots ``[index, index + T)`` (``lax.dynamic_update_slice``,
static shapes, jit-friendly), attends over all S slots and returns the cache with
``index + T``. Prefill is one call with the (left-padded, ``segment_ids`` 0 on padding) prompt;
each decode step is a call with ``T = 1``, ``segment_ids`` 1 and the row's next position.
``cache_index=N`` (a static int, the cache's write index, e.g. 0 for a prefill into an empty
cache) lets the call attend over slots ``[0, N + T)`` only, in causal query blocks of
``ATTENTION_BLOCK`` that each read the slots up to their last query: a long prefill computes
about half the scores and none for the empty slots after it. Writing past ``max_len`` is not
checked (``dynamic_update_slice`` clamps): size the cache for prompt + new tokens.
``KVCache.logical_axes()`` gives the names for sharding it.

Numerics and scale
------------------
``dtype`` is the compute dtype, ``param_dtype`` the storage dtype; scores, softmax, norms and
logits are float32. ``scan_layers=True`` stacks the layers (leading ``layers`` axis) and runs
them with ``nnx.scan``; ``remat`` is False, True (save nothing) or the name of a
``jax.checkpoint_policies`` policy. Parameters carry logical axis names (see ``elmjax.parallel``)
and are created with ``eager_sharding=False``: a model builds the same with or without a mesh;
``parallel.create_sharded`` / ``hf.load_hf(mesh=...)`` build it sharded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from elmjax.parallel import constrain

FAMILIES: tuple[str, ...] = ("llama", "qwen2", "gemma2")
ACTIVATIONS: tuple[str, ...] = ("silu", "gelu_pytorch_tanh", "gelu")
ROPE_TYPES: tuple[str, ...] = ("default", "llama3", "linear")
SLIDING, FULL = "sliding_attention", "full_attention"


class ExtraVocab(nnx.Param):
    """Vocabulary rows appended for ECG ids / markers / pad (kept apart for optimiser filters)."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Architecture, extra vocabulary and numerics of the decoder (see the module docstring).

    Attributes:
      family: "llama" | "qwen2" | "gemma2".
      vocab_size: text vocabulary rows (the checkpoint's embedding rows).
      hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size: shapes.
      rope_theta: RoPE base.
      rope_scaling: None, or a dict with "rope_type" ("llama3": factor, low_freq_factor,
        high_freq_factor, original_max_position_embeddings; "linear": factor).
      rms_norm_eps: RMSNorm epsilon.
      tie_embeddings: the LM head is the embedding table.
      attention_bias: biases on q/k/v (Qwen 2; Llama's ``attention_bias`` also sets
        ``o_proj_bias``). o_proj_bias, mlp_bias: further biases (Llama options).
      hidden_activation: "silu" | "gelu_pytorch_tanh" | "gelu".
      query_pre_attn_scalar: scores are scaled by this ** -0.5 (Gemma 2); None: head_dim.
      attn_logit_softcapping, final_logit_softcapping: tanh caps (Gemma 2) or None.
      sliding_window: window (in positions) of sliding layers; None: no sliding layers.
      layer_types: per layer "sliding_attention" | "full_attention"; None: all full.
      extra_vocab: rows appended after ``vocab_size`` (ECG tokens, markers, pad).
      train_extra_vocab: whether the training filter includes the extra rows.
      dtype: compute dtype ("float32" | "bfloat16"); param_dtype: parameter storage dtype.
      scan_layers: stack the layers and run them with ``nnx.scan``.
      remat: False, True, or a ``jax.checkpoint_policies`` name (e.g. "dots_saveable").
      initializer_range: std of the random init (as in transformers).
    """

    family: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    hidden_activation: str = "silu"
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    extra_vocab: int = 0
    train_extra_vocab: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: bool | str = False
    initializer_range: float = 0.02

    def __post_init__(self):
        # Hashable containers: the config is static model metadata (part of the jit key).
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, FrozenDict):
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} not supported; supported: {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.hidden_activation not in ACTIVATIONS:
            raise ValueError(f"hidden_activation {self.hidden_activation!r} not in {ACTIVATIONS}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} not supported; supported: {ROPE_TYPES}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
                )
            if bad := set(self.layer_types) - {SLIDING, FULL}:
                raise ValueError(f"unknown layer_types {sorted(bad)}; use {SLIDING!r}/{FULL!r}")
            if SLIDING in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types has sliding layers but sliding_window is not set")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be float32, bfloat16 or float16")
        if isinstance(self.remat, str) and not hasattr(jax.checkpoint_policies, self.remat):
            raise ValueError(f"remat policy {self.remat!r} is not in jax.checkpoint_policies")
        if self.extra_vocab < 0:
            raise ValueError(f"extra_vocab must be >= 0, got {self.extra_vocab}")

    # Family switches --------------------------------------------------------------------
    @property
    def is_gemma(self) -> bool:
        return self.family == "gemma2"

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def total_vocab(self) -> int:
        """Rows of the embedding table and columns of the logits: text + extra."""
        return self.vocab_size + self.extra_vocab

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        types = self.layer_types or (FULL,) * self.num_layers
        return tuple(t == SLIDING for t in types)

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **overrides: Any) -> LLMConfig:
        """Reads a transformers ``config.json`` dict; ``overrides`` replace any field."""
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}"
            )
        family = model_type
        heads = config["num_attention_heads"]
        # RoPE: transformers 5 writes rope_parameters (rope_theta inside); released checkpoints
        # carry top-level rope_theta + rope_scaling.
        params = dict(config.get("rope_parameters") or {})
        scaling = dict(config.get("rope_scaling") or {})
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        rope = {k: v for k, v in (scaling or params).items() if k not in ("rope_theta", "type")}
        rope_type = rope.pop("rope_type", scaling.get("type", "default"))
        rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}

        n_layers = config["num_hidden_layers"]
        layer_types = config.get("layer_types")
        window = config.get("sliding_window")
        if family == "gemma2" and layer_types is None:
            layer_types = [SLIDING if (i + 1) % 2 else FULL for i in range(n_layers)]
        if family == "qwen2":
            if not config.get("use_sliding_window", False):
                window = None
            if layer_types is None:
                first = config.get("max_window_layers", n_layers)
                layer_types = [
                    SLIDING if window is not None and i >= first else FULL for i in range(n_layers)
                ]
        if family == "llama":
            layer_types, window = None, None
        if layer_types is not None and SLIDING not in layer_types:
            layer_types, window = None, None

        gemma = family == "gemma2"
        activation = config.get("hidden_activation") or config.get("hidden_act", "silu")
        llama_bias = family == "llama" and bool(config.get("attention_bias", False))
        kwargs = dict(
            family=family,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"],
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            tie_embeddings=config.get("tie_word_embeddings", gemma),
            attention_bias=family == "qwen2" or llama_bias,
            o_proj_bias=llama_bias,
            mlp_bias=family == "llama" and bool(config.get("mlp_bias", False)),
            hidden_activation=activation,
            query_pre_attn_scalar=config.get("query_pre_attn_scalar") if gemma else None,
            attn_logit_softcapping=config.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcapping=config.get("final_logit_softcapping") if gemma else None,
            sliding_window=window,
            layer_types=tuple(layer_types) if layer_types is not None else None,
            initializer_range=config.get("initializer_range", 0.02),
        )
        kwargs.update(overrides)
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _param(cls: type[nnx.Variable], value: jax.Array, names: Sequence[str | None]):
    """A Variable with logical axis names; sharding is applied by ``elmjax.parallel``."""
    return cls(value, out_sharding=tuple(names), eager_sharding=False)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with ``kernel [in, out]`` (HF ``weight [out, in]`` transposed).

    Built from its Variables (so LoRA can wrap and unwrap it without copies); ``Linear.create``
    makes fresh ones. The logical names live in ``kernel``'s ``out_sharding`` metadata.
    """

    def __init__(self, kernel: nnx.Param, bias: nnx.Param | None, *, dtype: Any):
        self.kernel = kernel
        self.bias = nnx.data(bias)
        self.dtype = dtype

    @classmethod
    def create(
        cls,
        in_features: int,
        out_features: int,
        names: tuple[str, str],
        *,
        use_bias: bool,
        config: LLMConfig,
        rngs: nnx.Rngs,
    ) -> Linear:
        pdt = jnp.dtype(config.param_dtype)
        w = config.initializer_range * jax.random.normal(
            rngs.params(), (in_features, out_features), pdt
        )
        bias = _param(nnx.Param, jnp.zeros((out_features,), pdt), names[1:]) if use_bias else None
        return cls(_param(nnx.Param, w, names), bias, dtype=jnp.dtype(config.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm in float32; Llama/Qwen ``w * norm(x)``, Gemma ``(1 + w) * norm(x)``."""

    def __init__(self, dim: int, *, config: LLMConfig):
        self.one_plus = config.is_gemma
        self.eps = config.rms_norm_eps
        init = jnp.zeros if self.one_plus else jnp.ones
        self.scale = _param(nnx.Param, init((dim,), jnp.dtype(config.param_dtype)), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.scale[...].astype(jnp.float32)
        if self.one_plus:
            return (y * (1.0 + w)).astype(dtype)
        # transformers' Llama: cast the normalised input back before scaling by the weight.
        return (self.scale[...] * y.astype(dtype)).astype(dtype)


def _mean_resize(old: jax.Array, n: int, key: jax.Array) -> jax.Array:
    """``n`` new rows like transformers' mean-resizing of ``old [V, D]`` -> ``[n, D]``."""
    old32 = old.astype(jnp.float32)
    mean = old32.mean(axis=0)
    centred = old32 - mean
    cov = centred.T @ centred / old.shape[0]
    chol = jnp.linalg.cholesky(1e-9 * cov)  # NaN where 1e-9 * cov is not positive definite
    sample = mean + jax.random.normal(key, (n, old.shape[1]), jnp.float32) @ chol.T
    ok = jnp.all(jnp.isfinite(chol))
    return jnp.where(ok, sample, jnp.broadcast_to(mean, sample.shape)).astype(old.dtype)


class Embed(nnx.Module):
    """Token embedding ``embedding [V, D]`` plus ``extra [E, D]`` (ExtraVocab) rows."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(config.param_dtype)
        self.vocab_size = config.vocab_size
        self.dtype = jnp.dtype(config.dtype)
        table = config.initializer_range * jax.random.normal(
            rngs.params(), (config.vocab_size, config.hidden_size), pdt
        )
        self.embedding = _param(nnx.Param, table, ("vocab", "embed"))
        if config.extra_vocab:
            # A fresh model draws its extra rows like the others (mean-resizing a random table
            # would give E near-identical rows); hf.load_hf re-draws them from the loaded
            # checkpoint's rows with transformers' mean-resizing (resize_extra_vocab).
            rows = config.initializer_range * jax.random.normal(
                rngs.params(), (config.extra_vocab, config.hidden_size), pdt
            )
            self.extra = _param(ExtraVocab, rows, ("vocab", "embed"))
        else:
            self.extra = nnx.data(None)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        v = self.vocab_size
        # Gather whole rows: the table's FSDP-sharded width is all-gathered first, so the
        # looked-up rows can be resharded along the batch cheaply.
        table = constrain(self.embedding[...], ("vocab", None))
        x = jnp.take(table, jnp.clip(tokens, 0, v - 1), axis=0)
        if self.extra is not None:
            e = constrain(self.extra[...], ("vocab", None))
            x_extra = jnp.take(e, jnp.clip(tokens - v, 0, e.shape[0] - 1), axis=0)
            x = jnp.where((tokens >= v)[..., None], x_extra, x)
        return x.astype(self.dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied LM head: ``h [..., D] -> logits [..., V + E]`` in float32."""
        h = h.astype(self.dtype)
        logits = jnp.einsum(
            "...d,vd->...v",
            h,
            self.embedding[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        if self.extra is not None:
            extra = jnp.einsum(
                "...d,vd->...v",
                h,
                self.extra[...].astype(self.dtype),
                preferred_element_type=jnp.float32,
            )
            logits = jnp.concatenate([logits, extra], axis=-1)
        return logits


class LMHead(nnx.Module):
    """Untied LM head ``kernel [D, V]`` plus ``extra [D, E]`` (ExtraVocab) columns."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(config.param_dtype)
        self.dtype = jnp.dtype(config.dtype)
        w = config.initializer_range * jax.random.normal(
            rngs.params(), (config.hidden_size, config.vocab_size), pdt
        )
        self.kernel = _param(nnx.Param, w, ("embed", "vocab"))
        if config.extra_vocab:  # drawn like the others, as in Embed
            cols = config.initializer_range * jax.random.normal(
                rngs.params(), (config.hidden_size, config.extra_vocab), pdt
            )
            self.extra = _param(ExtraVocab, cols, ("embed", "vocab"))
        else:
            self.extra = nnx.data(None)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h.astype(self.dtype)
        w = self.kernel[...].astype(self.dtype)
        logits = jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)
        if self.extra is not None:
            e = self.extra[...].astype(self.dtype)
            extra = jnp.einsum("...d,dv->...v", h, e, preferred_element_type=jnp.float32)
            logits = jnp.concatenate([logits, extra], axis=-1)
        return logits


def rope_frequencies(config: LLMConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float32), with Llama 3 / linear scaling."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    inv = inv.astype(np.float32).astype(np.float64)  # transformers computes it in float32
    s = config.rope_scaling
    if config.rope_type == "linear":
        inv = inv / s["factor"]
    elif config.rope_type == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [B, T, N, Dh]`` by ``cos, sin [B, T, Dh/2]`` (HF's rotate-half layout)."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


ATTENTION_BLOCK = 128  # query block of the causal (static-offset) attention path


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    causal_offset: int | None = None,
    block: int = ATTENTION_BLOCK,
) -> jax.Array:
    """Masked GQA attention: q [B,T,H,Dh], k/v [B,S,K,Dh], mask [B,T,S] -> [B,T,H,Dh].

    Scores and softmax in float32; a row with nothing to attend to (padding) gets uniform
    weights, so its (unused) output stays finite. ``causal_offset`` (a static int: query ``t``
    sits at key slot ``causal_offset + t`` and the mask never lets it see a later slot) splits
    the queries into blocks of ``block`` that each read only the slots up to their last query:
    a long causal prefill computes about half the scores.
    """
    t = q.shape[1]
    if causal_offset is None or t <= block:
        return _attend(q, k, v, mask, scale, softcap)
    outs = []
    for a in range(0, t, block):
        b = min(a + block, t)
        n = min(k.shape[1], causal_offset + b)
        outs.append(_attend(q[:, a:b], k[:, :n], v[:, :n], mask[:, a:b, :n], scale, softcap))
    return jnp.concatenate(outs, axis=1)


def _attend(q, k, v, mask, scale, softcap):
    b, t, h, d = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, h // kh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


class Attention(nnx.Module):
    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        c = config
        d, h, kh, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        mk = Linear.create
        self.q_proj = mk(
            d, h * hd, ("embed", "heads"), use_bias=c.attention_bias, config=c, rngs=rngs
        )
        self.k_proj = mk(
            d, kh * hd, ("embed", "kv_heads"), use_bias=c.attention_bias, config=c, rngs=rngs
        )
        self.v_proj = mk(
            d, kh * hd, ("embed", "kv_heads"), use_bias=c.attention_bias, config=c, rngs=rngs
        )
        self.o_proj = mk(h * hd, d, ("heads", "embed"), use_bias=c.o_proj_bias, config=c, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kh, hd
        self.scale = c.attn_scale
        self.softcap = c.attn_logit_softcapping

    def __call__(self, x, cos, sin, mask, kv_cache=None, index=None, layer=None):
        """``x [B,T,D]``; ``kv_cache``: every layer's ``(k, v) [L,B,S,K,Dh]`` or None.

        With a cache, this call's keys/values are written in place at ``[layer, :, index]``
        of the whole stacked cache (no per-layer slice is copied out and written back) and
        attention reads layer ``layer``'s slots. Returns ``(out [B,T,D], (k, v))`` with the
        updated cache (None without one).
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        new_cache = None
        if kv_cache is not None:
            ck, cv = kv_cache
            start = (layer, 0, index, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), start)
            cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), start)
            new_cache = (ck, cv)
            # The mask covers the first mask.shape[-1] slots (all of them, unless the caller
            # gave a static cache_index: then only the slots up to this call's last token).
            n = mask.shape[-1]
            k = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False)[:, :n].astype(q.dtype)
            v = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False)[:, :n].astype(q.dtype)
        causal = index if isinstance(index, int) else None
        out = attend(
            q,
            k,
            v,
            mask,
            scale=self.scale,
            softcap=self.softcap,
            causal_offset=causal,
        )
        return self.o_proj(out.reshape(b, t, -1)), new_cache


class MLP(nnx.Module):
    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        c = config
        d, f, bias = c.hidden_size, c.intermediate_size, c.mlp_bias
        self.gate_proj = Linear.create(d, f, ("embed", "mlp"), use_bias=bias, config=c, rngs=rngs)
        self.up_proj = Linear.create(d, f, ("embed", "mlp"), use_bias=bias, config=c, rngs=rngs)
        self.down_proj = Linear.create(f, d, ("mlp", "embed"), use_bias=bias, config=c, rngs=rngs)
        self.activation = c.hidden_activation

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = self.gate_proj(x)
        if self.activation == "silu":
            gate = jax.nn.silu(gate)
        else:
            gate = jax.nn.gelu(gate, approximate=self.activation == "gelu_pytorch_tanh")
        h = constrain(gate * self.up_proj(x), ("batch", "seq", "mlp"))
        return self.down_proj(h)


class DecoderLayer(nnx.Module):
    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.gemma = config.is_gemma
        self.input_layernorm = RMSNorm(d, config=config)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, config=config)
        if self.gemma:
            self.pre_feedforward_layernorm = RMSNorm(d, config=config)
            self.post_feedforward_layernorm = RMSNorm(d, config=config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv_cache=None, index=None, layer=None):
        h, kv_cache = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, kv_cache, index, layer
        )
        if self.gemma:
            x = x + self.post_attention_layernorm(h)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x + h
            x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "embed")), kv_cache


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for ``S`` slots (see the module docstring)."""

    k: jax.Array  # [L, B, S, kv_heads, head_dim]
    v: jax.Array  # [L, B, S, kv_heads, head_dim]
    segment_ids: jax.Array  # [B, S] int32; 0 = empty slot or padding
    positions: jax.Array  # [B, S] int32
    index: jax.Array  # [] int32: next slot to write

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @staticmethod
    def logical_axes() -> KVCache:
        """Logical names per field; map with ``is_leaf=lambda x: isinstance(x, tuple)``."""
        kv = ("layers", "batch", "seq", "kv_heads", "head_dim")
        return KVCache(kv, kv, ("batch", "seq"), ("batch", "seq"), ())


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _remat_policy(remat: bool | str):
    return getattr(jax.checkpoint_policies, remat) if isinstance(remat, str) else None


class LLM(nnx.Module):
    """Decoder-only LLM (Llama 3 / Qwen 2 / Gemma 2); see the module docstring for the API."""

    def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embed(config, rngs=rngs)
        if config.scan_layers:

            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(rngs):
                return DecoderLayer(config, rngs=rngs)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List(
                [DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)]
            )
        self.norm = RMSNorm(config.hidden_size, config=config)
        if not config.tie_embeddings:
            self.lm_head = LMHead(config, rngs=rngs)

    # ----------------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """An empty cache for ``batch`` rows and ``max_len`` slots (dtype: compute dtype)."""
        c = self.config
        dtype = jnp.dtype(dtype or c.dtype)
        shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
        names = KVCache.logical_axes()
        return KVCache(
            k=constrain(jnp.zeros(shape, dtype), names.k),
            v=constrain(jnp.zeros(shape, dtype), names.v),
            segment_ids=constrain(jnp.zeros((batch, max_len), jnp.int32), names.segment_ids),
            positions=constrain(jnp.zeros((batch, max_len), jnp.int32), names.positions),
            index=jnp.zeros((), jnp.int32),
        )

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head (+ final soft-capping) on final-norm hidden states -> float32 logits."""
        c = self.config
        if c.tie_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        if c.final_logit_softcapping:
            cap = c.final_logit_softcapping
            logits = jnp.tanh(logits / cap) * cap
        return constrain(logits, ("batch", "seq", "vocab"))

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        embeds: jax.Array | None = None,
        embed_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        logits_positions: jax.Array | None = None,
        return_hidden: bool = False,
        cache_index: int | None = None,
    ):
        c = self.config
        b, t = tokens.shape
        if cache_index is not None and cache is None:
            raise ValueError("cache_index needs a cache")
        if cache_index is not None:
            index = int(cache_index)  # static: attention reads slots [0, index + t) only
        else:
            index = cache.index if cache is not None else jnp.zeros((), jnp.int32)
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = positions.astype(jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)

        x = self.embed_tokens(tokens)
        if c.is_gemma:
            x = x * jnp.asarray(math.sqrt(c.hidden_size), x.dtype)
        if embeds is not None:
            if embed_mask is None:
                raise ValueError("embeds needs embed_mask [B, T] (where to use them)")
            x = jnp.where(embed_mask[..., None], embeds.astype(x.dtype), x)
        x = constrain(x, ("batch", "seq", "embed"))

        # RoPE tables, shared by all layers.
        angles = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_frequencies(c))
        cos, sin = jnp.cos(angles), jnp.sin(angles)

        # Masks [B, T, S] over the keys: this call's tokens, or every cache slot.
        q_slot = index + jnp.arange(t, dtype=jnp.int32)
        if cache is None:
            kv_seg, kv_pos, kv_slot = segment_ids, positions, jnp.arange(t, dtype=jnp.int32)
        else:
            kv_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, index))
            kv_pos = jax.lax.dynamic_update_slice(cache.positions, positions, (0, index))
            kv_slot = jnp.arange(cache.max_len, dtype=jnp.int32)
        n = kv_slot.shape[0] if cache_index is None else index + t  # key slots attended
        seg, pos = kv_seg[:, :n], kv_pos[:, :n]
        mask = (
            (segment_ids[:, :, None] == seg[:, None, :])
            & (seg[:, None, :] != 0)
            & (kv_slot[None, None, :n] <= q_slot[None, :, None])
        )
        local = None
        if any(c.sliding_layers):
            local = mask & (positions[:, :, None] - pos[:, None, :] < c.sliding_window)

        x, kv = self._run_layers(x, cos, sin, mask, local, cache, index)

        if logits_positions is not None:
            x = jnp.take_along_axis(x, logits_positions[..., None].astype(jnp.int32), axis=1)
        x = self.norm(x)
        out = x if return_hidden else self.logits(x)
        if cache is None:
            return out
        new_cache = KVCache(
            k=kv[0],
            v=kv[1],
            segment_ids=kv_seg,
            positions=kv_pos,
            index=jnp.asarray(index + t, jnp.int32),
        )
        return out, new_cache

    def _run_layers(self, x, cos, sin, mask, local, cache, index):
        c = self.config

        def run(layer, x, layer_mask, kv, i):
            return layer(x, cos, sin, layer_mask, kv, index, i)

        if c.remat:
            run = nnx.remat(run, policy=_remat_policy(c.remat))

        # The stacked cache [L, ...] travels whole (a carry in the scan); each layer writes
        # its new slots in place, so a decode step copies no layer's cache.
        kv = (cache.k, cache.v) if cache is not None else None
        if c.scan_layers:
            sliding = jnp.asarray(c.sliding_layers)

            @nnx.scan(
                in_axes=(nnx.Carry, 0, 0, 0),
                out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            def body(carry, layer, is_sliding, i):
                x, kv = carry
                layer_mask = mask if local is None else jnp.where(is_sliding, local, mask)
                return run(layer, x, layer_mask, kv, i)

            layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
            return body((x, kv), self.layers, sliding, layer_ids)

        for i, layer in enumerate(self.layers):
            layer_mask = local if c.sliding_layers[i] else mask
            x, kv = run(layer, x, layer_mask, kv, i)
        return x, kv if kv is not None else (None, None)


def resize_extra_vocab(model: LLM, seed: int = 0) -> LLM:
    """Re-draws the extra vocabulary rows from the current base rows (mean-resizing), in place.

    ``hf.load_hf`` calls it after loading the checkpoint; the rows keep their sharding.
    """
    c = model.config
    if not c.extra_vocab:
        return model
    k_embed, k_head = jax.random.split(jax.random.key(seed))
    emb = model.embed_tokens
    out = emb.extra[...].sharding
    emb.extra[...] = jax.jit(_mean_resize, static_argnums=1, out_shardings=out)(
        emb.embedding[...], c.extra_vocab, k_embed
    )
    if not c.tie_embeddings:
        head = model.lm_head

        def head_rows(kernel, n, key):
            return _mean_resize(kernel.T, n, key).T

        out = head.extra[...].sharding
        head.extra[...] = jax.jit(head_rows, static_argnums=1, out_shardings=out)(
            head.kernel[...], c.extra_vocab, k_head
        )
    return model
