"""Benchmark: ECG encoder and vision tower forward passes (examples/s), at the paper's sizes.

Rows, each a jitted ``encoder(x)`` in inference mode (no masking, no dropout) on random
weights, float32, batch ``--batch``, best of ``--repeats`` timed calls after a warm-up (the
compile is reported separately):

* signal encoders (:mod:`elmjax.models.ecg_encoders`, ``default_config``): MERL's ResNet-101,
  ViT-1D, ST-MEM, MTAE, MLAE (ViT-B), on ``[B, 12, L]`` signals; ``L`` = ``--seq-len`` (2500:
  10 s at 250 Hz, the paper's segment);
* vision towers (:mod:`elmjax.models.vision`): ViT-B/16, CLIP ViT-B/32 and SigLIP B/16 at 224,
  on uint8 ``[B, 224, 224, 3]`` printouts (the preprocessing, resize and normalisation, is
  inside the timed call, as in training) and, beside each, transformers' ``ViTModel`` /
  ``CLIPVisionModel`` / ``SiglipVisionModel`` of the same config under ``torch.inference_mode``
  on preprocessed float pixels (its preprocessing is not timed: that favours transformers).

Usage: ``python benchmarks/encoders.py [--batch 8] [--repeats 3] [--only stmem,clip]``
(``--small``: tiny shapes, a smoke run).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from elmjax.models import ecg_encoders, elm, vision

SIGNAL = ("merl_resnet", "vit1d", "stmem", "mtae", "mlae")
# tower -> transformers (config, model) classes; the paper's towers are their defaults
# (ViT-B/16, CLIP ViT-B/32, SigLIP B/16, all at 224)
TOWERS = {
    "vit": ("ViTConfig", "ViTModel"),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel"),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel"),
}
SMALL_TOWER = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    image_size=64,
    patch_size=16,
)


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first call seconds, smallest wall time of ``repeats`` further calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, min(times)


def signal_row(name: str, args) -> dict:
    make = ecg_encoders.tiny_config if args.small else ecg_encoders.default_config
    conf = make(name, seq_len=args.seq_len, num_leads=12)
    enc = ecg_encoders.make_encoder(name, conf, rngs=nnx.Rngs(0))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(enc, nnx.Param)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, 12, args.seq_len)), "f4")
    graph, state = nnx.split(enc)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graph, state)(x, train=False)

    first, best = best_of(lambda: forward(state, x), args.repeats)
    return {"name": name, "params": params, "first": first, "rate": args.batch / best}


def hf_config(kind: str, small: bool):
    """transformers' config of the tower (its defaults, or tiny shapes)."""
    return getattr(transformers, TOWERS[kind][0])(**(SMALL_TOWER if small else {}))


def vision_config(kind: str, hf) -> vision.VisionConfig:
    """Ours, read from transformers' config as ``load_vision`` reads a checkpoint's: ViTModel
    has its pooler by default, CLIPVisionModel no visual projection, SigLIP its head."""
    return vision.VisionConfig.from_hf(hf.to_dict(), **({"pooler": True} if kind == "vit" else {}))


def vision_row(kind: str, args) -> dict:
    hf = hf_config(kind, args.small)
    vcfg = vision_config(kind, hf)
    enc = elm.ImageEncoder(vision.make_tower(vcfg, rngs=nnx.Rngs(0)))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(enc, nnx.Param)))
    size = vcfg.image_size
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, size=(args.batch, size, size, 3), dtype=np.uint8))
    graph, state = nnx.split(enc)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graph, state)(x)

    first, best = best_of(lambda: forward(state, images), args.repeats)
    row = {"name": kind, "params": params, "first": first, "rate": args.batch / best}
    if not args.no_torch:
        import torch  # noqa: PLC0415

        model = getattr(transformers, TOWERS[kind][1])(hf).eval()
        pixels = torch.from_numpy(rng.normal(size=(args.batch, 3, size, size)).astype("f4"))
        with torch.inference_mode():
            _, best_t = best_of(lambda: model(pixel_values=pixels), args.repeats)
        row["torch_rate"] = args.batch / best_t
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=2500)
    parser.add_argument("--only", default="", help="comma-separated encoder / tower names")
    parser.add_argument("--small", action="store_true", help="tiny shapes (smoke run)")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers rows")
    args = parser.parse_args()
    only = {n for n in args.only.split(",") if n}
    print(
        f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
        f"batch {args.batch}, float32{' (small shapes)' if args.small else ''}"
    )
    print(f"{'encoder':<12s} {'params':>9s} {'compile+1st':>12s} {'ex/s':>8s} {'torch ex/s':>11s}")
    for name in SIGNAL + tuple(TOWERS):
        if only and name not in only:
            continue
        row = signal_row(name, args) if name in SIGNAL else vision_row(name, args)
        torch_rate = f"{row['torch_rate']:11.1f}" if "torch_rate" in row else f"{'-':>11s}"
        print(
            f"{row['name']:<12s} {row['params'] / 1e6:8.1f}M {row['first']:11.1f}s "
            f"{row['rate']:8.1f} {torch_rate}",
            flush=True,
        )


if __name__ == "__main__":
    main()
