"""The training input pipeline: grain over ArrayRecord shards of prepared examples.

    ArrayRecord shards -> this host's examples -> shuffled (seeded, new order each epoch)
      -> chunks of ``chunk_size`` examples -> next-token examples -> fit to T (pack or pad)
      -> rows -> batches -> multiprocess prefetch

The grain graph is ``MapDataset.range(chunks).repeat(epochs).map_with_index(ChunkReader)`` ->
``RebatchIterDataset`` -> ``mp_prefetch``: grain gives determinism, worker processes and a
checkpointable iterator, while reading and packing a chunk of examples at once keeps the
per-example cost to a few microseconds (per-element grain transformations cost about ten times
that, too slow for short examples on few cores).

Each prepared example (see :mod:`elmjax.data.records`) carries ``input_ids`` ``[n]`` and
``loss_mask`` ``[n]`` (1 on the tokens the model must learn to produce). The pipeline turns it
into a next-token example (``inputs = ids[:-1]``, ``targets = ids[1:]``,
``loss_mask = mask[1:]``) *before* fitting it to ``T``, so a packed row never asks a token to
predict the first token of the next example.

Every batch is a dict of ``[batch, T]`` arrays:

========== ======= ==================================================================
key        dtype   meaning
========== ======= ==================================================================
inputs     int32   token ids fed to the model (``pad_id`` on padding)
targets    int32   the next token of each position (0 on padding)
loss_mask  float32 1.0 where the target is an answer token to learn, else 0.0
segment_ids int32  1, 2, ... for the examples packed in a row; 0 on padding
positions  int32   position within its own example (restarts at 0 for each example)
========== ======= ==================================================================

plus, in ``pad`` mode, the per-example model inputs the examples carry (:data:`MODEL_INPUTS`:
``signal`` ``[12, L]`` float16, ``image``, ``ecg``) stacked along the batch axis. ``pack``
(first-fit packing of several examples per row) is the default for the symbolic path; ``pad``
puts one example per row (needed when an example carries a per-example array such as the
signal).

The signal / image shards of :mod:`elmjax.prepare` store each example's ECG input as ``ecg``
(float16 ``[leads, L]`` signal, handed on as **float32**; uint8 ``[S, S, 3]`` image, as is):

- ``fit="pad"``: ``batch["ecg"]`` is ``[B, *shape]``, row ``b``'s ECG (``elm.ELM`` with
  ``packed_ecg=False``);
- ``fit="pack"`` with ``ecg_slots=E``: ``batch["ecg"]`` is ``[B, E, *shape]``; slot ``e`` of a
  row holds the ECG of the ``e``-th example of that row carrying one, unused slots are zeros
  (``elm.ELM(..., packed_ecg=True)``; a row takes at most ``E`` such examples). Without
  ``ecg_slots`` packing refuses examples with an ``ecg``.

Sharding over hosts: host ``i`` of ``n`` reads examples ``i, i + n, i + 2n, ...`` of the
concatenated shards, so hosts never see the same example and need no coordination. The
iterator's state (``get_state`` / ``set_state``) is small, JSON-able, and restoring it
reproduces the exact next batches; :mod:`elmjax.checkpoint` saves it with the model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from elmjax.data import records

SEQUENCE_KEYS = ("inputs", "targets", "loss_mask")
# per-example arrays that reach the model (pad mode; ``ecg`` also packed, into slots)
MODEL_INPUTS = ("signal", "image", "ecg")
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How examples become batches.

    Attributes:
      seq_len: tokens per row, ``T``.
      batch_size: rows per batch on THIS host (the global batch divided by the host count).
      fit: ``"pack"`` (first-fit packing, several examples per row) or ``"pad"`` (one per row).
      seed: shuffle seed; each epoch is shuffled differently from it.
      shuffle: shuffle at all (off for evaluation).
      num_epochs: passes over the data; ``None`` repeats forever.
      pad_id: id placed on ``inputs`` padding.
      chunk_size: examples read and fitted into rows at once; packing looks for room only
        within a chunk, so larger chunks waste less padding.
      worker_count: grain worker processes (0: in this process).
      worker_buffer_size: batches each worker prepares ahead.
      drop_remainder: drop the last incomplete batch.
      ecg_slots: ``fit="pack"`` of examples carrying an ``ecg`` input: ECG slots per row
        (``E``; at most that many such examples per row); 0 refuses to pack them.
    """

    seq_len: int = 1024
    batch_size: int = 8
    fit: str = "pack"
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    pad_id: int = 0
    chunk_size: int = 256
    worker_count: int = 0
    worker_buffer_size: int = 2
    drop_remainder: bool = True
    ecg_slots: int = 0

    def __post_init__(self):
        if self.fit not in ("pack", "pad"):
            raise ValueError(f"fit must be 'pack' or 'pad', got {self.fit!r}")
        if self.seq_len < 2 or self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {self}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if self.ecg_slots < 0:
            raise ValueError(f"ecg_slots must be >= 0, got {self.ecg_slots}")


class ExampleTooLongError(ValueError):
    """An example longer than the row it must fit into."""


def shard_paths(directory: str | os.PathLike, split: str) -> list[str]:
    """The ArrayRecord shards of one split, in order (``{split}-NNNNN-of-MMMMM.array_record``)."""
    paths = sorted(str(p) for p in Path(directory).glob(f"{split}-*.array_record"))
    if not paths:
        raise FileNotFoundError(f"{directory}: no shards for split {split!r}")
    return paths


def next_token_example(data: bytes, *, seq_len: int) -> dict[str, np.ndarray]:
    """Record bytes -> ``inputs``/``targets``/``loss_mask`` (+ other array fields)."""
    example = records.deserialize_example(data)
    try:
        ids = np.asarray(example.pop("input_ids"), dtype=np.int32)
        mask = np.asarray(example.pop("loss_mask"))
    except KeyError as e:
        raise records.ShardFormatError(f"example {example.get('example_id')!r} lacks {e}") from e
    if ids.shape != mask.shape or ids.ndim != 1:
        raise records.ShardFormatError(
            f"example {example.get('example_id')!r}: input_ids {ids.shape} and loss_mask "
            f"{mask.shape} must be equal 1-D shapes"
        )
    if len(ids) - 1 > seq_len:
        raise ExampleTooLongError(
            f"example {example.get('example_id')!r} has {len(ids)} tokens, more than "
            f"seq_len + 1 = {seq_len + 1}; prepare the shards with the same budget T"
        )
    out = {
        "inputs": ids[:-1],
        "targets": ids[1:],
        "loss_mask": mask[1:].astype(np.float32),
    }
    for key in MODEL_INPUTS:  # per-example model inputs; ids, spans and strings stay behind
        if key in example:
            out[key] = np.asarray(example[key])
    if "ecg" in out:
        out["ecg"] = ecg_model_input(out["ecg"])
    return out


def ecg_model_input(ecg: np.ndarray) -> np.ndarray:
    """A stored ``ecg`` field as the model takes it: a signal (stored float16) as float32, an
    image (uint8) as is."""
    ecg = np.asarray(ecg)
    return ecg.astype(np.float32) if ecg.dtype == np.float16 else ecg


def pad_example(example: dict[str, np.ndarray], *, seq_len: int, pad_id: int) -> dict:
    """One example per row: right-pad the sequence fields to ``seq_len``."""
    n = len(example["inputs"])
    out = dict(example)
    out["inputs"] = np.full(seq_len, pad_id, np.int32)
    out["inputs"][:n] = example["inputs"]
    out["targets"] = np.zeros(seq_len, np.int32)
    out["targets"][:n] = example["targets"]
    out["loss_mask"] = np.zeros(seq_len, np.float32)
    out["loss_mask"][:n] = example["loss_mask"]
    out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    out["positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
    return out


def pack_rows(
    examples: Sequence[dict], *, seq_len: int, pad_id: int, ecg_slots: int = 0
) -> dict[str, np.ndarray]:
    """First-fit packing of next-token examples into as few ``[R, seq_len]`` rows as it can.

    Each example goes, in order, into the first row with room for it; a new row is opened when
    none has. Rows keep the examples in arrival order; ``segment_ids`` number them 1, 2, ...
    per row and ``positions`` restart at 0 for each. With ``ecg_slots=E``, examples carrying
    an ``ecg`` go only into rows with fewer than ``E`` of them, and ``ecg`` is ``[R, E, ...]``
    (slot ``e``: the ``e``-th such example of the row; zeros where unused).
    """
    allowed = set(SEQUENCE_KEYS) | ({"ecg"} if ecg_slots else set())
    extra = sorted({key for ex in examples for key in ex} - allowed)
    if extra:
        raise ValueError(
            f"examples carry per-example arrays {extra}; packing cannot place them in a row. "
            "Use fit='pad' for representations with a signal or image input"
            + (" (or fit='pack' with ecg_slots=E for their 'ecg')." if "ecg" in extra else ".")
        )
    lengths = np.array([len(ex["inputs"]) for ex in examples], dtype=np.int64)
    has_ecg = np.array(["ecg" in ex for ex in examples], dtype=bool)
    free = np.full(len(examples), seq_len, dtype=np.int64)  # at most one row per example
    slots_free = np.full(len(examples), ecg_slots if has_ecg.any() else 1, dtype=np.int64)
    row_of = np.empty(len(examples), dtype=np.int64)
    slot_of = np.zeros(len(examples), dtype=np.int64)
    n_rows = 0
    for i, length in enumerate(lengths):
        fits = free[: n_rows + 1] >= length  # row n_rows is still empty
        if has_ecg[i]:
            fits &= slots_free[: n_rows + 1] > 0
        r = int(np.argmax(fits))
        row_of[i] = r
        free[r] -= length
        if has_ecg[i]:
            slot_of[i] = ecg_slots - slots_free[r]
            slots_free[r] -= 1
        n_rows = max(n_rows, r + 1)
    out = {
        "inputs": np.full((n_rows, seq_len), pad_id, np.int32),
        "targets": np.zeros((n_rows, seq_len), np.int32),
        "loss_mask": np.zeros((n_rows, seq_len), np.float32),
        "segment_ids": np.zeros((n_rows, seq_len), np.int32),
        "positions": np.zeros((n_rows, seq_len), np.int32),
    }
    fill = np.zeros(n_rows, dtype=np.int64)
    count = np.zeros(n_rows, dtype=np.int32)
    ramp = np.arange(seq_len, dtype=np.int32)
    for ex, r, length in zip(examples, row_of, lengths, strict=True):
        a, b = fill[r], fill[r] + length
        count[r] += 1
        out["inputs"][r, a:b] = ex["inputs"]
        out["targets"][r, a:b] = ex["targets"]
        out["loss_mask"][r, a:b] = ex["loss_mask"]
        out["segment_ids"][r, a:b] = count[r]
        out["positions"][r, a:b] = ramp[:length]
        fill[r] = b
    if has_ecg.any():
        first = examples[int(np.argmax(has_ecg))]["ecg"]
        out["ecg"] = np.zeros((n_rows, ecg_slots, *first.shape), first.dtype)
        for i in np.flatnonzero(has_ecg):
            ecg = examples[i]["ecg"]
            if ecg.shape != first.shape:
                raise ValueError(f"examples carry 'ecg' of shapes {first.shape} and {ecg.shape}")
            out["ecg"][row_of[i], slot_of[i]] = ecg
    return out


def pad_rows(examples: Sequence[dict], *, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example per row; other array fields (signal, ...) stacked along the rows."""
    rows = [pad_example(ex, seq_len=seq_len, pad_id=pad_id) for ex in examples]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


class ChunkReader:
    """Reads chunk ``k`` of this host's shuffled example stream and fits it into rows.

    Chunk ``k`` belongs to epoch ``k // chunks_per_epoch``; each epoch's order is a permutation
    of this host's examples drawn from ``(seed, epoch)``. Reading and packing a chunk of
    examples at once keeps the per-example cost at a few microseconds (grain's per-element
    machinery would cost ten times more). Picklable, so grain workers run it.
    """

    def __init__(self, paths, cfg, shard_index: int, shard_count: int):
        self.paths, self.cfg = list(paths), cfg
        self.shard_index, self.shard_count = shard_index, shard_count
        self._source = None
        self._perm: tuple[int, np.ndarray] | None = None

    @functools.cached_property
    def num_examples(self) -> int:
        total = len(self.source)
        return len(range(self.shard_index, total, self.shard_count))

    @property
    def source(self):
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    @property
    def chunks_per_epoch(self) -> int:
        return -(-self.num_examples // self.cfg.chunk_size)

    def __getstate__(self):
        return {**self.__dict__, "_source": None, "_perm": None}

    def order(self, epoch: int) -> np.ndarray:
        """This host's example positions in epoch ``epoch``."""
        if self._perm is None or self._perm[0] != epoch:
            n = self.num_examples
            if self.cfg.shuffle:
                perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
            else:
                perm = np.arange(n)
            self._perm = (epoch, perm)
        return self._perm[1]

    def __call__(self, k: int, _element: Any = None) -> dict[str, np.ndarray]:
        """Rows of the ``k``-th chunk of the stream (``k`` counts across epochs)."""
        epoch, c = divmod(int(k), self.chunks_per_epoch)
        positions = self.order(epoch)[c * self.cfg.chunk_size : (c + 1) * self.cfg.chunk_size]
        keys = (self.shard_index + positions * self.shard_count).tolist()
        fit = functools.partial(next_token_example, seq_len=self.cfg.seq_len)
        examples = [fit(data) for data in self.source.__getitems__(keys)]
        if self.cfg.fit == "pad":
            return pad_rows(examples, seq_len=self.cfg.seq_len, pad_id=self.cfg.pad_id)
        return pack_rows(
            examples,
            seq_len=self.cfg.seq_len,
            pad_id=self.cfg.pad_id,
            ecg_slots=self.cfg.ecg_slots,
        )


def make_dataset(
    paths: Sequence[str],
    cfg: PipelineConfig,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """The grain dataset of batches for this host.

    Args:
      paths: ArrayRecord shard files (see :func:`shard_paths`).
      cfg: pipeline settings.
      shard_index, shard_count: this host's slice; default ``jax.process_index()`` /
        ``jax.process_count()``.

    Returns:
      An ``IterDataset`` of batch dicts (see the module docstring); ``iter()`` it for a
      checkpointable iterator.
    """
    if shard_index is None or shard_count is None:
        import jax  # only here: the pipeline itself does not need JAX

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if cfg.worker_count > 0:
        _mark_flags_parsed()
    reader = ChunkReader(paths, cfg, shard_index, shard_count)
    if reader.num_examples == 0:
        raise ValueError(f"host {shard_index} of {shard_count} gets no examples from {paths}")
    ds = grain.MapDataset.range(reader.chunks_per_epoch).repeat(cfg.num_epochs)
    ds = ds.map_with_index(reader)  # the index runs across epochs
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=2))
    it = grain.experimental.RebatchIterDataset(
        it, cfg.batch_size, drop_remainder=cfg.drop_remainder
    )
    if cfg.worker_count > 0:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    return it


def token_stats(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Fill and answer-token counts of a batch (logged during training)."""
    real = batch["segment_ids"] > 0
    return {
        "fill": float(real.mean()),
        "answer_tokens": int(batch["loss_mask"].sum()),
        "examples": int(sum(len(np.unique(row[row > 0])) for row in batch["segment_ids"])),
    }


def _mark_flags_parsed() -> None:
    """grain workers read absl flags; outside ``absl.app.run`` mark them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
