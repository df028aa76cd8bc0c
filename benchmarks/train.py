"""Benchmark: tokens/s and MFU of the full train step of ``python -m elmjax.train``.

Times the jitted step that :func:`elmjax.train.make_step_fns` builds (forward, backward,
gradient accumulation scan, global-norm clipping, AdamW, finiteness check; donated state) on a
random batch of packed rows, for:

* ``demo``: the demo model of ``configs/ecgbyte_1024.py:demo`` (d=128, 2 layers, full
  fine-tuning, f32), T = 512, batch 16;
* ``llama1b``: a Llama-3.2-1B-shaped model (random bf16 weights, 128,256 + ECG vocabulary rows,
  tied embeddings), LoRA r16 on all seven projections (f32 adapters and AdamW state), bf16
  compute, ``scan_layers`` + ``remat="nothing_saveable"``, T = 1024, batch 1: the paper run's
  step (``configs/ecgbyte_1024.py``) without its checkpoint file.

Both models are built as ``train.py`` builds them (``train.build_model``: born sharded on the
mesh of all local devices, LoRA applied, optimiser state sharded). Compile time is reported
apart; the step time is the mean over ``--steps`` steps after one warm-up step.

MFU = tokens/s x ``train.flops_per_token`` / peak (training FLOPs as in ``train.py``'s logged
MFU: forward 2N + attention, backward 2x forward with LoRA, 3x forward with full fine-tuning;
remat's recomputation is not counted). On CPU the peak is measured in the same run, just
before and just after each model (a jitted 4096^3 matmul, f32 and bf16, best of 5; MFU uses
their mean: these machines are shared and noisy); on GPU/TPU it is ``train.PEAK_TFLOPS`` for the
device kind (bf16 dense, as ``train.py`` logs it), or ``--peak-tflops``.

Usage: ``python benchmarks/train.py [--only demo|llama1b] [--steps 5] [--llama-steps 2]
[--llama-batch 1] [--peak-tflops X]``
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax import parallel, train
from elmjax.config import load_config

LLAMA_1B = {
    "family": "llama",
    "hidden_size": 2048,
    "num_layers": 16,
    "num_heads": 32,
    "num_kv_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "rope_theta": 500000.0,
    "tie_embeddings": True,
}


def matmul_peak(dtype, n: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of a jitted ``n^3`` matmul on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def config_for(name: str, batch: int | None):
    """The run config of a benchmark model and the vocabulary its shards would give."""
    if name == "demo":
        cfg = load_config("ecgbyte_1024:demo")  # d=128, 3 layers, f32, full fine-tuning
        cfg.train.loss_positions = 64  # random_batch has 60 answer tokens per row
        text_vocab = cfg.text.train_vocab_size
    else:
        cfg = load_config("ecgbyte_1024")  # LoRA r16, bf16, scan + remat, T = 1024
        cfg.model.checkpoint = ""
        cfg.model.random = LLAMA_1B
        cfg.model.param_dtype = cfg.model.frozen_dtype  # frozen base weights in bf16
        text_vocab = 128256
    if batch:
        cfg.train.batch_size = batch
    cfg.train.grad_accum = 1
    ecg_rows = 26 + cfg.ecg_tokenizer.num_merges + 3  # symbols + merges, <ecg> </ecg> <pad>
    manifest = {"vocab": {"text_vocab_size": text_vocab, "total_size": text_vocab + ecg_rows}}
    return cfg, manifest


def random_batch(cfg, vocab: int, sharding) -> dict[str, jax.Array]:
    """Packed rows: 4 examples per row, the last 16 tokens of each are the answer."""
    rows, seq = cfg.train.batch_size, cfg.budget
    rng = np.random.default_rng(0)
    per = seq // 4
    segment = np.repeat(np.arange(1, 5, dtype=np.int32), per)[None].repeat(rows, 0)
    positions = np.tile(np.arange(per, dtype=np.int32), 4)[None].repeat(rows, 0)
    mask = ((positions >= per - 16) & (positions < per - 1)).astype(np.float32)
    local = {
        "inputs": rng.integers(0, vocab, (rows, seq), dtype=np.int32),
        "targets": rng.integers(0, vocab, (rows, seq), dtype=np.int32),
        "loss_mask": mask,
        "segment_ids": segment,
        "positions": positions,
    }
    return train.global_batch(local, sharding, rows)


def bench(name: str, steps: int, batch: int | None) -> dict:
    cfg, manifest = config_for(name, batch)
    t0 = time.perf_counter()
    mesh = parallel.make_mesh(**dict(cfg.mesh))
    model = train.build_model(cfg, manifest, mesh)
    schedule = train.learning_rate(cfg, 1000, model.config.hidden_size)
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(
            model, train.make_optimizer(cfg, schedule), wrt=train.trainable(cfg)
        )
        parallel.shard_model_state(optimizer, mesh)
    fns, state = train.make_step_fns(cfg, model, optimizer, mesh)
    llm_cfg = model.config
    del model, optimizer
    jax.block_until_ready(state)
    build_s = time.perf_counter() - t0
    trainable = sum(
        x.size for x in jax.tree.leaves(nnx.filter_state(state[0], train.trainable(cfg)))
    )
    total = sum(x.size for x in jax.tree.leaves(nnx.filter_state(state[0], nnx.Param)))

    batch_arrays = random_batch(cfg, manifest["vocab"]["total_size"], fns.batch_sharding)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    step = fns.train_step.lower(state, batch_arrays, key).compile()
    compile_s = time.perf_counter() - t0

    def run(state):
        state, out = step(state, batch_arrays, key)
        return state, float(out["loss"])

    t0 = time.perf_counter()
    state, loss = run(state)  # warm-up
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, loss = run(state)
        times.append(time.perf_counter() - t0)
    step_s = float(np.mean(times))
    tokens = cfg.train.batch_size * cfg.budget
    tok_s = tokens / step_s
    fpt = train.flops_per_token(llm_cfg, cfg.budget, cfg.lora.rank)
    out = {
        "name": name,
        "params": total,
        "trainable": trainable,
        "batch": cfg.train.batch_size,
        "seq_len": cfg.budget,
        "dtype": cfg.model.dtype,
        "build_s": build_s,
        "compile_s": compile_s,
        "first_step_s": first_s,
        "step_s": step_s,
        "step_s_min": float(np.min(times)),
        "tokens_per_s": tok_s,
        "gflop_per_step": fpt * tokens / 1e9,
        "achieved_gflops": fpt * tok_s / 1e9,
        "loss": loss,
    }
    return out


def cpu_peaks() -> dict[str, float]:
    return {"f32 matmul": matmul_peak(jnp.float32), "bf16 matmul": matmul_peak(jnp.bfloat16)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["demo", "llama1b"], default=None)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of the demo model")
    parser.add_argument("--llama-steps", type=int, default=2, help="timed steps of llama1b")
    parser.add_argument("--llama-batch", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="per device, bf16")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax "
        f"{jax.__version__}, {jax.device_count()} x {device.device_kind}, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    fixed: dict[str, float] = {}
    if args.peak_tflops:
        fixed["--peak-tflops"] = args.peak_tflops * 1e12 * jax.device_count()
    elif device.platform != "cpu":
        cfg, _ = config_for("demo", None)
        if peak := train.peak_flops(cfg):
            fixed["train.PEAK_TFLOPS"] = peak

    names = [args.only] if args.only else ["demo", "llama1b"]
    for name in names:
        steps = args.steps if name == "demo" else args.llama_steps
        batch = args.llama_batch if name == "llama1b" else None
        # CPU: the peak is measured just before and just after the model (shared machines).
        before = fixed or cpu_peaks()
        r = bench(name, steps, batch)
        after = fixed or cpu_peaks()
        peaks = {k: (before[k] + after[k]) / 2 for k in before}
        measured = ", ".join(
            f"{k} {before[k] / 1e9:.0f} / {after[k] / 1e9:.0f} GFLOP/s" for k in before
        )
        mfu = ", ".join(f"{r['achieved_gflops'] * 1e9 / v:.1%} vs {k}" for k, v in peaks.items())
        print(
            f"{name}: {r['params'] / 1e6:.1f}M params ({r['trainable'] / 1e6:.2f}M trained), "
            f"batch {r['batch']} x T {r['seq_len']}, {r['dtype']}\n"
            f"  build {r['build_s']:.1f} s, compile {r['compile_s']:.1f} s, first step "
            f"{r['first_step_s']:.2f} s\n"
            f"  step {r['step_s']:.3f} s (min {r['step_s_min']:.3f}, {steps} steps) = "
            f"{r['tokens_per_s']:.0f} tokens/s; {r['gflop_per_step']:.0f} GFLOP/step -> "
            f"{r['achieved_gflops']:.1f} GFLOP/s; loss {r['loss']:.3f}\n"
            f"  peak{' (before / after)' if not fixed else ''}: {measured}\n"
            f"  MFU {mfu}",
            flush=True,
        )


if __name__ == "__main__":
    main()
