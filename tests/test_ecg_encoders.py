"""models.ecg_encoders: MERL ResNet, ViT-1D, ST-MEM, MTAE, MLAE on tiny configs.

Signals are synthetic 12-lead ECGs (``ecg.synth``) at 100 Hz, 2.56 s (L = 256; patches of
32 samples, so 8 per lead). Each tiny encoder is built once per module; variants that only
change the config (``output``, ``input_norm``) share its parameters via ``replace_config``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from elmjax.ecg import synth
from elmjax.models import ecg_encoders as E
from elmjax.parallel import LOGICAL_RULES

L, B, C = 256, 4, 12
NAMES = tuple(E.ENCODERS)
# Fast to compile: one-block transformers, a two-stage ResNet (the paper sizes are checked on
# abstract models, the Encoder's stacking in test_transformer_block).
DEPTH = {"merl_resnet": 2}


def _signals(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = [
        synth.simulate(synth.sample_params(rng), fs=100, duration=L / 100, rng=seed * 100 + i)[0]
        for i in range(n)
    ]
    return np.stack(out).astype(np.float32)  # [n, 12, L] mV


def _config(name: str, **overrides):
    return E.tiny_config(name, L, depth=DEPTH.get(name, 1), **overrides)


@pytest.fixture(scope="module")
def signals() -> jax.Array:
    return jnp.asarray(_signals(B, 0))


@pytest.fixture(scope="module")
def models() -> dict[str, E.ECGEncoder]:
    return {
        name: E.make_encoder(name, _config(name), rngs=nnx.Rngs(i)) for i, name in enumerate(NAMES)
    }


_forward = nnx.jit(lambda model, x: model(x))
_forward_train = nnx.jit(lambda model, x: model(x, train=True))


# --------------------------------------------------------------------------------------------
# Shapes, outputs, determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_and_determinism(name, models, signals):
    model = models[name]
    tokens_model = E.replace_config(model, output="tokens")  # same parameters
    graphdef, state = nnx.split(model)
    tokens_def = nnx.graphdef(tokens_model)

    @jax.jit
    def extract(state, x):  # plain jax.jit over the split state, as a train step would
        return nnx.merge(graphdef, state).embed(x), nnx.merge(tokens_def, state)(x)

    pooled, tokens = extract(state, signals)
    assert pooled.shape == (B, model.feature_dim) and model.num_tokens == 1
    assert pooled.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(pooled)))
    # Deterministic: no rng anywhere; two calls agree, eager agrees with jit.
    np.testing.assert_array_equal(extract(state, signals)[0], pooled)
    np.testing.assert_allclose(model(signals), pooled, rtol=1e-5, atol=1e-5)
    # A row does not depend on the rest of the batch (eval mode, no masking).
    others = signals.at[1:].set(jnp.asarray(_signals(B - 1, 1)))
    np.testing.assert_allclose(extract(state, others)[0][0], pooled[0], rtol=1e-5, atol=1e-6)

    n = tokens_model.num_tokens
    assert tokens.shape == (B, n, tokens_model.feature_dim)
    expected_n = {
        "merl_resnet": 32,  # 256 -> 128 (stem) -> 64 (pool) -> 64 -> 32 (stage 2)
        "vit1d": L // 32,
        "stmem": C * (L // 32),
        "mtae": L // 32,
        "mlae": C,
    }[name]
    assert n == expected_n
    if name == "merl_resnet":  # pooled = global average of the feature map
        np.testing.assert_allclose(tokens.mean(axis=1), pooled, rtol=1e-4, atol=1e-5)


def test_output_dims_of_paper_configs():
    dims = {}
    for name in NAMES:
        config = E.default_config(name, seq_len=2500)
        tokens = dataclasses.replace(config, output="tokens")
        dims[name] = (config.feature_dim, config.num_tokens, tokens.num_tokens)
    assert dims == {
        "merl_resnet": (2048, 1, 79),  # 2500 -> 1250 -> 625 -> 313 -> 157 -> 79
        "vit1d": (768, 1, 25),
        "stmem": (768, 1, 12 * 25),
        "mtae": (768, 1, 25),
        "mlae": (768, 1, 12),
    }
    assert E.default_config("stmem", 1250).patch_size == 50
    assert E.default_config("mtae", 500).patch_size == 20
    assert E.default_config("stmem", 2500, pool="decoder").feature_dim == 256
    r18 = E.resnet_config(18, seq_len=2500)
    assert (r18.block, r18.layers, r18.feature_dim) == ("basic", (2, 2, 2, 2), 512)
    # ResNet-101, checked on an abstract model (nothing is allocated).
    resnet = nnx.eval_shape(lambda: E.make_encoder("merl_resnet"))
    assert resnet.feature_dim == 2048
    convs = [p for p, _ in nnx.iter_graph(resnet) if p and p[-1] == "conv"]
    assert len(convs) == 1 + 3 * (3 + 4 + 23 + 3) + 4  # stem, 33 bottlenecks, 4 shortcuts
    params = nnx.state(resnet, nnx.Param)
    assert sum(np.prod(v.shape) for v in jax.tree.leaves(params)) > 25e6


def test_logical_axis_names_are_known():
    known = {name for name, _ in LOGICAL_RULES}
    for name in NAMES:
        model = nnx.eval_shape(lambda n=name: E.make_encoder(n, E.tiny_config(n, L)))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            assert names is not None, f"{name}: {path} has no logical names"
            assert len(names) == len(var.shape), (name, path, names)
            assert set(names) - {None} <= known, (name, path, names)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def test_clear_errors(models, signals):
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        E.STMEMConfig(seq_len=250, patch_size=30)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        E.MTAEConfig(seq_len=2500, patch_size=64)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        E.ViT1DConfig(seq_len=1000, patch_size=48)
    with pytest.raises(ValueError, match="leads_per_patch"):
        E.MLAEConfig(num_leads=12, leads_per_patch=5)
    with pytest.raises(ValueError, match="no visible patch"):
        E.num_keep(12, 0.95)
    with pytest.raises(ValueError, match="mask_ratio"):
        E.tiny_config("mtae", L, mask_ratio=1.0)
    with pytest.raises(ValueError, match="depth"):
        E.resnet_config(42)
    with pytest.raises(ValueError, match="not in"):
        E.make_encoder("ecgfm")
    with pytest.raises(TypeError, match="STMEMConfig"):
        E.make_encoder("stmem", E.tiny_config("mtae", L))
    with pytest.raises(ValueError, match="pool"):
        E.tiny_config("stmem", L, pool="cls")  # ST-MEM has no CLS token
    for name in NAMES:
        model = models[name]
        with pytest.raises(ValueError, match="got 8 leads"):
            model(signals[:, :8])
        with pytest.raises(ValueError, match="samples per lead"):
            model(signals[:, :, :200])
    with pytest.raises(ValueError, match="masks no patch"):
        models["stmem"].loss(signals, jax.random.key(0), mask_ratio=0.0)
    with pytest.raises(ValueError, match="change the parameters"):
        E.replace_config(models["vit1d"], patch_size=16)


# --------------------------------------------------------------------------------------------
# Masked autoencoders
# --------------------------------------------------------------------------------------------


_mse = jax.jit(E.masked_mse)


@pytest.mark.parametrize("name", E.MAE_ENCODERS)
def test_mae_masking(name, models, signals):
    # input_norm="none": perturbing a sample cannot change the normalisation of the others.
    model = E.replace_config(models[name], input_norm="none")
    c = model.config
    n, k = c.patches_per_group, E.num_keep(c.patches_per_group, 0.75)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x, key, other_key):
        m = nnx.merge(graphdef, state)
        out = m.reconstruct(x, key)
        loss = m.loss(x, key)
        return (
            out,
            m.signal_mask(out.mask),
            loss,
            E.mae_loss(m, x, key),
            m.reconstruct(x, other_key).mask,
        )

    out, smask, loss, loss2, other = run(state, signals, jax.random.key(1), jax.random.key(2))
    assert out.pred.shape == out.target.shape == (B, c.groups, n, c.patch_dim)
    assert out.mask.shape == (B, c.groups, n) and out.mask.dtype == jnp.bool_
    # The count of masked patches is exact in every group: n - int(n * 0.25).
    np.testing.assert_array_equal(out.mask.sum(-1), n - k)
    smask = np.asarray(smask)  # [B, C, L]
    if name == "stmem":  # per lead, independently
        np.testing.assert_array_equal(smask.sum(-1), (n - k) * c.patch_size)
        assert any(not (smask[b] == smask[b, :1]).all() for b in range(B))
    if name == "mtae":  # the same time patches in all leads
        assert (smask == smask[:, :1]).all()
        np.testing.assert_array_equal(smask[:, 0].sum(-1), (n - k) * c.patch_size)
    if name == "mlae":  # whole leads
        assert (smask.all(-1) | ~smask.any(-1)).all()
        np.testing.assert_array_equal(smask.all(-1).sum(-1), C - int(C * 0.25))
    # The loss is the MSE over the masked patches of this very reconstruction.
    base = float(_mse(out.pred, out.target, out.mask))
    np.testing.assert_allclose([loss, loss2], base, rtol=1e-5)
    # Changing the target of a visible patch leaves it unchanged; of a masked one, not.
    m = np.asarray(out.mask)
    for where, changes in ((np.argwhere(~m)[0], False), (np.argwhere(m)[0], True)):
        new = float(_mse(out.pred, out.target.at[tuple(where)].add(5.0), out.mask))
        assert (new != base) == changes, (where, base, new)
    # Masked samples never reach the encoder: changing them leaves every prediction as is.
    noisy = jnp.where(jnp.asarray(smask), signals + 3.0, signals)
    out2 = run(state, noisy, jax.random.key(1), jax.random.key(2))[0]
    np.testing.assert_array_equal(out2.mask, out.mask)
    np.testing.assert_allclose(out2.pred, out.pred, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out2.target, out.target)
    # Another rng, another mask (the features never take one: see the forward test).
    assert not np.array_equal(other, out.mask)


def test_mae_options(models, signals):
    normed = E.replace_config(models["stmem"], norm_target=True)
    decoder = E.replace_config(models["mtae"], pool="decoder")
    fixed = E.make_encoder("mlae", _config("mlae", pos_embed="sincos"))

    @nnx.jit
    def run(normed, decoder, fixed, x):
        return normed.reconstruct(x, jax.random.key(0)).target, decoder(x), fixed(x)

    target, features, fixed_features = run(normed, decoder, fixed, signals)
    # norm_target: every target patch has mean 0 and (unbiased) std 1 (flat ones: eps).
    np.testing.assert_allclose(target.mean(-1), 0.0, atol=1e-4)
    assert abs(np.median(np.asarray(target).std(-1, ddof=1)) - 1.0) < 1e-2
    # pool="decoder": the reference's vector, the mean of the decoder latents (no masking).
    assert decoder.feature_dim == decoder.config.decoder.hidden_size
    assert features.shape == (B, decoder.feature_dim)
    # pos_embed="sincos": fixed tables, not parameters.
    assert not {"pos_embed", "decoder_pos_embed"} & set(nnx.to_pure_dict(nnx.state(fixed)))
    assert fixed_features.shape == (B, fixed.feature_dim)
    # Learned positions start at the reference's sin-cos table (zero rows for CLS / SEP).
    pos = np.asarray(models["stmem"].pos_embed[...])
    np.testing.assert_allclose(pos[1:-1], E.sincos_table(pos.shape[1], pos.shape[0] - 2))
    assert not pos[0].any() and not pos[-1].any()


def _train(model, loss_fn, batches, lr=3e-3):
    """Adam on ``wrt=nnx.Param``; ``loss_fn(model, *batch) -> (loss, aux)``; the auxes."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, *batch):
        (_, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, *batch)
        optimizer.update(model, grads)
        return aux

    return np.asarray([step(model, optimizer, *b) for b in batches])


# MTAE runs MLAE's code (CLS layout) with another patchify, which the masking test covers.
@pytest.mark.parametrize("name", ["stmem", "mlae"])
def test_mae_loss_decreases(name, models, signals):
    model = nnx.clone(models[name])
    x = jnp.concatenate([signals, jnp.asarray(_signals(4, 1))])
    batches = [(x, jax.random.key(i)) for i in range(30)]  # a new random mask every step
    losses = _train(model, lambda m, x, r: (m.loss(x, r),) * 2, batches)
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.7 * losses[:5].mean(), losses.round(4)


# --------------------------------------------------------------------------------------------
# ResNet: BatchNorm modes, training, parity with the PyTorch reference
# --------------------------------------------------------------------------------------------


def test_batchnorm_train_vs_eval(models, signals):
    model = nnx.clone(models["merl_resnet"])
    stats = lambda m: np.asarray(m.stem.bn.mean[...]).copy()  # noqa: E731
    start = stats(model)
    others = signals.at[1:].set(jnp.asarray(_signals(B - 1, 1)))  # same first row
    evaluated = _forward(model, signals)
    np.testing.assert_array_equal(stats(model), start)  # eval: running averages untouched
    # Eval mode (what embed() uses): a row does not depend on the rest of the batch.
    np.testing.assert_allclose(_forward(model, others)[0], evaluated[0], rtol=1e-5, atol=1e-6)
    trained = _forward_train(model, signals)
    assert not np.allclose(stats(model), start)  # train: running averages move
    assert not np.allclose(trained, evaluated)
    # Train mode normalises with batch statistics: a row depends on the rest of the batch.
    assert not np.allclose(_forward_train(nnx.clone(model), others)[0], trained[0])


def test_resnet_supervised_proxy_decreases(models, signals):
    class Probe(nnx.Module):
        def __init__(self, encoder, rngs):
            self.encoder = encoder
            self.head = nnx.Linear(encoder.feature_dim, 2, rngs=rngs)

    def loss_fn(probe, x, y):
        logits = probe.head(probe.encoder(x, train=True))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, loss

    x = jnp.concatenate([signals, jnp.asarray(_signals(4, 1))])
    y = jnp.arange(8) % 2
    probe = Probe(nnx.clone(models["merl_resnet"]), nnx.Rngs(0))
    start = np.asarray(probe.encoder.stem.bn.var[...]).copy()
    losses = _train(probe, loss_fn, [(x, y)] * 30, lr=1e-2)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert not np.allclose(probe.encoder.stem.bn.var[...], start)  # batch stats carried out


class _TorchBottleneck(torch.nn.Module):
    """The reference's 1-D bottleneck block (MERL / ECG-Bench ``model_utils``)."""

    def __init__(self, c_in, width, stride):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv1d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(width)
        self.conv3 = nn.Conv1d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm1d(4 * width)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != 4 * width:
            self.shortcut = nn.Sequential(
                nn.Conv1d(c_in, 4 * width, 1, stride=stride, bias=False), nn.BatchNorm1d(4 * width)
            )

    def forward(self, x):
        f = torch.nn.functional
        out = f.relu(self.bn1(self.conv1(x)))
        out = f.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return f.relu(out + self.shortcut(x))


class _TorchResNet(torch.nn.Module):
    def __init__(self, config: E.ResNetConfig):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv1d(C, config.stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm1d(config.stem_width)
        self.maxpool = nn.MaxPool1d(kernel_size=3, stride=2, padding=1)
        c_in, stages = config.stem_width, []
        for i, (n, width) in enumerate(zip(config.layers, config.widths, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(_TorchBottleneck(c_in, width, 2 if i > 0 and j == 0 else 1))
                c_in = 4 * width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.stages(x).mean(-1)  # AdaptiveAvgPool1d(1)


def _copy_convbn(ours, conv, bn, gen):
    ours.conv.kernel.set_value(jnp.asarray(conv.weight.detach().numpy().transpose(2, 1, 0)))
    with torch.no_grad():  # non-trivial affine and running statistics
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.2 + (1.0 if t is bn.weight else 0.0))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
    for name, t in (("scale", bn.weight), ("bias", bn.bias)):
        getattr(ours.bn, name).set_value(jnp.asarray(t.detach().numpy()))
    ours.bn.mean.set_value(jnp.asarray(bn.running_mean.numpy()))
    ours.bn.var.set_value(jnp.asarray(bn.running_var.numpy()))


def test_resnet_matches_pytorch_reference(models, signals):
    model = nnx.clone(models["merl_resnet"])
    config = model.config
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ref = _TorchResNet(config)
    _copy_convbn(model.stem, ref.conv1, ref.bn1, gen)
    for stage, ref_stage in zip(model.stages, ref.stages, strict=True):
        for block, ref_block in zip(stage, ref_stage, strict=True):
            for k, convbn in enumerate(block.convs):
                conv, bn = getattr(ref_block, f"conv{k + 1}"), getattr(ref_block, f"bn{k + 1}")
                _copy_convbn(convbn, conv, bn, gen)
            if block.shortcut is not None:
                _copy_convbn(block.shortcut, ref_block.shortcut[0], ref_block.shortcut[1], gen)
    x = E.normalize_signals(signals, config.input_norm)  # the reference's [0, 1] input
    tx = torch.from_numpy(np.array(x))
    with jax.default_matmul_precision("highest"):
        ref.eval()
        with torch.no_grad():
            expected = ref(tx).numpy()
        np.testing.assert_allclose(_forward(model, signals), expected, rtol=1e-4, atol=1e-4)
        ref.train()
        with torch.no_grad():
            expected = ref(tx).numpy()
        trained = _forward_train(model, signals)
        np.testing.assert_allclose(trained, expected, rtol=1e-3, atol=1e-3)
    # Running means follow torch's momentum convention (0.1); variances differ by n / (n - 1).
    np.testing.assert_allclose(model.stem.bn.mean[...], ref.bn1.running_mean, rtol=1e-4, atol=1e-5)


def test_tiny_configs_take_shapes_from_arguments():
    for name in NAMES:
        config = E.tiny_config(name, seq_len=500, num_leads=12)
        assert config.seq_len == 500
    assert E.tiny_config("stmem", 500).patch_size == 20  # 500 % 8 != 0 -> default_patch_size
    config = E.tiny_config("stmem", 1000, num_leads=3, patch_size=50)
    assert (config.groups, config.patches_per_group, config.patch_dim) == (3, 20, 50)
    assert dataclasses.replace(config, output="tokens").num_tokens == 60
    mlae = E.tiny_config("mlae", 1000, leads_per_patch=3)
    assert (mlae.patches_per_group, mlae.patch_dim, mlae.num_tokens) == (4, 3000, 1)
