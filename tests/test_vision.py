"""models.vision: ViT / CLIP / SigLIP vision towers against transformers, and preprocessing.

Every parity check saves a tiny random transformers model with ``save_pretrained`` (weights
perturbed so biases and norms are non-trivial), loads it with ``load_vision`` and compares
float32 outputs on the same pixels.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from PIL import Image

from elmjax import parallel
from elmjax.models import vision
from elmjax.models.vision import VisionConfig, load_vision, preprocess


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """float32 matmuls at full precision for the parity checks (scoped to these tests)."""
    with jax.default_matmul_precision("highest"):
        yield


S, P, B = 32, 8, 2  # image side, patch side, batch
N = (S // P) ** 2
SHAPES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=S,
    patch_size=P,
)
TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64
)
ATOL = 1e-4


def tiny(case: str, seed: int = 0, noise: float = 0.05):
    """A tiny random transformers vision model (float32, eager attention), weights perturbed."""
    torch.manual_seed(seed)
    if case == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**SHAPES))
    elif case == "vit_bare":  # no pooler, no q/k/v biases
        cfg = transformers.ViTConfig(**SHAPES, qkv_bias=False)
        model = transformers.ViTModel(cfg, add_pooling_layer=False)
    elif case == "clip_vision":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SHAPES))
    elif case == "clip":
        cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=SHAPES, projection_dim=16)
        model = transformers.CLIPModel(cfg)
    elif case == "siglip_vision":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SHAPES))
    elif case == "siglip_headless":
        cfg = transformers.SiglipVisionConfig(**SHAPES, vision_use_head=False)
        model = transformers.SiglipVisionModel(cfg)
    elif case == "siglip":
        cfg = transformers.SiglipConfig(text_config=TEXT, vision_config=SHAPES)
        model = transformers.SiglipModel(cfg)
    else:
        raise ValueError(case)
    model.config._attn_implementation = "eager"
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


def save(tmp_path: Path, case: str, **kwargs) -> tuple[Path, object]:
    ref = tiny(case, **kwargs)
    path = tmp_path / case
    ref.save_pretrained(path, safe_serialization=True)
    return path, ref


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(B, 3, S, S)).astype(np.float32)


def torch_outputs(ref, x: np.ndarray) -> dict[str, np.ndarray | None]:
    """last_hidden_state / pooler_output / image_embeds of the reference (vision part)."""
    px = torch.tensor(np.array(x))
    with torch.no_grad():
        if isinstance(ref, transformers.CLIPModel | transformers.SiglipModel):
            out = ref.vision_model(pixel_values=px, output_hidden_states=True)
            feats = ref.get_image_features(pixel_values=px)
            embeds = getattr(feats, "pooler_output", feats)
        else:
            out = ref(pixel_values=px, output_hidden_states=True)
            embeds = out.pooler_output if isinstance(ref, transformers.SiglipVisionModel) else None

    def arr(t):
        return None if t is None else t.numpy()

    return dict(
        last_hidden_state=arr(out.last_hidden_state),
        pooler_output=arr(out.pooler_output),
        image_embeds=arr(embeds),
        hidden_states=[h.numpy() for h in out.hidden_states],
    )


@nnx.jit(static_argnames="hidden_states")
def encode(model, x, hidden_states=False):
    return model.encode(x, hidden_states=hidden_states)


@nnx.jit
def features(model, x):
    return model(x)


def max_diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def assert_close(a, b, atol=ATOL):
    err = max_diff(a, b)
    assert err <= atol, f"max abs diff {err:.3g} > {atol}"


# --------------------------------------------------------------------------------------------
# Parity with transformers
# --------------------------------------------------------------------------------------------

# case -> (kind, default pool, has pooler_output, has image_embeds, feature_dim)
CASES = {
    "vit": ("vit", "cls", True, False, 32),
    "vit_bare": ("vit", "cls", False, False, 32),
    "clip_vision": ("clip", "pooler", True, False, 32),
    "clip": ("clip", "embeds", True, True, 16),
    "siglip_vision": ("siglip", "pooler", True, True, 32),
    "siglip_headless": ("siglip", "mean", False, False, 32),
    "siglip": ("siglip", "pooler", True, True, 32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(tmp_path, case):
    kind, pool, has_pooler, has_embeds, dim = CASES[case]
    path, ref = save(tmp_path, case)
    model, config = load_vision(path)
    assert config.kind == kind and config.resolved_pool == pool
    assert config.feature_dim == dim and config.num_tokens == 1
    x = pixels()
    want = torch_outputs(ref, x)
    got = encode(model, jnp.asarray(x), hidden_states=True)

    assert_close(got.last_hidden_state, want["last_hidden_state"])
    if has_pooler:
        assert_close(got.pooler_output, want["pooler_output"])
    else:
        assert got.pooler_output is None and want["pooler_output"] is None
    if has_embeds:
        assert_close(got.image_embeds, want["image_embeds"])
    else:
        assert got.image_embeds is None
    assert len(got.hidden_states) == len(want["hidden_states"]) == SHAPES["num_hidden_layers"] + 1
    for h, w in zip(got.hidden_states, want["hidden_states"], strict=True):
        assert_close(h, w)

    # The features for a projector: the default pooled vector.
    feats = np.asarray(features(model, jnp.asarray(x)))
    assert feats.shape == (B, dim)
    lhs = want["last_hidden_state"]
    expected = {
        "cls": lhs[:, 0] if kind == "vit" else want["pooler_output"],
        "pooler": want["pooler_output"],
        "embeds": want["image_embeds"],
        "mean": lhs[:, -N:].mean(axis=1),
    }[pool]
    assert_close(feats, expected)


def test_parity_report(tmp_path):
    """Prints the max abs differences per model (run with -s to see them)."""
    lines = []
    for case in ("vit", "clip_vision", "clip", "siglip_vision", "siglip"):
        path, ref = save(tmp_path, case)
        model, _ = load_vision(path)
        x = pixels(1)
        want = torch_outputs(ref, x)
        got = encode(model, jnp.asarray(x))
        lhs = max_diff(got.last_hidden_state, want["last_hidden_state"])
        pooled = max_diff(got.pooler_output, want["pooler_output"])
        lines.append(f"{case}: last_hidden_state {lhs:.2e}, pooler_output {pooled:.2e}")
        assert max(lhs, pooled) <= ATOL
    print("\n" + "\n".join(lines))


@pytest.mark.parametrize("case", ["vit", "clip", "siglip_vision"])
def test_token_output(tmp_path, case):
    """output="tokens": the N patch tokens (CLS dropped; CLIP without post_layernorm)."""
    path, ref = save(tmp_path, case)
    model, config = load_vision(path, output="tokens")
    assert config.num_tokens == N and config.feature_dim == SHAPES["hidden_size"]
    x = pixels()
    want = torch_outputs(ref, x)["last_hidden_state"][:, -N:]
    got = features(model, jnp.asarray(x))
    assert got.shape == (B, N, SHAPES["hidden_size"])
    assert_close(got, want)


def test_pool_choices(tmp_path):
    path, ref = save(tmp_path, "vit")
    x = pixels()
    want = torch_outputs(ref, x)
    model, config = load_vision(path, pool="pooler")
    assert_close(features(model, jnp.asarray(x)), want["pooler_output"])
    model, config = load_vision(path, pool="mean")
    assert_close(features(model, jnp.asarray(x)), want["last_hidden_state"][:, 1:].mean(1))
    with pytest.raises(ValueError, match="pool='embeds' is not available"):
        load_vision(path, pool="embeds")
    path, _ = save(tmp_path, "siglip_headless")
    with pytest.raises(ValueError, match="pool='pooler' is not available"):
        load_vision(path, pool="pooler")


def test_optional_parts_can_be_left_out(tmp_path):
    """pooler=False / projection_dim=None skip ViT's pooler, SigLIP's head, CLIP's projection."""
    x = pixels()
    for case, leave_out, pool in [
        ("vit", dict(pooler=False), "cls"),
        ("siglip", dict(pooler=False), "mean"),
        ("clip", dict(projection_dim=None), "pooler"),
    ]:
        path, ref = save(tmp_path, case)
        model, config = load_vision(path, **leave_out)
        assert config.resolved_pool == pool and config.feature_dim == SHAPES["hidden_size"]
        out = encode(model, jnp.asarray(x))
        assert out.image_embeds is None
        assert_close(out.last_hidden_state, torch_outputs(ref, x)["last_hidden_state"])


def test_jit_matches_eager_and_is_deterministic(tmp_path):
    path, _ = save(tmp_path, "siglip_vision")
    model, _ = load_vision(path)
    x = jnp.asarray(pixels())
    eager = np.asarray(model(x))
    assert np.array_equal(eager, np.asarray(model(x)))
    jitted = np.asarray(features(model, x))
    assert np.array_equal(jitted, np.asarray(features(model, x)))
    assert_close(jitted, eager, atol=1e-5)
    # A second load of the same checkpoint gives the same tower.
    again, _ = load_vision(path)
    assert np.array_equal(jitted, np.asarray(features(again, x)))


def test_bfloat16_close_to_float32(tmp_path):
    path, _ = save(tmp_path, "clip")
    m32, _ = load_vision(path)
    m16, config = load_vision(path, dtype="bfloat16")
    assert config.encoder.param_dtype == "bfloat16"
    assert m16.encoder.layers[0].mlp.fc1.kernel[...].dtype == jnp.bfloat16
    x = jnp.asarray(pixels())
    a, b = np.asarray(features(m32, x)), np.asarray(features(m16, x)).astype(np.float32)
    assert np.isfinite(b).all()
    assert max_diff(a, b) < 0.1 * np.abs(a).max()


def test_sharded_load_on_a_mesh(tmp_path):
    """Parameters carry logical names that parallel's rules map (here a 1-device mesh)."""
    path, ref = save(tmp_path, "siglip")
    mesh = parallel.make_mesh()
    model, _ = load_vision(path, mesh=mesh)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var.get_value().ndim
        parallel.logical_to_mesh(names, mesh)  # every name has a rule
    with jax.set_mesh(mesh):
        got = features(model, jnp.asarray(pixels()))
    assert_close(got, torch_outputs(ref, pixels())["pooler_output"])


# --------------------------------------------------------------------------------------------
# Checkpoint layouts and config
# --------------------------------------------------------------------------------------------


def rewrite(path: Path, rename) -> None:
    """Rewrites model.safetensors with each name mapped by ``rename`` (None drops it)."""
    file = path / "model.safetensors"
    tensors = safetensors.numpy.load_file(file)
    out = {}
    for name, value in tensors.items():
        new = rename(name)
        if new is not None:
            out[new] = value
    safetensors.numpy.save_file(out, file, metadata={"format": "pt"})


def test_released_clip_layout_with_prefix(tmp_path):
    """transformers 4 CLIPVisionModel files: ``vision_model.`` prefix + position_ids buffer."""
    path, ref = save(tmp_path, "clip_vision")
    rewrite(path, lambda n: f"vision_model.{n}")
    file = path / "model.safetensors"
    tensors = safetensors.numpy.load_file(file)
    tensors["vision_model.embeddings.position_ids"] = np.arange(N + 1)[None].astype(np.int64)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    model, _ = load_vision(path)
    x = pixels()
    assert_close(
        encode(model, jnp.asarray(x)).pooler_output, torch_outputs(ref, x)["pooler_output"]
    )


def test_vit_modular_names_and_task_prefix(tmp_path):
    """ViT tensors named as transformers 5 holds them, under ``vit.`` beside a classifier."""
    path, ref = save(tmp_path, "vit")
    rewrite(path, lambda n: "vit." + vision._vit_modular_name(n))
    file = path / "model.safetensors"
    tensors = safetensors.numpy.load_file(file)
    tensors["classifier.weight"] = np.zeros((5, 32), np.float32)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    model, config = load_vision(path)
    assert config.pooler
    x = pixels()
    want = torch_outputs(ref, x)
    got = encode(model, jnp.asarray(x))
    assert_close(got.last_hidden_state, want["last_hidden_state"])
    assert_close(got.pooler_output, want["pooler_output"])


@pytest.mark.parametrize(
    ("model_type", "cls"),
    [
        ("vit", transformers.ViTConfig),
        ("clip_vision_model", transformers.CLIPVisionConfig),
        ("siglip_vision_model", transformers.SiglipVisionConfig),
    ],
)
def test_config_defaults_match_transformers(model_type, cls):
    """A config.json that omits keys gets transformers' defaults."""
    ours = VisionConfig.from_hf({"model_type": model_type})
    ref = cls()
    enc = ours.encoder
    assert (enc.hidden_size, enc.intermediate_size) == (ref.hidden_size, ref.intermediate_size)
    assert (enc.num_layers, enc.num_heads) == (ref.num_hidden_layers, ref.num_attention_heads)
    assert (enc.activation, enc.layer_norm_eps) == (ref.hidden_act, ref.layer_norm_eps)
    assert (ours.image_size, ours.patch_size) == (ref.image_size, ref.patch_size)
    assert ours.num_channels == ref.num_channels


def test_full_model_configs_take_the_vision_config():
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=SHAPES, projection_dim=16)
    ours = VisionConfig.from_hf(cfg.to_dict(), projection_dim=16)
    assert ours.kind == "clip" and ours.encoder.hidden_size == 32 and ours.image_size == S
    assert ours.encoder.activation == "quick_gelu" and ours.resolved_pool == "embeds"
    cfg = transformers.SiglipConfig(text_config=TEXT, vision_config={**SHAPES, "patch_size": 4})
    ours = VisionConfig.from_hf(cfg.to_dict())
    assert ours.kind == "siglip" and ours.patch_size == 4 and ours.pooler


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_tensor_is_named(tmp_path):
    path, _ = save(tmp_path, "siglip")
    gone = "vision_model.encoder.layers.1.mlp.fc2.bias"
    rewrite(path, lambda n: None if n == gone else n)
    with pytest.raises(KeyError, match=rf"{path}: 1 tensor\(s\) missing .*{gone}"):
        load_vision(path)


def test_wrong_shape_names_file_and_tensor(tmp_path):
    path, _ = save(tmp_path, "clip_vision")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor .*mlp.fc1.weight has shape"):
        load_vision(path)


def test_extra_layers_are_unexpected(tmp_path):
    path, _ = save(tmp_path, "vit")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match=r"unexpected tensor\(s\).*encoder\.layer\.1\."):
        load_vision(path)


def test_wrong_model_type_and_missing_files(tmp_path):
    path, _ = save(tmp_path, "vit")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'llama' is not a supported"):
        load_vision(path)
    (path / "config.json").write_text(json.dumps({**cfg, "image_size": 30}))
    with pytest.raises(ValueError, match=r"config.json: image_size=30 must be a positive multiple"):
        load_vision(path)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_vision(path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_vision(tmp_path / "nowhere")


def test_wrong_tower_checkpoint(tmp_path):
    """A config that says CLIP over ViT tensors: the error says what was looked for."""
    path, _ = save(tmp_path, "vit")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "clip_vision_model"}))
    with pytest.raises(KeyError, match="no clip vision tower tensors.*patch_embedding.weight"):
        load_vision(path)


def test_wrong_pixel_shape(tmp_path):
    path, _ = save(tmp_path, "vit")
    model, _ = load_vision(path)
    with pytest.raises(ValueError, match=r"pixels must be \[B, 3, 32, 32\]"):
        model(jnp.zeros((1, 32, 32, 3)))


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------

MARKERS = {  # corner -> RGB of a BLOCK x BLOCK block in that corner
    "top_left": (255, 0, 0),
    "top_right": (0, 255, 0),
    "bottom_left": (0, 0, 255),
    "bottom_right": (0, 0, 0),
}
H, W, BLOCK = 72, 200, 30  # a wide printout, like the reference's 2000 x 720 plots


def printout() -> np.ndarray:
    img = np.full((H, W, 3), 255, np.uint8)
    img[::6, :, 1:] = 200  # faint red grid lines
    corners = {
        "top_left": (slice(0, BLOCK), slice(0, BLOCK)),
        "top_right": (slice(0, BLOCK), slice(W - BLOCK, W)),
        "bottom_left": (slice(H - BLOCK, H), slice(0, BLOCK)),
        "bottom_right": (slice(H - BLOCK, H), slice(W - BLOCK, W)),
    }
    for corner, (rows, cols) in corners.items():
        img[rows, cols] = MARKERS[corner]
    return img


def pixels_back(x: jax.Array, config: VisionConfig) -> np.ndarray:
    """``[B, C, S, S]`` normalised -> ``[B, S, S, C]`` uint8-scale floats."""
    x = np.asarray(x).transpose(0, 2, 3, 1)
    return (x * np.asarray(config.image_std) + np.asarray(config.image_mean)) * 255.0


def corner_colours(img: np.ndarray, top: int, bottom: int, left: int, right: int) -> dict:
    """The pixel one in from each corner of the content box [top, bottom) x [left, right)."""
    return {
        "top_left": img[top + 1, left + 1],
        "top_right": img[top + 1, right - 2],
        "bottom_left": img[bottom - 2, left + 1],
        "bottom_right": img[bottom - 2, right - 2],
    }


@pytest.mark.parametrize("kind", ["clip", "siglip", "vit"])
@pytest.mark.parametrize("fit", ["resize", "pad"])
def test_preprocess_keeps_every_corner(kind, fit):
    mean, std, resample = vision._PREPROCESS_DEFAULTS[kind]
    config = VisionConfig(
        kind=kind,
        image_size=S,
        patch_size=P,
        fit=fit,
        image_mean=mean,
        image_std=std,
        resample=resample,
    )
    x = preprocess(printout()[None], config)
    assert x.shape == (1, 3, S, S) and x.dtype == jnp.float32
    img = pixels_back(x, config)[0]
    if fit == "resize":
        box = (0, S, 0, S)
    else:  # the content is centred between white bands
        content = round(S * H / W)
        top = (S - content) // 2
        box = (top, top + content, 0, S)
        assert np.allclose(img[0], 255, atol=1) and np.allclose(img[-1], 255, atol=1)
    for corner, colour in corner_colours(img, *box).items():
        assert np.abs(colour - np.asarray(MARKERS[corner])).max() < 40, (corner, colour)


def test_reference_clip_processor_would_crop_the_corners():
    """The departure documented in models.vision: CLIP's processor drops the side leads."""
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": S}, crop_size={"height": S, "width": S}
    )
    x = processor(images=Image.fromarray(printout()), return_tensors="np")["pixel_values"]
    config = VisionConfig(
        kind="clip", image_mean=processor.image_mean, image_std=processor.image_std
    )
    img = pixels_back(x, config)[0]
    seen = corner_colours(img, 0, S, 0, S)
    assert all(np.abs(seen[c] - np.asarray(MARKERS[c])).max() > 100 for c in MARKERS)


@pytest.mark.parametrize(
    ("processor", "resample", "atol"),
    [
        # PIL rounds to uint8 (and, for bicubic, between its two passes).
        (transformers.ViTImageProcessorPil, "bilinear", 1.0),
        (transformers.SiglipImageProcessorPil, "bicubic", 6.0),
    ],
)
def test_resize_matches_the_hf_resize_processors(processor, resample, atol):
    """fit="resize" is what transformers' ViT / SigLIP processors do, up to PIL's rounding."""
    proc = processor(size={"height": S, "width": S})
    img = printout()
    want = proc(images=Image.fromarray(img), return_tensors="np")["pixel_values"]
    config = VisionConfig(
        kind="siglip",
        image_size=S,
        patch_size=P,
        resample=resample,
        image_mean=proc.image_mean,
        image_std=proc.image_std,
    )
    got = preprocess(img, config)
    diff = np.abs(pixels_back(got, config) - pixels_back(want, config))
    assert diff.max() <= atol and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_preprocess_inputs_and_jit():
    config = VisionConfig(
        kind="clip", image_mean=vision.OPENAI_CLIP_MEAN, image_std=vision.OPENAI_CLIP_STD, fit="pad"
    )
    img = printout()
    batch = np.stack([img, img[::-1]])
    x = preprocess(batch, config)
    assert x.shape == (2, 3, config.image_size, config.image_size)
    rgba = np.concatenate([batch, np.full((*batch.shape[:3], 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(np.asarray(preprocess(rgba, config)), np.asarray(x))
    np.testing.assert_allclose(
        np.asarray(preprocess(batch.astype(np.float32) / 255.0, config)), np.asarray(x), atol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(preprocess(img, config))[0], np.asarray(x)[0])
    jitted = jax.jit(functools.partial(preprocess, config=config))
    np.testing.assert_allclose(np.asarray(jitted(batch)), np.asarray(x), atol=1e-5)
    # A uniform grey image normalises to (v / 255 - mean) / std exactly.
    grey = preprocess(np.full((1, 40, 90, 3), 128, np.uint8), config)
    want = (128 / 255 - np.asarray(vision.OPENAI_CLIP_MEAN)) / np.asarray(vision.OPENAI_CLIP_STD)
    np.testing.assert_allclose(np.asarray(grey)[0, :, 16, 16], want, atol=1e-5)  # not padding
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\]"):
        preprocess(np.zeros((2, 3, 32, 32), np.uint8), config)


def test_preprocessor_config_is_read(tmp_path):
    path, _ = save(tmp_path, "clip_vision")
    _, config = load_vision(path)
    assert config.image_mean == vision.OPENAI_CLIP_MEAN and config.resample == "bicubic"
    transformers.CLIPImageProcessorPil(
        image_mean=[0.1, 0.2, 0.3], image_std=[0.9, 0.8, 0.7], resample=2
    ).save_pretrained(path)
    _, config = load_vision(path, fit="pad")
    assert config.image_mean == (0.1, 0.2, 0.3) and config.image_std == (0.9, 0.8, 0.7)
    assert config.resample == "bilinear" and config.fit == "pad"
    _, config = load_vision(path, image_mean=(0.5, 0.5, 0.5))  # explicit overrides win
    assert config.image_mean == (0.5, 0.5, 0.5)


def test_tower_on_images_end_to_end(tmp_path):
    """uint8 printouts -> preprocess -> pooled features, all inside one jit."""
    path, ref = save(tmp_path, "siglip")
    model, config = load_vision(path, fit="pad")
    batch = np.stack([printout(), printout()[:, ::-1]])

    @nnx.jit
    def embed(model, images):
        return model(preprocess(images, config))

    got = embed(model, jnp.asarray(batch))
    assert got.shape == (2, config.feature_dim)
    x = np.asarray(preprocess(batch, config))
    assert_close(got, torch_outputs(ref, x)["image_embeds"])
