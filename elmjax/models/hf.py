"""Hugging Face checkpoints <-> ``models.llm.LLM``: loading, export, PEFT adapters, GGUF import.

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

Export: ``export_hf``
---------------------
``export_hf(model, config, out_dir, *, merge_lora=True, dtype="bfloat16", tokenizer_dir=None,
hf_config=None, overwrite=False, max_shard_size=2 GiB) -> Path`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` (and ``load_hf``) load:

- ``config.json`` from ``to_hf_config(config)``: ``architectures`` / ``model_type``
  (``LlamaForCausalLM``/``llama``, ``Qwen2ForCausalLM``/``qwen2``, ``Gemma2ForCausalLM``/
  ``gemma2``), shapes, ``vocab_size`` = text + extra rows, RoPE written both ways (top-level
  ``rope_theta`` + ``rope_scaling`` as transformers 4 and released checkpoints have it, and
  transformers 5's ``rope_parameters``), ``tie_word_embeddings``, the family's fields (Llama
  biases; Qwen 2 ``use_sliding_window`` / ``max_window_layers`` / ``layer_types``; Gemma 2
  ``query_pre_attn_scalar``, soft-caps, ``sliding_window``, ``layer_types``), ``torch_dtype``.
  Fields an ``LLMConfig`` does not hold (``max_position_embeddings``, ``bos/eos/pad_token_id``)
  come from ``hf_config`` (pass the source checkpoint's ``read_config(path)``); without it
  ``max_position_embeddings`` is ``max(8192, original * factor)``.
- ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
  when the tensors exceed ``max_shard_size`` bytes per file; metadata ``format: pt``.
- ``generation_config.json`` (the token ids known from ``hf_config``).
- the tokenizer files of ``tokenizer_dir`` (``TOKENIZER_FILES``), copied, if given.

LoRA: with ``merge_lora=True`` each adapted kernel is written as ``W + alpha/r * A @ B`` (the
formula of ``lora.merge_lora`` / ``LoRALinear.merged_kernel``, computed per tensor in float32
rather than on a ``merge_lora`` copy of the whole model); ``merge_lora=False`` writes the base
weights only, for use with ``export_peft_adapter``. Extra vocabulary: the ``ExtraVocab`` rows
(ECG tokens, markers, pad) are appended after the text rows of ``model.embed_tokens.weight``
and, when untied, of ``lm_head.weight``; id ``vocab_size + j`` keeps its meaning, and
``load_hf(out_dir)`` sees a plain ``vocab_size + extra_vocab`` vocabulary (no extra rows).
The tokenizer is copied as is: adding the ECG tokens to it is the tokenizer's business.

Memory: tensors are produced one at a time (layer slice, LoRA merge and gather on demand,
then written and dropped); the safetensors header is computed from shapes first, so nothing
is held twice. A sharded parameter is gathered to the host (``process_allgather`` when it
spans processes); in multi-process runs every process must call the export (the gathers are
collective) and only process 0 writes. Files appear atomically (temp + rename). Writing into
a non-empty directory needs ``overwrite=True`` (stale ``model*.safetensors*`` are removed).

PEFT adapter: ``export_peft_adapter``
-------------------------------------
``export_peft_adapter(model, config, out_dir, *, base_model_name_or_path, overwrite=False)``
writes ``adapter_config.json`` (``peft_type`` LORA, ``task_type`` CAUSAL_LM, ``r``,
``lora_alpha``, ``lora_dropout``, ``target_modules``, ``bias`` none; adapters of other ranks /
alphas go to ``rank_pattern`` / ``alpha_pattern``; a projection adapted in only some layers is
listed by its full module names) and ``adapter_model.safetensors`` (float32) with PEFT's names,
checked against what peft 0.21 saves itself::

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   A.T [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   B.T [out, r]

(``mlp.{gate,up,down}_proj`` alike). With extra vocabulary the rows travel as PEFT
``trainable_token_indices`` (ids ``vocab_size ..``) with values in
``base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta [E, D]`` (and
``lm_head`` when untied); PEFT writes these values over the base rows, so load with
``base.resize_token_embeddings(vocab_size + extra_vocab)`` first, then
``peft.PeftModel.from_pretrained(base, out_dir)``.

GGUF import: ``import_gguf`` and the CLI
----------------------------------------
``import_gguf(gguf_file, out_dir, *, dtype="float32", tokenizer=True, overwrite=False)`` and
``python -m elmjax.models.hf import-gguf FILE --out DIR [--dtype bfloat16] [--no-tokenizer]
[--overwrite]`` convert a llama.cpp file (architectures llama, qwen2, gemma2) to an HF
directory like ``export_hf``'s. The file is read with ``gguf.GGUFReader`` (memory-mapped) and
each tensor dequantised with ``gguf.quants.dequantize`` (any GGML type, Q4_1/Q8_0 included)
when it is written, one at a time. Names: ``token_embd`` -> ``model.embed_tokens``,
``output_norm`` -> ``model.norm``, ``output`` -> ``lm_head`` (absent: tied),
``blk.{i}.attn_{q,k,v,output}`` -> ``self_attn.{q,k,v,o}_proj``, ``ffn_{gate,up,down}`` ->
``mlp.*_proj``, ``attn_norm`` -> ``input_layernorm``, ``ffn_norm`` ->
``post_attention_layernorm`` (Gemma 2: ``pre_feedforward_layernorm``; its
``post_attention_norm`` / ``post_ffw_norm`` are the post-attention / post-feedforward norms).
Config from ``{arch}.context_length``, ``embedding_length``, ``block_count``,
``feed_forward_length``, ``attention.head_count(_kv)``, ``attention.key_length`` /
``rope.dimension_count`` (head_dim), ``rope.freq_base``, ``attention.layer_norm_rms_epsilon``
(float32 values written as their shortest decimal: 1e-05, not 9.9999997e-06), token ids from
``tokenizer.ggml.*``; Gemma 2's soft-caps and sliding window from its keys and
``query_pre_attn_scalar`` = head_dim as llama.cpp does (hidden/heads for the 46-layer 27B).

Un-permutation: llama.cpp's converter permutes the rows of Llama's ``q_proj`` / ``k_proj``
per head (``reshape(n_head, 2, d/2, in).swapaxes(1, 2)``) so that its interleaved-pair RoPE
matches HF's rotate-half RoPE; ``unpermute_rope`` applies the inverse
(``reshape(n_head, d/2, 2, in).swapaxes(1, 2)``, as transformers' GGUF loader does) with the
query heads for ``attn_q`` and the key/value heads for ``attn_k``. Qwen 2 and Gemma 2 are not
permuted (llama.cpp uses NeoX-style RoPE for them); llama.cpp stores Gemma's norms as
``1 + w``, so 1 is subtracted. Llama 3 RoPE scaling is stored by llama.cpp as per-frequency
divisors (``rope_freqs.weight``); the import recovers ``rope_scaling`` (llama3 factor, low/high
frequency factors, original context) from them, and supports ``rope.scaling.type`` linear.
The tokenizer is converted by transformers (``AutoTokenizer.from_pretrained(dir,
gguf_file=...)``, which needs torch) and saved as ``tokenizer.json`` / ``tokenizer_config.json``
with the GGUF's ``tokenizer.chat_template`` (also in ``chat_template.jinja``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
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


def open_checkpoint(path: Path) -> dict[str, SafetensorsFile]:
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
            f"{config.family} model with {config.num_layers} layers: {some_names(missing)}"
        )
    if unexpected:
        raise KeyError(f"{path}: {len(unexpected)} unexpected tensor(s): {some_names(unexpected)}")


def some_names(names: Iterable[str], k: int = 8) -> str:
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
    files = open_checkpoint(path)
    _check_names(config, files, path)

    abstract = nnx.eval_shape(lambda: LLM(config, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    shardings = parallel.placement(state, mesh)

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


# --------------------------------------------------------------------------------------------
# Export: config.json
# --------------------------------------------------------------------------------------------

HF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
EXPORT_DTYPES: dict[str, Any] = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Keys of a source config.json that the LLMConfig decides (or that must not be carried over).
_DERIVED_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "quantization_config",
        "auto_map",
        "_name_or_path",
        "transformers_version",
        "rope_scaling",
        "rope_parameters",
        "rope_theta",
        "layer_types",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "torch_dtype",
        "dtype",
        "hidden_act",
        "hidden_activation",
    }
)
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Files of a transformers tokenizer directory (copied by export_hf(tokenizer_dir=...)).
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _check_family(config: LLMConfig) -> None:
    if config.family not in HF_ARCHITECTURES:
        raise ValueError(
            f"cannot export family {config.family!r}: known families are "
            f"{', '.join(HF_ARCHITECTURES)}"
        )


_SHAPE_FIELDS = (
    "family",
    "vocab_size",
    "extra_vocab",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "tie_embeddings",
    "scan_layers",
)


def _check_model(model: nnx.Module, config: LLMConfig) -> None:
    """``config`` must describe ``model`` (its own ``model.config``, when it has one)."""
    _check_family(config)
    own = getattr(model, "config", None)
    if isinstance(own, LLMConfig):
        diff = [f for f in _SHAPE_FIELDS if getattr(own, f) != getattr(config, f)]
        if diff:
            pairs = ", ".join(
                f"{f}={getattr(config, f)!r} (model: {getattr(own, f)!r})" for f in diff
            )
            raise ValueError(f"config does not describe the model: {pairs}")


def _check_dtype(dtype: str) -> Any:
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
    return np.dtype(EXPORT_DTYPES[dtype])


def to_hf_config(
    config: LLMConfig,
    *,
    dtype: str = "float32",
    vocab_size: int | None = None,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The transformers ``config.json`` dict of ``config`` (``vocab_size`` default: total_vocab).

    ``base`` (e.g. the source checkpoint's ``config.json``) contributes the fields an
    ``LLMConfig`` does not hold (``max_position_embeddings``, token ids, ...); every
    architecture field is derived from ``config`` and wins.
    """
    _check_family(config)
    _check_dtype(dtype)
    c = config
    out = {k: v for k, v in (base or {}).items() if k not in _DERIVED_KEYS}
    rope = {k: v for k, v in (c.rope_scaling or {}).items() if k not in ("rope_type", "type")}
    rope_scaling = {"rope_type": c.rope_type, **rope} if c.rope_scaling else None
    if "max_position_embeddings" not in out:
        longest = rope.get("original_max_position_embeddings", 0) * rope.get("factor", 1)
        out["max_position_embeddings"] = int(max(8192, longest))
    layer_types = list(c.layer_types or ("full_attention",) * c.num_layers)
    out.update(
        architectures=[HF_ARCHITECTURES[c.family]],
        model_type=c.family,
        vocab_size=c.total_vocab if vocab_size is None else vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        # Both RoPE spellings: top-level rope_theta + rope_scaling (transformers 4, released
        # checkpoints) and rope_parameters (transformers 5).
        rope_theta=c.rope_theta,
        rope_scaling=rope_scaling,
        rope_parameters={"rope_type": c.rope_type, "rope_theta": c.rope_theta, **rope},
        tie_word_embeddings=c.tie_embeddings,
        initializer_range=c.initializer_range,
        torch_dtype=dtype,
        dtype=dtype,
    )
    out.setdefault("attention_dropout", 0.0)
    out.setdefault("use_cache", True)
    if c.family == "llama":
        out.update(
            attention_bias=c.attention_bias,
            mlp_bias=c.mlp_bias,
            hidden_act=c.hidden_activation,
        )
    elif c.family == "qwen2":
        sliding = [t == "sliding_attention" for t in layer_types]
        out.update(
            hidden_act=c.hidden_activation,
            use_sliding_window=any(sliding),
            sliding_window=c.sliding_window if any(sliding) else None,
            max_window_layers=sliding.index(True) if any(sliding) else c.num_layers,
            layer_types=layer_types,
        )
    else:  # gemma2
        out.update(
            hidden_activation=c.hidden_activation,
            query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
            attn_logit_softcapping=c.attn_logit_softcapping,
            final_logit_softcapping=c.final_logit_softcapping,
            sliding_window=c.sliding_window or 4096,
            layer_types=layer_types,
        )
    return out


def _generation_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    out = {k: hf_config[k] for k in _TOKEN_ID_KEYS if hf_config.get(k) is not None}
    return {**out, "_from_model_config": True}


# --------------------------------------------------------------------------------------------
# Export: streaming safetensors writer
# --------------------------------------------------------------------------------------------

_ST_NAMES: dict[Any, str] = {np.dtype(v): k for k, v in _DTYPES.items()}


@dataclasses.dataclass
class _Out:
    """One tensor to write: its name, final shape/dtype, and how to produce it (on demand)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Any  # () -> np.ndarray of exactly shape/dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _write_safetensors(path: Path, tensors: list[_Out], write: bool = True) -> None:
    """Writes one safetensors file, producing (and dropping) one tensor at a time.

    The header is computed from the announced shapes first, so no tensor is held while others
    are written. With ``write=False`` the tensors are still produced (multi-process gathers
    need every process) but nothing is written. The file appears atomically (temp + rename).
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    f = open(tmp, "wb") if write else None
    try:
        if f is not None:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
        for t in tensors:
            arr = t.read()
            if tuple(arr.shape) != t.shape or arr.dtype != t.dtype:
                raise ValueError(
                    f"{t.name}: produced {arr.dtype}{list(arr.shape)}, announced "
                    f"{t.dtype}{list(t.shape)}"
                )
            if f is not None:
                f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            del arr
    finally:
        if f is not None:
            f.close()
    if write:
        tmp.replace(path)


def _write_checkpoint(
    out_dir: Path, tensors: list[_Out], max_shard_bytes: int, write: bool = True
) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index when larger."""
    shards: list[list[_Out]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    for name, group in zip(names, shards, strict=True):
        _write_safetensors(out_dir / name, group, write)
    if n > 1 and write:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: name for name, g in zip(names, shards, strict=True) for t in g},
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def _prepare_out_dir(out_dir: str | Path, overwrite: bool, write: bool = True) -> Path:
    """Creates ``out_dir``; a non-empty one needs ``overwrite`` (stale shards are removed)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out_dir}: directory is not empty; pass overwrite=True to write into it"
            )
        if write:
            for stale in [*out_dir.glob("model*.safetensors*"), *out_dir.glob("adapter_model.*")]:
                stale.unlink()
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Export: model -> HF directory
# --------------------------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
    """One array on the host: gathered across processes when not fully addressable."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _lookup(model: nnx.Module, path: tuple[str | int, ...]) -> tuple[Any, str]:
    """``(module, leaf name)`` of an NNX state path, e.g. ``(q_proj module, "kernel")``."""
    obj: Any = model
    for p in path[:-1]:
        try:
            obj = obj[p] if isinstance(p, int) else getattr(obj, p)
        except (AttributeError, IndexError, KeyError, TypeError) as e:
            raise KeyError(f"model has no parameter {'.'.join(map(str, path))}") from e
    return obj, str(path[-1])


def _param_value(module: Any, leaf: str, layer: int | None, merge: bool) -> jax.Array:
    """One parameter (one layer of a stacked one) on device; a LoRA kernel merged if asked."""
    from elmjax.models.lora import LoRALinear

    var = getattr(module, leaf, None)
    if var is None:
        raise KeyError(f"module {type(module).__name__} has no parameter {leaf!r}")
    x = var[...]
    if layer is not None:
        x = x[layer]
    if merge and leaf == "kernel" and isinstance(module, LoRALinear):
        # lora.LoRALinear.merged_kernel's W + scale * A @ B, for this one layer and in float32
        # (not rounded back to a bfloat16 storage dtype before the export's own cast).
        a, b = module.lora_a[...], module.lora_b[...]
        if layer is not None:
            a, b = a[layer], b[layer]
        delta = jax.numpy.matmul(
            a.astype(np.float32), b.astype(np.float32), precision=jax.lax.Precision.HIGHEST
        )
        x = x.astype(np.float32) + module.scale * delta
    return x


def _export_tensors(model: nnx.Module, config: LLMConfig, dtype: Any, merge: bool) -> list[_Out]:
    """The HF tensors of ``model``, each produced on demand (one host copy at a time)."""
    c = config
    outs = []
    for m in param_map(c):
        module, leaf = _lookup(model, m.path)
        var = getattr(module, leaf, None)
        if var is None:
            raise KeyError(f"model has no parameter {'.'.join(map(str, m.path))}")
        shape = tuple(var.shape[1:] if m.layer is not None else var.shape)
        extra = None
        if m.hf_name in ("model.embed_tokens.weight", "lm_head.weight") and c.extra_vocab:
            extra = getattr(module, "extra", None)
            if extra is None:
                raise KeyError(f"config has extra_vocab={c.extra_vocab} but {m.path} has no rows")
            axis = 1 if m.transpose else 0
            shape = tuple(s + (c.extra_vocab if i == axis else 0) for i, s in enumerate(shape))
        if m.transpose:
            shape = shape[::-1]

        def read(module=module, leaf=leaf, extra=extra, m=m):
            # Device work (layer slice, LoRA merge) happens here, one tensor at a time.
            host = _to_host(_param_value(module, leaf, m.layer, merge))
            if extra is not None:  # ExtraVocab rows after the text rows (columns of lm_head)
                host = np.concatenate([host, _to_host(extra[...])], axis=1 if m.transpose else 0)
            if m.transpose:
                host = host.T
            return np.ascontiguousarray(host.astype(dtype))

        outs.append(_Out(m.hf_name, shape, np.dtype(dtype), read))
    return outs


def _copy_tokenizer(tokenizer_dir: str | Path, out_dir: Path) -> list[str]:
    src = Path(tokenizer_dir)
    files = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not files:
        raise FileNotFoundError(
            f"{src}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})"
        )
    for name in files:
        shutil.copyfile(src / name, out_dir / name)
    return files


def export_hf(
    model: nnx.Module,
    config: LLMConfig,
    out_dir: str | Path,
    *,
    merge_lora: bool = True,
    dtype: str = "bfloat16",
    tokenizer_dir: str | Path | None = None,
    hf_config: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Writes ``model`` as a transformers checkpoint directory (see the module docstring).

    Args:
      model: an ``LLM`` (sharded or not, with or without LoRA adapters).
      config: its ``LLMConfig``.
      out_dir: the directory to write (created; must be empty unless ``overwrite``).
      merge_lora: fold each adapter into its kernel (``W + alpha/r * A @ B``); False writes the
        base weights only (pair it with ``export_peft_adapter``).
      dtype: "bfloat16" or "float32" for the saved tensors.
      tokenizer_dir: a tokenizer directory whose files are copied alongside.
      hf_config: the source ``config.json`` (dict) for fields an ``LLMConfig`` does not hold
        (``max_position_embeddings``, ``bos/eos/pad_token_id``).
      overwrite: allow writing into a non-empty directory.
      max_shard_size: bytes per safetensors file before sharding (default 2 GiB).

    Returns:
      ``out_dir`` as a Path. In multi-process runs every process must call it (the gathers are
      collective); only process 0 writes.
    """
    _check_model(model, config)
    np_dtype = _check_dtype(dtype)
    write = jax.process_index() == 0
    out = _prepare_out_dir(out_dir, overwrite, write)
    tensors = _export_tensors(model, config, np_dtype, merge_lora)
    _write_checkpoint(out, tensors, max_shard_size, write)
    if write:
        cfg = to_hf_config(config, dtype=dtype, base=hf_config)
        _write_json(out / "config.json", cfg)
        _write_json(out / "generation_config.json", _generation_config(cfg))
        if tokenizer_dir is not None:
            _copy_tokenizer(tokenizer_dir, out)
    return out


# --------------------------------------------------------------------------------------------
# Export: LoRA adapter in PEFT format
# --------------------------------------------------------------------------------------------


def _lora_modules(model: nnx.Module, config: LLMConfig) -> list[tuple[str, Any, int | None]]:
    """``(HF module name, LoRALinear, layer)`` for every adapter of ``model``."""
    from elmjax.models.lora import LoRALinear, _linears

    found = []
    for m in param_map(config):
        if m.path[-1] != "kernel" or m.hf_name == "lm_head.weight":
            continue
        module, _ = _lookup(model, m.path)
        if isinstance(module, LoRALinear):
            found.append((m.hf_name.removesuffix(".weight"), module, m.layer))
    n_modules = len(_linears(model, LoRALinear))
    mapped = len({id(mod) for _, mod, _ in found})
    if not found:
        raise ValueError("model has no LoRA adapters (models.lora.apply_lora) to export")
    if mapped != n_modules:
        raise ValueError(f"{n_modules - mapped} LoRA module(s) have no HF name in param_map")
    return found


def _most_common(values: list[Any]) -> Any:
    return max(set(values), key=lambda v: (values.count(v), v))


def export_peft_adapter(
    model: nnx.Module,
    config: LLMConfig,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str,
    overwrite: bool = False,
) -> Path:
    """Writes the LoRA adapters (and extra vocabulary rows) as a PEFT adapter directory.

    ``peft.PeftModel.from_pretrained(base, out_dir)`` then computes what the elmjax model
    computes, where ``base`` is the HF checkpoint the LLM was loaded from; with extra
    vocabulary, after ``base.resize_token_embeddings(config.total_vocab)`` (the rows are
    stored as PEFT ``trainable_token_indices`` values, which replace the resized rows).
    Factors are float32. See the module docstring for the tensor names.
    """
    _check_model(model, config)
    write = jax.process_index() == 0
    loras = _lora_modules(model, config)
    out = _prepare_out_dir(out_dir, overwrite, write)
    c = config

    names = [name for name, _, _ in loras]
    ranks = [mod.rank for _, mod, _ in loras]
    alphas = [float(mod.alpha) for _, mod, _ in loras]
    r, alpha = _most_common(ranks), _most_common(alphas)
    rank_pattern = {n: k for n, k in zip(names, ranks, strict=True) if k != r}
    alpha_pattern = {n: a for n, a in zip(names, alphas, strict=True) if a != alpha}
    rates = [float(getattr(mod.dropout, "rate", 0.0) or 0.0) for _, mod, _ in loras]

    # target_modules: a projection name when every layer has it, else the full module names.
    by_proj: dict[str, list[str]] = {}
    for name in names:
        by_proj.setdefault(name.rsplit(".", 1)[1], []).append(name)
    targets: list[str] = []
    for proj, members in sorted(by_proj.items()):
        targets += [proj] if len(members) == c.num_layers else sorted(members)

    tensors: list[_Out] = []
    f32 = np.dtype(np.float32)
    for name, mod, layer in loras:
        for factor, var in (("lora_A", mod.lora_a), ("lora_B", mod.lora_b)):

            def read(var=var, layer=layer):
                value = var[...] if layer is None else var[...][layer]
                return np.ascontiguousarray(_to_host(value).astype(np.float32).T)

            # A [in, r] -> lora_A.weight [r, in]; B [r, out] -> lora_B.weight [out, r].
            shape = tuple(var.shape[1:] if layer is not None else var.shape)[::-1]
            tensors.append(_Out(f"base_model.model.{name}.{factor}.weight", shape, f32, read))

    token_indices = None
    if c.extra_vocab:
        ids = list(range(c.vocab_size, c.total_vocab))
        token_indices = {"embed_tokens": ids}
        rows = [("model.embed_tokens", model.embed_tokens.extra, False)]
        if not c.tie_embeddings:
            token_indices["lm_head"] = ids
            rows.append(("lm_head", model.lm_head.extra, True))
        for hf_module, var, transpose in rows:

            def read(var=var, transpose=transpose):
                x = _to_host(var[...]).astype(np.float32)
                return np.ascontiguousarray(x.T if transpose else x)

            shape = (c.extra_vocab, c.hidden_size)
            name = f"base_model.model.{hf_module}.token_adapter.trainable_tokens_delta"
            tensors.append(_Out(name, shape, f32, read))

    _write_safetensors(out / "adapter_model.safetensors", tensors, write)
    if write:
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": _most_common(rates),
            "target_modules": targets,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "trainable_token_indices": token_indices,
        }
        _write_json(out / "adapter_config.json", adapter_config)
    return out


# --------------------------------------------------------------------------------------------
# GGUF (llama.cpp) -> HF directory
# --------------------------------------------------------------------------------------------

GGUF_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "gemma2")
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 2 has four norms per layer; llama.cpp's ffn_norm is its pre-feedforward norm.
_GGUF_BLOCK_GEMMA2 = {
    **_GGUF_BLOCK,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Metadata arrays not needed here (large: one entry per token / merge).
_GGUF_SKIP_FIELDS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
)


def gguf_hf_name(name: str, arch: str) -> str | None:
    """The HF tensor name of a llama.cpp tensor name (None: not a parameter, e.g. rope_freqs)."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    if name == "rope_freqs.weight":
        return None
    match = _GGUF_BLOCK_RE.fullmatch(name)
    table = _GGUF_BLOCK_GEMMA2 if arch == "gemma2" else _GGUF_BLOCK
    if match is None or match[2] not in table:
        raise KeyError(f"GGUF tensor {name!r} has no HF counterpart for architecture {arch!r}")
    return f"model.layers.{match[1]}.{table[match[2]]}.{match[3]}"


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (``convert_hf_to_gguf.py``'s ``permute``).

    llama.cpp rotates interleaved pairs ``(x[2i], x[2i+1])``; HF Llama rotates halves
    ``(x[i], x[i + d/2])``. The converter therefore reorders each head's rows from
    ``[half0 | half1]`` to interleaved (``reshape(n_head, 2, d/2).swapaxes(1, 2)``); this is the
    inverse (``reshape(n_head, d/2, 2).swapaxes(1, 2)``), as in transformers' GGUF loader.
    ``n_head``: query heads for ``attn_q``, key/value heads for ``attn_k``. Works on weights
    ``[rows, in]`` and biases ``[rows]``.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_metadata(reader: Any) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key in _GGUF_SKIP_FIELDS:
            continue
        out[key] = field.contents()
    return out


def _f32(x: float) -> float:
    """A float32 metadata value as its shortest decimal (GGUF's 9.9999997e-06 -> 1e-05)."""
    return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def _llama3_rope_from_factors(
    factors: np.ndarray, head_dim: int, theta: float, context_length: int
) -> dict[str, Any]:
    """Recovers Llama 3 RoPE scaling from llama.cpp's ``rope_freqs.weight`` (per-frequency factors).

    llama.cpp stores the factor by which each inverse frequency is divided instead of the
    ``rope_scaling`` parameters; this tries the released Llama 3.x settings (and a small grid
    around them) and returns the one that reproduces the factors.
    """
    factors = np.asarray(factors, np.float64)
    factor = float(factors.max())
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * np.pi / inv
    # Released Llama 3.x: original 8192, low 1, high 4. Scaling (old, low, high) by a common
    # factor gives the same frequencies, so the first match is as good as any.
    originals = [8192, max(1, round(context_length / factor))] + [2**k for k in range(4, 21)]
    for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
        for old_len in originals:
            smooth = (old_len / wavelen - low) / (high - low)
            expect = np.where(
                wavelen < old_len / high,
                1.0,
                np.where(wavelen > old_len / low, factor, 1 / ((1 - smooth) / factor + smooth)),
            )
            if np.allclose(expect, factors, rtol=1e-4, atol=1e-5):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": int(old_len),
                }
    raise ValueError(
        "rope_freqs.weight does not match Llama 3 RoPE scaling for any tried setting "
        f"(factor {factor}); this GGUF's RoPE cannot be expressed as an HF rope_scaling"
    )


def _gguf_hf_config(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """A transformers ``config.json`` dict from GGUF metadata (and the tensor list)."""
    arch = meta["general.architecture"]

    def get(key: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise KeyError(f"GGUF metadata has no {full!r}")
        return default

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    n_layers = int(get("block_count"))
    head_dim = get("attention.key_length", None)
    if head_dim is None and arch == "llama":
        head_dim = get("rope.dimension_count", None)
    head_dim = int(head_dim or hidden // heads)
    theta = _f32(get("rope.freq_base", 10000.0))
    ctx = int(get("context_length", 8192))
    # token_embd is [vocab, hidden] in numpy order (GGML lists dimensions innermost first).
    vocab = int(tensors["token_embd.weight"].shape[-1])

    cfg: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": ctx,
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    scaling = get("rope.scaling.type", None)
    if "rope_freqs.weight" in tensors:
        import gguf

        t = tensors["rope_freqs.weight"]
        factors = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        cfg["rope_scaling"] = _llama3_rope_from_factors(factors, head_dim, theta, ctx)
    elif scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": _f32(get("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ValueError(f"GGUF RoPE scaling {scaling!r} is not supported (default/linear/llama3)")
    if arch == "gemma2":
        # llama.cpp scales queries by head_dim ** -0.5, except Gemma 2 27B (46 layers):
        # (hidden / heads) ** -0.5, which is transformers' query_pre_attn_scalar.
        cfg["query_pre_attn_scalar"] = hidden // heads if n_layers == 46 else head_dim
        cfg["attn_logit_softcapping"] = get("attn_logit_softcapping", None)
        cfg["final_logit_softcapping"] = get("final_logit_softcapping", None)
        cfg["sliding_window"] = get("attention.sliding_window", 4096)
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
    for key, name in zip(
        _TOKEN_ID_KEYS, ("bos_token_id", "eos_token_id", "padding_token_id"), strict=True
    ):
        value = meta.get(f"tokenizer.ggml.{name}")
        if value is not None:
            cfg[key] = int(value)
    return cfg


def _gguf_tokenizer(gguf_file: Path) -> Any:
    """transformers' conversion of the GGUF vocabulary (done before any weight is written)."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ImportError("import_gguf(tokenizer=True) needs transformers") from e
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
        )
    except ImportError as e:
        raise ImportError(
            f"{gguf_file}: transformers' GGUF tokenizer conversion needs torch and gguf "
            f"({e}); install them or pass tokenizer=False (--no-tokenizer)"
        ) from e


def _save_tokenizer(tok: Any, out_dir: Path, chat_template: str | None) -> None:
    tok.save_pretrained(str(out_dir))
    if chat_template:
        # transformers 5 writes chat_template.jinja; older readers look in tokenizer_config.json.
        path = out_dir / "tokenizer_config.json"
        tok_config = json.loads(path.read_text())
        tok_config["chat_template"] = chat_template
        _write_json(path, tok_config)
        if not (out_dir / "chat_template.jinja").exists():
            (out_dir / "chat_template.jinja").write_text(chat_template)


def import_gguf(
    gguf_file: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    tokenizer: bool = True,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Converts a llama.cpp GGUF file (Llama / Qwen 2 / Gemma 2) into an HF checkpoint directory.

    Writes ``config.json``, ``model.safetensors`` (dequantised to ``dtype``; sharded like
    ``export_hf``), ``generation_config.json`` and, with ``tokenizer``, the tokenizer
    (``tokenizer.json``, ``tokenizer_config.json`` with the GGUF's chat template,
    ``chat_template.jinja``; converted by transformers, which needs torch for it). Llama Q/K
    rows are un-permuted (``unpermute_rope``), Gemma 2 norms get llama.cpp's ``+1`` removed.
    ``load_hf(out_dir)`` and ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` read
    the result. Returns ``out_dir``.
    """
    import gguf

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    np_dtype = _check_dtype(dtype)
    reader = gguf.GGUFReader(gguf_file)
    meta = _gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{gguf_file}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )
    by_name = {t.name: t for t in reader.tensors}
    raw_config = _gguf_hf_config(meta, by_name)
    config = LLMConfig.from_hf(raw_config)
    n_head, n_kv = config.num_heads, config.num_kv_heads

    outs: list[_Out] = []
    for t in reader.tensors:
        hf_name = gguf_hf_name(t.name, arch)
        if hf_name is None:
            continue
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""

        def read(t=t, shape=shape, kind=kind):
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            w = np.asarray(w, np.float32).reshape(shape)
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                w = unpermute_rope(w, n_head if kind == "attn_q" else n_kv)
            if arch == "gemma2" and t.name.endswith("norm.weight"):
                w = w - 1.0  # llama.cpp stores Gemma's (1 + w)
            return np.ascontiguousarray(w.astype(np_dtype))

        outs.append(_Out(hf_name, shape, np_dtype, read))
    expected = set(hf_to_nnx(config))
    found = {o.name for o in outs}
    if missing := sorted(expected - found):
        raise KeyError(f"{gguf_file}: {len(missing)} tensor(s) missing: {some_names(missing)}")
    if unexpected := sorted(found - expected):
        raise KeyError(
            f"{gguf_file}: {len(unexpected)} unexpected tensor(s): {some_names(unexpected)}"
        )
    outs.sort(key=lambda o: _natural_key(o.name))

    out = _prepare_out_dir(out_dir, overwrite, write=False)  # fail before any work
    tok = _gguf_tokenizer(gguf_file) if tokenizer else None
    out = _prepare_out_dir(out_dir, overwrite)
    _write_checkpoint(out, outs, max_shard_size)
    cfg = to_hf_config(config, dtype=dtype, base=raw_config)
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", _generation_config(cfg))
    if tok is not None:
        _save_tokenizer(tok, out, meta.get("tokenizer.chat_template"))
    return out


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m elmjax.models.hf import-gguf FILE --out DIR [--dtype ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m elmjax.models.hf", description="Hugging Face checkpoint conversions."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "import-gguf",
        help="convert a llama.cpp GGUF file (llama / qwen2 / gemma2) to an HF directory",
    )
    p.add_argument("gguf_file", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--dtype", choices=list(EXPORT_DTYPES), default="float32")
    p.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer conversion")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument(
        "--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_BYTES, help="bytes per file"
    )
    args = parser.parse_args(argv)
    try:
        out = import_gguf(
            args.gguf_file,
            args.out,
            dtype=args.dtype,
            tokenizer=not args.no_tokenizer,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
        )
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
