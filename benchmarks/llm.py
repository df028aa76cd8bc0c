"""Benchmark: LoRA training step and greedy decoding, elmjax vs transformers + peft, same run.

Rows (each beside the PyTorch equivalent, same config, batch and tokens, timed in this run):

* LoRA training step tokens/s: forward + backward + AdamW on LoRA r16 (alpha 32, dropout 0.05)
  on all seven projections, base frozen. elmjax: ``nnx.value_and_grad`` with
  ``nnx.DiffState(0, nnx.LoRAParam)``, ``nnx.Optimizer(..., wrt=nnx.LoRAParam)``, one
  ``jax.jit`` with the state donated. transformers: ``peft.get_peft_model`` + ``torch.optim.AdamW``
  on the trainable parameters. Loss: mean next-token cross-entropy, computed by hand on both
  sides (no label shifting inside the model).
  - "full head": logits at every position ``[B, T, V]``;
  - "head at K positions": the LM head only at K positions per row (elmjax
    ``logits_positions``, the training path's answer positions; transformers
    ``logits_to_keep=K``, the last K positions: the same amount of work).
* Greedy decoding new tokens/s: batch B, P-token prompts, N new tokens, no stop id ever hit
  (every row generates N tokens). elmjax ``elmjax.generate.generate`` (prefill + one compiled
  ``while_loop``) vs ``model.generate(do_sample=False)`` with transformers' default dynamic
  cache. The time includes the prefill; ``prefill only`` rows time ``max_new_tokens=1``.

Default (CPU): a SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads, 3 kv heads,
intermediate 1536, vocab 49152, tied) with random weights, float32; the elmjax model is
loaded with ``models.hf.load_hf`` from the very weights transformers uses (saved to a temporary
directory), and the greedy outputs of both are compared token by token (reported, not
asserted: random weights make near-ties, and float32 summation order differs).

``--gpu``: Llama-3.2-1B shapes (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate
8192, vocab 128256, tied, llama3 RoPE scaling), bfloat16 parameters and compute (LoRA factors
float32, cast to bf16 in the matmuls), T = 1024; random weights on both sides (no save/load);
the transformers rows run only if torch sees CUDA. Prints achieved TFLOP/s and, with
``--peak-tflops``, MFU. ``--small`` shrinks every shape (a smoke run of either path on CPU).

FLOPs of a LoRA step with a frozen base (``lora_step_flops``), B rows of T tokens, K head
positions per row, L layers, P_l = dense projection parameters of one layer (q, k, v, o, gate,
up, down), D hidden, V vocab, H heads, Dh head dim, r rank, S_l = sum over the adapted
projections of (in + out):

  forward    2 P_l L B T + 2 D V B K + 2 B L H T^2 Dh (causal QK^T and PV, half the square)
             + 2 r S_l L B T
  backward   activation gradients only for the frozen weights: 2 P_l L B T + 2 D V B K;
             attention: twice its forward (dQ, dK, dP, dV) = 4 B L H T^2 Dh;
             LoRA: activation gradients 2 r S_l L B T + weight gradients 2 r S_l L B T.
  total      4 P_l L B T + 4 D V B K + 6 B L H T^2 Dh + 6 r S_l L B T

so about 4 N T rather than the 6 N T of full training (no weight gradients for the frozen base).
Not counted: norms, RoPE, softmax, the optimizer; the (unneeded) input gradient of layer 0;
remat recomputation (model FLOPs, not hardware FLOPs). Attention counts only the causal half
(the einsum attention computes the full square, so its waste lowers the MFU, as it should).

Usage::

    python benchmarks/llm.py                       # CPU: SmolLM2-135M shapes
    python benchmarks/llm.py --small               # CPU smoke run (seconds)
    python benchmarks/llm.py --gpu --peak-tflops 989   # H100/H200 bf16 dense peak
    python benchmarks/llm.py --gpu --small         # the GPU path's code on CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from elmjax import parallel
from elmjax.generate import generate
from elmjax.models import hf, lora
from elmjax.models.llm import LLM, LLMConfig

TARGETS = lora.ALL_TARGETS
RANK, ALPHA, DROPOUT = 16, 32.0, 0.05
TRAIN_TRACES = [0]  # traces of the elmjax train step (a compile inside the timed loop shows)

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
LLAMA32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    tie_word_embeddings=True,
)
SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


@dataclasses.dataclass
class Setup:
    shapes: dict[str, Any]
    dtype: str  # "float32" | "bfloat16"
    batch: int
    seq: int
    head_positions: int
    decode_batch: int
    prompt: int
    new_tokens: int
    steps: int
    decode_runs: int
    scan_layers: bool = False
    dropout: float = DROPOUT


def setup_for(args) -> Setup:
    if args.small:
        shapes = dict(SMALL)
        if args.gpu:
            shapes["rope_scaling"] = dict(LLAMA32_1B["rope_scaling"])
        return Setup(shapes, "bfloat16" if args.gpu else "float32", 2, 64, 8, 2, 32, 8, 2, 1)
    if args.gpu:
        return Setup(dict(LLAMA32_1B), "bfloat16", args.batch or 8, 1024, 32, 8, 1024, 128, 5, 2)
    return Setup(dict(SMOLLM2_135M), "float32", args.batch or 4, 512, 32, 8, 256, 64, 3, 2)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def lora_step_flops(c: LLMConfig, batch: int, seq: int, head_positions: int, rank: int) -> dict:
    """Model FLOPs of one frozen-base LoRA step (module docstring); a dict of the parts."""
    d, f, h, kv, dh, layers = (
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.num_layers,
    )
    proj = {
        "q_proj": (d, h * dh),
        "k_proj": (d, kv * dh),
        "v_proj": (d, kv * dh),
        "o_proj": (h * dh, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    p_layer = sum(i * o for i, o in proj.values())
    s_layer = sum(i + o for name, (i, o) in proj.items() if name in TARGETS)
    tokens = batch * seq
    dense = 2 * p_layer * layers * tokens
    head = 2 * d * c.total_vocab * batch * head_positions
    attn = 2 * batch * layers * h * seq * seq * dh  # causal half of QK^T + PV
    lora_fwd = 2 * rank * s_layer * layers * tokens
    forward = dense + head + attn + lora_fwd
    backward = dense + head + 2 * attn + 2 * lora_fwd
    n_params = p_layer * layers + d * c.total_vocab
    return dict(
        forward=forward,
        backward=backward,
        total=forward + backward,
        six_n_t=6 * n_params * tokens,
        params=n_params,
    )


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def hf_config(s: Setup):
    import transformers

    cfg = transformers.LlamaConfig(**s.shapes)
    return cfg


def torch_model(s: Setup, device: str):
    import torch
    import transformers

    torch.manual_seed(0)
    dtype = torch.bfloat16 if s.dtype == "bfloat16" else torch.float32
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config(s)).to(dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def jax_model(s: Setup, torch_ref=None) -> LLM:
    """The elmjax model: loaded from ``torch_ref``'s weights, or a random init (jit, sharded)."""
    if torch_ref is not None:
        with tempfile.TemporaryDirectory() as tmp:
            torch_ref.save_pretrained(tmp, safe_serialization=True)
            model, _ = hf.load_hf(tmp, dtype=s.dtype, scan_layers=s.scan_layers)
        return model
    cfg = LLMConfig.from_hf(
        hf_config(s).to_dict(), dtype=s.dtype, param_dtype=s.dtype, scan_layers=s.scan_layers
    )
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    return parallel.create_sharded(lambda: LLM(cfg, rngs=nnx.Rngs(0)), mesh)


def batch_for(s: Setup, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (s.batch, s.seq + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def interleaved(
    fns: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]], runs: int, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Times ``{name: (fn, sync)}`` alternately (A B A B ...), after ``warmup`` calls of each.

    The machine is shared: alternating spreads the other jobs' load over both sides. Returns,
    per name, the median wall and process-CPU seconds of the timed calls and every wall time
    (warm-up calls first).
    """
    out = {name: {"wall": [], "cpu": []} for name in fns}
    for name, (fn, sync) in fns.items():
        for _ in range(warmup):
            t0 = time.perf_counter()
            sync(fn())
            out[name]["wall"].append(time.perf_counter() - t0)
    for _ in range(runs):
        for name, (fn, sync) in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            sync(fn())
            out[name]["wall"].append(time.perf_counter() - t0)
            out[name]["cpu"].append(time.process_time() - c0)
    for r in out.values():
        r["median"] = statistics.median(r["wall"][warmup:])
        r["cpu_median"] = statistics.median(r["cpu"])
    return out


def _fmt_times(r: dict[str, Any]) -> str:
    return f"wall {[round(x, 3) for x in r['wall']]} cpu {[round(x, 3) for x in r['cpu']]}"


def jax_train_step(model: LLM, s: Setup, head_positions: int | None):
    """A jitted LoRA step; returns a thunk running one step on the carried state.

    ``model`` is wrapped in LoRA in place (pass a clone). Only the changing state (adapters,
    optimizer moments, dropout RNG) is donated: the frozen base arrays are shared with other
    copies of the model and must stay alive.
    """
    lora.apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA, dropout=s.dropout, rngs=nnx.Rngs(0))
    model.train()
    opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)
    frozen_filter = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    graphdef, frozen, changing = nnx.split((model, opt), frozen_filter, ...)
    tokens, targets = batch_for(s, model.config.total_vocab)
    lp = None
    if head_positions:  # the last K positions (what transformers' logits_to_keep=K keeps)
        lp = np.arange(s.seq - head_positions, s.seq, dtype=np.int32)
        lp = np.broadcast_to(lp, (s.batch, head_positions))
        targets = np.take_along_axis(targets, lp, axis=1)
        lp = jnp.asarray(lp)
    tokens, targets = jnp.asarray(tokens), jnp.asarray(targets)
    # Commit the fresh adapter / optimizer arrays where the base lives: the step's outputs are
    # committed, and committed vs uncommitted inputs would be a second jit signature.
    like = jax.tree.leaves(frozen)[0].sharding
    if isinstance(like, jax.sharding.NamedSharding):
        like = jax.sharding.NamedSharding(like.mesh, jax.sharding.PartitionSpec())
    changing = jax.device_put(changing, like)
    traces = TRAIN_TRACES

    @functools.partial(jax.jit, donate_argnums=1)
    def step(frozen, changing, tokens, targets, lp):
        traces[0] += 1
        model, opt = nnx.merge(graphdef, frozen, changing)

        def loss_fn(model):
            logits = model(tokens, logits_positions=lp)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            return ce.mean()

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
        loss, grads = grad_fn(model)
        opt.update(model, grads)
        return nnx.state((model, opt), nnx.Not(frozen_filter)), loss

    box = [changing]

    def run():
        box[0], loss = step(frozen, box[0], tokens, targets, lp)
        return loss

    return run


def torch_train_step(model, s: Setup, head_positions: int | None, device: str):
    import peft
    import torch

    cfg = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=s.dropout,
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(model, cfg)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    tokens, targets = batch_for(s, model.config.vocab_size)
    if head_positions:
        targets = targets[:, -head_positions:]
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=device)
    targets = torch.as_tensor(targets, dtype=torch.long, device=device)
    kw = dict(logits_to_keep=head_positions) if head_positions else {}

    def run():
        logits = pm(input_ids=tokens, use_cache=False, **kw).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def unwrap():
        return pm.unload()  # the base model without adapters (for the decode rows)

    return run, unwrap


def torch_sync(device: str):
    import torch

    def sync(x):
        if device == "cuda":
            torch.cuda.synchronize()
        return x.item() if hasattr(x, "item") and x.numel() == 1 else x

    return sync


def jax_sync(x):
    return jax.block_until_ready(x)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def fmt_row(name: str, jax_v: float, torch_v: float | None, unit: str, higher=True) -> str:
    """A table row; the last column is elmjax's speed-up (>1: elmjax is faster)."""
    j = _num(jax_v)
    t = _num(torch_v) if torch_v else "-"
    speedup = "-"
    if torch_v:
        speedup = f"{(jax_v / torch_v if higher else torch_v / jax_v):.2f}x"
    return f"| {name} | {j} | {t} | {unit} | {speedup} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="Llama-3.2-1B shapes, bf16, T=1024")
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke run)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (per device)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (rows)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps")
    ap.add_argument("--only", default="train,decode", help="comma list: train, decode")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers rows")
    ap.add_argument("--prng", default=None, help="jax_default_prng_impl (e.g. rbg) for dropout")
    ap.add_argument("--matmul-precision", default=None, help="jax_default_matmul_precision")
    ap.add_argument("--lora-dropout", type=float, default=None, help=f"default {DROPOUT}")
    ap.add_argument("--scan-layers", action="store_true", help="elmjax: scan over layers")
    args = ap.parse_args(argv)
    if args.prng:
        jax.config.update("jax_default_prng_impl", args.prng)
    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    s = setup_for(args)
    if args.lora_dropout is not None:
        s.dropout = args.lora_dropout
    if args.steps:
        s.steps = args.steps
    s.scan_layers = args.scan_layers
    only = set(args.only.split(","))

    import torch
    import transformers

    device = "cuda" if args.gpu and torch.cuda.is_available() else "cpu"
    use_torch = not args.no_torch and (not args.gpu or device == "cuda" or args.small)
    print(f"# elmjax LLM benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"# {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"jax={jax.__version__} backend={jax.default_backend()} devices={jax.devices()} "
        f"torch={torch.__version__} ({device}) transformers={transformers.__version__} "
        f"torch_threads={torch.get_num_threads()} load={os.getloadavg()}"
    )
    print(f"# setup: {s}")

    ref = torch_model(s, device) if use_torch else None
    model = jax_model(s, ref if (ref is not None and device == "cpu") else None)
    config = model.config
    print(
        f"# elmjax config: layers={config.num_layers} hidden={config.hidden_size} "
        f"vocab={config.total_vocab} dtype={config.dtype}"
    )
    rows = []

    if "decode" in only:
        # Plain models (no adapters) first: the training rows wrap them in LoRA.
        prompts = np.random.default_rng(1).integers(
            0, config.vocab_size, (s.decode_batch, s.prompt)
        )
        stop = config.total_vocab  # never generated: every row makes all the new tokens
        ids = torch.as_tensor(prompts, dtype=torch.long, device=device)

        def jax_gen(n_new):
            return generate(
                model, prompts.tolist(), max_new_tokens=n_new, stop_ids=[stop], pad_id=0
            )

        def torch_gen(n_new):
            with torch.no_grad():
                return ref.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n_new,
                    min_new_tokens=n_new,
                    do_sample=False,
                    pad_token_id=0,
                )

        results = {}
        for n_new in (s.new_tokens, 1):
            fns = {"elmjax": (functools.partial(jax_gen, n_new), jax_sync)}
            if ref is not None:
                fns["torch"] = (functools.partial(torch_gen, n_new), torch_sync(device))
            r = interleaved(fns, s.decode_runs)
            for name, times in r.items():
                print(f"# decode N={n_new}: {name} {_fmt_times(times)}")
            results[n_new] = r
        if ref is not None:
            mine = np.asarray(jax_gen(s.new_tokens).tokens)
            theirs = torch_gen(s.new_tokens).cpu().numpy()[:, s.prompt :]
            same = (mine == theirs).mean()
            first = [
                int(np.argmax(a != b)) if (a != b).any() else len(a)
                for a, b in zip(mine, theirs, strict=True)
            ]
            print(f"# greedy agreement: {same:.1%} of tokens; first difference at {first}")

        def med(n, name, key="median"):
            return results[n][name][key] if name in results[n] else None

        n_tok = s.decode_batch * s.new_tokens
        t_j, t_t = med(s.new_tokens, "elmjax"), med(s.new_tokens, "torch")
        rows.append(
            fmt_row(
                f"greedy decode, batch {s.decode_batch}, {s.prompt}-token prompt, "
                f"{s.new_tokens} new",
                n_tok / t_j,
                n_tok / t_t if t_t else None,
                "new tokens/s",
            )
        )
        c_j, c_t = (
            med(s.new_tokens, "elmjax", "cpu_median"),
            med(s.new_tokens, "torch", "cpu_median"),
        )
        rows.append(
            fmt_row(
                "  same, per process-CPU second",
                n_tok / c_j,
                n_tok / c_t if c_t else None,
                "new tokens/CPU-s",
            )
        )
        p_j, p_t = med(1, "elmjax"), med(1, "torch")
        rows.append(fmt_row("  prefill only (max_new_tokens=1)", p_j, p_t, "s", higher=False))
        dec_j = (t_j - p_j) / (s.new_tokens - 1)
        dec_t = (t_t - p_t) / (s.new_tokens - 1) if t_t else None
        rows.append(
            fmt_row(
                "  one decode step (excl. prefill)",
                dec_j * 1e3,
                dec_t * 1e3 if dec_t else None,
                "ms",
                higher=False,
            )
        )

    if "train" in only:
        tokens = s.batch * s.seq
        for label, k in (
            ("full head", None),
            (f"head at {s.head_positions} positions", s.head_positions),
        ):
            # A copy per row (LoRA wraps it in place); the base arrays are shared, not copied.
            before = TRAIN_TRACES[0]
            fns = {"elmjax": (jax_train_step(nnx.clone(model), s, k), jax_sync)}
            unwrap = None
            if ref is not None:
                run_t, unwrap = torch_train_step(ref, s, k, device)
                fns["torch"] = (run_t, torch_sync(device))
            r = interleaved(fns, s.steps)
            print(f"# train {label}: elmjax traces {TRAIN_TRACES[0] - before} (1 = no recompile)")
            for name, times in r.items():
                print(f"# train {label}: {name} s/step {_fmt_times(times)}")
            del fns
            if unwrap is not None:
                ref = unwrap()
            t_j = r["elmjax"]["median"]
            t_t = r["torch"]["median"] if "torch" in r else None
            rows.append(
                fmt_row(
                    f"LoRA r{RANK} step, {label}, batch {s.batch} x {s.seq}",
                    tokens / t_j,
                    tokens / t_t if t_t else None,
                    "tokens/s",
                )
            )
            c_j = r["elmjax"]["cpu_median"]
            c_t = r["torch"]["cpu_median"] if "torch" in r else None
            rows.append(
                fmt_row(
                    "  same, per process-CPU second",
                    tokens / c_j,
                    tokens / c_t if c_t else None,
                    "tokens/CPU-s",
                )
            )
            flops = lora_step_flops(config, s.batch, s.seq, k or s.seq, RANK)
            tf_j = flops["total"] / t_j / 1e12
            tf_t = flops["total"] / t_t / 1e12 if t_t else None
            line = (
                f"# {label}: model FLOPs/step {flops['total'] / 1e12:.4g} T "
                f"(fwd {flops['forward'] / 1e12:.4g} + bwd {flops['backward'] / 1e12:.4g}; "
                f"6NT would be {flops['six_n_t'] / 1e12:.4g} T); "
                f"elmjax {tf_j:.4g} TFLOP/s"
            )
            if tf_t:
                line += f", torch {tf_t:.4g} TFLOP/s"
            if args.peak_tflops:
                line += f"; MFU elmjax {tf_j / args.peak_tflops:.1%}"
                if tf_t:
                    line += f", torch {tf_t / args.peak_tflops:.1%}"
            print(line)

    print()
    print("| benchmark | elmjax | transformers | unit | elmjax speed-up |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(row)
    print(f"# load at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
