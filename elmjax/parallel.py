"""Device mesh and the one table that maps logical axis names to mesh axes.

Model code never names a mesh axis. Parameters carry logical names in their ``out_sharding``
metadata (created with ``eager_sharding=False``, so a model builds the same way with or without
a mesh), and activations are pinned with ``constrain(x, names)``. This module turns those names
into ``PartitionSpec``s through ``LOGICAL_RULES``:

=============  ==================  ===============================================================
logical name   mesh axes           why
=============  ==================  ===============================================================
batch          (data, fsdp)        data parallelism over both axes: FSDP is data parallel too
seq            None                sequences stay whole on a device (no sequence parallelism)
embed          fsdp                parameters are sharded over ``fsdp`` along the model width
                                   (ZeRO-3 style; all-gathered per layer by XLA)
heads          tensor              Megatron-style tensor parallelism: column-parallel q/k/v,
kv_heads       tensor              row-parallel o_proj
mlp            tensor              column-parallel gate/up, row-parallel down
vocab          tensor              the embedding table and LM head split by vocabulary rows
head_dim       None
layers         None                the stacked-layer axis of ``scan_layers`` models
=============  ==================  ===============================================================

A mesh axis is used at most once per array: when two dimensions of one array map to the same
mesh axis, the earlier dimension keeps it (activations ``(batch, seq, embed)`` are sharded over
``(data, fsdp)`` along the batch only, while the parameter ``(vocab, embed)`` is sharded
``(tensor, fsdp)``). A dimension that is not divisible by the size of its mesh axes is
replicated instead (e.g. an odd number of extra vocabulary rows), and mesh axes absent from the
mesh are ignored, so the rules work for any subset of ``(data, fsdp, tensor)``.

API:
  make_mesh(data=-1, fsdp=1, tensor=1, devices=None) -> Mesh (``Auto`` axes)
  logical_to_mesh(names, mesh=None, shape=None) -> PartitionSpec
  constrain(x, names) -> x with a sharding constraint (no-op outside ``jax.set_mesh``)
  state_shardings(state, mesh) -> the state's tree with a NamedSharding per Variable
  create_sharded(make_model, mesh) -> model built directly sharded (never whole on one device)
  shard_model_state(model, mesh) -> moves an existing model's state onto its shardings, in place
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# The one table. Values: a mesh axis name, a tuple of them, or None (replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
)
_RULES = dict(LOGICAL_RULES)

M = TypeVar("M")


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all); -1 takes the rest.

    Axes are ``AxisType.Auto`` (GSPMD propagation; shardings are pinned by ``constrain``).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1; got data={data} fsdp={fsdp} tensor={tensor}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise ValueError(
                f"{len(devices)} devices cannot be split into {sizes} (data, fsdp, tensor)"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices) or min(sizes) < 1:
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
            f"{math.prod(sizes)} devices; {len(devices)} available"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _mesh_axes(rule: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_mesh(
    names: Sequence[str | None] | None,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps logical axis names (one per dimension, None = replicated) to a ``PartitionSpec``.

    Args:
      names: logical names, e.g. ``("batch", "seq", "embed")``; unknown names are an error.
      mesh: drops mesh axes the mesh lacks, and (with ``shape``) checks divisibility; default:
        the current ``jax.set_mesh`` mesh, if any.
      shape: the array's shape; a dimension not divisible by its mesh axes is replicated.
    """
    if names is None:
        return PartitionSpec()
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    mesh_shape = dict(mesh.shape) if mesh is not None and not mesh.empty else None
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in _RULES:
            raise KeyError(f"logical axis {name!r} has no rule in parallel.LOGICAL_RULES")
        axes = [a for a in _mesh_axes(_RULES[name]) if a not in used]
        if mesh_shape is not None:
            axes = [a for a in axes if a in mesh_shape]
            if shape is not None:
                size = math.prod(mesh_shape[a] for a in axes)
                if shape[dim] % size:
                    axes = []
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names under the current mesh; a no-op without."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(names, mesh, x.shape))


def _var_names(var: nnx.Variable) -> Sequence[str | None] | None:
    names = var.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def placement(state: Any, mesh: Mesh | None) -> Any:
    """Where to load ``state``: :func:`state_shardings` on ``mesh``, or (no mesh) the first
    device for every Variable (checkpoint loaders fill the tree with these)."""
    if mesh is not None:
        return state_shardings(state, mesh)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda v: v.replace(device), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A NamedSharding for each Variable of ``state`` (concrete or abstract), from its names.

    Variables without names (RNG state, unannotated) are replicated. Returns the same tree
    structure, each Variable holding its sharding (usable as jit ``out_shardings``).
    """

    def one(var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        value = var.get_value()
        shape = np.shape(value)
        spec = logical_to_mesh(_var_names(var), mesh, shape) if shape else PartitionSpec()
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_model: Callable[[], M], mesh: Mesh) -> M:
    """Builds ``make_model()`` with every parameter created directly in its sharding.

    The model is traced abstractly (``nnx.eval_shape``), then its initialisation runs under
    ``jax.jit`` with ``out_shardings`` from ``state_shardings``, so no device ever holds the
    whole model. ``make_model`` must be deterministic (seeded ``nnx.Rngs``).
    """
    abstract = nnx.eval_shape(make_model)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)

    def init():
        return nnx.split(make_model())[1]

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_model_state(model: M, mesh: Mesh) -> M:
    """Moves the state of an existing model onto the shardings of its logical names, in place.

    For models that already fit on one device (tests, small demos); big models should be built
    with ``create_sharded`` or loaded with ``models.hf.load_hf(..., mesh=mesh)``.
    """
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    nnx.update(model, jax.device_put(state, shardings))
    return model
