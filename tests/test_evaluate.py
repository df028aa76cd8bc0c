"""Teacher-forced exact match equals greedy decoding; ECG removal moves the answer spans."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elmjax import evaluate
from elmjax.models.llm import LLM, LLMConfig
from elmjax.tokenize import text

VOCAB = text.EcgVocab(text_vocab_size=40, ecg_vocab_size=20, markers=True, text_pad_id=None)


def tiny_model():
    cfg = LLMConfig(
        vocab_size=40,
        extra_vocab=VOCAB.total_size - 40,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=64,
    )
    return LLM(cfg, rngs=nnx.Rngs(0))


def greedy(model, prompt, n):
    """Plain greedy decoding with full forwards (no cache): the definition we must match."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(jnp.asarray([ids], jnp.int32))
        ids.append(int(jnp.argmax(logits[0, -1])))
    return ids[len(prompt) :]


def example(model, rng, n_ecg, attribute, corrupt=False):
    ecg = (40 + rng.integers(0, 20, n_ecg)).tolist()
    prompt = [1, 2, VOCAB.start_id, *ecg, VOCAB.end_id, *rng.integers(3, 40, 5).tolist()]
    answer = greedy(model, prompt, 3)
    if corrupt:
        answer[1] = (answer[1] + 1) % 40
    ids = np.asarray(prompt + answer + [7], np.int32)
    spans = np.asarray([[len(prompt), len(prompt) + 3]], np.int32)
    conv = {
        "turns": [{"role": "user", "text": "q"}, {"role": "assistant", "text": "a"}],
        "meta": {"attribute_type": attribute},
    }
    return {"input_ids": ids, "answer_spans": spans, "conversation": json.dumps(conv)}


def test_exact_match_is_greedy_decoding():
    model = tiny_model()
    rng = np.random.default_rng(0)
    examples = [example(model, rng, 6 + i, "rhythm") for i in range(4)]
    examples += [example(model, rng, 5, "axis", corrupt=True) for _ in range(3)]
    out = evaluate.exact_match(model, examples, VOCAB, seq_len=32, batch_size=4, progress=False)
    assert out["rhythm"] == {"accuracy": 100.0, "answers": 4}
    assert out["axis"] == {"accuracy": 0.0, "answers": 3}
    assert out["all"]["answers"] == 7


def test_length_buckets_change_nothing_but_the_shapes():
    model = tiny_model()
    rng = np.random.default_rng(1)
    examples = [example(model, rng, n, "rhythm", corrupt=n % 3 == 0) for n in range(2, 18)]
    lengths = sorted(len(e["input_ids"]) for e in examples)
    assert lengths[0] <= 16 < lengths[-1]  # the 8-token buckets give several shapes
    whole = evaluate.exact_match(model, examples, VOCAB, seq_len=32, batch_size=3, bucket=32)
    bucketed = evaluate.exact_match(model, examples, VOCAB, seq_len=32, batch_size=3, bucket=8)
    assert bucketed == whole
    assert whole["rhythm"] == {"accuracy": 68.75, "answers": 16}  # 5 of 16 corrupted


def test_rows_longer_than_seq_len_are_refused():
    model = tiny_model()
    examples = [example(model, np.random.default_rng(2), 30, "rhythm")]
    with pytest.raises(ValueError, match="example 0: 43 tokens, more than seq_len=32"):
        evaluate.exact_match(model, examples, VOCAB, seq_len=32, progress=False)


def test_drop_ecg_moves_spans_onto_the_same_tokens():
    ids = np.asarray([1, VOCAB.start_id, 41, 42, 43, VOCAB.end_id, 5, 6, 7, 8], np.int32)
    spans = np.asarray([[6, 8], [8, 10]])
    kept, moved = evaluate.drop_ecg(ids, spans, VOCAB)
    assert kept.tolist() == [1, VOCAB.start_id, VOCAB.end_id, 5, 6, 7, 8]
    assert moved.tolist() == [[3, 5], [5, 7]]
    for (a, b), (c, d) in zip(spans, moved, strict=True):
        assert ids[a:b].tolist() == kept[c:d].tolist()


def test_answer_labels_of_grouped_conversations():
    conv = {
        "meta": {
            "questions": [
                {"attribute_type": "rhythm"},
                {"attribute_type": None},
                {"attribute_type": "rhythm", "attribute": ["atrial fibrillation"]},
                {"attribute_type": "st_segment", "attribute": ["st elevation", "lead II"]},
            ]
        }
    }
    assert evaluate.answer_labels(conv) == ["rhythm", "other", "atrial fibrillation", "st_segment"]


def test_generated_answers_are_the_greedy_continuations():
    model = tiny_model()
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 40, n).astype(np.int32) for n in (3, 9, 5, 12, 7)]
    # stop on an id greedy never emits first, so every row runs max_new_tokens
    out = evaluate.generate_answers(
        model, prompts, stop_ids=[39], pad_id=0, max_new_tokens=4, batch_size=2, progress=False
    )
    for p, ids in zip(prompts, out, strict=True):
        want = greedy(model, p.tolist(), 4)
        if 39 in want:
            want = want[: want.index(39)]
        assert ids.tolist() == want


def test_perturbations_parse_to_validated_specs():
    c = evaluate.parse_perturbation("noise:snr=10")
    assert c.name == "noise:snr=10" and c.perturb == [{"kind": "noise", "snr_db": 10}]
    assert evaluate.parse_perturbation("wander").perturb == [
        {"kind": "baseline_wander", "amplitude_mv": 0.3}
    ]
    assert len(evaluate.parse_perturbation("combined_severe").perturb) == 3
    two = evaluate.parse_perturbation("powerline:amplitude_mv=0.1:harmonics=1").perturb
    assert two == [{"kind": "powerline", "amplitude_mv": 0.1, "harmonics": 1}]
    with pytest.raises(ValueError, match="unknown kind 'hum'"):
        evaluate.parse_perturbation("hum")
    with pytest.raises(ValueError, match="'snr' is not key=value"):
        evaluate.parse_perturbation("noise:snr")
    with pytest.raises(ValueError, match="missing parameter 'amplitude_mv'"):
        evaluate.parse_perturbation("powerline:harmonics=1")
    with pytest.raises(ValueError, match="unknown parameter 'harmonics'; allowed: \\['snr_db'\\]"):
        evaluate.parse_perturbation("noise:harmonics=1")
    names = [c.name for c in evaluate.parse_conditions("zeros,text_only", "noise:snr=5")]
    assert names == ["ecg", "zeros", "text_only", "noise:snr=5"]
    with pytest.raises(ValueError, match=r"unknown --ablate \['blank'\]"):
        evaluate.parse_conditions("zeros,blank")


def test_shuffles_pair_every_example_with_another_patient():
    patients = ["a", "a", "a", "b", "b", "c", "d", "d"]
    perm = evaluate._derangement(patients, seed=0)
    assert sorted(perm.tolist()) == list(range(8))
    assert all(patients[j] != p for p, j in zip(patients, perm, strict=True))
    assert perm.tolist() == evaluate._derangement(patients, seed=0).tolist()
    assert perm.tolist() != evaluate._derangement(patients, seed=1).tolist()
