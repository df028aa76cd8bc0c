"""The on-disk form of one prepared example: a msgpack record in an ArrayRecord shard.

A prepared example is a flat dict of numpy arrays (token ids, loss mask, optionally the float16
signal) and plain scalars/strings (example id, record id, ...). It is stored as msgpack through
``flax.serialization`` — no pickle, so reading a shard never executes code — one example per
ArrayRecord record, with ``group_size:1`` so grain can read any example directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python import array_record_module
from flax import serialization

WRITER_OPTIONS = "group_size:1"  # random access: one record per chunk


class ShardFormatError(ValueError):
    """A shard record that is not a prepared example."""


def serialize_example(example: Mapping[str, Any]) -> bytes:
    """One example dict -> bytes. Values: numpy arrays, ints, floats, strings, bools."""
    out = {}
    for key, value in example.items():
        if isinstance(value, np.ndarray | np.generic):
            out[key] = np.asarray(value)
        elif isinstance(value, str | int | float | bool) or value is None:
            out[key] = value
        else:
            raise TypeError(f"example field {key!r} has unsupported type {type(value).__name__}")
    return serialization.msgpack_serialize(out)


def deserialize_example(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`serialize_example`."""
    try:
        example = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise ShardFormatError(f"not a prepared example record: {e}") from e
    if not isinstance(example, dict):
        raise ShardFormatError(f"not a prepared example record: got {type(example).__name__}")
    return example


def write_shard(path: str | os.PathLike, examples: Iterable[Mapping[str, Any]]) -> int:
    """Writes examples to one ArrayRecord file atomically (``path.tmp`` then rename).

    Returns:
      The number of examples written.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = array_record_module.ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    n = 0
    try:
        for example in examples:
            writer.write(serialize_example(example))
            n += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return n


def read_shard(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All examples of one shard (for tests and inspection; training streams through grain)."""
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
        return [deserialize_example(r) for r in reader.read_all()]
    finally:
        reader.close()
