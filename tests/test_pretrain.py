"""python -m elmjax.pretrain: MAE and MERL encoder pretraining, resume, export, BERT, sharding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import nnx

from elmjax import pretrain
from elmjax.config import load_config
from elmjax.ecg import synth
from elmjax.models import ecg_encoders, text_encoder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_data")
    synth.generate_corpus(root, num_ecgs=40, seed=0, workers=1)
    return root


def tiny_config(name, root, workdir, **changes):
    cfg = load_config(f"pretrain_{name}:demo")
    cfg.workdir = str(workdir)
    cfg.data.root = str(root)
    cfg.data.generate_ecgs = 40
    cfg.data.workers = 1
    cfg.data.seg_len = 500  # 2-s segments: faster steps
    cfg.train.batch_size = 8
    cfg.train.steps = 20
    cfg.train.warmup_steps = 5
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 1000
    for key, value in changes.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


@pytest.fixture(scope="module")
def stmem_run(data_root, tmp_path_factory):
    cfg = tiny_config("stmem", data_root, tmp_path_factory.mktemp("stmem"))
    return cfg, pretrain.pretrain(cfg, cfg.workdir)


def test_mae_loss_decreases_and_the_encoder_is_exported(stmem_run):
    cfg, metrics = stmem_run
    losses = metrics["losses"]
    assert sorted(losses) == list(range(1, 21))
    first, last = (
        np.mean([losses[i] for i in range(1, 6)]),
        np.mean([losses[i] for i in range(16, 21)]),
    )
    assert last < 0.7 * first, (first, last)
    assert np.isfinite(metrics["valid_loss"])
    encoder = pretrain.load_pretrained_encoder(metrics["encoder"])
    assert encoder.config == pretrain.encoder_config(cfg)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, cfg.data.seg_len)), jnp.float32)
    assert encoder(x).shape == (2, encoder.config.feature_dim)


def test_resume_continues_from_the_checkpoint(stmem_run, data_root, tmp_path):
    cfg, full = stmem_run
    cfg2 = tiny_config("stmem", data_root, tmp_path / "run")
    first = pretrain.pretrain(cfg2, cfg2.workdir, stop_at=8)
    assert first["step"] == 8 and not (tmp_path / "run" / "encoder").exists()
    second = pretrain.pretrain(cfg2, cfg2.workdir)
    assert second["step"] == 20 and sorted(second["losses"]) == list(range(9, 21))
    for step, loss in second["losses"].items():
        assert abs(loss - full["losses"][step]) <= 1e-6, (step, loss, full["losses"][step])


@pytest.mark.parametrize("name", ["stmem", "mlae", "merl_resnet"])
def test_export_load_round_trip(name, tmp_path):
    depth = {"depth": 2} if name == "merl_resnet" else {}
    config = ecg_encoders.tiny_config(name, seq_len=250, **depth)
    enc = ecg_encoders.make_encoder(name, config, rngs=nnx.Rngs(3))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 12, 250)), jnp.float32)
    if name == "merl_resnet":
        enc(x, train=True)  # moves the BatchNorm running statistics away from their init
    pretrain.export_encoder(enc, tmp_path / "enc")
    back = pretrain.load_pretrained_encoder(tmp_path / "enc")
    assert back.config == enc.config
    np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(enc(x)))
    with pytest.raises(FileNotFoundError, match="elmjax.pretrain"):
        pretrain.load_pretrained_encoder(tmp_path / "nothing")


def test_bert_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    torch.manual_seed(0)
    ref = transformers.BertModel(hf_cfg).eval()
    ref.save_pretrained(tmp_path / "bert")
    model = text_encoder.load_bert(tmp_path / "bert")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, 7:] = 0
    types = rng.integers(0, 2, (3, 12))
    with torch.no_grad():
        out = ref(
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        )
    hidden, pooled = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4)
    # save_bert writes what load_bert (and transformers) read.
    text_encoder.save_bert(model, tmp_path / "again")
    again = transformers.BertModel.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        out2 = again(
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        )
    np.testing.assert_allclose(out2.pooler_output.numpy(), out.pooler_output.numpy(), atol=1e-6)


def test_info_nce_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    s = an @ bn.T / 0.07

    def ce(logits):  # mean over rows of -log softmax at the diagonal
        m = logits.max(axis=1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    want = 0.5 * (ce(s) + ce(s.T))
    got = float(pretrain.info_nce(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 0.07))
    assert abs(got - want) < 1e-4, (got, want)
    assert float(pretrain.info_nce(jnp.asarray(a), jnp.asarray(a), 0.07)) < got


def test_merl_loss_decreases(data_root, tmp_path):
    cfg = tiny_config("merl", data_root, tmp_path / "merl", **{"train.eval_every": 20})
    metrics = pretrain.pretrain(cfg, cfg.workdir)
    losses = metrics["losses"]
    first, last = (
        np.mean([losses[i] for i in range(1, 6)]),
        np.mean([losses[i] for i in range(16, 21)]),
    )
    assert last < first - 0.3, (first, last)
    assert (tmp_path / "merl" / "tiny_text_encoder" / "config.json").exists()
    assert list((tmp_path / "merl" / "text_cache").glob("pooled-*.npz"))
    enc = pretrain.load_pretrained_encoder(metrics["encoder"])
    assert enc.config.name == "merl_resnet"


def test_missing_text_encoder_is_a_clear_config_error(data_root, tmp_path):
    cfg = tiny_config("merl", data_root, tmp_path, **{"pretrain.text_encoder": str(tmp_path / "x")})
    with pytest.raises(pretrain.ConfigError, match="MedCPT-Query-Encoder") as err:
        pretrain.check_config(cfg)
    assert "huggingface-cli download ncbi/MedCPT-Query-Encoder" in str(err.value)
    paper = load_config("pretrain_merl")
    assert paper.pretrain.text_encoder == "checkpoints/MedCPT-Query-Encoder"
    with pytest.raises(pretrain.ConfigError, match="objective 'mae' needs"):
        pretrain.check_config(
            tiny_config("stmem", data_root, tmp_path, **{"encoder.name": "vit1d"})
        )


def test_paper_configs_build():
    for name, encoder in [
        ("stmem", "stmem"),
        ("mtae", "mtae"),
        ("mlae", "mlae"),
        ("merl", "merl_resnet"),
    ]:
        cfg = load_config(f"pretrain_{name}")
        assert cfg.encoder.name == encoder and cfg.train.batch_size == 256
        assert cfg.data.seg_len == 1250 and cfg.data.target_fs == 250.0
        assert cfg.train.epochs == 50 and cfg.pretrain.mask_ratio == 0.75
        enc_cfg = pretrain.encoder_config(cfg)
        if encoder in ("stmem", "mtae"):
            assert enc_cfg.patch_size == 50 and enc_cfg.encoder.hidden_size == 768
        if encoder == "merl_resnet":
            assert enc_cfg.layers == (3, 4, 23, 3) and enc_cfg.feature_dim == 2048


SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from elmjax import parallel, pretrain
    from elmjax.config import load_config
    out = {}
    for name in ("merl",):
        cfg = load_config(f"pretrain_{name}:demo")
        cfg.data.seg_len = 250
        cfg.encoder.overrides = {"width": 16, "depth": 2}
        rng = np.random.default_rng(0)
        batches = [
            {"signals": rng.normal(size=(8, 12, 250)).astype(np.float32),
             "text": rng.normal(size=(8, 24)).astype(np.float32)}
            for _ in range(2)
        ]
        for n in (1, 8):
            mesh = parallel.make_mesh(devices=jax.devices()[:n])
            fns = pretrain.make_step_fns(cfg, 24, 10, mesh)
            state, losses = fns.state, []
            for i, b in enumerate(batches):
                g = {k: jax.device_put(v, jax.sharding.NamedSharding(
                        mesh, jax.sharding.PartitionSpec(*fns.batch_sharding.spec[:1],
                                                         *([None] * (v.ndim - 1)))))
                     for k, v in b.items()}
                assert n == 1 or len(g["signals"].sharding.device_set) == 8
                state, m = fns.train_step(state, g, jax.random.key(i))
                losses.append(float(m["loss"]))
            out[f"{name}/{n}"] = losses
    print(json.dumps(out))
    """
)


def test_sharded_step_matches_one_device():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    for name in ("merl",):
        np.testing.assert_allclose(out[f"{name}/8"], out[f"{name}/1"], atol=1e-5, rtol=0)
