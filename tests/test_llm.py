"""The NNX decoder vs transformers (Llama 3, Qwen 2, Gemma 2); KV cache, scan/remat, hf.py."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from tiny_hf import LLAMA3_ROPE, SHAPES, tiny_hf

from elmjax.models import hf
from elmjax.models.llm import LLM, ExtraVocab, LLMConfig


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """float32 matmuls at full precision for the parity checks (scoped to these tests)."""
    with jax.default_matmul_precision("highest"):
        yield


V, T = 256, 16


def hf_model(family: str, seed: int = 0):
    return tiny_hf(family, seed)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family in ("llama", "qwen2", "gemma2"):
        model = hf_model(family)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path, safe_serialization=True)
        out[family] = (path, model)
    return out


def torch_logits(model, tokens, **kwargs) -> np.ndarray:
    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()}
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens)), **kwargs).logits.numpy()


@nnx.jit
def forward(model, tokens, positions, segment_ids):
    return model(tokens, positions=positions, segment_ids=segment_ids)


def tokens_for(seed: int, shape=(2, T), vocab: int = V) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Parity with transformers
# --------------------------------------------------------------------------------------------

# One layout per family: stacked layers and remat are exercised on the way.
LAYOUTS = {
    "llama": dict(),
    "qwen2": dict(scan_layers=True),
    "gemma2": dict(scan_layers=True, remat=True),
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_logits_match_transformers_full_padded_packed(checkpoints, family):
    path, ref = checkpoints[family]
    model, config = hf.load_hf(path, **LAYOUTS[family])
    assert config.family == family
    tokens = tokens_for(1)
    arange = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
    ones = np.ones((2, T), np.int32)

    # 1. Plain batch.
    ours = np.asarray(forward(model, tokens, arange, ones))
    assert ours.dtype == np.float32 and ours.shape == (2, T, V)
    np.testing.assert_allclose(ours, torch_logits(ref, tokens), atol=1e-4, rtol=0)

    # 2. Padding: row 0 left-padded by 5, row 1 right-padded by 3.
    valid = np.ones((2, T), bool)
    valid[0, :5] = False
    valid[1, -3:] = False
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    theirs = torch_logits(
        ref, tokens, attention_mask=valid.astype(np.int64), position_ids=positions
    )
    ours = np.asarray(forward(model, tokens, positions, valid.astype(np.int32)))
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=0)

    # 3. Packed: row 0 holds segments of 6 and 7 tokens then 3 pads; row 1 one of 16.
    segments = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * T], np.int32)
    positions = np.array([list(range(6)) + list(range(7)) + [0] * 3, list(range(T))], np.int32)
    ours = np.asarray(forward(model, tokens, positions, segments))
    for row, seg in [(0, 1), (0, 2), (1, 1)]:
        where = segments[row] == seg
        alone = torch_logits(ref, tokens[row : row + 1, where])[0]
        np.testing.assert_allclose(ours[row, where], alone, atol=1e-4, rtol=0)


def test_embeds_logits_positions_and_hidden(checkpoints):
    """Injected embeddings match transformers' inputs_embeds; logits_positions gathers."""
    path, ref = checkpoints["gemma2"]
    model, _ = hf.load_hf(path)
    tokens = tokens_for(2)
    mask = np.zeros((2, T), bool)
    mask[:, 3:6] = True
    embeds = np.random.default_rng(3).normal(size=(2, T, 64)).astype(np.float32)
    with torch.no_grad():
        inputs = ref.model.embed_tokens(torch.as_tensor(tokens))  # Gemma's sqrt(D) included
        inputs[torch.as_tensor(mask)] = torch.as_tensor(embeds[mask])
        theirs = ref(inputs_embeds=inputs).logits.numpy()
    ours = np.asarray(model(jnp.asarray(tokens), embeds=embeds, embed_mask=mask))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    where = np.array([[0, 7, 15], [2, 2, 9]], np.int32)
    picked = np.asarray(
        model(jnp.asarray(tokens), embeds=embeds, embed_mask=mask, logits_positions=where)
    )
    np.testing.assert_allclose(picked, np.take_along_axis(ours, where[..., None], 1), atol=1e-5)
    hidden = model(jnp.asarray(tokens), embeds=embeds, embed_mask=mask, return_hidden=True)
    assert hidden.shape == (2, T, 64)
    np.testing.assert_allclose(np.asarray(model.logits(hidden)), ours, atol=1e-5)


def test_bf16_sharded_checkpoint_loads(tmp_path):
    """bfloat16 tensors (numpy cannot read them) in a sharded checkpoint with an index."""
    ref16 = hf_model("llama").to(torch.bfloat16)
    ref16.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, _ = hf.load_hf(tmp_path, dtype="float32")
    assert model.embed_tokens.embedding[...].dtype == jnp.float32
    tokens = tokens_for(4)
    ref32 = hf_model("llama")  # bf16-rounded weights in float32 (RoPE buffers left in float32)
    ref32.load_state_dict({k: v.float() for k, v in ref16.state_dict().items()})
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(tokens))), torch_logits(ref32, tokens), atol=1e-4, rtol=0
    )
    half, _ = hf.load_hf(tmp_path, dtype="bfloat16")
    assert half.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    logits16 = np.asarray(half(jnp.asarray(tokens)))
    assert logits16.dtype == np.float32
    np.testing.assert_allclose(logits16, torch_logits(ref32, tokens), atol=0.1, rtol=0)


# --------------------------------------------------------------------------------------------
# KV cache, scan, remat
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,layout", [("gemma2", {}), ("llama", {"scan_layers": True})])
def test_prefill_and_decode_match_full_forward(checkpoints, family, layout):
    """8-token prefill (row 0 left-padded by 3) + 8 one-token steps == one forward of 16."""
    model, _ = hf.load_hf(checkpoints[family][0], **layout)
    tokens = tokens_for(5)
    seg = np.ones((2, T), np.int32)
    seg[0, :3] = 0
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    full = np.asarray(forward(model, tokens, positions, seg))

    @nnx.jit
    def step(model, tokens, positions, segment_ids, cache):
        return model(tokens, positions=positions, segment_ids=segment_ids, cache=cache)

    prompt = 8
    cache = model.init_cache(2, T)
    logits, cache = step(model, tokens[:, :prompt], positions[:, :prompt], seg[:, :prompt], cache)
    got = [np.asarray(logits)]
    for t in range(prompt, T):
        sl = slice(t, t + 1)
        logits, cache = step(model, tokens[:, sl], positions[:, sl], seg[:, sl], cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    assert int(cache.index) == T
    valid = seg.astype(bool)
    np.testing.assert_allclose(got[valid], full[valid], atol=2e-5, rtol=0)


@pytest.mark.parametrize("family,layout", [("gemma2", {}), ("llama", {"scan_layers": True})])
def test_static_cache_index_chunks_match_full_forward(checkpoints, family, layout):
    """A 300-token prompt (row 0 left-padded by 7) prefilled in two chunks with a static
    ``cache_index`` (blocked causal attention over the filled slots only; Gemma 2's sliding
    window and soft-caps included) == one full forward, and fills the same cache as the
    traced-index path."""
    model, _ = hf.load_hf(checkpoints[family][0], **layout)
    n, split, slots = 300, 200, 320
    tokens = tokens_for(8, (2, n))
    seg = np.ones((2, n), np.int32)
    seg[0, :7] = 0
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    full = np.asarray(forward(model, tokens, positions, seg))

    @nnx.jit(static_argnames="cache_index")
    def chunk(model, tokens, positions, segment_ids, cache, cache_index=None):
        return model(
            tokens,
            positions=positions,
            segment_ids=segment_ids,
            cache=cache,
            cache_index=cache_index,
        )

    caches = []
    for static in (True, False):
        cache = model.init_cache(2, slots)
        got = []
        for a, b in ((0, split), (split, n)):
            logits, cache = chunk(
                model,
                tokens[:, a:b],
                positions[:, a:b],
                seg[:, a:b],
                cache,
                cache_index=a if static else None,
            )
            got.append(np.asarray(logits))
        assert int(cache.index) == n
        valid = seg.astype(bool)
        np.testing.assert_allclose(np.concatenate(got, axis=1)[valid], full[valid], atol=3e-5)
        caches.append(cache)
    # The same keys and values in every used slot (padding slots hold unused vectors).
    used = np.asarray(caches[1].segment_ids) != 0
    np.testing.assert_array_equal(np.asarray(caches[0].segment_ids), caches[1].segment_ids)
    for name in ("k", "v"):
        a, b = (np.asarray(getattr(c, name))[:, used] for c in caches)
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="cache_index needs a cache"):
        model(tokens, cache_index=0)


@pytest.mark.parametrize("offset,softcap", [(0, None), (37, 30.0)])
def test_blocked_causal_attention_equals_the_full_product(offset, softcap):
    from elmjax.models.llm import attend

    rng = np.random.default_rng(0)
    b, t, h, kh, d = 2, 70, 4, 2, 8
    s = offset + t + 9  # empty slots after the queries
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s, kh, d)), jnp.float32) for _ in range(2))
    q_slot = offset + np.arange(t)
    mask = np.arange(s)[None, None, :] <= q_slot[None, :, None]
    mask = mask & (rng.random((b, 1, s)) > 0.2)  # padding slots
    mask = jnp.asarray(np.broadcast_to(mask, (b, t, s)))
    want = attend(q, k, v, mask, scale=0.3, softcap=softcap)
    got = attend(q, k, v, mask, scale=0.3, softcap=softcap, causal_offset=offset, block=16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_scan_and_remat_give_identical_logits_and_grads(checkpoints):
    """Same Gemma 2 weights (sliding window, soft-caps, extra rows) in each layout."""
    path = checkpoints["gemma2"][0]
    tokens = jnp.asarray(tokens_for(6, vocab=V + 3))

    def loss(model):
        logits = model(tokens)
        return jnp.mean(logits**2), logits

    results = []
    # (scan_layers, remat, compare gradients too)
    for scan, remat, with_grads in [
        (False, False, True),
        (False, True, False),
        (True, "dots_saveable", True),
    ]:
        model, _ = hf.load_hf(path, extra_vocab=3, scan_layers=scan, remat=remat)
        if with_grads:
            (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
            results.append(
                (np.asarray(logits), np.asarray(grads["embed_tokens"]["embedding"][...]))
            )
        else:
            results.append((np.asarray(nnx.jit(lambda m: m(tokens))(model)), None))
    for logits, g in results[1:]:
        np.testing.assert_allclose(logits, results[0][0], atol=1e-5, rtol=0)
        if g is not None:
            np.testing.assert_allclose(g, results[0][1], atol=1e-7, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Extra vocabulary
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_fresh_model_draws_distinct_extra_rows(tie):
    """A random model's ECG rows are drawn like its base rows, not all at one mean."""
    cfg = LLMConfig(extra_vocab=64, tie_embeddings=tie, initializer_range=0.05)
    model = LLM(cfg, rngs=nnx.Rngs(0))
    tables = [np.asarray(model.embed_tokens.extra[...])]
    if not tie:
        tables.append(np.asarray(model.lm_head.extra[...]).T)
    for rows in tables:
        assert rows.shape == (64, cfg.hidden_size)
        np.testing.assert_allclose(rows.std(axis=0).mean(), 0.05, rtol=0.1)


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # tied, untied
def test_extra_vocab_rows_mean_resized_and_used_by_head(checkpoints, family):
    path, ref = checkpoints[family]
    extra = 5
    model, config = hf.load_hf(path, extra_vocab=extra)
    assert config.total_vocab == V + extra
    table = model.embed_tokens.embedding[...]
    rows = np.asarray(model.embed_tokens.extra[...])
    assert rows.shape == (extra, 64)
    assert isinstance(model.embed_tokens.extra, ExtraVocab)
    # transformers' mean-resizing: N(mean, 1e-9 cov), i.e. the mean row up to tiny noise.
    mean = np.asarray(table).mean(0)
    np.testing.assert_allclose(rows, np.broadcast_to(mean, rows.shape), atol=1e-3)
    assert np.abs(rows - mean).max() > 0 and np.std(rows, axis=0).max() > 0

    tokens = tokens_for(7, vocab=V + extra)
    tokens[:, :4] = V + np.arange(4)  # the first four are extra ids
    logits = np.asarray(model(jnp.asarray(tokens)))
    assert logits.shape == (2, T, V + extra)
    hidden = np.asarray(model(jnp.asarray(tokens), return_hidden=True))
    if config.tie_embeddings:
        head_extra = rows
    else:
        head_extra = np.asarray(model.lm_head.extra[...]).T
        head_old = np.asarray(model.lm_head.kernel[...]).T
        np.testing.assert_allclose(
            head_extra, np.broadcast_to(head_old.mean(0), (extra, 64)), atol=1e-3
        )
    np.testing.assert_allclose(logits[..., V:], hidden @ head_extra.T, atol=1e-4)
    # Rows for text ids are untouched: logits over the text vocabulary match transformers
    # on a text-only batch.
    text = tokens_for(8)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(text)))[..., :V], torch_logits(ref, text), atol=1e-4, rtol=0
    )


# --------------------------------------------------------------------------------------------
# Config and errors
# --------------------------------------------------------------------------------------------


def test_config_from_hf_reads_both_rope_formats_and_gemma_layer_types():
    old = {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True,
    }
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {**old["rope_scaling"], "rope_theta": 500000.0}
    a, b = LLMConfig.from_hf(old), LLMConfig.from_hf(new)
    assert a == b and hash(a) == hash(b)
    assert a.rope_theta == 500000.0 and a.rope_scaling["factor"] == 32.0 and a.head_dim == 64
    assert a.rope_type == "llama3" and a.tie_embeddings and a.sliding_layers == (False,) * 16

    gemma = transformers.Gemma2Config(**{**SHAPES, "num_hidden_layers": 4}, head_dim=16).to_dict()
    g = LLMConfig.from_hf(gemma, scan_layers=True)
    assert g.sliding_layers == (True, False, True, False)  # transformers: even layers slide
    assert g.tie_embeddings and g.hidden_activation == "gelu_pytorch_tanh" and g.scan_layers
    del gemma["layer_types"]  # released Gemma 2 configs have no layer_types
    assert LLMConfig.from_hf(gemma).sliding_layers == g.sliding_layers


def test_load_errors_are_named(tmp_path, checkpoints):
    path, _ = checkpoints["llama"]
    config = json.loads((path / "config.json").read_text())
    weights = safetensors.numpy.load_file(path / "model.safetensors")

    def write(name, cfg, tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        if tensors is not None:
            safetensors.numpy.save_file(tensors, d / "model.safetensors")
        return d

    d = write("no_weights", config, None)
    with pytest.raises(FileNotFoundError, match=r"no_weights.*model\.safetensors"):
        hf.load_hf(d)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_hf(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported model_type 'mistral'.*llama, qwen2, gemma2"):
        hf.load_hf(write("mistral", {**config, "model_type": "mistral"}, weights))
    bad = dict(weights)
    bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((100, 64), np.float32)
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\[100, 64\].*\[128, 64\]"
    ):
        hf.load_hf(write("shape", config, bad))
    fewer = {k: v for k, v in weights.items() if k != "model.layers.0.self_attn.k_proj.weight"}
    with pytest.raises(KeyError, match=r"missing.*model\.layers\.0\.self_attn\.k_proj\.weight"):
        hf.load_hf(write("missing", config, fewer))
    with pytest.raises(KeyError, match=r"unexpected.*model\.layers\.2\.mlp\.up_proj\.weight"):
        more = {**weights, "model.layers.2.mlp.up_proj.weight": np.zeros((128, 64), np.float32)}
        hf.load_hf(write("unexpected", config, more))


def test_param_map_covers_every_parameter(checkpoints):
    for scan in (False, True):
        config = LLMConfig.from_hf(
            json.loads((checkpoints["gemma2"][0] / "config.json").read_text()), scan_layers=scan
        )
        model = nnx.eval_shape(lambda c=config: LLM(c, rngs=nnx.Rngs(0)))
        paths = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        mapped = {m.path for m in hf.param_map(config)}
        assert mapped == paths
        table = hf.hf_to_nnx(config)
        m = table["model.layers.2.self_attn.o_proj.weight"]
        assert m.transpose and (m.layer == 2 if scan else m.path[1] == 2)
