"""The built-in demo runs end to end on a small corpus and is resumable."""

import json

from elmjax import demo, train
from elmjax.config import load_config


def test_demo_end_to_end_and_rerun(tmp_path, capsys):
    workdir = tmp_path / "demo"
    args = ["--workdir", str(workdir), "--num-ecgs", "12", "--seed", "3", "--workers", "1"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["ecgs"] == 12
    assert summary["segments"] == 12  # one 10-s segment per record (demo config: lead V1)
    assert sum(s["examples"] for s in summary["prepared"].values()) > 0
    assert summary["records_skipped"] == 0
    assert sum(summary["ecgs_per_split"].values()) == 12
    assert sum(summary["findings"][k] for k in summary["findings"] if k.startswith("rhythm:")) == 12
    for png in summary["plots"]:
        data = open(png, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert len(summary["plots"]) == 2
    assert "[4/4] plots:" in out

    # A second run reuses the corpus and every preprocessed chunk.
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "reusing the synthetic corpus" in out
    report = json.loads((workdir / "ecgbyte" / "segments" / "report.json").read_text())
    assert report["counts"]["chunks_processed_this_run"] == 0
    assert json.loads((workdir / "summary.json").read_text())["segments"] == 12


def test_reduced_demo_training_reads_the_ecg(tmp_path):
    """`make demo` in small: a few hundred steps on a small synthetic set, then the test split
    with and without the ECG. The answers are class-balanced, so without the ECG the model sits
    at chance; with it, it must do clearly better."""
    cfg = load_config("ecgbyte_1024:demo")
    cfg.data.root = str(tmp_path / "data")
    cfg.data.generate_ecgs = REDUCED_ECGS
    cfg.data.attributes = REDUCED_FINDINGS
    cfg.data.template_ids = (1, 8)  # yes/no per finding, "which bundle branch block?"
    cfg.budget = 384
    cfg.model.random.num_layers = 2  # the yes/no BBB questions need no third layer
    cfg.train.batch_size = 8
    cfg.train.steps = 200
    cfg.train.warmup_steps = 20
    cfg.train.eval_every = 0
    cfg.train.checkpoint_every = 1000
    train.train(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
    assert metrics["answers"] >= 60
    by_finding = metrics["conditions"]["ecg"]["per_seed"]["0"]["accuracy_by_type"]
    assert set(by_finding) >= {"complete left bundle branch block", "conduction"}
    # measured: 66.7 % with the ECG, 43.2 % without (81 answers; one standard error is ~5.5)
    assert metrics["accuracy"] >= metrics["accuracy_without_ecg"] + 12, metrics
    # another patient's ECG costs what no ECG costs: the answers come from the ECG
    assert metrics["ecg_utilisation"]["shuffled"]["drop"]["accuracy"] >= 12, metrics
    assert (tmp_path / "run" / "eval" / "test" / "accuracy.png").stat().st_size > 10_000


REDUCED_ECGS = 800
REDUCED_FINDINGS = ("complete right bundle branch block", "complete left bundle branch block")
