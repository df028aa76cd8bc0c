"""The built-in demo runs end to end on a small corpus and is resumable."""

import json

from elmjax import demo


def test_demo_end_to_end_and_rerun(tmp_path, capsys):
    workdir = tmp_path / "demo"
    args = ["--workdir", str(workdir), "--num-ecgs", "12", "--seed", "3", "--workers", "1"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["ecgs"] == 12
    assert summary["segments"] == 12  # one 10-s lead-II segment per record (demo config)
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
