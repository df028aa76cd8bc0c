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
