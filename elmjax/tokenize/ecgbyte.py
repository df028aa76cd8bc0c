"""The symbolic ECG (ECG-Byte) tokenizer: discretisation to 26 symbols, BPE training, encoding.

Pipeline::

    float [12, L] --discretise--> uint8 symbols 0..25 ('a'..'z') --flatten lead-major-->
    one symbol stream per ECG (all of lead I, then lead II, ...) --encode--> int32 ids

Id space
--------
The tokenizer's own dense ids: ``0..25`` are the 26 symbols (symbol ``k`` is the letter
``chr(97 + k)``), ``26 + i`` is the token made by merge ``i``; ``vocab_size = 26 + num_merges``.
``merges`` is an int32 ``[M, 2]`` array of ``(left id, right id)``; both ids are always smaller
than ``26 + i``. (The reference uses 256 byte ids plus ``256 + i``;
:meth:`ECGByteTokenizer.from_reference_pickle` maps its tokenizers into this space.)

Discretisation (:func:`discretise`)
-----------------------------------
``v = clip((x - min) / (max - min + 1e-6), 0, 1)``, symbol ``min(floor(26 v), 25)``, computed in
float64. ``min``/``max`` are taken over the whole ``[12, L]`` array of each ECG (the reference's
choice, the default) or per lead (``per_lead=True``). With ``centred=True`` the range is
``[-a, a]``, ``a = max |x|`` (same scopes), so 0 mV always falls on the boundary of symbols 12
and 13 whatever the polarity of the largest wave: with min-max, the isoelectric line of a lead
whose QRS points down sits near 'z' and that of one whose QRS points up near 'a', so the same
wave shape becomes different symbols in different ECGs. :func:`symbols_to_signal` decodes to bin
centres, ``min + (k + 1/2) (max - min + 1e-6) / 26``, so the error is at most half a bin,
``(max - min + 1e-6) / 52``, for every sample; the reference's ``k/25 (max - min) + min`` is
available with ``centres=False`` and is off by up to a whole bin, ``(max - min) / 26``.

BPE training (:func:`train_bpe`)
--------------------------------
Every training ECG is its own sequence, so no merge ever crosses from one ECG into the next (the
reference concatenated all ECGs into one string); with ``lead_boundaries=True`` every lead of
every ECG is its own sequence, so tokens never span two leads either (needed to encode leads
separately). Each merge takes the most frequent adjacent pair, counting overlapping windows
(``"aaa"`` holds two ``(a, a)``); ties go to the smallest ``(left id, right id)``; occurrences
are merged left to right (``"aaa"`` -> ``"(aa) a"``). Training stops early when the best pair
occurs fewer than ``min_frequency`` times (default 2), so ``vocab_size`` can come out smaller
than asked.

The algorithm (numba, all state in flat arrays, no Python object per symbol):

* the corpus is one ``uint16`` token array with a sentinel between sequences; a token covering
  positions ``[p, p + n)`` keeps its id at ``p`` (the other positions are marked dead) and its
  length ``n`` at both ``p`` and ``p + n - 1`` (``span``, ``uint16`` or ``uint32``), so the next
  token starts at ``p + span[p]`` and the previous one at ``p - span[p - 1]``: a doubly linked
  list at 4 bytes per symbol;
* exact counts of every adjacent pair in an open-addressing hash table, updated incrementally at
  each merge (the left and right neighbours' pairs lose one, the new token's pairs gain one);
* a lazy max-heap of ``(count, tie-break)`` keys: after a merge only pairs whose count went up
  are pushed; an entry whose count is stale is re-pushed with the current count when popped;
* for each token id, the list of positions where it was created (one ``int32`` arena): the
  occurrences of the best pair ``(a, b)`` are found by scanning the shorter of the two tokens'
  lists (stale entries are dropped as they are met, and the arena is compacted when full; it
  holds ``symbols + largest initial pair count + 1/16`` entries, which provably never has to
  grow: no pair count ever exceeds the largest initial one).

A merge of ``(a, b)`` costs ``O(min(#a, #b))`` (list scan, O(1) count updates per occurrence)
plus ``O(log H)`` per pair whose count rose, instead of the reference's full recount ``O(N)``.
Memory is about 9 bytes per training symbol (``uint16`` tokens, ``uint16`` spans, the ``int32``
arena): 600 M symbols (20,000 ECGs of 12 x 2500) take about 5.5 GB on top of the ``uint8``
symbols (up to 7.4 GB for a pathological corpus made of one repeated symbol).
The initial sequence building, pair counting and per-token position lists run in parallel over
numba threads (``workers``); the merge loop itself is sequential by nature (each merge depends
on the counts the previous one left) and stays on one core, which meets the targets (see
``BENCHMARKS.md``: 200 ECGs x 5000 merges in about 1 s, 20,000 ECGs in about
2 minutes).

Encoding (:meth:`ECGByteTokenizer.encode`)
------------------------------------------
``mode="bpe"`` (default): standard merge-order BPE, the tokenization training itself produced:
merges are applied in rank order, each left to right over the sequence. Per sequence: a linked
list, a hash table ``pair -> rank``, and FIFO buckets per rank (a monotone bucket queue; a merge
only creates pairs of higher rank, so one pass over the ranks suffices), ``O(n + M)``.
``mode="reference"``: the reference's greedy longest match, left to right, over a trie of all
token strings (a dense ``[nodes, 26]`` child table; duplicate strings keep the highest id).
The two modes can give different ids for the same symbols; both decode exactly. Batches run
over numba threads (``workers``).

When the tokenizer was trained with ``lead_boundaries=True``, :meth:`~ECGByteTokenizer.encode`
encodes every lead separately and concatenates (in both modes), so the stream never holds a
token spanning two leads and :meth:`~ECGByteTokenizer.encode_leads` gives the same ids split by
lead.

Files
-----
:meth:`ECGByteTokenizer.save` writes JSON (``{"format": "elmjax.ecgbyte", "version": 1, ...}``);
no pickle is ever loaded except through :meth:`ECGByteTokenizer.from_reference_pickle`, whose
unpickler refuses every class and function reference.

CLI::

    python -m elmjax.tokenize.ecgbyte train --segments DIR --num-merges 5000 --out tok.json \\
        [--max-ecgs K] [--per-lead-norm] [--centred-norm] [--lead-boundaries] \\
        [--workers N] [--seed S]
    python -m elmjax.tokenize.ecgbyte encode --tokenizer tok.json --segments DIR \\
        --out ids.npz [--mode bpe|reference]
    python -m elmjax.tokenize.ecgbyte stats --tokenizer tok.json --segments DIR [--plot h.png]

``DIR`` is an output directory of ``python -m elmjax.ecg.preprocess``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numba
import numpy as np
from numba import njit, prange
from tqdm import tqdm

NUM_SYMBOLS = 26  # 'a'..'z'
EPS = 1e-6  # added to (max - min), as in the reference
MODES = ("bpe", "reference")
FORMAT_NAME = "elmjax.ecgbyte"
FORMAT_VERSION = 1
MAX_VOCAB = 65534  # ids are stored as uint16 during training; 65534 and 65535 are markers

_SENT = 65535  # token array: boundary between training sequences
_DEAD = 65534  # token array: a position inside a longer token
_GOLDEN = np.uint64(11400714819323198485)  # 2^64 / golden ratio, multiplicative hashing
_MASK16 = 65535
# Below this many symbols a batch runs on the calling thread: on a busy machine waking numba's
# other threads costs milliseconds (they wait for a core), more than the work itself.
_PARALLEL_MIN_SYMBOLS = 1 << 20

# Indices into the int64 scalar state array of the trainer.
_ST_HASH_USED = 0  # occupied slots of the pair hash table
_ST_HEAP_SIZE = 1
_ST_TOP = 2  # end of the used part of the position arena
_ST_MERGES = 3  # merges done
_ST_ROUND = 4  # merge round id (stamps pushed pairs)
_ST_TOUCHED = 5  # pairs whose count went up in this round
_ST_SCANNED = 6  # positions scanned so far (work done)
_ST_MERGED = 7  # occurrences merged so far

# Return codes of the merge loop.
_RUN_BUDGET = 0  # did the merges or the work it was allowed; call again
_RUN_FINISHED = 1  # no pair occurs min_frequency times any more
_RUN_NEED_ARENA = 2
_RUN_NEED_HEAP = 3
_RUN_NEED_HASH = 4


class TokenizerFileError(ValueError):
    """A tokenizer file is not a valid elmjax ECG-Byte tokenizer (or reference pickle)."""


# ----------------------------------------------------------------------------------------------
# Discretisation
# ----------------------------------------------------------------------------------------------


class Discretised(NamedTuple):
    """Symbols of a batch of ECGs and the normalisation that made them.

    Attributes:
      symbols: uint8, same shape as the signal, values ``0..25``.
      lo: float64 min used: ``[B]`` (``[]`` for one ECG), or ``[B, 12]`` (``[12]``) per lead.
      hi: float64 max used, same shape as ``lo``.
    """

    symbols: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def discretise(
    signal: np.ndarray,
    *,
    per_lead: bool = False,
    centred: bool = False,
    workers: int | None = None,
) -> Discretised:
    """Min-max normalises and quantises ECGs to 26 symbols.

    ``v = clip((x - min) / (max - min + 1e-6), 0, 1)``, symbol ``min(floor(26 v), 25)``, in
    float64. ``min``/``max`` over each ECG's whole ``[leads, L]`` array (the reference), or over
    each lead with ``per_lead=True``. A flat ECG (or lead) gives symbol 0 everywhere.
    ``centred=True`` uses ``-a``/``a`` with ``a = max(-min, max)`` instead (0 stays between
    symbols 12 and 13; a flat zero ECG gives symbol 0, as with min-max).

    Args:
      signal: float ``[leads, L]`` (one ECG) or ``[B, leads, L]``.
      per_lead: normalise each lead by its own min and max.
      centred: normalise by the largest absolute value, symmetrically around 0.
      workers: numba threads for large batches (None: numba's default, all cores).

    Returns:
      :class:`Discretised` (symbols, lo, hi).

    Raises:
      ValueError: wrong rank, or NaN/inf in the signal.
    """
    x = np.asarray(signal)
    if x.ndim not in (2, 3) or x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"expected [leads, L] or [B, leads, L] with L > 0, got {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    batch = np.ascontiguousarray(x.reshape((-1,) + x.shape[-2:]))
    symbols = np.empty(batch.shape, np.uint8)
    groups = batch.shape[1] if per_lead else 1
    lo = np.empty((batch.shape[0], groups), np.float64)
    hi = np.empty((batch.shape[0], groups), np.float64)
    with _numba_threads(workers) as threads:
        if threads > 1 and batch.size >= _PARALLEL_MIN_SYMBOLS:
            n_chunks = min(4 * threads, len(batch))
            _discretise_parallel(batch, per_lead, centred, symbols, lo, hi, n_chunks)
        else:
            _discretise_range(batch, per_lead, centred, symbols, lo, hi, 0, len(batch))
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError("signal contains NaN or inf")
    stats_shape = x.shape[:-2] + ((x.shape[-2],) if per_lead else ())
    return Discretised(symbols.reshape(x.shape), lo.reshape(stats_shape), hi.reshape(stats_shape))


@njit(cache=True)
def _discretise_range(x, per_lead, centred, symbols, lo, hi, e0, e1):
    """ECGs ``e0..e1-1``: min/max over the ECG or each lead, then the symbols, in float64 with
    exactly the operations of the formula (no fastmath, so numpy gives the same symbols)."""
    leads, length = x.shape[1], x.shape[2]
    for e in range(e0, e1):
        for g in range(lo.shape[1]):
            l0 = g if per_lead else 0
            l1 = g + 1 if per_lead else leads
            mn = np.float64(x[e, l0, 0])
            mx = mn
            for lead in range(l0, l1):
                for i in range(length):
                    v = np.float64(x[e, lead, i])
                    if v < mn or v != v:
                        mn = v
                    if v > mx or v != v:
                        mx = v
            if centred:
                a = abs(max(-mn, mx))  # >= 0 (abs: no -0.0)
                if mn != mn or mx != mx:
                    a = mn + mx  # NaN: the caller raises
                mn, mx = -a, a
            lo[e, g] = mn
            hi[e, g] = mx
            if not (np.isfinite(mn) and np.isfinite(mx)):
                continue  # the caller raises
            scale = mx - mn + EPS
            for lead in range(l0, l1):
                for i in range(length):
                    v = (np.float64(x[e, lead, i]) - mn) / scale
                    v = min(max(v, 0.0), 1.0)
                    symbols[e, lead, i] = np.uint8(min(np.floor(v * NUM_SYMBOLS), NUM_SYMBOLS - 1))


@njit(cache=True, parallel=True)
def _discretise_parallel(x, per_lead, centred, symbols, lo, hi, n_chunks):
    """:func:`_discretise_range` over chunks of ECGs in parallel."""
    batch = x.shape[0]
    for ch in prange(n_chunks):
        e0, e1 = ch * batch // n_chunks, (ch + 1) * batch // n_chunks
        _discretise_range(x, per_lead, centred, symbols, lo, hi, e0, e1)


def symbols_to_signal(
    symbols: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, centres: bool = True
) -> np.ndarray:
    """De-quantises symbols with the min/max that :func:`discretise` returned.

    With ``centres=True`` (default) each symbol ``k`` becomes its bin centre,
    ``lo + (k + 0.5) * (hi - lo + 1e-6) / 26``: for every sample of the original signal,
    ``|x - decoded| <= (hi - lo + 1e-6) / 52`` (half a bin; float64 rounding aside). With
    ``centres=False`` it is the reference's ``k / 25 * (hi - lo) + lo``, whose error reaches
    a whole bin, ``(hi - lo) / 26``, at the extreme symbols.

    Args:
      symbols: uint8 ``[leads, L]`` or ``[B, leads, L]``.
      lo: per-ECG ``[]``/``[B]`` or per-lead ``[leads]``/``[B, leads]`` minimum.
      hi: maximum, same shape as ``lo``.
      centres: decode to bin centres (else the reference's formula).

    Returns:
      float64 array shaped like ``symbols``.
    """
    k = np.asarray(symbols).astype(np.float64)
    lo = np.asarray(lo, np.float64)
    hi = np.asarray(hi, np.float64)
    extra = k.ndim - lo.ndim  # 2: one value per ECG, 1: per lead
    if extra not in (1, 2) or lo.shape != hi.shape or k.shape[: lo.ndim] != lo.shape:
        raise ValueError(f"lo/hi of shape {lo.shape} do not fit symbols of shape {k.shape}")
    lo = lo.reshape(lo.shape + (1,) * extra)
    hi = hi.reshape(hi.shape + (1,) * extra)
    if centres:
        return lo + (k + 0.5) * ((hi - lo + EPS) / NUM_SYMBOLS)
    return k / (NUM_SYMBOLS - 1) * (hi - lo) + lo


def symbols_to_text(symbols: np.ndarray) -> str:
    """Symbols (any shape, flattened in C order, i.e. lead-major) as a string of ``a..z``."""
    s = np.asarray(symbols).ravel()
    if s.size and (s.min() < 0 or s.max() >= NUM_SYMBOLS):
        raise ValueError("symbols must lie in 0..25")
    return (s.astype(np.uint8) + 97).tobytes().decode("ascii")


def text_to_symbols(text: str) -> np.ndarray:
    """A string of ``a..z`` as uint8 symbols ``0..25`` (1-D)."""
    raw = np.frombuffer(text.encode("ascii"), np.uint8)
    if raw.size and (raw.min() < 97 or raw.max() > 122):
        raise ValueError("text must consist of the letters a..z only")
    return raw - np.uint8(97)


# ----------------------------------------------------------------------------------------------
# Symbol corpora as flat sequences
# ----------------------------------------------------------------------------------------------


class _Corpus(NamedTuple):
    flat: np.ndarray  # uint8 [N], all symbols, ECG after ECG, lead-major
    offsets: np.ndarray  # int64 [S + 1], sequence boundaries in flat
    n_ecgs: int
    leads: int  # sequences per ECG (1 unless split by lead)
    batched: bool  # the input was a batch (else one ECG)


def _corpus(symbols: Any, by_lead: bool, num_symbols: int = NUM_SYMBOLS) -> _Corpus:
    """Turns ``[L]``/``[leads, L]``/``[B, leads, L]`` uint8 symbols, or a list of ``[leads, L_i]``
    arrays, into one flat array with sequence offsets (one sequence per ECG, or per lead)."""
    if isinstance(symbols, np.ndarray):
        if symbols.ndim not in (1, 2, 3):
            raise ValueError(f"expected [L], [leads, L] or [B, leads, L], got {symbols.shape}")
        batched = symbols.ndim == 3
        arrays = symbols.reshape((-1,) + symbols.shape[-2:]) if batched else None
        if not batched:
            arrays = symbols.reshape((1,) * (3 - symbols.ndim) + symbols.shape)
        if arrays.dtype != np.uint8:
            raise TypeError(f"symbols must be uint8, got {arrays.dtype}")
        b, leads, length = arrays.shape
        flat = np.ascontiguousarray(arrays).reshape(-1)
        step = length if by_lead else leads * length
        offsets = np.arange(b * leads + 1 if by_lead else b + 1, dtype=np.int64) * step
    else:
        items = [np.asarray(s) for s in symbols]
        items = [s.reshape((1,) * (2 - s.ndim) + s.shape) for s in items]
        if any(s.dtype != np.uint8 or s.ndim != 2 for s in items):
            raise TypeError("every item must be a uint8 [leads, L] array")
        leads = items[0].shape[0] if items else 12
        if any(s.shape[0] != leads for s in items):
            raise ValueError("all ECGs must have the same number of leads")
        b, batched = len(items), True
        flat = np.concatenate([s.reshape(-1) for s in items]) if items else np.zeros(0, np.uint8)
        if by_lead:
            lengths = np.repeat([s.shape[1] for s in items], leads)
        else:
            lengths = np.array([s.size for s in items], np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
    if flat.size and flat.max() >= num_symbols:
        raise ValueError(f"symbols must lie in 0..{num_symbols - 1}")
    return _Corpus(flat, offsets, b, leads if by_lead else 1, batched)


@contextlib.contextmanager
def _numba_threads(workers: int | None) -> Iterator[int]:
    """Runs the block with ``workers`` numba threads (None: numba's default), then restores."""
    previous = numba.get_num_threads()
    if workers is None:
        yield previous
        return
    numba.set_num_threads(max(1, min(int(workers), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield numba.get_num_threads()
    finally:
        numba.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# Hash table and heap kernels (shared by training and encoding)
# ----------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _hash_find(keys, key):
    """Slot of ``key`` in an open-addressing table (linear probing, -1 = empty), or the empty
    slot where it would go. ``keys.size`` is a power of two."""
    mask = keys.size - 1
    i = np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(32)) & mask
    while keys[i] != key and keys[i] != -1:
        i = (i + 1) & mask
    return i


@njit(cache=True)
def _heap_push(heap, size, item):
    """Pushes ``item`` onto the int64 max-heap ``heap[:size]``; returns the new size."""
    i = size
    while i > 0:
        parent = (i - 1) >> 1
        if heap[parent] >= item:
            break
        heap[i] = heap[parent]
        i = parent
    heap[i] = item
    return size + 1


@njit(cache=True)
def _heap_pop(heap, size):
    """Pops the largest item of ``heap[:size]`` (size > 0); returns ``(item, new size)``."""
    top = heap[0]
    size -= 1
    last = heap[size]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and heap[child + 1] > heap[child]:
            child += 1
        if heap[child] <= last:
            break
        heap[i] = heap[child]
        i = child
    if size > 0:
        heap[i] = last
    return top, size


@njit(cache=True, inline="always")
def _heap_item(count, a, b):
    """Heap key: highest count first, then smallest ``(a, b)``."""
    return (np.int64(count) << 32) | (np.int64(_MASK16 - a) << 16) | np.int64(_MASK16 - b)


# ----------------------------------------------------------------------------------------------
# BPE training kernels
# ----------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _build_tokens(flat, offsets, tok):
    """``tok = [SENT, seq 0, SENT, seq 1, SENT, ...]`` (symbol j of sequence s lands at
    ``offsets[s] + s + 1 + j``)."""
    n_seq = offsets.size - 1
    tok[0] = _SENT
    for s in prange(n_seq):
        start = offsets[s]
        stop = offsets[s + 1]
        base = start + s + 1
        for j in range(stop - start):
            tok[base + j] = flat[start + j]
        tok[stop + s + 1] = _SENT


@njit(cache=True, parallel=True)
def _count_chunks(tok, num_symbols, n_chunks):
    """Per chunk of ``tok``: counts of each symbol and of each adjacent symbol pair."""
    n = tok.size
    pairs = np.zeros((n_chunks, num_symbols, num_symbols), np.int64)
    singles = np.zeros((n_chunks, num_symbols), np.int64)
    for ch in prange(n_chunks):
        lo = ch * n // n_chunks
        hi = (ch + 1) * n // n_chunks
        for i in range(lo, hi):
            a = tok[i]
            if a == _SENT:
                continue
            singles[ch, a] += 1
            b = tok[i + 1]  # tok ends with SENT, so i + 1 < n here
            if b != _SENT:
                pairs[ch, a, b] += 1
    return pairs, singles


@njit(cache=True, parallel=True)
def _fill_symbol_lists(tok, starts, arena, n_chunks):
    """Counting sort of positions by symbol: chunk ``ch`` writes the positions of symbol ``a``
    from ``starts[ch, a]`` on, so each symbol's list is in ascending order."""
    n = tok.size
    for ch in prange(n_chunks):
        lo = ch * n // n_chunks
        hi = (ch + 1) * n // n_chunks
        write = starts[ch].copy()
        for i in range(lo, hi):
            a = tok[i]
            if a != _SENT:
                arena[write[a]] = i
                write[a] += 1


@njit(cache=True, inline="always")
def _pair_add(keys, counts, stamps, touched, st, key, delta):
    """``count[key] += delta``; a pair whose count goes up is remembered for the heap."""
    i = _hash_find(keys, key)
    if keys[i] == -1:
        keys[i] = key
        counts[i] = 0
        stamps[i] = -1
        st[_ST_HASH_USED] += 1
    counts[i] += delta
    if delta > 0 and stamps[i] != st[_ST_ROUND]:
        stamps[i] = st[_ST_ROUND]
        touched[st[_ST_TOUCHED]] = i
        st[_ST_TOUCHED] += 1


@njit(cache=True)
def _train_some(
    tok,
    span,
    arena,
    list_start,
    list_end,
    live,
    keys,
    counts,
    stamps,
    heap,
    touched,
    merges,
    merged_counts,
    st,
    num_symbols,
    min_frequency,
    max_merges,
    work_budget,
):
    """Runs up to ``max_merges`` merges (or about ``work_budget`` scanned positions).

    Returns one of the ``_RUN_*`` codes; a ``_RUN_NEED_*`` code asks the caller to grow or
    compact that structure and call again (nothing was changed for the pending merge).
    """
    done = 0
    work = 0
    while done < max_merges and work < work_budget:
        m = st[_ST_MERGES]
        if m >= merges.shape[0]:
            return _RUN_FINISHED
        vocab = num_symbols + m
        if (st[_ST_HASH_USED] + 2 * vocab + 4) * 2 > keys.size:
            return _RUN_NEED_HASH
        if st[_ST_HEAP_SIZE] + 2 * vocab + 4 > heap.size:
            return _RUN_NEED_HEAP
        # The best pair: pop until an entry's count is the pair's current count.
        found = False
        item = np.int64(0)
        count = np.int64(0)
        a = 0
        b = 0
        slot = 0
        while st[_ST_HEAP_SIZE] > 0:
            item, st[_ST_HEAP_SIZE] = _heap_pop(heap, st[_ST_HEAP_SIZE])
            count = item >> 32
            a = _MASK16 - ((item >> 16) & _MASK16)
            b = _MASK16 - (item & _MASK16)
            slot = _hash_find(keys, (np.int64(a) << 16) | b)
            actual = counts[slot]
            if actual == count:
                found = True
                break
            if actual > 0:
                st[_ST_HEAP_SIZE] = _heap_push(heap, st[_ST_HEAP_SIZE], _heap_item(actual, a, b))
        if not found:
            return _RUN_FINISHED
        if count < min_frequency or arena.size - st[_ST_TOP] < count:
            st[_ST_HEAP_SIZE] = _heap_push(heap, st[_ST_HEAP_SIZE], item)
            return _RUN_FINISHED if count < min_frequency else _RUN_NEED_ARENA

        # Merge every occurrence of (a, b), left to right, into c.
        c = vocab
        merges[m, 0] = a
        merges[m, 1] = b
        st[_ST_ROUND] += 1
        st[_ST_TOUCHED] = 0
        use_left = a == b or live[a] <= live[b]
        src = a if use_left else b
        start = list_start[src]
        stop = list_end[src]
        write = start
        top = st[_ST_TOP]
        list_start[c] = top
        for k in range(start, stop):
            pos = arena[k]
            if tok[pos] != src:
                continue  # stale: merged into a longer token since
            if use_left:
                p = pos
                q = p + span[p]
                if tok[q] != b:
                    arena[write] = pos
                    write += 1
                    continue
            else:
                q = pos
                p = q - span[q - 1]
                if tok[p] != a:
                    arena[write] = pos
                    write += 1
                    continue
            left = p - span[p - 1]
            t_left = tok[left]
            right = q + span[q]
            t_right = tok[right]
            if t_left != _SENT:
                _pair_add(keys, counts, stamps, touched, st, (np.int64(t_left) << 16) | a, -1)
                _pair_add(keys, counts, stamps, touched, st, (np.int64(t_left) << 16) | c, 1)
            if t_right != _SENT:
                _pair_add(keys, counts, stamps, touched, st, (np.int64(b) << 16) | t_right, -1)
                _pair_add(keys, counts, stamps, touched, st, (np.int64(c) << 16) | t_right, 1)
            counts[slot] -= 1
            length = span[p] + span[q]
            tok[p] = c
            tok[q] = _DEAD
            span[p] = length
            span[p + length - 1] = length
            live[a] -= 1
            live[b] -= 1
            live[c] += 1
            arena[top] = p
            top += 1
        list_end[src] = write
        list_end[c] = top
        st[_ST_TOP] = top
        work += stop - start
        st[_ST_SCANNED] += stop - start
        st[_ST_MERGED] += top - list_start[c]
        merged_counts[m] = top - list_start[c]
        for t in range(st[_ST_TOUCHED]):
            i = touched[t]
            if counts[i] > 0:
                key = keys[i]
                st[_ST_HEAP_SIZE] = _heap_push(
                    heap, st[_ST_HEAP_SIZE], _heap_item(counts[i], key >> 16, key & _MASK16)
                )
        st[_ST_MERGES] = m + 1
        done += 1
    return _RUN_BUDGET


@njit(cache=True)
def _compact_arena(tok, arena, list_start, list_end, n_tokens, st):
    """Drops stale positions from every token's list and packs the lists to the front (they lie
    in id order, so packing in place is safe)."""
    write = 0
    for t in range(n_tokens):
        start = list_start[t]
        stop = list_end[t]
        list_start[t] = write
        for k in range(start, stop):
            pos = arena[k]
            if tok[pos] == t:
                arena[write] = pos
                write += 1
        list_end[t] = write
    st[_ST_TOP] = write


@njit(cache=True)
def _rehash(keys, counts, stamps, new_keys, new_counts, new_stamps):
    """Reinserts every entry of a pair table into a larger one; returns the entries kept."""
    used = 0
    for i in range(keys.size):
        if keys[i] != -1 and counts[i] > 0:
            j = _hash_find(new_keys, keys[i])
            new_keys[j] = keys[i]
            new_counts[j] = counts[i]
            new_stamps[j] = stamps[i]
            used += 1
    return used


def _pow2_at_least(n: int) -> int:
    return 1 << max(4, int(n - 1).bit_length())


def train_bpe(
    symbols: Any,
    num_merges: int,
    *,
    lead_boundaries: bool = False,
    min_frequency: int = 2,
    workers: int | None = None,
    progress: bool = True,
    num_symbols: int = NUM_SYMBOLS,
    return_stats: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """Learns BPE merges on ECG symbol sequences (see the module docstring for the algorithm).

    Each ECG is its own sequence (merges never cross ECGs); with ``lead_boundaries`` each lead
    is. Each merge takes the pair with the highest count of adjacent (overlapping) windows,
    ties broken by the smallest ``(left id, right id)``, and merges its occurrences left to
    right. Stops after ``num_merges`` merges or when no pair occurs ``min_frequency`` times.

    Args:
      symbols: uint8 ``[B, leads, L]`` (or ``[leads, L]``, or a list of ``[leads, L_i]``).
      num_merges: merges to learn (at most ``65534 - num_symbols``).
      lead_boundaries: never merge across the boundary between two leads.
      min_frequency: stop when the best pair occurs fewer times than this.
      workers: numba threads for building the sequences and the initial counts (None: all).
      progress: show a tqdm progress bar over merges.
      num_symbols: size of the symbol alphabet.
      return_stats: also return a dict of counters (symbols, sequences, positions scanned,
        occurrences merged in all and per merge, arena compactions, seconds for setup and
        merges).

    Returns:
      int32 ``[M, 2]`` merges, ``M <= num_merges``; merge ``i`` makes id ``num_symbols + i``
      (and the stats dict with ``return_stats``).
    """
    if num_merges < 0 or num_symbols + num_merges > MAX_VOCAB:
        raise ValueError(f"num_merges must lie in 0..{MAX_VOCAB - num_symbols}")
    if min_frequency < 1:
        raise ValueError("min_frequency must be at least 1")
    corpus = _corpus(symbols, by_lead=lead_boundaries, num_symbols=num_symbols)
    n_seq = corpus.offsets.size - 1
    n = corpus.flat.size + n_seq + 1
    if n >= 2**31 - 1:
        raise ValueError(f"corpus too large: {corpus.flat.size} symbols (int32 positions)")
    vocab_max = num_symbols + num_merges
    merges = np.zeros((num_merges, 2), np.int32)
    merged_counts = np.zeros(num_merges, np.int64)
    stats: dict[str, Any] = {"symbols": int(corpus.flat.size), "sequences": int(n_seq)}
    if num_merges == 0 or corpus.flat.size == 0:
        return (merges[:0], stats) if return_stats else merges[:0]
    t0 = time.perf_counter()

    with _numba_threads(workers if n >= _PARALLEL_MIN_SYMBOLS else 1) as threads:
        tok = np.empty(n, np.uint16)
        _build_tokens(corpus.flat, corpus.offsets, tok)
        longest = int(np.diff(corpus.offsets).max())
        span = np.ones(n, np.uint16 if longest < 65535 else np.uint32)
        n_chunks = max(1, min(4 * threads, n // 1024 + 1))
        pair_counts, single_counts = _count_chunks(tok, num_symbols, n_chunks)
        pair_total = pair_counts.sum(axis=0)
        per_symbol = single_counts.sum(axis=0)
        n_live = int(per_symbol.sum())
        # No pair count ever rises above the largest initial one (new pairs contain the new
        # token, which occurs at most as often as the pair it came from), and live entries never
        # outnumber the symbols, so after a compaction there is always room for the next merge.
        max_pair = int(pair_total.max())
        arena = np.empty(n_live + max_pair + n_live // 16 + 1024, np.int32)
        symbol_start = np.zeros(num_symbols, np.int64)
        np.cumsum(per_symbol[:-1], out=symbol_start[1:])
        chunk_start = symbol_start[None, :] + np.cumsum(single_counts, axis=0) - single_counts
        _fill_symbol_lists(tok, np.ascontiguousarray(chunk_start), arena, n_chunks)

    list_start = np.zeros(vocab_max, np.int64)
    list_end = np.zeros(vocab_max, np.int64)
    list_start[:num_symbols] = symbol_start
    list_end[:num_symbols] = symbol_start + per_symbol
    live = np.zeros(vocab_max, np.int64)
    live[:num_symbols] = per_symbol
    st = np.zeros(8, np.int64)
    st[_ST_TOP] = n_live

    # The pair table and the heap start small and grow with the vocabulary (load <= 1/2).
    n_pairs = int(np.count_nonzero(pair_total))
    capacity = _pow2_at_least(4 * (n_pairs + 2 * num_symbols + 4))
    keys = np.full(capacity, -1, np.int64)
    counts = np.zeros(capacity, np.int32)  # < 2^31: positions are int32
    stamps = np.full(capacity, -1, np.int32)
    heap = np.zeros(_pow2_at_least(n_pairs + 2 * num_symbols + 8), np.int64)
    touched = np.zeros(2 * vocab_max + 8, np.int64)
    for a, b in zip(*np.nonzero(pair_total), strict=True):
        slot = _hash_find(keys, (int(a) << 16) | int(b))
        keys[slot] = (int(a) << 16) | int(b)
        counts[slot] = pair_total[a, b]
        st[_ST_HASH_USED] += 1
        st[_ST_HEAP_SIZE] = _heap_push(heap, st[_ST_HEAP_SIZE], _heap_item(pair_total[a, b], a, b))

    t1 = time.perf_counter()
    compactions = 0
    bar = tqdm(total=num_merges, desc="BPE merges", unit="merge", disable=not progress)
    while True:
        before = int(st[_ST_MERGES])
        status = _train_some(
            tok,
            span,
            arena,
            list_start,
            list_end,
            live,
            keys,
            counts,
            stamps,
            heap,
            touched,
            merges,
            merged_counts,
            st,
            num_symbols,
            min_frequency,
            256,
            1 << 24,
        )
        bar.update(int(st[_ST_MERGES]) - before)
        if status == _RUN_FINISHED:
            break
        if status == _RUN_NEED_HASH:
            vocab = num_symbols + int(st[_ST_MERGES])
            kept = int(np.count_nonzero(counts))  # pairs at count 0 are dropped
            size = _pow2_at_least(3 * (kept + 2 * vocab + 4))
            new_keys = np.full(size, -1, np.int64)
            new_counts = np.zeros(size, np.int32)
            new_stamps = np.full(size, -1, np.int32)
            st[_ST_HASH_USED] = _rehash(keys, counts, stamps, new_keys, new_counts, new_stamps)
            keys, counts, stamps = new_keys, new_counts, new_stamps
        elif status == _RUN_NEED_HEAP:
            heap = np.concatenate([heap, np.zeros_like(heap)])
        elif status == _RUN_NEED_ARENA:
            n_tokens = num_symbols + int(st[_ST_MERGES])
            _compact_arena(tok, arena, list_start, list_end, n_tokens, st)
            compactions += 1
            if arena.size - int(st[_ST_TOP]) < int(heap[0] >> 32):  # the pending merge's count
                raise AssertionError("position arena too small after compaction (a bug)")
    bar.close()
    merges = merges[: st[_ST_MERGES]].copy()
    if not return_stats:
        return merges
    stats.update(
        merges=len(merges),
        positions_scanned=int(st[_ST_SCANNED]),
        occurrences_merged=int(st[_ST_MERGED]),
        merged_per_merge=merged_counts[: len(merges)],
        arena_compactions=compactions,
        arena_entries=int(arena.size),
        seconds_setup=t1 - t0,
        seconds_merges=time.perf_counter() - t1,
    )
    return merges, stats


# ----------------------------------------------------------------------------------------------
# Encoding kernels
# ----------------------------------------------------------------------------------------------


_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)  # empty slot of the encoder's rank table


@njit(cache=True, inline="always")
def _rank_slot(table, key):
    """Slot of ``key`` (``left << 16 | right``) in the packed rank table (or the empty slot
    where it would go). Each slot is ``key << 32 | rank``: one 8-byte load per probe."""
    mask = table.size - 1
    k = np.uint64(key)
    i = np.int64((k * _GOLDEN) >> np.uint64(32)) & mask
    while table[i] != _EMPTY and (table[i] >> np.uint64(32)) != k:
        i = (i + 1) & mask
    return i


@njit(cache=True)
def _rank_insert(table, a, b, rank):
    key = (np.int64(a) << 16) | b
    table[_rank_slot(table, key)] = (np.uint64(key) << np.uint64(32)) | np.uint64(rank)


@njit(cache=True)
def _rank_table(merges):
    """Packed hash table ``(left, right) -> merge rank`` for the encoder, load <= 1/2."""
    size = 16
    while size < 2 * merges.shape[0]:
        size *= 2
    table = np.full(size, _EMPTY, np.uint64)
    for r in range(merges.shape[0]):
        _rank_insert(table, merges[r, 0], merges[r, 1], r)
    return table


@njit(cache=True, inline="always")
def _rank(table, a, b):
    """Rank of the merge of ``(a, b)``, -1 if there is none."""
    e = table[_rank_slot(table, (np.int64(a) << 16) | b)]
    if e == _EMPTY:
        return -1
    return np.int64(e & np.uint64(0xFFFFFFFF))


_NO_NEXT = 0xFFFFFFFF  # end of a bucket's list


@njit(cache=True, inline="always")
def _bucket_push(rank, pos, head, tail, entries, n_entries):
    """Appends position ``pos`` to the FIFO list of ``rank``. An entry is one int64,
    ``pos << 32 | next entry``, so following a list touches one array."""
    entries[n_entries] = (np.int64(pos) << 32) | _NO_NEXT
    if head[rank] < 0:
        head[rank] = n_entries
    else:
        last = tail[rank]
        entries[last] = (entries[last] & ~np.int64(_NO_NEXT)) | n_entries
    tail[rank] = n_entries
    return n_entries + 1


@njit(cache=True)
def _bpe_encode_seq(sym, out, merges, table, num_symbols, tok, nxt, prv, head, tail, entries):
    """Merge-order BPE of one sequence into ``out``; returns the number of ids.

    Every adjacent pair that has a merge goes into the FIFO bucket of its rank; buckets are
    processed in rank order (a merge only creates pairs of higher rank, and each bucket is
    filled left to right), entries whose pair changed since are skipped. Scratch: ``tok``,
    ``nxt``, ``prv`` of ``len(sym)``; ``entries`` of ``3 len(sym)``; ``head``/``tail`` of ``M``
    (``head`` all -1 on entry and on return).
    """
    n = sym.size
    if n == 0:
        return 0
    for i in range(n):
        tok[i] = sym[i]
        nxt[i] = i + 1
        prv[i] = i - 1
    n_entries = 0
    lowest = merges.shape[0]
    highest = -1
    for i in range(n - 1):
        r = _rank(table, tok[i], tok[i + 1])
        if r >= 0:
            n_entries = _bucket_push(r, i, head, tail, entries, n_entries)
            lowest = min(lowest, r)
            highest = max(highest, r)
    r = lowest
    while r <= highest:
        e = np.int64(head[r])
        head[r] = -1
        a = merges[r, 0]
        b = merges[r, 1]
        c = num_symbols + r
        while e >= 0:
            entry = entries[e]
            p = entry >> 32
            e = entry & _NO_NEXT
            if e == _NO_NEXT:
                e = -1
            if tok[p] != a:
                continue
            q = nxt[p]
            if q >= n or tok[q] != b:
                continue
            tok[p] = c
            tok[q] = -1
            after = nxt[q]
            nxt[p] = after
            if after < n:
                prv[after] = p
                r2 = _rank(table, c, tok[after])
                if r2 >= 0:
                    n_entries = _bucket_push(r2, p, head, tail, entries, n_entries)
                    highest = max(highest, r2)
            before = prv[p]
            if before >= 0:
                r2 = _rank(table, tok[before], c)
                if r2 >= 0:
                    n_entries = _bucket_push(r2, before, head, tail, entries, n_entries)
                    highest = max(highest, r2)
        r += 1
    k = 0
    i = 0
    while i < n:
        out[k] = tok[i]
        k += 1
        i = nxt[i]
    return k


@njit(cache=True)
def _greedy_encode_seq(sym, out, children, node_token):
    """Greedy longest match over the trie, left to right; returns the number of ids."""
    n = sym.size
    i = 0
    k = 0
    while i < n:
        node = 0
        j = i
        best = -1
        best_len = 0
        while j < n:
            node = children[node, sym[j]]
            if node < 0:
                break
            j += 1
            if node_token[node] >= 0:
                best = node_token[node]
                best_len = j - i
        out[k] = best
        k += 1
        i += best_len
    return k


@njit(cache=True)
def _encode_range(
    flat, offsets, out, counts, use_trie, merges, table, children, node_token, num_symbols, s0, s1,
):  # fmt: skip
    """Encodes sequences ``s0..s1-1`` (``flat[offsets[s]:offsets[s+1]]``) into the same slices
    of ``out`` (ids never outnumber symbols); ``counts[s]`` gets the number of ids."""
    if use_trie:
        for s in range(s0, s1):
            a, z = offsets[s], offsets[s + 1]
            counts[s] = _greedy_encode_seq(flat[a:z], out[a:z], children, node_token)
        return
    longest = 0
    for s in range(s0, s1):
        longest = max(longest, offsets[s + 1] - offsets[s])
    n_merges = max(merges.shape[0], 1)
    tok = np.empty(longest, np.int32)
    nxt = np.empty(longest, np.int32)
    prv = np.empty(longest, np.int32)
    head = np.full(n_merges, -1, np.int32)
    tail = np.empty(n_merges, np.int32)
    entries = np.empty(3 * longest + 1, np.int64)
    for s in range(s0, s1):
        a, z = offsets[s], offsets[s + 1]
        counts[s] = _bpe_encode_seq(
            flat[a:z], out[a:z], merges, table, num_symbols, tok, nxt, prv, head, tail, entries,
        )  # fmt: skip


@njit(cache=True, parallel=True)
def _encode_parallel(
    flat, offsets, out, counts, use_trie, merges, table, children, node_token, num_symbols,
    n_chunks,
):  # fmt: skip
    """:func:`_encode_range` over chunks of sequences in parallel."""
    n_seq = offsets.size - 1
    for ch in prange(n_chunks):
        _encode_range(
            flat, offsets, out, counts, use_trie, merges, table, children, node_token,
            num_symbols, ch * n_seq // n_chunks, (ch + 1) * n_seq // n_chunks,
        )  # fmt: skip


@njit(cache=True)
def _gather(out, offsets, counts, id_offsets, ids):
    """Packs the per-sequence results of :func:`_encode_batch` into one array."""
    for s in range(offsets.size - 1):
        a = offsets[s]
        b = id_offsets[s]
        for k in range(counts[s]):
            ids[b + k] = out[a + k]


@njit(cache=True)
def _build_trie(token_flat, token_offsets, num_symbols):
    """Trie of all token strings: ``children[node, symbol]`` (-1: none) and the id ending at each
    node (-1: none; a duplicate string keeps the highest id, as in an insert-in-order trie)."""
    n_tokens = token_offsets.size - 1
    capacity = token_flat.size + 1
    children = np.full((capacity, num_symbols), -1, np.int32)
    node_token = np.full(capacity, -1, np.int32)
    n_nodes = 1
    for t in range(n_tokens):
        node = 0
        for j in range(token_offsets[t], token_offsets[t + 1]):
            s = token_flat[j]
            child = children[node, s]
            if child < 0:
                child = n_nodes
                children[node, s] = child
                n_nodes += 1
            node = child
        node_token[node] = t
    return children[:n_nodes].copy(), node_token[:n_nodes].copy()


def _token_table(merges: np.ndarray, num_symbols: int) -> tuple[np.ndarray, np.ndarray]:
    """Symbol strings of all ids: ``flat`` uint8 and ``offsets`` int64 ``[V + 1]``."""
    lengths = np.ones(num_symbols + len(merges), np.int64)
    for i, (a, b) in enumerate(merges):
        lengths[num_symbols + i] = lengths[a] + lengths[b]
    offsets = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.empty(int(offsets[-1]), np.uint8)
    flat[:num_symbols] = np.arange(num_symbols)
    for i, (a, b) in enumerate(merges):
        start = offsets[num_symbols + i]
        la = lengths[a]
        flat[start : start + la] = flat[offsets[a] : offsets[a + 1]]
        flat[start + la : offsets[num_symbols + i + 1]] = flat[offsets[b] : offsets[b + 1]]
    return flat, offsets


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------


class ECGByteTokenizer:
    """Merges plus settings; encodes ECG symbols (or signals) to ids and decodes them back.

    Attributes:
      merges: int32 ``[M, 2]``, merge ``i`` joins ids ``(merges[i, 0], merges[i, 1])`` into id
        ``num_symbols + i``.
      per_lead_norm: the symbols were made with per-lead min-max (:meth:`encode_signal` uses it).
      centred_norm: the symbols were made with ``discretise(centred=True)`` (likewise).
      lead_boundaries: trained with no token spanning two leads; encoding then goes lead by lead.
      mode: default encoding mode, ``"bpe"`` or ``"reference"`` (greedy longest match).
      num_symbols: alphabet size (26).
      source: free-text provenance (not part of :meth:`fingerprint`).
    """

    def __init__(
        self,
        merges: np.ndarray,
        *,
        per_lead_norm: bool = False,
        centred_norm: bool = False,
        lead_boundaries: bool = False,
        mode: str = "bpe",
        num_symbols: int = NUM_SYMBOLS,
        source: str = "elmjax",
    ) -> None:
        merges = np.asarray(merges)
        if merges.size == 0:
            merges = np.zeros((0, 2), np.int32)
        if merges.ndim != 2 or merges.shape[1] != 2 or not np.issubdtype(merges.dtype, np.integer):
            raise ValueError(f"merges must be an integer [M, 2] array, got {merges.shape}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 1 <= num_symbols <= 256:
            raise ValueError(f"num_symbols must lie in 1..256, got {num_symbols}")
        if num_symbols + len(merges) > MAX_VOCAB:
            raise ValueError(f"vocabulary too large (at most {MAX_VOCAB} ids)")
        limit = num_symbols + np.arange(len(merges))[:, None]
        if len(merges) and ((merges < 0).any() or (merges >= limit).any()):
            raise ValueError("merge i may only join ids smaller than num_symbols + i")
        keys = merges[:, 0].astype(np.int64) << 16 | merges[:, 1]
        if np.unique(keys).size != keys.size:
            raise ValueError("the same pair is merged twice")
        self.merges = np.ascontiguousarray(merges, np.int32)
        self.per_lead_norm = bool(per_lead_norm)
        self.centred_norm = bool(centred_norm)
        self.lead_boundaries = bool(lead_boundaries)
        self.mode = mode
        self.num_symbols = int(num_symbols)
        self.source = str(source)
        self._flat, self._offsets = _token_table(self.merges, self.num_symbols)
        self._lengths = np.diff(self._offsets).astype(np.int32)
        self._ranks: np.ndarray | None = None
        self._trie: tuple[np.ndarray, np.ndarray] | None = None

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        symbols: Any,
        num_merges: int,
        *,
        per_lead_norm: bool = False,
        centred_norm: bool = False,
        lead_boundaries: bool = False,
        mode: str = "bpe",
        min_frequency: int = 2,
        workers: int | None = None,
        progress: bool = True,
    ) -> ECGByteTokenizer:
        """Trains on uint8 symbols ``[B, leads, L]`` with :func:`train_bpe`.

        ``per_lead_norm`` and ``centred_norm`` record how the symbols were made (they do not
        change training);
        ``lead_boundaries``, ``min_frequency``, ``workers`` and ``progress`` go to
        :func:`train_bpe`.
        """
        merges = train_bpe(
            symbols,
            num_merges,
            lead_boundaries=lead_boundaries,
            min_frequency=min_frequency,
            workers=workers,
            progress=progress,
        )
        return cls(
            merges,
            per_lead_norm=per_lead_norm,
            centred_norm=centred_norm,
            lead_boundaries=lead_boundaries,
            mode=mode,
        )

    # -- properties -----------------------------------------------------------------------------

    @property
    def num_merges(self) -> int:
        """Number of merges ``M``."""
        return len(self.merges)

    @property
    def vocab_size(self) -> int:
        """``num_symbols + num_merges``."""
        return self.num_symbols + len(self.merges)

    @property
    def token_strings(self) -> list[str]:
        """Every id's symbols as a string of ``a..z`` (index = id)."""
        text = (self._flat + np.uint8(97)).tobytes().decode("ascii")
        return [text[a:b] for a, b in zip(self._offsets[:-1], self._offsets[1:], strict=True)]

    def settings(self) -> dict[str, Any]:
        """The settings that, with the merges, fix how a signal becomes ids."""
        out = {
            "num_symbols": self.num_symbols,
            "per_lead_norm": self.per_lead_norm,
            "lead_boundaries": self.lead_boundaries,
            "mode": self.mode,
        }
        if self.centred_norm:  # only when set: min-max files keep their fingerprints
            out["centred_norm"] = True
        return out

    def fingerprint(self) -> str:
        """sha256 hex digest of the merges and :meth:`settings` (canonical JSON; ``source`` is
        left out): equal fingerprints mean equal ids for equal signals."""
        blob = json.dumps(
            {"format": FORMAT_NAME, "settings": self.settings(), "merges": self.merges.tolist()},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def __repr__(self) -> str:
        return (
            f"ECGByteTokenizer(vocab_size={self.vocab_size}, mode={self.mode!r}, "
            f"per_lead_norm={self.per_lead_norm}, centred_norm={self.centred_norm}, "
            f"lead_boundaries={self.lead_boundaries}, "
            f"source={self.source!r})"
        )

    # -- encoding -------------------------------------------------------------------------------

    def _tables(self, mode: str) -> tuple:
        if mode == "bpe":
            if self._ranks is None:
                self._ranks = _rank_table(self.merges)
            return self._ranks, np.zeros((1, self.num_symbols), np.int32), np.zeros(1, np.int32)
        if self._trie is None:
            self._trie = _build_trie(self._flat, self._offsets, self.num_symbols)
        return np.full(16, _EMPTY, np.uint64), *self._trie

    def _encode_corpus(
        self, corpus: _Corpus, mode: str | None, workers: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes every sequence of ``corpus``: ``(ids int32, offsets int64 [S + 1])``."""
        mode = self.mode if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        table, children, node_token = self._tables(mode)
        n_seq = corpus.offsets.size - 1
        out = np.empty(corpus.flat.size, np.int32)
        counts = np.zeros(n_seq, np.int64)
        tables = (self.merges, table, children, node_token, self.num_symbols)
        use_trie = mode == "reference"
        with _numba_threads(workers) as threads:
            if threads > 1 and n_seq > 1 and corpus.flat.size >= _PARALLEL_MIN_SYMBOLS:
                n_chunks = min(n_seq, 4 * threads)
                _encode_parallel(
                    corpus.flat, corpus.offsets, out, counts, use_trie, *tables, n_chunks
                )
            else:
                _encode_range(corpus.flat, corpus.offsets, out, counts, use_trie, *tables, 0, n_seq)
        id_offsets = np.zeros(n_seq + 1, np.int64)
        np.cumsum(counts, out=id_offsets[1:])
        ids = np.empty(int(id_offsets[-1]), np.int32)
        _gather(out, corpus.offsets, counts, id_offsets, ids)
        return ids, id_offsets

    def encode_flat(
        self,
        symbols: Any,
        *,
        mode: str | None = None,
        leads: bool = False,
        workers: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes a batch into one flat array.

        Args:
          symbols: uint8 ``[leads, L]``, ``[B, leads, L]`` or a list of ``[leads, L_i]``.
          mode: ``"bpe"`` or ``"reference"`` (None: :attr:`mode`).
          leads: one entry per lead (each lead encoded separately) instead of per ECG.
          workers: numba threads (None: all).

        Returns:
          ``(ids, offsets)``: int32 ids of all ECGs (leads), and int64 ``[n + 1]`` offsets with
          ``ids[offsets[i]:offsets[i + 1]]`` the ids of ECG (lead) ``i``.
        """
        by_lead = leads or self.lead_boundaries
        corpus = _corpus(symbols, by_lead=by_lead, num_symbols=self.num_symbols)
        ids, offsets = self._encode_corpus(corpus, mode, workers)
        if by_lead and not leads:
            offsets = offsets[:: corpus.leads]
        return ids, offsets

    def encode(
        self, symbols: Any, *, mode: str | None = None, workers: int | None = None
    ) -> np.ndarray | list[np.ndarray]:
        """Encodes the lead-major symbol stream of each ECG.

        Args:
          symbols: uint8 ``[leads, L]`` (one ECG), ``[B, leads, L]`` or a list of
            ``[leads, L_i]`` arrays.
          mode: ``"bpe"`` (merge order) or ``"reference"`` (greedy longest match); None:
            :attr:`mode`.
          workers: numba threads (None: all).

        Returns:
          int32 ids of the ECG, or a list of them for a batch.
        """
        batched = not isinstance(symbols, np.ndarray) or symbols.ndim == 3
        ids, offsets = self.encode_flat(symbols, mode=mode, workers=workers)
        parts = [ids[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        return parts if batched else parts[0]

    def encode_leads(
        self, symbols: Any, *, mode: str | None = None, workers: int | None = None
    ) -> list[np.ndarray] | list[list[np.ndarray]]:
        """Encodes each lead on its own (no token spans two leads).

        Returns:
          For one ECG ``[leads, L]``, a list of ``leads`` int32 id arrays; for a batch, a list
          of such lists.
        """
        batched = not isinstance(symbols, np.ndarray) or symbols.ndim == 3
        corpus = _corpus(symbols, by_lead=True, num_symbols=self.num_symbols)
        ids, offsets = self._encode_corpus(corpus, mode, workers)
        parts = [ids[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        per_ecg = [parts[i : i + corpus.leads] for i in range(0, len(parts), corpus.leads)]
        return per_ecg if batched else per_ecg[0]

    def discretise(self, signal: np.ndarray, *, workers: int | None = None) -> np.ndarray:
        """The symbols of ``signal`` as this tokenizer's training symbols were made
        (:func:`discretise` with :attr:`per_lead_norm` and :attr:`centred_norm`)."""
        return discretise(
            signal, per_lead=self.per_lead_norm, centred=self.centred_norm, workers=workers
        ).symbols

    def encode_signal(
        self,
        signal: np.ndarray,
        *,
        mode: str | None = None,
        leads: bool = False,
        workers: int | None = None,
    ) -> Any:
        """:func:`discretise` (with :attr:`per_lead_norm`, :attr:`centred_norm`) then :meth:`encode`
        (:meth:`encode_leads` with ``leads=True``). ``signal``: float ``[12, L]`` or
        ``[B, 12, L]``."""
        symbols = self.discretise(signal, workers=workers)
        if leads:
            return self.encode_leads(symbols, mode=mode, workers=workers)
        return self.encode(symbols, mode=mode, workers=workers)

    # -- decoding -------------------------------------------------------------------------------

    def _check_ids(self, ids: Any) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size == 0:
            return ids.astype(np.int64).ravel()
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ids must be integers, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"ids must lie in 0..{self.vocab_size - 1}")
        return ids.ravel()

    def token_lengths(self, ids: Any) -> np.ndarray:
        """Number of symbols of each id (int32, same shape as ``ids``)."""
        shape = np.shape(ids)
        return self._lengths[self._check_ids(ids)].reshape(shape)

    def decode(self, ids: Any) -> np.ndarray:
        """The uint8 symbols (1-D) that ``ids`` stand for (exact inverse of encoding)."""
        ids = self._check_ids(ids)
        lengths = self._lengths[ids].astype(np.int64)
        total = int(lengths.sum())
        ends = np.cumsum(lengths)
        shift = np.repeat(self._offsets[ids] - (ends - lengths), lengths)
        return self._flat[np.arange(total, dtype=np.int64) + shift]

    # -- files ----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The JSON document that :meth:`save` writes."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "settings": self.settings(),
            "source": self.source,
            "fingerprint": self.fingerprint(),
            "merges": self.merges.tolist(),
            "tokens": self.token_strings,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json()))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ECGByteTokenizer:
        """Reads a file written by :meth:`save`.

        Raises:
          TokenizerFileError: not JSON, not this format, an unknown version, or inconsistent
            contents; the message names the file.
        """
        path = Path(path)
        try:
            doc = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerFileError(f"{path}: not an ECG-Byte tokenizer file ({e})") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise TokenizerFileError(
                f'{path}: not an ECG-Byte tokenizer file (no "format": "{FORMAT_NAME}")'
            )
        if doc.get("version") != FORMAT_VERSION:
            raise TokenizerFileError(
                f"{path}: unsupported {FORMAT_NAME} version {doc.get('version')!r} "
                f"(this elmjax reads version {FORMAT_VERSION})"
            )
        try:
            settings = doc["settings"]
            merges = np.array(doc["merges"], np.int64).reshape(-1, 2)
            tokenizer = cls(
                merges,
                per_lead_norm=settings["per_lead_norm"],
                centred_norm=settings.get("centred_norm", False),
                lead_boundaries=settings["lead_boundaries"],
                mode=settings["mode"],
                num_symbols=settings["num_symbols"],
                source=doc.get("source", ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TokenizerFileError(f"{path}: invalid ECG-Byte tokenizer ({e!r})") from e
        if "fingerprint" in doc and doc["fingerprint"] != tokenizer.fingerprint():
            raise TokenizerFileError(f"{path}: fingerprint does not match the merges/settings")
        if "tokens" in doc and doc["tokens"] != tokenizer.token_strings:
            raise TokenizerFileError(f"{path}: token strings do not match the merges")
        return tokenizer

    # -- the reference's released pickle --------------------------------------------------------

    @classmethod
    def from_reference_pickle(
        cls, path: str | os.PathLike, *, mode: str = "reference"
    ) -> ECGByteTokenizer:
        """Imports the reference's tokenizer pickle (e.g. ``tokenizer_5000_300000.pkl``).

        The file is a pickled tuple ``(vocab, merges)``: ``vocab`` maps ids to token strings (ids
        0..255 are the single bytes, ``256 + i`` merge ``i``), ``merges`` is a list of
        ``(token, id)`` with the token as ``str``, ``bytes`` or a list of byte values. It is read
        with an unpickler that refuses every class/function reference, so a pickle that holds
        anything but plain containers, strings and numbers is rejected without running any of it.

        Mapping: bytes ``'a'..'z'`` become ids 0..25; merge ``i`` (in id order) becomes
        ``26 + i'`` where ``i'`` counts the kept merges. Merges whose token contains a byte
        outside ``a..z`` are skipped (they can never match ECG symbol text, in either mode), with
        a warning giving the count; single-byte entries other than ``a..z`` are ignored. Each
        merge's ``(left, right)`` is rebuilt from its string: the split into two earlier tokens
        (latest id for a repeated string) whose pair was not merged before; when several splits
        qualify, the one that merge-order BPE with the earlier merges gives the string, else the
        leftmost (counted as ambiguous in :attr:`source`; only ``mode="bpe"`` can notice).

        Args:
          path: the pickle file.
          mode: default encoding mode of the result (the reference encodes greedily).

        Raises:
          TokenizerFileError: unreadable, refused or malformed pickle (the message names it).
        """
        path = Path(path)
        raw = path.read_bytes()
        try:
            obj = _RefuseGlobals(io.BytesIO(raw)).load()
        except pickle.UnpicklingError as e:
            raise TokenizerFileError(f"{path}: refused: {e}") from e
        except Exception as e:  # a truncated or corrupt stream raises all sorts of errors
            raise TokenizerFileError(f"{path}: not a readable pickle ({e!r})") from e
        merges, report = _import_reference(obj, str(path))
        if report["skipped"]:
            warnings.warn(
                f"{path}: skipped {report['skipped']} merge tokens with bytes outside a..z",
                stacklevel=2,
            )
        digest = hashlib.sha256(raw).hexdigest()[:16]
        source = (
            f"reference-pickle {path.name} sha256:{digest} (merges kept {len(merges)}, skipped "
            f"{report['skipped']}, ambiguous splits {report['ambiguous']})"
        )
        return cls(merges, mode=mode, source=source)


class _RefuseGlobals(pickle.Unpickler):
    """Unpickler that loads plain data only: any class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"the pickle references {module}.{name}; only plain dict/list/tuple/str/bytes/int "
            "data is accepted"
        )


def _token_bytes(token: Any, where: str) -> bytes:
    if isinstance(token, str):
        return token.encode("latin-1", errors="replace")
    if isinstance(token, bytes | bytearray):
        return bytes(token)
    if isinstance(token, list | tuple) and all(isinstance(v, int) and 0 <= v < 256 for v in token):
        return bytes(token)
    raise TokenizerFileError(f"{where}: token {token!r} is not a str, bytes or byte list")


def _import_reference(obj: Any, where: str) -> tuple[np.ndarray, dict[str, int]]:
    """Rebuilds our ``[M, 2]`` merges from the reference's ``(vocab, merges)``."""
    if not (isinstance(obj, tuple | list) and len(obj) == 2 and isinstance(obj[0], dict)):
        raise TokenizerFileError(f"{where}: expected a (vocab dict, merges list) tuple")
    vocab, ref_merges = obj
    if not isinstance(ref_merges, list | tuple) or not all(
        isinstance(m, list | tuple) and len(m) == 2 and isinstance(m[1], int) for m in ref_merges
    ):
        raise TokenizerFileError(f"{where}: merges must be a list of (token, id) pairs")
    for k in range(97, 123):
        if k in vocab and _token_bytes(vocab[k], where) != bytes([k]):
            raise TokenizerFileError(f"{where}: vocab[{k}] is not the single byte {chr(k)!r}")
    ordered = sorted(ref_merges, key=lambda m: m[1])
    if [m[1] for m in ordered] != list(range(256, 256 + len(ordered))):
        raise TokenizerFileError(f"{where}: merge ids must be 256, 257, ... without gaps")

    ids_of: dict[bytes, int] = {bytes([97 + s]): s for s in range(NUM_SYMBOLS)}  # latest id
    merged: set[tuple[int, int]] = set()
    pairs = np.zeros((len(ordered), 2), np.int32)
    n_pairs = 0
    table = np.full(_pow2_at_least(2 * len(ordered) + 16), _EMPTY, np.uint64)
    report = {"skipped": 0, "ambiguous": 0}
    for token, ref_id in ordered:
        text = _token_bytes(token, where)
        if ref_id in vocab and _token_bytes(vocab[ref_id], where) != text:
            raise TokenizerFileError(f"{where}: vocab[{ref_id}] differs from merge {ref_id}")
        if any(not 97 <= v <= 122 for v in text):
            report["skipped"] += 1
            continue
        candidates = []
        for k in range(1, len(text)):
            left, right = ids_of.get(text[:k]), ids_of.get(text[k:])
            if left is not None and right is not None and (left, right) not in merged:
                candidates.append((left, right))
        if not candidates:
            raise TokenizerFileError(
                f"{where}: merge {ref_id} ({text[:40]!r}) is not two earlier tokens joined"
            )
        pair = candidates[0]
        if len(candidates) > 1:
            report["ambiguous"] += 1
            sym = np.frombuffer(text, np.uint8) - np.uint8(97)
            own = _bpe_encode_one(sym, pairs[:n_pairs], table)
            if len(own) == 2 and (int(own[0]), int(own[1])) in candidates:
                pair = (int(own[0]), int(own[1]))
        merged.add(pair)
        ids_of[text] = NUM_SYMBOLS + n_pairs
        pairs[n_pairs] = pair
        _rank_insert(table, pair[0], pair[1], n_pairs)
        n_pairs += 1
    return pairs[:n_pairs].copy(), report


def _bpe_encode_one(sym: np.ndarray, merges: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Merge-order BPE of one uint8 sequence (used while importing)."""
    out = np.empty(sym.size, np.int32)
    counts = np.zeros(1, np.int64)
    offsets = np.array([0, sym.size], np.int64)
    dummy_trie = np.zeros((1, NUM_SYMBOLS), np.int32), np.zeros(1, np.int32)
    _encode_range(sym, offsets, out, counts, False, merges, table, *dummy_trie, NUM_SYMBOLS, 0, 1)
    return out[: counts[0]]


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

_CLI_BATCH = 256  # segments per discretise/encode call


def _segment_indices(n_rows: int, max_ecgs: int | None, seed: int) -> np.ndarray:
    """``max_ecgs`` manifest rows drawn without replacement by ``seed`` (sorted), or all."""
    if max_ecgs is None or max_ecgs >= n_rows:
        return np.arange(n_rows)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=max_ecgs, replace=False))


def _batches(fetch, rows, indices: np.ndarray, desc: str, progress: bool) -> Iterator[np.ndarray]:
    """Stacks the segments ``indices`` in batches of float32 ``[b, 12, L]``."""
    for i0 in tqdm(
        range(0, len(indices), _CLI_BATCH), desc=desc, unit="batch", disable=not progress
    ):
        chunk = indices[i0 : i0 + _CLI_BATCH]
        segs = [fetch(rows[i]) for i in chunk]
        if len({s.shape for s in segs}) != 1:
            raise ValueError("segments of different shapes in one directory")
        yield np.stack(segs)


def _load_symbols(
    segments: str,
    indices: np.ndarray | None,
    per_lead: bool,
    workers: int | None,
    progress: bool,
    centred: bool = False,
) -> np.ndarray:
    """Discretised segments of a preprocess output directory: uint8 ``[K, 12, L]``."""
    from elmjax.ecg.preprocess import load_segments

    rows, fetch = load_segments(segments)
    if not rows:
        raise ValueError(f"{segments}: no segments")
    indices = np.arange(len(rows)) if indices is None else indices
    first = fetch(rows[int(indices[0])])
    symbols = np.empty((len(indices),) + first.shape, np.uint8)
    i = 0
    for batch in _batches(fetch, rows, indices, "discretise", progress):
        if batch.shape[1:] != first.shape:
            raise ValueError(f"{segments}: segments of shapes {first.shape} and {batch.shape[1:]}")
        symbols[i : i + len(batch)] = discretise(
            batch, per_lead=per_lead, centred=centred, workers=workers
        ).symbols
        i += len(batch)
    return symbols


def _cmd_train(args: argparse.Namespace) -> int:
    from elmjax.ecg.preprocess import load_segments

    t0 = time.perf_counter()
    rows, _ = load_segments(args.segments)
    indices = _segment_indices(len(rows), args.max_ecgs, args.seed)
    symbols = _load_symbols(
        args.segments, indices, args.per_lead_norm, args.workers, True, args.centred_norm
    )
    t1 = time.perf_counter()
    merges, stats = train_bpe(
        symbols,
        args.num_merges,
        lead_boundaries=args.lead_boundaries,
        min_frequency=args.min_frequency,
        workers=args.workers,
        return_stats=True,
    )
    tokenizer = ECGByteTokenizer(
        merges,
        per_lead_norm=args.per_lead_norm,
        centred_norm=args.centred_norm,
        lead_boundaries=args.lead_boundaries,
        mode=args.mode,
        source=f"elmjax train: {len(indices)} segments of {args.segments} (seed {args.seed})",
    )
    tokenizer.save(args.out)
    print(
        f"{tokenizer.num_merges} merges from {len(indices)} segments ({stats['symbols']} symbols) "
        f"in {time.perf_counter() - t1:.1f} s (+{t1 - t0:.1f} s reading); vocab "
        f"{tokenizer.vocab_size}; fingerprint {tokenizer.fingerprint()[:16]}; wrote {args.out}"
    )
    return 0


def _encode_dir(
    tokenizer: ECGByteTokenizer,
    segments: str,
    indices: np.ndarray | None,
    mode: str | None,
    workers: int | None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes segments of a preprocess directory: ``(ids, offsets [n + 1])``."""
    from elmjax.ecg.preprocess import load_segments

    rows, fetch = load_segments(segments)
    indices = np.arange(len(rows)) if indices is None else indices
    parts, lengths = [], []
    for batch in _batches(fetch, rows, indices, f"encode ({mode or tokenizer.mode})", progress):
        symbols = tokenizer.discretise(batch, workers=workers)
        ids, offsets = tokenizer.encode_flat(symbols, mode=mode, workers=workers)
        parts.append(ids)
        lengths.append(np.diff(offsets))
    offsets = np.zeros(len(indices) + 1, np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return ids, offsets


def _cmd_encode(args: argparse.Namespace) -> int:
    tokenizer = ECGByteTokenizer.load(args.tokenizer)
    mode = args.mode or tokenizer.mode
    t0 = time.perf_counter()
    ids, offsets = _encode_dir(tokenizer, args.segments, None, mode, args.workers)
    seconds = time.perf_counter() - t0
    n = len(offsets) - 1
    with open(args.out, "wb") as f:
        np.savez(
            f,
            ids=ids,
            offsets=offsets,
            segment=np.arange(n),
            fingerprint=np.array(tokenizer.fingerprint()),
            mode=np.array(mode),
        )
    print(f"{n} segments -> {ids.size} ids ({mode}) in {seconds:.1f} s; wrote {args.out}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from elmjax.ecg.preprocess import load_segments

    tokenizer = ECGByteTokenizer.load(args.tokenizer)
    rows, _ = load_segments(args.segments)
    indices = _segment_indices(len(rows), args.max_ecgs, args.seed)
    print(f"tokenizer {args.tokenizer}: {tokenizer!r}")
    print(f"fingerprint {tokenizer.fingerprint()}")
    vocab_lengths = tokenizer.token_lengths(np.arange(tokenizer.vocab_size))
    print(
        f"vocab token lengths: mean {vocab_lengths.mean():.2f}, median "
        f"{np.median(vocab_lengths):.0f}, max {vocab_lengths.max()}"
    )
    used = {}
    for mode in MODES:
        ids, offsets = _encode_dir(tokenizer, args.segments, indices, mode, args.workers)
        lengths = tokenizer.token_lengths(ids)
        used[mode] = lengths
        per_segment = np.diff(offsets)
        print(
            f"{mode:>9}: {len(indices)} segments, {int(lengths.sum())} symbols -> {ids.size} ids: "
            f"{lengths.sum() / max(ids.size, 1):.2f} symbols per token; ids per segment mean "
            f"{per_segment.mean():.0f} (min {per_segment.min()}, max {per_segment.max()})"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        top = int(np.percentile(vocab_lengths, 99)) + 2
        bins = np.arange(1, top + 1) - 0.5
        axes[0].hist(vocab_lengths, bins=bins, color="tab:gray")
        axes[0].set(title="vocabulary", xlabel="token length (symbols)", ylabel="tokens")
        for mode, lengths in used.items():
            axes[1].hist(np.minimum(lengths, top), bins=bins, histtype="step", label=mode)
        axes[1].set(title="encoded segments", xlabel="token length (symbols)", ylabel="ids")
        axes[1].legend()
        fig.suptitle(f"ECG-Byte token lengths ({tokenizer.vocab_size} ids)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        plt.close(fig)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m elmjax.tokenize.ecgbyte",
        description="Train, apply and inspect ECG-Byte (symbolic ECG BPE) tokenizers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    workers = {"type": int, "default": None, "help": "threads (default: all cores)"}

    train = sub.add_parser("train", help="learn merges on preprocessed segments")
    train.add_argument("--segments", required=True, help="python -m elmjax.ecg.preprocess output")
    train.add_argument("--num-merges", type=int, required=True)
    train.add_argument("--out", required=True, help="tokenizer JSON to write")
    train.add_argument("--max-ecgs", type=int, default=None, help="sample this many segments")
    train.add_argument("--seed", type=int, default=0, help="seed of the segment sample")
    train.add_argument("--per-lead-norm", action="store_true", help="min-max per lead")
    train.add_argument(
        "--centred-norm", action="store_true", help="normalise by max |x|, 0 in the middle"
    )
    train.add_argument("--lead-boundaries", action="store_true", help="no token spans 2 leads")
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--mode", choices=MODES, default="bpe", help="default encoding mode")
    train.add_argument("--workers", **workers)

    encode = sub.add_parser("encode", help="encode every segment to ids (.npz)")
    encode.add_argument("--tokenizer", required=True)
    encode.add_argument("--segments", required=True)
    encode.add_argument("--out", required=True, help=".npz: ids, offsets, segment, fingerprint")
    encode.add_argument("--mode", choices=MODES, default=None, help="default: the tokenizer's")
    encode.add_argument("--workers", **workers)

    stats = sub.add_parser("stats", help="compression in both modes and a token-length plot")
    stats.add_argument("--tokenizer", required=True)
    stats.add_argument("--segments", required=True)
    stats.add_argument("--plot", default=None, help="PNG histogram of token lengths")
    stats.add_argument("--max-ecgs", type=int, default=None)
    stats.add_argument("--seed", type=int, default=0)
    stats.add_argument("--workers", **workers)

    args = parser.parse_args(argv)
    command = {"train": _cmd_train, "encode": _cmd_encode, "stats": _cmd_stats}[args.command]
    try:
        return command(args)
    except (TokenizerFileError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the importable module's main, so numba's cache is the package's, not __main__'s.
    from elmjax.tokenize.ecgbyte import main as _main

    sys.exit(_main())
