"""LoRA adapters: PEFT init and parity, merge, dropout, and which parameters a train step moves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx

from elmjax.models import hf
from elmjax.models.llm import LLM, ExtraVocab, LLMConfig
from elmjax.models.lora import (
    ALL_TARGETS,
    LoRALinear,
    apply_lora,
    keep_mask,
    lora_delta,
    lora_state,
    merge_lora,
    trainable_filter,
)


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """float32 matmuls at full precision for the parity checks (scoped to these tests)."""
    with jax.default_matmul_precision("highest"):
        yield


CONFIG = LLMConfig(extra_vocab=3)  # tiny Llama-style: hidden 64, 2 layers, vocab 256 + 3
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 12)), jnp.int32)


@nnx.jit
def logits(model, tokens=TOKENS):
    return model(tokens)


def lora_model(scan: bool = False, targets=ALL_TARGETS, dropout: float = 0.0) -> LLM:
    model = LLM(CONFIG.__class__(**{**CONFIG.__dict__, "scan_layers": scan}), rngs=nnx.Rngs(0))
    return apply_lora(model, targets, rank=4, alpha=8.0, dropout=dropout, rngs=nnx.Rngs(1))


def perturb_b(model: LLM, seed: int = 2) -> None:
    """Makes every B factor nonzero (a fresh adapter is an exact no-op)."""
    state = nnx.state(model, nnx.LoRAParam)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), state)
    nnx.update(model, state)


@pytest.mark.parametrize("scan", [False, True])
def test_fresh_adapter_is_a_no_op_and_merge_is_exact(scan):
    base = LLM(CONFIG.__class__(**{**CONFIG.__dict__, "scan_layers": scan}), rngs=nnx.Rngs(0))
    before = np.asarray(logits(base))
    model = lora_model(scan)
    np.testing.assert_allclose(np.asarray(logits(model)), before, atol=1e-6, rtol=0)

    # PEFT init: A ~ U(+-1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), B = 0, scale = alpha/rank.
    q = model.layers.self_attn.q_proj if scan else model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.scale == 2.0
    a = np.asarray(q.lora_a[...])
    assert a.shape == ((2, 64, 4) if scan else (64, 4))
    assert np.abs(a).max() <= 1 / 8 and np.abs(a).max() > 0.9 / 8 and a.std() > 0.05
    assert not np.asarray(q.lora_b[...]).any()
    assert len(jax.tree.leaves(lora_state(model))) == (14 if scan else 28)

    perturb_b(model)
    adapted = np.asarray(logits(model))
    assert np.abs(adapted - before).max() > 1e-2
    merged = merge_lora(model)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    assert isinstance(model.layers, nnx.Module)  # the original keeps its adapters
    assert jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    np.testing.assert_allclose(np.asarray(logits(merged)), adapted, atol=1e-5, rtol=0)


def test_targets_select_layers():
    model = lora_model(targets=("q_proj", "v_proj"))
    attn = model.layers[1].self_attn
    assert isinstance(attn.q_proj, LoRALinear) and isinstance(attn.v_proj, LoRALinear)
    assert not isinstance(attn.k_proj, LoRALinear)
    assert not isinstance(model.layers[1].mlp.up_proj, LoRALinear)
    only_first = lora_model(targets=("layers.0.mlp.*",))
    assert isinstance(only_first.layers[0].mlp.down_proj, LoRALinear)
    assert not isinstance(only_first.layers[1].mlp.down_proj, LoRALinear)
    with pytest.raises(ValueError, match="no linear layer matches"):
        lora_model(targets=("qproj",))


def test_dropout_only_in_training_mode():
    model = lora_model(dropout=0.5)
    perturb_b(model)
    eval_out = np.asarray(logits(model))
    np.testing.assert_array_equal(np.asarray(logits(model)), eval_out)
    model.train()
    a, b = np.asarray(logits(model)), np.asarray(logits(model))
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - eval_out).max() > 1e-3
    model.eval()
    np.testing.assert_array_equal(np.asarray(logits(model)), eval_out)
    stacked = lora_model(scan=True, dropout=0.5)  # one RNG stream per stacked layer
    perturb_b(stacked)
    stacked.train()
    assert np.abs(np.asarray(logits(stacked)) - np.asarray(logits(stacked))).max() > 1e-3


def test_keep_mask_rate_independence_and_determinism():
    seed = jnp.asarray([12345, 678], jnp.uint32)
    mask = np.asarray(keep_mask(seed, (8, 256, 512), 0.05))
    n = mask.size
    drop = 1.0 - mask.mean()
    assert abs(drop - 0.05) < 4 * np.sqrt(0.05 * 0.95 / n)  # within 4 sigma of the rate
    np.testing.assert_array_equal(np.asarray(keep_mask(seed, (8, 256, 512), 0.05)), mask)
    # Neighbours along every axis, and another seed, are uncorrelated with this mask.
    m = mask.astype(np.float64) - mask.mean()
    for other in (
        m[:, :, 1:] * m[:, :, :-1],
        m[:, 1:] * m[:, :-1],
        m[1:] * m[:-1],
        m * (np.asarray(keep_mask(seed + 1, mask.shape, 0.05)) - mask.mean()),
    ):
        assert abs(other.mean() / m.var()) < 0.01
    half = np.asarray(keep_mask(seed, (1000, 1000), 0.5))
    assert abs(half.mean() - 0.5) < 0.002
    assert np.asarray(keep_mask(seed, (64, 64), 0.0)).all()
    assert not np.asarray(keep_mask(seed, (64, 64), 1.0)).any()


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_lora_delta_backward_equals_autodiff(rate):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
    seed = jnp.asarray([7, 9], jnp.uint32) if rate else None

    def reference(x, a, b):  # the same mask, plain autodiff
        h = x
        if rate:
            h = jnp.where(keep_mask(seed, x.shape, rate), x / (1 - rate), 0.0)
        return 2.0 * (h @ a @ b)

    def ours(x, a, b):
        return lora_delta(x, a, b, seed, rate, 2.0)

    np.testing.assert_allclose(ours(x, a, b), reference(x, a, b), rtol=1e-6, atol=1e-6)
    want = jax.vjp(reference, x, a, b)[1](g)
    got = jax.vjp(ours, x, a, b)[1](g)
    for w, o in zip(want, got, strict=True):
        np.testing.assert_allclose(o, w, rtol=1e-5, atol=1e-5)
    if rate:  # dropped inputs get exactly zero gradient
        dropped = ~np.asarray(keep_mask(seed, x.shape, rate))
        assert dropped.any() and (np.asarray(got[0])[dropped] == 0).all()


def _flat(state) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_train_step_moves_only_adapters_and_chosen_extra_rows():
    model = lora_model(scan=True)
    perturb_b(model)
    # Frozen extra rows (the paper's setting): the filter selects the adapters only.
    frozen = nnx.to_flat_state(nnx.state(model, trainable_filter(False)))
    assert frozen and all(path[-1] in ("lora_a", "lora_b") for path, _ in frozen)
    # Trainable extra rows: one step moves the adapters and the extra rows, nothing else.
    wrt = trainable_filter(True)
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=wrt)
    targets = jnp.roll(TOKENS, -1, axis=1)

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            out = model(TOKENS)
            return optax.softmax_cross_entropy_with_integer_labels(out, targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, grads)
        return loss

    before = _flat(nnx.state(model, nnx.Param))
    opt_size = sum(x.size for x in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if x.ndim)
    trainable_size = sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))
    assert opt_size == 2 * trainable_size  # Adam's mu and nu, for the trainable leaves only
    step(model, opt)
    after = _flat(nnx.state(model, nnx.Param))
    extra = {p for p, _ in nnx.to_flat_state(nnx.state(model, ExtraVocab))}
    assert len(extra) == 2  # untied: embedding rows and head columns
    for path, value in before.items():
        moved = not np.array_equal(value, after[path])
        is_lora = path[-1] in ("lora_a", "lora_b")
        expect = is_lora or path in extra
        assert moved == expect, path


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_matches_peft(tmp_path):
    """Our adapters with PEFT's A and B give PEFT's logits (all seven targets, stacked layers)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cfg._attn_implementation = "eager"
    base = transformers.LlamaForCausalLM(cfg).eval()
    base.save_pretrained(tmp_path, safe_serialization=True)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(ALL_TARGETS))
    ref = peft.get_peft_model(base, lcfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model, _ = hf.load_hf(tmp_path, scan_layers=True)
    apply_lora(model, ALL_TARGETS, rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(0))
    for path, parent in nnx.iter_modules(model):
        if not isinstance(parent, LoRALinear):
            continue
        block, proj = path[-2], path[-1]
        a = [
            ref.base_model.model.model.layers[i].get_submodule(f"{block}.{proj}") for i in range(2)
        ]
        parent.lora_a[...] = jnp.stack([m.lora_A["default"].weight.detach().numpy().T for m in a])
        parent.lora_b[...] = jnp.stack([m.lora_B["default"].weight.detach().numpy().T for m in a])
    tokens = np.random.default_rng(1).integers(0, 256, (2, 12))
    with torch.no_grad():
        theirs = ref(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), theirs, atol=1e-4, rtol=0)
