"""python -m elmjax.prepare for the signal and image representations (placeholder + ECG input)."""

import json
from pathlib import Path

import numpy as np
import pytest
from test_prepare import tiny_config

from elmjax import prepare
from elmjax.data import pipeline, records, sources
from elmjax.ecg import render
from elmjax.ecg.io import CANONICAL_LEADS
from elmjax.models import elm
from elmjax.tokenize import text

SIGNAL_LEADS = ("II", "V1")
N_SIGNAL = 3  # placeholders per example in the signal run (the image run keeps the default 1)
IMAGE_SIZE = 64


def repr_config(tmp, name, representation, **changes):
    cfg = tiny_config(tmp / name, representation=representation, **changes)
    cfg.data.root = str(tmp / "data")  # one synthetic set for every run of this module
    cfg.data.max_examples = {"train": 60, "valid": 20, "test": 20}
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repr")
    signal = repr_config(
        tmp,
        "signal",
        "signal",
        truncation="time",  # ignored: a placeholder block is never cut
        **{"data.leads": SIGNAL_LEADS, "data.ecg_tokens": N_SIGNAL},
    )
    image = repr_config(tmp, "image", "image", **{"data.leads": (), "data.image_size": 64})
    return {cfg.representation: (cfg, prepare.prepare(cfg)) for cfg in (signal, image)}


def all_examples(workdir, split):
    return [ex for p in prepare.split_paths(workdir, split) for ex in records.read_shard(p)]


def segment_of(cfg, example):
    """The preprocessed float32 [12, L] segment an example was built from."""
    conv = sources.Conversation.from_dict(json.loads(example["conversation"]))
    root = prepare.ensure_data(cfg)
    by_record, _, fetch = prepare.segment_index(Path(cfg.workdir) / "segments", root)
    return np.asarray(fetch(by_record[conv.record][conv.segment]), np.float32), conv


@pytest.mark.parametrize("representation", ["signal", "image"])
def test_manifest_and_placeholder_blocks(runs, representation):
    cfg, manifest = runs[representation]
    n = N_SIGNAL if representation == "signal" else 1
    v = manifest["vocab"]
    assert manifest["representation"] == representation
    assert manifest["ecg_tokenizer"] is None and v["ecg_vocab_size"] == 1
    assert manifest["placeholder_id"] == v["text_vocab_size"] and manifest["ecg_tokens"] == n
    spec = manifest["ecg_input"]
    if representation == "signal":
        assert spec["kind"] == "signal" and spec["dtype"] == "float16"
        assert spec["shape"] == [len(SIGNAL_LEADS), cfg.data.seg_len]
    else:
        assert spec["kind"] == "image" and spec["dtype"] == "uint8"
        assert spec["shape"] == [IMAGE_SIZE, IMAGE_SIZE, 3] and spec["layout"] == "6x2"
    assert manifest["config_hash"] == prepare.settings_hash(prepare.shard_settings(cfg))
    assert not (Path(cfg.workdir) / "tokenizers" / "ecgbyte.json").exists()
    tok = text.load_text_tokenizer(manifest["text_tokenizer"]["path"])
    vocab = text.EcgVocab(
        v["text_vocab_size"], 1, markers=v["markers"], text_pad_id=v["text_pad_id"]
    )
    ph = manifest["placeholder_id"]
    for split in ("train", "valid", "test"):
        examples = all_examples(cfg.workdir, split)
        assert len(examples) == manifest["splits"][split]["examples"] > 0
        for ex in examples:
            ids = ex["input_ids"]
            assert ex["ecg"].dtype == np.dtype(spec["dtype"])
            assert list(ex["ecg"].shape) == spec["shape"]
            assert ex["ecg_kept"] == n and ex["ecg_dropped"] == 0 and len(ids) <= cfg.budget
            where = np.flatnonzero(ids == ph)
            assert len(where) == n and np.all(np.diff(where) == 1)
            # the block opens the first user turn: <ecg> right before, and the first user
            # header (the second header after the system turn) ends right before that
            assert ids[where[0] - 1] == vocab.start_id and ids[where[-1] + 1] == vocab.end_id
            user = tok._header("user")
            assert list(ids[where[0] - 1 - len(user) : where[0] - 1]) == user
            assert list(ids[: where[0]]).count(tok.eot_id) == 1  # only the system turn before
        elm.check_placeholders(
            np.stack(
                [np.pad(e["input_ids"], (0, cfg.budget - len(e["input_ids"]))) for e in examples]
            ),
            n,
            placeholder_id=ph,
        )


def test_stored_signal_is_the_preprocessed_segment(runs):
    cfg, _ = runs["signal"]
    rows = [CANONICAL_LEADS.index(lead) for lead in SIGNAL_LEADS]
    for ex in all_examples(cfg.workdir, "valid")[:10]:
        segment, _ = segment_of(cfg, ex)
        np.testing.assert_allclose(
            ex["ecg"].astype(np.float32), segment[rows], rtol=1e-3, atol=1e-3
        )
        assert np.array_equal(ex["ecg"], segment[rows].astype(np.float16))


def test_stored_image_is_the_rendered_and_resized_printout(runs):
    cfg, _ = runs["image"]
    for ex in all_examples(cfg.workdir, "valid")[:4]:
        segment, _ = segment_of(cfg, ex)
        sheet = render.rasterize_batch(
            segment[None], fs=cfg.data.target_fs, layout="6x2", px_per_mm=4.0
        )
        geom = render.raster_geometry(segment.shape[1], cfg.data.target_fs, "6x2")
        assert sheet.shape == (1, geom.height, geom.width, 3)  # true paper scale, whole sheet
        want = render.resize_area(sheet, IMAGE_SIZE, IMAGE_SIZE)[0]
        np.testing.assert_array_equal(ex["ecg"], want)
        assert len(np.unique(ex["ecg"].reshape(-1, 3), axis=0)) > 8  # not a blank page


def test_resize_area_is_the_box_mean():
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 12, 3)).astype(np.uint8)
    want = np.rint(x.astype(np.float64).reshape(2, 4, 2, 3, 4, 3).mean(axis=(2, 4)))
    np.testing.assert_array_equal(render.resize_area(x, 4, 3), want)
    x = np.full((1, 30, 50, 3), 200, np.uint8)  # fractional footprints keep flat colours
    assert np.all(render.resize_area(x, 7, 11) == 200)


@pytest.mark.parametrize("representation", ["signal", "image"])
def test_text_and_answer_masks_match_the_symbolic_example(runs, representation):
    cfg, manifest = runs[representation]
    v = manifest["vocab"]
    tok = text.load_text_tokenizer(manifest["text_tokenizer"]["path"])
    symbolic = text.EcgVocab(v["text_vocab_size"], 86, markers=True, text_pad_id=v["text_pad_id"])
    for ex in all_examples(cfg.workdir, "valid")[:10]:
        conv = sources.Conversation.from_dict(json.loads(ex["conversation"]))
        sym = prepare.make_example(
            tok,
            conv,
            np.arange(500, dtype=np.int32) % 86,
            vocab=symbolic,
            budget=cfg.budget,
            policy="head",
            system=cfg.text.system_prompt or None,
        )
        text_here = ex["input_ids"] < v["text_vocab_size"]
        text_sym = sym["input_ids"] < v["text_vocab_size"]
        np.testing.assert_array_equal(ex["input_ids"][text_here], sym["input_ids"][text_sym])
        np.testing.assert_array_equal(ex["loss_mask"][text_here], sym["loss_mask"][text_sym])
        assert ex["loss_mask"].sum() == sym["loss_mask"].sum() > 0
        answer = conv.turns[-1]["text"]
        mask = ex["loss_mask"].astype(bool)
        assert tok.decode(ex["input_ids"][mask].tolist(), skip_special=False) == (
            answer + "<|eot_id|>"
        )


def _pad_cfg(cfg, manifest, **kw):
    return pipeline.PipelineConfig(
        seq_len=cfg.budget, pad_id=manifest["vocab"]["pad_id"], **{"batch_size": 4, **kw}
    )


@pytest.mark.parametrize("representation", ["signal", "image"])
def test_pipeline_rows_carry_their_ecg(runs, representation):
    cfg, manifest = runs[representation]
    paths = prepare.split_paths(cfg.workdir, "valid")
    first = records.read_shard(paths[0])
    pcfg = _pad_cfg(cfg, manifest, fit="pad", shuffle=False, num_epochs=1)
    batch = next(iter(pipeline.make_dataset(paths, pcfg, shard_index=0, shard_count=1)))
    dtype = np.float32 if representation == "signal" else np.uint8
    assert batch["ecg"].shape == (4, *manifest["ecg_input"]["shape"])
    assert batch["ecg"].dtype == dtype
    for b in range(4):
        ids = first[b]["input_ids"]
        np.testing.assert_array_equal(batch["inputs"][b, : len(ids) - 1], ids[:-1])
        np.testing.assert_array_equal(batch["ecg"][b], first[b]["ecg"].astype(dtype))
    n = manifest["ecg_tokens"]
    elm.check_placeholders(batch["inputs"], n, placeholder_id=manifest["placeholder_id"])

    # shuffled, resumed from a saved state: the same next batches, ECG included
    shuffled = _pad_cfg(cfg, manifest, fit="pad", seed=3, chunk_size=8)
    it = iter(pipeline.make_dataset(paths, shuffled, shard_index=0, shard_count=1))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(6)]
    fresh = iter(pipeline.make_dataset(paths, shuffled, shard_index=0, shard_count=1))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in (*pipeline.BATCH_KEYS, "ecg"):
            np.testing.assert_array_equal(got[key], want[key])


def test_packing_needs_ecg_slots_and_fills_them_per_example(runs):
    cfg, manifest = runs["signal"]
    paths = prepare.split_paths(cfg.workdir, "train")
    pcfg = _pad_cfg(cfg, manifest, fit="pack", num_epochs=1)
    with pytest.raises(ValueError, match=r"per-example arrays \['ecg'\].*fit='pad'.*ecg_slots"):
        next(iter(pipeline.make_dataset(paths, pcfg, shard_index=0, shard_count=1)))

    by_inputs = {}
    for ex in all_examples(cfg.workdir, "train"):
        by_inputs.setdefault(ex["input_ids"][:-1].tobytes(), []).append(ex["ecg"])
    slots, seq_len = 2, 2 * cfg.budget  # room for more than two examples a row
    pcfg = pipeline.PipelineConfig(
        seq_len=seq_len,
        batch_size=4,
        fit="pack",
        num_epochs=1,
        ecg_slots=slots,
        pad_id=manifest["vocab"]["pad_id"],
    )
    seen = most = 0
    for batch in pipeline.make_dataset(paths, pcfg, shard_index=0, shard_count=1):
        assert batch["ecg"].shape == (4, slots, len(SIGNAL_LEADS), cfg.data.seg_len)
        elm.check_placeholders(
            batch["inputs"],
            manifest["ecg_tokens"],
            placeholder_id=manifest["placeholder_id"],
            segment_ids=batch["segment_ids"],
            slots=slots,
        )
        for r in range(4):
            seg = batch["segment_ids"][r]
            segments = range(1, seg.max() + 1)
            assert len(segments) <= slots
            most = max(most, len(segments))
            for e, s in enumerate(segments):
                key = batch["inputs"][r, seg == s].tobytes()
                assert any(
                    np.array_equal(batch["ecg"][r, e], x.astype(np.float32)) for x in by_inputs[key]
                )
                seen += 1
            assert not batch["ecg"][r, len(segments) :].any()  # unused slots are zeros
    assert seen > 0 and most == slots


def _old_shard_settings(cfg):
    """shard_settings as it was before the signal / image representations (symbolic hashes)."""
    return {
        "representation": cfg.representation,
        "data": {
            k: v
            for k, v in cfg.data.to_dict().items()
            if k != "download_hint" and (k != "group_distinct" or v)
        },
        "ecg_tokenizer": cfg.ecg_tokenizer.to_dict(),
        "text": cfg.text.to_dict(),
        "budget": cfg.budget,
        "truncation": cfg.truncation,
        "seed": cfg.seed,
        "model_checkpoint": cfg.get("model", {}).get("checkpoint", ""),
    }


def test_hashes_symbolic_unchanged_and_new_keys_only_where_they_matter(tmp_path):
    cfg = tiny_config(tmp_path)
    old = prepare.settings_hash(_old_shard_settings(cfg))
    assert prepare.settings_hash(prepare.shard_settings(cfg)) == old
    cfg.data.ecg_tokens, cfg.data.image_size, cfg.data.image_layout = 4, 96, "3x4"
    assert prepare.settings_hash(prepare.shard_settings(cfg)) == old  # ignored for symbolic

    def digest(representation, **data):
        c = tiny_config(tmp_path, representation=representation)
        for k, v in data.items():
            c.data[k] = v
        return prepare.settings_hash(prepare.shard_settings(c))

    assert digest("signal") == digest("signal", ecg_tokens=1, image_size=96)  # defaults resolved
    assert digest("signal") != digest("signal", ecg_tokens=2)
    assert digest("image") != digest("image", image_size=96) != digest("signal")
    assert digest("image") == digest("image", image_layout="6x2", image_size=224)
    settings = prepare.shard_settings(tiny_config(tmp_path, representation="image"))
    assert "ecg_tokenizer" not in settings
    assert {"ecg_tokens", "image_layout", "image_size"} <= set(settings["data"])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"representation": "pixels"}, "unknown representation 'pixels'; use one of symbolic"),
        ({"data.ecg_tokens": 0}, "data.ecg_tokens must be a whole number >= 1"),
        ({"data.image_size": 16}, "data.image_size 16 is too small"),
        ({"data.image_layout": "4x3"}, "unknown data.image_layout '4x3'"),
    ],
)
def test_bad_settings_are_named(tmp_path, changes, message):
    cfg = tiny_config(tmp_path, **{"representation": "image", **changes})
    with pytest.raises(prepare.PrepareError, match=message):
        prepare.check_config(cfg)
