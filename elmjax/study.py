"""The representation study: a sweep of runs, their evaluations, one report with tables and plots.

    python -m elmjax.study --sweep=configs/sweeps/paper.py[:demo] --workdir=DIR
        [--only=ROW_OR_RUN,...] [--report_only] [--launch="launch/local_multiprocess.sh 2"]
        [--dry_run] [--sweep.FIELD=VALUE ...]

Runs every point of the sweep's grid (``configs/sweeps/paper.py`` documents the grid), each in
``DIR/runs/<row>_T<budget>_L<seg_len>``: (pretraining of a 2-stage encoder when the sweep asks
for one, in ``DIR/runs/pretrain_<encoder>_L<seg_len>``), training, and evaluation on the test
split under the real ECG, the ablations and the perturbations over the sweep's seeds
(:func:`elmjax.evaluate.evaluate_run`). A point whose evaluation is already written with the
same settings is not run again, and an interrupted one resumes from its checkpoint, so the same
command finishes a sweep. ``--launch`` trains through a launcher (``launch/``) instead of in
this process (each run's command line is that launcher followed by ``--config=...
--workdir=... --config.KEY=VALUE ...``); evaluation then runs here.

Then it writes ``DIR/report.md`` and its PNG plots from every evaluated point:

1. main results: each run's metrics (mean +- the 95 % t-interval over seeds; with one seed, the
   bootstrap 95 % interval of the accuracy over answers);
2. significance: every pair of representation rows at the same segment length (the symbolic
   row at ``main_budget``), paired permutation tests on per-answer scores (exact match,
   sentence BLEU, ROUGE-L, METEOR; the mean over seeds of each answer), and each row's count
   of significant wins (``p < alpha`` and better on average);
3. ECG utilisation: accuracy with the real ECG, a flat-line one, another patient's and none,
   and the drops (``utilisation.png``);
4. robustness: accuracy under each perturbation and its drop (``robustness.png``);
5. scaling: accuracy against the token budget T (``budget.png``) and against the segment
   length (``segment_length.png``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from elmjax import evaluate, metrics
from elmjax.config import CONFIG_DIR, load_config

PAIRED_METRICS = (  # per-answer score -> its name in the report
    ("exact_match", "accuracy"),
    ("bleu", "sentence BLEU"),
    ("rouge_l", "ROUGE-L"),
    ("meteor", "METEOR"),
)
REPORT_METRICS = (
    ("accuracy", "Accuracy"),
    ("bleu4", "BLEU-4"),
    ("rouge_l", "ROUGE-L"),
    ("meteor", "METEOR"),
    ("bertscore_f1", "BERTScore F1"),
)


class StudyError(ValueError):
    """A sweep that cannot run as configured."""


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep."""

    row: str  # the sweep's row name ("symbolic", "signal_stmem", ...)
    config: str  # its run config, "ecgbyte_1024:demo"
    budget: int | None  # T (symbolic rows; None: the config's own)
    seg_len: int

    @property
    def name(self) -> str:
        return f"{self.row}_T{self.budget or 'cfg'}_L{self.seg_len}"


def grid(sweep: ml_collections.ConfigDict) -> list[Point]:
    """Every point: each row x segment length, x budget for symbolic rows."""
    points = []
    for row, config in sweep.rows.items():
        symbolic = load_config(config).representation == "symbolic"
        budgets = list(sweep.budgets) if symbolic else [None]
        for seg_len, budget in itertools.product(sweep.seg_lens, budgets):
            points.append(Point(row, config, budget, int(seg_len)))
    return points


def _set(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    node = cfg
    *path, leaf = key.split(".")
    for part in path:
        if part not in node:
            raise StudyError(f"override {key}: the config has no {part!r}")
        node = node[part]
    node[leaf] = value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b": value}``."""
    if not hasattr(tree, "items"):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= flatten(value, f"{prefix}{key}.")
    return out


def _shared_root(key: str, value: Any, study_dir: Path) -> Any:
    return str(study_dir / "data") if key == "data.root" and value == "" else value


def run_overrides(
    sweep: ml_collections.ConfigDict, point: Point, study_dir: Path
) -> dict[str, Any]:
    """The config fields a point sets (``--config.KEY=VALUE`` of its command line)."""
    out: dict[str, Any] = {}
    for key, value in flatten(sweep.overrides).items():
        out[key] = _shared_root(key, value, study_dir)
    out["data.seg_len"] = point.seg_len
    out["data.target_fs"] = float(sweep.target_fs)
    if point.budget is not None:
        out["budget"] = int(point.budget)
    out |= {
        "eval.after_training": False,
        "eval.split": sweep.split,
        "eval.ablate": sweep.ablate,
        "eval.perturb": sweep.perturb,
        "eval.seeds": str(sweep.seeds),
        "eval.temperature": float(sweep.temperature),
        "eval.top_p": float(sweep.top_p),
        "eval.limit": int(sweep.limit),
        "eval.bertscore": bool(sweep.bertscore),
        "eval.bertscore_model": sweep.bertscore_model,
        "eval.paper_compat": bool(sweep.paper_compat),
    }
    if point.row in sweep.pretrain:
        out["encoder.checkpoint"] = str(pretrain_dir(sweep, point, study_dir) / "encoder")
    return out


def run_config(
    sweep: ml_collections.ConfigDict, point: Point, study_dir: Path
) -> ml_collections.ConfigDict:
    """A point's run config: its row's config with the sweep's and the point's settings."""
    cfg = load_config(point.config)
    for key, value in run_overrides(sweep, point, study_dir).items():
        _set(cfg, key, value)
    cfg.workdir = str(study_dir / "runs" / point.name)
    return cfg


def pretrain_dir(sweep: ml_collections.ConfigDict, point: Point, study_dir: Path) -> Path:
    return study_dir / "runs" / f"{sweep.pretrain[point.row]}_L{point.seg_len}"


def pretrain_config(
    sweep: ml_collections.ConfigDict, point: Point, study_dir: Path
) -> ml_collections.ConfigDict:
    """Stage 1 of a 2-stage row: its pretraining config at the point's segment length."""
    cfg = load_config(sweep.pretrain[point.row])
    cfg.data.seg_len = point.seg_len
    cfg.data.target_fs = float(sweep.target_fs)
    overrides = flatten(sweep.overrides)
    for key in ("data.root", "data.generate_ecgs"):
        if key in overrides:
            _set(cfg, key, _shared_root(key, overrides[key], study_dir))
    cfg.workdir = str(pretrain_dir(sweep, point, study_dir))
    return cfg


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def _stamp(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """What an evaluation must have been made with to be reused."""
    return json.loads(cfg.to_json_best_effort())


def is_done(cfg: ml_collections.ConfigDict) -> bool:
    """A point's evaluation exists and was made from this very config."""
    stamp = Path(cfg.workdir) / "eval" / "study_stamp.json"
    return stamp.exists() and json.loads(stamp.read_text()) == _stamp(cfg)


def launch_command(launch: str, point: Point, overrides: dict[str, Any], workdir: Path) -> list:
    name, _, arg = point.config.partition(":")
    path = name if name.endswith(".py") else f"{CONFIG_DIR / name}.py"
    cmd = [
        *shlex.split(launch),
        f"--config={path}{':' + arg if arg else ''}",
        f"--workdir={workdir}",
    ]
    for key, value in overrides.items():
        cmd.append(f"--config.{key}={value}")
    return cmd


def run_point(
    sweep: ml_collections.ConfigDict,
    point: Point,
    study_dir: Path,
    *,
    launch: str = "",
    dry_run: bool = False,
) -> str:
    """Pretrains (2-stage rows), trains and evaluates one point; returns what it did."""
    from elmjax import pretrain, train  # noqa: PLC0415 (jax-heavy; the report needs neither)

    cfg = run_config(sweep, point, study_dir)
    if is_done(cfg):
        return "done before"
    workdir = Path(cfg.workdir)
    overrides = run_overrides(sweep, point, study_dir)
    if dry_run:
        cmd = launch_command(launch or "python -m elmjax.train", point, overrides, workdir)
        print(shlex.join(cmd))
        return "dry run"
    if point.row in sweep.pretrain:
        pcfg = pretrain_config(sweep, point, study_dir)
        if not (Path(pcfg.workdir) / "encoder").exists():
            print(f"=== {point.name}: pretraining {sweep.pretrain[point.row]} -> {pcfg.workdir}")
            pretrain.pretrain(pcfg, pcfg.workdir)
    print(f"=== {point.name}: training -> {workdir}")
    if launch:
        result = subprocess.run(launch_command(launch, point, overrides, workdir), check=False)
        if result.returncode != 0:
            raise StudyError(f"{point.name}: the launcher exited with {result.returncode}")
    else:
        train.train(cfg, workdir)
    print(f"=== {point.name}: evaluating")
    model, _ = train.load_trained(cfg, workdir)
    evaluate.evaluate_run(model, cfg, workdir, sweep.split, **evaluate.eval_settings(cfg))
    (workdir / "eval" / "study_stamp.json").write_text(json.dumps(_stamp(cfg)))
    return "ran"


# ----------------------------------------------------------------------------------------------
# Collecting
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """An evaluated point: its metrics and its per-answer predictions."""

    point: Point
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]

    @property
    def representation(self) -> str:
        return self.point.row

    def scores(self, condition: str = "ecg") -> dict[tuple[str, int], dict[str, float]]:
        """Per answer (example id, answer index): each per-answer score, mean over seeds."""
        rows = [p for p in self.predictions if p["condition"] == condition]
        if not rows:
            return {}
        per = metrics.per_example_scores(
            [p["prediction"] for p in rows], [p["reference"] for p in rows]
        )
        sums: dict[tuple[str, int], dict[str, list[float]]] = {}
        for i, p in enumerate(rows):
            entry = sums.setdefault((p["example_id"], p["answer"]), {})
            for key, _ in PAIRED_METRICS:
                entry.setdefault(key, []).append(float(per[key][i]))
        return {k: {m: float(np.mean(v)) for m, v in d.items()} for k, d in sums.items()}


def collect(sweep: ml_collections.ConfigDict, study_dir: Path) -> list[Result]:
    """Every point of the grid that has an evaluation."""
    out = []
    for point in grid(sweep):
        d = study_dir / "runs" / point.name / "eval" / sweep.split
        if not (d / "metrics.json").exists():
            continue
        with open(d / "predictions.jsonl") as f:
            predictions = [json.loads(line) for line in f if line.strip()]
        out.append(Result(point, json.loads((d / "metrics.json").read_text()), predictions))
    return out


# ----------------------------------------------------------------------------------------------
# Statistics between representations
# ----------------------------------------------------------------------------------------------


def main_points(sweep: ml_collections.ConfigDict, results: Sequence[Result]) -> list[Result]:
    """The results compared across representations: each row's run at ``main_budget`` (or
    its own budget), per segment length."""
    return [r for r in results if r.point.budget in (None, sweep.main_budget)]


def significance(
    sweep: ml_collections.ConfigDict, results: Sequence[Result], n_permutations: int = 10000
) -> list[dict[str, Any]]:
    """Paired permutation tests between every two rows at each segment length, per metric,
    on the answers both evaluated (see the module docstring)."""
    tests = []
    by_len: dict[int, list[Result]] = {}
    for r in main_points(sweep, results):
        by_len.setdefault(r.point.seg_len, []).append(r)
    for seg_len, group in sorted(by_len.items()):
        scores = {r.representation: r.scores() for r in group}
        for a, b in itertools.combinations(sorted(scores), 2):
            keys = sorted(set(scores[a]) & set(scores[b]))
            if len(keys) < 2:
                continue
            for key, name in PAIRED_METRICS:
                xa = np.asarray([scores[a][k][key] for k in keys])
                xb = np.asarray([scores[b][k][key] for k in keys])
                t = metrics.paired_permutation_test(xa, xb, n_permutations=n_permutations)
                significant = t["p_value"] < sweep.alpha and t["mean_diff"] != 0
                winner = (a if t["mean_diff"] > 0 else b) if significant else None
                tests.append(
                    {
                        "seg_len": seg_len,
                        "a": a,
                        "b": b,
                        "metric": name,
                        "answers": len(keys),
                        "mean_diff": t["mean_diff"],
                        "p_value": t["p_value"],
                        "winner": winner,
                    }
                )
    return tests


def wins(tests: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per row: comparisons it took part in, won and lost (significantly)."""
    out: dict[str, dict[str, int]] = {}
    for t in tests:
        for side in (t["a"], t["b"]):
            entry = out.setdefault(side, {"comparisons": 0, "wins": 0, "losses": 0})
            entry["comparisons"] += 1
            if t["winner"] == side:
                entry["wins"] += 1
            elif t["winner"] is not None:
                entry["losses"] += 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1]["wins"], kv[1]["losses"])))


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def _cell(result: Result, metric: str, condition: str = "ecg") -> str:
    c = result.metrics["conditions"].get(condition)
    if c is None or metric not in c["summary"]:
        return "-"
    s = c["summary"][metric]
    if s["n"] > 1 and s["ci95"] is not None:
        return f"{s['mean']:.1f} ± {s['ci95']:.1f}"
    if metric == "accuracy":
        lo, hi = c["accuracy_bootstrap95"]
        return f"{s['mean']:.1f} [{lo:.1f}, {hi:.1f}]"
    return f"{s['mean']:.1f}"


def _accuracy(result: Result, condition: str) -> float:
    c = result.metrics["conditions"].get(condition)
    return float("nan") if c is None else c["summary"]["accuracy"]["mean"]


def _label(result: Result) -> str:
    p = result.point
    return f"{p.row}, T={p.budget}" if p.budget is not None else p.row


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]


def plot_lines(
    results: Sequence[Result], x_of, line_of, x_label: str, title: str, path: Path
) -> None:
    """Accuracy (real ECG) against ``x_of(point)``, one line per ``line_of(point)``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        lines.setdefault(line_of(r.point), []).append((x_of(r.point), _accuracy(r, "ecg")))
    for name, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xticks(sorted({p[0] for pts in lines.values() for p in pts}))
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_conditions(results: Sequence[Result], conditions: Sequence[str], title: str, path: Path):
    """Grouped bars: accuracy of each main run under each condition."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = [f"{_label(r)}\nL={r.point.seg_len}" for r in results]
    x = np.arange(len(results))
    width = 0.8 / max(len(conditions), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(results) + 2), 4.2))
    for j, cond in enumerate(conditions):
        ax.bar(
            x - 0.4 + (j + 0.5) * width,
            [_accuracy(r, cond) for r in results],
            width,
            label=cond,
        )
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=min(len(conditions), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    sweep: ml_collections.ConfigDict, study_dir: Path, results: Sequence[Result]
) -> Path:
    """``DIR/report.md`` and its plots (see the module docstring)."""
    if not results:
        raise StudyError(f"{study_dir}: no evaluated run to report on")
    main = main_points(sweep, results)
    tests = significance(sweep, results)
    first = results[0].metrics
    seeds = first["seeds"]
    decoding = first["decoding"]
    how = (
        "greedy"
        if not decoding["temperature"]
        else f"sampled (temperature {decoding['temperature']}, top-p {decoding['top_p']})"
    )
    lines = [
        f"# Representation study: {sweep.name}",
        "",
        f"{len(results)} runs evaluated on the {sweep.split} split ({first['answers']} answers "
        f"per run), {len(seeds)} seed(s) {list(seeds)}, {how} decoding, {first['recipe']} "
        f"metrics. Values are x100. "
        + (
            "Cells: mean ± the half-width of the 95 % Student-t interval over seeds."
            if len(seeds) > 1
            else "One seed: accuracy cells show the bootstrap 95 % interval over answers."
        ),
        "",
        "## 1. Main results (real ECG)",
        "",
    ]
    header = ["run", "segment"] + [n for k, n in REPORT_METRICS if k in _summary_keys(results)]
    keys = [k for k, _ in REPORT_METRICS if k in _summary_keys(results)]
    rows = [
        [_label(r), str(r.point.seg_len)] + [_cell(r, k) for k in keys]
        for r in sorted(results, key=lambda r: (r.point.seg_len, r.point.row, r.point.budget or 0))
    ]
    lines += _table(header, rows)

    lines += [
        "",
        "## 2. Paired significance tests between representations",
        "",
        f"Runs compared: each row at T = {sweep.main_budget} (symbolic) or its own budget, at "
        "each segment length, on the answers both evaluated (real ECG; each answer's score "
        "averaged over seeds). Two-sided paired sign-flip permutation test (10,000 "
        f"permutations); significant: p < {sweep.alpha}.",
        "",
    ]
    if tests:
        lines += _table(
            ["segment", "A", "B", "metric", "answers", "mean A − B", "p", "significant win"],
            [
                [
                    t["seg_len"],
                    t["a"],
                    t["b"],
                    t["metric"],
                    t["answers"],
                    f"{t['mean_diff']:+.2f}",
                    f"{t['p_value']:.4f}",
                    t["winner"] or "-",
                ]
                for t in tests
            ],
        )
        lines += ["", "Significant wins per representation:", ""]
        lines += _table(
            ["representation", "comparisons", "wins", "losses"],
            [[k, v["comparisons"], v["wins"], v["losses"]] for k, v in wins(tests).items()],
        )
    else:
        lines.append("(fewer than two representations evaluated at one segment length)")

    ablations = ["ecg"] + [a for a in sweep.ablate.split(",") if a]
    lines += [
        "",
        "## 3. ECG utilisation",
        "",
        "Accuracy with the real ECG, a flat-line ECG (`zeros`), another patient's ECG "
        "(`shuffled`) and no ECG (`text_only`); a model that reads the ECG loses accuracy "
        "without it. Drop = real − ablated; p: paired permutation test of the per-answer "
        "exact match (first seed).",
        "",
    ]
    rows = []
    for r in main:
        row = [_label(r), r.point.seg_len] + [f"{_accuracy(r, c):.1f}" for c in ablations]
        for c in ablations[1:]:
            u = r.metrics["ecg_utilisation"].get(c)
            row.append(
                f"{u['drop']['accuracy']:+.1f} (p={u['accuracy_p_value']:.3f})" if u else "-"
            )
        rows.append(row)
    lines += _table(["run", "segment", *ablations, *[f"drop {c}" for c in ablations[1:]]], rows)
    lines += ["", "![ECG utilisation](utilisation.png)"]
    plot_conditions(main, ablations, "ECG utilisation", study_dir / "utilisation.png")

    perturbations = [p for p in sweep.perturb.split(",") if p]
    if perturbations:
        lines += [
            "",
            "## 4. Robustness to perturbations",
            "",
            "Accuracy when the test ECGs are perturbed (`elmjax.ecg.perturb`, seeded per answer)"
            " and the drop from the clean ECG.",
            "",
        ]
        rows = []
        for r in main:
            row = [_label(r), r.point.seg_len, f"{_accuracy(r, 'ecg'):.1f}"]
            row += [
                f"{_accuracy(r, p):.1f} ({_accuracy(r, p) - _accuracy(r, 'ecg'):+.1f})"
                for p in perturbations
            ]
            rows.append(row)
        lines += _table(["run", "segment", "clean", *perturbations], rows)
        lines += ["", "![robustness](robustness.png)"]
        plot_conditions(main, ["ecg", *perturbations], "Robustness", study_dir / "robustness.png")

    lines += ["", "## 5. Scaling", ""]
    plot_lines(
        [r for r in results if r.point.budget is not None],
        lambda p: p.budget,
        lambda p: f"{p.row} (L={p.seg_len})",
        "token budget T",
        "Accuracy vs token budget (symbolic)",
        study_dir / "budget.png",
    )
    plot_lines(
        main,
        lambda p: p.seg_len / float(sweep.target_fs),
        lambda p: p.row,
        "ECG segment length (s)",
        "Accuracy vs segment length",
        study_dir / "segment_length.png",
    )
    lines += [
        "![accuracy vs token budget](budget.png)",
        "",
        "![accuracy vs segment length](segment_length.png)",
        "",
        "Per-run details (per seed, per finding, bootstrap intervals): "
        "`runs/<run>/eval/<split>/metrics.json`; every answer: `predictions.jsonl`.",
        "",
    ]
    path = study_dir / "report.md"
    path.write_text("\n".join(lines))
    (study_dir / "significance.json").write_text(json.dumps(tests, indent=1))
    return path


def _summary_keys(results: Sequence[Result]) -> set[str]:
    return set(results[0].metrics["conditions"]["ecg"]["summary"])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def run_study(
    sweep: ml_collections.ConfigDict,
    study_dir: str | Path,
    *,
    only: Sequence[str] = (),
    report_only: bool = False,
    launch: str = "",
    dry_run: bool = False,
) -> Path | None:
    """Runs the sweep's points not done yet (``only``: rows or run names), then the report."""
    study_dir = Path(study_dir)
    points = grid(sweep)
    if only:
        unknown = set(only) - {p.row for p in points} - {p.name for p in points}
        if unknown:
            raise StudyError(
                f"--only {sorted(unknown)}: not in the sweep; rows {sorted(sweep.rows)}, runs "
                f"{[p.name for p in points]}"
            )
        points = [p for p in points if p.row in only or p.name in only]
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "sweep.json").write_text(sweep.to_json_best_effort(indent=1))
    if not report_only:
        for i, point in enumerate(points):
            print(f"[{i + 1}/{len(points)}] {point.name}")
            status = run_point(sweep, point, study_dir, launch=launch, dry_run=dry_run)
            print(f"[{i + 1}/{len(points)}] {point.name}: {status}")
    if dry_run:
        return None
    return write_report(sweep, study_dir, collect(sweep, study_dir))


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _SWEEP.value is None:
        raise app.UsageError("--sweep=configs/sweeps/X.py[:arg] is required")
    only = [x for x in _ONLY.value.split(",") if x]
    from elmjax.train import enable_compilation_cache  # noqa: PLC0415

    enable_compilation_cache()
    try:
        path = run_study(
            _SWEEP.value,
            _WORKDIR.value,
            only=only,
            report_only=_REPORT_ONLY.value,
            launch=_LAUNCH.value,
            dry_run=_DRY_RUN.value,
        )
    except (StudyError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    from absl import app, flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    _SWEEP = config_flags.DEFINE_config_file(
        "sweep", None, "configs/sweeps/X.py[:arg]", lock_config=False
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "study directory (runs/, report.md)")
    flags.mark_flag_as_required("workdir")
    _ONLY = flags.DEFINE_string("only", "", "comma-separated rows or run names to run")
    _REPORT_ONLY = flags.DEFINE_bool("report_only", False, "only (re)write the report")
    _LAUNCH = flags.DEFINE_string("launch", "", "train through this launcher (launch/...)")
    _DRY_RUN = flags.DEFINE_bool("dry_run", False, "print each run's command, run nothing")
    app.run(main)
