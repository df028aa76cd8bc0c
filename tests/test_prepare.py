"""python -m elmjax.prepare: synthetic records -> segments -> tokenizers -> shards, end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from elmjax import prepare
from elmjax.config import load_config
from elmjax.data import pipeline, records, sources
from elmjax.tokenize import ecgbyte, text


def tiny_config(tmp_path, **changes):
    cfg = load_config("ecgbyte_1024:demo")
    cfg.workdir = str(tmp_path / "run")
    cfg.data.root = str(tmp_path / "data")
    cfg.data.generate_ecgs = 40
    cfg.data.workers = 1
    cfg.data.group_questions = 1  # one QA item per example (grouping: test_train)
    cfg.data.examples_per_shard = 64
    cfg.data.max_examples = {"train": 400, "valid": 100, "test": 100}
    cfg.ecg_tokenizer.num_merges = 60
    cfg.text.train_vocab_size = 400
    cfg.budget = 120  # below every example: the ECG is always cut
    for key, value in changes.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    cfg = tiny_config(tmp)
    return cfg, prepare.prepare(cfg)


def all_examples(workdir, split):
    return [ex for p in prepare.split_paths(workdir, split) for ex in records.read_shard(p)]


def test_manifest_counts_match_the_shards(prepared):
    cfg, manifest = prepared
    assert manifest["format"] == prepare.SHARD_FORMAT
    assert manifest["budget"] == 120 and manifest["truncation"] == "head"
    for split in ("train", "valid", "test"):
        examples = all_examples(cfg.workdir, split)
        info = manifest["splits"][split]
        assert info["examples"] == len(examples) > 0
        assert info["tokens"]["max"] == max(len(e["input_ids"]) for e in examples) <= 120
        assert info["answer_tokens"] == sum(int(e["loss_mask"].sum()) for e in examples)
    assert manifest["splits"]["train"]["examples"] <= 400  # the cap
    assert manifest["config_hash"] == prepare.settings_hash(prepare.shard_settings(cfg))
    tok = ecgbyte.ECGByteTokenizer.load(manifest["ecg_tokenizer"]["path"])
    assert tok.fingerprint() == manifest["ecg_tokenizer"]["fingerprint"]
    assert manifest["vocab"]["ecg_vocab_size"] == tok.vocab_size == 26 + 60


def test_examples_hold_the_answer_and_a_truncated_ecg(prepared):
    cfg, manifest = prepared
    tok = text.load_text_tokenizer(manifest["text_tokenizer"]["path"])
    v = manifest["vocab"]
    vocab = text.EcgVocab(
        v["text_vocab_size"],
        v["ecg_vocab_size"],
        markers=v["markers"],
        text_pad_id=v["text_pad_id"],
    )
    for ex in all_examples(cfg.workdir, "valid")[:20]:
        conv = sources.Conversation.from_dict(json.loads(ex["conversation"]))
        ids, mask = ex["input_ids"], ex["loss_mask"].astype(bool)
        assert len(ids) == 120  # the ECG always fills the budget at T=120
        answer = conv.turns[-1]["text"]
        assert tok.decode(ids[mask].tolist(), skip_special=False) == answer + "<|eot_id|>"
        ((start, end),) = ex["answer_spans"]
        assert mask[start:end].all() and mask.sum() == end - start
        n_ecg = int(vocab.is_ecg(ids).sum())
        assert n_ecg == ex["ecg_kept"] > 0 and ex["ecg_dropped"] > 0
        assert list(ids).count(vocab.start_id) == 1 and list(ids).count(vocab.end_id) == 1


def test_splits_are_patient_disjoint_and_tokenizer_saw_train_only(prepared):
    cfg, manifest = prepared
    patients = {
        split: {
            sources.Conversation.from_dict(json.loads(e["conversation"])).patient_id
            for e in all_examples(cfg.workdir, split)
        }
        for split in ("train", "valid", "test")
    }
    assert not patients["train"] & patients["test"]
    assert not patients["train"] & patients["valid"]
    assert not patients["valid"] & patients["test"]


def test_shards_stream_through_the_pipeline(prepared):
    cfg, manifest = prepared
    pcfg = pipeline.PipelineConfig(
        seq_len=cfg.budget, batch_size=4, num_epochs=1, pad_id=manifest["vocab"]["pad_id"]
    )
    paths = prepare.split_paths(cfg.workdir, "train")
    ds = pipeline.make_dataset(paths, pcfg, shard_index=0, shard_count=1)
    batch = next(iter(ds))
    assert batch["inputs"].shape == (4, 120)
    assert batch["loss_mask"].sum() > 0


def test_rerun_reuses_everything_and_other_settings_are_refused(prepared):
    cfg, manifest = prepared
    again = prepare.prepare(cfg)
    assert again["splits"]["train"]["shards"] == manifest["splits"]["train"]["shards"]
    assert again["ecg_tokenizer"]["fingerprint"] == manifest["ecg_tokenizer"]["fingerprint"]
    other = cfg.copy_and_resolve_references()
    other.budget = 110
    with pytest.raises(prepare.PrepareError, match="prepared with other settings"):
        prepare.prepare(other)


def test_a_synthetic_set_of_another_size_is_refused(prepared):
    cfg, _ = prepared
    other = cfg.copy_and_resolve_references()
    other.data.generate_ecgs = 41
    with pytest.raises(prepare.PrepareError, match="holds 40 synthetic ECGs but data.generate_"):
        prepare.ensure_data(other)


def test_time_policy_cuts_every_lead_at_the_same_second(tmp_path):
    cfg = tiny_config(tmp_path, truncation="time", **{"ecg_tokenizer.lead_boundaries": True})
    cfg.data.generate_ecgs = 6
    cfg.data.max_examples = {"train": 40, "valid": 10, "test": 10}
    manifest = prepare.prepare(cfg)
    assert manifest["truncation"] == "time"
    tok = ecgbyte.ECGByteTokenizer.load(manifest["ecg_tokenizer"]["path"])
    assert tok.lead_boundaries
    ex = all_examples(cfg.workdir, "train")[0]
    assert len(ex["input_ids"]) <= 120 and ex["ecg_kept"] > 0


def _conv(i, qtype, attribute, template=1):
    return sources.Conversation(
        example_id=f"e{i}",
        record="records500/00000/00001_hr",
        layout="ptbxl",
        patient_id="1",
        segment=None,
        turns=({"role": "user", "text": "q?"}, {"role": "assistant", "text": "yes"}),
        meta={"question_type": qtype, "attribute": attribute, "template_id": template},
    )


def test_select_questions_and_leads():
    convs = [
        _conv(0, "single-verify", ["atrial fibrillation"]),
        _conv(1, "single-verify", ["st elevation", "lead II"]),
        _conv(2, "single-query", None, template=6),
        _conv(3, "single-choose", ["atrial fibrillation", "sinus rhythm"], template=4),
        _conv(4, "single-verify", ["sinus rhythm"]),
    ]
    kept, report = prepare.select_questions(convs, ["single-verify"], [])
    assert [c.example_id for c in kept] == ["e0", "e1", "e4"]
    assert report == {"kept": 3, "dropped": {"question_type": 2}}
    kept, report = prepare.select_questions(convs, [], ["atrial fibrillation", "sinus rhythm"])
    assert [c.example_id for c in kept] == ["e0", "e2", "e3", "e4"]  # all attributes listed
    assert report["dropped"] == {"attribute": 1}
    # Query items have no attribute list: they pass the attribute test, chosen by template.
    kept, report = prepare.select_questions(convs, [], ["atrial fibrillation"], [1, 6])
    assert [c.example_id for c in kept] == ["e0", "e2"]
    assert report["dropped"] == {"template_id": 1, "attribute": 2}
    with pytest.raises(prepare.PrepareError, match="leave no QA item of 5"):
        prepare.select_questions(convs, ["single-verify"], ["lead V1"])

    cfg = load_config("ecgbyte_1024")
    assert prepare.lead_indices(cfg) is None
    cfg.data.leads = ("II", "v1", "aVF")
    assert prepare.lead_indices(cfg) == [1, 6, 5]
    cfg.data.leads = ("II", "V7")
    with pytest.raises(prepare.PrepareError, match=r"unknown lead\(s\) \['V7'\]"):
        prepare.lead_indices(cfg)
    cfg.data.leads = ("II", "ii")
    with pytest.raises(prepare.PrepareError, match="names a lead twice"):
        prepare.lead_indices(cfg)


def test_one_lead_streams_and_question_selection(prepared, tmp_path):
    """The demo config tokenises lead V1 only and keeps only its selected questions."""
    cfg, manifest = prepared
    assert tuple(cfg.data.leads) == ("V1",)
    examples = all_examples(cfg.workdir, "train")
    for ex in examples:
        meta = json.loads(ex["conversation"])["meta"]
        for q in meta.get("questions", [meta]):
            assert q["template_id"] in cfg.data.template_ids
            assert q["question_type"] in cfg.data.question_types
            if q["question_type"] == "single-verify":
                assert set(q["attribute"]) <= set(cfg.data.attributes)
            assert q["variant"] == "paraphrased"
    twelve = tiny_config(tmp_path, **{"data.leads": ()})
    twelve.data.root = cfg.data.root  # same corpus, all 12 leads
    prepare.prepare(twelve)

    # One lead's stream (before truncation) is about 1/12 of the 12-lead stream.
    def stream_len(workdir):
        exs = all_examples(workdir, "train")
        return np.mean([int(ex["ecg_kept"]) + int(ex["ecg_dropped"]) for ex in exs])

    assert 8 < stream_len(twelve.workdir) / stream_len(cfg.workdir) < 16


def test_grouping_applies_to_the_train_split_only(prepared, tmp_path):
    cfg, _ = prepared
    grouped = tiny_config(tmp_path, **{"data.group_questions": 3, "data.group_distinct": ""})
    grouped.data.root = cfg.data.root
    prepare.prepare(grouped)

    def sizes(split):
        return [
            len(json.loads(ex["conversation"])["meta"].get("questions", [None]))
            for ex in all_examples(grouped.workdir, split)
        ]

    assert max(sizes("train")) == 3
    for split in ("valid", "test"):
        assert set(sizes(split)) == {1}


def test_groups_never_share_the_distinct_key():
    def conv(record, i, kind):
        turns = ({"role": "user", "text": f"q{i}"}, {"role": "assistant", "text": f"a{i}"})
        meta = {"attribute_type": kind} if kind else {}
        return sources.Conversation(f"x:{record}:{i}", record, "ptbxl", "1", 0, turns, meta)

    kinds = ["rhythm", "rhythm", "rhythm", "conduction", "conduction", None, None]
    convs = [conv(r, i, k) for r in ("a", "b") for i, k in enumerate(kinds)]
    grouped = prepare.group_per_segment(convs, 3, seed=0, distinct="attribute_type")
    assert sorted(q for g in grouped for q in g.meta["grouped"]) == sorted(
        c.example_id for c in convs
    )  # nothing lost, nothing twice
    for g in grouped:
        assert all(q.split(":")[1] == g.record for q in g.meta["grouped"])
        typed = [q["attribute_type"] for q in g.meta["questions"] if "attribute_type" in q]
        assert len(typed) == len(set(typed)), g.meta
        assert [t["text"] for t in g.turns][::2] == [
            "q" + q.rsplit(":", 1)[1] for q in g.meta["grouped"]
        ]
    # three rhythm questions per record need three groups; the other four fit in them
    assert len(grouped) == 6
    free = prepare.group_per_segment(convs, 3, seed=0)
    assert sorted(len(g.meta["grouped"]) for g in free) == [1, 1, 3, 3, 3, 3]


def test_bad_settings_are_named(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.data.source = "nope"
    with pytest.raises(prepare.PrepareError, match="unknown data.source 'nope'"):
        prepare.prepare(cfg)
    cfg = tiny_config(tmp_path / "b", representation="nope")
    with pytest.raises(prepare.PrepareError, match="unknown representation 'nope'"):
        prepare.prepare(cfg)
    cfg = tiny_config(tmp_path / "c")
    cfg.data.generate_ecgs = 0
    with pytest.raises(prepare.PrepareError, match="no synthetic data set"):
        prepare.prepare(cfg)


def test_cli(tmp_path):
    run = tmp_path / "cli"
    args = [
        sys.executable,
        "-m",
        "elmjax.prepare",
        "--config=configs/ecgbyte_1024.py:demo",
        f"--workdir={run}",
        f"--config.data.root={tmp_path / 'data'}",
        "--config.data.generate_ecgs=6",
        "--config.data.workers=1",
        "--config.ecg_tokenizer.num_merges=30",
        "--config.budget=160",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert manifest["budget"] == 160 and manifest["splits"]["train"]["examples"] > 0
    assert "prepared in" in done.stdout
    bad = subprocess.run(
        args[:4] + ["--config.data.source=nope"], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 2 and "unknown data.source 'nope'" in bad.stderr
    assert np.all(np.isfinite([manifest["splits"]["train"]["tokens"]["mean"]]))
