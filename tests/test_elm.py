"""models.elm and models.projector: ECG vectors land on their own sample's placeholders only.

Tiny LLM (``models.llm``), a tiny signal encoder defined here (``[B, 12, L]`` -> pooled or
``N`` tokens) and a tiny ViT (``models.vision``, fed uint8 printouts through ``ImageEncoder``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from elmjax.models import elm as elm_lib
from elmjax.models import vision
from elmjax.models.elm import (
    ELM,
    ImageEncoder,
    answer_loss,
    check_placeholders,
    scatter_placeholders,
    trainable_filter,
)
from elmjax.models.llm import LLM, ExtraVocab, LLMConfig
from elmjax.models.lora import apply_lora
from elmjax.models.projector import Projector, ProjectorConfig
from elmjax.models.transformer import EncoderConfig

REPO = Path(__file__).resolve().parents[1]
PH = 5  # placeholder id
T = 16
L = 32  # signal samples
D_ENC = 24
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


class TinySignalEncoder(nnx.Module):
    """``[B, 12, L]`` -> ``n`` time patches -> Linear + tanh -> ``[B, n, D_ENC]`` (or the mean)."""

    def __init__(self, n: int, pooled: bool, *, rngs: nnx.Rngs):
        self.n, self.pooled = n, pooled
        self.proj = nnx.Linear(12 * (L // n), D_ENC, rngs=rngs)

    def __call__(self, x):
        b, c, length = x.shape
        p = x.reshape(b, c, self.n, length // self.n).transpose(0, 2, 1, 3)
        h = jnp.tanh(self.proj(p.reshape(b, self.n, -1)))
        return h.mean(axis=1) if self.pooled else h


def tiny_llm(extra_vocab: int = 0) -> LLM:
    cfg = LLMConfig(
        vocab_size=40,
        extra_vocab=extra_vocab,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=64,
    )
    return LLM(cfg, rngs=nnx.Rngs(0))


VIT = vision.VisionConfig(
    kind="vit",
    encoder=EncoderConfig(hidden_size=D_ENC, num_layers=1, num_heads=2, intermediate_size=48),
    image_size=16,
    patch_size=8,
    output="tokens",
)

# mode -> (N, kind of input)
MODES = {"pooled": (1, "signal"), "tokens": (4, "signal"), "image_tokens": (4, "image")}


def make_elm(mode: str, projector: str = "linear", extra_vocab: int = 0) -> ELM:
    n, kind = MODES[mode]
    rngs = nnx.Rngs(1)
    if kind == "signal":
        encoder = TinySignalEncoder(4, pooled=n == 1, rngs=rngs)
    else:
        encoder = ImageEncoder(vision.make_tower(VIT, rngs=rngs))
    llm = tiny_llm(extra_vocab)
    proj = Projector(ProjectorConfig(D_ENC, llm.config.hidden_size, kind=projector), rngs=rngs)
    return ELM(encoder, proj, llm, PH)


def make_ecg(mode: str, b: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if MODES[mode][1] == "signal":
        return rng.random((b, 12, L), dtype=np.float32)
    return rng.integers(0, 256, (b, 20, 30, 3), dtype=np.uint8)  # raw printouts


def make_rows(n: int, starts, lengths, seed: int = 0):
    """Rows with ``n`` placeholders at ``starts[b]`` and right padding after ``lengths[b]``."""
    rng = np.random.default_rng(seed)
    b = len(starts)
    tokens = rng.integers(8, 40, (b, T)).astype(np.int32)
    seg = np.zeros((b, T), np.int32)
    for i, (s, length) in enumerate(zip(starts, lengths, strict=True)):
        tokens[i, s : s + n] = PH
        tokens[i, length:] = 0
        seg[i, :length] = 1
    return tokens, seg


@nnx.jit
def forward(model, tokens, ecg, segment_ids):
    return model(tokens, ecg, segment_ids=segment_ids)


# --------------------------------------------------------------------------------------------
# Injection is row-local
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_batch_equals_each_sample_alone_and_a_manual_injection(mode):
    n = MODES[mode][0]
    model = make_elm(mode)
    tokens, seg = make_rows(n, starts=[1, 6, 3], lengths=[T, 12, 9])
    ecg = make_ecg(mode, 3)
    batch = np.asarray(forward(model, tokens, ecg, seg))
    assert batch.shape == (3, T, 40)

    # Each sample alone (its padding trimmed) gives the same logits.
    for b, length in enumerate([T, 12, 9]):
        alone = forward(model, tokens[b : b + 1, :length], ecg[b : b + 1], seg[b : b + 1, :length])
        np.testing.assert_allclose(batch[b, :length], np.asarray(alone)[0], atol=ATOL, rtol=0)

    # Manual: token embeddings everywhere, the projected vectors written by hand at the
    # placeholders, all passed as embeds (embed_mask all True).
    feats = model.encoder(jnp.asarray(ecg))
    vectors = np.asarray(model.projector(feats if feats.ndim == 3 else feats[:, None]))
    assert vectors.shape == (3, n, 32)
    embeds = np.array(model.llm.embed_tokens(jnp.asarray(tokens)))
    for b in range(3):
        where = np.flatnonzero(tokens[b] == PH)
        assert len(where) == n
        for k, pos in enumerate(where):
            embeds[b, pos] = vectors[b, k]
    manual = model.llm(
        jnp.asarray(tokens),
        segment_ids=jnp.asarray(seg),
        embeds=jnp.asarray(embeds),
        embed_mask=jnp.ones(tokens.shape, bool),
    )
    np.testing.assert_allclose(batch, np.asarray(manual), atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["pooled", "tokens"])
def test_another_samples_ecg_changes_nothing_in_this_sample(mode):
    n = MODES[mode][0]
    model = make_elm(mode)
    tokens, seg = make_rows(n, starts=[2, 2, 7], lengths=[T, T, T])
    ecg = make_ecg(mode, 3)
    other = ecg.copy()
    other[1] = make_ecg(mode, 1, seed=9)[0]
    a = np.asarray(forward(model, tokens, ecg, seg))
    b = np.asarray(forward(model, tokens, other, seg))
    np.testing.assert_array_equal(a[0], b[0])  # not approximately: exactly
    np.testing.assert_array_equal(a[2], b[2])
    assert np.abs(a[1] - b[1]).max() > 1e-3  # sample 1 does see its own ECG
    # ...and only after its placeholders (causal LLM).
    np.testing.assert_array_equal(a[1, :2], b[1, :2])

    # The reference's broadcast (`emb[:, idx] = proj` over the batch) would not pass this:
    # row 0 would carry row 1's vector wherever row 1 has a placeholder.
    embeds, mask = model.embed_inputs(jnp.asarray(tokens), jnp.asarray(ecg))
    vectors = model.encode(jnp.asarray(ecg))
    for row in range(3):
        got = np.asarray(embeds[row])[np.asarray(mask[row])]
        np.testing.assert_array_equal(got, np.asarray(vectors[row]))


def test_extra_placeholders_get_zeros_and_missing_ones_leave_vectors_unused():
    vectors = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 4)).astype(np.float32))
    tokens = jnp.asarray(
        [
            [1, PH, 2, PH, 3, 4],  # exactly 2
            [PH, PH, PH, PH, 1, 2],  # 2 too many -> zeros
            [1, 2, PH, 3, 4, 5],  # 1 too few -> vector 1 unused
        ],
        jnp.int32,
    )
    embeds, mask = scatter_placeholders(tokens, vectors, PH)
    embeds, mask, v = np.asarray(embeds), np.asarray(mask), np.asarray(vectors)
    np.testing.assert_array_equal(mask, np.asarray(tokens) == PH)
    np.testing.assert_array_equal(embeds[0, [1, 3]], v[0])
    np.testing.assert_array_equal(embeds[1, :2], v[1])
    np.testing.assert_array_equal(embeds[1, 2:4], 0.0)
    np.testing.assert_array_equal(embeds[2, 2], v[2, 0])
    np.testing.assert_array_equal(embeds[~mask], 0.0)


def test_packed_rows_each_example_gets_its_own_ecg():
    """Two examples per row with ``ecg [B, E, ...]``: each segment equals its example alone."""
    n = 4
    model = make_elm("tokens")
    rng = np.random.default_rng(3)
    # examples: (tokens, ecg or None)
    ex = [
        [11, PH, PH, PH, PH, 12, 13],
        [14, 15, PH, PH, PH, PH, 16, 17],
        [18, 19, 20, 21],  # text-only
        [PH, PH, PH, PH, 22, 23, 24],
    ]
    ecgs = rng.random((4, 12, L), dtype=np.float32)
    rows = [[0, 1], [2, 3]]
    tokens = np.zeros((2, T), np.int32)
    seg = np.zeros((2, T), np.int32)
    pos = np.zeros((2, T), np.int32)
    slot_ecg = np.zeros((2, 2, 12, L), np.float32)  # slot 1 of row 1 stays filler
    spans = {}
    for r, members in enumerate(rows):
        at, slot = 0, 0
        for s, e in enumerate(members, start=1):
            k = len(ex[e])
            tokens[r, at : at + k] = ex[e]
            seg[r, at : at + k] = s
            pos[r, at : at + k] = np.arange(k)
            spans[e] = (r, at, at + k)
            if PH in ex[e]:
                slot_ecg[r, slot] = ecgs[e]
                slot += 1
            at += k
    check_placeholders(tokens, n, placeholder_id=PH, segment_ids=seg, slots=2, allow_text_only=True)

    @nnx.jit
    def packed(model, tokens, ecg, seg, pos):
        return model(tokens, ecg, segment_ids=seg, positions=pos, packed_ecg=True)

    out = np.asarray(packed(model, tokens, slot_ecg, seg, pos))
    for e, toks in enumerate(ex):
        r, a, b = spans[e]
        one = jnp.asarray([toks], jnp.int32)
        alone = model(one, jnp.asarray(ecgs[e : e + 1])) if PH in toks else model.llm(one)
        np.testing.assert_allclose(out[r, a:b], np.asarray(alone)[0], atol=ATOL, rtol=0)


def test_check_placeholders_names_rows_and_counts():
    tokens = np.full((4, 8), 9, np.int32)
    tokens[0, 1] = PH
    tokens[1, [1, 2]] = PH  # 2 for n=1
    tokens[2, 3] = PH
    # row 3: none
    with pytest.raises(ValueError) as err:
        check_placeholders(tokens, 1, placeholder_id=PH)
    msg = str(err.value)
    assert "row 1 has 2" in msg and "row 3 has 0" in msg and "row 0" not in msg
    assert f"id {PH}" in msg and "exactly 1" in msg
    with pytest.raises(ValueError, match=r"row 1 has 2") as err:
        check_placeholders(tokens, 1, placeholder_id=PH, allow_text_only=True)
    assert "row 3" not in str(err.value)
    tokens[1, 2] = 9
    check_placeholders(tokens, 1, placeholder_id=PH, allow_text_only=True)

    # Packed: per segment, none on padding, no more ECG examples than slots.
    tokens = np.array([[PH, 1, PH, 2, PH, 3, 0, PH]], np.int32)
    seg = np.array([[1, 1, 2, 2, 3, 3, 0, 0]], np.int32)
    with pytest.raises(ValueError) as err:
        check_placeholders(tokens, 1, placeholder_id=PH, segment_ids=seg, slots=2)
    msg = str(err.value)
    assert "row 0 has 1 on padding" in msg
    assert "row 0 has 3 examples with placeholders for 2 ECG slots" in msg
    with pytest.raises(ValueError, match=r"row 0, segment 2 has 1;.*needs exactly 2"):
        check_placeholders(tokens, 2, placeholder_id=PH, segment_ids=seg)

    model = make_elm("pooled")
    with pytest.raises(ValueError, match="row 0 has 0"):
        model.check_placeholders(np.zeros((1, 4), np.int32), 1)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def test_answer_loss_ignores_padding_and_non_answer_labels():
    model = make_elm("tokens")
    n = 4
    tokens, seg = make_rows(n, starts=[1, 3], lengths=[T, 11])
    ecg = make_ecg("tokens", 2)
    logits = forward(model, tokens, ecg, seg)
    rng = np.random.default_rng(5)
    targets = rng.integers(0, 40, (2, T)).astype(np.int32)
    mask = np.zeros((2, T), bool)
    mask[0, 9:14] = True
    mask[1, 7:10] = True

    total, count = answer_loss(logits, jnp.asarray(targets), jnp.asarray(mask))
    logp = jax.nn.log_softmax(np.asarray(logits), axis=-1)
    want = -sum(float(logp[b, t, targets[b, t]]) for b, t in zip(*np.nonzero(mask), strict=True))
    assert float(count) == mask.sum()
    np.testing.assert_allclose(float(total), want, rtol=1e-6)

    for junk in (-100, 0, 39, 10_000):  # HF ignore index, pad id, any id, out of range
        other = targets.copy()
        other[~mask] = junk
        t2, c2 = answer_loss(logits, jnp.asarray(other), jnp.asarray(mask))
        assert float(t2) == float(total) and float(c2) == float(count)
    t3, _ = answer_loss(logits, jnp.asarray(targets), jnp.asarray(mask.astype(np.float32)))
    assert float(t3) == float(total)

    # Through the model: padding labels of -100 change neither the loss nor the gradient.
    def loss(model, targets):
        total, count = answer_loss(model(tokens, ecg, segment_ids=seg), targets, mask)
        return total / count

    wrt = trainable_filter(train_encoder=True)
    grad = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))
    padded = targets.copy()
    padded[seg == 0] = -100
    g1, g2 = grad(model, jnp.asarray(targets)), grad(model, jnp.asarray(padded))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.all(np.isfinite(np.asarray(a)))


# --------------------------------------------------------------------------------------------
# What trains
# --------------------------------------------------------------------------------------------


def _paths(model, f) -> set[str]:
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, f))}


def _lora_elm(extra_vocab: int = 0) -> ELM:
    model = make_elm("tokens", projector="mlp", extra_vocab=extra_vocab)
    apply_lora(model.llm, ("q_proj", "v_proj"), rank=2, alpha=4, dropout=0.0, rngs=nnx.Rngs(2))
    return model


def test_gradients_reach_projector_encoder_and_lora():
    model = _lora_elm()
    tokens, seg = make_rows(4, starts=[0, 5], lengths=[T, T])
    ecg = make_ecg("tokens", 2)
    targets = np.roll(tokens, -1, axis=1)
    mask = np.zeros((2, T), bool)
    mask[:, 10:] = True

    def loss(model):
        total, count = answer_loss(model(tokens, ecg, segment_ids=seg), targets, mask)
        return total / count

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, trainable_filter(train_encoder=True)))(model)
    flat = {".".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(grads)}
    assert {"encoder.proj.kernel", "projector.linear_1.kernel", "projector.linear_2.kernel"} <= set(
        flat
    )
    for name in ("encoder.proj.kernel", "projector.linear_1.kernel", "projector.linear_2.bias"):
        assert np.abs(flat[name]).max() > 0, name
    lora_b = [k for k in flat if k.endswith("lora_b")]
    assert lora_b and all(np.abs(flat[k]).max() > 0 for k in lora_b)
    assert not any(k.startswith("llm") and not k.endswith(("lora_a", "lora_b")) for k in flat)


def test_trainable_filters_of_the_paradigms():
    model = _lora_elm(extra_vocab=3)
    params = _paths(model, nnx.Param)
    enc = {p for p in params if p.startswith("encoder.")}
    proj = {p for p in params if p.startswith("projector.")}
    lora = _paths(model, nnx.LoRAParam)
    extra = _paths(model, ExtraVocab)
    base = params - enc - proj - lora - extra
    assert enc and proj and lora and extra and base

    # End-to-End LLaVA / 2-stage stage 2: projector + LoRA, encoder frozen.
    assert _paths(model, trainable_filter()) == proj | lora
    assert _paths(model, trainable_filter(train_encoder=False, lora=True)) == proj | lora
    # --train_encoder
    assert _paths(model, trainable_filter(train_encoder=True)) == enc | proj | lora
    # projector-only alignment (LLaVA-1.5 stage 1)
    assert _paths(model, trainable_filter(lora=False)) == proj
    assert _paths(model, trainable_filter(train_extra_vocab=True)) == proj | lora | extra
    assert _paths(model, trainable_filter(lora=False, train_extra_vocab=True)) == proj | extra
    # full fine-tuning of the LLM
    assert _paths(model, trainable_filter(train_llm=True)) == proj | lora | base
    assert _paths(model, trainable_filter(train_projector=False)) == lora
    with pytest.raises(ValueError, match="nothing to train"):
        trainable_filter(lora=False, train_projector=False)

    # An optimiser step with the frozen-encoder filter leaves the encoder untouched.
    wrt = trainable_filter()
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=wrt)
    before = nnx.clone(model)
    tokens, seg = make_rows(4, starts=[0, 5], lengths=[T, T])
    ecg = make_ecg("tokens", 2)

    def loss(model):
        return jnp.mean(model(tokens, ecg, segment_ids=seg) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model)
    opt.update(model, grads)
    for name, (a, b) in {
        "encoder": (before.encoder.proj.kernel, model.encoder.proj.kernel),
        "projector": (before.projector.linear_1.kernel, model.projector.linear_1.kernel),
    }.items():
        same = np.array_equal(np.asarray(a[...]), np.asarray(b[...]))
        assert same == (name == "encoder"), name


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def test_image_encoder_preprocesses_uint8_inside():
    tower = vision.make_tower(VIT, rngs=nnx.Rngs(0))
    enc = ImageEncoder(tower)
    images = make_ecg("image_tokens", 2)
    want = tower(vision.preprocess(images, VIT))
    got = nnx.jit(lambda m, x: m(x))(enc, images)
    assert got.shape == (2, VIT.num_tokens, D_ENC)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    pixels = vision.preprocess(images, VIT)  # floats pass through as preprocessed pixels
    np.testing.assert_array_equal(np.asarray(enc(pixels)), np.asarray(tower(pixels)))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projector_math_names_and_init(kind):
    cfg = ProjectorConfig(6, 8, kind=kind, hidden_dim=10 if kind == "mlp" else None)
    proj = Projector(cfg, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(3, 2, 6)).astype(np.float32)
    w1, b1 = np.asarray(proj.linear_1.kernel[...]), np.asarray(proj.linear_1.bias[...])
    assert np.abs(w1).max() <= 1 / np.sqrt(6) and np.abs(b1).max() <= 1 / np.sqrt(6)
    meta = proj.linear_1.kernel.get_metadata()
    assert meta["eager_sharding"] is False
    if kind == "linear":
        assert tuple(meta["out_sharding"]) == (None, "embed") and proj.linear_2 is None
        want = x @ w1 + b1
    else:
        assert tuple(meta["out_sharding"]) == (None, "mlp")
        k2 = proj.linear_2.kernel
        assert tuple(k2.get_metadata()["out_sharding"]) == ("mlp", "embed")
        assert k2.shape == (10, 8)
        h = np.asarray(jax.nn.gelu(jnp.asarray(x @ w1 + b1), approximate=False))
        want = h @ np.asarray(k2[...]) + np.asarray(proj.linear_2.bias[...])
    np.testing.assert_allclose(np.asarray(proj(jnp.asarray(x))), want, atol=1e-5)
    assert proj(jnp.asarray(x[:, 0])).shape == (3, 8)  # pooled [B, in_dim] works too
    with pytest.raises(ValueError, match="in_dim"):
        proj(jnp.zeros((2, 5)))


def test_configs_are_validated():
    with pytest.raises(ValueError, match="kind"):
        ProjectorConfig(4, 4, kind="conv")
    with pytest.raises(ValueError, match="in_dim"):
        ProjectorConfig(0, 4)
    llm = tiny_llm()
    enc = TinySignalEncoder(4, True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden_size"):
        ELM(enc, Projector(ProjectorConfig(D_ENC, 16), rngs=nnx.Rngs(0)), llm, PH)
    with pytest.raises(ValueError, match="placeholder_id"):
        ELM(enc, Projector(ProjectorConfig(D_ENC, 32), rngs=nnx.Rngs(0)), llm, 40)
    model = ELM(enc, Projector(ProjectorConfig(D_ENC, 32), rngs=nnx.Rngs(0)), llm, PH)
    with pytest.raises(ValueError, match="2 ECG rows for 3 token rows"):
        model(jnp.zeros((3, 4), jnp.int32), jnp.zeros((2, 12, L)))
    # ecg=None: the plain LLM
    tokens = jnp.asarray([[1, PH, 2]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(llm(tokens)))


SHARDED = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from elmjax import parallel
    sys.path.insert(0, sys.argv[1])
    import test_elm as t

    assert jax.device_count() == 8, jax.devices()
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    tokens, seg = t.make_rows(4, starts=[0, 3, 5, 1], lengths=[t.T, 12, t.T, 9])
    ecg = t.make_ecg("tokens", 4)
    with jax.default_matmul_precision("highest"):
        want = np.asarray(t.forward(t.make_elm("tokens", "mlp"), tokens, ecg, seg))
        model = parallel.create_sharded(lambda: t.make_elm("tokens", "mlp"), mesh)
        spec = model.projector.linear_2.kernel[...].sharding.spec
        assert spec == jax.sharding.PartitionSpec("tensor", "fsdp"), spec
        with jax.set_mesh(mesh):
            got = np.asarray(t.forward(model, tokens, ecg, seg))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    print("OK")
    """
)


def test_sharded_elm_matches_single_device():
    """Over a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 fake CPU devices (subprocess)."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", SHARDED, str(Path(__file__).parent)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_under_filter_looks_at_the_first_path_element_only():
    assert elm_lib.Under("projector")(("projector", "linear_1", "kernel"), None)
    assert not elm_lib.Under("projector")(("llm", "projector"), None)
