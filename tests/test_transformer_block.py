"""models.transformer: the shared pre-LN encoder block (masks, activations, remat, LoRA, names).

Parity of whole encoders with transformers is in test_vision.py; here the block's own
contracts: key padding masks, cross-attention against ``torch.nn.MultiheadAttention``, the
activation table against transformers' ``ACT2FN``, remat, LoRA and logical axis names.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.activations import ACT2FN

from elmjax import parallel
from elmjax.models.lora import apply_lora
from elmjax.models.transformer import (
    ACTIVATIONS,
    Encoder,
    EncoderConfig,
    MultiHeadAttention,
    activation,
)


@pytest.fixture(autouse=True)
def _exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


CONFIG = EncoderConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48)
B, T = 2, 7


def inputs(seed: int = 0, shape=(B, T, 32)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def perturbed_encoder(config: EncoderConfig = CONFIG, seed: int = 0) -> Encoder:
    """A fresh encoder with non-trivial biases and LayerNorms."""
    model = Encoder(config, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed + 1)
    state = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(x.dtype), state)
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activations_match_transformers(name):
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    want = ACT2FN[name](torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(activation(name)(jnp.asarray(x))), want, atol=2e-6)


def test_key_padding_mask_is_padding_invariant():
    """Real tokens of a padded row see exactly what they see without the padding."""
    model = perturbed_encoder()
    x = inputs()
    n = 4  # row 1 has 4 real tokens, then 3 padding tokens of garbage
    mask = jnp.arange(T)[None, :] < jnp.asarray([[T], [n]])
    padded = model(x, mask)
    alone = model(x[1:, :n])
    np.testing.assert_allclose(np.asarray(padded[1, :n]), np.asarray(alone[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(padded[0]), np.asarray(model(x[:1])[0]), atol=1e-5)
    # A full [B, T, T] mask built from the key mask gives the same result.
    full = jnp.broadcast_to(mask[:, None, :], (B, T, T))
    np.testing.assert_allclose(np.asarray(model(x, full)), np.asarray(padded), atol=1e-6)
    assert np.isfinite(np.asarray(padded)).all()


def test_cross_attention_matches_torch_multihead_attention():
    """``attn(q, kv=memory, mask)`` is torch's MultiheadAttention with a key padding mask."""
    config = dataclasses.replace(CONFIG, num_heads=2)
    attn = MultiHeadAttention(config, rngs=nnx.Rngs(3))
    state = nnx.state(attn, nnx.Param)
    rng = np.random.default_rng(4)
    nnx.update(attn, jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape), state))
    ref = torch.nn.MultiheadAttention(32, 2, batch_first=True).eval()
    with torch.no_grad():
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        ref.in_proj_weight.copy_(
            torch.tensor(np.concatenate([np.asarray(p.kernel[...]).T for p in qkv]))
        )
        ref.in_proj_bias.copy_(torch.tensor(np.concatenate([np.asarray(p.bias[...]) for p in qkv])))
        ref.out_proj.weight.copy_(torch.tensor(np.asarray(attn.o_proj.kernel[...]).T))
        ref.out_proj.bias.copy_(torch.tensor(np.asarray(attn.o_proj.bias[...])))
    q, kv = inputs(5, (B, 3, 32)), inputs(6, (B, T, 32))
    keep = np.ones((B, T), bool)
    keep[0, 5:] = False
    got = attn(q, jnp.asarray(keep), kv=kv)
    with torch.no_grad():
        want, _ = ref(
            torch.tensor(np.asarray(q)),
            torch.tensor(np.asarray(kv)),
            torch.tensor(np.asarray(kv)),
            key_padding_mask=torch.tensor(~keep),
        )
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)


def test_hidden_states_and_head_dim():
    config = dataclasses.replace(CONFIG, head_dim=16, num_layers=3)  # H * Dh = 64 != D
    model = Encoder(config, rngs=nnx.Rngs(0))
    assert model.layers[0].self_attn.q_proj.kernel[...].shape == (32, 64)
    x = inputs()
    out, hidden = model(x, return_hidden_states=True)
    assert len(hidden) == 4 and all(h.shape == x.shape for h in hidden)
    np.testing.assert_array_equal(np.asarray(hidden[0]), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(hidden[-1]), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(model.layers[0](x)), np.asarray(hidden[1]))


@pytest.mark.parametrize("remat", [True, "dots_saveable"])
def test_remat_changes_nothing(remat):
    x = inputs()

    def loss(model, x):
        return jnp.sum(model(x) ** 2)

    base = perturbed_encoder()
    remat_model = perturbed_encoder(dataclasses.replace(CONFIG, remat=remat))
    l0, g0 = nnx.jit(nnx.value_and_grad(loss))(base, x)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(remat_model, x)
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_lora_wraps_the_encoder_projections():
    model = perturbed_encoder()
    x = inputs()
    before = np.asarray(model(x))
    apply_lora(model, targets=("q_proj", "v_proj", "fc1"), rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    n_lora = len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert n_lora == 2 * 3 * CONFIG.num_layers  # A and B per adapted projection
    np.testing.assert_allclose(np.asarray(model(x)), before, atol=1e-6)  # B = 0 at init


def test_parameters_carry_known_logical_names():
    model = Encoder(CONFIG, rngs=nnx.Rngs(0))
    rules = dict(parallel.LOGICAL_RULES)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var.get_value().ndim, path
        assert all(n is None or n in rules for n in names), (path, names)


def test_bfloat16_and_jit_determinism():
    model = perturbed_encoder(dataclasses.replace(CONFIG, dtype="bfloat16"))
    x = inputs()
    fwd = nnx.jit(lambda m, x: m(x))
    a, b = fwd(model, x), fwd(model, x)
    assert a.dtype == jnp.bfloat16 and np.array_equal(np.asarray(a), np.asarray(b))
    ref = perturbed_encoder()(x)
    err = float(jnp.abs(a.astype(jnp.float32) - ref).max())
    assert err < 0.05 * float(jnp.abs(ref).max()), err


def test_config_errors():
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        EncoderConfig(hidden_size=30, num_heads=4)
    assert EncoderConfig(hidden_size=30, num_heads=4, head_dim=8).attn_dim == 32
    with pytest.raises(ValueError, match="activation 'swish' not supported"):
        EncoderConfig(activation="swish")
    with pytest.raises(ValueError, match="dtype must be one of"):
        EncoderConfig(dtype="float64")
    with pytest.raises(ValueError, match="not in jax.checkpoint_policies"):
        EncoderConfig(remat="nope")
    with pytest.raises(ValueError, match=r"key mask has shape \(2, 5\), expected \(2, 7\)"):
        Encoder(CONFIG, rngs=nnx.Rngs(0))(inputs(), jnp.ones((B, 5), bool))
