"""The projector of an ECG-language model: encoder features -> LLM-width vectors, in Flax NNX.

Config
------
``ProjectorConfig`` (frozen, hashable): ``in_dim`` (the encoder's feature width, e.g. 256 for
ST-MEM, 512 for CLIP ``image_embeds``), ``out_dim`` (the LLM's ``hidden_size``), ``kind``,
``hidden_dim`` (MLP only; None: ``out_dim``), ``activation`` (MLP only; a
``models.transformer.ACTIVATIONS`` name, default ``"gelu"``, the exact erf form of torch's
``nn.GELU()``), ``use_bias``, ``dtype`` / ``param_dtype``.

Kinds
-----
- ``"linear"`` (the paper's): one ``Linear(in_dim, out_dim)``; the reference's
  ``nn.Linear(d_enc, d_llm)`` in ``llava_style.py``.
- ``"mlp"`` (LLaVA-1.5's ``mlp2x_gelu``): ``Linear(in_dim, hidden_dim) -> GELU ->
  Linear(hidden_dim, out_dim)``.

Module tree (transformers' ``LlavaMultiModalProjector`` names, so a LLaVA projector maps
one-to-one; ``kernel [in, out]`` is HF ``weight [out, in]`` transposed)::

    linear_1.kernel [in_dim, out_dim | hidden_dim]    [None, embed | mlp]    .bias [embed | mlp]
    linear_2.kernel [hidden_dim, out_dim] (mlp only)  [mlp, embed]           .bias [embed]

The input width is the encoder's, which has no logical name of its own (``embed`` is the
LLM's width, and a mesh axis is used once per array), so it stays replicated; the output is
sharded like the LLM width and the MLP's hidden width like an LLM MLP (``parallel``'s rules).
Parameters are created with ``eager_sharding=False`` (like ``models.llm``): a projector builds
the same with or without a mesh; ``parallel.create_sharded`` builds it sharded.

Initialisation is torch ``nn.Linear``'s default (kernel and bias ``U(-1/sqrt(in),
1/sqrt(in))``), what the reference and LLaVA start from.

Calling
-------
``Projector(config, rngs=...)(x)``: ``x [..., in_dim]`` (``[B, in_dim]`` pooled or
``[B, N, in_dim]`` tokens) -> ``[..., out_dim]`` in the compute ``dtype``; a ``[B, N, D]``
result is pinned to ``("batch", "seq", "embed")``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from elmjax.models.llm import Linear
from elmjax.models.transformer import ACTIVATIONS, DTYPES, activation, param
from elmjax.parallel import constrain

KINDS: tuple[str, ...] = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Shapes and numerics of the projector (see the module docstring).

    Attributes:
      in_dim: encoder feature width.
      out_dim: LLM width (``LLMConfig.hidden_size``).
      kind: "linear" (the paper) | "mlp" (LLaVA-1.5, 2 layers with GELU).
      hidden_dim: width of the MLP's hidden layer; None: ``out_dim`` (as LLaVA-1.5).
      activation: MLP activation (``models.transformer.ACTIVATIONS``).
      use_bias: biases on the linear layers (torch's default: yes).
      dtype: compute dtype; param_dtype: parameter storage dtype.
    """

    in_dim: int
    out_dim: int
    kind: str = "linear"
    hidden_dim: int | None = None
    activation: str = "gelu"
    use_bias: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"projector kind {self.kind!r} not supported; supported: {KINDS}")
        for name in ("in_dim", "out_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_dim is not None and self.hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be positive, got {self.hidden_dim}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not in {ACTIVATIONS}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    @property
    def mlp_dim(self) -> int:
        """The MLP's hidden width (``hidden_dim`` or ``out_dim``)."""
        return self.hidden_dim or self.out_dim


def _torch_linear(
    d_in: int,
    d_out: int,
    names: tuple[str | None, str | None],
    config: ProjectorConfig,
    rngs: nnx.Rngs,
) -> Linear:
    """A fresh ``llm.Linear`` initialised like torch ``nn.Linear`` (kernel and bias
    ``U(-1/sqrt(d_in), 1/sqrt(d_in))``)."""
    pdt = jnp.dtype(config.param_dtype)
    bound = 1.0 / math.sqrt(d_in)
    w = jax.random.uniform(rngs.params(), (d_in, d_out), pdt, -bound, bound)
    bias = None
    if config.use_bias:
        b = jax.random.uniform(rngs.params(), (d_out,), pdt, -bound, bound)
        bias = param(b, names[1:])
    return Linear(param(w, names), bias, dtype=jnp.dtype(config.dtype))


class Projector(nnx.Module):
    """Encoder features ``[..., in_dim]`` -> LLM-width vectors ``[..., out_dim]``."""

    def __init__(self, config: ProjectorConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        if c.kind == "linear":
            self.linear_1 = _torch_linear(c.in_dim, c.out_dim, (None, "embed"), c, rngs)
            self.linear_2 = nnx.data(None)
        else:
            self.linear_1 = _torch_linear(c.in_dim, c.mlp_dim, (None, "mlp"), c, rngs)
            self.linear_2 = _torch_linear(c.mlp_dim, c.out_dim, ("mlp", "embed"), c, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        if x.shape[-1] != c.in_dim:
            raise ValueError(
                f"projector expects features [..., {c.in_dim}] (ProjectorConfig.in_dim), got "
                f"shape {tuple(x.shape)}: set in_dim to the encoder's feature width"
            )
        y = self.linear_1(x)
        if self.linear_2 is not None:
            y = self.linear_2(activation(c.activation)(y))
        if y.ndim == 3:
            y = constrain(y, ("batch", "seq", "embed"))
        return y
