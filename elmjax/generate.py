"""Batched generation with a preallocated KV cache: one prefill call, one compiled decode loop.

API
---
``generate(model, prompts, *, max_new_tokens, stop_ids, pad_id, sampling=Sampling(), seed=0,
lengths=None, embeds=None, embed_mask=None, max_len=None, mesh=None, groups=None) -> Generated``

- ``prompts``: a list of int id sequences (different lengths allowed), or a right-padded array
  ``[B, P]`` with ``lengths [B]`` (row ``i``'s prompt is ``prompts[i, :lengths[i]]``, the layout
  of the training arrays). Every prompt needs at least one token.
- ``embeds [B, P, D]`` + ``embed_mask [B, P] bool`` (encoder / projector outputs) use the same
  right-padded layout as the prompts: ``embeds[i, j]`` replaces the embedding of prompt token
  ``j`` of row ``i`` where ``embed_mask[i, j]``. They are written in the prefill only; generated
  tokens always use the token embedding.
- ``groups``: one label per prompt; rows with the same label may share their common prompt
  prefix, which is then computed once (see "Shared prefixes" below). With ``embeds``, rows of
  a group must have the same vectors over that prefix (e.g. the same ECG): only ids are compared.
- ``stop_ids``: one id or a set of ids (e.g. Llama 3's ``<|eot_id|>`` and ``<|end_of_text|>``);
  a row stops at the first generated id in the set. ``pad_id`` fills the rest of the row.
- Returns ``Generated(tokens [B, max_new_tokens] int32, lengths [B] int32, stopped [B] bool)``:
  the generated ids (the stop id included, like transformers' ``generate``), then ``pad_id``;
  ``lengths`` counts the generated ids including the stop id; ``stopped`` says whether a stop id
  was produced (False: the row ran out of ``max_new_tokens``).

``Sampling(temperature=0.0, top_k=0, top_p=1.0)``: ``temperature == 0`` (the default) is greedy
(argmax); otherwise the logits are divided by ``temperature``, then restricted to the ``top_k``
best ids (0: no limit), then to the smallest set of best ids whose probability reaches
``top_p`` (1.0: no limit; the order of transformers' warpers), and one id is drawn. Draws are
deterministic for a given ``seed``: step ``t`` of row ``i`` uses
``fold_in(fold_in(jax.random.key(seed), t), i)``, so a row's random stream does not depend on
the batch size.

How it runs
-----------
Prompts are left-padded into one ``[B, P]`` array (``segment_ids`` 0 on padding, RoPE positions
counting from 0 at each row's first real token), so every row's next token is written at the
same cache slot. The prefill is one jitted call over the whole prompt (LM head at the last
position only; a static ``cache_index`` so that attention runs in causal query blocks over the
filled slots only) returning the last logits and the filled cache; the decode loop is ONE jitted
function that draws the first token from those logits, then runs a ``jax.lax.while_loop`` (one
token per iteration, ``T = 1`` model call on the cache, the cache donated and updated in place)
that stops as soon as every row has produced a stop id. The model enters both as
``nnx.split(model)`` state (an argument, not a constant baked into the executable; inside the
loop it rides in the carry, because NNX Variables must not cross trace levels); LoRA dropout is
switched off inside them (the caller's model is not modified).

Compilation cache and buckets: the jitted functions are module-level ``jax.jit``s, so XLA
executables are cached per (graphdef, shapes, static settings). To avoid a compile for every
new prompt length or batch size, shapes are bucketed:

- batch ``B`` (and the shared-prefix groups) -> ``bucket_rows``: powers of two up to 8, then
  two steps per doubling, rounded up to a multiple of the mesh's batch shards (dummy rows are
  added, start "stopped" and are dropped from the result);
- prompt length ``max(lengths)`` -> ``bucket_len``: powers of two up to 32 (at least
  ``MIN_PROMPT_BUCKET``), then four steps per doubling (at most 25 % padding);
- cache slots ``S`` = ``bucket_len(prompt slots + max_new_tokens)``, or ``max_len`` if given.
  Passing the same ``max_len`` to every call makes the decode loop's shapes independent of the
  prompt length (one decode compile for all prompt buckets), but every decode step then reads
  all ``max_len`` slots; the prompt bucket is capped at ``max_len - max_new_tokens``.

The prefill compiles once per (model graph, batch bucket, prompt bucket, S, with/without
embeds) and does not depend on the sampling settings (the shared-prefix prefill once per
(groups bucket, prefix bucket, suffix bucket, batch bucket, S)); the decode loop once per
(model graph, batch bucket, S, ``max_new_tokens``, greedy / ``top_k`` / top-p-on switches).
``temperature`` and ``top_p`` values, ``stop_ids`` (padded to a power of two, at least
``MIN_STOP_BUCKET``), ``pad_id`` and ``seed`` are traced values and never recompile.
``TRACE_COUNTS`` counts the traces of each (for tests). A model in train mode (LoRA dropout on)
is a different graph, so call ``model.eval()`` first to share the eval-mode executables.

Shared prefixes
---------------
Evaluation asks several questions about one ECG, and a conversation's later turns repeat its
earlier ones, so many prompts of a batch start with the same ids. With ``groups``,
``share_plan`` finds each group's longest common prefix (cut so that every row keeps at least
one id of its own) and ``_prefill_shared`` runs the prefixes once (one row per group, width
``bucket_len(longest prefix)``), copies each group's cache rows to its members, then runs every
row's own suffix on top (width ``bucket_len(longest suffix)``; cache slots: prefix part, then
suffix part, the padding between them masked, RoPE positions continuing across the gap). The
plan is used only when it computes under 0.8x the plain prefill's positions. The logits are
the plain prefill's up to float summation order.

Sharding: with ``mesh`` (or inside ``jax.set_mesh``, or else the mesh the model's parameters are
sharded over) the batch is sharded over the data axes by the logical name ``batch``
(``elmjax.parallel``); the cache follows ``KVCache.logical_axes()``. The generated ids come back
replicated, so every process of a multi-process run reads all of them (each process passes the
same prompts and gets every answer).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax.parallel import constrain, logical_to_mesh

MIN_PROMPT_BUCKET = 8
MIN_STOP_BUCKET = 4
# Number of times each jitted function was traced (= compiled), for tests and diagnostics.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding rule: greedy when ``temperature == 0`` (default); see the module docstring.

    Attributes:
      temperature: logits are divided by it before sampling; 0 means greedy (argmax).
      top_k: keep only the ``top_k`` most likely ids (0: all).
      top_p: keep the smallest set of most likely ids whose probability reaches ``top_p``.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Generated(NamedTuple):
    """What ``generate`` returns (a NamedTuple, hence a pytree: ``jax.block_until_ready`` works).

    Attributes:
      tokens: ``[B, max_new_tokens] int32``, the generated ids then ``pad_id``.
      lengths: ``[B] int32``, generated ids per row, the stop id included.
      stopped: ``[B] bool``, whether the row produced a stop id.
    """

    tokens: jax.Array
    lengths: jax.Array
    stopped: jax.Array


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= ``max(n, minimum)``."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


def bucket_rows(n: int) -> int:
    """A row-count bucket >= ``n``: powers of two up to 8, then two steps per doubling (12, 16,
    24, 32, 48, ...): at most a third of the rows are padding."""
    n = max(int(n), 1)
    if n <= 8:
        return bucket(n)
    step = 1 << ((n - 1).bit_length() - 2)
    return -(-n // step) * step


def bucket_len(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """A sequence-length bucket >= ``max(n, minimum)``: powers of two up to 32, then four steps
    per doubling (33..64 -> 40, 48, 56, 64; 257..512 -> 320, 384, 448, 512), so at most 25 %
    padding (12 % on average) for 4 compiled shapes per doubling of the length."""
    n = max(int(n), minimum, 1)
    if n <= 32:
        return bucket(n)
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    *,
    greedy: bool,
    top_k: int = 0,
    use_top_p: bool = False,
    temperature: jax.Array | float = 1.0,
    top_p: jax.Array | float = 1.0,
) -> jax.Array:
    """One id per row from ``logits [B, V]`` -> ``[B] int32`` (static switches, traced values).

    Row ``i`` draws with ``fold_in(key, i)``.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    b, v = logits.shape
    if top_k or use_top_p:
        if top_k and top_k < v:
            vals, idx = jax.lax.top_k(logits, top_k)  # sorted, best first
        else:
            idx = jnp.argsort(-logits, axis=-1, stable=True)
            vals = jnp.take_along_axis(logits, idx, axis=-1)
        if use_top_p:
            probs = jax.nn.softmax(vals, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better ids
            keep = before < jnp.asarray(top_p, jnp.float32)  # the best id is always kept
            vals = jnp.where(keep, vals, -jnp.inf)
    else:
        vals, idx = logits, None
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b, dtype=jnp.uint32))
    choice = jax.vmap(jax.random.categorical)(keys, vals)
    if idx is not None:
        choice = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# The two compiled functions
# --------------------------------------------------------------------------------------------


def _eval_model(graphdef, state):
    """The model rebuilt inside a trace, with (LoRA) dropout off."""
    model = nnx.merge(graphdef, state)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Dropout):
            module.deterministic = True
    return model


def _right_aligned(rows, start, length, width):
    """Source columns to right-align ``x[rows[r], start[r] : start[r] + length[r]]`` into
    ``width`` columns -> ``(src [R, width], real [R, width])`` (src 0 where not real)."""
    lead = (width - length)[:, None]
    j = jnp.arange(width, dtype=jnp.int32)[None, :]
    real = j >= lead
    return jnp.where(real, start[:, None] + j - lead, 0), real


def _prompt_pass(
    model, cache, tokens, embeds, embed_mask, pad_id, rows, start, length, width, **kwargs
):
    """One cached model call over ``tokens[rows, start : start + length]`` (right-aligned into
    ``width`` columns, ``segment_ids`` 0 on the left padding; a token's RoPE position is its
    column in the right-padded prompt) -> ``(model output, cache)``."""
    src, real = _right_aligned(rows, start, length, width)
    picked = tokens[rows]
    left = jnp.where(real, jnp.take_along_axis(picked, src, axis=1), pad_id)
    if embeds is not None:
        emb = jnp.take_along_axis(embeds[rows], src[..., None], axis=1)
        mask = jnp.take_along_axis(embed_mask[rows], src, axis=1) & real
        kwargs.update(embeds=constrain(emb, ("batch", "seq", "embed")), embed_mask=mask)
    return model(
        constrain(left, ("batch", "seq")),
        positions=jnp.where(real, src, 0),
        segment_ids=real.astype(jnp.int32),
        cache=cache,
        **kwargs,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(state, tokens, lengths, embeds, embed_mask, pad_id, *, graphdef, cache_len):
    """Left-aligns the right-padded prompt, fills the cache -> (last logits [B, V], cache)."""
    TRACE_COUNTS["prefill"] += 1
    model = _eval_model(graphdef, state)
    b, p = tokens.shape
    rows, zeros = jnp.arange(b, dtype=jnp.int32), jnp.zeros((b,), jnp.int32)
    logits, cache = _prompt_pass(
        model,
        model.init_cache(b, cache_len),
        tokens,
        embeds,
        embed_mask,
        pad_id,
        rows,
        zeros,
        lengths,
        p,
        logits_positions=jnp.full((b, 1), p - 1, jnp.int32),
        cache_index=0,
    )
    return logits[:, 0], cache


@functools.partial(
    jax.jit, static_argnames=("graphdef", "prefix_width", "suffix_width", "cache_len")
)
def _prefill_shared(
    state,
    tokens,
    lengths,
    embeds,
    embed_mask,
    pad_id,
    first,
    prefix_lengths,
    group,
    *,
    graphdef,
    prefix_width,
    suffix_width,
    cache_len,
):
    """The prefill with shared prefixes: each group's prefix (``prefix_lengths[g]`` tokens of
    row ``first[g]``) runs once, its cache rows are copied to the group's rows (``group [B]``),
    then every row's own suffix runs on top -> (last logits [B, V], cache).

    Cache slots: ``[0, prefix_width)`` the left-aligned prefix, ``[prefix_width,
    prefix_width + suffix_width)`` the left-aligned suffix (the padding in between has
    ``segment_ids`` 0, so nothing attends to it; RoPE positions run on across the gap)."""
    TRACE_COUNTS["prefill_shared"] += 1
    model = _eval_model(graphdef, state)
    b = tokens.shape[0]
    g = first.shape[0]
    zeros = jnp.zeros((g,), jnp.int32)
    _, cache = _prompt_pass(
        model,
        model.init_cache(g, cache_len),
        tokens,
        embeds,
        embed_mask,
        pad_id,
        first,
        zeros,
        prefix_lengths,
        prefix_width,
        logits_positions=jnp.zeros((g, 1), jnp.int32),
        return_hidden=True,  # no LM head on the prefixes
        cache_index=0,
    )
    names = type(cache).logical_axes()
    cache = cache.replace(
        k=constrain(cache.k[:, group], names.k),
        v=constrain(cache.v[:, group], names.v),
        segment_ids=constrain(cache.segment_ids[group], names.segment_ids),
        positions=constrain(cache.positions[group], names.positions),
    )
    start = prefix_lengths[group]
    logits, cache = _prompt_pass(
        model,
        cache,
        tokens,
        embeds,
        embed_mask,
        pad_id,
        jnp.arange(b, dtype=jnp.int32),
        start,
        lengths - start,
        suffix_width,
        logits_positions=jnp.full((b, 1), suffix_width - 1, jnp.int32),
        cache_index=prefix_width,
    )
    return logits[:, 0], cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p"),
    donate_argnames=("cache",),
)
def _decode(
    state,
    cache,
    logits,
    prompt_lengths,
    active,
    stop_ids,
    pad_id,
    temperature,
    top_p,
    key,
    *,
    graphdef,
    max_new_tokens,
    greedy,
    top_k,
    use_top_p,
):
    """Draws the first token from the prefill's logits, then one ``while_loop`` of ``T = 1``
    cached model calls."""
    TRACE_COUNTS["decode"] += 1
    b = logits.shape[0]
    n = max_new_tokens
    draw = functools.partial(
        sample_logits,
        greedy=greedy,
        top_k=top_k,
        use_top_p=use_top_p,
        temperature=temperature,
        top_p=top_p,
    )

    first = jnp.where(active, draw(logits, jax.random.fold_in(key, 0)), pad_id)
    out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
    out = constrain(out, ("batch", None))
    stopped = active & jnp.isin(first, stop_ids)
    done = ~active | stopped
    lengths = active.astype(jnp.int32)

    def cond(carry):
        i, _, _, _, done, _, _, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, out, cache, last, done, lengths, stopped, state = carry
        # The parameters ride in the carry (unchanged; XLA passes them through without copies)
        # and the model is merged inside the body: NNX modules and Variables must not cross
        # trace levels (``nnx.scan`` over stacked layers checks it).
        model = _eval_model(graphdef, state)
        # The token generated at step i - 1 sits at position prompt_length + i - 1.
        positions = (prompt_lengths + i - 1)[:, None]
        logits, cache = model(
            last[:, None],
            positions=positions,
            segment_ids=jnp.ones((b, 1), jnp.int32),
            cache=cache,
        )
        tok = jnp.where(done, pad_id, draw(logits[:, 0], jax.random.fold_in(key, i)))
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        hit = ~done & jnp.isin(tok, stop_ids)
        lengths = lengths + (~done).astype(jnp.int32)
        return i + 1, out, cache, tok, done | hit, lengths, stopped | hit, state

    init = (jnp.ones((), jnp.int32), out, cache, first, done, lengths, stopped, state)
    _, out, cache, _, _, lengths, stopped, _ = jax.lax.while_loop(cond, body, init)
    # The cache is returned (and dropped by the caller) so that the donated input buffers
    # alias the output: the loop updates them in place instead of copying them first. The ids
    # come back replicated: every process of a multi-process run can read all of them.
    out, lengths, stopped = (constrain(x, (None,) * x.ndim) for x in (out, lengths, stopped))
    return out, lengths, stopped, cache


# --------------------------------------------------------------------------------------------
# Host side: padding, bucketing
# --------------------------------------------------------------------------------------------


def _pad_axis(x: Any, axis: int, size: int, value: Any = 0) -> Any:
    """Slices or pads ``x`` along ``axis`` to ``size`` (numpy stays numpy, jax stays jax)."""
    if x.shape[axis] >= size:
        return x[(slice(None),) * axis + (slice(0, size),)]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.pad(x, widths, constant_values=value)


def _batch_shards(mesh: Any) -> int:
    """How many ways the logical ``batch`` axis is split under ``mesh`` (or the current one)."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    spec = logical_to_mesh(("batch",), mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return math.prod(dict(mesh.shape)[a] for a in axes)


def _model_mesh(model: nnx.Module) -> jax.sharding.Mesh | None:
    """The mesh the model's parameters are sharded over (None: not a NamedSharding)."""
    for leaf in jax.tree.leaves(nnx.state(model)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    return None


def _right_padded(prompts: Any, lengths: Any, pad_id: int) -> tuple[Any, np.ndarray]:
    if lengths is None:
        if isinstance(prompts, (np.ndarray, jax.Array)):
            raise ValueError("an array of prompts needs lengths= (tokens at prompts[i, :len])")
        rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
        lengths = np.array([len(r) for r in rows], np.int32)
        width = int(lengths.max()) if len(rows) else 0
        tokens = np.full((len(rows), width), pad_id, np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
        return tokens, lengths
    lengths = np.asarray(lengths, np.int32).reshape(-1)
    if not isinstance(prompts, jax.Array):
        prompts = np.asarray(prompts, np.int32)
    if prompts.ndim != 2 or prompts.shape[0] != lengths.shape[0]:
        raise ValueError(f"prompts {prompts.shape} and lengths {lengths.shape} do not match")
    if lengths.size and lengths.max() > prompts.shape[1]:
        raise ValueError(f"a length exceeds the prompt width {prompts.shape[1]}")
    return prompts, lengths


class SharePlan(NamedTuple):
    """How ``generate`` runs a batch whose rows share prompt prefixes (see ``share_plan``).

    Attributes:
      first: ``[G]`` the row whose prompt holds each group's prefix (padded groups: row 0).
      prefix_lengths: ``[G]`` tokens of each group's shared prefix (padded groups: 0).
      group: ``[B]`` each row's group (padded rows: group 0).
      prefix_width, suffix_width: the two passes' widths (``bucket_len`` buckets).
    """

    first: np.ndarray
    prefix_lengths: np.ndarray
    group: np.ndarray
    prefix_width: int
    suffix_width: int

    @property
    def slots(self) -> int:
        """Cache slots the two prompt parts take."""
        return self.prefix_width + self.suffix_width


def share_plan(
    tokens: Any,
    lengths: np.ndarray,
    groups: Sequence[Any],
    *,
    rows: int,
    width: int,
    shards: int = 1,
    max_ratio: float = 0.8,
) -> SharePlan | None:
    """The shared-prefix prefill plan for ``groups`` (one label per prompt: rows with equal
    labels may share a prefix), or None when it would not compute fewer positions.

    A group's prefix is the longest common prefix of its rows' prompts, cut so that every row
    keeps at least one token of its own (its last logits come from the suffix pass). The plan
    is kept when ``G_bucket x prefix_width + rows x suffix_width`` is below ``max_ratio`` of the
    plain prefill's ``rows x width`` positions (``rows``, ``width``: the plain prefill's row and
    prompt buckets; ``shards``: the batch shards, groups are padded to a multiple of them).
    """
    labels = np.asarray(groups).reshape(-1)
    if labels.shape[0] != lengths.shape[0]:
        raise ValueError(f"{labels.shape[0]} group labels for {lengths.shape[0]} prompts")
    _, first, group = np.unique(labels, return_index=True, return_inverse=True)
    if first.size == lengths.size:  # every row alone: nothing to share
        return None
    tok = np.asarray(tokens)
    same = tok == tok[first[group]]
    common = np.where(same.all(axis=1), tok.shape[1], np.argmin(same, axis=1))
    prefix = np.full(first.size, np.iinfo(np.int32).max, np.int64)
    np.minimum.at(prefix, group, np.minimum(common, lengths - 1))
    prefix_width = bucket_len(int(prefix.max()))
    suffix_width = bucket_len(int((lengths - prefix[group]).max()))
    g = -(-bucket_rows(first.size) // shards) * shards
    if g * prefix_width + rows * suffix_width >= max_ratio * rows * width:
        return None
    pad = g - first.size
    return SharePlan(
        first=np.concatenate([first, np.zeros(pad, np.int64)]).astype(np.int32),
        prefix_lengths=np.concatenate([prefix, np.zeros(pad, np.int64)]).astype(np.int32),
        group=np.concatenate([group, np.zeros(rows - group.size, np.int64)]).astype(np.int32),
        prefix_width=prefix_width,
        suffix_width=suffix_width,
    )


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    *,
    max_new_tokens: int,
    stop_ids: int | Sequence[int],
    pad_id: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    lengths: Sequence[int] | np.ndarray | None = None,
    embeds: jax.Array | np.ndarray | None = None,
    embed_mask: jax.Array | np.ndarray | None = None,
    max_len: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    groups: Sequence[Any] | None = None,
) -> Generated:
    """Generates up to ``max_new_tokens`` ids for each prompt (see the module docstring).

    Args:
      model: an ``LLM`` (plain or LoRA-wrapped).
      prompts: list of id sequences, or a right-padded ``[B, P]`` array with ``lengths``.
      max_new_tokens: ids to generate per row (the output width).
      stop_ids: id(s) ending a row; pad_id: the id written after a row stopped.
      sampling: ``Sampling(...)``; greedy by default. seed: the sampling seed.
      lengths: ``[B]`` prompt lengths for an array of prompts.
      embeds, embed_mask: ``[B, P, D]`` / ``[B, P]`` vectors injected at prompt positions.
      max_len: cache slots (fixes the decode loop's shapes across prompt lengths).
      mesh: shard the batch over its data axes (default: the current ``jax.set_mesh`` mesh).
      groups: one label per prompt; rows with the same label share their common prompt prefix
        (computed once; see ``share_plan``). With ``embeds``, rows of a group must have equal
        vectors over that prefix (e.g. the same ECG): only the ids are compared.

    Returns:
      ``Generated(tokens [B, max_new_tokens], lengths [B], stopped [B])`` (jax arrays).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokens, lengths = _right_padded(prompts, lengths, pad_id)
    b = lengths.shape[0]
    if b == 0:
        raise ValueError("no prompts")
    if lengths.min() < 1:
        raise ValueError(f"every prompt needs at least one token (row {int(lengths.argmin())})")
    if (embeds is None) != (embed_mask is None):
        raise ValueError("embeds and embed_mask go together")
    stop = np.unique(np.asarray(stop_ids, np.int32).reshape(-1))
    if stop.size == 0:
        raise ValueError("stop_ids is empty")
    stop = np.resize(stop, bucket(stop.size, MIN_STOP_BUCKET))  # repeats: same shapes for 1-4

    longest = int(lengths.max())
    p = bucket_len(longest)
    if max_len is not None:
        if longest + max_new_tokens > max_len:
            raise ValueError(
                f"max_len={max_len} < longest prompt {longest} + max_new_tokens {max_new_tokens}"
            )
        p = min(p, max_len - max_new_tokens)
    if mesh is None and jax.sharding.get_abstract_mesh().empty:
        mesh = _model_mesh(model)  # a model sharded over a mesh generates on that mesh
    shards = _batch_shards(mesh)
    bb = -(-bucket_rows(b) // shards) * shards  # a whole number of rows per data shard
    plan = None
    if groups is not None:
        plan = share_plan(tokens, lengths, groups, rows=bb, width=p, shards=shards)
        if plan is not None and max_len is not None and plan.slots + max_new_tokens > max_len:
            plan = None  # the two-part layout does not fit the fixed cache
    # The prefills read only the slots they fill; every decode step reads all S.
    cache_len = max_len or bucket_len((plan.slots if plan else p) + max_new_tokens)

    tokens = _pad_axis(_pad_axis(tokens, 1, p, pad_id), 0, bb, pad_id)
    lengths_b = np.concatenate([lengths, np.ones(bb - b, np.int32)])  # dummies: 1 pad token
    active = np.arange(bb) < b
    if embeds is not None:
        if embeds.shape[0] != b or embed_mask.shape != embeds.shape[:2]:
            raise ValueError(
                f"embeds {embeds.shape} / embed_mask {embed_mask.shape} do not match {b} prompts"
            )
        embeds = _pad_axis(_pad_axis(embeds, 1, p), 0, bb)
        embed_mask = _pad_axis(_pad_axis(embed_mask.astype(bool), 1, p, False), 0, bb, False)

    graphdef, state = nnx.split(model)
    statics = dict(
        graphdef=graphdef,
        greedy=sampling.greedy,
        top_k=0 if sampling.greedy else sampling.top_k,
        use_top_p=not sampling.greedy and sampling.top_p < 1.0,
    )
    traced = dict(
        pad_id=jnp.int32(pad_id),
        temperature=jnp.float32(sampling.temperature or 1.0),
        top_p=jnp.float32(sampling.top_p),
        key=jax.random.key(seed),
    )
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        prompt = (state, tokens, lengths_b, embeds, embed_mask, traced["pad_id"])
        if plan is None:
            logits, cache = _prefill(*prompt, graphdef=graphdef, cache_len=cache_len)
        else:
            logits, cache = _prefill_shared(
                *prompt,
                plan.first,
                plan.prefix_lengths,
                plan.group,
                graphdef=graphdef,
                prefix_width=plan.prefix_width,
                suffix_width=plan.suffix_width,
                cache_len=cache_len,
            )
        out, out_lengths, stopped, _ = _decode(
            state,
            cache,
            logits,
            lengths_b,
            active,
            stop,
            max_new_tokens=max_new_tokens,
            **statics,
            **traced,
        )
    return Generated(out[:b], out_lengths[:b], stopped[:b])
