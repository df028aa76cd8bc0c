"""Ask a trained run about one ECG: ``python -m elmjax.chat --workdir=RUN --ecg=RECORD``.

    python -m elmjax.chat --workdir=runs/ecgbyte_1024_demo --ecg=path/to/record \\
        [--question="Does this ECG show atrial fibrillation?"] [--explain=out.png] \\
        [--segment=K] [--step=S] [--fs=HZ] [--max_new_tokens=32] \\
        [--temperature=0 --top_p=1 --seed=0] [--config=configs/X.py[:arg] --config.a.b=...]

What it does, in order (every step is the one training used):

1. the run's config is ``RUN/config.json`` (written by ``python -m elmjax.train``); a
   ``--config`` file (with ``--config.a.b=value`` overrides) replaces it. The checkpoint is
   the run's last complete one, or ``--step``;
2. the record is read by :mod:`elmjax.ecg.io` (:func:`read_ecg`): a WFDB record path with or
   without ``.hea``/``.dat``, a CODE-15% tracing as ``exams_partN.hdf5#ROW``, or a ``.npy``
   array ``[12, n]`` in mV in canonical lead order (``I, II, III, aVR, aVL, aVF, V1..V6``)
   with ``--fs``. Leads the record lacks are zero-filled, as in training, and named in a
   warning when the run reads them;
3. :func:`elmjax.inputs.preprocess_record` filters, denoises, resamples and cuts it into the
   run's ``data.seg_len`` segments exactly as ``prepare`` did; segment ``--segment`` (default
   0, the first; the number of segments is printed) is the ECG of the conversation;
4. :class:`elmjax.inputs.RunInputs` turns the segment into the run's ECG input (ECG-Byte ids of
   the leads ``data.leads`` keeps, or the signal / printout behind the ``<signal>``
   placeholder) and the conversation into the prompt (chat template, system prompt, the ECG
   block in the first user turn, the token budget and truncation of the run);
5. :func:`elmjax.evaluate.generate_answers` answers (greedy unless ``--temperature``), and the
   run's text tokenizer decodes the answer without its special tokens.

With ``--question`` it answers once and exits. Without it, it reads questions from stdin
(``you>``), one per line, and keeps the conversation: each earlier question and answer is part
of the next prompt, as in the grouped multi-question examples of training. ``exit``, ``quit``
or end of input ends it.

The ECG's share of the budget: the text is never cut and the ECG gets the rest of the run's
budget T (``head``: the start of the lead-major ECG-Byte stream; ``time``: the same seconds of
every lead). A prepared training example also counted its answer in T; a chat prompt, whose
answer is not known yet, leaves the ECG those few ids more (the prompt is the training prompt
of the same question when the training example's ECG was not cut, and its ECG block extended
by the answer's length when it was), and the answer is generated past T. Signal and image
runs are not affected (one placeholder, a fixed-size ECG input).

``--explain out.png``: what the answer relied on, as **gradient x input saliency** (not
attention, not a causal ablation): the log-probability of the generated answer (and of its
end-of-turn token when the model ended it), teacher-forced on the prompt, is differentiated
with ``jax.grad`` with respect to the model's ECG input, and each input element's attribution
is gradient times input (a first-order estimate of how much the log-probability would change
if that element were removed, i.e. set to the baseline):

- symbolic: the input vectors of the ECG tokens (their embedding rows, baseline 0); a token's
  attribution is the sum over the embedding width. Tokens are mapped back to the samples they
  encode through their symbol counts (``ECGByteTokenizer.token_lengths``): the ECG-Byte stream
  is lead-major, one symbol per sample, over the leads ``data.leads`` keeps (a merge may span
  the end of one lead and the start of the next). Samples whose tokens were cut by the budget
  were not seen by the model and are marked so;
- signal: the preprocessed signal ``[leads, L]`` in mV (baseline 0 mV, a flat line), per
  sample, summed over windows of ``WINDOW_S`` seconds per lead;
- image: the printout's pixels in [0, 1] (baseline: blank white paper, so only ink -- traces,
  grid, labels -- can carry attribution), summed over each panel's pixel columns and mapped to
  the time those columns show (the printout's exact geometry, :func:`elmjax.ecg.render.
  raster_geometry`); pixels outside the panels (calibration lead-in) are left out.

The PNG is the segment's 12-lead printout (``elmjax.ecg.render.plot_ecg``, 6 x 2 layout,
each panel the whole segment) with each token span / time window shaded orange where it
raises the answer's log-probability and teal where it lowers it, opacity proportional to
``|attribution| / max |attribution|``; leads the model does not read are greyed out.
Gradient saliency is local (it describes the model near this input, not what happens when a
part is actually removed) and can be noisy; read it as a hint, not a proof.

Errors (a missing run directory, config or checkpoint, an unreadable record, a record shorter
than one segment, ``--segment`` out of range) exit with code 2 and a message that names the
file and the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from elmjax import config as config_lib
from elmjax import evaluate, generate, inputs, prepare, train
from elmjax.data import pipeline
from elmjax.ecg import io, preprocess, render
from elmjax.models import elm, vision
from elmjax.tokenize import text

WINDOW_S = 0.2  # signal / image attribution windows: one large square of ECG paper
POSITIVE_COLOR = (1.0, 0.5, 0.0)  # raises the answer's log-probability
NEGATIVE_COLOR = (0.0, 0.6, 0.55)  # lowers it
EXIT_WORDS = ("exit", "quit")


class ChatError(ValueError):
    """A problem with the run, the record or the arguments; the message names the file."""


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run_config(
    workdir: str | os.PathLike, override: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """The config of the run in ``workdir`` (``config.json``), or ``override`` when given."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ChatError(f"{workdir}: no such run directory")
    if override is not None:
        return override
    try:
        return config_lib.load_run_config(workdir)
    except FileNotFoundError as e:
        raise ChatError(str(e)) from e
    except ValueError as e:
        raise ChatError(f"{workdir / 'config.json'}: not a readable run config: {e}") from e


class Run:
    """A trained run, ready to answer: its inputs (:class:`elmjax.inputs.RunInputs`) at once,
    its model on first use (so that a bad record is reported before the model loads)."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        workdir: str | os.PathLike,
        *,
        step: int | None = None,
    ):
        self.cfg = cfg
        self.workdir = Path(workdir)
        ckpt = self.workdir / "checkpoints"
        if not ckpt.is_dir() or not any(p.name.isdigit() for p in ckpt.iterdir()):
            raise ChatError(f"{ckpt}: no checkpoints; train first (python -m elmjax.train)")
        try:
            self.inputs = inputs.RunInputs(cfg, self.workdir)
        except (prepare.PrepareError, FileNotFoundError) as e:
            raise ChatError(str(e)) from e
        self.step = step
        self._model = None
        tok = self.inputs.text_tokenizer
        self.stop_ids = tok.stop_ids
        self.eot_id = tok.eot_id
        self.pad_id = self.inputs.vocab.pad_id

    @property
    def model(self):
        """The trained model (loaded once)."""
        if self._model is None:
            try:
                self._model, self.step = train.load_trained(self.cfg, self.workdir, step=self.step)
            except (train.ConfigError, prepare.PrepareError, FileNotFoundError) as e:
                raise ChatError(str(e)) from e
        return self._model

    @property
    def lead_names(self) -> tuple[str, ...]:
        """The leads the model reads, in the order of its input rows."""
        rows = self.inputs.leads if self.inputs.leads is not None else range(12)
        return tuple(io.CANONICAL_LEADS[i] for i in rows)

    def segments(self, record: io.Record) -> preprocess.Segments:
        """The record's segments, preprocessed as training did; raises if there are none."""
        fs, seg_len = self.inputs.fs, self.inputs.seg_len
        pp = preprocess.PreprocessConfig(
            target_fs=fs, seg_len=seg_len, mode=self.cfg.data.preprocess_mode
        )
        n = preprocess.output_length(record.n_samples, record.fs, pp)
        if n < seg_len:
            raise ChatError(
                f"{record.path}: record too short for one segment: {record.duration:.2f} s "
                f"({record.n_samples} samples at {record.fs:g} Hz) gives {n} samples at "
                f"{fs:g} Hz; the run reads segments of {seg_len} ({seg_len / fs:g} s)"
            )
        segs = inputs.preprocess_record(record.signal, record.fs, self.cfg)
        if len(segs.data) == 0:
            raise ChatError(f"{record.path}: every segment holds NaN or infinite samples")
        return segs

    def session(self, segment: np.ndarray, **kwargs: Any) -> Session:
        """A conversation about one preprocessed segment ``[12, seg_len]``."""
        return Session(self, segment, **kwargs)


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


def read_ecg(path: str | os.PathLike, *, fs: float | None = None) -> io.Record:
    """Reads one record with :mod:`elmjax.ecg.io` (the options training used: strict).

    ``path``: a WFDB record (``dir/rec``, ``dir/rec.hea`` or ``dir/rec.dat``); a CODE-15%
    tracing ``exams_partN.hdf5#ROW``; or a ``.npy`` array ``[12, n]`` in mV, canonical lead
    order, with ``fs``. Raises :class:`~elmjax.ecg.io.ECGReadError` naming the file.
    """
    text_path = os.fspath(path)
    base, _, row = text_path.partition("#")
    suffix = Path(base).suffix.lower()
    if suffix in (".hdf5", ".h5"):
        if fs is not None:
            raise ChatError(f"{text_path}: --fs is for .npy arrays (CODE-15% is 400 Hz)")
        if not row.isdigit():
            raise io.ECGReadError(base, "name the tracing's row: FILE.hdf5#ROW")
        if not Path(base).is_file():
            raise io.ECGReadError(base, "file not found")
        entry = io.Entry("code15", row, row, "", base, int(row))
        return io.load_entry(entry)
    if suffix == ".npy":
        if fs is None:
            raise ChatError(f"{text_path}: a .npy array needs its sampling rate: pass --fs=HZ")
        try:
            x = np.load(text_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise io.ECGReadError(text_path, f"cannot read the array: {e}") from e
        if x.ndim != 2 or x.shape[0] != len(io.CANONICAL_LEADS):
            raise io.ECGReadError(
                text_path, f"expected [12, n] (leads in canonical order, mV), got {x.shape}"
            )
        return io.assemble_record(text_path, x.T, io.CANONICAL_LEADS, float(fs))
    if fs is not None:
        raise ChatError(f"{text_path}: --fs is for .npy arrays (a WFDB header gives the rate)")
    try:
        return io.read_record(text_path)
    except io.ECGReadError:
        raise
    except (OSError, ValueError) as e:  # anything the reader did not word itself
        raise io.ECGReadError(text_path, str(e)) from e


# ----------------------------------------------------------------------------------------------
# A conversation
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Reply:
    """One answer: its text, generated ids (stop id removed), whether the model ended it, and
    the prompt it was generated from."""

    text: str
    ids: np.ndarray
    ended: bool
    prompt: np.ndarray


class Session:
    """A conversation about one segment; :meth:`ask` adds a question and its answer."""

    def __init__(
        self,
        run: Run,
        segment: np.ndarray,
        *,
        max_new_tokens: int = 32,
        sampling: generate.Sampling | None = None,
        seed: int = 0,
    ):
        self.run = run
        self.segment = run.inputs.check_segment(segment)[0]  # [12, seg_len]
        self.payload = run.inputs.payloads(self.segment[None])[0]
        self.turns: list[dict[str, str]] = []
        self.replies: list[Reply] = []
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.seed = seed

    def prompt(self, question: str) -> np.ndarray:
        """The ids the next answer is generated from (the conversation so far + ``question``)."""
        turns = [*self.turns, {"role": "user", "text": question}]
        try:
            return self.run.inputs.prompt(turns, self.payload)
        except text.TextTooLongError as e:
            raise ChatError(
                f"{self.run.workdir}: the conversation needs {e.needed} tokens of text, more than "
                f"the run's budget T={e.budget}; start a new conversation"
            ) from e

    def ask(self, question: str) -> Reply:
        """Answers ``question`` in the context of the conversation, and remembers both."""
        question = question.strip()
        if not question:
            raise ChatError("empty question")
        prompt = self.prompt(question)
        ecgs = None
        if not self.run.inputs.symbolic:
            ecgs = [self.payload[1]]
        ids = evaluate.generate_answers(
            self.run.model,
            [prompt],
            ecgs,
            stop_ids=self.run.stop_ids,
            pad_id=self.run.pad_id,
            max_new_tokens=self.max_new_tokens,
            sampling=self.sampling,
            seed=self.seed + len(self.replies),
            batch_size=1,
            progress=False,
        )[0]
        ids = np.asarray(ids, np.int32)
        answer = self.run.inputs.text_tokenizer.decode(ids, skip_special=True).strip()
        reply = Reply(answer, ids, ended=len(ids) < self.max_new_tokens, prompt=prompt)
        self.turns += [{"role": "user", "text": question}, {"role": "assistant", "text": answer}]
        self.replies.append(reply)
        return reply

    def explain(self, reply: Reply | None = None) -> Attribution:
        """Gradient x input saliency of ``reply`` (default: the last answer); see the module
        docstring."""
        reply = reply or self.replies[-1]
        return attribute(self.run, self.segment, self.payload, reply)


# ----------------------------------------------------------------------------------------------
# Attribution (gradient x input)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Attribution:
    """Gradient x input saliency of an answer's log-probability w.r.t. the ECG input.

    Attributes:
      representation: ``symbolic``, ``signal`` or ``image``.
      leads: names of the rows of ``per_sample`` / ``seen`` (the leads the model reads).
      fs: sample rate of the segment.
      raw: attribution of each element of the model's ECG input: ``[n_ecg_tokens]``
        (symbolic, in prompt order), ``[leads, L]`` (signal), ``[H, W]`` (image, summed over
        colour channels).
      per_sample: float ``[leads, L]``: ``raw`` spread over the samples it stands for (a
        token's share split evenly over its symbols, a pixel column's over the samples it
        draws); sums to ``mapped``.
      seen: bool ``[leads, L]``: samples present in the model's input (symbolic: the tokens
        that fit the budget; else all).
      spans: ``(lead row, start, stop, score)``: what the PNG shades (a token's samples, with
        one piece per lead it spans, or a time window).
      total: ``raw.sum()`` (first-order estimate of ``logp`` minus its value at the baseline).
      mapped: the part of ``total`` placed on samples (image: pixels inside the panels).
      logp: the answer's log-probability.
      targets: the ids whose log-probability was differentiated.
    """

    representation: str
    leads: tuple[str, ...]
    fs: float
    raw: np.ndarray
    per_sample: np.ndarray
    seen: np.ndarray
    spans: list[tuple[int, int, int, float]]
    total: float
    mapped: float
    logp: float
    targets: np.ndarray


def _bucket(n: int) -> int:
    return generate.bucket(n, generate.MIN_PROMPT_BUCKET)


def _logp_grad(model, tokens: np.ndarray, first: int, n_targets: int, ecg_positions, ecg_input):
    """``(logp, grad)``: log-probability of ``tokens[first:first + n_targets]`` given what
    precedes them, and its gradient w.r.t. the ECG input (symbolic: the input vectors at
    ``ecg_positions``; else the signal, or the printout's pixels in [0, 1])."""
    graphdef, state = nnx.split(model)
    width = _bucket(len(tokens))
    padded = np.zeros((1, width), np.int32)
    padded[0, : len(tokens)] = tokens
    k = _bucket(n_targets)  # few shapes: targets padded, masked out
    positions = np.full((1, k), first - 1, np.int32)
    positions[0, :n_targets] = np.arange(first - 1, first - 1 + n_targets)
    targets = np.zeros((1, k), np.int32)
    targets[0, :n_targets] = tokens[first : first + n_targets]
    weight = (np.arange(k) < n_targets)[None].astype(np.float32)
    if ecg_positions is not None:
        pos = np.zeros((1, width), bool)
        pos[0, ecg_positions] = True
        return _logp_grad_symbolic(
            state, padded, positions, targets, weight, pos, graphdef=graphdef
        )
    return _logp_grad_elm(
        state, padded, positions, targets, weight, ecg_input[None], graphdef=graphdef
    )


def _score(logits, targets, weight):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(picked * weight)


def _eval_model(graphdef, state):
    model = nnx.merge(graphdef, state)
    model.eval()  # dropout off, BatchNorm on its running statistics
    return model


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logp_grad_symbolic(state, tokens, positions, targets, weight, ecg_mask, *, graphdef):
    llm = _eval_model(graphdef, state)
    x = llm.embed_tokens(tokens)  # [1, T, D]: the LLM's input vectors (as it computes them)
    if llm.config.is_gemma:
        x = x * jnp.asarray(math.sqrt(llm.config.hidden_size), x.dtype)
    x = x.astype(jnp.float32)

    def logp(x):
        logits = llm(tokens, embeds=x, embed_mask=ecg_mask, logits_positions=positions)
        return _score(logits, targets, weight)

    value, grad = jax.value_and_grad(logp)(x)
    return value, jnp.sum(grad * x, axis=-1)[0]  # [T]: per position, gradient x input


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logp_grad_elm(state, tokens, positions, targets, weight, ecg, *, graphdef):
    model = _eval_model(graphdef, state)
    image = isinstance(model.encoder, elm.ImageEncoder)
    x = ecg.astype(jnp.float32) / 255.0 if image else ecg.astype(jnp.float32)

    def logp(x):
        model_input = vision.preprocess(x, model.encoder.tower.config) if image else x
        logits = model(tokens, model_input, logits_positions=positions)
        return _score(logits, targets, weight)

    value, grad = jax.value_and_grad(logp)(x)
    baseline = 1.0 if image else 0.0  # blank white paper / a flat 0 mV line
    return value, grad * (x - baseline)


def attribute(run: Run, segment: np.ndarray, payload: tuple, reply: Reply) -> Attribution:
    """Gradient x input saliency of ``reply`` for the ECG ``segment`` (see the module doc)."""
    targets = np.asarray(reply.ids, np.int32)
    if reply.ended or len(targets) == 0:
        targets = np.concatenate([targets, [run.eot_id]]).astype(np.int32)
    prompt = np.asarray(reply.prompt, np.int32)
    tokens = np.concatenate([prompt, targets])
    names = run.lead_names
    fs = run.inputs.fs
    seg_len = run.inputs.seg_len
    rows = list(run.inputs.leads) if run.inputs.leads is not None else list(range(12))
    x = segment[rows]  # [leads, L]: what the model reads
    if run.inputs.symbolic:
        is_ecg = run.inputs.vocab.is_ecg(prompt)
        where = np.flatnonzero(is_ecg)
        logp, per_pos = _logp_grad(run.model, tokens, len(prompt), len(targets), where, None)
        raw = np.asarray(per_pos)[where].astype(np.float64)
        kept = run.inputs.vocab.from_llm(prompt[where])
        per_sample, seen, spans = _token_spans(run, payload, kept, raw, len(names), seg_len)
        mapped = float(raw.sum())
    else:
        ecg_input = pipeline.ecg_model_input(payload[1])
        logp, grad_x = _logp_grad(run.model, tokens, len(prompt), len(targets), None, ecg_input)
        grad_x = np.asarray(grad_x, np.float64)[0]
        seen = np.ones(x.shape, bool)
        if run.inputs.representation == "signal":
            raw = grad_x  # [leads, L]
            per_sample = raw.copy()
        else:
            raw = grad_x.sum(axis=-1)  # [H, W]
            per_sample = _pixels_to_samples(run, raw, len(names), seg_len)
        spans = _windows(per_sample, max(1, round(WINDOW_S * fs)))
        mapped = float(per_sample.sum())
    return Attribution(
        representation=run.inputs.representation,
        leads=names,
        fs=fs,
        raw=raw,
        per_sample=per_sample,
        seen=seen,
        spans=spans,
        total=float(raw.sum()),
        mapped=mapped,
        logp=float(logp),
        targets=targets,
    )


def _token_spans(run: Run, payload: tuple, kept: np.ndarray, raw: np.ndarray, n_leads, seg_len):
    """Samples of each ECG token in the prompt: ``(per_sample, seen, spans)``."""
    tok = run.inputs.ecg_tokenizer
    ids = payload[0]
    if isinstance(ids, tuple):  # truncation "time": per-lead ids, each lead cut at symbol s
        leads_ids, leads_len = ids
        starts = [np.cumsum(n) - n for n in leads_len]
        everything = np.sort(np.concatenate(starts))
        s = everything[len(kept)] if len(kept) < len(everything) else np.inf
        pieces = []  # (lead, start symbol, length) of each kept token, in prompt order
        for lead, (st, n) in enumerate(zip(starts, leads_len, strict=True)):
            keep = st < s
            pieces += [(lead, int(a), int(b)) for a, b in zip(st[keep], n[keep], strict=True)]
        flat = [(lead * seg_len + a, n) for lead, a, n in pieces]
        stream = np.concatenate(
            [np.asarray(i)[st < s] for i, st in zip(leads_ids, starts, strict=True)]
        )
    else:  # "head": the first ids of the lead-major stream
        lengths = tok.token_lengths(ids[: len(kept)])
        offsets = np.cumsum(lengths) - lengths
        flat = list(zip(offsets.tolist(), lengths.tolist(), strict=True))
        stream = np.asarray(ids[: len(kept)])
    if not np.array_equal(stream, kept):
        raise AssertionError("the prompt's ECG ids are not the segment's ECG-Byte ids")
    per_sample = np.zeros(n_leads * seg_len)
    seen = np.zeros(n_leads * seg_len, bool)
    spans = []
    for (start, n), score in zip(flat, raw, strict=True):
        per_sample[start : start + n] += score / n
        seen[start : start + n] = True
        pos = start
        while pos < start + n:  # one piece per lead the token covers
            lead, t = divmod(pos, seg_len)
            stop = min(start + n, (lead + 1) * seg_len)
            spans.append((lead, t, t + stop - pos, float(score)))
            pos = stop
    return per_sample.reshape(n_leads, seg_len), seen.reshape(n_leads, seg_len), spans


def _pixels_to_samples(run: Run, pixels: np.ndarray, n_leads: int, seg_len: int) -> np.ndarray:
    """Per-pixel attribution of a printout -> per sample: each panel's pixel columns summed
    and spread over the samples each column draws."""
    spec = run.inputs.spec
    leads = tuple(spec["leads"])
    geom = render.raster_geometry(
        seg_len,
        run.inputs.fs,
        spec["layout"],
        n_leads=n_leads,
        height=pixels.shape[0],
        width=pixels.shape[1],
        rhythm_lead=leads.index("II") if "II" in leads else None,  # as model_images draws it
    )
    out = np.zeros((n_leads, seg_len))
    for k, panel in enumerate(geom.paper.panels):
        r0, r1, c0, c1 = geom.panel_box(k)
        if r1 <= r0 or c1 <= c0:
            continue
        columns = pixels[r0:r1, c0:c1].sum(axis=0)  # [c1 - c0]
        samples = np.arange(panel.start, panel.stop)
        x = panel.x0 + (samples - panel.start) / geom.fs
        col = np.floor(geom.col_coord(x) + render.RASTER_EPS).astype(np.int64) - c0
        inside = (col >= 0) & (col < len(columns))
        count = np.bincount(col[inside], minlength=len(columns))
        share = np.where(count > 0, columns / np.maximum(count, 1), 0.0)
        np.add.at(out[panel.lead], samples[inside], share[col[inside]])
    return out


def _windows(per_sample: np.ndarray, window: int) -> list[tuple[int, int, int, float]]:
    """Time windows of ``window`` samples per lead and their summed attribution."""
    spans = []
    for lead, row in enumerate(per_sample):
        for start in range(0, len(row), window):
            stop = min(start + window, len(row))
            spans.append((lead, start, stop, float(row[start:stop].sum())))
    return spans


def plot_attribution(
    segment: np.ndarray,
    attribution: Attribution,
    path: str | os.PathLike,
    *,
    title: str = "",
    lines: Sequence[tuple[str, str]] = (),
    dpi: float = 80.0,
) -> Path:
    """Writes the segment's 12-lead printout with the attribution shaded (module doc) as PNG."""
    from matplotlib.collections import PatchCollection  # noqa: PLC0415 (plots only)
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    fs = attribution.fs
    n = segment.shape[-1]
    legend = (
        "gradient x input saliency of log p(answer) w.r.t. the ECG "
        + {"symbolic": "token embeddings", "signal": "signal", "image": "printout pixels"}[
            attribution.representation
        ]
        + ": orange raises the answer's probability, teal lowers it (opacity ~ |attribution|); "
        "not attention"
    )
    fig = render.plot_ecg(
        segment,
        fs,
        title=title or None,
        labels={**dict(lines), "shading": legend},
        layout="6x2",
        rhythm_lead=None,
        dpi=dpi,
    )
    ax = fig.axes[0]
    paper = render.layout_panels(12, n, fs, "6x2", rhythm_lead=None)
    row_mv = paper.height_mv / len(paper.row_baselines)
    panel_of = {p.lead: p for p in paper.panels}
    rows = [io.CANONICAL_LEADS.index(name) for name in attribution.leads]
    peak = max((abs(s) for *_, s in attribution.spans), default=0.0) or 1.0
    patches, colors = [], []

    def box(lead: int, start: float, stop: float):
        p = panel_of[lead]
        return Rectangle(
            (p.x0 + (start - p.start) / fs, p.baseline - row_mv / 2), (stop - start) / fs, row_mv
        )

    for row, start, stop, score in attribution.spans:
        if score == 0.0:
            continue
        patches.append(box(rows[row], start, stop))
        rgb = POSITIVE_COLOR if score > 0 else NEGATIVE_COLOR
        colors.append((*rgb, 0.6 * abs(score) / peak))
    grey = (0.5, 0.5, 0.5, 0.35)
    for lead in range(12):  # leads the model does not read
        if lead not in rows:
            patches.append(box(lead, 0, n))
            colors.append(grey)
    for k, row in enumerate(rows):  # samples cut by the token budget
        unseen = ~attribution.seen[k]
        if unseen.any():
            first = int(np.argmax(unseen))
            if unseen[first:].all():
                patches.append(box(row, first, n))
                colors.append(grey)
            else:
                for t in np.flatnonzero(unseen):
                    patches.append(box(row, t, t + 1))
                    colors.append(grey)
    ax.add_collection(PatchCollection(patches, facecolors=colors, edgecolors="none", zorder=0.5))
    ax.text(
        0.995,
        0.005,
        "grey: not in the model's input",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=8,
        color="0.3",
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi, facecolor=render.PAPER_COLOR)
    return path


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    """The command's arguments (the flags of ``python -m elmjax.chat``)."""

    workdir: str
    ecg: str
    question: str | None = None
    explain: str | None = None
    step: int | None = None
    segment: int = 0
    config: ml_collections.ConfigDict | None = None
    fs: float | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def _explain_path(path: str, k: int) -> Path:
    """``out.png`` for the first answer, ``out_2.png``, ``out_3.png``, ... for later ones."""
    p = Path(path)
    return p if k == 1 else p.with_name(f"{p.stem}_{k}{p.suffix or '.png'}")


def chat(
    opts: Options,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    run: Run | None = None,
) -> Session:
    """Runs the command (see the module docstring); returns the conversation.

    ``run``: an already loaded :class:`Run` of ``opts.workdir`` (tests, notebooks).
    Raises :class:`ChatError` / :class:`~elmjax.ecg.io.ECGReadError` for the errors the
    command reports with exit code 2.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout

    def say(line: str = "") -> None:
        print(line, file=stdout, flush=True)

    if run is None:
        cfg = run_config(opts.workdir, opts.config)
        run = Run(cfg, opts.workdir, step=opts.step)
    record = read_ecg(opts.ecg, fs=opts.fs)
    segs = run.segments(record)
    count = len(segs.data)
    if not 0 <= opts.segment < count:
        raise ChatError(
            f"{record.path}: --segment={opts.segment} is out of range: the record has {count} "
            f"segment{'s' * (count != 1)} (0..{count - 1})"
        )
    seconds = run.inputs.seg_len / run.inputs.fs
    t0 = int(segs.index[opts.segment]) * seconds
    say(
        f"{record.path}: {record.duration:.1f} s at {record.fs:g} Hz, leads "
        f"{', '.join(record.leads_present)} -> {count} segment{'s' * (count != 1)} of "
        f"{seconds:g} s; segment {opts.segment} ({t0:g}-{t0 + seconds:g} s)"
    )
    absent = [name for name in run.lead_names if name in record.leads_missing]
    if absent:
        say(
            f"warning: the run reads lead(s) {', '.join(absent)}, which this record lacks: the "
            "model sees a flat line there"
        )
    sampling = None
    if opts.temperature > 0:
        sampling = generate.Sampling(temperature=opts.temperature, top_p=opts.top_p)
    session = run.session(
        segs.data[opts.segment],
        max_new_tokens=opts.max_new_tokens,
        sampling=sampling,
        seed=opts.seed,
    )
    _ = run.model  # load before the first question, so the step can be printed
    say(f"checkpoint: step {run.step} of {run.workdir}")

    def answer(question: str) -> None:
        reply = session.ask(question)
        say(f"elm> {reply.text}" if opts.question is None else reply.text)
        if opts.explain:
            attribution = session.explain(reply)
            path = plot_attribution(
                session.segment,
                attribution,
                _explain_path(opts.explain, len(session.replies)),
                title=f"{Path(record.path).name}, segment {opts.segment}",
                lines=[("Q", question), ("A", reply.text or "(empty)")],
            )
            say(f"(attribution: {path})")

    if opts.question is not None:
        answer(opts.question)
        return session
    say("Ask about this ECG; 'exit' or end of input ends the conversation.")
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            say()
            break
        question = line.strip()
        if question.lower() in EXIT_WORDS:
            break
        if not question:
            continue
        try:
            answer(question)
        except ChatError as e:  # e.g. the conversation no longer fits: it stays as it was
            say(f"error: {e}")
    return session


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _WORKDIR.value or not _ECG.value:
        raise app.UsageError("--workdir=RUN and --ecg=RECORD are required")
    opts = Options(
        workdir=_WORKDIR.value,
        ecg=_ECG.value,
        question=_QUESTION.value,
        explain=_EXPLAIN.value,
        step=_STEP.value,
        segment=_SEGMENT.value,
        config=_CONFIG.value,
        fs=_FS.value,
        max_new_tokens=_MAX_NEW_TOKENS.value,
        temperature=_TEMPERATURE.value,
        top_p=_TOP_P.value,
        seed=_SEED.value,
    )
    train.enable_compilation_cache()
    try:
        chat(opts)
    except (ChatError, io.ECGReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    from absl import app, flags, logging  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "configs/X.py[:arg] (default: RUN/config.json)", lock_config=False
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "the trained run's directory")
    _ECG = flags.DEFINE_string("ecg", None, "record: WFDB path, FILE.hdf5#ROW or FILE.npy")
    _QUESTION = flags.DEFINE_string("question", None, "one question (default: interactive)")
    _EXPLAIN = flags.DEFINE_string("explain", None, "write the answer's saliency PNG here")
    _STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the last)")
    _SEGMENT = flags.DEFINE_integer("segment", 0, "which segment of the record")
    _FS = flags.DEFINE_float("fs", None, "sampling rate of a .npy record, Hz")
    _MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "answer length limit")
    _TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy")
    _TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling (with --temperature)")
    _SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
    app.run(main)
