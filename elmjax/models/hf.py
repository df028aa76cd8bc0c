"""Hugging Face checkpoints <-> ``models.llm.LLM``: config, name mapping and safetensors loading.

Name mapping (the hook for export)
----------------------------------
``param_map(config)`` lists one ``ParamMap(hf_name, path, layer, transpose)`` per HF tensor:

- ``path``: the NNX state path, e.g. ``("layers", 3, "self_attn", "q_proj", "kernel")``; with
  ``scan_layers`` the layer index is not in the path (``("layers", "self_attn", ...)``) but in
  ``layer``: the index along the stacked leading axis.
- ``transpose``: HF ``nn.Linear.weight [out, in]`` is NNX ``kernel [in, out]`` (all
  projections and ``lm_head``); embeddings, norms and biases are not transposed.
- Norm weights are stored as in the checkpoint (Gemma's ``(1 + w)`` stays ``w``).
- Not in the table: ``embed_tokens.extra`` (the extra vocabulary rows; an export appends them
  to ``model.embed_tokens.weight``) and ``lm_head.extra`` (appended, transposed, to
  ``lm_head.weight``); LoRA factors (``models.lora``).

Export is therefore: for each entry, ``x = state[path]``, ``x = x[layer]`` if ``layer`` is not
None, ``x = x.T`` if ``transpose``, saved under ``hf_name``. ``hf_to_nnx(config)`` gives the
table as a dict keyed by HF name.

Loading
-------
``load_hf(path, *, dtype="float32", param_dtype=None, extra_vocab=0, mesh=None, seed=0,
**overrides) -> (LLM, LLMConfig)`` reads ``config.json`` and ``model.safetensors`` (or the
shards listed in ``model.safetensors.index.json``) from a local directory. Each parameter is
built with ``jax.make_array_from_callback`` in its target sharding (one device, or ``mesh``
through ``elmjax.parallel``'s rules), reading only the slice each device needs from a
memory-mapped file: no second full copy in host or device memory. The safetensors reader is a
small memory-mapped one, not ``safe_open(framework="numpy")``: the latter cannot return
bfloat16 tensors (numpy has no bfloat16; ``ml_dtypes`` has). Tied checkpoints (no
``lm_head.weight``) load into a tied model; a tied model ignores a stored ``lm_head.weight``.
Errors name the directory and file, the tensor, expected vs found shapes, and missing or
unexpected tensors.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from elmjax import parallel
from elmjax.models.llm import FAMILIES, LLM, ExtraVocab, LLMConfig, resize_extra_vocab

SUPPORTED_MODEL_TYPES: tuple[str, ...] = FAMILIES
# Checkpoint entries that carry no parameters.
_IGNORED_SUFFIXES: tuple[str, ...] = ("rotary_emb.inv_freq",)

_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class ParamMap:
    """One HF tensor <-> one NNX state path (see the module docstring)."""

    hf_name: str
    path: tuple[str | int, ...]
    layer: int | None = None
    transpose: bool = False


def param_map(config: LLMConfig) -> list[ParamMap]:
    """Every HF tensor of a checkpoint with this config, with its NNX path and transpose."""
    c = config
    out = [ParamMap("model.embed_tokens.weight", ("embed_tokens", "embedding"))]
    projections = [
        ("self_attn", "q_proj", c.attention_bias),
        ("self_attn", "k_proj", c.attention_bias),
        ("self_attn", "v_proj", c.attention_bias),
        ("self_attn", "o_proj", c.o_proj_bias),
        ("mlp", "gate_proj", c.mlp_bias),
        ("mlp", "up_proj", c.mlp_bias),
        ("mlp", "down_proj", c.mlp_bias),
    ]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if c.is_gemma:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(c.num_layers):
        prefix, layer = (("layers",), i) if c.scan_layers else (("layers", i), None)
        hf = f"model.layers.{i}"
        for block, proj, bias in projections:
            out.append(
                ParamMap(
                    f"{hf}.{block}.{proj}.weight", (*prefix, block, proj, "kernel"), layer, True
                )
            )
            if bias:
                out.append(
                    ParamMap(f"{hf}.{block}.{proj}.bias", (*prefix, block, proj, "bias"), layer)
                )
        for norm in norms:
            out.append(ParamMap(f"{hf}.{norm}.weight", (*prefix, norm, "scale"), layer))
    out.append(ParamMap("model.norm.weight", ("norm", "scale")))
    if not c.tie_embeddings:
        out.append(ParamMap("lm_head.weight", ("lm_head", "kernel"), None, True))
    return out


def hf_to_nnx(config: LLMConfig) -> dict[str, ParamMap]:
    """``param_map`` keyed by HF tensor name."""
    return {m.hf_name: m for m in param_map(config)}


# --------------------------------------------------------------------------------------------
# safetensors, memory-mapped
# --------------------------------------------------------------------------------------------


class SafetensorsFile:
    """A read-only, memory-mapped safetensors file: ``names``, ``shape(name)``, ``array(name)``.

    ``array`` returns a lazy numpy view (any dtype, bfloat16 via ``ml_dtypes``); slicing it reads
    only the pages touched.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self._header = header
        self._base = 8 + n
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None

    @property
    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def array(self, name: str) -> np.ndarray:
        entry = self._header[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        raw = self._mmap[self._base + start : self._base + end]
        return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _open_checkpoint(path: Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file holding it (single file or sharded index)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        f = SafetensorsFile(single)
        return {name: f for name in f.names}
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).exists():
                raise FileNotFoundError(f"{path}: shard {shard} listed in {index.name} is missing")
            files[shard] = SafetensorsFile(path / shard)
        out = {}
        for name, shard in weight_map.items():
            if name not in files[shard].names:
                raise KeyError(
                    f"{path / shard}: tensor {name!r} listed in {index.name} is not in it"
                )
            out[name] = files[shard]
        return out
    present = sorted(p.name for p in path.iterdir())
    raise FileNotFoundError(
        f"{path}: no model.safetensors or model.safetensors.index.json (found: {present})"
    )


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a local checkpoint directory, as a dict."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    file = path / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{path}: no config.json")
    return json.loads(file.read_text())


# --------------------------------------------------------------------------------------------
# load_hf
# --------------------------------------------------------------------------------------------


def _expected_shape(var_shape: tuple[int, ...], m: ParamMap) -> tuple[int, ...]:
    shape = var_shape[1:] if m.layer is not None else var_shape
    return tuple(reversed(shape)) if m.transpose else tuple(shape)


def _reader(maps: list[ParamMap], files: dict[str, SafetensorsFile], dtype: Any):
    """A ``make_array_from_callback`` callback reading one device's slice of a parameter."""

    def one(m: ParamMap, idx: tuple[slice, ...]) -> np.ndarray:
        src = files[m.hf_name].array(m.hf_name)
        if m.transpose:
            return np.asarray(src[idx[1], idx[0]]).T
        return np.asarray(src[idx])

    def callback(idx: tuple[slice, ...]) -> np.ndarray:
        if maps[0].layer is None:
            out = one(maps[0], idx)
        else:
            by_layer = {m.layer: m for m in maps}
            layers = range(len(maps))[idx[0]]
            out = np.stack([one(by_layer[i], idx[1:]) for i in layers])
        return np.ascontiguousarray(out.astype(dtype))

    return callback


def _check_names(config: LLMConfig, files: dict[str, SafetensorsFile], path: Path) -> None:
    table = hf_to_nnx(config)
    missing = [n for n in table if n not in files]
    ignored = set(_IGNORED_SUFFIXES)
    unexpected = [
        n
        for n in files
        if n not in table
        and not any(n.endswith(s) for s in ignored)
        and not (config.tie_embeddings and n == "lm_head.weight")
    ]
    if missing:
        raise KeyError(
            f"{path}: {len(missing)} tensor(s) missing from the checkpoint for a "
            f"{config.family} model with {config.num_layers} layers: {_some(missing)}"
        )
    if unexpected:
        raise KeyError(f"{path}: {len(unexpected)} unexpected tensor(s): {_some(unexpected)}")


def _some(names: Iterable[str], k: int = 8) -> str:
    names = list(names)
    more = f" ... (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def load_hf(
    path: str | Path,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    extra_vocab: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
    **overrides: Any,
) -> tuple[LLM, LLMConfig]:
    """Loads a local HF checkpoint directory into an ``LLM`` (sharded over ``mesh`` if given).

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
      dtype: compute dtype; param_dtype: storage dtype (default: ``dtype``).
      extra_vocab: rows appended to the vocabulary, mean-resized from the loaded rows.
      mesh: a ``parallel.make_mesh`` mesh; parameters are created directly in their shardings.
      seed: seed of the extra rows' draw.
      **overrides: further ``LLMConfig`` fields (``scan_layers``, ``remat``, ...).

    Returns:
      ``(model, config)``.
    """
    path = Path(path)
    hf_config = read_config(path)
    config = LLMConfig.from_hf(
        hf_config,
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        extra_vocab=extra_vocab,
        **overrides,
    )
    files = _open_checkpoint(path)
    _check_names(config, files, path)

    abstract = nnx.eval_shape(lambda: LLM(config, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shardings = parallel.state_shardings(state, mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(
            lambda v: v.replace(device), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )

    by_path: dict[tuple, list[ParamMap]] = {}
    for m in param_map(config):
        by_path.setdefault(m.path, []).append(m)

    flat_state = dict(nnx.to_flat_state(state))
    flat_shardings = dict(nnx.to_flat_state(shardings))
    for var_path, var in flat_state.items():
        sharding = flat_shardings[var_path].get_value()
        shape, var_dtype = var.shape, var.dtype
        maps = by_path.get(tuple(var_path))
        if maps is None:  # extra vocabulary rows: filled by resize_extra_vocab below
            if not isinstance(var, ExtraVocab):
                raise KeyError(f"no checkpoint tensor maps to model parameter {var_path}")
            value = jax.jit(
                lambda s=shape, d=var_dtype: jax.numpy.zeros(s, d), out_shardings=sharding
            )()
        else:
            for m in maps:
                found = files[m.hf_name].shape(m.hf_name)
                expected = _expected_shape(shape, m)
                if found != expected:
                    raise ValueError(
                        f"{path}: tensor {m.hf_name} has shape {list(found)}, expected "
                        f"{list(expected)} from config.json"
                    )
            value = jax.make_array_from_callback(shape, sharding, _reader(maps, files, var_dtype))
        var.set_value(value)
    model = nnx.merge(graphdef, nnx.from_flat_state(flat_state))
    resize_extra_vocab(model, seed)
    return model, config
