"""Tiny random transformers models for the parity tests (llm, hf, generate)."""

from __future__ import annotations

import torch
import transformers

V = 256  # text vocabulary of the tiny models
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
SHAPES = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
GEMMA2 = dict(
    head_dim=16,
    sliding_window=4,
    query_pre_attn_scalar=24,
    attn_logit_softcapping=20.0,
    final_logit_softcapping=5.0,
)


def tiny_hf(family: str, seed: int = 0, noise: float = 0.05, **overrides):
    """A tiny random transformers model (float32, eager attention), weights perturbed.

    Llama: GQA + llama3 RoPE scaling; Qwen 2: q/k/v biases + tied embeddings; Gemma 2: three
    layers, sliding window 4, both soft-caps. ``noise`` is added to every parameter (random
    biases, non-trivial norms — Gemma's start at 0 — and larger weights).
    """
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(
            **SHAPES, rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0, **overrides
        )
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**SHAPES, tie_word_embeddings=True, **overrides)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.Gemma2Config(
            **{**SHAPES, "num_hidden_layers": 3}, **{**GEMMA2, **overrides}
        )
        cls = transformers.Gemma2ForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model
