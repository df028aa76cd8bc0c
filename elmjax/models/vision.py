"""Vision towers for the image representation: ViT, CLIP vision and SigLIP vision in Flax NNX.

An ECG printout (a rendered 12-lead plot) becomes either one pooled vector or a sequence of
patch tokens, which a projector maps into the LLM. The three towers share
``models.transformer.Encoder`` and differ only around it.

Config
------
``VisionConfig`` (frozen, hashable) holds the tower ``kind`` (``"vit"`` | ``"clip"`` |
``"siglip"``), the ``encoder`` (an ``EncoderConfig``), ``image_size`` / ``patch_size`` /
``num_channels``, the optional heads (``pooler``, ``projection_dim``), what the tower returns
(``output``, ``pool``) and the image preprocessing (``image_mean``, ``image_std``,
``resample``, ``fit``, ``pad_value``). ``VisionConfig.from_hf(config_json_dict, ...)`` reads
transformers' ``ViTConfig``, ``CLIPVisionConfig`` / ``SiglipVisionConfig`` and the
``vision_config`` of a full ``CLIPConfig`` / ``SiglipConfig`` (missing keys take transformers'
defaults).

The towers (transformers classes they reproduce; ``N = (image_size / patch_size) ** 2``)::

    ViT           ViTModel: conv patches (+bias), CLS, learned positions [N+1], encoder,
                  final LayerNorm on every token; optional pooler dense + tanh on the CLS.
    CLIPVision    CLIPVisionModel: conv patches (no bias), class embedding, positions [N+1],
                  pre_layrnorm, encoder, post_layernorm on the CLS only (pooler_output);
                  optional visual_projection (CLIPModel's image_embeds). quick_gelu.
    SiglipVision  SiglipVisionModel: conv patches (+bias), no CLS, positions [N], encoder,
                  post_layernorm on every token; optional attention-pooling head ("head":
                  one learned probe attends to the tokens, + LayerNorm/MLP residual).

Module tree (flax leaf names; the encoder's is in ``models.transformer``)::

    patch_embed.kernel [p, p, C, D] (.bias [D])   cls_token [D] (ViT, CLIP)
    pos_embed [N(+1), D]                           pre_norm (CLIP)   encoder.layers[i]...
    post_norm                                      pooler.kernel [D, P] .bias (ViT, optional)
    projection.kernel [D, P] (CLIP, optional)      head.{probe [D], attention, layernorm, mlp}

``param_map(config)`` lists the HF tensor name of every parameter and how it is converted
(``nn.Linear.weight [out, in]`` is transposed, the patch ``Conv2d.weight [D, C, p, p]``
becomes ``[p, p, C, D]``, ``[1, 1, D]`` tokens are squeezed, SigLIP's ``in_proj_weight`` is
split into q/k/v).

Calling a tower
---------------
``pixels [B, C, S, S] float`` (NCHW, normalised: what ``preprocess`` returns and what
transformers calls ``pixel_values``; S must be ``image_size``):

- ``tower.encode(pixels, *, hidden_states=False) -> VisionOutput(last_hidden_state,
  pooler_output, image_embeds, hidden_states)``, each as transformers defines it
  (``pooler_output`` / ``image_embeds`` are None where the transformers model has none;
  ``hidden_states``, when asked, the encoder's input and every block's output, as
  ``output_hidden_states=True``): ``last_hidden_state [B, N(+1), D]``.
- ``tower(pixels)`` -> the features for a projector, by ``config.output``:
  ``"pooled"`` -> ``[B, feature_dim]`` (one ECG token, as in the paper), or ``"tokens"`` ->
  the ``N`` patch tokens ``[B, N, D]`` (ViT: final-normed, CLS dropped; CLIP: the encoder
  output without ``post_layernorm``, CLS dropped, as LLaVA reads CLIP; SigLIP: post-normed).
  ``config.pool`` picks the pooled vector: ``"cls"`` (ViT: the final-normed CLS =
  ``last_hidden_state[:, 0]``; CLIP: ``post_layernorm(CLS)``), ``"pooler"`` (transformers'
  ``pooler_output``: ViT dense + tanh, CLIP ``post_layernorm(CLS)``, SigLIP the attention
  head), ``"embeds"`` (``get_image_features``: CLIP ``visual_projection(pooler_output)``,
  SigLIP the head), ``"mean"`` (mean of the patch tokens) or ``"default"``: ViT ``cls``,
  CLIP ``embeds`` when the checkpoint has ``visual_projection`` else ``pooler``, SigLIP
  ``pooler`` when it has the head else ``mean`` — the reference's vectors (CLIP 512-d
  ``image_embeds`` for clip-vit-base-patch32, SigLIP's head output; for ViT the reference's
  masked-MIM average is a defect not reproduced). ``config.feature_dim`` / ``num_tokens`` give
  the output shape.

Loading
-------
``load_vision(path, *, dtype="float32", param_dtype=None, output="pooled", pool="default",
fit="resize", mesh=None, remat=False, **overrides) -> (tower, VisionConfig)`` reads a local
directory: ``config.json`` (``vit``, ``clip_vision_model``, ``siglip_vision_model``, or a full
``clip`` / ``siglip`` model, whose ``vision_model.*`` tensors are taken and text tensors
ignored), ``model.safetensors`` or a sharded index (``models.hf``'s memory-mapped reader), and
``preprocessor_config.json`` when present (``image_mean``, ``image_std``, ``resample``). Tensor
names are accepted with or without the ``vision_model.`` (CLIP / SigLIP) or ``vit.`` (ViT task
heads) prefix, and ViT's in both the released layout (``encoder.layer.i.attention.attention.
query``) and transformers 5's (``layers.i.attention.q_proj``). Optional parts follow the
checkpoint: a ViT ``pooler.dense``, CLIP's ``visual_projection``, SigLIP's ``head`` (as
``vision_use_head`` says); ``pooler=False`` / ``projection_dim=None`` leave them unloaded.
Errors name the directory or file, the missing / unexpected tensors, and expected vs found
shapes. Parameters are placed on one device, or sharded over ``mesh`` by their logical names
(``elmjax.parallel``).

Preprocessing that keeps the whole printout
-------------------------------------------
``preprocess(images, config) -> [B, C, S, S] float32`` (jit-compatible: ``config`` is static;
run it inside the train step to ship uint8 images to the device). ``images``: uint8
``[B, H, W, 3|4]`` or ``[H, W, 3|4]`` (alpha dropped), or floats in [0, 1]. The whole image is
kept: ``fit="resize"`` stretches it to S x S (what transformers' ViT and SigLIP processors do),
``fit="pad"`` first pads it to a square with ``pad_value`` (255: white paper), centred, so the
aspect ratio survives. **Departure from the reference:** its CLIP processor resizes the short
side to S and centre-crops, which cuts the left and right leads off a wide 2-column printout;
here no tower ever crops. Resizing is ``jax.image.resize`` with antialiasing (``resample``:
"bilinear" or "bicubic" (Keys a = -0.5, as PIL), from the checkpoint's processor config;
close to, not bit-equal with, PIL), clipped to [0, 1] (PIL works in uint8), then normalised
with ``image_mean`` / ``image_std`` (defaults: CLIP ``OPENAI_CLIP_MEAN`` / ``_STD``, bicubic;
SigLIP 0.5 / 0.5, bicubic; ViT 0.5 / 0.5, bilinear). ``rescale`` is always 1/255.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax import parallel
from elmjax.models.hf import SafetensorsFile, open_checkpoint, read_config, some_names
from elmjax.models.transformer import (
    ACTIVATIONS,
    MLP,
    Encoder,
    EncoderConfig,
    LayerNorm,
    MultiHeadAttention,
    activation,
    linear,
    param,
)
from elmjax.parallel import constrain

KINDS: tuple[str, ...] = ("vit", "clip", "siglip")
OUTPUTS: tuple[str, ...] = ("pooled", "tokens")
POOLS: tuple[str, ...] = ("default", "cls", "pooler", "embeds", "mean")
RESAMPLES: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "lanczos3")
FITS: tuple[str, ...] = ("resize", "pad")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

# transformers' config defaults (ViTConfig, CLIPVisionConfig, SiglipVisionConfig).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        image_size=224,
        patch_size=16,
        num_channels=3,
        qkv_bias=True,
        pooler_act="tanh",
    ),
    "clip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        image_size=224,
        patch_size=32,
        num_channels=3,
    ),
    "siglip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        image_size=224,
        patch_size=16,
        num_channels=3,
        vision_use_head=True,
    ),
}
# Preprocessing defaults of transformers' image processors (mean, std, resample).
_PREPROCESS_DEFAULTS: dict[str, tuple[tuple[float, ...], tuple[float, ...], str]] = {
    "vit": (HALF, HALF, "bilinear"),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic"),
    "siglip": (HALF, HALF, "bicubic"),
}
# model_type in config.json -> (kind, whether the vision part sits in "vision_config").
_MODEL_TYPES: dict[str, tuple[str, bool]] = {
    "vit": ("vit", False),
    "clip_vision_model": ("clip", False),
    "clip": ("clip", True),
    "siglip_vision_model": ("siglip", False),
    "siglip": ("siglip", True),
}
# PIL resampling codes (preprocessor_config.json "resample") -> jax.image.resize methods.
_PIL_RESAMPLE: dict[int, str] = {
    0: "nearest",
    1: "lanczos3",
    2: "bilinear",
    3: "bicubic",
    4: "bilinear",
    5: "bilinear",
}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A vision tower and its preprocessing (see the module docstring).

    Attributes:
      kind: "vit" | "clip" | "siglip".
      encoder: the transformer encoder's shapes and numerics (``dtype`` is the tower's).
      image_size: input side S (square); patch_size: p (S % p == 0); num_channels: C.
      pooler: ViT's dense + ``pooler_act`` pooler, or SigLIP's attention-pooling head.
      pooler_size: width of ViT's pooler (None: hidden size).
      pooler_act: activation of ViT's pooler.
      projection_dim: CLIP's ``visual_projection`` width (None: no projection).
      output: "pooled" (one vector) | "tokens" (the N patch tokens).
      pool: which pooled vector: "default" | "cls" | "pooler" | "embeds" | "mean".
      image_mean, image_std: per-channel normalisation of [0, 1] pixels.
      resample: "nearest" | "bilinear" | "bicubic" | "lanczos3" (``jax.image.resize``).
      fit: "resize" (stretch the whole image to S x S) | "pad" (pad to square, then resize).
      pad_value: uint8 grey level of the padding for ``fit="pad"`` (255: white).
    """

    kind: str = "vit"
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    pooler: bool = False
    pooler_size: int | None = None
    pooler_act: str = "tanh"
    projection_dim: int | None = None
    output: str = "pooled"
    pool: str = "default"
    image_mean: tuple[float, ...] = HALF
    image_std: tuple[float, ...] = HALF
    resample: str = "bilinear"
    fit: str = "resize"
    pad_value: int = 255

    def __post_init__(self):
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        if self.kind not in KINDS:
            raise ValueError(f"vision kind {self.kind!r} not supported; supported: {KINDS}")
        if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} must be a positive multiple of "
                f"patch_size={self.patch_size}"
            )
        if self.output not in OUTPUTS:
            raise ValueError(f"output {self.output!r} not in {OUTPUTS}")
        if self.pool not in POOLS:
            raise ValueError(f"pool {self.pool!r} not in {POOLS}")
        if self.resample not in RESAMPLES:
            raise ValueError(f"resample {self.resample!r} not in {RESAMPLES}")
        if self.fit not in FITS:
            raise ValueError(f"fit {self.fit!r} not in {FITS}")
        if not 0 <= self.pad_value <= 255:
            raise ValueError(f"pad_value must be a uint8 level, got {self.pad_value}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.num_channels:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} values for {self.num_channels} channels"
                )
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        if self.pooler_act not in ACTIVATIONS:
            raise ValueError(f"pooler_act {self.pooler_act!r} not in {ACTIVATIONS}")
        if self.projection_dim is not None and self.kind != "clip":
            raise ValueError("projection_dim (visual_projection) exists only for kind='clip'")
        if self.pooler and self.kind == "clip":
            raise ValueError("kind='clip' has no separate pooler (its pooler is post_layernorm)")
        pool = self.resolved_pool
        allowed = {
            "vit": ("cls", "mean") + (("pooler",) if self.pooler else ()),
            "clip": ("cls", "pooler", "mean") + (("embeds",) if self.projection_dim else ()),
            "siglip": ("mean",) + (("pooler", "embeds") if self.pooler else ()),
        }[self.kind]
        if pool not in allowed:
            raise ValueError(
                f"pool={pool!r} is not available for this {self.kind} tower "
                f"(pooler={self.pooler}, projection_dim={self.projection_dim}); "
                f"available: {allowed}"
            )

    # Derived ------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def has_cls(self) -> bool:
        return self.kind != "siglip"

    @property
    def seq_len(self) -> int:
        """Tokens through the encoder: the patches (+ CLS)."""
        return self.num_patches + int(self.has_cls)

    @property
    def resolved_pool(self) -> str:
        if self.pool != "default":
            return self.pool
        if self.kind == "vit":
            return "cls"
        if self.kind == "clip":
            return "embeds" if self.projection_dim else "pooler"
        return "pooler" if self.pooler else "mean"

    @property
    def feature_dim(self) -> int:
        """Width of what ``tower(pixels)`` returns."""
        pool = self.resolved_pool
        if self.output == "pooled" and pool == "pooler" and self.kind == "vit":
            return self.pooler_size or self.hidden_size
        if self.output == "pooled" and pool == "embeds" and self.kind == "clip":
            return self.projection_dim
        return self.hidden_size

    @property
    def num_tokens(self) -> int:
        """Vectors per image that ``tower(pixels)`` returns: 1 or N."""
        return 1 if self.output == "pooled" else self.num_patches

    @classmethod
    def from_hf(
        cls,
        config: Mapping[str, Any],
        *,
        dtype: str = "float32",
        param_dtype: str | None = None,
        remat: bool | str = False,
        **overrides: Any,
    ) -> VisionConfig:
        """Reads a transformers ``config.json`` dict; ``overrides`` replace VisionConfig fields.

        Whether a ViT has its pooler and a CLIP its ``visual_projection`` is not in
        ``config.json`` (``load_vision`` reads it from the tensors): pass ``pooler`` /
        ``projection_dim`` here. SigLIP's head follows ``vision_use_head``.
        """
        model_type = config.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not a supported vision tower; supported: "
                f"{', '.join(_MODEL_TYPES)}"
            )
        kind, nested = _MODEL_TYPES[model_type]
        vision = (config.get("vision_config") or {}) if nested else config
        c = {**_HF_DEFAULTS[kind], **{k: v for k, v in vision.items() if v is not None}}
        encoder = EncoderConfig(
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            head_dim=c.get("head_dim") if kind == "vit" else None,
            intermediate_size=c["intermediate_size"],
            activation=c["hidden_act"],
            layer_norm_eps=float(c["layer_norm_eps"]),
            qkv_bias=bool(c.get("qkv_bias", True)) if kind == "vit" else True,
            dtype=dtype,
            param_dtype=param_dtype or dtype,
            remat=remat,
            initializer_range=c.get("initializer_range", 0.02),
        )
        mean, std, resample = _PREPROCESS_DEFAULTS[kind]
        kwargs: dict[str, Any] = dict(
            kind=kind,
            encoder=encoder,
            image_size=_side(c["image_size"], "image_size"),
            patch_size=_side(c["patch_size"], "patch_size"),
            num_channels=c["num_channels"],
            image_mean=mean,
            image_std=std,
            resample=resample,
        )
        if kind == "vit":
            kwargs.update(pooler_size=c.get("pooler_output_size"), pooler_act=c["pooler_act"])
        if kind == "siglip":
            kwargs.update(pooler=bool(c["vision_use_head"]))
        kwargs.update(overrides)
        return cls(**kwargs)


def _side(value: Any, name: str) -> int:
    """An int, or a square ``[h, w]`` pair, as an int."""
    if isinstance(value, Iterable):
        values = list(value)
        if len(set(values)) != 1:
            raise ValueError(f"{name}={values}: only square images / patches are supported")
        return int(values[0])
    return int(value)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def preprocess(images: Any, config: VisionConfig) -> jax.Array:
    """uint8 ``[B, H, W, C|4]`` (or ``[H, W, ...]``, or floats in [0, 1]) -> ``[B, C, S, S]``.

    The whole image is kept (resized, or padded to a square and resized; never cropped), then
    normalised with the config's mean / std. See the module docstring.
    """
    c, s = config.num_channels, config.image_size
    x = jnp.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (c, c + 1):
        raise ValueError(
            f"images must be [B, H, W, {c}] (or with an alpha channel), got shape {x.shape}"
        )
    x = x[..., :c]
    if jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(jnp.float32) / 255.0
    else:
        x = x.astype(jnp.float32)
    b, h, w, _ = x.shape
    if config.fit == "pad" and h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        pad = ((0, 0), (top, side - h - top), (left, side - w - left), (0, 0))
        x = jnp.pad(x, pad, constant_values=config.pad_value / 255.0)
    x = jax.image.resize(x, (b, s, s, c), method=config.resample, antialias=True)
    x = jnp.clip(x, 0.0, 1.0)
    mean = jnp.asarray(config.image_mean, jnp.float32)
    std = jnp.asarray(config.image_std, jnp.float32)
    return ((x - mean) / std).transpose(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
    """Non-overlapping ``p x p`` patches of ``[B, C, S, S]`` -> ``[B, N, D]`` (a strided conv)."""

    def __init__(self, config: VisionConfig, *, use_bias: bool, rngs: nnx.Rngs):
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        pdt = jnp.dtype(config.encoder.param_dtype)
        init = jax.nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = param(init(rngs.params(), (p, p, c, d), pdt), (None, None, None, "embed"))
        self.bias = param(jnp.zeros((d,), pdt), ("embed",)) if use_bias else nnx.data(None)
        self.patch_size = p
        self.dtype = jnp.dtype(config.encoder.dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        b, c, h, w = pixels.shape
        p = self.patch_size
        x = pixels.astype(self.dtype).reshape(b, c, h // p, p, w // p, p)
        y = jnp.einsum("bcipjq,pqcd->bijd", x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, (h // p) * (w // p), -1)  # row-major over the patch grid


class AttentionPoolingHead(nnx.Module):
    """SigLIP's head: a learned probe attends to the tokens, then ``h + mlp(layernorm(h))``."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(config.param_dtype)
        d = config.hidden_size
        self.probe = param(
            config.initializer_range * jax.random.normal(rngs.params(), (d,), pdt), ("embed",)
        )
        self.attention = MultiHeadAttention(dataclasses.replace(config, qkv_bias=True), rngs=rngs)
        self.layernorm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=pdt)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, N, D]`` -> ``[B, D]``."""
        b, _, d = x.shape
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (b, 1, d))
        h = self.attention(probe, kv=x)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


@flax.struct.dataclass
class VisionOutput:
    """transformers' outputs of the tower (None where the transformers model has none)."""

    last_hidden_state: jax.Array  # [B, N(+1), D]
    pooler_output: jax.Array | None = None  # [B, D | P]
    image_embeds: jax.Array | None = None  # [B, P] (CLIP projection / SigLIP head)
    hidden_states: tuple[jax.Array, ...] | None = None  # L + 1 x [B, N(+1), D], if asked


class VisionTower(nnx.Module):
    """Shared parts of the towers: patches, positions, encoder, output selection."""

    kind: ClassVar[str] = ""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        if config.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs kind={self.kind!r}, got {config.kind!r}")
        self.config = config
        enc = config.encoder
        pdt = jnp.dtype(enc.param_dtype)
        d, std = enc.hidden_size, enc.initializer_range
        self.patch_embed = PatchEmbed(config, use_bias=self.kind != "clip", rngs=rngs)
        if config.has_cls:
            self.cls_token = param(std * jax.random.normal(rngs.params(), (d,), pdt), ("embed",))
        pos = std * jax.random.normal(rngs.params(), (config.seq_len, d), pdt)
        self.pos_embed = param(pos, (None, "embed"))
        self.encoder = Encoder(enc, rngs=rngs)
        self.post_norm = LayerNorm(d, eps=enc.layer_norm_eps, param_dtype=pdt)

    def _embed(self, pixels: jax.Array) -> jax.Array:
        """``pixels [B, C, S, S]`` -> patch (+ CLS) embeddings with positions ``[B, T, D]``."""
        c = self.config
        want = (c.num_channels, c.image_size, c.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise ValueError(
                f"pixels must be [B, {want[0]}, {want[1]}, {want[2]}] (NCHW; see "
                f"vision.preprocess), got shape {tuple(pixels.shape)}"
            )
        x = self.patch_embed(pixels)
        if c.has_cls:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos_embed[...].astype(x.dtype)
        return constrain(x, ("batch", "seq", "embed"))

    def encode(self, pixels: jax.Array, *, hidden_states: bool = False) -> VisionOutput:
        """transformers' outputs; ``hidden_states``: also the encoder's input and every
        block's output (transformers' ``output_hidden_states``, no final norm)."""
        raise NotImplementedError

    def _encoder(self, x: jax.Array, hidden_states: bool):
        if hidden_states:
            return self.encoder(x, return_hidden_states=True)
        return self.encoder(x), None

    def tokens(self, out: VisionOutput) -> jax.Array:
        """The N patch tokens ``[B, N, D]`` of ``encode``'s output (CLS dropped)."""
        h = out.last_hidden_state
        return h[:, 1:] if self.config.has_cls else h

    def pooled(self, out: VisionOutput) -> jax.Array:
        """The pooled vector ``[B, feature_dim]`` chosen by ``config.pool``."""
        pool = self.config.resolved_pool
        if pool == "mean":
            return jnp.mean(self.tokens(out).astype(jnp.float32), axis=1).astype(
                out.last_hidden_state.dtype
            )
        if pool == "cls":
            return self._cls(out)
        if pool == "pooler":
            return out.pooler_output
        return out.image_embeds  # "embeds"

    def _cls(self, out: VisionOutput) -> jax.Array:
        return out.last_hidden_state[:, 0]

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """``[B, C, S, S]`` -> ``[B, feature_dim]`` (output "pooled") or ``[B, N, D]``."""
        out = self.encode(pixels)
        return self.tokens(out) if self.config.output == "tokens" else self.pooled(out)


class ViT(VisionTower):
    """transformers' ``ViTModel`` (optionally with its dense + tanh pooler)."""

    kind = "vit"

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        enc = config.encoder
        if config.pooler:
            self.pooler = linear(
                enc.hidden_size,
                config.pooler_size or enc.hidden_size,
                ("embed", None),
                use_bias=True,
                config=enc,
                rngs=rngs,
            )
        else:
            self.pooler = nnx.data(None)

    def encode(self, pixels: jax.Array, *, hidden_states: bool = False) -> VisionOutput:
        h, hs = self._encoder(self._embed(pixels), hidden_states)
        h = self.post_norm(h)
        pooled = None
        if self.pooler is not None:
            pooled = activation(self.config.pooler_act)(self.pooler(h[:, 0]))
        return VisionOutput(last_hidden_state=h, pooler_output=pooled, hidden_states=hs)


class CLIPVision(VisionTower):
    """transformers' ``CLIPVisionModel`` (+ ``visual_projection`` of ``CLIPModel``)."""

    kind = "clip"

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        enc = config.encoder
        self.pre_norm = LayerNorm(
            enc.hidden_size, eps=enc.layer_norm_eps, param_dtype=enc.param_dtype
        )
        if config.projection_dim:
            self.projection = linear(
                enc.hidden_size,
                config.projection_dim,
                ("embed", None),
                use_bias=False,
                config=enc,
                rngs=rngs,
            )
        else:
            self.projection = nnx.data(None)

    def encode(self, pixels: jax.Array, *, hidden_states: bool = False) -> VisionOutput:
        h, hs = self._encoder(self.pre_norm(self._embed(pixels)), hidden_states)
        pooled = self.post_norm(h[:, 0])
        embeds = self.projection(pooled) if self.projection is not None else None
        return VisionOutput(
            last_hidden_state=h, pooler_output=pooled, image_embeds=embeds, hidden_states=hs
        )

    def _cls(self, out: VisionOutput) -> jax.Array:
        return out.pooler_output  # post_layernorm(CLS)


class SiglipVision(VisionTower):
    """transformers' ``SiglipVisionModel`` (with its attention-pooling head if ``pooler``)."""

    kind = "siglip"

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        if config.pooler:
            self.head = AttentionPoolingHead(config.encoder, rngs=rngs)
        else:
            self.head = nnx.data(None)

    def encode(self, pixels: jax.Array, *, hidden_states: bool = False) -> VisionOutput:
        h, hs = self._encoder(self._embed(pixels), hidden_states)
        h = self.post_norm(h)
        pooled = self.head(h) if self.head is not None else None
        return VisionOutput(
            last_hidden_state=h, pooler_output=pooled, image_embeds=pooled, hidden_states=hs
        )


TOWERS: dict[str, type[VisionTower]] = {"vit": ViT, "clip": CLIPVision, "siglip": SiglipVision}


def make_tower(config: VisionConfig, *, rngs: nnx.Rngs) -> VisionTower:
    """A fresh (randomly initialised) tower of ``config.kind``."""
    return TOWERS[config.kind](config, rngs=rngs)


# --------------------------------------------------------------------------------------------
# HF names
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamMap:
    """One HF tensor (or a third of one) <-> one NNX state path.

    ``hf_name`` is relative to the tower's prefix (``vision_model.`` / ``vit.`` / none), except
    ``top_level`` names (CLIP's ``visual_projection.weight``). ``convert``: "copy"; "linear"
    (transpose); "conv" (``[D, C, p, p]`` -> ``[p, p, C, D]``); "squeeze" (``[1, (1,) ...]``
    leading ones dropped); "chunk" (third ``chunk`` of a packed q/k/v ``in_proj``, transposed
    when 2-D).
    """

    hf_name: str
    path: tuple[str | int, ...]
    convert: str = "copy"
    chunk: int | None = None
    top_level: bool = False


# Encoder block leaves -> HF names per layout ("clip" is also SigLIP's).
_BLOCK_HF: dict[str, dict[str, str]] = {
    "clip": {
        "layer_norm1": "layer_norm1",
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.out_proj",
        "layer_norm2": "layer_norm2",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    },
    "vit": {
        "layer_norm1": "layernorm_before",
        "q_proj": "attention.attention.query",
        "k_proj": "attention.attention.key",
        "v_proj": "attention.attention.value",
        "o_proj": "attention.output.dense",
        "layer_norm2": "layernorm_after",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
    },
}
_BLOCK_NNX: dict[str, tuple[str, ...]] = {
    "layer_norm1": ("layer_norm1",),
    "q_proj": ("self_attn", "q_proj"),
    "k_proj": ("self_attn", "k_proj"),
    "v_proj": ("self_attn", "v_proj"),
    "o_proj": ("self_attn", "o_proj"),
    "layer_norm2": ("layer_norm2",),
    "fc1": ("mlp", "fc1"),
    "fc2": ("mlp", "fc2"),
}


def _norm(hf: str, path: tuple[str | int, ...]) -> list[ParamMap]:
    return [ParamMap(f"{hf}.weight", (*path, "scale")), ParamMap(f"{hf}.bias", (*path, "bias"))]


def _dense(hf: str, path: tuple[str | int, ...], bias: bool = True) -> list[ParamMap]:
    out = [ParamMap(f"{hf}.weight", (*path, "kernel"), "linear")]
    return out + ([ParamMap(f"{hf}.bias", (*path, "bias"))] if bias else [])


def param_map(config: VisionConfig) -> list[ParamMap]:
    """Every HF tensor of a checkpoint with this config, with its NNX path and conversion."""
    c, enc = config, config.encoder
    layout = "vit" if c.kind == "vit" else "clip"
    out: list[ParamMap] = []
    if c.kind == "vit":
        out += [
            ParamMap("embeddings.cls_token", ("cls_token",), "squeeze"),
            ParamMap("embeddings.position_embeddings", ("pos_embed",), "squeeze"),
            ParamMap(
                "embeddings.patch_embeddings.projection.weight", ("patch_embed", "kernel"), "conv"
            ),
            ParamMap("embeddings.patch_embeddings.projection.bias", ("patch_embed", "bias")),
        ]
        block_root = "encoder.layer"
    else:
        out.append(ParamMap("embeddings.patch_embedding.weight", ("patch_embed", "kernel"), "conv"))
        if c.kind == "siglip":
            out.append(ParamMap("embeddings.patch_embedding.bias", ("patch_embed", "bias")))
        else:
            out.append(ParamMap("embeddings.class_embedding", ("cls_token",)))
            out += _norm("pre_layrnorm", ("pre_norm",))
        out.append(ParamMap("embeddings.position_embedding.weight", ("pos_embed",)))
        block_root = "encoder.layers"
    for i in range(enc.num_layers):
        for leaf, hf_leaf in _BLOCK_HF[layout].items():
            hf = f"{block_root}.{i}.{hf_leaf}"
            path = ("encoder", "layers", i, *_BLOCK_NNX[leaf])
            if leaf.startswith("layer_norm"):
                out += _norm(hf, path)
            else:
                out += _dense(
                    hf, path, bias=enc.qkv_bias or leaf not in ("q_proj", "k_proj", "v_proj")
                )
    out += _norm("layernorm" if c.kind == "vit" else "post_layernorm", ("post_norm",))
    if c.kind == "vit" and c.pooler:
        out += _dense("pooler.dense", ("pooler",))
    if c.kind == "clip" and c.projection_dim:
        out.append(
            ParamMap("visual_projection.weight", ("projection", "kernel"), "linear", top_level=True)
        )
    if c.kind == "siglip" and c.pooler:
        out.append(ParamMap("head.probe", ("head", "probe"), "squeeze"))
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            path = ("head", "attention", proj)
            out.append(ParamMap("head.attention.in_proj_weight", (*path, "kernel"), "chunk", j))
            out.append(ParamMap("head.attention.in_proj_bias", (*path, "bias"), "chunk", j))
        out += _dense("head.attention.out_proj", ("head", "attention", "o_proj"))
        out += _norm("head.layernorm", ("head", "layernorm"))
        out += _dense("head.mlp.fc1", ("head", "mlp", "fc1"))
        out += _dense("head.mlp.fc2", ("head", "mlp", "fc2"))
    return out


def _vit_modular_name(name: str) -> str:
    """ViT's released tensor name -> transformers 5's in-memory name (also accepted)."""
    for old, new in (
        ("encoder.layer.", "layers."),
        ("attention.attention.query", "attention.q_proj"),
        ("attention.attention.key", "attention.k_proj"),
        ("attention.attention.value", "attention.v_proj"),
        ("attention.output.dense", "attention.o_proj"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
    ):
        name = name.replace(old, new)
    return name


def _hf_shape(m: ParamMap, var_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the HF tensor of ``m`` must have for a parameter of ``var_shape``."""
    if m.convert == "linear":
        return tuple(reversed(var_shape))
    if m.convert == "conv":
        p, q, c, d = var_shape
        return (d, c, p, q)
    if m.convert == "squeeze":
        return (1,) * (3 - len(var_shape)) + tuple(var_shape)
    if m.convert == "chunk":
        if len(var_shape) == 2:
            d_in, d_out = var_shape
            return (3 * d_out, d_in)
        return (3 * var_shape[0],)
    return tuple(var_shape)


def _convert(m: ParamMap, src: np.ndarray, var_shape: tuple[int, ...]) -> np.ndarray:
    if m.convert == "linear":
        return src.T
    if m.convert == "conv":
        return src.transpose(2, 3, 1, 0)
    if m.convert == "squeeze":
        return src.reshape(var_shape)
    if m.convert == "chunk":
        n = src.shape[0] // 3
        part = src[m.chunk * n : (m.chunk + 1) * n]
        return part.T if part.ndim == 2 else part
    return src


# --------------------------------------------------------------------------------------------
# load_vision
# --------------------------------------------------------------------------------------------

# Tensors that belong to other parts of a full or task checkpoint (never loaded, never errors).
_FOREIGN_ROOTS = (
    "text_model.",
    "text_projection.",
    "logit_scale",
    "logit_bias",
    "visual_projection.",
    "classifier.",
    "decoder.",
)
# Tensors of the tower's namespace that are not parameters here.
_IGNORED = ("position_ids", "embeddings.mask_token")
# Optional parts (ViT's pooler, SigLIP's head) that a config with pooler=False does not load.
_OPTIONAL = {"vit": ("pooler.",), "clip": (), "siglip": ("head.",)}
_PREFIXES = {"vit": ("", "vit."), "clip": ("", "vision_model."), "siglip": ("", "vision_model.")}
_ANCHORS = {
    "vit": "embeddings.patch_embeddings.projection.weight",
    "clip": "embeddings.patch_embedding.weight",
    "siglip": "embeddings.patch_embedding.weight",
}


class _Names:
    """Resolves a ``param_map`` name to the checkpoint's actual tensor name."""

    def __init__(self, kind: str, files: dict[str, SafetensorsFile], path: Path):
        self.kind, self.files = kind, files
        anchor = _ANCHORS[kind]
        for prefix in _PREFIXES[kind]:
            if prefix + anchor in files:
                self.prefix = prefix
                break
        else:
            tried = " or ".join(repr(p + anchor) for p in _PREFIXES[kind])
            raise KeyError(
                f"{path}: no {kind} vision tower tensors in the checkpoint (looked for {tried}; "
                f"found e.g. {some_names(sorted(files), 5)})"
            )

    def resolve(self, m: ParamMap) -> str | None:
        candidates = [m.hf_name if m.top_level else self.prefix + m.hf_name]
        if self.kind == "vit":
            candidates.append(self.prefix + _vit_modular_name(m.hf_name))
        return next((n for n in candidates if n in self.files), None)

    def has(self, name: str) -> bool:
        m = ParamMap(name, ())
        return self.resolve(m) is not None

    def in_namespace(self, name: str) -> bool:
        if self.prefix:
            return name.startswith(self.prefix)
        return not name.startswith(_FOREIGN_ROOTS) and not any(
            name.startswith(p) for p in _PREFIXES[self.kind] if p
        )


def read_preprocessor_config(path: str | Path) -> dict[str, Any]:
    """``VisionConfig`` overrides (``image_mean``, ``image_std``, ``resample``) from a
    directory's ``preprocessor_config.json``; empty when the file is absent.

    Its resize / crop sizes are ignored on purpose: the tower's ``image_size`` decides the
    size and nothing is cropped (see the module docstring).
    """
    file = Path(path) / "preprocessor_config.json"
    if not file.exists():
        return {}
    cfg = json.loads(file.read_text())
    out: dict[str, Any] = {}
    if cfg.get("do_normalize", True) is False:
        out.update(image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    else:
        for key in ("image_mean", "image_std"):
            if cfg.get(key) is not None:
                value = cfg[key]
                out[key] = tuple(value) if isinstance(value, list | tuple) else (value,) * 3
    resample = cfg.get("resample")
    if isinstance(resample, int) and resample in _PIL_RESAMPLE:
        out["resample"] = _PIL_RESAMPLE[resample]
    return out


def load_vision(
    path: str | Path,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    output: str = "pooled",
    pool: str = "default",
    fit: str = "resize",
    mesh: jax.sharding.Mesh | None = None,
    remat: bool | str = False,
    **overrides: Any,
) -> tuple[VisionTower, VisionConfig]:
    """Loads a local HF vision checkpoint directory into a tower (see the module docstring).

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded index), and
        optionally ``preprocessor_config.json``.
      dtype: compute dtype; param_dtype: storage dtype (default: ``dtype``).
      output, pool, fit: ``VisionConfig`` fields (what the tower returns; how images fit).
      mesh: a ``parallel.make_mesh`` mesh to shard the parameters over (default: one device).
      remat: rematerialise each encoder block (False, True or a policy name).
      **overrides: further ``VisionConfig`` fields (e.g. ``image_mean``, ``resample``).

    Returns:
      ``(tower, config)``.
    """
    path = Path(path)
    hf_config = read_config(path)
    model_type = hf_config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"{path / 'config.json'}: model_type {model_type!r} is not a supported vision "
            f"tower; supported: {', '.join(_MODEL_TYPES)}"
        )
    kind = _MODEL_TYPES[model_type][0]
    files = open_checkpoint(path)
    names = _Names(kind, files, path)

    detected: dict[str, Any] = {}
    if kind == "vit":
        detected["pooler"] = names.has("pooler.dense.weight")
    if kind == "clip" and "visual_projection.weight" in files:
        detected["projection_dim"] = files["visual_projection.weight"].shape(
            "visual_projection.weight"
        )[0]
    try:
        config = VisionConfig.from_hf(
            hf_config,
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            **{
                **detected,
                **read_preprocessor_config(path),
                "output": output,
                "pool": pool,
                "fit": fit,
                **overrides,
            },
        )
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from e

    maps = param_map(config)
    found = {id(m): names.resolve(m) for m in maps}
    if missing := [
        (m.hf_name if m.top_level else names.prefix + m.hf_name)
        for m in maps
        if found[id(m)] is None
    ]:
        missing = list(dict.fromkeys(missing))
        raise KeyError(
            f"{path}: {len(missing)} tensor(s) missing from the checkpoint for a {kind} vision "
            f"tower with {config.encoder.num_layers} layers: {some_names(missing)}"
        )
    used = set(found.values())
    # Optional parts the config leaves out on purpose (pooler=False) are skipped, not errors.
    skipped = () if config.pooler else tuple(names.prefix + r for r in _OPTIONAL[kind])
    if unexpected := sorted(
        n
        for n in files
        if n not in used
        and names.in_namespace(n)
        and not n.endswith(_IGNORED)
        and not (skipped and n.startswith(skipped))
    ):
        raise KeyError(
            f"{path}: {len(unexpected)} unexpected tensor(s) for a {kind} vision tower with "
            f"{config.encoder.num_layers} layers: {some_names(unexpected)}"
        )

    abstract = nnx.eval_shape(lambda: make_tower(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = parallel.placement(state, mesh)
    by_path = {m.path: m for m in maps}
    flat_state = dict(nnx.to_flat_state(state))
    flat_shardings = dict(nnx.to_flat_state(shardings))
    if unmapped := [p for p in flat_state if tuple(p) not in by_path]:
        raise KeyError(f"no checkpoint tensor maps to vision parameter(s) {unmapped}")
    for m in maps:  # every shape first, in checkpoint order, before anything is loaded
        name, file = found[id(m)], files[found[id(m)]]
        expected = _hf_shape(m, tuple(flat_state[m.path].shape))
        if file.shape(name) != expected:
            raise ValueError(
                f"{file.path}: tensor {name} has shape {list(file.shape(name))}, expected "
                f"{list(expected)} from config.json"
            )
    for var_path, var in flat_state.items():
        m = by_path[tuple(var_path)]
        name = found[id(m)]
        file = files[name]
        value = np.ascontiguousarray(
            _convert(m, file.array(name), tuple(var.shape)).astype(var.dtype)
        )
        var.set_value(jax.device_put(value, flat_shardings[var_path].get_value()))
    return nnx.merge(graphdef, nnx.from_flat_state(flat_state)), config
