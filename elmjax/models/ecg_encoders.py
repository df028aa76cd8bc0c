"""ECG signal encoders in Flax NNX: MERL's 1-D ResNet, ViT-1D, ST-MEM, MTAE and MLAE.

The signal representation turns a 12-lead ECG ``[B, C, L]`` (float32, mV; the framework's
segments are 250 Hz, L = 2500 for 10 s) into one pooled vector (the paper) or a sequence of
tokens, which a projector maps into the LLM. The transformer encoders reuse
``models.transformer.Encoder``; they differ only in how the signal becomes tokens.

Config
------
One frozen, hashable dataclass per encoder; every shape comes from it (``num_leads``,
``seq_len``, patch sizes) and is validated when it is built (a ``seq_len`` that is not a
multiple of ``patch_size`` is a ``ValueError`` there; a signal of another shape is a
``ValueError`` at call time). Fields common to all: ``input_norm`` (``"minmax"``: the
reference's instance normalisation ``(x - min) / (max - min + 1e-6)`` over the whole
``[C, L]`` array, clipped to [0, 1], done inside the encoder so callers pass mV; ``"zscore"``:
per lead; ``"none"``), ``output`` (``"pooled"`` -> ``[B, feature_dim]``, ``"tokens"`` ->
``[B, num_tokens, feature_dim]``) and, on the config and the model, ``feature_dim`` /
``num_tokens`` (1 when pooled) to size a projector.

=============  ==============  ==================================================================
name           config          model
=============  ==============  ==================================================================
merl_resnet    ResNetConfig    MERL's 1-D ResNet (``resnet_config(depth)``: 18/34 basic blocks,
                               50/101/152 bottlenecks; default 101 = [3, 4, 23, 3]). Stem conv
                               C->64 k7 s2 p3 + BatchNorm + ReLU + maxpool k3 s2 p1; stages of
                               widths 64/128/256/512 (expansion 4 for bottlenecks; stride on the
                               3-tap conv, torchvision v1.5); pooled: global average of the
                               2048-channel map; tokens: the map ``[B, ceil(L / 32), 2048]``.
vit1d          ViT1DConfig     MERL's ViT alternative: a strided conv over all leads makes
                               ``L / P`` time patches, CLS token, learned positions, encoder,
                               final LayerNorm; pooled: ``norm(CLS)`` or ``norm(mean(patches))``.
stmem          STMEMConfig     ST-MEM: each lead cut into ``L / P`` patches, one shared
                               ``LN -> Linear -> LN`` patch embedding, time positions, a SEP token
                               at both ends of every lead, per-lead embeddings; one encoder over
                               all ``C * (L / P + 2)`` tokens; pooled: ``norm(mean(patches))``.
mtae           MTAEConfig      Masked time autoencoder: a token is one time patch of all leads
                               (``P * C`` values), CLS, positions; pooled ``norm(CLS)``.
mlae           MLAEConfig      Masked lead autoencoder: a token is ``leads_per_patch`` whole
                               leads (``q * L`` values), CLS, positions; pooled ``norm(CLS)``.
=============  ==============  ==================================================================

``ENCODERS`` maps each name to its model class (``cls.config_class`` is its config;
``MAE_ENCODERS`` names the masked autoencoders); ``make_encoder(name, config=None, *,
rngs=None)`` builds one, ``default_config(name, seq_len=2500, num_leads=12, **overrides)``
gives the paper's sizes (ResNet-101, 28 M parameters; ViT-B 768 x 12 with a 256-d, 4-block
decoder, patch size ``default_patch_size(seq_len)``: 100 for L = 2500, 50 for 1250, 20 for 500,
as the reference's ``calculate_patch_size``) and ``tiny_config(name, seq_len=256,
num_leads=12, *, patch_size=None, width=32, depth=None, **overrides)`` a few-thousand-parameter
one for tests and CPU demos; ``resnet_config(depth, **overrides)`` the standard ResNet depths.
``replace_config(encoder, **changes)`` returns the same parameters under a config change that
keeps their shapes (e.g. ``output="tokens"`` for a pretrained encoder).
``normalize_signals(signals, mode)`` is the input normalisation every encoder applies first.

Masked autoencoders (stmem, mtae, mlae)
---------------------------------------
One class, ``MaskedAutoencoder``, with three tokenisations. Patches are ``[B, G, n, P']``:
ST-MEM ``G = C`` groups (leads) of ``n = L / P`` patches of ``P`` samples; MTAE ``G = 1``,
``n = L / P`` patches of ``P * C`` values; MLAE ``G = 1``, ``n = C / q`` patches of ``q * L``.
Masking keeps ``int(n * (1 - mask_ratio))`` random patches in every group (ST-MEM: per lead,
independently; MTAE: the same time patches in all leads; MLAE: whole leads). The encoder sees
only the kept patches (+ SEP / CLS); a light decoder (``decoder``: an ``EncoderConfig``, 256-d,
4 blocks in the reference) gets the normed latents, puts a learned mask token at every masked
position, adds decoder positions, runs per group (ST-MEM decodes lead by lead, as the
reference) and a linear head predicts the ``P'`` values of every patch.

- ``model.loss(signals, rng, *, mask_ratio=None)`` / ``mae_loss(model, signals, rng,
  mask_ratio=None)``: mean squared error over the MASKED patches only (per patch mean over its
  values, then the mean over masked patches); ``norm_target=True`` normalises each target patch
  by its own mean and (unbiased) std, as MAE's ``norm_pix_loss``.
- ``model.reconstruct(signals, rng, *, mask_ratio=None) -> MAEOutput(pred, target, mask)``:
  ``[B, G, n, P']`` predictions and targets and the ``[B, G, n]`` bool mask (True = masked);
  ``masked_mse(pred, target, mask)`` is the loss; ``model.signal_mask(mask) -> [B, C, L]``
  shows which samples were masked.
- ``model(signals)`` / ``model.embed(signals)``: the features, deterministic, NO masking.
  Tokens are the final-normed patch tokens without SEP / CLS (ST-MEM: lead-major, ``C * n``).
  ``pool``: ``"mean"`` (ST-MEM's default: ``norm(mean of the patch tokens)``), ``"cls"``
  (MTAE / MLAE default), or ``"decoder"``: the mean of the decoder's latents over all tokens
  (the reference's 256-d vector, here without masking).

Calling
-------
``encoder(signals, *, train=False)`` for every encoder; ``train`` only matters for the
ResNet's BatchNorm (True: batch statistics, and the running averages are updated in place, so
a jitted step must carry the ``nnx.BatchStat`` state out; False: running averages, the output
of a sample does not depend on the rest of the batch). ``encoder.embed(signals)`` is
``encoder(signals, train=False)``.

Parameters carry logical axis names from ``parallel.LOGICAL_RULES`` only (``embed`` on model
widths, conv output channels and norm vectors; ``heads`` / ``mlp`` inside the encoder; None
elsewhere) and are created with ``eager_sharding=False``. BatchNorm running statistics are
``nnx.BatchStat`` (replicated), so ``wrt=nnx.Param`` optimisers leave them alone.

Departures from the reference (ECG-Bench) and why
-------------------------------------------------
- **No masking at embedding time.** The reference's ``get_embeddings`` for ST-MEM / MTAE /
  MLAE runs the MAE forward with the default ``mask_ratio=0.75``, so the vector given to the
  LLM comes from a random quarter of the ECG and changes on every call (train and test see
  different random views of the same ECG). Here ``embed`` never masks and is deterministic;
  masking exists only in ``loss`` / ``reconstruct``.
- **Encoder features by default.** The reference feeds the LLM the average of the *decoder*
  latents (256-d). The decoder exists to reconstruct patches; the ST-MEM / MTAE / MLAE
  authors use the encoder (``norm(mean)`` or ``norm(CLS)``, 768-d) downstream, so that is the
  default. ``pool="decoder"`` gives the reference's vector (without its masking).
- **Learned positions.** The reference freezes sin-cos position tables in encoder and decoder
  (SEP / CLS rows zero). Here they are parameters initialised to the same table
  (``pos_embed="learned"``); ``pos_embed="sincos"`` reproduces the frozen tables (computed,
  not stored).
- **Keep count.** ``int(n * (1 - ratio))`` as the reference, but with a 1e-9 guard so that
  e.g. ``n = 10, ratio = 0.9`` keeps 1 patch (float rounding gives 0 in Python); a ratio
  that keeps nothing, or masks nothing in ``loss``, is a ``ValueError``.
- **BatchNorm.** Flax's running variance uses the biased batch variance (torch: unbiased); the
  momentum is given in torch's convention (``bn_momentum=0.1``). Train / eval is an explicit
  argument, not module state.
- **Input normalisation inside the encoder** (``input_norm``), so the data pipeline ships mV
  and the image / symbolic paths are unaffected; the reference normalised in its data loader.
- No dropout / drop-path (the reference's are 0 for these encoders).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax.models.transformer import Encoder, EncoderConfig, LayerNorm, linear, param
from elmjax.parallel import constrain

OUTPUTS: tuple[str, ...] = ("pooled", "tokens")
INPUT_NORMS: tuple[str, ...] = ("minmax", "zscore", "none")
POS_EMBEDS: tuple[str, ...] = ("learned", "sincos")
BLOCKS: tuple[str, ...] = ("basic", "bottleneck")
# depth -> (block, blocks per stage), as torchvision's resnet18 ... resnet152.
RESNET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def vit_base(**overrides: Any) -> EncoderConfig:
    """ViT-B as the ST-MEM / MTAE / MLAE reference builds it: 768 x 12 blocks, 12 heads."""
    kw: dict[str, Any] = dict(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        activation="gelu",
        layer_norm_eps=1e-5,
    )
    return EncoderConfig(**{**kw, **overrides})


def mae_decoder(**overrides: Any) -> EncoderConfig:
    """The reference's light MAE decoder ("dec256d4b"): 256-d, 4 blocks, 4 heads of 64."""
    kw: dict[str, Any] = dict(
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        head_dim=64,
        intermediate_size=1024,
        activation="gelu",
        layer_norm_eps=1e-5,
    )
    return EncoderConfig(**{**kw, **overrides})


def default_patch_size(seq_len: int, target: int = 32, lo: int = 16, hi: int = 64) -> int:
    """The divisor P of ``seq_len`` whose patch count ``seq_len / P`` lies in ``[lo, hi]``
    closest to ``target`` (ties: the larger P), as the reference's ``calculate_patch_size``:
    2500 -> 100, 1250 -> 50, 500 -> 20."""
    best = None
    for p in range(1, seq_len + 1):
        if seq_len % p or not lo <= seq_len // p <= hi:
            continue
        key = (abs(seq_len // p - target), -p)
        if best is None or key < best[0]:
            best = (key, p)
    if best is None:
        raise ValueError(
            f"seq_len={seq_len} has no divisor giving {lo}..{hi} patches; set patch_size"
        )
    return best[1]


def _check_common(c: Any) -> None:
    if c.num_leads <= 0 or c.seq_len <= 0:
        raise ValueError(
            f"num_leads and seq_len must be positive, got {c.num_leads} and {c.seq_len}"
        )
    if c.output not in OUTPUTS:
        raise ValueError(f"output {c.output!r} not in {OUTPUTS}")
    if c.input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm {c.input_norm!r} not in {INPUT_NORMS}")


def _check_patch(seq_len: int, patch_size: int) -> None:
    if patch_size <= 0 or seq_len % patch_size:
        raise ValueError(
            f"seq_len={seq_len} is not divisible by patch_size={patch_size}; choose a patch "
            f"size that divides the segment length (default_patch_size({seq_len}) picks one)"
        )


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """MERL's 1-D ResNet (see the module docstring); default: ResNet-101.

    Attributes:
      num_leads: input channels C; seq_len: samples per lead L.
      block: "bottleneck" (expansion 4) | "basic" (expansion 1).
      layers: blocks per stage; widths: the stages' base widths (output ``width * expansion``).
      stem_width: channels of the stem conv (kernel ``stem_kernel``, stride 2, then a max pool).
      output: "pooled" (global average pool) | "tokens" (the final feature map).
      input_norm: "minmax" | "zscore" | "none".
      bn_momentum: torch convention (new = (1 - m) * old + m * batch); bn_eps: epsilon.
      dtype: compute dtype; param_dtype: storage dtype.
    """

    name: ClassVar[str] = "merl_resnet"
    num_leads: int = 12
    seq_len: int = 2500
    block: str = "bottleneck"
    layers: tuple[int, ...] = (3, 4, 23, 3)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    stem_kernel: int = 7
    output: str = "pooled"
    input_norm: str = "minmax"
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        _check_common(self)
        if self.block not in BLOCKS:
            raise ValueError(f"block {self.block!r} not in {BLOCKS}")
        if not self.layers or len(self.layers) != len(self.widths):
            raise ValueError(
                f"layers {self.layers} and widths {self.widths} need one entry per stage"
            )
        if min(self.layers) < 1 or min(self.widths) < 1 or self.stem_width < 1:
            raise ValueError("every stage needs >= 1 block and positive widths")
        if self.stem_kernel < 1 or self.stem_kernel % 2 == 0:
            raise ValueError(f"stem_kernel must be odd, got {self.stem_kernel}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def feature_dim(self) -> int:
        return self.widths[-1] * self.expansion

    @property
    def out_len(self) -> int:
        """Length of the final feature map: L halved (rounding up) by the stem conv, the max
        pool and every stage after the first."""
        n = self.seq_len
        for _ in range(2 + len(self.widths) - 1):
            n = (n + 1) // 2
        return n

    @property
    def num_tokens(self) -> int:
        return 1 if self.output == "pooled" else self.out_len


def resnet_config(depth: int = 101, **overrides: Any) -> ResNetConfig:
    """``ResNetConfig`` of a standard depth (18, 34, 50, 101, 152); ``overrides`` win."""
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"ResNet depth {depth} not in {sorted(RESNET_DEPTHS)}")
    block, layers = RESNET_DEPTHS[depth]
    return ResNetConfig(**{"block": block, "layers": layers, **overrides})


@dataclasses.dataclass(frozen=True)
class ViT1DConfig:
    """ViT over time patches of all leads (MERL's ViT alternative).

    Attributes:
      num_leads, seq_len: input shape ``[C, L]``; patch_size: samples per patch (divides L).
      encoder: the transformer's shapes and numerics.
      cls_token: prepend a learned CLS token.
      pool: "cls" | "mean" | "default" (cls when there is a CLS token, else mean).
      patch_bias: bias on the patch convolution.
      output, input_norm: see the module docstring.
    """

    name: ClassVar[str] = "vit1d"
    num_leads: int = 12
    seq_len: int = 2500
    patch_size: int = 100
    encoder: EncoderConfig = dataclasses.field(default_factory=vit_base)
    cls_token: bool = True
    pool: str = "default"
    patch_bias: bool = True
    output: str = "pooled"
    input_norm: str = "minmax"

    def __post_init__(self):
        _check_common(self)
        _check_patch(self.seq_len, self.patch_size)
        if self.resolved_pool not in ("cls", "mean"):
            raise ValueError(f"pool {self.pool!r} not in ('default', 'cls', 'mean')")
        if self.resolved_pool == "cls" and not self.cls_token:
            raise ValueError("pool='cls' needs cls_token=True")

    @property
    def resolved_pool(self) -> str:
        if self.pool == "default":
            return "cls" if self.cls_token else "mean"
        return self.pool

    @property
    def num_patches(self) -> int:
        return self.seq_len // self.patch_size

    @property
    def feature_dim(self) -> int:
        return self.encoder.hidden_size

    @property
    def num_tokens(self) -> int:
        return 1 if self.output == "pooled" else self.num_patches


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    """Fields shared by the masked autoencoders (``STMEMConfig``, ``MTAEConfig``,
    ``MLAEConfig``); see the module docstring.

    Attributes:
      num_leads, seq_len: input shape ``[C, L]``.
      encoder, decoder: ``EncoderConfig`` of the encoder and of the light MAE decoder.
      mask_ratio: default fraction of patches masked (per group) by ``loss``.
      norm_target: normalise each target patch (MAE's ``norm_pix_loss``).
      patch_norm: LayerNorm on the raw patch and on its embedding (the reference's
        ``LN -> Linear -> LN``); False: the Linear alone.
      pos_embed: "learned" (initialised to sin-cos) | "sincos" (fixed, as the reference).
      pool: "default" | "mean" | "cls" (MTAE / MLAE only) | "decoder".
      output, input_norm: see the module docstring.
    """

    name: ClassVar[str] = ""
    num_leads: int = 12
    seq_len: int = 2500
    encoder: EncoderConfig = dataclasses.field(default_factory=vit_base)
    decoder: EncoderConfig = dataclasses.field(default_factory=mae_decoder)
    mask_ratio: float = 0.75
    norm_target: bool = False
    patch_norm: bool = True
    pos_embed: str = "learned"
    pool: str = "default"
    output: str = "pooled"
    input_norm: str = "minmax"

    def __post_init__(self):
        _check_common(self)
        self._check_layout()
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed {self.pos_embed!r} not in {POS_EMBEDS}")
        for part in ("encoder", "decoder"):
            if getattr(self, part).hidden_size % 2:
                raise ValueError(
                    f"{part}.hidden_size must be even (sin-cos positions), got "
                    f"{getattr(self, part).hidden_size}"
                )
        pools = ("mean", "decoder") + (() if self.has_sep else ("cls",))
        if self.resolved_pool not in pools:
            raise ValueError(f"pool {self.pool!r} not available for {self.name}; use {pools}")
        num_keep(self.patches_per_group, self.mask_ratio)  # validates the ratio

    def _check_layout(self) -> None:
        raise NotImplementedError

    # Layout (overridden) --------------------------------------------------------------------
    has_sep: ClassVar[bool] = False  # SEP at both ends of every group (ST-MEM) vs one CLS

    @property
    def groups(self) -> int:
        """G: groups that are masked and decoded independently (ST-MEM: the leads)."""
        return 1

    @property
    def patches_per_group(self) -> int:
        raise NotImplementedError

    @property
    def patch_dim(self) -> int:
        raise NotImplementedError

    # Derived --------------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return self.groups * self.patches_per_group

    @property
    def specials(self) -> int:
        """SEP / CLS tokens per group: 2 (ST-MEM) or 1."""
        return 2 if self.has_sep else 1

    @property
    def resolved_pool(self) -> str:
        if self.pool == "default":
            return "mean" if self.has_sep else "cls"
        return self.pool

    @property
    def feature_dim(self) -> int:
        if self.output == "pooled" and self.resolved_pool == "decoder":
            return self.decoder.hidden_size
        return self.encoder.hidden_size

    @property
    def num_tokens(self) -> int:
        return 1 if self.output == "pooled" else self.num_patches


@dataclasses.dataclass(frozen=True)
class STMEMConfig(MAEConfig):
    """ST-MEM: per-lead time patches of ``patch_size`` samples, SEP and lead embeddings."""

    name: ClassVar[str] = "stmem"
    has_sep: ClassVar[bool] = True
    patch_size: int = 100

    def _check_layout(self) -> None:
        _check_patch(self.seq_len, self.patch_size)

    @property
    def groups(self) -> int:
        return self.num_leads

    @property
    def patches_per_group(self) -> int:
        return self.seq_len // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.patch_size


@dataclasses.dataclass(frozen=True)
class MTAEConfig(MAEConfig):
    """MTAE: a token is one time patch of ``patch_size`` samples across all leads."""

    name: ClassVar[str] = "mtae"
    patch_size: int = 100

    def _check_layout(self) -> None:
        _check_patch(self.seq_len, self.patch_size)

    @property
    def patches_per_group(self) -> int:
        return self.seq_len // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.num_leads


@dataclasses.dataclass(frozen=True)
class MLAEConfig(MAEConfig):
    """MLAE: a token is ``leads_per_patch`` whole leads (the reference's ``patch_size=1``)."""

    name: ClassVar[str] = "mlae"
    leads_per_patch: int = 1

    def _check_layout(self) -> None:
        if self.leads_per_patch <= 0 or self.num_leads % self.leads_per_patch:
            raise ValueError(
                f"num_leads={self.num_leads} is not divisible by "
                f"leads_per_patch={self.leads_per_patch}"
            )

    @property
    def patches_per_group(self) -> int:
        return self.num_leads // self.leads_per_patch

    @property
    def patch_dim(self) -> int:
        return self.leads_per_patch * self.seq_len


def num_keep(n: int, mask_ratio: float) -> int:
    """Patches kept visible out of ``n``: ``int(n * (1 - mask_ratio))`` (>= 1)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(math.floor(n * (1.0 - mask_ratio) + 1e-9))
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {n}")
    return keep


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def normalize_signals(signals: jax.Array, mode: str) -> jax.Array:
    """``[B, C, L]`` -> float32 ``[B, C, L]``: "minmax" over each ``[C, L]`` (clipped to
    [0, 1], the reference's ``instance_normalize``), "zscore" per lead, or "none"."""
    x = signals.astype(jnp.float32)
    if mode == "minmax":
        lo = jnp.min(x, axis=(1, 2), keepdims=True)
        hi = jnp.max(x, axis=(1, 2), keepdims=True)
        return jnp.clip((x - lo) / (hi - lo + 1e-6), 0.0, 1.0)
    if mode == "zscore":
        mean = jnp.mean(x, axis=2, keepdims=True)
        std = jnp.std(x, axis=2, keepdims=True)
        return (x - mean) / (std + 1e-6)
    if mode == "none":
        return x
    raise ValueError(f"input_norm {mode!r} not in {INPUT_NORMS}")


def _check_signals(signals: jax.Array, config: Any) -> None:
    want = (config.num_leads, config.seq_len)
    if signals.ndim != 3 or tuple(signals.shape[1:]) != want:
        hint = ""
        if signals.ndim == 3 and signals.shape[1] != config.num_leads:
            hint = f" (got {signals.shape[1]} leads, the config has {config.num_leads})"
        elif signals.ndim == 3:
            hint = f" (got {signals.shape[2]} samples per lead, the config has {config.seq_len})"
        raise ValueError(
            f"{config.name} encoder expects signals [B, {want[0]}, {want[1]}] (leads, "
            f"samples){hint}, got shape {tuple(signals.shape)}"
        )


def sincos_table(dim: int, n: int, temperature: float = 10000.0) -> np.ndarray:
    """``[n, dim]`` 1-D sin-cos positions (MAE / ST-MEM): ``[sin(p w), cos(p w)]``."""
    omega = 1.0 / temperature ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    grid = np.arange(n, dtype=np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(grid), np.cos(grid)], axis=1).astype(np.float32)


def _positions(dim: int, n: int, sep: bool) -> np.ndarray:
    """Position table ``[n + specials, dim]``: a zero row for the CLS / left SEP, the patches'
    sin-cos rows, and a zero row for the right SEP (ST-MEM)."""
    rows = [np.zeros((1, dim), np.float32), sincos_table(dim, n)]
    if sep:
        rows.append(np.zeros((1, dim), np.float32))
    return np.concatenate(rows, axis=0)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.dtype(dtype))


def _mean_tokens(x: jax.Array) -> jax.Array:
    """Mean over axis 1 in float32, returned in ``x``'s dtype."""
    return jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)


class ECGEncoder(nnx.Module):
    """Common interface: ``config``, ``feature_dim``, ``num_tokens``, ``embed``."""

    config_class: ClassVar[type] = object

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def embed(self, signals: jax.Array) -> jax.Array:
        """Deterministic features (eval mode, no masking): ``[B, D]`` or ``[B, N, D]``."""
        return self(signals, train=False)


# --------------------------------------------------------------------------------------------
# MERL 1-D ResNet
# --------------------------------------------------------------------------------------------


class Conv1d(nnx.Module):
    """``torch.nn.Conv1d`` (no bias) on channels-last ``[B, T, C_in] -> [B, T', C_out]``;
    kernel ``[k, C_in, C_out]`` (torch ``weight [C_out, C_in, k]`` transposed), initialised
    as torchvision's ResNets (``kaiming_normal_``, fan-out, ReLU gain)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        *,
        stride: int = 1,
        padding: int = 0,
        config: ResNetConfig,
        rngs: nnx.Rngs,
    ):
        pdt = jnp.dtype(config.param_dtype)
        init = jax.nn.initializers.variance_scaling(
            2.0, "fan_out", "normal", in_axis=(0, 1), out_axis=2
        )
        self.kernel = param(init(rngs.params(), (kernel, c_in, c_out), pdt), (None, None, "embed"))
        self.stride, self.padding = stride, padding
        self.dtype = jnp.dtype(config.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride,),
            padding=[(self.padding, self.padding)],
            dimension_numbers=("NWC", "WIO", "NWC"),
        )


def _batch_norm(channels: int, config: ResNetConfig, rngs: nnx.Rngs) -> nnx.BatchNorm:
    meta = dict(out_sharding=("embed",), eager_sharding=False)
    return nnx.BatchNorm(
        channels,
        use_running_average=None,  # always passed explicitly
        momentum=1.0 - config.bn_momentum,
        epsilon=config.bn_eps,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        scale_metadata=meta,
        bias_metadata=meta,
        rngs=rngs,
    )


class ConvBN(nnx.Module):
    """Conv1d + BatchNorm (+ ReLU if ``relu``)."""

    def __init__(self, c_in, c_out, kernel, *, stride=1, padding=0, config, rngs):
        self.conv = Conv1d(
            c_in, c_out, kernel, stride=stride, padding=padding, config=config, rngs=rngs
        )
        self.bn = _batch_norm(c_out, config, rngs)

    def __call__(self, x: jax.Array, *, train: bool, relu: bool) -> jax.Array:
        y = self.bn(self.conv(x), use_running_average=not train)
        return jax.nn.relu(y) if relu else y


class ResidualBlock(nnx.Module):
    """Bottleneck (1x1 -> 3-tap stride s -> 1x1, x4) or basic (3-tap stride s -> 3-tap) block,
    with a 1x1 stride-s conv + BN shortcut when the shape changes."""

    def __init__(self, c_in: int, width: int, stride: int, *, config: ResNetConfig, rngs: nnx.Rngs):
        c_out = width * config.expansion
        kw = dict(config=config, rngs=rngs)
        if config.block == "bottleneck":
            self.convs = nnx.List(
                [
                    ConvBN(c_in, width, 1, **kw),
                    ConvBN(width, width, 3, stride=stride, padding=1, **kw),
                    ConvBN(width, c_out, 1, **kw),
                ]
            )
        else:
            self.convs = nnx.List(
                [
                    ConvBN(c_in, width, 3, stride=stride, padding=1, **kw),
                    ConvBN(width, c_out, 3, padding=1, **kw),
                ]
            )
        if stride != 1 or c_in != c_out:
            self.shortcut = ConvBN(c_in, c_out, 1, stride=stride, **kw)
        else:
            self.shortcut = nnx.data(None)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = x
        for i, conv in enumerate(self.convs):
            y = conv(y, train=train, relu=i < len(self.convs) - 1)
        skip = x if self.shortcut is None else self.shortcut(x, train=train, relu=False)
        return jax.nn.relu(y + skip)


class ResNet1D(ECGEncoder):
    """MERL's 1-D ResNet (see the module docstring). ``signals [B, C, L]`` ->
    ``[B, feature_dim]`` (pooled) or ``[B, out_len, feature_dim]`` (tokens)."""

    config_class: ClassVar[type] = ResNetConfig

    def __init__(self, config: ResNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        k = c.stem_kernel
        self.stem = ConvBN(
            c.num_leads, c.stem_width, k, stride=2, padding=k // 2, config=c, rngs=rngs
        )
        c_in = c.stem_width
        stages = []
        for i, (n, width) in enumerate(zip(c.layers, c.widths, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(ResidualBlock(c_in, width, stride, config=c, rngs=rngs))
                c_in = width * c.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)

    def features(self, signals: jax.Array, *, train: bool = False) -> jax.Array:
        """The final feature map ``[B, out_len, feature_dim]`` (channels last)."""
        c = self.config
        _check_signals(signals, c)
        x = normalize_signals(signals, c.input_norm).transpose(0, 2, 1)  # [B, L, C]
        x = self.stem(x, train=train, relu=True)
        x = jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, (1, 3, 1), (1, 2, 1), [(0, 0), (1, 1), (0, 0)]
        )
        for stage in self.stages:
            for block in stage:
                x = block(x, train=train)
        return constrain(x, ("batch", "seq", "embed"))

    def __call__(self, signals: jax.Array, *, train: bool = False) -> jax.Array:
        x = self.features(signals, train=train)
        return x if self.config.output == "tokens" else _mean_tokens(x)


# --------------------------------------------------------------------------------------------
# ViT-1D
# --------------------------------------------------------------------------------------------


class ViT1D(ECGEncoder):
    """ViT over ``L / P`` time patches of all leads (see the module docstring)."""

    config_class: ClassVar[type] = ViT1DConfig

    def __init__(self, config: ViT1DConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, enc = config, config.encoder
        pdt = jnp.dtype(enc.param_dtype)
        d, std = enc.hidden_size, enc.initializer_range
        init = jax.nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
        shape = (c.patch_size, c.num_leads, d)  # torch Conv1d weight [D, C, P] transposed
        self.patch_kernel = param(init(rngs.params(), shape, pdt), (None, None, "embed"))
        self.patch_bias = (
            param(jnp.zeros((d,), pdt), ("embed",)) if c.patch_bias else nnx.data(None)
        )
        if c.cls_token:
            self.cls_token = param(_normal(rngs, (d,), std, pdt), ("embed",))
        n_pos = c.num_patches + int(c.cls_token)
        self.pos_embed = param(_normal(rngs, (n_pos, d), std, pdt), (None, "embed"))
        self.encoder = Encoder(enc, rngs=rngs)
        self.norm = LayerNorm(d, eps=enc.layer_norm_eps, param_dtype=pdt)

    def encode(self, signals: jax.Array) -> jax.Array:
        """Encoder output before the final norm ``[B, (1 +) N, D]`` (CLS first if any)."""
        c = self.config
        _check_signals(signals, c)
        dt = jnp.dtype(c.encoder.dtype)
        x = normalize_signals(signals, c.input_norm).astype(dt)
        b = x.shape[0]
        x = x.reshape(b, c.num_leads, c.num_patches, c.patch_size)
        x = jnp.einsum("bcnp,pcd->bnd", x, self.patch_kernel[...].astype(dt))
        if self.patch_bias is not None:
            x = x + self.patch_bias[...].astype(dt)
        if c.cls_token:
            cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (b, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos_embed[...].astype(dt)
        return self.encoder(constrain(x, ("batch", "seq", "embed")))

    def __call__(self, signals: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no dropout
        c = self.config
        h = self.encode(signals)
        patches = h[:, 1:] if c.cls_token else h
        if c.output == "tokens":
            return self.norm(patches)
        if c.resolved_pool == "cls":
            return self.norm(h[:, 0])
        return self.norm(_mean_tokens(patches))


# --------------------------------------------------------------------------------------------
# Masked autoencoders: ST-MEM, MTAE, MLAE
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class MAEOutput:
    """What ``MaskedAutoencoder.reconstruct`` returns."""

    pred: jax.Array  # [B, G, n, P'] predicted patches
    target: jax.Array  # [B, G, n, P'] (per-patch normalised when config.norm_target)
    mask: jax.Array  # [B, G, n] bool, True = masked (hidden from the encoder)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over masked patches of each patch's mean squared error (the MAE loss)."""
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), -1)
    m = mask.astype(jnp.float32)
    return jnp.sum(per_patch * m) / jnp.maximum(jnp.sum(m), 1.0)


def random_masking(
    rng: jax.Array, shape: tuple[int, int, int], mask_ratio: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-group random masking by sorting uniform noise (MAE's ``random_masking``).

    Returns ``keep [B, G, k]`` (indices of the kept patches, in shuffled order),
    ``restore [B, G, n]`` (``argsort`` of the shuffle) and ``mask [B, G, n]`` bool.
    """
    k = num_keep(shape[-1], mask_ratio)
    noise = jax.random.uniform(rng, shape)
    shuffle = jnp.argsort(noise, axis=-1)
    restore = jnp.argsort(shuffle, axis=-1)
    return shuffle[..., :k], restore, restore >= k


class MaskedAutoencoder(ECGEncoder):
    """ST-MEM / MTAE / MLAE: masked-patch autoencoders on a transformer encoder."""

    def __init__(self, config: MAEConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config
        c, enc, dec = config, config.encoder, config.decoder
        d, dd = enc.hidden_size, dec.hidden_size
        pdt = jnp.dtype(enc.param_dtype)
        eps = enc.layer_norm_eps
        if c.patch_norm:
            self.patch_norm = LayerNorm(c.patch_dim, eps=eps, param_dtype=pdt)
            self.embed_norm = LayerNorm(d, eps=eps, param_dtype=pdt)
        else:
            self.patch_norm = self.embed_norm = nnx.data(None)
        self.patch_embed = linear(
            c.patch_dim, d, (None, "embed"), use_bias=True, config=enc, rngs=rngs
        )
        # ST-MEM: the SEP token; MTAE / MLAE: the CLS token.
        self.special_token = param(_normal(rngs, (d,), enc.initializer_range, pdt), ("embed",))
        if c.has_sep:
            lead = _normal(rngs, (c.groups, d), enc.initializer_range, pdt)
            self.lead_embed = param(lead, (None, "embed"))
        n = c.patches_per_group
        if c.pos_embed == "learned":
            self.pos_embed = param(jnp.asarray(_positions(d, n, c.has_sep), pdt), (None, "embed"))
            dpos = jnp.asarray(_positions(dd, n, c.has_sep), jnp.dtype(dec.param_dtype))
            self.decoder_pos_embed = param(dpos, (None, "embed"))
        self.encoder = Encoder(enc, rngs=rngs)
        self.norm = LayerNorm(d, eps=eps, param_dtype=pdt)
        self.decoder_embed = linear(d, dd, (None, "embed"), use_bias=True, config=dec, rngs=rngs)
        dpdt = jnp.dtype(dec.param_dtype)
        self.mask_token = param(_normal(rngs, (dd,), dec.initializer_range, dpdt), ("embed",))
        self.decoder = Encoder(dec, rngs=rngs)
        self.decoder_norm = LayerNorm(dd, eps=dec.layer_norm_eps, param_dtype=dpdt)
        self.decoder_head = linear(
            dd, c.patch_dim, ("embed", None), use_bias=True, config=dec, rngs=rngs
        )

    # Patches ---------------------------------------------------------------------------------
    def patchify(self, signals: jax.Array) -> jax.Array:
        """``[B, C, L]`` -> ``[B, G, n, P']`` (see the module docstring)."""
        raise NotImplementedError

    def unpatchify(self, patches: jax.Array) -> jax.Array:
        """``[B, G, n, P']`` -> ``[B, C, L]`` (inverse of ``patchify``)."""
        raise NotImplementedError

    def signal_mask(self, mask: jax.Array) -> jax.Array:
        """``[B, G, n]`` patch mask -> ``[B, C, L]`` bool: which samples were masked."""
        c = self.config
        full = jnp.broadcast_to(mask[..., None], (*mask.shape, c.patch_dim))
        return self.unpatchify(full)

    def _pos(self, decoder: bool) -> jax.Array:
        c = self.config
        if c.pos_embed == "learned":
            return (self.decoder_pos_embed if decoder else self.pos_embed)[...]
        dim = (c.decoder if decoder else c.encoder).hidden_size
        return jnp.asarray(_positions(dim, c.patches_per_group, c.has_sep))

    # Encoder / decoder -----------------------------------------------------------------------
    def _encode(self, x: jax.Array, keep: jax.Array | None) -> jax.Array:
        """Normalised signals ``[B, C, L]`` -> pre-norm encoder output ``[B, G, s + k, D]``
        (per group: the special token(s) and the ``k`` kept patches, in ``keep`` order)."""
        c = self.config
        dt = jnp.dtype(c.encoder.dtype)
        p = self.patchify(x).astype(dt)  # [B, G, n, P']
        if self.patch_norm is not None:
            p = self.patch_norm(p)
        h = self.patch_embed(p)
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        pos = self._pos(decoder=False).astype(dt)
        n = c.patches_per_group
        h = h + pos[1 : n + 1]
        if keep is not None:
            h = jnp.take_along_axis(h, keep[..., None], axis=2)
        b, g, _, d = h.shape
        special = self.special_token[...].astype(dt)
        parts = [jnp.broadcast_to(special + pos[0], (b, g, 1, d)), h]
        if c.has_sep:
            parts.append(jnp.broadcast_to(special + pos[n + 1], (b, g, 1, d)))
        h = jnp.concatenate(parts, axis=2)
        if c.has_sep:
            h = h + self.lead_embed[...].astype(dt)[None, :, None, :]
        t = h.shape[2]
        out = self.encoder(constrain(h.reshape(b, g * t, d), ("batch", "seq", "embed")))
        return out.reshape(b, g, t, d)

    def _decode(self, latent: jax.Array, restore: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Normed latents ``[B, G, s + k, D]`` -> (predictions ``[B, G, n, P']``, decoder
        latents before ``decoder_norm`` ``[B, G, n + s, Dd]``); mask tokens fill the masked
        patches, ``restore`` puts every patch back in place (None: nothing was masked)."""
        c = self.config
        dt = jnp.dtype(c.decoder.dtype)
        n = c.patches_per_group
        y = self.decoder_embed(latent)  # [B, G, s + k, Dd]
        b, g, t, dd = y.shape
        k = t - c.specials
        front, tokens = y[:, :, :1], y[:, :, 1 : 1 + k]
        if restore is not None:
            fill = jnp.broadcast_to(self.mask_token[...].astype(dt), (b, g, n - k, dd))
            tokens = jnp.concatenate([tokens, fill], axis=2)
            tokens = jnp.take_along_axis(tokens, restore[..., None], axis=2)
        pos = self._pos(decoder=True).astype(dt)
        parts = [front + pos[0], tokens + pos[1 : n + 1]]
        if c.has_sep:
            parts.append(y[:, :, t - 1 :] + pos[n + 1])
        z = jnp.concatenate(parts, axis=2)  # [B, G, n + s, Dd]
        z = self.decoder(z.reshape(b * g, n + c.specials, dd)).reshape(b, g, n + c.specials, dd)
        pred = self.decoder_head(self.decoder_norm(z))[:, :, 1 : n + 1]
        return pred, z

    # Training --------------------------------------------------------------------------------
    def reconstruct(
        self, signals: jax.Array, rng: jax.Array, *, mask_ratio: float | None = None
    ) -> MAEOutput:
        """Masks, encodes the visible patches, decodes every patch (see ``MAEOutput``)."""
        c = self.config
        ratio = c.mask_ratio if mask_ratio is None else mask_ratio
        _check_signals(signals, c)
        x = normalize_signals(signals, c.input_norm)
        b = x.shape[0]
        keep, restore, mask = random_masking(rng, (b, c.groups, c.patches_per_group), ratio)
        latent = self.norm(self._encode(x, keep))
        pred, _ = self._decode(latent, restore)
        target = self.patchify(x)
        if c.norm_target:
            ddof = 1 if c.patch_dim > 1 else 0
            mean = jnp.mean(target, axis=-1, keepdims=True)
            var = jnp.var(target, axis=-1, keepdims=True, ddof=ddof)
            target = (target - mean) / jnp.sqrt(var + 1e-6)
        return MAEOutput(pred=pred, target=target, mask=mask)

    def loss(
        self, signals: jax.Array, rng: jax.Array, *, mask_ratio: float | None = None
    ) -> jax.Array:
        """Scalar float32 MSE over the masked patches (a fresh random mask from ``rng``)."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        n = self.config.patches_per_group
        if num_keep(n, ratio) == n:
            raise ValueError(f"mask_ratio={ratio} masks no patch of {n}: the loss would be empty")
        out = self.reconstruct(signals, rng, mask_ratio=ratio)
        return masked_mse(out.pred, out.target, out.mask)

    # Features --------------------------------------------------------------------------------
    def __call__(self, signals: jax.Array, *, train: bool = False) -> jax.Array:
        """Deterministic features, no masking: ``[B, feature_dim]`` or ``[B, N, D]``."""
        del train  # no dropout; masking happens only in ``loss`` / ``reconstruct``
        c = self.config
        _check_signals(signals, c)
        h = self._encode(normalize_signals(signals, c.input_norm), None)  # [B, G, s + n, D]
        patches = h[:, :, 1 : 1 + c.patches_per_group]
        b, d = h.shape[0], h.shape[-1]
        if c.output == "tokens":
            return self.norm(patches.reshape(b, c.num_patches, d))
        pool = c.resolved_pool
        if pool == "cls":
            return self.norm(h[:, 0, 0])
        if pool == "mean":
            return self.norm(_mean_tokens(patches.reshape(b, c.num_patches, d)))
        _, z = self._decode(self.norm(h), None)  # "decoder": the reference's latents
        return _mean_tokens(z.reshape(b, -1, z.shape[-1]))


class STMEM(MaskedAutoencoder):
    """ST-MEM (spatio-temporal masked electrocardiogram modeling)."""

    config_class: ClassVar[type] = STMEMConfig

    def patchify(self, signals: jax.Array) -> jax.Array:
        c = self.config
        b = signals.shape[0]
        return signals.reshape(b, c.num_leads, c.patches_per_group, c.patch_size)

    def unpatchify(self, patches: jax.Array) -> jax.Array:
        c = self.config
        return patches.reshape(patches.shape[0], c.num_leads, c.seq_len)


class MTAE(MaskedAutoencoder):
    """Masked time autoencoder: tokens are time patches across all leads."""

    config_class: ClassVar[type] = MTAEConfig

    def patchify(self, signals: jax.Array) -> jax.Array:
        c = self.config
        b, n = signals.shape[0], c.patches_per_group
        x = signals.reshape(b, c.num_leads, n, c.patch_size).transpose(0, 2, 3, 1)
        return x.reshape(b, 1, n, c.patch_dim)  # "b c (n p) -> b n (p c)"

    def unpatchify(self, patches: jax.Array) -> jax.Array:
        c = self.config
        b, n = patches.shape[0], c.patches_per_group
        x = patches.reshape(b, n, c.patch_size, c.num_leads).transpose(0, 3, 1, 2)
        return x.reshape(b, c.num_leads, c.seq_len)


class MLAE(MaskedAutoencoder):
    """Masked lead autoencoder: tokens are whole leads."""

    config_class: ClassVar[type] = MLAEConfig

    def patchify(self, signals: jax.Array) -> jax.Array:
        c = self.config
        b = signals.shape[0]
        return signals.reshape(b, 1, c.patches_per_group, c.patch_dim)  # "b (n q) t -> b n (q t)"

    def unpatchify(self, patches: jax.Array) -> jax.Array:
        c = self.config
        return patches.reshape(patches.shape[0], c.num_leads, c.seq_len)


def mae_loss(
    model: MaskedAutoencoder,
    signals: jax.Array,
    rng: jax.Array,
    mask_ratio: float | None = None,
) -> jax.Array:
    """``model.loss(signals, rng, mask_ratio=mask_ratio)``: MSE on the masked patches."""
    return model.loss(signals, rng, mask_ratio=mask_ratio)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

ENCODERS: dict[str, type[ECGEncoder]] = {
    "merl_resnet": ResNet1D,
    "vit1d": ViT1D,
    "stmem": STMEM,
    "mtae": MTAE,
    "mlae": MLAE,
}
MAE_ENCODERS: tuple[str, ...] = ("stmem", "mtae", "mlae")


def _model_class(name: str) -> type[ECGEncoder]:
    if name not in ENCODERS:
        raise ValueError(f"ECG encoder {name!r} not in {sorted(ENCODERS)}")
    return ENCODERS[name]


def default_config(name: str, seq_len: int = 2500, num_leads: int = 12, **overrides: Any):
    """The paper's encoder ``name`` for ``[num_leads, seq_len]`` signals: ResNet-101, or a
    ViT-B (+ the 256-d decoder) with ``default_patch_size(seq_len)``."""
    cls = _model_class(name).config_class
    kw: dict[str, Any] = dict(seq_len=seq_len, num_leads=num_leads)
    if name in ("vit1d", "stmem", "mtae"):
        kw["patch_size"] = default_patch_size(seq_len)
    return cls(**{**kw, **overrides})


def tiny_config(
    name: str,
    seq_len: int = 256,
    num_leads: int = 12,
    *,
    patch_size: int | None = None,
    width: int = 32,
    depth: int | None = None,
    **overrides: Any,
):
    """A tiny encoder for tests and CPU demos.

    Transformers: ``depth`` (default 2) blocks of ``width``-d (4 heads, MLP ``2 * width``);
    MAE decoders one 16-d block; ``patch_size`` (vit1d / stmem / mtae) defaults to
    ``seq_len / 8`` when that divides, else ``default_patch_size``. ResNet: ``depth`` (default
    4) stages of one bottleneck block each, base widths growing from ``width / 8`` to
    ``width / 2`` (feature_dim ``2 * width`` with 4 stages). ``overrides`` are config fields.
    """
    cls = _model_class(name).config_class
    kw: dict[str, Any] = dict(seq_len=seq_len, num_leads=num_leads)
    if name == "merl_resnet":
        stages = 4 if depth is None else depth
        w = max(width // 8, 1)
        widths = (w, w, 2 * w, max(width // 2, 1), max(width // 2, 1), max(width // 2, 1))
        if not 1 <= stages <= len(widths):
            raise ValueError(f"a tiny ResNet has 1..{len(widths)} stages, got depth={stages}")
        kw.update(
            block="bottleneck", layers=(1,) * stages, widths=widths[:stages], stem_width=2 * w
        )
    else:
        kw["encoder"] = EncoderConfig(
            hidden_size=width,
            num_layers=2 if depth is None else depth,
            num_heads=4,
            intermediate_size=2 * width,
            layer_norm_eps=1e-5,
        )
        if name in MAE_ENCODERS:
            kw["decoder"] = EncoderConfig(
                hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, layer_norm_eps=1e-5
            )
        if name != "mlae":
            if patch_size is None:
                patch_size = seq_len // 8 if seq_len % 8 == 0 else default_patch_size(seq_len)
            kw["patch_size"] = patch_size
    return cls(**{**kw, **overrides})


def replace_config(encoder: ECGEncoder, **changes: Any) -> ECGEncoder:
    """The same parameters (shared, not copied) under ``dataclasses.replace(config,
    **changes)``, for changes that keep every parameter shape: ``output``, ``pool``,
    ``input_norm``, ``mask_ratio``, ``norm_target``, ``dtype``... (e.g. a pretrained encoder
    read as tokens). Anything else is a ``ValueError``."""
    config = dataclasses.replace(encoder.config, **changes)
    abstract = nnx.eval_shape(lambda: type(encoder)(config, rngs=nnx.Rngs(0)))
    graphdef, new_state = nnx.split(abstract)
    state = nnx.state(encoder)
    old = {p: v.shape for p, v in nnx.to_flat_state(state)}
    new = {p: v.shape for p, v in nnx.to_flat_state(new_state)}
    if old != new:
        raise ValueError(f"config changes {sorted(changes)} change the parameters; rebuild")
    return nnx.merge(graphdef, state)


def make_encoder(name: str, config: Any = None, *, rngs: nnx.Rngs | None = None) -> ECGEncoder:
    """Builds encoder ``name`` from ``config`` (default: ``default_config(name)``)."""
    cls = _model_class(name)
    config = default_config(name) if config is None else config
    if not isinstance(config, cls.config_class):
        raise TypeError(
            f"encoder {name!r} needs a {cls.config_class.__name__}, got {type(config).__name__}"
        )
    return cls(config, rngs=rngs if rngs is not None else nnx.Rngs(0))
