"""python -m elmjax.evaluate on a trained run: the ablations change the ECG and nothing else,
every answer of every condition is written, the ECG-utilisation is the drop from the real ECG."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import tiny_config

from elmjax import evaluate, inputs, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny symbolic run (6 steps), its examples and its RunInputs."""
    tmp = tmp_path_factory.mktemp("evalrun")
    cfg = tiny_config(tmp)
    cfg.eval.after_training = False
    train.train(cfg, cfg.workdir)
    examples = evaluate.load_split(cfg.workdir, "test")
    return cfg, Path(cfg.workdir), examples, inputs.RunInputs(cfg, cfg.workdir)


def ecg_ids(ex, vocab):
    ids = np.asarray(ex["input_ids"])
    return ids[vocab.is_ecg(ids)]


def text_ids(ex, vocab):
    return evaluate.drop_ecg(ex["input_ids"], ex["answer_spans"], vocab)


def test_rebuilt_examples_are_the_stored_ones(run):
    cfg, _, examples, ri = run
    for ex in examples:
        conv = json.loads(ex["conversation"])
        again = ri.example(conv, ri.payloads(ri.segment(conv))[0])
        assert again["input_ids"].tolist() == ex["input_ids"].tolist()
        assert again["answer_spans"].tolist() == ex["answer_spans"].tolist()


def test_each_condition_changes_the_ecg_and_nothing_else(run):
    cfg, _, examples, ri = run
    vocab = ri.vocab
    real = [ecg_ids(ex, vocab) for ex in examples]
    patients = [json.loads(ex["conversation"])["patient_id"] for ex in examples]
    zero_ids = vocab.to_llm(ri.payloads(np.zeros((12, cfg.data.seg_len)))[0][0])
    perm = evaluate._derangement(patients, seed=0)
    for cond in evaluate.parse_conditions("zeros,shuffled,text_only", "noise:snr=5"):
        shown = evaluate.condition_examples(cond, examples, ri, seed=0)
        assert len(shown) == len(examples)
        changed = 0
        for i, (ex, new) in enumerate(zip(examples, shown, strict=True)):
            ids, spans = text_ids(ex, vocab)
            new_ids, new_spans = text_ids(new, vocab)
            assert new_ids.tolist() == ids.tolist() and new_spans.tolist() == spans.tolist()
            got = ecg_ids(new, vocab)
            changed += got.tolist() != real[i].tolist()
            if cond.name == "ecg":
                assert got.tolist() == real[i].tolist()
            elif cond.name == "text_only":
                assert got.size == 0
            elif cond.name == "zeros":
                assert got.tolist() == zero_ids[: got.size].tolist()
            elif cond.name == "shuffled":
                assert patients[perm[i]] != patients[i]
                n = min(got.size, real[perm[i]].size)
                assert got[:n].tolist() == real[perm[i]][:n].tolist()
        assert changed >= (0 if cond.name == "ecg" else len(examples) - 1), cond.name


def test_evaluate_run_writes_every_answer_and_the_utilisation(run):
    cfg, workdir, examples, _ = run
    conds = evaluate.parse_conditions("zeros,text_only", "noise:snr=5")
    result = evaluate.evaluate_run(
        train.load_trained(cfg, workdir)[0],
        cfg,
        workdir,
        "test",
        conditions=conds,
        seeds=(0, 1),
        bertscore=False,
        progress=False,
    )
    n = len(examples)
    assert result["answers"] == n and result["seeds"] == [0, 1]
    out = workdir / "eval" / "test"
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == n * len(conds) * 2
    assert {x["condition"] for x in lines} == {"ecg", "zeros", "text_only", "noise:snr=5"}
    for name, c in result["conditions"].items():
        for seed in ("0", "1"):
            rows = [x for x in lines if x["condition"] == name and str(x["seed"]) == seed]
            acc = 100.0 * np.mean([x["correct"] for x in rows])
            assert c["per_seed"][seed]["accuracy"] == pytest.approx(acc)
        lo, hi = c["accuracy_bootstrap95"]
        assert lo <= c["per_seed"]["0"]["accuracy"] <= hi
        assert set(c["bootstrap95"]) == {"accuracy", "bleu4", "rouge_l", "meteor"}
        for key in ("rouge_l", "meteor"):  # means of per-answer scores: inside their interval
            lo, hi = c["bootstrap95"][key]
            assert lo - 1e-9 <= c["per_seed"]["0"][key] <= hi + 1e-9, (name, key)
        assert c["bootstrap95"]["bleu4"][0] <= c["bootstrap95"]["bleu4"][1]
    # greedy: the real ECG gives the same answers under both seeds (std 0)
    assert result["conditions"]["ecg"]["summary"]["accuracy"]["std"] == 0.0
    for name in ("zeros", "text_only", "noise:snr=5"):
        u = result["ecg_utilisation"][name]
        want = (
            result["conditions"]["ecg"]["summary"]["accuracy"]["mean"]
            - result["conditions"][name]["summary"]["accuracy"]["mean"]
        )
        assert u["drop"]["accuracy"] == pytest.approx(want)
        assert 0.0 < u["accuracy_p_value"] <= 1.0
    assert (
        result["accuracy_without_ecg"]
        == result["conditions"]["text_only"]["summary"]["accuracy"]["mean"]
    )
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["ecg_utilisation"].keys() == result["ecg_utilisation"].keys()


def test_the_cli_reads_the_run_config_and_refuses_bad_conditions(run):
    _, workdir, _, _ = run
    cmd = [sys.executable, "-m", "elmjax.evaluate", f"--workdir={workdir}", "--limit=4"]
    ok = subprocess.run(
        [*cmd, "--ablate=zeros", "--nobertscore"], cwd=REPO, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "zeros" in ok.stdout and "acc. drop" in ok.stdout
    bad = subprocess.run([*cmd, "--ablate=blank"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown --ablate ['blank']" in bad.stderr
