"""python -m elmjax.chat: one ECG record, a question, the run's answer (and its saliency map).

One tiny symbolic run (lead II, 10-s segments at 125 Hz, T = 512: some test examples' ECG fits
the budget, some is cut) is trained once for the module and loaded once."""

import io as sio
import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, SHARED_DATA, write_wfdb
from test_train import tiny_config

from elmjax import chat, evaluate, prepare, train
from elmjax.config import load_run_config
from elmjax.ecg import io, synth
from elmjax.tokenize import text

REAL = SHARED_DATA / "wfdb"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(cfg, workdir)`` of a tiny symbolic run trained for 30 steps."""
    tmp = tmp_path_factory.mktemp("chat")
    cfg = tiny_config(tmp, steps=30, lr=3e-3, checkpoint_every=30)
    cfg.data.leads = ("II",)  # the shared MIT-BIH record has MLII and V5
    cfg.ecg_tokenizer.num_merges = 200
    cfg.budget = 512
    cfg.eval.after_training = False
    train.train(cfg, cfg.workdir)
    return cfg, Path(cfg.workdir)


@pytest.fixture(scope="module")
def run(trained):
    _, workdir = trained
    return chat.Run(load_run_config(workdir), workdir)


@pytest.fixture(scope="module")
def synthetic_record(tmp_path_factory):
    """A 25-s synthetic 12-lead ECG at 500 Hz (two 10-s segments) as WFDB and as .npy."""
    tmp = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(7)
    signal, _ = synth.simulate(synth.sample_params(rng), fs=500, duration=25.0, rng=rng)
    base = write_wfdb(tmp, "synth", signal.T, names=list(io.CANONICAL_LEADS))
    npy = tmp / "synth.npy"
    np.save(npy, io.read_record(base).signal)  # the same millivolts as the WFDB record
    return base, npy


def ask(run, ecg, question=None, stdin="", **options):
    out = sio.StringIO()
    opts = chat.Options(workdir=str(run.workdir), ecg=str(ecg), question=question, **options)
    session = chat.chat(opts, stdin=sio.StringIO(stdin), stdout=out, run=run)
    return session, out.getvalue()


def test_answers_about_real_and_synthetic_records(run, synthetic_record):
    session, out = ask(run, REAL / "100", "Does this ECG show sinus rhythm?", segment=2)
    assert "180 segments of 10 s; segment 2 (20-30 s)" in out
    reply = session.replies[0]
    assert reply.text and out.rstrip().endswith(reply.text)
    assert reply.text == run.inputs.text_tokenizer.decode(reply.ids).strip()

    base, npy = synthetic_record
    from_wfdb, out = ask(run, base, "What is the rhythm?", segment=1)
    assert "2 segments of 10 s; segment 1 (10-20 s)" in out and from_wfdb.replies[0].text
    from_npy, _ = ask(run, npy, "What is the rhythm?", segment=1, fs=500.0)
    np.testing.assert_array_equal(from_npy.replies[0].prompt, from_wfdb.replies[0].prompt)
    assert from_npy.replies[0].text == from_wfdb.replies[0].text

    # a CODE-15% tracing: [N, 4096, 12] at 400 Hz, zero-padded, named FILE.hdf5#ROW
    h5 = base.parent / "exams_part0.hdf5"
    tracings = np.zeros((2, 4096, 12), np.float32)
    tracings[1, 20:4076] = io.read_record(base).signal[:, :4056].T
    with h5py.File(h5, "w") as f:
        f["tracings"] = tracings
        f["exam_id"] = np.array([5, 6])
    from_h5, out = ask(run, f"{h5}#1", "What is the rhythm?")
    assert "10.1 s at 400 Hz" in out and "1 segment of 10 s" in out and from_h5.replies[0].text


def split_at_ecg(ids, vocab):
    """``(text before, ECG ids, text after)`` of a prompt."""
    where = np.flatnonzero(vocab.is_ecg(ids))
    return ids[: where[0]], ids[where], ids[where[-1] + 1 :]


def test_chat_preprocesses_and_prompts_as_training_did(trained, run):
    """Raw record -> segment -> prompt, against the run's own prepared test examples."""
    cfg, workdir = trained
    vocab = run.inputs.vocab
    kinds = set()
    for ex in evaluate.load_split(workdir, "test"):
        conversation = json.loads(ex["conversation"])
        record = chat.read_ecg(Path(cfg.data.root) / conversation["record"])
        segment = run.segments(record).data[conversation["segment"]]
        np.testing.assert_array_equal(segment, run.inputs.segment(conversation))

        session = run.session(segment)
        prompt = session.prompt(conversation["turns"][0]["text"])
        trained_prompt = ex["input_ids"][: ex["answer_spans"][0][0]]
        if ex["ecg_dropped"] == 0:  # the ECG fit: the very same ids
            np.testing.assert_array_equal(prompt, trained_prompt)
            kinds.add("equal")
        else:  # cut: chat leaves the ECG the ids the training example gave its answer
            before, ecg, after = split_at_ecg(prompt, vocab)
            t_before, t_ecg, t_after = split_at_ecg(trained_prompt, vocab)
            np.testing.assert_array_equal(before, t_before)
            np.testing.assert_array_equal(after, t_after)
            np.testing.assert_array_equal(ecg[: len(t_ecg)], t_ecg)
            # both fill the budget: the ECG block is longer by what followed the prompt
            assert len(prompt) == len(ex["input_ids"]) == cfg.budget
            kinds.add("cut")
    assert kinds == {"equal", "cut"}  # the run exercises both cases


def test_interactive_conversation_keeps_its_context(run):
    stdin = "What is the rhythm?\n\nDoes this ECG show sinus rhythm?\nexit\nnever asked\n"
    session, out = ask(run, REAL / "100", stdin=stdin)
    assert out.count("elm> ") == 2 and out.count("you> ") == 4
    assert [t["role"] for t in session.turns] == ["user", "assistant"] * 2
    second = session.replies[1].prompt
    expected = run.inputs.prompt(session.turns[:3], session.payload)
    np.testing.assert_array_equal(second, expected)
    shown = run.inputs.text_tokenizer.decode(second)
    assert "What is the rhythm?" in shown and session.turns[1]["text"] in shown

    session, out = ask(run, REAL / "100", stdin="What is the rhythm?")  # EOF ends it
    assert len(session.replies) == 1 and out.count("elm> ") == 1


def test_explain_writes_a_saliency_png(run, tmp_path):
    png = tmp_path / "why.png"
    session, out = ask(run, REAL / "100", "What is the rhythm?", explain=str(png), segment=1)
    assert f"(attribution: {png})" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    reply = session.replies[0]
    a = session.explain(reply)
    ecg_ids = reply.prompt[run.inputs.vocab.is_ecg(reply.prompt)]
    assert a.leads == ("II",) and a.raw.shape == ecg_ids.shape
    assert a.per_sample.shape == a.seen.shape == (1, 1250)
    symbols = run.inputs.ecg_tokenizer.token_lengths(run.inputs.vocab.from_llm(ecg_ids)).sum()
    assert a.seen.sum() == min(symbols, 1250)
    np.testing.assert_allclose(a.per_sample.sum(), a.raw.sum(), rtol=1e-6, atol=1e-12)
    assert a.total == pytest.approx(a.mapped)
    assert sum(stop - start for _, start, stop, _ in a.spans) == symbols

    # The log-probability is the answer's, teacher-forced: greedy picked each target.
    tokens = jnp.asarray(np.concatenate([reply.prompt, a.targets])[None])
    logits = np.asarray(run.model(tokens))[0, len(reply.prompt) - 1 : -1]
    np.testing.assert_array_equal(logits.argmax(-1), a.targets)
    logp = jax.nn.log_softmax(logits, -1)[np.arange(len(a.targets)), a.targets].sum()
    assert a.logp == pytest.approx(float(logp), abs=1e-4)
    assert a.targets[-1] == run.inputs.text_tokenizer.eot_id  # the answer ended


def test_token_spans_follow_the_time_truncation(trained, run):
    """``time`` keeps the same first symbols of every lead: each kept token maps back to them."""
    cfg, _ = trained
    x = run.segments(io.read_record(REAL / "100")).data[0]
    two = cfg.copy_and_resolve_references()
    two.truncation = "time"
    ids, lengths = prepare.ecg_ids_of(two, run.inputs.ecg_tokenizer, x[None, [1, 10]])[0]
    ex = text.build_example(
        run.inputs.text_tokenizer,
        [{"role": "user", "text": "Rhythm?"}],
        ids,
        budget=150,
        policy="time",
        ecg_vocab=run.inputs.vocab,
        add_generation_prompt=True,
        token_lengths=lengths,
    )
    kept = run.inputs.vocab.from_llm(ex.input_ids[run.inputs.vocab.is_ecg(ex.input_ids)])
    raw = np.arange(1.0, len(kept) + 1)
    payload = ((ids, lengths), None)
    per_sample, seen, spans = chat._token_spans(run, payload, kept, raw, 2, 1250)
    longest = int(run.inputs.ecg_tokenizer.token_lengths(np.arange(tok_size(run))).max())
    s = ex.ecg_symbols  # every lead keeps the tokens that start before symbol s
    assert seen[:, :s].all() and not seen[:, s + longest :].any()
    np.testing.assert_allclose(per_sample.sum(), raw.sum())
    assert {lead for lead, *_ in spans} == {0, 1}


def tok_size(run):
    return run.inputs.ecg_tokenizer.vocab_size


@pytest.mark.filterwarnings("ignore:fs=125 Hz.*Nyquist")  # the short MIMIC-II record
def test_errors_name_the_file_and_the_problem(trained, run, tmp_path, synthetic_record):
    cfg, workdir = trained
    with pytest.raises(chat.ChatError, match=re.escape(f"{tmp_path / 'nope'}: no such run")):
        chat.run_config(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(chat.ChatError, match="config.json not found"):
        chat.run_config(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(chat.ChatError, match="checkpoints: no checkpoints; train first"):
        chat.Run(chat.run_config(tmp_path / "empty"), tmp_path / "empty")

    missing = tmp_path / "missing_record"
    with pytest.raises(io.ECGReadError, match=re.escape(str(missing))):
        ask(run, missing, "Rhythm?")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 100)))
    with pytest.raises(io.ECGReadError, match=re.escape(f"{bad}: expected [12, n]")):
        ask(run, bad, "Rhythm?", fs=500.0)
    with pytest.raises(chat.ChatError, match="needs its sampling rate: pass --fs"):
        ask(run, synthetic_record[1], "Rhythm?")
    with pytest.raises(chat.ChatError, match=r"3000003_0003: record too short for one segment"):
        ask(run, REAL / "3000003_0003", "Rhythm?")  # 8.2 s of MIMIC-II for 10-s segments
    with pytest.raises(chat.ChatError, match=r"--segment=2 is out of range: .* 2 segments \(0..1"):
        ask(run, synthetic_record[0], "Rhythm?", segment=2)

    other = cfg.copy_and_resolve_references()
    other.budget = 256
    with pytest.raises(chat.ChatError, match="prepared with other data settings"):
        chat.chat(chat.Options(str(workdir), str(REAL / "100"), "Rhythm?", config=other))


def test_command_line(trained, tmp_path):
    _, workdir = trained
    cmd = [sys.executable, "-m", "elmjax.chat", f"--workdir={workdir}"]
    png = tmp_path / "cli.png"
    done = subprocess.run(
        [*cmd, f"--ecg={REAL / '100'}", "--question=What is the rhythm?", f"--explain={png}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert "checkpoint: step 30" in done.stdout and png.read_bytes()[:4] == b"\x89PNG"
    done = subprocess.run(
        [*cmd, f"--ecg={REAL / '3000003_0003'}", "--question=Rhythm?"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    assert "3000003_0003: record too short for one segment" in done.stderr
