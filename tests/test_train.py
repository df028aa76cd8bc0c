"""python -m elmjax.train: validation before compiling, training, exact resumption, NaN stop."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from elmjax import evaluate, train
from elmjax.config import load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path, **train_changes):
    cfg = load_config("ecgbyte_1024:demo")
    cfg.workdir = str(tmp_path / "run")
    cfg.data.root = str(tmp_path / "data")
    cfg.data.generate_ecgs = 30
    cfg.data.workers = 1
    cfg.data.examples_per_shard = 64
    cfg.data.max_examples = {"train": 200, "valid": 40, "test": 40}
    cfg.ecg_tokenizer.num_merges = 40
    cfg.text.train_vocab_size = 400
    cfg.budget = 256
    cfg.model.random.hidden_size = 32
    cfg.model.random.num_layers = 1
    cfg.model.random.num_heads = 2
    cfg.model.random.num_kv_heads = 1
    cfg.model.random.head_dim = 16
    cfg.model.random.intermediate_size = 64
    cfg.train.batch_size = 4
    cfg.train.steps = 6
    cfg.train.warmup_steps = 2
    cfg.train.log_every = 1
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 3
    cfg.eval.bertscore = False  # its model load is tested in test_metrics
    for key, value in train_changes.items():
        cfg.train[key] = value
    return cfg


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    """A workdir with shards, trained for 6 steps without interruption."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_config(tmp)
    metrics = train.train(cfg, cfg.workdir)
    return tmp, cfg, metrics


def test_trains_and_checkpoints(prepared_run):
    tmp, cfg, metrics = prepared_run
    assert metrics["step"] == 6 and math.isfinite(metrics["loss"])
    steps = sorted(int(p.name) for p in (tmp / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    assert (tmp / "run" / "config.json").exists()
    assert any((tmp / "run" / "tensorboard").iterdir())


def test_resumption_reproduces_the_uninterrupted_run(prepared_run):
    tmp, cfg, metrics = prepared_run
    run2 = tmp / "run2"
    shutil.copytree(tmp / "run" / "shards", run2 / "shards")
    shutil.copytree(tmp / "run" / "segments", run2 / "segments")
    shutil.copytree(tmp / "run" / "tokenizers", run2 / "tokenizers")
    first = train.train(cfg, run2, stop_at=3)
    assert first["step"] == 3
    second = train.train(cfg, run2)
    assert second["step"] == 6
    assert second["loss"] == metrics["loss"]  # bitwise on CPU


def test_loss_goes_down(prepared_run):
    tmp, cfg, metrics = prepared_run
    cfg = tiny_config(tmp, steps=40, lr=3e-3, checkpoint_every=100)
    run3 = tmp / "run3"
    shutil.copytree(tmp / "run" / "shards", run3 / "shards")
    shutil.copytree(tmp / "run" / "tokenizers", run3 / "tokenizers")
    shutil.copytree(tmp / "run" / "segments", run3 / "segments")
    start = train.train(cfg, run3, stop_at=1)["loss"]
    end = train.train(cfg, run3)["loss"]
    assert end < start - 1.0, (start, end)


def copy_prepared(tmp, name):
    run = tmp / name
    for part in ("shards", "tokenizers", "segments"):
        shutil.copytree(tmp / "run" / part, run / part)
    return run


def test_load_trained_reproduces_the_end_of_training_evaluation(prepared_run):
    tmp, cfg, metrics = prepared_run
    assert set(metrics["eval"]) == {"accuracy", "accuracy_without_ecg"}
    model, step = train.load_trained(cfg, tmp / "run")
    assert step == 6
    out = tmp / "reeval"
    copy_prepared(tmp, "reeval")
    again = evaluate.evaluate_run(model, cfg, out, "test", **evaluate.eval_settings(cfg))
    assert again["accuracy"] == metrics["eval"]["accuracy"]
    assert again["accuracy_without_ecg"] == metrics["eval"]["accuracy_without_ecg"]
    assert (out / "eval" / "test" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    early, step3 = train.load_trained(cfg, tmp / "run", step=3)
    assert step3 == 3
    w6, w3 = model.embed_tokens.embedding[...], early.embed_tokens.embedding[...]
    assert not np.array_equal(np.asarray(w6), np.asarray(w3))
    with pytest.raises(train.ConfigError, match="no checkpoint of step 4"):
        train.load_trained(cfg, tmp / "run", step=4)


def test_evaluate_cli_without_checkpoints_says_train_first(tmp_path):
    args = [
        sys.executable,
        "-m",
        "elmjax.evaluate",
        "--config=configs/ecgbyte_1024.py:demo",
        f"--workdir={tmp_path / 'nothing'}",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "no checkpoints; train first" in done.stderr, done.stderr


def test_too_few_loss_positions_stop_with_a_clear_error(prepared_run):
    tmp, _, _ = prepared_run
    cfg = tiny_config(tmp, loss_positions=1, checkpoint_every=1)
    run = copy_prepared(tmp, "run5")
    with pytest.raises(train.ConfigError, match=r"step 1: .* train.loss_positions=1"):
        train.train(cfg, run)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.isdigit()]


def test_non_finite_loss_stops_without_saving(prepared_run):
    tmp, _, _ = prepared_run
    cfg = tiny_config(tmp, lr=1e9, clip_norm=1e9, schedule="constant", checkpoint_every=1)
    run4 = tmp / "run4"
    shutil.copytree(tmp / "run" / "shards", run4 / "shards")
    shutil.copytree(tmp / "run" / "tokenizers", run4 / "tokenizers")
    shutil.copytree(tmp / "run" / "segments", run4 / "segments")
    with pytest.raises(train.NonFiniteLossError, match="stopping without saving") as info:
        train.train(cfg, run4)
    ckpts = run4 / "checkpoints"
    saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    # Checkpoints every step up to the last finite state; the broken step is never saved.
    assert info.value.step not in saved
    assert (saved[-1] if saved else None) == info.value.last_saved
    assert info.value.last_saved is None or info.value.last_saved == info.value.step - 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train.schedule": "linear"}, "unknown train.schedule 'linear'"),
        ({"train.grad_accum": 3}, "must be a positive multiple of train.grad_accum"),
        ({"mesh.tensor": 3}, "does not divide the"),
        ({"model.random.num_kv_heads": 3}, "model.random"),
        ({"lora.rank": -1}, "lora.rank must be >= 0"),
        ({"model.remat": "everything"}, "jax.checkpoint_policies"),
    ],
)
def test_config_errors_come_before_compiling(tmp_path, change, message):
    cfg = tiny_config(tmp_path)
    for key, value in change.items():
        section, name = key.rsplit(".", 1)
        node = cfg
        for part in section.split("."):
            node = node[part]
        node[name] = value
    with pytest.raises(train.ConfigError, match=message):
        train.train(cfg, tmp_path / "never")
    assert not (tmp_path / "never" / "shards").exists()


def test_compilation_cache_setting(tmp_path):
    """``enable_compilation_cache``: the env directory, ``off``, and JAX's own setting kept."""
    code = (
        "import jax\n"
        "from elmjax.train import enable_compilation_cache\n"
        "print(enable_compilation_cache(), jax.config.jax_compilation_cache_dir,\n"
        "      jax.config.jax_persistent_cache_min_compile_time_secs)\n"
    )

    def run(**env):
        base = {k: v for k, v in __import__("os").environ.items() if "COMPILATION_CACHE" not in k}
        p = subprocess.run(
            [sys.executable, "-c", code],
            env=base | env | {"JAX_PLATFORMS": "cpu"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout.splitlines()[0]

    cache, own = tmp_path / "cache", tmp_path / "jax"
    assert run(ELMJAX_COMPILATION_CACHE=str(cache)) == f"{cache} {cache} 0.2"
    assert run(ELMJAX_COMPILATION_CACHE="off") == "None None 1.0"
    assert run(JAX_COMPILATION_CACHE_DIR=str(own)) == f"{own} {own} 1.0"
    assert run().startswith(f"{train.COMPILATION_CACHE} ")
