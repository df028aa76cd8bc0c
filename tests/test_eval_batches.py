"""How evaluation batches its prompts: prefix groups, the batch plan, and answers that do not
depend on prefix sharing (token prompts, and an ELM whose prompts differ only by their ECG)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from test_elm import PH, make_ecg, make_elm
from test_evaluate import tiny_model

from elmjax import evaluate
from elmjax import generate as gen


@pytest.fixture(autouse=True)
def _exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def ids(*xs) -> np.ndarray:
    return np.asarray(xs, np.int32)


def test_prefix_groups_keep_prompts_that_share_half_of_every_member():
    ecg_a, ecg_b = list(range(10, 30)), list(range(30, 50))
    prompts = [
        ids(1, *ecg_a, 5, 6),  # 0: ECG a, question 5 6
        ids(1, *ecg_b, 5, 6),  # 1: ECG b
        ids(1, *ecg_a, 7),  # 2: ECG a, another question
        ids(1, *ecg_a, 7, 8, *range(60, 90)),  # 3: shares 22 ids with 2, but is 53 long
        ids(1, 2, 3),  # 4: shares 1 id
        ids(1, *ecg_b, 9, 9, 9),  # 5: ECG b
    ]
    groups = evaluate.prefix_groups(prompts)
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 5], [3], [4]]
    # Keys (an ELM's ECG input) split groups whose ids agree.
    keys = [b"x", b"x", b"y", b"y", b"x", b"x"]
    groups = evaluate.prefix_groups(prompts, keys)
    assert sorted(map(sorted, groups)) == [[0], [1, 5], [2], [3], [4]]


def test_plan_batches_cover_every_prompt_once():
    rng = np.random.default_rng(0)
    heads = [rng.integers(1, 40, n) for n in (30, 12, 50, 20)]
    prompts = [np.concatenate([h, rng.integers(1, 40, rng.integers(1, 5))]) for h in heads * 3]
    prompts += [rng.integers(1, 40, n) for n in (9, 4, 60)]  # share with none
    plan = evaluate.plan_batches(prompts, 5)
    flat = [i for b in plan for i in b.rows]
    assert sorted(flat) == list(range(len(prompts)))
    assert all(len(b.rows) <= 5 and len(b.groups) == len(b.rows) for b in plan)
    # Each head's 3 prompts sit next to each other (same batch, or split over two); those
    # sharing with none come last, shortest first.
    assert flat[-3:] == [13, 12, 14]
    for g in range(4):
        where = sorted(flat.index(g + 4 * k) for k in range(3))
        assert where == list(range(where[0], where[0] + 3))
    # Without sharing: shortest first, no labels.
    plain = evaluate.plan_batches(prompts, 5, share_prefixes=False)
    assert [len(prompts[i]) for b in plain for i in b.rows] == sorted(map(len, prompts))
    assert all(b.groups is None for b in plain)


def test_shared_and_unshared_answers_agree_on_token_prompts():
    model = tiny_model()
    rng = np.random.default_rng(1)
    heads = [rng.integers(3, 40, n) for n in (24, 40, 17)]
    prompts = [np.concatenate([h, rng.integers(3, 40, rng.integers(1, 6))]) for h in heads * 4]
    kw = dict(stop_ids=[39], pad_id=0, max_new_tokens=5, batch_size=8, progress=False)
    before = gen.TRACE_COUNTS["prefill_shared"]
    shared = evaluate.generate_answers(model, prompts, **kw)
    assert gen.TRACE_COUNTS["prefill_shared"] > before
    plain = evaluate.generate_answers(model, prompts, share_prefixes=False, **kw)
    assert [a.tolist() for a in shared] == [a.tolist() for a in plain]


def test_elm_prompts_share_only_with_the_same_ecg():
    """Two ECGs, three questions each, the same ids before the question (the placeholders are
    the same ids for every ECG): the ECG key keeps the two ECGs' prefixes apart."""
    model = make_elm("tokens")
    model.eval()
    weights = nnx.state(model, nnx.Param)  # larger weights: answers that depend on the ECG
    nnx.update(model, jax.tree.map(lambda w: w * 8.0, weights))
    rng = np.random.default_rng(2)
    head = [1, 2, *[PH] * 4, *rng.integers(8, 40, 20).tolist()]
    questions = [rng.integers(8, 40, rng.integers(1, 4)).tolist() for _ in range(3)]
    prompts = [np.asarray(head + q, np.int32) for q in questions] * 2
    two = make_ecg("tokens", 2, seed=3)
    ecgs = [two[0]] * 3 + [two[1]] * 3
    kw = dict(stop_ids=[39], pad_id=0, max_new_tokens=4, batch_size=8, progress=False)
    before = gen.TRACE_COUNTS["prefill_shared"]
    shared = evaluate.generate_answers(model, prompts, ecgs, **kw)
    assert gen.TRACE_COUNTS["prefill_shared"] > before
    plain = evaluate.generate_answers(model, prompts, ecgs, share_prefixes=False, **kw)
    assert [a.tolist() for a in shared] == [a.tolist() for a in plain]
    assert [a.tolist() for a in plain[:3]] != [a.tolist() for a in plain[3:]]  # ECGs matter

    # The check has teeth: sharing across the two ECGs (one label for all rows) gives the
    # second ECG's rows the first one's prefix vectors.
    tokens = evaluate._right_pad(prompts, max(map(len, prompts)), 0)
    lengths = [len(p) for p in prompts]
    embeds, mask = model.embed_inputs(tokens, np.stack(ecgs))
    g = dict(lengths=lengths, embeds=embeds, embed_mask=mask, max_new_tokens=4, stop_ids=[39])
    right = gen.generate(model.llm, tokens, pad_id=0, groups=[0, 0, 0, 1, 1, 1], **g)
    wrong = gen.generate(model.llm, tokens, pad_id=0, groups=[0] * 6, **g)
    assert (np.asarray(right.tokens)[3:] != np.asarray(wrong.tokens)[3:]).any()
