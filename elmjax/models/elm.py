"""The ECG-language model in Flax NNX: ECG encoder -> projector -> placeholder rows of the LLM.

The signal and image representations (``DESIGN.md``) share this composition: an encoder maps
each ECG to one pooled vector or ``N`` tokens, the projector maps them to the LLM width, and
they replace the embeddings of the ``placeholder_id`` tokens (``<signal>``) of the prompt.

Composition
-----------
``ELM(encoder, projector, llm, placeholder_id)``:

- ``encoder``: any NNX module mapping a batch of ECG inputs to ``[B, D_enc]`` (pooled: one
  vector per ECG, the paper's setting) or ``[B, N, D_enc]`` (tokens): a 1-D ECG encoder on
  ``[B, 12, L]`` signals, a ``models.vision`` tower on preprocessed ``[B, 3, S, S]`` pixels,
  or ``ImageEncoder(tower)``, which also takes uint8 ``[B, H, W, 3|4]`` printouts and applies
  ``vision.preprocess`` inside the jitted step (ship uint8 to the device).
- ``projector``: ``models.projector.Projector`` (``in_dim`` = the encoder's width,
  ``out_dim`` = ``llm.config.hidden_size``; checked at construction).
- ``llm``: ``models.llm.LLM`` (with LoRA applied to it, *not* to the ELM: ``apply_lora(elm)``
  would also adapt the encoder's ``q_proj``/``v_proj``).
- ``placeholder_id``: the token id whose embedding rows receive the ECG vectors.

Module tree: ``encoder.*``, ``projector.linear_1`` (``.linear_2``), ``llm.*``.

Calling
-------
``elm(tokens, ecg, *, positions=None, segment_ids=None, logits_positions=None,
return_hidden=False, cache=None, packed_ecg=False)`` -> what ``llm(...)`` returns (float32
logits ``[B, T|K, V]``, hidden states, or ``(out, cache)`` with a cache). ``ecg=None`` runs the
plain LLM (placeholders keep their own token embedding).

1. encode -> project: ``[B, N, D]`` (``N = 1`` for a pooled encoder);
2. scatter (``scatter_placeholders``): in row ``b`` the ``k``-th placeholder token (counting
   from the left) receives vector ``k`` **of row b**: a batched gather by the per-row
   cumulative placeholder count. A row never reads another row's vectors (the reference's
   ``llm_embeddings[:, signal_idx, :] = proj`` broadcast wrote every sample's ECG into every
   other sample, ``reference-notes.md`` §0.4);
3. ``llm(tokens, embeds=..., embed_mask=tokens == placeholder_id, ...)``.

``elm.embed_inputs(tokens, ecg)`` returns step 2's ``(embeds [B, T, D], embed_mask [B, T])``:
what ``generate.generate(elm.llm, prompts, embeds=..., embed_mask=...)`` takes (same
right-padded layout as the prompts).

Placeholder counts
------------------
Each row (each example, when packed) must hold exactly ``N`` placeholders. A count check
cannot raise inside ``jit``, so the data side calls ``check_placeholders(tokens, n, ...)``
(or ``elm.check_placeholders``) on the host: it raises a ``ValueError`` naming the rows and
the counts. Inside the graph the behaviour is defined and safe: placeholders beyond the
``N``-th of a row get a **zero vector** (never another row's, never a clamped repeat), and
when a row has fewer than ``N`` the remaining vectors are unused.

Packed rows (several examples per row, ``segment_ids``)
-------------------------------------------------------
With ``packed_ecg=True`` the ECG input is per example: ``ecg [B, E, ...]``, ``E`` slots per
row. Slot ``e`` of row ``b`` is the ECG of the ``e``-th example of that row that has
placeholders (in row order); unused slots are filler (e.g. zeros) whose vectors land nowhere.
The encoder sees ``[B * E, ...]``; the projected ``[B, E * N, D]`` go through the same
scatter, so with ``N`` placeholders per example, the ``k``-th placeholder of a row takes
vector ``k mod N`` of slot ``k // N``: each example gets its own ECG. The cost is ``B * E``
encoder rows per step whatever the fill. (Filler slots enter a trained encoder's BatchNorm
statistics in train mode; a frozen encoder stays in eval mode, see below.)
``check_placeholders(..., segment_ids=..., slots=E)`` checks every segment and that no row
has more ECG examples than slots. With ``packed_ecg=False`` (one example per row; the
reference's layout) ``ecg`` is ``[B, ...]``.

Attention
---------
The LLM stays causal: the ECG rows are ordinary prompt positions, attended to by everything
after them, and with ``N > 1`` each ECG token sees only the ECG tokens before it.
PaliGemma-style bidirectional attention over the prefix is not done. The vectors are used as
given (no Gemma ``sqrt(D)`` scaling), like transformers' ``inputs_embeds``.

Training what
-------------
``trainable_filter(train_encoder=False, lora=True, train_projector=True, *, train_llm=False,
train_extra_vocab=False)`` is the optimiser / ``DiffState`` filter over the ELM's state
(paths relative to the ELM, as ``nnx.Optimizer(elm, tx, wrt=...)`` and ``nnx.state(elm, f)``
see them). End-to-End LLaVA and 2-stage stage 2 (frozen encoder, projector + LoRA) are the
default; ``train_encoder=True`` is the reference's ``--train_encoder``; ``lora=False`` freezes
the LLM (LLaVA-1.5's projector-only alignment); ``train_llm=True`` fine-tunes all of it.
A frozen encoder gets no gradient (nothing upstream of it is differentiated), but
``elm.train()`` also switches *its* dropout / BatchNorm to train mode: follow it with
``elm.encoder.eval()`` (the reference runs a frozen encoder in eval mode).

Loss
----
``answer_loss(logits, targets, loss_mask) -> (sum, count)``: token cross-entropy summed over
the positions where ``loss_mask > 0`` (weighted by it) and the weight total, the quantity
``train.loss_sums`` accumulates over micro-batches (mean = ``sum / max(count, 1)``). Masked
positions are *selected away* (``where``), not multiplied by zero, and their labels are never
used as indices: a padding label of -100 or any out-of-range id cannot turn the loss NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from elmjax.models import lora as lora_lib
from elmjax.models import vision
from elmjax.models.llm import LLM, ExtraVocab
from elmjax.models.projector import Projector
from elmjax.parallel import constrain

# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


class ImageEncoder(nnx.Module):
    """A vision tower that also takes raw printouts.

    Integer inputs (uint8 ``[B, H, W, 3|4]`` / ``[H, W, ...]`` images) go through
    ``vision.preprocess(images, tower.config)`` first (resize or pad, never crop; normalise);
    float inputs are taken as already preprocessed pixels ``[B, C, S, S]``. Returns what the
    tower returns (``[B, feature_dim]`` or ``[B, N, D]``, by ``tower.config.output``).
    """

    def __init__(self, tower: vision.VisionTower):
        self.tower = tower

    def __call__(self, images: jax.Array) -> jax.Array:
        x = jnp.asarray(images)
        if jnp.issubdtype(x.dtype, jnp.integer):
            x = vision.preprocess(x, self.tower.config)
        return self.tower(x)


# --------------------------------------------------------------------------------------------
# Placeholders
# --------------------------------------------------------------------------------------------


def scatter_placeholders(
    tokens: jax.Array, vectors: jax.Array, placeholder_id: int
) -> tuple[jax.Array, jax.Array]:
    """Row-local placement of ``vectors [B, M, D]`` on the placeholder tokens of ``tokens [B, T]``.

    The ``k``-th ``placeholder_id`` of row ``b`` (from the left) gets ``vectors[b, k]``;
    placeholders with ``k >= M`` get zeros. Returns ``(embeds [B, T, D], embed_mask [B, T])``
    with ``embed_mask = tokens == placeholder_id`` and zeros in ``embeds`` elsewhere.
    """
    if vectors.ndim != 3 or vectors.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"vectors must be [B, M, D] with B = {tokens.shape[0]} rows, got {vectors.shape}"
        )
    m = vectors.shape[1]
    mask = tokens == placeholder_id  # [B, T]
    k = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1  # [B, T]: this placeholder's index
    gathered = jnp.take_along_axis(vectors, jnp.clip(k, 0, m - 1)[..., None], axis=1)  # [B,T,D]
    use = mask & (k < m)
    embeds = jnp.where(use[..., None], gathered, jnp.zeros((), vectors.dtype))
    return constrain(embeds, ("batch", "seq", "embed")), mask


def _segments_in_order(row: np.ndarray) -> list[int]:
    ids, first = np.unique(row[row != 0], return_index=True)
    return [int(s) for s in ids[np.argsort(first)]]


def check_placeholders(
    tokens: Any,
    n: int,
    *,
    placeholder_id: int,
    segment_ids: Any = None,
    slots: int | None = None,
    allow_text_only: bool = False,
) -> None:
    """Host-side check that every example holds exactly ``n`` placeholder tokens.

    Args:
      tokens: ``[B, T]`` ids (numpy or jax; fetched to the host).
      n: vectors per ECG (1 for a pooled encoder, ``N`` for tokens).
      placeholder_id: the placeholder token id.
      segment_ids: ``[B, T]`` for packed rows (each nonzero segment is an example; 0 is
        padding, which must hold no placeholder); None: one example per row.
      slots: ECG slots per row (``ecg [B, E, ...]``, ``E``) for packed rows: no row may
        have more examples with placeholders than slots.
      allow_text_only: examples with no placeholder at all are fine (text-only rows or
        segments; their ECG slot, if any, is unused).

    Raises:
      ValueError naming up to five offending rows (and segments) with their counts.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    is_ph = tokens == placeholder_id
    allowed = f"exactly {n}" + (" or 0" if allow_text_only else "")
    problems: list[str] = []

    def bad(count: int) -> bool:
        return count != n and not (allow_text_only and count == 0)

    if segment_ids is None:
        for b, count in enumerate(is_ph.sum(axis=1).tolist()):
            if bad(count):
                problems.append(f"row {b} has {count}")
    else:
        segment_ids = np.asarray(segment_ids)
        if segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids {segment_ids.shape} != tokens {tokens.shape}")
        for b in range(tokens.shape[0]):
            seg, ph = segment_ids[b], is_ph[b]
            if on_pad := int(ph[seg == 0].sum()):
                problems.append(f"row {b} has {on_pad} on padding (segment_ids 0)")
            with_ecg = 0
            for s in _segments_in_order(seg):
                count = int(ph[seg == s].sum())
                with_ecg += count > 0
                if bad(count):
                    problems.append(f"row {b}, segment {s} has {count}")
            if slots is not None and with_ecg > slots:
                problems.append(
                    f"row {b} has {with_ecg} examples with placeholders for {slots} ECG slots"
                )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" * (len(problems) > 5))
        raise ValueError(
            f"placeholder tokens (id {placeholder_id}) do not match the ECG vectors: {shown}. "
            f"Each {'segment' if segment_ids is not None else 'row'} needs {allowed} (the "
            f"encoder gives {n} vector(s) per ECG); was a prompt truncated or the placeholder "
            f"split by the tokenizer?"
        )


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class ELM(nnx.Module):
    """ECG encoder -> projector -> LLM placeholder rows (see the module docstring)."""

    def __init__(self, encoder: nnx.Module, projector: Projector, llm: LLM, placeholder_id: int):
        vocab, width = llm.config.total_vocab, llm.config.hidden_size
        if not 0 <= placeholder_id < vocab:
            raise ValueError(
                f"placeholder_id {placeholder_id} is outside the vocabulary [0, {vocab})"
            )
        if projector.config.out_dim != width:
            raise ValueError(
                f"projector out_dim={projector.config.out_dim} != LLM hidden_size={width}"
            )
        self.encoder = encoder
        self.projector = projector
        self.llm = llm
        self.placeholder_id = int(placeholder_id)

    def encode(self, ecg: Any, *, packed_ecg: bool = False) -> jax.Array:
        """ECG input -> projected vectors ``[B, N, D]`` (``[B, E * N, D]`` when packed)."""
        ecg = jnp.asarray(ecg)
        if packed_ecg:
            if ecg.ndim < 3:
                raise ValueError(f"packed_ecg needs ecg [B, E, ...], got shape {ecg.shape}")
            b, e = ecg.shape[:2]
            ecg = ecg.reshape(b * e, *ecg.shape[2:])
        feats = self.encoder(ecg)
        if feats.ndim == 2:  # pooled: one vector per ECG
            feats = feats[:, None, :]
        if feats.ndim != 3:
            raise ValueError(
                f"the encoder must return [B, D_enc] or [B, N, D_enc], got shape {feats.shape}"
            )
        vectors = self.projector(feats)
        if packed_ecg:
            vectors = vectors.reshape(b, e * vectors.shape[1], vectors.shape[2])
        return vectors

    def embed_inputs(
        self, tokens: jax.Array, ecg: Any, *, packed_ecg: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """``(embeds [B, T, D], embed_mask [B, T])`` for ``llm(...)`` / ``generate``."""
        vectors = self.encode(ecg, packed_ecg=packed_ecg)
        if vectors.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"{vectors.shape[0]} ECG rows for {tokens.shape[0]} token rows "
                f"(packed_ecg={packed_ecg})"
            )
        return scatter_placeholders(tokens, vectors, self.placeholder_id)

    def check_placeholders(self, tokens: Any, n: int, **kwargs: Any) -> None:
        """``check_placeholders`` with this model's ``placeholder_id``."""
        check_placeholders(tokens, n, placeholder_id=self.placeholder_id, **kwargs)

    def __call__(
        self,
        tokens: jax.Array,
        ecg: Any = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        logits_positions: jax.Array | None = None,
        return_hidden: bool = False,
        cache: Any = None,
        packed_ecg: bool = False,
    ):
        embeds = embed_mask = None
        if ecg is not None:
            embeds, embed_mask = self.embed_inputs(tokens, ecg, packed_ecg=packed_ecg)
        return self.llm(
            tokens,
            positions=positions,
            segment_ids=segment_ids,
            embeds=embeds,
            embed_mask=embed_mask,
            cache=cache,
            logits_positions=logits_positions,
            return_hidden=return_hidden,
        )


# --------------------------------------------------------------------------------------------
# What trains, and the loss
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Under:
    """nnx filter: Variables under the ELM child ``part`` (the first element of their path)."""

    part: Hashable

    def __call__(self, path: Sequence[Any], value: Any) -> bool:
        return len(path) > 0 and path[0] == self.part


def trainable_filter(
    train_encoder: bool = False,
    lora: bool = True,
    train_projector: bool = True,
    *,
    train_llm: bool = False,
    train_extra_vocab: bool = False,
) -> Any:
    """The optimiser / ``DiffState`` filter over an ELM's state (see the module docstring).

    Args:
      train_encoder: every ``nnx.Param`` of the encoder (adapters on it included).
      lora: the LLM's ``nnx.LoRAParam`` adapters.
      train_projector: the projector's parameters.
      train_llm: every LLM parameter (full fine-tuning; ``ExtraVocab`` rows only with
        ``train_extra_vocab``); overrides ``lora``.
      train_extra_vocab: the LLM's extra vocabulary rows (``llm.ExtraVocab``).

    Raises:
      ValueError when nothing would be trained.
    """
    parts = []
    if train_encoder:
        parts.append(nnx.All(nnx.Param, Under("encoder")))
    if train_projector:
        parts.append(nnx.All(nnx.Param, Under("projector")))
    if train_llm or lora:
        parts.append(
            nnx.All(lora_lib.trainable_filter(train_extra_vocab, lora=not train_llm), Under("llm"))
        )
    elif train_extra_vocab:
        parts.append(nnx.All(ExtraVocab, Under("llm")))
    if not parts:
        raise ValueError("trainable_filter: nothing to train (encoder, projector and LLM frozen)")
    return parts[0] if len(parts) == 1 else nnx.Any(*parts)


def answer_loss(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(sum, count)``: cross-entropy over answer tokens and their (weighted) number.

    ``logits [B, T, V]``, ``targets [B, T]`` (next-token ids), ``loss_mask [B, T]`` (bool or
    float weights; 0 on padding, prompt and ECG positions). Masked positions contribute
    nothing, whatever their labels (-100, out-of-range ids, anything).
    """
    w = loss_mask.astype(jnp.float32)
    keep = w > 0
    safe = jnp.where(keep, targets, 0).astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    total = jnp.sum(jnp.where(keep, ce * w, 0.0))
    return total, jnp.sum(jnp.where(keep, w, 0.0))
