"""Training on several devices and processes, each run in a subprocess (fake CPU devices must be
set before JAX starts): sharded meshes, two jax.distributed processes, kill -9 and SIGTERM,
CLI errors, and the launch scripts' commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from elmjax import prepare
from elmjax.config import load_config

REPO = Path(__file__).resolve().parents[1]

# A tiny model whose heads (4), kv heads (2), MLP (64) and width (32) divide tensor=2 and fsdp=4.
TINY_CONFIG = """
from elmjax.config import load_config


def get_config(arg=None):
    cfg = load_config("ecgbyte_1024:demo")
    cfg.data.root = {data!r}
    cfg.data.generate_ecgs = 30
    cfg.data.workers = 1
    cfg.data.examples_per_shard = 64
    cfg.data.max_examples = {{"train": 200, "valid": 40, "test": 40}}
    cfg.ecg_tokenizer.num_merges = 40
    cfg.text.train_vocab_size = 400
    cfg.budget = 256
    r = cfg.model.random
    r.hidden_size, r.num_layers, r.num_heads, r.num_kv_heads = 32, 1, 4, 2
    r.head_dim, r.intermediate_size = 8, 64
    cfg.train.batch_size = 8
    cfg.train.steps = 3
    cfg.train.warmup_steps = 2
    cfg.train.log_every = 1
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 100
    cfg.eval.after_training = False
    return cfg
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A directory with ``tiny.py`` (the config), ``prepared/`` (its shards) and ``jax-cache``
    (a persistent compilation cache shared by the session's pytest-xdist workers)."""
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "tiny.py").write_text(TINY_CONFIG.format(data=str(tmp / "data")))
    cfg = load_config(str(tmp / "tiny.py"))
    cfg.workdir = str(tmp / "prepared")
    prepare.prepare(cfg)
    session = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        session = session.parent  # the workers' common directory
    (session / "elmjax-jax-cache").mkdir(exist_ok=True)
    (tmp / "jax-cache").symlink_to(session / "elmjax-jax-cache")
    return tmp


def new_run(prepared: Path, name: str) -> Path:
    """A run directory holding a copy of the prepared shards."""
    run = prepared / name
    for part in ("shards", "segments", "tokenizers"):
        shutil.copytree(prepared / "prepared" / part, run / part)
    return run


def env(prepared: Path | None = None, devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a subprocess on ``devices`` CPU devices. With ``prepared``, the runs
    share the session's persistent compilation cache (a rerun of a program loads it)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "ELMJAX_", "JAX_"))}
    out.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if prepared is not None:
        out["JAX_COMPILATION_CACHE_DIR"] = str(prepared / "jax-cache")
        out["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return out


def train_cli(prepared: Path, run: Path, *overrides: str) -> list[str]:
    """``python -m elmjax.train`` on the tiny config with ``--config.<override>`` flags."""
    cmd = [sys.executable, "-m", "elmjax.train", f"--config={prepared / 'tiny.py'}"]
    return cmd + [f"--workdir={run}"] + [f"--config.{o}" for o in overrides]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def losses_of(metrics: dict) -> dict[int, float]:
    return {int(k): v for k, v in metrics["losses"].items()}


def start_python(prepared: Path, code: str, devices: int, **extra: str) -> subprocess.Popen:
    """Starts ``code`` in a fresh interpreter on ``devices`` CPU devices."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env(prepared, devices, **extra),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(proc: subprocess.Popen, timeout: int = 300) -> dict:
    """The JSON last line of a started interpreter's output."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-4000:]
    return last_json(stdout)


def run_python(prepared: Path, code: str, devices: int, **extra: str) -> dict:
    return result(start_python(prepared, code, devices, **extra))


def checkpoint_steps(run: Path) -> list[int]:
    ckpts = run / "checkpoints"
    return (
        sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []
    )


def step_log(directory: Path, process: int = 0) -> dict[int, dict]:
    """``ELMJAX_STEP_LOG`` of one process: step -> {"loss", "rows" (hashes of its rows)}."""
    lines = (directory / f"steps-{process}.jsonl").read_text().splitlines()
    return {e["step"]: e for e in map(json.loads, lines)}


def rows_log(directory: Path, process: int) -> dict[int, list[str]]:
    return {step: e["rows"] for step, e in step_log(directory, process).items()}


def logged_losses(directory: Path) -> dict[int, float]:
    return {step: e["loss"] for step, e in step_log(directory).items()}


# ----------------------------------------------------------------------------------------------
# 1. Meshes on 8 devices give the loss of 1 device
# ----------------------------------------------------------------------------------------------

# name: (data, fsdp, tensor, grad_accum, variant). "full": full fine-tuning of the tiny model;
# "lora": the paper run's structure (LoRA with dropout, 2 scanned layers, remat).
MESHES = {
    "8x1x1": (8, 1, 1, 1, "full"),
    "2x2x2 accum 2": (2, 2, 2, 2, "full"),  # 2 micro-batches of 4 rows
    "1x4x2 lora": (1, 4, 2, 1, "lora"),
}
REFERENCES = {"1x1x1": (1, 1, 1, 1, "full"), "1x1x1 lora": (1, 1, 1, 1, "lora")}


def test_meshes_match_one_device(prepared):
    code = """
        import json, jax
        from elmjax import train
        from elmjax.config import load_config

        assert jax.device_count() == {devices}, jax.devices()
        out = {{}}
        for name, (data, fsdp, tensor, accum, variant) in {meshes!r}.items():
            cfg = load_config({config!r})
            cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, tensor
            cfg.train.grad_accum = accum
            if variant == "lora":
                cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.1
                cfg.model.random.num_layers = 2
                cfg.model.scan_layers, cfg.model.remat = True, "nothing_saveable"
                cfg.train.lr = 1e-2
            out[name] = train.train(cfg, {runs!r}[name])["losses"]
        print(json.dumps(out))
    """
    config = str(prepared / "tiny.py")
    runs = {name: str(new_run(prepared, name.replace(" ", "-"))) for name in REFERENCES | MESHES}
    code1 = code.format(config=config, devices=1, meshes=REFERENCES, runs=runs)
    code8 = code.format(config=config, devices=8, meshes=MESHES, runs=runs)
    one, eight = start_python(prepared, code1, 1), start_python(prepared, code8, 8)
    references, sharded = result(one), result(eight)
    assert references["1x1x1"] != references["1x1x1 lora"]
    for name, (*_, variant) in MESHES.items():
        reference = references["1x1x1" + (" lora" if variant == "lora" else "")]
        assert sharded[name].keys() == reference.keys() and len(reference) == 3
        for step, loss in reference.items():
            assert abs(sharded[name][step] - loss) <= 1e-5, (name, step, sharded[name], reference)


# ----------------------------------------------------------------------------------------------
# 2. Two processes x 2 devices (mesh 2x1x2) = one device reading both hosts' slices
# ----------------------------------------------------------------------------------------------

# One process that feeds the global batch exactly as two hosts do: host i's rows are the
# examples i, i + 2, ... (pipeline.make_dataset(shard_index=i, shard_count=2)), concatenated.
# (Test 1 shows that the mesh does not change the loss.)
TWO_HOSTS_IN_ONE = """
    import dataclasses, json
    import numpy as np
    from elmjax import train
    from elmjax.config import load_config
    from elmjax.data import pipeline

    make_dataset = pipeline.make_dataset

    class Hosts:
        def __init__(self, datasets):
            self.its = [iter(d) for d in datasets]

        def __iter__(self):
            return self

        def __next__(self):
            parts = [next(it) for it in self.its]
            return {{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}}

        def get_state(self):
            return [it.get_state() for it in self.its]

    def two_hosts(paths, cfg, *, shard_index, shard_count):
        assert (shard_index, shard_count) == (0, 1)
        half = dataclasses.replace(cfg, batch_size=cfg.batch_size // 2)
        datasets = [make_dataset(paths, half, shard_index=i, shard_count=2) for i in range(2)]
        return type("Both", (), {{"__iter__": lambda self: Hosts(datasets)}})()

    pipeline.make_dataset = two_hosts
    cfg = load_config({config!r})
    cfg.train.eval_every = 3
    cfg.train.checkpoint_every = 2
    print(json.dumps(train.train(cfg, {run!r})))
"""


def test_two_processes_match_one(prepared):
    ref_run = new_run(prepared, "one-process")
    run = new_run(prepared, "two-processes")
    code = TWO_HOSTS_IN_ONE.format(config=str(prepared / "tiny.py"), run=str(ref_run))
    reference = run_python(prepared, code, 1, ELMJAX_STEP_LOG=str(ref_run))

    def two_processes(log_dir: Path) -> dict:
        cmd = ["launch/local_multiprocess.sh", "2", str(prepared / "tiny.py"), f"--workdir={run}"]
        cmd += ["--config.mesh.data=2", "--config.mesh.tensor=2"]
        cmd += ["--config.train.eval_every=3", "--config.train.checkpoint_every=2"]
        extra = dict(DEVICES_PER_PROCESS="2", LOG_DIR=str(log_dir), PYTHON=sys.executable)
        environ = env(prepared, ELMJAX_STEP_LOG=str(log_dir), **extra)
        del environ["XLA_FLAGS"]  # the script sets the device count
        p = subprocess.run(
            cmd,
            env=environ,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        other = (log_dir / "process-1.log").read_text()
        assert p.returncode == 0, p.stderr[-3000:] + other[-3000:]
        return last_json(p.stdout)

    first = two_processes(prepared / "logs-first")
    ref_losses, losses = losses_of(reference), logged_losses(prepared / "logs-first")
    assert sorted(losses) == sorted(ref_losses) == [1, 2, 3]
    for step, loss in ref_losses.items():
        assert abs(losses[step] - loss) <= 1e-5, (losses, ref_losses)
    assert abs(first["valid_loss"] - reference["valid_loss"]) <= 1e-5
    assert first["tokens_seen"] == reference["tokens_seen"]

    # Each host fed its own slice: disjoint rows, together the one-process global batch.
    host0, host1 = rows_log(prepared / "logs-first", 0), rows_log(prepared / "logs-first", 1)
    one = rows_log(ref_run, 0)
    for step in (1, 2, 3):
        assert len(host0[step]) == len(host1[step]) == 4
        assert not set(host0[step]) & set(host1[step])
        assert host0[step] + host1[step] == one[step]

    # Orbax saved on both processes into one directory; a rerun resumes from step 2 with each
    # host's own data position and reproduces step 3.
    assert checkpoint_steps(run) == [2, 3]
    shutil.rmtree(run / "checkpoints" / "3")
    second = two_processes(prepared / "logs-second")
    assert second["step"] == 3
    assert list(logged_losses(prepared / "logs-second")) == [3]
    assert abs(logged_losses(prepared / "logs-second")[3] - losses[3]) <= 1e-6
    resumed = rows_log(prepared / "logs-second", 0)[3] + rows_log(prepared / "logs-second", 1)[3]
    assert resumed == one[3]
    assert checkpoint_steps(run) == [2, 3]


def test_two_process_evaluation_matches_one(prepared, tmp_path):
    """``python -m elmjax.evaluate`` on 2 processes x 2 devices (the model sharded over the
    4-device mesh, every process generating every answer, process 0 writing) writes the same
    predictions and metrics as one process on one device."""
    run = new_run(prepared, "evaluated")

    def ok(cmd: list[str], environ: dict[str, str]) -> str:
        p = subprocess.run(cmd, env=environ, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    ok(train_cli(prepared, run, "train.steps=2"), env(prepared))
    args = ["--limit=6", "--max_new_tokens=4", "--ablate=zeros", "--seeds=0,1"]
    args += ["--temperature=1.0", "--bertscore=false"]  # sampling: per-row seeded draws
    ok([sys.executable, "-m", "elmjax.evaluate", f"--workdir={run}", *args], env(prepared))
    shutil.move(run / "eval", tmp_path / "one")

    cmd = ["launch/local_multiprocess.sh", "2", str(prepared / "tiny.py"), f"--workdir={run}"]
    extra = dict(DEVICES_PER_PROCESS="2", LOG_DIR=str(tmp_path / "logs"), PYTHON=sys.executable)
    environ = env(prepared, MODULE="elmjax.evaluate", **extra)
    del environ["XLA_FLAGS"]  # the script sets the device count
    two = subprocess.run(
        cmd + args, env=environ, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    other = (tmp_path / "logs" / "process-1.log").read_text()
    assert two.returncode == 0, two.stderr[-3000:] + other[-3000:]
    assert "wrote" in two.stdout and "wrote" not in other  # process 0 wrote and printed

    def lines(root: Path) -> list[dict]:
        text = (root / "test" / "predictions.jsonl").read_text().splitlines()
        return [json.loads(x) for x in text]

    want, got = lines(tmp_path / "one"), lines(run / "eval")
    assert len(want) == 6 * 2 * 2 and got == want  # answers x conditions x seeds
    metrics = [
        json.loads((d / "test" / "metrics.json").read_text())
        for d in (tmp_path / "one", run / "eval")
    ]
    assert metrics[1]["conditions"] == metrics[0]["conditions"]


# ----------------------------------------------------------------------------------------------
# 3-4. kill -9 and SIGTERM
# ----------------------------------------------------------------------------------------------


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the condition")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_kill_9_resumes_from_the_last_complete_checkpoint(prepared):
    steps = ["train.steps=24", "train.checkpoint_every=2"]
    straight = new_run(prepared, "straight")
    environ = env(prepared, ELMJAX_STEP_LOG=str(straight))
    p = subprocess.run(
        train_cli(prepared, straight, *steps), env=environ, capture_output=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    reference = logged_losses(straight)
    assert sorted(reference) == list(range(1, 25))

    run = new_run(prepared, "killed")
    proc = subprocess.Popen(
        train_cli(prepared, run, *steps),
        env=env(prepared),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: (run / "checkpoints" / "4").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    complete = checkpoint_steps(run)
    assert 4 <= complete[-1] < 24, complete

    environ = env(prepared, ELMJAX_STEP_LOG=str(run / "resumed"))
    p = subprocess.run(
        train_cli(prepared, run, *steps), env=environ, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"at step {complete[-1]}" in p.stdout
    resumed = logged_losses(run / "resumed")
    assert sorted(resumed) == list(range(complete[-1] + 1, 25))
    assert {s: reference[s] for s in resumed} == resumed  # bitwise on CPU


def test_sigterm_saves_and_exits_0(prepared):
    run = new_run(prepared, "sigterm")
    # The program of the kill -9 test (same steps, hence schedule): the compilation cache has it.
    cmd = train_cli(prepared, run, "train.steps=24", "train.checkpoint_every=1000")
    proc = subprocess.Popen(
        cmd,
        env=env(prepared, ELMJAX_STEP_LOG=str(run)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    log = run / "steps-0.jsonl"
    wait_for(lambda: log.exists() and log.read_text(), proc)  # step 1 is done
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    metrics = last_json(stdout)
    assert 1 <= metrics["step"] < 24
    assert f"SIGTERM: saved step {metrics['step']}, exiting" in stdout
    assert checkpoint_steps(run) == [metrics["step"]]


# ----------------------------------------------------------------------------------------------
# 5. Config errors: exit 2 with a message, before anything compiles or is written
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "devices, overrides, message",
    [
        (1, ["mesh.tensor=3"], "does not divide the 1 devices"),
        (
            8,
            ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.batch_size=6"],
            "the micro-batch of 6 rows does not divide over 4 data-parallel devices",
        ),
    ],
)
def test_cli_config_error_exits_2(prepared, tmp_path, devices, overrides, message):
    run = tmp_path / "never"
    start = time.monotonic()
    p = subprocess.run(
        train_cli(prepared, run, *overrides),
        env=env(prepared, devices),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in p.stderr
    assert not run.exists()
    assert time.monotonic() - start < 60


# ----------------------------------------------------------------------------------------------
# Launch scripts (dry runs)
# ----------------------------------------------------------------------------------------------


def dry_run(*cmd: str, **extra: str) -> list[str]:
    p = subprocess.run(
        list(cmd),
        env=env(None, DRY_RUN="1", **extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().splitlines()


def test_launch_scripts_dry_run():
    script = "launch/local_multiprocess.sh"
    config = "configs/ecgbyte_1024.py:demo"
    lines = dry_run(script, "3", config, "--config.seed=1", PORT="12345", DEVICES_PER_PROCESS="2")
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert "ELMJAX_COORDINATOR=127.0.0.1:12345" in line
        assert f"ELMJAX_NUM_PROCESSES=3 ELMJAX_PROCESS_ID={i} " in line
        assert "--xla_force_host_platform_device_count=2" in line
        assert "-m elmjax.train --config=configs/ecgbyte_1024.py:demo --config.seed=1" in line

    lines = dry_run(
        "launch/sweep.sh", "configs/ecgbyte_1024.py:demo", "train.lr=1e-3,3e-3", "seed=0,1"
    )
    assert len(lines) == 4
    tags = ["train.lr=1e-3_seed=0", "train.lr=1e-3_seed=1", "train.lr=3e-3_seed=0"]
    for line, tag in zip(lines, tags, strict=False):
        assert f"--workdir=runs/ecgbyte_1024_demo/{tag}" in line
        assert "--config.train.lr=" in line and "--config.seed=" in line
    assert "--config.train.lr=3e-3 --config.seed=1" in lines[3]

    lines = dry_run("launch/tpu_pod.sh", "my-tpu", "us-central2-b", "configs/ecgbyte_1024.py")
    assert lines[0].startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone us-central2-b")
    assert "--worker=all" in lines[0] and "ELMJAX_DISTRIBUTED=1" in lines[0]

    p = subprocess.run(["bash", "-n", "launch/slurm_gpu.sbatch"], cwd=REPO, capture_output=True)
    assert p.returncode == 0, p.stderr
