"""Tests of the ECG-Byte tokenizer: exact discretisation, BPE training against a naive trainer,
both encoding modes against naive encoders, files, the reference pickle import and the CLI."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from elmjax.tokenize import ecgbyte as eb
from elmjax.tokenize.ecgbyte import ECGByteTokenizer, TokenizerFileError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Naive reference implementations (pure Python, obviously correct, slow)
# ----------------------------------------------------------------------------------------------


def naive_train(seqs, num_merges, min_frequency=2, num_symbols=26):
    """Recounts every adjacent pair of every sequence at each merge; highest count, then the
    smallest (left, right); merges left to right inside each sequence only."""
    seqs = [[int(v) for v in s] for s in seqs]
    merges = []
    for m in range(num_merges):
        counts: dict[tuple[int, int], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        (a, b), count = max(counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
        if count < min_frequency:
            break
        merges.append((a, b))
        seqs = [naive_merge(s, a, b, num_symbols + m) for s in seqs]
    return np.array(merges, np.int32).reshape(-1, 2)


def naive_merge(seq, a, b, c):
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
            out.append(c)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def naive_bpe_encode(seq, merges, num_symbols=26):
    """Applies every merge in order, left to right, to the whole sequence."""
    seq = [int(v) for v in seq]
    for i, (a, b) in enumerate(merges):
        seq = naive_merge(seq, int(a), int(b), num_symbols + i)
    return np.array(seq, np.int32)


def naive_greedy(text, tokens):
    """Greedy longest match over a dict trie of ``tokens`` (str -> id; the last id of a repeated
    string wins)."""
    root: dict = {}
    for string, token_id in tokens.items():
        node = root
        for ch in string:
            node = node.setdefault(ch, {})
        node[None] = token_id
    out, i = [], 0
    while i < len(text):
        node, best, best_len = root, None, 0
        for j in range(i, len(text)):
            node = node.get(text[j])
            if node is None:
                break
            if None in node:
                best, best_len = node[None], j - i + 1
        out.append(best)
        i += best_len
    return out


def reference_style_train(texts, num_merges):
    """The reference's trainer in the reference's shape: all texts concatenated with no
    separator, byte ids (256 + i for merge i), full recount each merge (ties: smallest pair).
    Returns ``(vocab, merges)`` as pickled in ``tokenizer_5000_300000.pkl``."""
    seq = list("".join(texts).encode())
    vocab = {i: chr(i) for i in range(256)}
    merges = []
    for m in range(num_merges):
        counts: dict[tuple[int, int], int] = {}
        for pair in zip(seq, seq[1:], strict=False):
            counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        (a, b), count = max(counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
        if count < 2:
            break
        new = 256 + m
        vocab[new] = vocab[a] + vocab[b]
        merges.append((vocab[new], new))
        seq = naive_merge(seq, a, b, new)
    return vocab, merges


def random_walk_symbols(rng, shape, step=2):
    """ECG-like uint8 symbols: a clipped random walk along the last axis."""
    start = rng.integers(8, 18, shape[:-1] + (1,))
    walk = start + np.cumsum(rng.integers(-step, step + 1, shape), axis=-1)
    return np.clip(walk, 0, 25).astype(np.uint8)


def sym(text):
    return eb.text_to_symbols(text)[None]  # one ECG with one lead


# ----------------------------------------------------------------------------------------------
# Discretisation
# ----------------------------------------------------------------------------------------------


def test_discretise_whole_ecg_exact():
    x = np.array([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])
    d = eb.discretise(x)
    # v = x / (7 + 1e-6); floor(26 v) = 0, 3, 7, 11, 14, 18, 22, 25
    np.testing.assert_array_equal(d.symbols, [[0, 3, 7, 11], [14, 18, 22, 25]])
    assert d.symbols.dtype == np.uint8
    assert d.lo.shape == () and d.hi.shape == () and (d.lo, d.hi) == (0.0, 7.0)


def test_discretise_per_lead_exact():
    x = np.array([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])
    d = eb.discretise(x, per_lead=True)
    # each lead spans 3: floor(26 * k / 3.000001) = 0, 8, 17, 25
    np.testing.assert_array_equal(d.symbols, [[0, 8, 17, 25], [0, 8, 17, 25]])
    np.testing.assert_array_equal(d.lo, [0.0, 4.0])
    np.testing.assert_array_equal(d.hi, [3.0, 7.0])


def test_discretise_batch_shapes_flat_cap_and_nan():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 12, 50)).astype(np.float32)
    assert eb.discretise(x).lo.shape == (3,)
    assert eb.discretise(x, per_lead=True).hi.shape == (3, 12)
    assert eb.discretise(np.full((12, 10), 2.5)).symbols.max() == 0  # flat: all 'a'
    # 1e12 / (1e12 + 1e-6) rounds to exactly 1.0, so floor(26 v) = 26 is capped to 25
    np.testing.assert_array_equal(eb.discretise(np.array([[0.0, 1e12]])).symbols, [[0, 25]])
    with pytest.raises(ValueError, match="NaN"):
        eb.discretise(np.array([[0.0, np.nan, 1.0]]))
    with pytest.raises(ValueError):
        eb.discretise(np.zeros(5))


def test_discretise_centred_exact():
    x = np.array([[-1.0, 0.0, 0.5], [2.0, -0.25, 0.0]])
    d = eb.discretise(x, centred=True)
    # range [-2, 2]: v = (x + 2) / (4 + 1e-6); floor(26 v) = 6, 12, 16 / 25, 11, 12
    np.testing.assert_array_equal(d.symbols, [[6, 12, 16], [25, 11, 12]])
    assert (d.lo, d.hi) == (-2.0, 2.0)
    # per lead: lead 0 spans [-1, 1], lead 1 [-2, 2]
    d = eb.discretise(x, centred=True, per_lead=True)
    np.testing.assert_array_equal(d.symbols, [[0, 12, 19], [25, 11, 12]])
    np.testing.assert_array_equal(d.hi, [1.0, 2.0])
    # the same wave, upright or inverted, keeps its baseline symbol (min-max moves it)
    wave = np.array([[0.0, 0.0, 1.0, 0.2, 0.0]])
    for flipped in (wave, -wave, 3 * wave):
        assert eb.discretise(flipped, centred=True).symbols[0, 0] == 12
    assert eb.discretise(wave).symbols[0, 0] != eb.discretise(-wave).symbols[0, 0]
    flat = eb.discretise(np.zeros((2, 4)), centred=True)
    assert flat.symbols.max() == 0 and (flat.lo, flat.hi) == (0.0, 0.0)  # as min-max
    with pytest.raises(ValueError, match="NaN"):
        eb.discretise(np.array([[0.0, np.nan, 1.0]]), centred=True)


@pytest.mark.parametrize("per_lead", [False, True])
def test_discretise_centred_parallel_equals_numpy(per_lead):
    x = np.random.default_rng(4).normal(size=(64, 12, 500)) + 0.3  # big enough for threads
    axes = (-1,) if per_lead else (-2, -1)
    a = np.abs(x).max(axis=axes, keepdims=True)
    v = np.clip((x + a) / (2 * a + 1e-6), 0, 1)
    expected = np.minimum(np.floor(v * 26), 25).astype(np.uint8)
    d = eb.discretise(x, centred=True, per_lead=per_lead, workers=2)
    np.testing.assert_array_equal(d.symbols, expected)
    err = np.abs(eb.symbols_to_signal(d.symbols, d.lo, d.hi) - x) / ((2 * a + 1e-6) / 26)
    assert err.max() <= 0.5 + 1e-9


def test_centred_tokenizer_encodes_and_saves_its_normalisation(tmp_path):
    rng = np.random.default_rng(5)
    x = np.cumsum(rng.normal(size=(8, 2, 300)), axis=-1)
    symbols = eb.discretise(x, centred=True).symbols
    tok = ECGByteTokenizer.train(symbols, 40, centred_norm=True, progress=False)
    assert tok.settings()["centred_norm"] is True
    ids = tok.encode_signal(x)
    assert all(np.array_equal(a, b) for a, b in zip(ids, tok.encode(symbols), strict=True))
    path = tmp_path / "centred.json"
    tok.save(path)
    loaded = ECGByteTokenizer.load(path)
    assert loaded.centred_norm and loaded.fingerprint() == tok.fingerprint()
    plain = ECGByteTokenizer(tok.merges)
    assert "centred_norm" not in plain.settings()  # min-max files keep their fingerprints
    assert plain.fingerprint() != tok.fingerprint()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("per_lead", [False, True])
def test_discretise_equals_numpy_formula(dtype, per_lead):
    x = (np.random.default_rng(1).normal(size=(5, 12, 300)) * 3).astype(dtype)
    axes = (-1,) if per_lead else (-2, -1)
    x64 = x.astype(np.float64)
    lo = x64.min(axis=axes, keepdims=True)
    hi = x64.max(axis=axes, keepdims=True)
    v = np.clip((x64 - lo) / (hi - lo + 1e-6), 0, 1)
    expected = np.minimum(np.floor(v * 26), 25).astype(np.uint8)
    np.testing.assert_array_equal(eb.discretise(x, per_lead=per_lead).symbols, expected)


@pytest.mark.parametrize("per_lead", [False, True])
def test_symbols_to_signal_error_bound(per_lead):
    x = np.random.default_rng(2).normal(size=(4, 12, 2000))
    d = eb.discretise(x, per_lead=per_lead)
    extra = (1, 1) if not per_lead else (1,)
    width = (d.hi - d.lo + 1e-6).reshape(d.lo.shape + extra) / 26  # one bin
    err = np.abs(eb.symbols_to_signal(d.symbols, d.lo, d.hi) - x) / width
    assert err.max() <= 0.5 + 1e-9  # bin centres: at most half a bin
    assert err.max() > 0.49  # and the bound is tight
    ref = np.abs(eb.symbols_to_signal(d.symbols, d.lo, d.hi, centres=False) - x) / width
    assert 0.9 < ref.max() <= 1.0 + 1e-6  # the reference's decoding: up to a whole bin


def test_text_helpers():
    s = eb.text_to_symbols("azby")
    np.testing.assert_array_equal(s, [0, 25, 1, 24])
    assert eb.symbols_to_text(np.array([[0, 1], [2, 3]], np.uint8)) == "abcd"  # lead-major
    with pytest.raises(ValueError):
        eb.text_to_symbols("aB")
    with pytest.raises(ValueError):
        eb.symbols_to_text(np.array([26]))


def test_round_trip_signal_symbols_ids_signal():
    rng = np.random.default_rng(3)
    train = eb.discretise(np.cumsum(rng.normal(size=(6, 12, 400)), axis=-1)).symbols
    tok = ECGByteTokenizer.train(train, 200, progress=False)
    x = np.cumsum(rng.normal(size=(3, 12, 400)), axis=-1)
    d = eb.discretise(x)
    for mode in eb.MODES:
        ids = tok.encode_signal(x, mode=mode)
        assert [i.dtype for i in ids] == [np.int32] * 3
        for e in range(3):
            symbols = tok.decode(ids[e]).reshape(12, 400)
            np.testing.assert_array_equal(symbols, d.symbols[e])
            back = eb.symbols_to_signal(symbols, d.lo[e], d.hi[e])
            assert np.abs(back - x[e]).max() <= (d.hi[e] - d.lo[e] + 1e-6) / 52 * (1 + 1e-9)


# ----------------------------------------------------------------------------------------------
# BPE training
# ----------------------------------------------------------------------------------------------


def test_train_classic_example():
    # aaabdaaabac -> ZabdZabac (Z=aa) -> ZYdZYac (Y=ab; ties with Za, smaller pair wins)
    # -> XdXac (X=ZY); then every pair occurs once: stop.
    merges = eb.train_bpe(sym("aaabdaaabac"), 10, progress=False)
    np.testing.assert_array_equal(merges, [[0, 0], [0, 1], [26, 27]])
    tok = ECGByteTokenizer(merges)
    assert tok.token_strings[26:] == ["aa", "ab", "aaab"]
    assert tok.vocab_size == 29
    np.testing.assert_array_equal(tok.encode(sym("aaabdaaabac")), [28, 3, 28, 0, 2])


def test_train_ties_are_deterministic():
    # (a,b), (a,c) and (c,d) all occur twice: smallest (left, right) first, in any corpus order
    corpus = [sym("cdcd"), sym("acac"), sym("abab")]
    expected = [[0, 1], [0, 2], [2, 3]]
    np.testing.assert_array_equal(eb.train_bpe(corpus, 10, progress=False), expected)
    np.testing.assert_array_equal(eb.train_bpe(corpus[::-1], 10, progress=False), expected)
    # overlapping windows all count: 'aaa' holds (a,a) twice; merged left to right: aa | a
    merges = eb.train_bpe(sym("aaa"), 5, progress=False)
    np.testing.assert_array_equal(merges, [[0, 0]])
    np.testing.assert_array_equal(ECGByteTokenizer(merges).encode(sym("aaa")), [26, 0])
    merges = eb.train_bpe(sym("a" * 8), 5, progress=False)  # aa x4 -> (aa,aa) x3 -> stop at 1
    np.testing.assert_array_equal(merges, [[0, 0], [26, 26]])
    assert eb.train_bpe(sym("abc"), 5, progress=False).shape == (0, 2)  # nothing occurs twice
    np.testing.assert_array_equal(
        eb.train_bpe(sym("abc"), 5, min_frequency=1, progress=False), [[0, 1], [26, 2]]
    )


@pytest.mark.parametrize("lead_boundaries", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_train_equals_naive_trainer(seed, lead_boundaries):
    rng = np.random.default_rng(seed)
    corpus = random_walk_symbols(rng, (6, 3, 80), step=1 + seed % 2)
    if lead_boundaries:
        seqs = [lead for ecg in corpus for lead in ecg]
    else:
        seqs = [ecg.ravel() for ecg in corpus]
    min_frequency = 1 + seed % 2
    expected = naive_train(seqs, 150, min_frequency=min_frequency)
    got = eb.train_bpe(
        corpus, 150, lead_boundaries=lead_boundaries, min_frequency=min_frequency, progress=False
    )
    np.testing.assert_array_equal(got, expected)


def test_train_handles_ragged_list_and_grows_structures():
    rng = np.random.default_rng(7)
    corpus = [random_walk_symbols(rng, (2, int(n))) for n in rng.integers(1, 300, 12)]
    expected = naive_train([c.ravel() for c in corpus], 400, min_frequency=1)
    np.testing.assert_array_equal(
        eb.train_bpe(corpus, 400, min_frequency=1, progress=False), expected
    )


def test_merges_never_cross_ecg_boundaries():
    # ECG i is 'z', x_i, 'a' (x_i all different): inside ECGs every pair occurs once, while the
    # concatenation the reference trains on holds (a, z) nine times.
    middles = "bcdefghijk"
    corpus = [sym(f"z{m}a") for m in middles]
    concatenated = np.concatenate([c.ravel() for c in corpus])
    assert naive_train([concatenated], 1)[0].tolist() == [0, 25]  # what the reference merges
    merges = eb.train_bpe(corpus, 100, min_frequency=1, progress=False)
    assert len(merges) == 20  # all pairs inside the ECGs, nothing else
    tok = ECGByteTokenizer(merges)
    assert not any("az" in t for t in tok.token_strings)


def test_merges_never_cross_lead_boundaries_when_asked():
    # 2 leads per ECG, lead 0 ends with 'a', lead 1 starts with 'z' (middles all different)
    corpus = np.stack([np.stack([eb.text_to_symbols(f"z{m}a")] * 2) for m in "bcdefghijk"])
    across = eb.train_bpe(corpus, 1, progress=False)
    assert across.tolist() == [[0, 25]]  # (a, z) at the lead boundary, 10 times
    within = eb.train_bpe(corpus, 100, lead_boundaries=True, progress=False)
    assert [0, 25] not in within.tolist()
    tok = ECGByteTokenizer(within, lead_boundaries=True)
    assert not any("az" in t for t in tok.token_strings)


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(11)
    corpus = random_walk_symbols(rng, (8, 12, 200))
    return ECGByteTokenizer.train(corpus, 300, progress=False), rng


def test_bpe_and_reference_modes_differ_on_a_known_case():
    tok = ECGByteTokenizer(np.array([[1, 2], [0, 1]]))  # 26 = 'bc', 27 = 'ab'
    s = sym("abc")
    np.testing.assert_array_equal(tok.encode(s, mode="bpe"), [0, 26])  # a | bc (rank order)
    np.testing.assert_array_equal(tok.encode(s, mode="reference"), [27, 2])  # ab | c (longest)
    for mode in eb.MODES:
        np.testing.assert_array_equal(tok.decode(tok.encode(s, mode=mode)), s.ravel())


def test_encoders_equal_naive_encoders(trained):
    tok, rng = trained
    strings = {t: i for i, t in enumerate(tok.token_strings)}
    ecgs = random_walk_symbols(rng, (5, 12, 150))
    bpe = tok.encode(ecgs, mode="bpe")
    greedy = tok.encode(ecgs, mode="reference")
    for e in range(5):
        stream = ecgs[e].ravel()
        np.testing.assert_array_equal(bpe[e], naive_bpe_encode(stream, tok.merges))
        np.testing.assert_array_equal(greedy[e], naive_greedy(eb.symbols_to_text(stream), strings))
        np.testing.assert_array_equal(tok.decode(bpe[e]), stream)
        np.testing.assert_array_equal(tok.decode(greedy[e]), stream)
    assert sum(map(len, greedy)) != sum(map(len, bpe))  # the modes really differ here


def test_bpe_mode_reproduces_training_tokenization():
    rng = np.random.default_rng(12)
    corpus = random_walk_symbols(rng, (4, 2, 120))
    merges = eb.train_bpe(corpus, 60, progress=False)
    seqs = [c.ravel().tolist() for c in corpus]
    for i, (a, b) in enumerate(merges):
        seqs = [naive_merge(s, a, b, 26 + i) for s in seqs]
    got = ECGByteTokenizer(merges).encode(corpus)
    assert [g.tolist() for g in got] == seqs


def test_encode_shapes_leads_and_lengths(trained):
    tok, rng = trained
    ecgs = random_walk_symbols(rng, (3, 12, 100))
    single = tok.encode(ecgs[0])
    assert isinstance(single, np.ndarray) and single.dtype == np.int32
    np.testing.assert_array_equal(single, tok.encode(ecgs)[0])
    leads = tok.encode_leads(ecgs[0], mode="reference")
    assert len(leads) == 12
    for lead, ids in zip(ecgs[0], leads, strict=True):
        assert tok.token_lengths(ids).sum() == 100
        np.testing.assert_array_equal(tok.decode(ids), lead)
    batch = tok.encode_leads(ecgs)
    assert len(batch) == 3 and all(len(b) == 12 for b in batch)
    ids, offsets = tok.encode_flat(ecgs, leads=True)
    assert offsets.shape == (37,) and offsets[-1] == ids.size
    assert tok.token_lengths(np.array([[0, 26]])).tolist() == [[1, len(tok.token_strings[26])]]
    ragged = tok.encode([ecgs[0][:, :40], ecgs[1]])
    np.testing.assert_array_equal(tok.decode(ragged[0]), ecgs[0][:, :40].ravel())
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError):
        tok.encode(ecgs.astype(np.int64))
    with pytest.raises(ValueError):
        tok.encode(np.full((12, 5), 26, np.uint8))


def test_lead_boundaries_tokenizer_encodes_lead_by_lead():
    rng = np.random.default_rng(13)
    corpus = random_walk_symbols(rng, (6, 12, 150))
    tok = ECGByteTokenizer.train(corpus, 200, lead_boundaries=True, progress=False)
    ecgs = random_walk_symbols(rng, (2, 12, 150))
    for mode in eb.MODES:
        stream = tok.encode(ecgs, mode=mode)
        leads = tok.encode_leads(ecgs, mode=mode)
        for e in range(2):
            np.testing.assert_array_equal(stream[e], np.concatenate(leads[e]))


def test_encode_signal_and_workers(trained):
    tok, rng = trained
    x = np.cumsum(rng.normal(size=(4, 12, 200)), axis=-1)
    expected = tok.encode(eb.discretise(x).symbols)
    for workers in (1, 2):
        got = tok.encode_signal(x, workers=workers)
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    per_lead = ECGByteTokenizer(tok.merges, per_lead_norm=True)
    np.testing.assert_array_equal(
        per_lead.encode_signal(x[0]), per_lead.encode(eb.discretise(x[0], per_lead=True).symbols)
    )


def test_parallel_paths_equal_serial(monkeypatch):
    monkeypatch.setattr(eb, "_PARALLEL_MIN_SYMBOLS", 0)  # use the threaded kernels for tiny data
    rng = np.random.default_rng(14)
    x = np.cumsum(rng.normal(size=(9, 12, 300)), axis=-1)
    for per_lead in (False, True):
        one = eb.discretise(x, per_lead=per_lead, workers=1)
        two = eb.discretise(x, per_lead=per_lead, workers=2)
        np.testing.assert_array_equal(one.symbols, two.symbols)
        np.testing.assert_array_equal(one.hi, two.hi)
    symbols = eb.discretise(x).symbols
    serial = eb.train_bpe(symbols, 200, workers=1, progress=False)
    np.testing.assert_array_equal(eb.train_bpe(symbols, 200, workers=2, progress=False), serial)
    tok = ECGByteTokenizer(serial)
    for mode in eb.MODES:
        for leads in (False, True):
            a = tok.encode_flat(symbols, mode=mode, leads=leads, workers=1)
            b = tok.encode_flat(symbols, mode=mode, leads=leads, workers=2)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


def test_duplicate_token_strings_keep_the_highest_id_in_greedy_mode():
    # 26 = aa, 27 = aaa (aa + a), 28 = aaa again (a + aa): same string, two ids
    tok = ECGByteTokenizer(np.array([[0, 0], [26, 0], [0, 26]]))
    assert tok.token_strings[27] == tok.token_strings[28] == "aaa"
    np.testing.assert_array_equal(tok.encode(sym("aaa"), mode="reference"), [28])
    np.testing.assert_array_equal(tok.encode(sym("aaa"), mode="bpe"), [27])


def test_invalid_merges_are_refused():
    with pytest.raises(ValueError, match="smaller"):
        ECGByteTokenizer(np.array([[0, 26]]))
    with pytest.raises(ValueError, match="twice"):
        ECGByteTokenizer(np.array([[0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="mode"):
        ECGByteTokenizer(np.zeros((0, 2)), mode="greedy")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_fingerprint(tmp_path, trained):
    tok, _ = trained
    tok2 = ECGByteTokenizer(tok.merges, lead_boundaries=True, mode="reference", source="x")
    for t in (tok, tok2):
        path = tmp_path / "tok.json"
        t.save(path)
        loaded = ECGByteTokenizer.load(path)
        np.testing.assert_array_equal(loaded.merges, t.merges)
        assert loaded.settings() == t.settings() and loaded.source == t.source
        assert loaded.fingerprint() == t.fingerprint()
    assert tok.fingerprint() != tok2.fingerprint()
    same = ECGByteTokenizer(tok.merges.copy(), source="elsewhere")
    assert same.fingerprint() == tok.fingerprint()  # provenance is not identity
    # stable across processes and releases: a fixed tokenizer has a fixed hash
    classic = ECGByteTokenizer(np.array([[0, 0], [0, 1], [26, 27]]))
    assert classic.fingerprint() == CLASSIC_FINGERPRINT


CLASSIC_FINGERPRINT = "ff9e142e9159b77e57e525a963702f45663fbde82896bca8513b9edd64c32a79"


def test_bad_tokenizer_files_are_named(tmp_path, trained):
    tok, _ = trained
    cases = {
        "garbage.json": "not json {",
        "other.json": json.dumps({"model": {"type": "BPE"}}),
        "future.json": json.dumps({**tok.to_json(), "version": 99}),
        "tampered.json": json.dumps({**tok.to_json(), "merges": tok.merges[:-1].tolist()}),
        "broken.json": json.dumps({"format": eb.FORMAT_NAME, "version": 1, "merges": [[0, 99]]}),
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(TokenizerFileError, match=name):
            ECGByteTokenizer.load(path)


# ----------------------------------------------------------------------------------------------
# The reference's pickle
# ----------------------------------------------------------------------------------------------


def _reference_texts(seed):
    rng = np.random.default_rng(seed)
    return [eb.symbols_to_text(e) for e in random_walk_symbols(rng, (4, 12, 60))]


@pytest.mark.parametrize("token_form", ["str", "bytes", "list"])
def test_reference_pickle_import(tmp_path, token_form):
    texts = _reference_texts(20)
    vocab, merges = reference_style_train(texts, 120)
    form = {"str": lambda t: t, "bytes": str.encode, "list": lambda t: list(t.encode())}
    path = tmp_path / "tokenizer_120_4.pkl"
    path.write_bytes(pickle.dumps((vocab, [(form[token_form](t), i) for t, i in merges])))
    tok = ECGByteTokenizer.from_reference_pickle(path)
    assert tok.mode == "reference" and tok.num_merges == 120 and not tok.per_lead_norm
    assert tok.token_strings[26:] == [t for t, _ in merges]
    assert "tokenizer_120_4.pkl" in tok.source
    # The reference's greedy encoding, in reference ids, maps one to one onto ours.
    ref_tokens = {v: k for k, v in sorted(vocab.items()) if k >= 256 or 97 <= k <= 122}
    ours = {t: i for i, t in enumerate(tok.token_strings)}
    to_ours = {ref_tokens[t]: ours[t] for t in ref_tokens}
    for text in _reference_texts(21):
        expected = [to_ours[i] for i in naive_greedy(text, ref_tokens)]
        np.testing.assert_array_equal(tok.encode(sym(text)), expected)
    # merge pairs: the same as our trainer on the one concatenated sequence, although many
    # token strings split into two earlier tokens in more than one way
    assert "ambiguous splits 0" not in tok.source
    concatenated = eb.text_to_symbols("".join(texts))[None]
    np.testing.assert_array_equal(tok.merges, eb.train_bpe(concatenated, 120, progress=False))


def test_reference_pickle_ambiguous_split_follows_merge_order(tmp_path):
    # 'aaaaaa' (6 a) can be split as aaaa+aa or aa+aaaa; merge-order BPE gives aaaa | aa
    vocab = {i: chr(i) for i in range(256)}
    merges = [("aa", 256), ("aaaa", 257), ("aaaaaa", 258)]
    vocab.update({i: t for t, i in merges})
    path = tmp_path / "amb.pkl"
    path.write_bytes(pickle.dumps((vocab, merges)))
    tok = ECGByteTokenizer.from_reference_pickle(path)
    np.testing.assert_array_equal(tok.merges, [[0, 0], [26, 26], [27, 26]])
    assert "ambiguous splits 1" in tok.source


def test_reference_pickle_skips_tokens_outside_a_to_z(tmp_path):
    vocab = {i: chr(i) for i in range(256)}
    merges = [("ab", 256), ("b\n", 257), ("abab", 258)]
    path = tmp_path / "skip.pkl"
    path.write_bytes(pickle.dumps((vocab, merges)))
    with pytest.warns(UserWarning, match="skipped 1"):
        tok = ECGByteTokenizer.from_reference_pickle(path)
    np.testing.assert_array_equal(tok.merges, [[0, 1], [26, 26]])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    pass


def test_reference_pickle_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    vocab = {i: chr(i) for i in range(256)}
    payloads = {
        "system.pkl": pickle.dumps(_Evil(marker)),
        "nested.pkl": pickle.dumps((vocab, [("ab", 256)], _Evil(marker))),
        "class.pkl": pickle.dumps((vocab, [(_Custom(), 256)])),
        "numpy.pkl": pickle.dumps((vocab, [("ab", np.int64(256))])),
    }
    for name, blob in payloads.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(TokenizerFileError, match=f"{name}.*refused"):
            ECGByteTokenizer.from_reference_pickle(path)
    assert not marker.exists()
    for name, blob in {"junk.pkl": b"\x80\x05junk", "shape.pkl": pickle.dumps([1, 2, 3])}.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(TokenizerFileError, match=name):
            ECGByteTokenizer.from_reference_pickle(tmp_path / name)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segment_dir(tmp_path_factory):
    from elmjax.ecg import preprocess, synth

    root = tmp_path_factory.mktemp("ecgbyte_cli")
    synth.generate_corpus(root / "corpus", num_ecgs=8, seed=0, workers=1, progress=False)
    argv = ["--layout", "ptbxl", "--input", str(root / "corpus"), "--out", str(root / "seg")]
    assert preprocess.main([*argv, "--seg-len", "2500", "--workers", "1", "--quiet"]) == 0
    return root / "seg"


def test_cli_train_encode_stats(tmp_path, segment_dir, capsys):
    from elmjax.ecg.preprocess import load_segments

    tok_path, ids_path, png = tmp_path / "tok.json", tmp_path / "ids.npz", tmp_path / "h.png"
    common = ["--segments", str(segment_dir), "--workers", "1"]
    argv = ["train", *common, "--num-merges", "300", "--out", str(tok_path), "--max-ecgs", "6"]
    assert eb.main(argv) == 0
    tok = ECGByteTokenizer.load(tok_path)
    assert tok.num_merges == 300 and "6 segments" in tok.source

    rows, fetch = load_segments(segment_dir)
    picked = eb._segment_indices(len(rows), 6, seed=0)
    symbols = eb.discretise(np.stack([fetch(rows[i]) for i in picked])).symbols
    np.testing.assert_array_equal(tok.merges, eb.train_bpe(symbols, 300, progress=False))

    assert eb.main(["encode", "--tokenizer", str(tok_path), *common, "--out", str(ids_path)]) == 0
    with np.load(ids_path) as f:
        ids, offsets = f["ids"], f["offsets"]
        assert str(f["fingerprint"]) == tok.fingerprint() and str(f["mode"]) == "bpe"
    assert len(offsets) == len(rows) + 1
    for i, row in enumerate(rows):
        expected = eb.discretise(fetch(row)).symbols.ravel()
        np.testing.assert_array_equal(tok.decode(ids[offsets[i] : offsets[i + 1]]), expected)

    capsys.readouterr()
    argv = ["stats", "--tokenizer", str(tok_path), *common, "--plot", str(png)]
    assert eb.main(argv) == 0
    out = capsys.readouterr().out
    assert "bpe:" in out and "reference:" in out and "symbols per token" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert eb.main(["encode", "--tokenizer", str(bad), *common, "--out", str(ids_path)]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_cli_runs_as_module(tmp_path, segment_dir):
    tok_path = tmp_path / "tok.json"
    ECGByteTokenizer(np.array([[12, 12]])).save(tok_path)
    argv = ["stats", "--tokenizer", str(tok_path), "--segments", str(segment_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with warnings.catch_warnings():
        result = subprocess.run(
            [sys.executable, "-m", "elmjax.tokenize.ecgbyte", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    assert "symbols per token" in result.stdout
