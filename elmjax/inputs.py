"""What a run's model sees, rebuilt outside its shards: evaluation ablations, perturbations, chat.

``RunInputs(cfg, workdir)`` reads a prepared run directory (``shards/manifest.json``, its text
tokenizer and, for the symbolic representation, its ECG-Byte tokenizer) and turns a
preprocessed ECG segment (float ``[12, seg_len]`` mV at ``data.target_fs``, as
:mod:`elmjax.ecg.preprocess` writes them) and a conversation into an example exactly as
``python -m elmjax.prepare`` did: the same lead selection, ECG-Byte encoding or rendering
(:func:`elmjax.prepare.ecg_ids_of` / :func:`elmjax.prepare.ecg_inputs_of`), chat template,
system prompt, budget and truncation policy (:func:`elmjax.prepare.make_example`). Rebuilding a
test example from its own segment gives back the stored example id for id (a test checks it),
so an ablation or a perturbation changes the ECG and nothing else.

- ``payloads(x [B, 12, L])`` -> one ``(ecg_ids, ecg_input)`` per ECG: the ECG-Byte ids (symbolic;
  ``ecg_input`` None) or the placeholder block and the float16 signal / uint8 printout;
- ``example(conversation, payload)`` -> the shard record (``input_ids``, ``answer_spans``,
  ``ecg``, ...);
- ``prompt(turns, payload)`` -> the ids to generate the next answer from (chat: the
  conversation so far ends with a user turn; the assistant header is appended);
- ``segment(conversation)`` -> the preprocessed segment a prepared conversation is about (from
  ``WORKDIR/segments``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from elmjax import prepare
from elmjax.data import sources
from elmjax.ecg import preprocess
from elmjax.tokenize import ecgbyte, text


def vocab_of(manifest: dict[str, Any]) -> text.EcgVocab:
    """The LLM id layout a run's shards were made with."""
    v = manifest["vocab"]
    return text.EcgVocab(
        v["text_vocab_size"],
        v["ecg_vocab_size"],
        markers=v["markers"],
        text_pad_id=v["text_pad_id"],
    )


def _tokenizer_path(recorded: str, workdir: Path, default: Path) -> Path:
    """A tokenizer path from the manifest (relative to where prepare ran), else the workdir's."""
    path = Path(recorded)
    if path.exists():
        return path
    if default.exists():
        return default
    raise FileNotFoundError(
        f"{workdir}: the run's tokenizer {recorded} is missing (nor at {default}); run "
        "python -m elmjax.prepare with the run's config again"
    )


class RunInputs:
    """Rebuilds the examples of a prepared run (see the module docstring)."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | Path):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.manifest = prepare.load_manifest(self.workdir)
        self.representation = self.manifest["representation"]
        self.vocab = vocab_of(self.manifest)
        t = self.manifest["text_tokenizer"]
        path = _tokenizer_path(t["path"], self.workdir, self.workdir / "tokenizers" / "text")
        self.text_tokenizer = text.load_text_tokenizer(path, template=t["family"])
        self.ecg_tokenizer = None
        if self.symbolic:
            e = self.manifest["ecg_tokenizer"]
            default = self.workdir / "tokenizers" / "ecgbyte.json"
            self.ecg_tokenizer = ecgbyte.ECGByteTokenizer.load(
                _tokenizer_path(e["path"], self.workdir, default)
            )
        self.leads = prepare.lead_indices(cfg)
        self.fs = float(cfg.data.target_fs)
        self.seg_len = int(cfg.data.seg_len)
        self.spec = None
        if not self.symbolic:
            self.spec = prepare.ecg_input_spec(cfg) | {"fs": self.fs}
        self._segments = None

    @property
    def symbolic(self) -> bool:
        return self.representation == "symbolic"

    @property
    def placeholder_id(self) -> int | None:
        return self.manifest.get("placeholder_id")

    def check_segment(self, x: np.ndarray, name: str = "ECG") -> np.ndarray:
        """``x`` as float32 ``[B, 12, seg_len]`` (a single ``[12, seg_len]`` gets a batch axis)."""
        x = np.asarray(x, np.float32)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[1] != 12 or x.shape[2] != self.seg_len:
            raise ValueError(
                f"{name}: shape {x.shape[-2:] if x.ndim >= 2 else x.shape}, expected "
                f"[12, {self.seg_len}] (12 leads, {self.seg_len / self.fs:g} s at {self.fs:g} Hz)"
            )
        return x

    def payloads(self, x: np.ndarray) -> list[tuple[Any, np.ndarray | None]]:
        """``(ecg_ids, ecg_input)`` of each ECG of ``x [B, 12, L]`` (see the module docstring)."""
        x = self.check_segment(x)
        if self.leads is not None:
            x = x[:, self.leads]
        if self.symbolic:
            return [(p, None) for p in prepare.ecg_ids_of(self.cfg, self.ecg_tokenizer, x)]
        placeholders = np.zeros(int(self.manifest["ecg_tokens"]), np.int32)
        return [(placeholders, a) for a in prepare.ecg_inputs_of(self.spec, x)]

    def example(
        self, conversation: dict[str, Any] | sources.Conversation, payload: tuple
    ) -> dict[str, Any]:
        """The shard record of ``conversation`` with the ECG ``payload``."""
        if isinstance(conversation, dict):
            conversation = sources.Conversation.from_dict(conversation)
        ids, ecg_input = payload
        return prepare.make_example(
            self.text_tokenizer,
            conversation,
            ids,
            vocab=self.vocab,
            budget=int(self.cfg.budget),
            policy=self.cfg.truncation if self.symbolic else "head",
            system=self.cfg.text.system_prompt or None,
            ecg_input=ecg_input,
        )

    def prompt(self, turns: list[dict[str, str]], payload: tuple) -> np.ndarray:
        """Ids that ask for the next assistant turn after ``turns`` (which end with the user's)."""
        ids, _ = payload
        lengths = None
        if isinstance(ids, tuple):
            ids, lengths = ids
        ex = text.build_example(
            self.text_tokenizer,
            turns,
            ids,
            budget=int(self.cfg.budget),
            policy=self.cfg.truncation if self.symbolic else "head",
            system=self.cfg.text.system_prompt or None,
            ecg_vocab=self.vocab,
            add_generation_prompt=True,
            token_lengths=lengths,
        )
        return ex.input_ids.astype(np.int32)

    def segment(self, conversation: dict[str, Any] | sources.Conversation) -> np.ndarray:
        """The preprocessed ``[12, seg_len]`` segment a prepared conversation is about."""
        if isinstance(conversation, dict):
            conversation = sources.Conversation.from_dict(conversation)
        if self._segments is None:
            seg_dir = self.workdir / "segments"
            if not (seg_dir / "manifest.jsonl").exists():
                raise FileNotFoundError(
                    f"{seg_dir}: no preprocessed segments (python -m elmjax.prepare writes them)"
                )
            by_record, _, fetch = prepare.segment_index(seg_dir, Path(self.cfg.data.root))
            self._segments = (by_record, fetch)
        by_record, fetch = self._segments
        rows = by_record.get(conversation.record)
        if rows is None or conversation.segment is None or conversation.segment >= len(rows):
            raise KeyError(
                f"{conversation.example_id}: segment {conversation.segment} of record "
                f"{conversation.record} is not in {self.workdir / 'segments'}"
            )
        return np.asarray(fetch(rows[conversation.segment]), np.float32)


def preprocess_record(
    signal: np.ndarray, fs: float, cfg: ml_collections.ConfigDict
) -> preprocess.Segments:
    """A raw recording ``[12, n]`` (mV at ``fs``) -> its segments, preprocessed exactly as the
    run's ``prepare`` did (filter, denoise, resample to ``data.target_fs``, cut into
    ``data.seg_len``; segments with NaN/inf are left out)."""
    pp_cfg = preprocess.PreprocessConfig(
        target_fs=cfg.data.target_fs, seg_len=cfg.data.seg_len, mode=cfg.data.preprocess_mode
    )
    return preprocess.preprocess_segments(np.asarray(signal, np.float32), float(fs), pp_cfg)
