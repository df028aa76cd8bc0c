"""A BERT text encoder in Flax NNX (MERL's frozen report encoder), read from a local HF directory.

MERL pretrains its ECG encoder against reports embedded by a frozen BERT
(``ncbi/MedCPT-Query-Encoder``): the pooler output (``tanh(dense(h_CLS))``, 768-d) goes through
a trainable MLP to the shared 256-d space. This module is the BERT half; the heads and the loss
live in :mod:`elmjax.pretrain`.

Model (transformers' ``BertModel``, post-LN)::

    h = LayerNorm(word[ids] + position[0..T) + token_type[type_ids])
    per layer:  h = LN1(h + o_proj(attention(h)))
                h = LN2(h + fc2(gelu(fc1(h))))
    pooled = tanh(pooler(h[:, 0]))

The attention and MLP are ``models.transformer.MultiHeadAttention`` / ``MLP`` (the same blocks
as the ViT towers, with the same logical axis names); only the norm placement differs, so the
layer is written here rather than as an option of the pre-LN ``EncoderBlock``.

API:
  BertConfig.from_hf(config_dict) / .to_hf() -> the transformers ``config.json`` fields
  BertModel(config, rngs=...)(input_ids, attention_mask=None, token_type_ids=None)
      -> (last_hidden_state [B, T, D], pooled [B, D])
  load_bert(path, dtype="float32") -> BertModel: ``config.json`` + ``*.safetensors`` of a
      ``BertModel`` (names with or without the ``bert.`` prefix of task models)
  save_bert(model, path): the same format (for locally made tiny encoders and tests)

Parity: the outputs match transformers' ``BertModel`` in float32 to 1e-4 (tests/test_pretrain).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax.models.transformer import (
    MLP,
    EncoderConfig,
    LayerNorm,
    MultiHeadAttention,
    linear,
    param,
)
from elmjax.parallel import constrain

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a transformers ``BertConfig`` that shape the model."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_act not in HF_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not in {sorted(HF_ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides: Any) -> BertConfig:
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            intermediate_size=int(d["intermediate_size"]),
            max_position_embeddings=int(d.get("max_position_embeddings", 512)),
            type_vocab_size=int(d.get("type_vocab_size", 2)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            hidden_act=str(d.get("hidden_act", "gelu")),
            pad_token_id=int(d.get("pad_token_id") or 0),
            **overrides,
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "pad_token_id": self.pad_token_id,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "position_embedding_type": "absolute",
        }

    @property
    def block(self) -> EncoderConfig:
        """The attention / MLP shapes as a ``transformer.EncoderConfig``."""
        return EncoderConfig(
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            activation=HF_ACTIVATIONS[self.hidden_act],
            layer_norm_eps=self.layer_norm_eps,
            qkv_bias=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


class BertLayer(nnx.Module):
    """Post-LN block: ``LN1(x + attn(x))``, then ``LN2(x + mlp(x))``."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        block, d = config.block, config.hidden_size
        self.self_attn = MultiHeadAttention(block, rngs=rngs)
        self.attn_norm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=config.param_dtype)
        self.mlp = MLP(block, rngs=rngs)
        self.mlp_norm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=config.param_dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = self.attn_norm(x + self.self_attn(x, mask))
        x = self.mlp_norm(x + self.mlp(x))
        return constrain(x, ("batch", "seq", "embed"))


class BertModel(nnx.Module):
    """transformers' ``BertModel`` (embeddings, post-LN encoder, pooler)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        pdt = jnp.dtype(c.param_dtype)

        def table(n):
            return param(0.02 * jax.random.normal(rngs.params(), (n, c.hidden_size), pdt),
                         (None, "embed"))  # fmt: skip

        self.word_embeddings = table(c.vocab_size)
        self.position_embeddings = table(c.max_position_embeddings)
        self.token_type_embeddings = table(c.type_vocab_size)
        self.embed_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, param_dtype=pdt)
        self.layers = nnx.List([BertLayer(c, rngs=rngs) for _ in range(c.num_layers)])
        block = c.block
        self.pooler = linear(
            c.hidden_size, c.hidden_size, ("embed", None), use_bias=True, config=block, rngs=rngs
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """``input_ids [B, T]`` (``attention_mask`` ``[B, T]``, 1 = real token) ->
        ``(last_hidden_state [B, T, D], pooled [B, D])``."""
        c = self.config
        t = input_ids.shape[1]
        if t > c.max_position_embeddings:
            raise ValueError(f"{t} tokens > max_position_embeddings={c.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        dt = jnp.dtype(c.dtype)
        h = (
            self.word_embeddings[...][input_ids]
            + self.position_embeddings[...][:t][None]
            + self.token_type_embeddings[...][token_type_ids]
        )
        h = self.embed_norm(h.astype(dt))
        for layer in self.layers:
            h = layer(h, attention_mask)
        pooled = jnp.tanh(self.pooler(h[:, 0]))
        return h, pooled


# --------------------------------------------------------------------------------------------
# Hugging Face files
# --------------------------------------------------------------------------------------------


def _hf_names(c: BertConfig) -> dict[str, tuple[tuple, bool]]:
    """HF tensor name -> (path in the nnx model, transpose)."""
    out: dict[str, tuple[tuple, bool]] = {
        "embeddings.word_embeddings.weight": (("word_embeddings",), False),
        "embeddings.position_embeddings.weight": (("position_embeddings",), False),
        "embeddings.token_type_embeddings.weight": (("token_type_embeddings",), False),
        "embeddings.LayerNorm.weight": (("embed_norm", "scale"), False),
        "embeddings.LayerNorm.bias": (("embed_norm", "bias"), False),
        "pooler.dense.weight": (("pooler", "kernel"), True),
        "pooler.dense.bias": (("pooler", "bias"), False),
    }
    parts = {
        "attention.self.query": ("self_attn", "q_proj"),
        "attention.self.key": ("self_attn", "k_proj"),
        "attention.self.value": ("self_attn", "v_proj"),
        "attention.output.dense": ("self_attn", "o_proj"),
        "intermediate.dense": ("mlp", "fc1"),
        "output.dense": ("mlp", "fc2"),
    }
    for i in range(c.num_layers):
        pre = f"encoder.layer.{i}."
        for hf, path in parts.items():
            out[pre + hf + ".weight"] = (("layers", i, *path, "kernel"), True)
            out[pre + hf + ".bias"] = (("layers", i, *path, "bias"), False)
        for hf, norm in (
            ("attention.output.LayerNorm", "attn_norm"),
            ("output.LayerNorm", "mlp_norm"),
        ):
            out[pre + hf + ".weight"] = (("layers", i, norm, "scale"), False)
            out[pre + hf + ".bias"] = (("layers", i, norm, "bias"), False)
    return out


def _variable(model: BertModel, path: tuple) -> nnx.Variable:
    node: Any = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def load_bert(path: str | Path, *, dtype: str = "float32") -> BertModel:
    """A ``BertModel`` from a local HF directory (``config.json`` + ``*.safetensors``)."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (convert .bin files first)")
    config = BertConfig.from_hf(json.loads((path / "config.json").read_text()), dtype=dtype)
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            tensors[k.removeprefix("bert.")] = v
    model = nnx.eval_shape(lambda: BertModel(config, rngs=nnx.Rngs(0)))
    names = _hf_names(config)
    missing = [k for k in names if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing BERT tensors, e.g. {missing[:4]}")
    pdt = jnp.dtype(config.param_dtype)
    for name, (p, transpose) in names.items():
        var = _variable(model, p)
        value = tensors[name].T if transpose else tensors[name]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{path}: {name} has shape {value.shape}, expected {var.shape}")
        var.set_value(jnp.asarray(value, pdt))
    return model


def save_bert(model: BertModel, path: str | Path) -> None:
    """Writes ``config.json`` and ``model.safetensors`` with transformers' names."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (p, transpose) in _hf_names(model.config).items():
        value = np.asarray(_variable(model, p)[...], np.float32)
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(model.config.to_hf(), indent=1))
