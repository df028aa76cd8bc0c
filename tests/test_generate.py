"""Batched generation (elmjax.generate) vs transformers' greedy generate; stops, sampling,
injected embeddings, LoRA, compilation caching."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_hf import tiny_hf

from elmjax import generate as gen
from elmjax import parallel
from elmjax.generate import Sampling, generate, sample_logits
from elmjax.models import hf, lora


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """float32 matmuls at full precision, so that argmax ties cannot flip between paths."""
    with jax.default_matmul_precision("highest"):
        yield


V = 256
PAD = 0
N = 12  # max_new_tokens
# Three rows of different lengths: batch bucket 4 (one dummy row), prompt bucket 16.
LENGTHS = (5, 11, 3)
LAYOUTS = {"llama": dict(), "qwen2": dict(scan_layers=True), "gemma2": dict(scan_layers=True)}


def _hf_model(family: str):
    # larger random weights: more varied continuations
    return tiny_hf(family, noise=0.1)


@functools.cache
def _checkpoint(family: str, root: str):
    model = _hf_model(family)
    path = f"{root}/{family}"
    model.save_pretrained(path, safe_serialization=True)
    return path, model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    return lambda family: _checkpoint(family, root)


@pytest.fixture(scope="module")
def llama(checkpoint):
    path, ref = checkpoint("llama")
    model, _ = hf.load_hf(path)
    return model, ref


def prompts_for(seed: int, lengths=LENGTHS) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, V, n).tolist() for n in lengths]


def hf_greedy(ref, prompt, stop_ids, n=N) -> list[int]:
    """transformers' greedy generate on one unpadded row; the ids after the prompt."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = ref.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=list(stop_ids),
            pad_token_id=PAD,
        )
    return out[0, len(prompt) :].tolist()


def rows(g) -> list[list[int]]:
    """Each row's generated ids up to its length (the padding checked on the way)."""
    tokens, lengths = np.asarray(g.tokens), np.asarray(g.lengths)
    for t, n in zip(tokens, lengths, strict=True):
        assert (t[n:] == PAD).all()
    return [t[:n].tolist() for t, n in zip(tokens, lengths, strict=True)]


# --------------------------------------------------------------------------------------------
# Parity with transformers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_greedy_matches_transformers_per_row_with_stop_ids(checkpoint, family):
    path, ref = checkpoint(family)
    model, _ = hf.load_hf(path, **LAYOUTS[family])
    prompts = prompts_for(1)
    # Stop ids the model really emits: row 0's 3rd and row 1's 6th greedy id (without stops);
    # transformers decides below whether they are right.
    free = rows(generate(model, prompts, max_new_tokens=N, stop_ids=[V + 1], pad_id=PAD))
    stop_ids = {free[0][2], free[1][5]}
    g = generate(model, prompts, max_new_tokens=N, stop_ids=sorted(stop_ids), pad_id=PAD)
    assert g.tokens.shape == (3, N) and g.tokens.dtype == jnp.int32
    got = rows(g)
    for i, prompt in enumerate(prompts):
        want = hf_greedy(ref, prompt, stop_ids)
        assert got[i] == want, (family, i)
        assert bool(g.stopped[i]) == (want[-1] in stop_ids)
    assert g.stopped[0] and g.stopped[1] and int(g.lengths[0]) <= 3 and int(g.lengths[1]) <= 6


def test_stop_only_on_rows_that_emit_a_stop_id(llama):
    model, ref = llama
    prompts = prompts_for(2)
    free = [hf_greedy(ref, p, [V + 1]) for p in prompts]
    # Row 1 stops at its 4th id; rows 0 and 2 stop only if they emit that id too.
    stop = free[1][3]
    g = generate(model, prompts, max_new_tokens=N, stop_ids=[stop, V + 5], pad_id=PAD)
    got = rows(g)
    for i in range(3):
        cut = free[i].index(stop) + 1 if stop in free[i] else N
        assert got[i] == free[i][:cut]
        assert bool(g.stopped[i]) == (stop in free[i])
    assert int(g.lengths[1]) <= 4
    # Each row's first id is a stop id: one id per row, then padding (the loop ends at once).
    firsts = [f[0] for f in free]
    g = generate(model, prompts, max_new_tokens=N, stop_ids=firsts, pad_id=PAD)
    assert np.asarray(g.lengths).tolist() == [1, 1, 1] and bool(np.all(g.stopped))
    assert np.asarray(g.tokens)[:, 0].tolist() == firsts


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_sampling_is_seeded_and_degenerates_to_greedy(llama):
    model, _ = llama
    prompts = prompts_for(3)
    kw = dict(max_new_tokens=N, stop_ids=[V + 1], pad_id=PAD)
    greedy = np.asarray(generate(model, prompts, **kw).tokens)
    hot = Sampling(temperature=1.0, top_p=0.95, top_k=50)
    a = np.asarray(generate(model, prompts, sampling=hot, seed=7, **kw).tokens)
    b = np.asarray(generate(model, prompts, sampling=hot, seed=7, **kw).tokens)
    c = np.asarray(generate(model, prompts, sampling=hot, seed=8, **kw).tokens)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    # temperature -> 0, top_p -> 0 (same compiled loop as `hot`: only traced values differ)
    # and top_k = 1 all reduce to the argmax.
    for s in (
        Sampling(temperature=1e-6, top_p=0.95, top_k=50),
        Sampling(temperature=2.0, top_p=1e-6, top_k=50),
        Sampling(temperature=1.0, top_k=1),
    ):
        out = generate(model, prompts, sampling=s, seed=5, **kw).tokens
        np.testing.assert_array_equal(np.asarray(out), greedy, err_msg=str(s))


def test_sample_logits_top_k_top_p_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    logits = jnp.asarray(np.log(probs)[None].repeat(4000, 0))
    key = jax.random.key(0)

    @functools.partial(jax.jit, static_argnames=("top_k", "use_top_p"))
    def draw(logits, key, temperature=1.0, top_p=1.0, *, top_k=0, use_top_p=False):
        return sample_logits(
            logits,
            key,
            greedy=False,
            top_k=top_k,
            use_top_p=use_top_p,
            temperature=temperature,
            top_p=top_p,
        )

    def freq(**kw):
        ids = draw(logits, key, **kw)
        return np.bincount(np.asarray(ids), minlength=4) / len(ids)

    np.testing.assert_allclose(freq(), probs, atol=0.03)
    np.testing.assert_allclose(freq(top_k=2), [0.625, 0.375, 0, 0], atol=0.03)
    np.testing.assert_allclose(freq(use_top_p=True, top_p=0.7), [0.625, 0.375, 0, 0], atol=0.03)
    np.testing.assert_allclose(
        freq(use_top_p=True, top_p=0.85), np.r_[probs[:3] / 0.95, 0], atol=0.03
    )
    flat = freq(temperature=1e3)  # a high temperature flattens the distribution
    np.testing.assert_allclose(flat, 0.25, atol=0.03)
    ids = sample_logits(logits, key, greedy=True)
    assert (np.asarray(ids) == 0).all()


# --------------------------------------------------------------------------------------------
# Injected embeddings, LoRA, array prompts
# --------------------------------------------------------------------------------------------


def test_injected_token_embeddings_equal_token_prompt(llama):
    model, _ = llama
    prompts = prompts_for(4)
    width = max(LENGTHS)
    tokens = np.full((3, width + 3), PAD, np.int32)  # right-padded array + lengths
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    kw = dict(max_new_tokens=N, stop_ids=[V + 1], pad_id=PAD)
    want = np.asarray(generate(model, prompts, **kw).tokens)
    same = generate(model, jnp.asarray(tokens), lengths=LENGTHS, **kw)
    np.testing.assert_array_equal(np.asarray(same.tokens), want)

    embeds = model.embed_tokens(jnp.asarray(tokens))  # what the ids would look up
    mask = np.zeros(tokens.shape, bool)
    mask[:, 1:4] = True  # some prompt positions (and some padding) come from embeds
    garbage = np.where(np.arange(width + 3)[None, :] < 5, 7, 9).astype(np.int32)
    swapped = np.where(mask, garbage, tokens)  # ids under the mask must not matter
    got = generate(model, swapped, lengths=LENGTHS, embeds=embeds, embed_mask=mask, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), want)
    # Other vectors there do change the output.
    other = generate(model, swapped, lengths=LENGTHS, embeds=embeds * 0, embed_mask=mask, **kw)
    assert (np.asarray(other.tokens) != want).any()


def test_lora_model_generates_like_its_merged_model(checkpoint):
    path, ref = checkpoint("llama")
    model, _ = hf.load_hf(path)
    lora.apply_lora(model, rank=4, alpha=8.0, dropout=0.5, rngs=nnx.Rngs(0))
    key = jax.random.key(1)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, lora.LoRALinear):
            key, sub = jax.random.split(key)
            module.lora_b[...] = 0.2 * jax.random.normal(sub, module.lora_b[...].shape)
    model.train()  # dropout on: generate must switch it off (without touching the model)
    merged = lora.merge_lora(model)
    prompts = prompts_for(5)
    kw = dict(max_new_tokens=N, stop_ids=[V + 1], pad_id=PAD)
    got = generate(model, prompts, **kw)
    np.testing.assert_array_equal(
        np.asarray(got.tokens), np.asarray(generate(merged, prompts, **kw).tokens)
    )
    assert model.layers[0].self_attn.q_proj.dropout.deterministic is False
    # The adapters matter: the base model continues differently.
    assert rows(got) != [hf_greedy(ref, p, [V + 1]) for p in prompts]


# --------------------------------------------------------------------------------------------
# Compilation caching, mesh, errors
# --------------------------------------------------------------------------------------------


def test_decode_loop_compiles_once_per_bucket(llama):
    model, _ = llama
    kw = dict(max_new_tokens=N, stop_ids=[V + 1], pad_id=PAD)
    first = generate(model, prompts_for(6, (5, 11, 3)), **kw)  # batch bucket 4, prompts 16
    traces = dict(gen.TRACE_COUNTS)
    assert traces["decode"] >= 1 and traces["prefill"] >= 1
    # Same buckets, other lengths / batch size / stop ids / pad id / seed: no new trace.
    generate(model, prompts_for(7, (9, 2, 16, 13)), max_new_tokens=N, stop_ids=[3], pad_id=1)
    generate(model, prompts_for(8, (12,) * 3), sampling=Sampling(), seed=3, **kw)
    assert dict(gen.TRACE_COUNTS) == traces
    # A fixed max_len keeps the decode loop's shapes across prompt buckets (16 -> 32).
    kw = dict(max_new_tokens=N, stop_ids=[V + 1], pad_id=PAD, max_len=48)
    got = generate(model, prompts_for(6, (5, 11, 3)), **kw)
    before = dict(gen.TRACE_COUNTS)
    generate(model, prompts_for(11, (30, 20, 1)), **kw)
    assert gen.TRACE_COUNTS["decode"] == before["decode"]
    assert gen.TRACE_COUNTS["prefill"] == before["prefill"] + 1
    # More (empty) cache slots change nothing.
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(first.tokens))


def test_mesh_path_gives_the_same_tokens(llama):
    model, _ = llama
    prompts = prompts_for(13)
    kw = dict(max_new_tokens=N, stop_ids=[V + 1], pad_id=PAD)
    want = np.asarray(generate(model, prompts, **kw).tokens)
    mesh = parallel.make_mesh()
    got = generate(model, prompts, mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), want)


def test_bucket_and_argument_errors(llama):
    assert [gen.bucket(n, 8) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 32]
    assert [gen.bucket(n) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]
    model, _ = llama
    kw = dict(max_new_tokens=4, stop_ids=[1], pad_id=PAD)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], **kw)
    with pytest.raises(ValueError, match="needs lengths"):
        generate(model, np.ones((2, 3), np.int32), **kw)
    with pytest.raises(ValueError, match="max_len"):
        generate(model, [[1] * 10], max_len=12, **kw)
    with pytest.raises(ValueError, match="stop_ids"):
        generate(model, [[1]], max_new_tokens=4, stop_ids=[], pad_id=PAD)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


# --------------------------------------------------------------------------------------------
# Shared prefixes, length buckets, blocked causal attention
# --------------------------------------------------------------------------------------------


def shared_prompts(seed: int, heads=(40, 25, 60), members=3) -> tuple[list[list[int]], list[int]]:
    """``members`` prompts per head (a shared prefix, then 1-8 ids of their own), one label per
    head, plus a short prompt that is a strict prefix of head 0."""
    rng = np.random.default_rng(seed)
    prompts, labels = [], []
    for g, n in enumerate(heads):
        head = rng.integers(1, V, n).tolist()
        for _ in range(members):
            prompts.append(head + rng.integers(1, V, rng.integers(1, 9)).tolist())
            labels.append(g)
        if g == 0:
            prompts.append(head[:10])
            labels.append(0)
    return prompts, labels


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_shared_prefix_prefill_matches_the_plain_one_and_transformers(checkpoint, family):
    path, ref = checkpoint(family)
    model, _ = hf.load_hf(path, **LAYOUTS[family])
    prompts, labels = shared_prompts(20)
    kw = dict(max_new_tokens=N, stop_ids=[V + 1], pad_id=PAD)
    plain = generate(model, prompts, **kw)
    before = gen.TRACE_COUNTS["prefill_shared"]
    shared = generate(model, prompts, groups=labels, **kw)
    assert gen.TRACE_COUNTS["prefill_shared"] == before + 1  # the shared path ran
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(plain.tokens))
    got = rows(shared)
    for i in (0, 3, 6, 9):  # a member of each group and the short prompt
        assert got[i] == hf_greedy(ref, prompts[i], [V + 1]), (family, i)
    # Labels only allow sharing: rows that share no ids compute the same.
    mixed = generate(model, prompts, groups=[0] * len(prompts), **kw)
    np.testing.assert_array_equal(np.asarray(mixed.tokens), np.asarray(plain.tokens))


def test_shared_prefix_with_embeds_and_sampling(llama):
    model, _ = llama
    prompts, labels = shared_prompts(21)
    lengths = [len(p) for p in prompts]
    tokens = np.zeros((len(prompts), max(lengths)), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    embeds = model.embed_tokens(jnp.asarray(tokens)) * 1.5  # not what the ids look up
    mask = np.zeros(tokens.shape, bool)
    mask[:, 2:6] = True  # inside every shared prefix
    mask[np.arange(len(prompts)), np.asarray(lengths) - 1] = True  # each row's own last id
    kw = dict(lengths=lengths, embeds=embeds, embed_mask=mask, max_new_tokens=N, pad_id=PAD)
    kw |= dict(stop_ids=[V + 1], sampling=Sampling(temperature=1.0, top_k=20), seed=5)
    plain = generate(model, tokens, **kw)
    shared = generate(model, tokens, groups=labels, **kw)
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(plain.tokens))
    no_embeds = generate(model, tokens, groups=labels, **(kw | dict(embeds=None, embed_mask=None)))
    assert (np.asarray(no_embeds.tokens) != np.asarray(plain.tokens)).any()


def test_share_plan_prefixes_and_when_it_declines():
    tokens = np.array(
        [
            [1, 2, 3, 4, 5, 6, 0, 0],
            [1, 2, 3, 4, 9, 9, 9, 9],
            [1, 2, 3, 0, 0, 0, 0, 0],  # a prefix of the others: keeps its last id
            [7, 7, 7, 7, 7, 7, 7, 7],
        ],
        np.int32,
    )
    lengths = np.array([6, 8, 3, 8], np.int32)
    plan = gen.share_plan(tokens, lengths, ["a", "a", "a", "b"], rows=4, width=64)
    assert plan.prefix_lengths.tolist() == [2, 7]  # group a: 1 2 | 3 ...; group b alone: all but 1
    assert plan.first.tolist() == [0, 3] and plan.group.tolist() == [0, 0, 0, 1]
    assert (plan.prefix_width, plan.suffix_width) == (8, 8)
    # Padded to the row bucket and to a multiple of the batch shards.
    plan = gen.share_plan(tokens, lengths, [0, 0, 0, 1], rows=8, width=64, shards=4)
    assert plan.first.tolist() == [0, 3, 0, 0] and plan.prefix_lengths.tolist() == [2, 7, 0, 0]
    assert plan.group.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    # Every row alone, or no saving over the plain prefill: None.
    assert gen.share_plan(tokens, lengths, [0, 1, 2, 3], rows=4, width=8) is None
    assert gen.share_plan(tokens, lengths, [0, 0, 0, 1], rows=4, width=8) is None
    with pytest.raises(ValueError, match="3 group labels for 4 prompts"):
        gen.share_plan(tokens, lengths, [0, 0, 1], rows=4, width=8)


def test_bucket_rows_and_bucket_len_steps():
    assert [gen.bucket_rows(n) for n in (1, 3, 8, 9, 12, 13, 17, 25, 33)] == [
        1,
        4,
        8,
        12,
        12,
        16,
        24,
        32,
        48,
    ]
    assert [gen.bucket_len(n) for n in (1, 8, 9, 17, 32)] == [8, 8, 16, 32, 32]
    assert [gen.bucket_len(n) for n in (33, 41, 64, 65, 129, 200, 257, 300, 512)] == [
        40,
        48,
        64,
        80,
        160,
        224,
        320,
        320,
        512,
    ]
    assert gen.bucket_len(1025) == 1280 and gen.bucket_len(3, minimum=1) == 4
    n = np.arange(33, 5000)
    waste = np.array([gen.bucket_len(int(k)) for k in n]) / n - 1
    assert waste.max() <= 0.25 and waste.min() == 0.0
