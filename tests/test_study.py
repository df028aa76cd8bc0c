"""python -m elmjax.study: the grid, the paired tests on data with a known answer, and a small
sweep end to end (train, evaluate, report with every table and plot)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from elmjax import study
from elmjax.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_the_demo_grid_and_each_runs_settings(tmp_path):
    sweep = load_config("sweeps/paper:demo")
    points = study.grid(sweep)
    assert [p.name for p in points] == [  # rows in name order (a ConfigDict sorts its keys)
        "image_vit_Tcfg_L625",
        "image_vit_Tcfg_L1250",
        "signal_stmem_Tcfg_L625",
        "signal_stmem_Tcfg_L1250",
        "symbolic_T256_L625",
        "symbolic_T512_L625",
        "symbolic_T256_L1250",
        "symbolic_T512_L1250",
    ]
    cfg = study.run_config(sweep, points[6], tmp_path)
    assert (cfg.budget, cfg.data.seg_len, cfg.data.target_fs) == (256, 1250, 125.0)
    assert cfg.data.root == str(tmp_path / "data") and cfg.train.steps == 120
    assert cfg.eval.ablate == "zeros,shuffled,text_only" and not cfg.eval.after_training
    signal = study.run_config(sweep, points[2], tmp_path)
    assert signal.budget == load_config("signal_stmem_1024:demo").budget  # T is not swept
    assert signal.workdir == str(tmp_path / "runs" / "signal_stmem_Tcfg_L625")


def test_the_paper_sweep_pretrains_the_signal_encoders_first(tmp_path):
    sweep = load_config("sweeps/paper")
    points = study.grid(sweep)
    assert len(points) == 2 * (4 + 7)  # symbolic x 4 budgets + 7 other rows, x 2 lengths
    mtae = next(p for p in points if p.row == "signal_mtae" and p.seg_len == 2500)
    cfg = study.run_config(sweep, mtae, tmp_path)
    assert cfg.encoder.checkpoint == str(tmp_path / "runs" / "pretrain_mtae_L2500" / "encoder")
    pre = study.pretrain_config(sweep, mtae, tmp_path)
    assert (pre.data.seg_len, pre.data.target_fs) == (2500, 250.0)
    clip = next(p for p in points if p.row == "image_clip")
    assert "encoder.checkpoint" not in study.run_overrides(sweep, clip, tmp_path)
    assert cfg.eval.seeds == "0,1,2,3,4" and cfg.eval.temperature == 0.6


def fake_result(row, correct, seg_len=1250, budget=None):
    """A Result whose real-ECG answers are right where ``correct`` says."""
    preds = [
        {
            "example_id": f"ex{i}",
            "answer": 0,
            "condition": "ecg",
            "seed": 0,
            "reference": "yes",
            "prediction": "yes" if ok else "no",
        }
        for i, ok in enumerate(correct)
    ]
    return study.Result(study.Point(row, "x", budget, seg_len), {}, preds)


def test_paired_tests_find_the_better_representation():
    sweep = load_config("sweeps/paper:demo")
    good = fake_result("symbolic", [True] * 36 + [False] * 4, budget=512)
    bad = fake_result("signal_stmem", [True] * 12 + [False] * 28)
    same = fake_result("image_vit", [True] * 12 + [False] * 28)
    other_len = fake_result("image_clip", [True] * 40, seg_len=625)
    off_budget = fake_result("symbolic", [False] * 40, budget=256)
    tests = study.significance(sweep, [good, bad, same, other_len, off_budget], 2000)
    acc = {(t["a"], t["b"]): t for t in tests if t["metric"] == "accuracy"}
    assert set(acc) == {
        ("signal_stmem", "symbolic"),
        ("image_vit", "symbolic"),
        ("image_vit", "signal_stmem"),
    }  # one segment length, the symbolic row at main_budget only
    t = acc[("signal_stmem", "symbolic")]
    assert t["mean_diff"] == pytest.approx(-60.0) and t["p_value"] < 0.001
    assert t["winner"] == "symbolic" and t["answers"] == 40
    assert acc[("image_vit", "signal_stmem")]["p_value"] == 1.0
    assert acc[("image_vit", "signal_stmem")]["winner"] is None
    table = study.wins(tests)
    assert list(table)[0] == "symbolic"
    assert table["symbolic"] == {"comparisons": 8, "wins": 8, "losses": 0}
    assert table["image_vit"]["wins"] == 0 and table["image_vit"]["losses"] == 4


def tiny_sweep(tmp_path):
    sweep = load_config("sweeps/paper:demo")
    sweep.rows = {"symbolic": "ecgbyte_1024:demo", "signal_stmem": "signal_stmem_1024:demo"}
    sweep.budgets = (128, 256)
    sweep.main_budget = 256
    sweep.seg_lens = (1250,)
    sweep.limit = 12
    sweep.bertscore = False
    sweep.perturb = "noise:snr=10"
    sweep.seeds = "0,1"
    sweep.overrides = {
        "data": {"generate_ecgs": 30, "root": "", "workers": 1, "max_examples": {"train": 64}},
        "text": {"train_vocab_size": 400},
        "ecg_tokenizer": {"num_merges": 40},
        "model": {
            "random": {
                "hidden_size": 32,
                "num_layers": 1,
                "num_heads": 2,
                "num_kv_heads": 1,
                "head_dim": 16,
                "intermediate_size": 64,
            }
        },
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_every": 0},
    }
    return sweep


def test_a_small_sweep_runs_and_reports_every_table_and_plot(tmp_path):
    sweep = tiny_sweep(tmp_path)
    report = study.run_study(sweep, tmp_path)
    text = report.read_text()
    for heading in (
        "## 1. Main results",
        "## 2. Paired significance tests",
        "Significant wins per representation",
        "## 3. ECG utilisation",
        "## 4. Robustness to perturbations",
        "## 5. Scaling",
    ):
        assert heading in text, heading
    for run in ("symbolic, T=128", "symbolic, T=256", "signal_stmem"):
        assert f"| {run} | 1250 |" in text
    assert "± " in text  # two seeds: t-intervals
    for png in ("utilisation", "robustness", "budget", "segment_length"):
        assert (tmp_path / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    tests = json.loads((tmp_path / "significance.json").read_text())
    assert {(t["a"], t["b"]) for t in tests} == {("signal_stmem", "symbolic")}
    # the same command again runs nothing and rewrites the same report
    log = tmp_path / "runs" / "symbolic_T128_L1250" / "eval" / "study_stamp.json"
    before = log.stat().st_mtime_ns
    assert study.run_study(sweep, tmp_path).read_text() == text
    assert log.stat().st_mtime_ns == before


def test_the_cli_refuses_unknown_rows(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "elmjax.study",
        "--sweep=configs/sweeps/paper.py:demo",
        f"--workdir={tmp_path}",
        "--only=signal_ecgfm",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert "--only ['signal_ecgfm']: not in the sweep" in out.stderr
