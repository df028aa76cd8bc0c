"""The grain pipeline: exact packing/padding, shuffling, host sharding and exact resumption."""

import json

import numpy as np
import pytest

from elmjax.data import pipeline, records

N_EXAMPLES = 60


def make_examples(n=N_EXAMPLES, seed=0, signal=False):
    """Examples whose first token (1000 + i) names them; the last 3 tokens are the answer."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(6, 30))
        ids = rng.integers(1, 100, length).astype(np.int32)
        ids[0] = 1000 + i
        mask = np.zeros(length, np.uint8)
        mask[-3:] = 1
        ex = {"input_ids": ids, "loss_mask": mask, "example_id": f"ex{i}", "record": "r"}
        if signal:
            ex["signal"] = rng.normal(size=(12, 50)).astype(np.float16)
        out.append(ex)
    return out


@pytest.fixture
def shards(tmp_path):
    examples = make_examples()
    paths = []
    for k, part in enumerate((examples[:25], examples[25:])):
        path = tmp_path / f"train-{k:05d}-of-00002.array_record"
        assert records.write_shard(path, part) == len(part)
        paths.append(str(path))
    return examples, paths


def unpack(batches):
    """Rebuilds the examples in packed/padded batches: name -> (inputs, targets, loss_mask)."""
    seen = {}
    for batch in batches:
        for r in range(batch["inputs"].shape[0]):
            seg = batch["segment_ids"][r]
            for s in np.unique(seg[seg > 0]):
                where = np.flatnonzero(seg == s)
                assert np.all(np.diff(where) == 1), "an example must be contiguous in its row"
                np.testing.assert_array_equal(batch["positions"][r, where], np.arange(len(where)))
                name = int(batch["inputs"][r, where[0]]) - 1000
                assert name not in seen, f"example {name} seen twice in one epoch"
                seen[name] = tuple(batch[k][r, where] for k in ("inputs", "targets", "loss_mask"))
            pad = seg == 0
            assert np.all(batch["loss_mask"][r, pad] == 0) and np.all(
                batch["positions"][r, pad] == 0
            )
    return seen


def check_against(seen, examples):
    for name, (inputs, targets, mask) in seen.items():
        ids, answer = examples[name]["input_ids"], examples[name]["loss_mask"]
        np.testing.assert_array_equal(inputs, ids[:-1])
        np.testing.assert_array_equal(targets, ids[1:])
        np.testing.assert_array_equal(mask, answer[1:].astype(np.float32))


def take(ds, n=None):
    it = iter(ds)
    out = [b for _, b in zip(range(n), it, strict=False)] if n else list(it)
    return out


def test_records_round_trip_and_bad_bytes(tmp_path):
    ex = make_examples(2, signal=True)
    path = tmp_path / "x.array_record"
    records.write_shard(path, ex)
    back = records.read_shard(path)
    assert [b["example_id"] for b in back] == ["ex0", "ex1"]
    for a, b in zip(ex, back, strict=True):
        for key in ("input_ids", "loss_mask", "signal"):
            assert b[key].dtype == a[key].dtype
            np.testing.assert_array_equal(b[key], a[key])
    with pytest.raises(records.ShardFormatError, match="not a prepared example"):
        records.deserialize_example(b"\xc1garbage")
    with pytest.raises(TypeError, match="'meta' has unsupported type dict"):
        records.serialize_example({"meta": {"a": 1}})
    assert not list(tmp_path.glob("*.tmp"))


def test_pack_one_epoch_holds_every_example_once_exactly(shards):
    examples, paths = shards
    cfg = pipeline.PipelineConfig(seq_len=48, batch_size=2, num_epochs=1, drop_remainder=False)
    batches = take(pipeline.make_dataset(paths, cfg, shard_index=0, shard_count=1))
    for b in batches:
        assert set(b) == set(pipeline.BATCH_KEYS)
        assert b["inputs"].shape[1] == 48 and b["inputs"].dtype == np.int32
    seen = unpack(batches)
    assert sorted(seen) == list(range(N_EXAMPLES))
    check_against(seen, examples)
    fill = np.mean([pipeline.token_stats(b)["fill"] for b in batches])
    assert fill > 0.6  # packing several examples per row
    assert sum(pipeline.token_stats(b)["examples"] for b in batches) == N_EXAMPLES


def test_pad_one_example_per_row_with_signal(tmp_path):
    examples = make_examples(10, signal=True)
    path = tmp_path / "valid-00000-of-00001.array_record"
    records.write_shard(path, examples)
    cfg = pipeline.PipelineConfig(
        seq_len=40, batch_size=3, fit="pad", shuffle=False, num_epochs=1, pad_id=7
    )
    batches = take(pipeline.make_dataset([str(path)], cfg, shard_index=0, shard_count=1))
    assert len(batches) == 3  # 10 // 3, remainder dropped
    b = batches[0]
    assert b["signal"].shape == (3, 12, 50) and b["signal"].dtype == np.float16
    np.testing.assert_array_equal(b["signal"][1], examples[1]["signal"])
    n = len(examples[0]["input_ids"]) - 1
    np.testing.assert_array_equal(b["inputs"][0, :n], examples[0]["input_ids"][:-1])
    assert np.all(b["inputs"][0, n:] == 7) and np.all(b["targets"][0, n:] == 0)
    np.testing.assert_array_equal(b["segment_ids"][0], (np.arange(40) < n).astype(np.int32))
    check_against(unpack(batches), examples)


def test_packing_refuses_per_example_arrays(tmp_path):
    path = tmp_path / "train-00000-of-00001.array_record"
    records.write_shard(path, make_examples(4, signal=True))
    cfg = pipeline.PipelineConfig(seq_len=40, batch_size=1, num_epochs=1)
    with pytest.raises(ValueError, match=r"per-example arrays \['signal'\].*fit='pad'"):
        take(pipeline.make_dataset([str(path)], cfg, shard_index=0, shard_count=1), 1)


def test_example_longer_than_the_row_is_named(shards):
    _, paths = shards
    cfg = pipeline.PipelineConfig(seq_len=8, batch_size=1, num_epochs=1, shuffle=False)
    with pytest.raises(pipeline.ExampleTooLongError, match="example 'ex0' has .* tokens"):
        take(pipeline.make_dataset(paths, cfg, shard_index=0, shard_count=1), 1)


def test_shuffle_is_seeded_and_differs_per_epoch(shards):
    examples, paths = shards

    def order(seed, epochs):
        cfg = pipeline.PipelineConfig(
            seq_len=40, batch_size=1, fit="pad", seed=seed, num_epochs=epochs
        )
        batches = take(pipeline.make_dataset(paths, cfg, shard_index=0, shard_count=1))
        return [int(b["inputs"][0, 0]) - 1000 for b in batches]

    a, b, c = order(0, 2), order(0, 2), order(1, 1)
    assert a == b
    assert sorted(a[:N_EXAMPLES]) == sorted(a[N_EXAMPLES:]) == list(range(N_EXAMPLES))
    assert a[:N_EXAMPLES] != a[N_EXAMPLES:]  # epoch 2 in a new order
    assert c != a[:N_EXAMPLES] and a[:N_EXAMPLES] != list(range(N_EXAMPLES))


def test_hosts_get_disjoint_slices_covering_everything(shards):
    examples, paths = shards
    cfg = pipeline.PipelineConfig(seq_len=48, batch_size=2, num_epochs=1, drop_remainder=False)
    parts = [
        set(unpack(take(pipeline.make_dataset(paths, cfg, shard_index=i, shard_count=3))))
        for i in range(3)
    ]
    assert [len(p) for p in parts] == [20, 20, 20]
    assert set.union(*parts) == set(range(N_EXAMPLES))
    assert parts[1] == set(range(1, N_EXAMPLES, 3))
    with pytest.raises(ValueError, match="shard_index 3 not in"):
        pipeline.make_dataset(paths, cfg, shard_index=3, shard_count=3)


@pytest.mark.parametrize("fit", ["pack", "pad"])
def test_restoring_iterator_state_reproduces_the_next_batches(shards, fit):
    _, paths = shards
    cfg = pipeline.PipelineConfig(seq_len=40, batch_size=3, fit=fit, seed=5)
    ds = pipeline.make_dataset(paths, cfg, shard_index=0, shard_count=1)
    it = iter(ds)
    for _ in range(7):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(30)]

    fresh = iter(pipeline.make_dataset(paths, cfg, shard_index=0, shard_count=1))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])


def test_resumption_through_worker_processes(shards):
    _, paths = shards
    cfg = pipeline.PipelineConfig(seq_len=40, batch_size=2, seed=3, worker_count=1)
    it = iter(pipeline.make_dataset(paths, cfg, shard_index=0, shard_count=1))
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(8)]
    it.close()
    fresh = iter(pipeline.make_dataset(paths, cfg, shard_index=0, shard_count=1))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        np.testing.assert_array_equal(got["loss_mask"], want["loss_mask"])
    fresh.close()


def test_shard_paths(tmp_path):
    for name in ("train-00001-of-00002", "train-00000-of-00002", "test-00000-of-00001"):
        (tmp_path / f"{name}.array_record").touch()
    assert [p.split("/")[-1] for p in pipeline.shard_paths(tmp_path, "train")] == [
        "train-00000-of-00002.array_record",
        "train-00001-of-00002.array_record",
    ]
    with pytest.raises(FileNotFoundError, match="no shards for split 'valid'"):
        pipeline.shard_paths(tmp_path, "valid")
