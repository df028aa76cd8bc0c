"""The signal and image paths end to end: each :demo config prepares, trains, resumes from its
checkpoint and evaluates through ``python -m elmjax.train``'s code, with the encoder frozen or
trained as configured."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from elmjax import evaluate, parallel, prepare, train
from elmjax.config import load_config
from elmjax.models import elm


def tiny_config(tmp_path, name, **changes):
    cfg = load_config(f"{name}:demo")
    cfg.workdir = str(tmp_path / "run")
    cfg.data.root = str(tmp_path / "data")
    cfg.data.generate_ecgs = 30
    cfg.data.workers = 1
    cfg.data.max_examples = {"train": 120, "valid": 40, "test": 40}
    cfg.text.train_vocab_size = 400
    if cfg.representation == "image":
        cfg.data.image_size = 32
    cfg.model.random.hidden_size = 32
    cfg.model.random.num_layers = 1
    cfg.model.random.num_heads = 2
    cfg.model.random.num_kv_heads = 1
    cfg.model.random.head_dim = 16
    cfg.model.random.intermediate_size = 64
    cfg.train.batch_size = 4
    cfg.train.steps = 8
    cfg.train.warmup_steps = 1
    cfg.train.lr = 3e-3
    cfg.train.log_every = 1
    cfg.train.eval_every = 4
    cfg.train.checkpoint_every = 4
    cfg.eval.batch_size = 8
    cfg.eval.bertscore = False  # its model load is tested in test_metrics
    for key, value in changes.items():
        node = cfg
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return cfg


@pytest.mark.parametrize("name", ["signal_stmem_1024", "image_vit_1024"])
def test_demo_config_trains_resumes_and_evaluates(tmp_path, name):
    cfg = tiny_config(tmp_path, name)
    whole = train.train(cfg, tmp_path / "whole")
    losses = whole["losses"]
    assert sorted(losses) == list(range(1, 9)) and all(map(math.isfinite, losses.values()))
    assert losses[8] < losses[1] - 1.0, losses  # the answers are learnt from ~ln(V)
    assert math.isfinite(whole["valid_loss"])
    assert set(whole["eval"]) == {"accuracy", "accuracy_without_ecg"}

    # Interrupted at step 4 and resumed: the same losses as the uninterrupted run.
    train.train(cfg, tmp_path / "cut", stop_at=4)
    resumed = train.train(cfg, tmp_path / "cut")
    assert sorted(resumed["losses"]) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert resumed["losses"][step] == pytest.approx(losses[step], abs=1e-6)

    model, step = train.load_trained(cfg, tmp_path / "whole")
    assert isinstance(model, elm.ELM) and step == 8
    metrics = evaluate.evaluate_run(
        model, cfg, tmp_path / "whole", "test", **evaluate.eval_settings(cfg)
    )
    assert metrics["accuracy"] == pytest.approx(whole["eval"]["accuracy"])
    assert (
        metrics["answers"]
        == prepare.load_manifest(tmp_path / "whole")["splits"]["test"]["examples"]
    )
    # Every answer one teacher-forced pass gets right token for token, greedy generation
    # reproduces; generation may also be right after whitespace-only tokens the text metrics
    # strip (an 8-step model emits some), so it can score more, never less.
    examples = evaluate.load_split(tmp_path / "whole", "test")
    vocab = evaluate.inputs.vocab_of(prepare.load_manifest(tmp_path / "whole"))
    forced = evaluate.exact_match(model, examples, vocab, seq_len=cfg.budget, progress=False)
    assert metrics["accuracy"] >= forced["all"]["accuracy"] - 1e-9


def test_a_frozen_encoder_stays_as_built_and_the_projector_learns(tmp_path):
    cfg = tiny_config(tmp_path, "signal_mlae_1024", **{"encoder.train": False, "train.steps": 3})
    cfg.train.eval_every = 0
    train.train(cfg, cfg.workdir)
    trained, _ = train.load_trained(cfg, cfg.workdir)
    manifest = prepare.load_manifest(cfg.workdir)
    fresh = train.build_model(cfg, manifest, parallel.make_mesh())
    same = jax.tree.map(np.array_equal, nnx.state(trained.encoder), nnx.state(fresh.encoder))
    assert all(jax.tree.leaves(same))
    moved = jax.tree.map(np.array_equal, nnx.state(trained.projector), nnx.state(fresh.projector))
    assert not any(jax.tree.leaves(moved))


def test_signal_and_image_settings_are_checked_before_anything_runs(tmp_path):
    cfg = tiny_config(tmp_path, "signal_stmem_1024", **{"train.fit": "pack"})
    with pytest.raises(train.ConfigError, match="one example per row: set train.fit='pad'"):
        train.check_config(cfg)
    cfg = tiny_config(tmp_path, "image_clip_1024", **{"encoder.name": "stmem"})
    with pytest.raises(train.ConfigError, match="'stmem' is not a image encoder"):
        train.check_config(cfg)
    for name, hint in [
        ("signal_merl_1024", "python -m elmjax.pretrain --config=configs/pretrain_merl.py"),
        ("image_siglip_1024", "huggingface-cli download google/siglip-base-patch16-224"),
    ]:
        cfg = load_config(name)  # the paper run, its LLM pointed at nothing to get past it
        cfg.model.checkpoint = cfg.text.tokenizer = ""
        with pytest.raises(
            train.ConfigError, match=f"encoder.checkpoint .* does not exist: .*{hint}"
        ):
            train.check_config(cfg)
