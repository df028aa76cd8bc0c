"""Every published ECG question/instruction data set as one conversation schema.

A :class:`Conversation` is one example: an ECG record (a path relative to the root of its
dataset layout, read by :mod:`elmjax.ecg.io`), the patient it belongs to, and alternating
user/assistant turns. Adapters turn the published files into conversations:

* :func:`load_ecgqa` — ECG-QA (PTB-XL and MIMIC-IV-ECG variants), template and paraphrased.
* :func:`load_pulse` — PULSE ``ECGInstruct.json`` (images of PTB-XL, MIMIC-IV-ECG, CODE-15%).
* :func:`load_ecg_chat` — ECG-Chat ``pretrain_mimic.json`` and ``ecg_instruct_45k.json``.
* :func:`load_synthetic` — the built-in synthetic set of :mod:`elmjax.ecg.synth`.

Every adapter returns ``(conversations, report)``. Items that cannot be used are skipped and
counted, never dropped silently; the report is a plain JSON-ready dict::

    {"source": str, "files": [paths read], "items": items seen, "kept": conversations made,
     "skipped": {reason: count}, "examples": {reason: [{"file", "item", "detail"}, ...]}}

(at most :data:`MAX_EXAMPLES` examples per reason; ``item`` is the index in the file's list).
A file that is not valid JSON raises :class:`SourceFormatError` naming the file, line and
column. A record path that would leave the data root (``../``, an absolute path elsewhere, a
symlink pointing out) raises :class:`UnsafePathError`: such a file is refused, not skipped.

Decisions (differences from the reference are deliberate):

* Example ids are ``"{source}:{file}:{index}"`` (``file`` relative to the source's folder): unique
  by construction and stable as long as the published file is unchanged. Published ids
  (ECG-QA ``sample_id``, PULSE ``id``) are kept in ``meta``; they are not unique (PULSE has
  several conversations per image; ECG-QA's template and paraphrased files share sample ids).
* ECG-QA answers are a set: the assistant text is the distinct answers, sorted, joined with
  ``", "`` (the reference joined them with spaces in file order, so ``"qrs duration rr
  interval"`` could not be split back and the same answer set had several renderings). Sorted
  order equals the order of ECG-QA's own answer classes (``answers_for_each_template.csv``
  lists them sorted). The raw list stays in ``meta["answer"]``.
* Patient ids come from the dataset tables: PTB-XL ``patient_id`` (not ``ecg_id``, which the
  reference grouped by, leaking patients across splits), MIMIC-IV-ECG ``subject_id``, CODE-15%
  ``patient_id``. Patients are grouped per layout (:func:`patient_key`).
* PULSE / ECG-Chat text: ``<image>`` and ``<ecg>`` placeholders are removed wherever they
  stand, with the whitespace around them; with ``image_to_signal`` the whole words
  "image(s)"/"Image(s)" become "signal(s)"/"Signal(s)" (the reference replaced substrings, so
  "imaged" became "signald"). See :func:`clean_text`.

Splits are by patient: :func:`split_by_patient` hashes each patient (see there), and
:func:`split_published` keeps a source's own split while checking it is patient-disjoint.
:func:`expand_segments` links conversations to the preprocessed segments of their records.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from elmjax.ecg.io import LAYOUTS, Entry, list_entries

ROLES: tuple[str, ...] = ("user", "assistant")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "valid": 0.1, "test": 0.1}
MAX_EXAMPLES = 5  # skipped items listed per reason in a report

# Every question type ECG-QA publishes, and the single-ECG ones the reference trains on.
ECGQA_QUESTION_TYPES: tuple[str, ...] = (
    "single-verify",
    "single-choose",
    "single-query",
    "comparison_consecutive-verify",
    "comparison_consecutive-query",
    "comparison_irrelevant-verify",
    "comparison_irrelevant-query",
)
USED_QUESTION_TYPES: tuple[str, ...] = ("single-verify", "single-choose", "single-query")
ECGQA_DATASETS: dict[str, str] = {"ptbxl": "ptbxl", "mimic-iv-ecg": "mimic"}  # folder -> layout
ECGQA_VARIANTS: tuple[str, ...] = ("template", "paraphrased")

# First folder of a PULSE image path -> the dataset layout it shows.
PULSE_IMAGE_PREFIXES: dict[str, str] = {
    "mimic": "mimic",
    "mimic_v4": "mimic",
    "mimic-iv": "mimic",
    "mimic-iv-ecg": "mimic",
    "ptb-xl": "ptbxl",
    "ptbxl": "ptbxl",
    "ptb_xl": "ptbxl",
    "code15": "code15",
    "code15_v4": "code15",
    "code-15": "code15",
}
_ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_ROLE_KEYS = ("from", "role")
_TEXT_KEYS = ("value", "content")
_PLACEHOLDER = re.compile(r"\s*<(?:image|ecg)>\s*", re.IGNORECASE)
_IMAGE_WORD = re.compile(r"\b([Ii])mage(s?)\b")
_IMAGE_NAME = re.compile(r"^(?P<base>.+?)(?:-\d+)?\.(?:png|jpe?g)$", re.IGNORECASE)
_TABLES = {"ptbxl": "ptbxl_database.csv", "mimic": "record_list.csv", "code15": "exams.csv"}


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


class UnsafePathError(ValueError):
    """A record path from a data file resolves outside its data root."""

    def __init__(
        self, path: str, root: str | os.PathLike, source_file: Any = None, item: Any = None
    ):
        self.path = str(path)
        self.root = str(root)
        self.source_file = None if source_file is None else str(source_file)
        self.item = item
        where = f"{self.source_file or '<unknown file>'}: item {item}: "
        super().__init__(f"{where}record path {self.path!r} is outside the data root {self.root}")


class SourceFormatError(ValueError):
    """A data file that cannot be parsed; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class _Skip(Exception):
    """Raised while converting one item: the item is skipped for ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(reason)


# ----------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------


def _turns_problem(turns: Sequence[Mapping[str, Any]]) -> str | None:
    """None if ``turns`` is a valid dialogue, else the skip reason."""
    if len(turns) < 2 or len(turns) % 2:
        return "roles out of order"
    for i, turn in enumerate(turns):
        if turn.get("role") not in ROLES:
            return "unknown role"
        if turn["role"] != ROLES[i % 2]:
            return "roles out of order"
        if not isinstance(turn.get("text"), str):
            return "malformed item"
    for turn in turns:
        if not turn["text"].strip():
            return "empty answer" if turn["role"] == "assistant" else "empty question"
    return None


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One example: an ECG record and a dialogue about it.

    Attributes:
      example_id: unique, stable id (``"{source}:{file}:{index}"``; ``"#seg{k}"`` appended by
        :func:`expand_segments`).
      record: the record path relative to the root of its layout, as :mod:`elmjax.ecg.io`
        reads it: ``records500/00000/00001_hr`` (PTB-XL), ``files/p1000/p10000032/s40689238/
        40689238`` (MIMIC-IV-ECG), ``exams_part3.hdf5#1234`` (CODE-15%: HDF5 file and row, as
        in ``Record.path``).
      layout: the io layout that reads the record (``ptbxl``, ``mimic``, ``code15``,
        ``wfdb-dir``).
      patient_id: the patient, as the dataset's table spells it (see :func:`patient_key`).
      segment: which preprocessed segment of the record; None means all / decided later.
      turns: ``{"role": "user" | "assistant", "text": str}`` dicts, starting with the user,
        alternating, ending with the assistant, no empty text.
      meta: everything else: ``source``, ``file``, ``item``, question type, raw answer list,
        published ids and split, ...
    """

    example_id: str
    record: str
    layout: str
    patient_id: str
    segment: int | None
    turns: tuple[dict[str, str], ...]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not all(isinstance(t, Mapping) for t in self.turns):
            raise ValueError(f"conversation {self.example_id!r}: turns must be role/text dicts")
        turns = tuple({"role": t.get("role"), "text": t.get("text")} for t in self.turns)
        object.__setattr__(self, "turns", turns)
        object.__setattr__(self, "meta", dict(self.meta))
        problem = _turns_problem(turns)
        if problem:
            raise ValueError(f"conversation {self.example_id!r}: {problem}: {list(turns)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"conversation {self.example_id!r}: unknown layout {self.layout!r}")
        for name in ("example_id", "record", "patient_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"conversation {self.example_id!r}: {name} must be a string")
        segment = self.segment
        if segment is not None and (type(segment) is not int or segment < 0):
            raise ValueError(f"conversation {self.example_id!r}: bad segment {segment!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (turns as a list)."""
        return {
            "example_id": self.example_id,
            "record": self.record,
            "layout": self.layout,
            "patient_id": self.patient_id,
            "segment": self.segment,
            "turns": [dict(t) for t in self.turns],
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Conversation:
        """Inverse of :meth:`to_dict` (validates like the constructor)."""
        return cls(
            example_id=data["example_id"],
            record=data["record"],
            layout=data["layout"],
            patient_id=data["patient_id"],
            segment=data.get("segment"),
            turns=tuple(data["turns"]),
            meta=dict(data.get("meta") or {}),
        )


# ----------------------------------------------------------------------------------------------
# Paths, files and reports
# ----------------------------------------------------------------------------------------------


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_record(
    root: str | os.PathLike,
    relpath: str | os.PathLike,
    *,
    source_file: Any = None,
    item: Any = None,
) -> Path:
    """The absolute path of a record, refusing any path that leaves ``root``.

    ``relpath`` is relative to ``root``; an absolute path is accepted only if it lies inside
    ``root``. The path is checked lexically (``..`` components) and then with symlinks resolved,
    for the path itself and, as records are WFDB base names, for ``relpath.hea`` and
    ``relpath.dat``: a symlink anywhere on the way that points out of ``root`` is refused.
    The record need not exist.

    Args:
      root: the data root (a dataset layout's root directory).
      relpath: the record path as the data file gives it.
      source_file, item: where the path came from, for the error message.

    Returns:
      ``root / relpath`` normalised (absolute; symlinks inside the root are kept).

    Raises:
      UnsafePathError: naming ``source_file``, ``item`` and the path.
    """
    root_abs = os.path.abspath(root)
    root_real = os.path.realpath(root_abs)
    text = os.fspath(relpath)
    if "\0" in text:
        raise UnsafePathError(text, root, source_file, item)
    candidate = os.path.normpath(os.path.join(root_abs, text))  # join keeps absolute paths
    if not (_inside(candidate, root_abs) or _inside(candidate, root_real)):
        raise UnsafePathError(text, root, source_file, item)
    for target in (candidate, candidate + ".hea", candidate + ".dat"):
        if not _inside(os.path.realpath(target), root_real):
            raise UnsafePathError(text, root, source_file, item)
    return Path(candidate)


def _relative(path: Path, root: str | os.PathLike) -> str:
    """``path`` (from :func:`resolve_record`) relative to ``root``, with forward slashes."""
    root_abs = os.path.abspath(root)
    base = root_abs if _inside(str(path), root_abs) else os.path.realpath(root_abs)
    return Path(os.path.relpath(path, base)).as_posix()


def _read_json_list(path: Path) -> list[Any]:
    """The top-level list of a JSON file; SourceFormatError names the file and position."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise SourceFormatError(
            path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise SourceFormatError(path, f"not UTF-8 text at byte {e.start}: {e.reason}") from None
    if not isinstance(data, list):
        raise SourceFormatError(path, f"expected a JSON list of items, got {type(data).__name__}")
    return data


class _Report:
    """Counts what an adapter read, kept and skipped (see the module docstring)."""

    def __init__(self, source: str):
        self.source = source
        self.files: list[str] = []
        self.items = 0
        self.kept = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, Any]]] = {}

    def skip(self, reason: str, file: Path, item: int, detail: str = "") -> None:
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append({"file": str(file), "item": item, "detail": detail})

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "files": list(self.files),
            "items": self.items,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": {k: self.examples[k] for k in sorted(self.examples)},
        }


class _Records:
    """The records of one dataset layout (from :func:`elmjax.ecg.io.list_entries`), looked up
    by the dataset's id or by path, and turned into safe relative record paths."""

    def __init__(self, layout: str, root: str | os.PathLike):
        self.layout = layout
        self.root = os.path.abspath(root)
        self.table = Path(self.root) / _TABLES[layout]
        entries, missing = list_entries(layout, self.root)
        self.by_id: dict[str, Entry] = {e.record_id: e for e in entries}
        self.missing_ids = {str(m["record_id"]) for m in missing}
        self.by_path: dict[str, Entry] = {}
        self.missing_paths: set[str] = set()
        self._records: dict[str, str] = {}  # record_id -> checked relative path
        if layout == "mimic":
            self.by_path = {self._key(e.path): e for e in entries}
            self.missing_paths = {self._key(m["path"]) for m in missing}

    def _key(self, path: str) -> str:
        return Path(os.path.relpath(os.path.normpath(path), self.root)).as_posix()

    def _not_found(self, found: bool, missing: bool, what: str) -> None:
        if not found:
            where = "record file not found" if missing else f"not in {self.table.name}"
            raise _Skip("missing record", f"{what}: {where}")

    def find_id(self, record_id: int) -> Entry:
        """The entry of a dataset id (PTB-XL ecg_id, MIMIC study_id, CODE-15 exam_id)."""
        key = str(record_id)
        self._not_found(key in self.by_id, key in self.missing_ids, f"{self.layout} id {key}")
        return self.by_id[key]

    def find_path(self, relpath: str) -> Entry:
        """The entry of a record path relative to the root (MIMIC)."""
        self._not_found(relpath in self.by_path, relpath in self.missing_paths, relpath)
        return self.by_path[relpath]

    def record_of(self, entry: Entry) -> str:
        """The entry's record path relative to the root (``file#row`` for CODE-15%)."""
        if entry.record_id not in self._records:  # many items share one record: check it once
            where = f"{self.layout} record {entry.record_id}"
            path = resolve_record(self.root, entry.path, source_file=self.table, item=where)
            relpath = _relative(path, self.root)
            if self.layout == "code15":
                relpath = f"{relpath}#{entry.index}"
            self._records[entry.record_id] = relpath
        return self._records[entry.record_id]


def _as_int(value: Any) -> int | None:
    """An id given as an int or a string of digits, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------


def clean_text(text: str, image_to_signal: bool = True) -> str:
    """Cleans one turn of an instruction data set.

    Removes the ``<image>`` / ``<ecg>`` placeholders (any case) with the whitespace around
    them (a newline if that whitespace held one, else a space, so the words on either side stay
    apart), strips the ends, and with ``image_to_signal`` replaces the whole words "image",
    "images", "Image", "Images" by "signal(s)" / "Signal(s)".
    """
    text = _PLACEHOLDER.sub(lambda m: "\n" if "\n" in m.group(0) else " ", text).strip()
    if image_to_signal:
        text = _IMAGE_WORD.sub(lambda m: ("S" if m.group(1) == "I" else "s") + "ignal" + m[2], text)
    return text


def _dialogue(item: Mapping[str, Any], image_to_signal: bool) -> tuple[dict[str, str], ...]:
    """The cleaned turns of an instruction item; raises _Skip for unusable ones."""
    raw = item.get("conversations", item.get("conversation"))
    if not isinstance(raw, list):
        raise _Skip("malformed item", "no 'conversations' list")
    turns = []
    for turn in raw:
        if not isinstance(turn, Mapping):
            raise _Skip("malformed item", f"turn is not an object: {turn!r}")
        role = next((turn[k] for k in _ROLE_KEYS if k in turn), None)
        text = next((turn[k] for k in _TEXT_KEYS if k in turn), None)
        if not isinstance(text, str):
            raise _Skip("malformed item", f"turn text is not a string: {turn!r}")
        name = _ROLE_NAMES.get(str(role).strip().lower()) if isinstance(role, str) else None
        if name is None:
            raise _Skip("unknown role", f"role {role!r}")
        turns.append({"role": name, "text": clean_text(text, image_to_signal)})
    problem = _turns_problem(turns)
    if problem:
        raise _Skip(problem, " / ".join(t["role"] for t in turns))
    return tuple(turns)


# ----------------------------------------------------------------------------------------------
# ECG-QA and the synthetic set
# ----------------------------------------------------------------------------------------------


def _template_options(path: Path) -> dict[int, list[str]]:
    """ECG-QA ``answers_for_each_template.csv``: template id -> its answer classes."""
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {
            int(row["template_id"]): ast.literal_eval(row["classes"]) for row in csv.DictReader(f)
        }


def render_answer(answers: Iterable[str]) -> str:
    """ECG-QA answer list (a set) -> assistant text: distinct answers, sorted, ", "-joined."""
    return ", ".join(sorted({a.strip() for a in answers if a.strip()}))


def _ecgqa_conversation(
    item: Any,
    example_id: str,
    records: _Records,
    question_types: Sequence[str],
    options: Mapping[int, list[str]],
    meta: dict[str, Any],
) -> Conversation:
    """One ECG-QA item -> a conversation; raises _Skip for unusable items."""
    needed = ("question_type", "question", "answer", "ecg_id")
    if not isinstance(item, Mapping) or any(k not in item for k in needed):
        raise _Skip("malformed item", f"not an object with keys {list(needed)}")
    qtype = item["question_type"]
    if qtype not in ECGQA_QUESTION_TYPES:
        raise _Skip(f"unknown question type {qtype}")
    if qtype not in question_types:
        raise _Skip(f"question type {qtype} not used")
    ecg_ids = item["ecg_id"] if isinstance(item["ecg_id"], list) else [item["ecg_id"]]
    ids = [_as_int(e) for e in ecg_ids]
    if not ids or None in ids:
        raise _Skip("malformed item", f"ecg_id {item['ecg_id']!r}")
    if len(ids) > 1:
        raise _Skip("more than one ECG", f"ecg_id {ids}")
    question, answer = item["question"], item["answer"]
    answer = answer if isinstance(answer, list) else [answer]
    if not isinstance(question, str) or not all(isinstance(a, str) for a in answer):
        raise _Skip("malformed item", "question or answer is not text")
    if not question.strip():
        raise _Skip("empty question")
    text = render_answer(answer)
    if not text:
        raise _Skip("empty answer", f"answer {answer!r}")
    entry = records.find_id(ids[0])
    template_id = _as_int(item.get("template_id"))
    meta.update(
        question_type=qtype,
        attribute_type=item.get("attribute_type"),
        template_id=item.get("template_id"),
        question_id=item.get("question_id"),
        sample_id=item.get("sample_id"),
        ecg_id=ids[0],
        answer=list(item["answer"]) if isinstance(item["answer"], list) else item["answer"],
        attribute=item.get("attribute"),
        options=options.get(template_id) if template_id is not None else None,
    )
    return Conversation(
        example_id=example_id,
        record=records.record_of(entry),
        layout=records.layout,
        patient_id=entry.patient_id,
        segment=None,
        turns=({"role": "user", "text": question.strip()}, {"role": "assistant", "text": text}),
        meta=meta,
    )


def load_ecgqa(
    ecgqa_dir: str | os.PathLike,
    records_root: str | os.PathLike,
    dataset: str = "ptbxl",
    *,
    variants: Sequence[str] = ECGQA_VARIANTS,
    splits: Sequence[str] = SPLITS,
    question_types: Sequence[str] = USED_QUESTION_TYPES,
    source: str | None = None,
) -> tuple[list[Conversation], dict[str, Any]]:
    """Loads ECG-QA question/answer files.

    Reads ``{ecgqa_dir}/{dataset}/{variant}/{split}/*.json`` (files in sorted order) and, if
    present, ``{ecgqa_dir}/{dataset}/answers_for_each_template.csv`` (the answer classes of
    each template, kept as ``meta["options"]``). Each kept item becomes one conversation: the
    question, then the answer set rendered by :func:`render_answer`.

    Records: PTB-XL ``ecg_id`` -> ``ptbxl_database.csv`` (``filename_hr``, i.e.
    ``records500/{ecg_id // 1000 * 1000:05d}/{ecg_id:05d}_hr``; patient ``patient_id``);
    MIMIC-IV-ECG ``study_id`` -> ``record_list.csv`` (``path``; patient ``subject_id``).

    Skip reasons: ``question type X not used`` (a known ECG-QA type outside
    ``question_types``), ``unknown question type X`` (not an ECG-QA type), ``more than one
    ECG``, ``missing record`` (not in the table, or its file is not on disk), ``empty
    question``, ``empty answer``, ``malformed item``.

    Args:
      ecgqa_dir: the folder that holds ``ptbxl/`` and ``mimic-iv-ecg/``.
      records_root: root of the PTB-XL or MIMIC-IV-ECG layout the ids refer to.
      dataset: ``"ptbxl"`` or ``"mimic-iv-ecg"``.
      variants: which of ``template``, ``paraphrased`` to read.
      splits: which published splits to read; the split is kept in ``meta["split"]``.
      question_types: the ECG-QA question types to keep.
      source: the ``meta["source"]`` name (default ``"ecgqa-{dataset}"``).

    Returns:
      ``(conversations, report)``.

    Raises:
      FileNotFoundError: no ECG-QA JSON file was found.
      SourceFormatError: a file is not valid JSON (names file, line and column).
      UnsafePathError: a table's record path leaves the data root.
      elmjax.ecg.io.ECGReadError: the dataset's table is missing or malformed.
    """
    if dataset not in ECGQA_DATASETS:
        raise ValueError(f"dataset must be one of {list(ECGQA_DATASETS)}, got {dataset!r}")
    unknown = [t for t in question_types if t not in ECGQA_QUESTION_TYPES]
    if unknown:
        raise ValueError(f"unknown ECG-QA question types {unknown}")
    source = source or f"ecgqa-{dataset}"
    base = Path(ecgqa_dir) / dataset
    files = [
        (variant, split, path)
        for variant in variants
        for split in splits
        for path in sorted((base / variant / split).glob("*.json"))
    ]
    if not files:
        raise FileNotFoundError(f"{base}: no ECG-QA files {{{','.join(variants)}}}/*/*.json")
    options = _template_options(base / "answers_for_each_template.csv")
    records = _Records(ECGQA_DATASETS[dataset], records_root)
    report = _Report(source)
    conversations = []
    for variant, split, path in files:
        report.files.append(str(path))
        name = f"{variant}/{split}/{path.name}"
        for index, item in enumerate(_read_json_list(path)):
            report.items += 1
            meta = {
                "source": source,
                "file": name,
                "item": index,
                "dataset": dataset,
                "variant": variant,
                "split": split,
            }
            try:
                example_id = f"{source}:{name}:{index}"
                conversations.append(
                    _ecgqa_conversation(item, example_id, records, question_types, options, meta)
                )
            except _Skip as skip:
                report.skip(skip.reason, path, index, skip.detail)
    report.kept = len(conversations)
    return conversations, report.as_dict()


def load_synthetic(
    root: str | os.PathLike,
    *,
    variants: Sequence[str] = ECGQA_VARIANTS,
    splits: Sequence[str] = SPLITS,
) -> tuple[list[Conversation], dict[str, Any]]:
    """Loads the built-in synthetic set written by :func:`elmjax.ecg.synth.generate_corpus`.

    Its ECG-QA files (``root/ecgqa/ptbxl/...``) are read by :func:`load_ecgqa` against its
    ``ptbxl_database.csv``; ``meta["source"]`` is ``"synthetic"`` and ``meta["split"]`` the
    published split, which follows PTB-XL's ``strat_fold`` and is patient-disjoint.
    """
    root = Path(root)
    return load_ecgqa(
        root / "ecgqa", root, "ptbxl", variants=variants, splits=splits, source="synthetic"
    )


# ----------------------------------------------------------------------------------------------
# Instruction sets: PULSE ECGInstruct and ECG-Chat
# ----------------------------------------------------------------------------------------------


def pulse_image_record(image: str) -> tuple[str, str] | None:
    """Maps a PULSE image path back to its record: ``(layout, key)``, or None if unrecognised.

    Rules (the image name is ``<record>-<k>.png``; ``-<k>`` is optional):

    * ``mimic/`` (or ``mimic_v4/``, ``mimic-iv/``, ``mimic-iv-ecg/``) ``+ p1000/p10000032/
      s40689238/40689238-0.png`` -> ``("mimic", "files/p1000/p10000032/s40689238/40689238")``:
      the folders are kept, ``files/`` is prefixed unless present, the suffix is dropped. The
      caller resolves this path with :func:`resolve_record`.
    * ``ptb-xl/`` (or ``ptbxl/``, ``ptb_xl/``) ``+ .../00001_hr-0.png`` -> ``("ptbxl", "1")``:
      the ``ecg_id`` from the name (``_hr``/``_lr`` optional); the folders are ignored.
    * ``code15/`` (or ``code15_v4/``, ``code-15/``) ``+ .../2508875-0.png`` ->
      ``("code15", "2508875")``: the ``exam_id`` from the name; the folders are ignored.
    """
    parts = PurePosixPath(image).parts
    layout = PULSE_IMAGE_PREFIXES.get(parts[0].lower()) if len(parts) >= 2 else None
    match = _IMAGE_NAME.match(parts[-1]) if parts else None
    if layout is None or match is None:
        return None
    base = match["base"]
    if layout == "mimic":
        folders = list(parts[1:-1])
        if not folders or folders[0] != "files":
            folders.insert(0, "files")
        return "mimic", "/".join([*folders, base])
    number = re.fullmatch(r"(\d+)(?:_(?:hr|lr))?" if layout == "ptbxl" else r"(\d+)", base)
    return None if number is None else (layout, str(int(number[1])))


def _check_roots(roots: Mapping[str, Any], allowed: Sequence[str]) -> dict[str, str]:
    unknown = [k for k in roots if k not in allowed]
    if unknown:
        raise ValueError(f"roots may only name {list(allowed)}, got {unknown}")
    return {k: os.path.abspath(v) for k, v in roots.items()}


def load_pulse(
    path: str | os.PathLike,
    roots: Mapping[str, str | os.PathLike],
    *,
    image_to_signal: bool = True,
    source: str = "pulse-ecginstruct",
) -> tuple[list[Conversation], dict[str, Any]]:
    """Loads PULSE ``ECGInstruct.json``: ``[{id, image, conversations: [{from, value}]}]``.

    The image path is mapped back to its record by :func:`pulse_image_record`; MIMIC paths are
    checked by :func:`resolve_record` and looked up in ``record_list.csv``, PTB-XL and CODE-15%
    ids in ``ptbxl_database.csv`` and ``exams.csv``. Text is cleaned by :func:`clean_text`.
    Accepted variants: ``conversations`` or ``conversation``; roles ``human``/``gpt`` or
    ``user``/``assistant`` (key ``from`` or ``role``, text ``value`` or ``content``);
    placeholders anywhere.

    Skip reasons: ``unrecognised image path``, ``no data root for X`` (X not in ``roots``),
    ``missing record``, ``unknown role``, ``roles out of order``, ``empty question``, ``empty
    answer``, ``malformed item``.

    Args:
      path: the JSON file.
      roots: data roots by layout: any of ``"ptbxl"``, ``"mimic"``, ``"code15"``.
      image_to_signal: replace "image" by "signal" in the text (see :func:`clean_text`).
      source: the ``meta["source"]`` name.

    Returns:
      ``(conversations, report)``.

    Raises:
      SourceFormatError: the file is not valid JSON.
      UnsafePathError: a MIMIC image path leaves the MIMIC root.
    """
    roots = _check_roots(roots, ("ptbxl", "mimic", "code15"))
    path = Path(path)
    records: dict[str, _Records] = {}  # built on first use: only the layouts that occur
    report = _Report(source)
    report.files.append(str(path))
    conversations = []
    for index, item in enumerate(_read_json_list(path)):
        report.items += 1
        try:
            if not isinstance(item, Mapping) or not isinstance(item.get("image"), str):
                raise _Skip("malformed item", "not an object with an 'image' path")
            turns = _dialogue(item, image_to_signal)
            found = pulse_image_record(item["image"])
            if found is None:
                raise _Skip("unrecognised image path", repr(item["image"]))
            layout, key = found
            if layout not in roots:
                raise _Skip(f"no data root for {layout}", item["image"])
            if layout not in records:
                records[layout] = _Records(layout, roots[layout])
            if layout == "mimic":
                where = resolve_record(roots[layout], key, source_file=path, item=index)
                entry = records[layout].find_path(_relative(where, roots[layout]))
            else:
                entry = records[layout].find_id(int(key))
            conversations.append(
                Conversation(
                    example_id=f"{source}:{path.name}:{index}",
                    record=records[layout].record_of(entry),
                    layout=layout,
                    patient_id=entry.patient_id,
                    segment=None,
                    turns=turns,
                    meta={
                        "source": source,
                        "file": path.name,
                        "item": index,
                        "original_id": item.get("id"),
                        "image": item["image"],
                        "record_id": entry.record_id,
                    },
                )
            )
        except _Skip as skip:
            report.skip(skip.reason, path, index, skip.detail)
    report.kept = len(conversations)
    return conversations, report.as_dict()


def ecg_chat_record(ecg: str) -> str:
    """An ECG-Chat ``ecg`` path -> the MIMIC-IV-ECG record path to resolve against the root.

    ``files/p1000/p10000032/s40689238/40689238`` is kept; a path without the leading
    ``files/`` (relative to MIMIC-IV-ECG's ``files/``) gets it; a ``.hea``/``.dat`` extension is
    dropped; an absolute path is kept as it is (:func:`resolve_record` accepts it only inside
    the root).
    """
    text = re.sub(r"\.(hea|dat)$", "", ecg.strip())
    if os.path.isabs(text) or PurePosixPath(text).parts[:1] == ("files",):
        return text
    return f"files/{text}"


def load_ecg_chat(
    path: str | os.PathLike,
    mimic_root: str | os.PathLike,
    *,
    image_to_signal: bool = True,
    source: str | None = None,
) -> tuple[list[Conversation], dict[str, Any]]:
    """Loads ECG-Chat ``pretrain_mimic.json`` / ``ecg_instruct_45k.json``.

    Items are ``{id, ecg, conversations: [{from, value}]}`` with ``ecg`` a MIMIC-IV-ECG record
    path (see :func:`ecg_chat_record`), checked by :func:`resolve_record` and looked up in
    ``record_list.csv`` for the patient. Text is cleaned by :func:`clean_text`; the same
    variants as :func:`load_pulse` are accepted.

    Skip reasons: ``missing record``, ``unknown role``, ``roles out of order``, ``empty
    question``, ``empty answer``, ``malformed item``.

    Args:
      path: the JSON file.
      mimic_root: the MIMIC-IV-ECG root (with ``record_list.csv`` and ``files/``).
      image_to_signal: replace "image" by "signal" in the text.
      source: the ``meta["source"]`` name (default ``"ecgchat-{file stem}"``).

    Returns:
      ``(conversations, report)``.

    Raises:
      SourceFormatError: the file is not valid JSON.
      UnsafePathError: an ``ecg`` path leaves the MIMIC root.
    """
    path = Path(path)
    source = source or f"ecgchat-{path.stem}"
    root = os.path.abspath(mimic_root)
    records: _Records | None = None
    report = _Report(source)
    report.files.append(str(path))
    conversations = []
    for index, item in enumerate(_read_json_list(path)):
        report.items += 1
        try:
            if not isinstance(item, Mapping) or not isinstance(item.get("ecg"), str):
                raise _Skip("malformed item", "not an object with an 'ecg' path")
            turns = _dialogue(item, image_to_signal)
            where = resolve_record(root, ecg_chat_record(item["ecg"]), source_file=path, item=index)
            records = records or _Records("mimic", root)
            entry = records.find_path(_relative(where, root))
            conversations.append(
                Conversation(
                    example_id=f"{source}:{path.name}:{index}",
                    record=records.record_of(entry),
                    layout="mimic",
                    patient_id=entry.patient_id,
                    segment=None,
                    turns=turns,
                    meta={
                        "source": source,
                        "file": path.name,
                        "item": index,
                        "original_id": item.get("id"),
                        "ecg": item["ecg"],
                        "record_id": entry.record_id,
                    },
                )
            )
        except _Skip as skip:
            report.skip(skip.reason, path, index, skip.detail)
    report.kept = len(conversations)
    return conversations, report.as_dict()


# ----------------------------------------------------------------------------------------------
# Splits and segments
# ----------------------------------------------------------------------------------------------


def patient_key(conversation: Conversation) -> str:
    """The unit of splitting: ``"{layout}:{patient_id}"``.

    Patients are grouped per layout, so the same MIMIC subject is one patient whether it comes
    from ECG-QA, PULSE or ECG-Chat, while PTB-XL patient 7 and CODE-15% patient 7 stay apart.
    """
    return f"{conversation.layout}:{conversation.patient_id}"


def _check_fractions(fractions: Mapping[str, float]) -> None:
    if not fractions or any(not (v > 0) for v in fractions.values()):
        raise ValueError(f"fractions must be positive, got {dict(fractions)}")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {dict(fractions)}")


def hash_split(key: str, fractions: Mapping[str, float], seed: int = 0) -> str:
    """The split of one patient key: ``sha256(f"{seed}:{key}")`` -> u uniform in [0, 1), then
    the first split whose cumulative fraction (in the order of ``fractions``) exceeds u.

    Each patient's split depends on its own key and the seed only, so adding or removing
    patients never moves the others.
    """
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    total = 0.0
    names = list(fractions)
    for name in names:
        total += fractions[name]
        if u < total:
            return name
    return names[-1]  # float round-off at the top end


def split_by_patient(
    conversations: Iterable[Conversation],
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[str, list[Conversation]]:
    """Splits conversations so that no patient is in two splits.

    Each patient (:func:`patient_key`) goes to :func:`hash_split` of its key: deterministic by
    seed, and stable when patients are added. The fractions hold for patients in expectation,
    not exactly, and not for conversations (patients differ in their number of conversations).

    Returns:
      ``{split: conversations}`` for every split in ``fractions``, in input order.
    """
    _check_fractions(fractions)
    out: dict[str, list[Conversation]] = {name: [] for name in fractions}
    cache: dict[str, str] = {}
    for conversation in conversations:
        key = patient_key(conversation)
        if key not in cache:
            cache[key] = hash_split(key, fractions, seed)
        out[cache[key]].append(conversation)
    return out


def patient_overlap(splits: Mapping[str, Sequence[Conversation]]) -> dict[str, int]:
    """Number of patients shared by each pair of splits: ``{"train/test": n, ...}``."""
    patients = {name: {patient_key(c) for c in items} for name, items in splits.items()}
    names = list(splits)
    return {
        f"{a}/{b}": len(patients[a] & patients[b])
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }


def split_published(
    conversations: Iterable[Conversation],
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    *,
    on_overlap: str = "raise",
) -> tuple[dict[str, list[Conversation]], dict[str, Any]]:
    """Keeps each source's published split (``meta["split"]``) and checks it is patient-disjoint.

    A conversation without a published split follows its patient's published split where the
    patient has one (e.g. a PULSE item about a PTB-XL patient whom ECG-QA puts in test), and
    otherwise goes to :func:`hash_split` of its patient, so the result stays patient-level.

    Args:
      conversations: the conversations (mixed sources allowed).
      fractions: the split names, and the fractions for patients without a published split.
        Published split names must be among them.
      seed: seed of :func:`hash_split`.
      on_overlap: what to do when a patient appears in more than one published split:
        ``"raise"`` a ValueError with the counts, or ``"report"``: keep the published split
        as it is (it leaks) and count the overlap in the report.

    Returns:
      ``(splits, report)``; the report has ``overlap`` (:func:`patient_overlap` of the
      result), ``overlap_patients`` (patients in more than one published split),
      ``overlap_examples`` (some of their keys), and conversation counts ``published``,
      ``followed_patient``, ``hashed``.
    """
    _check_fractions(fractions)
    if on_overlap not in ("raise", "report"):
        raise ValueError(f"on_overlap must be 'raise' or 'report', got {on_overlap!r}")
    conversations = list(conversations)
    published: dict[str, set[str]] = {}
    for c in conversations:
        split = c.meta.get("split")
        if split is not None:
            if split not in fractions:
                raise ValueError(f"{c.example_id}: published split {split!r} not in fractions")
            published.setdefault(patient_key(c), set()).add(split)
    overlapping = sorted(k for k, v in published.items() if len(v) > 1)
    out: dict[str, list[Conversation]] = {name: [] for name in fractions}
    counts = Counter()
    for c in conversations:
        key = patient_key(c)
        if c.meta.get("split") is not None:
            split, how = c.meta["split"], "published"
        elif len(published.get(key, ())) == 1:
            split, how = next(iter(published[key])), "followed_patient"
        else:
            split, how = hash_split(key, fractions, seed), "hashed"
        counts[how] += 1
        out[split].append(c)
    report = {
        "overlap": patient_overlap(out),
        "overlap_patients": len(overlapping),
        "overlap_examples": overlapping[:MAX_EXAMPLES],
        "published": counts["published"],
        "followed_patient": counts["followed_patient"],
        "hashed": counts["hashed"],
    }
    if overlapping and on_overlap == "raise":
        raise ValueError(
            f"published splits share {len(overlapping)} patients "
            f"(e.g. {overlapping[:MAX_EXAMPLES]}); pairs: {report['overlap']}"
        )
    return out, report


def expand_segments(
    conversations: Iterable[Conversation], n_segments_by_record: Mapping[str, int]
) -> tuple[list[Conversation], dict[str, Any]]:
    """Links each conversation to every available segment of its record.

    As the reference does, a conversation about a record with k preprocessed segments becomes k
    conversations with ``segment`` 0..k-1. Their ids are ``"{example_id}#seg{j}"`` (unique as
    the input ids are) and ``meta["base_example_id"]`` keeps the original id. Patient and meta
    are unchanged, so splitting by patient before or after expanding gives the same result and
    all segments of a record stay in one split.

    Args:
      conversations: conversations with ``segment`` None and unique ids.
      n_segments_by_record: number of segments per ``Conversation.record``.

    Returns:
      ``(expanded, report)``; the report counts ``conversations``, ``expanded`` and
      ``without_segments`` (records absent from the mapping or with 0 segments; these
      conversations are dropped) with a few ``examples``.
    """
    out: list[Conversation] = []
    seen: set[str] = set()
    missing: list[str] = []
    n_in = 0
    for c in conversations:
        n_in += 1
        if c.segment is not None:
            raise ValueError(f"{c.example_id}: already linked to segment {c.segment}")
        if c.example_id in seen:
            raise ValueError(f"duplicate example id {c.example_id!r}")
        seen.add(c.example_id)
        n = int(n_segments_by_record.get(c.record, 0))
        if n <= 0:
            missing.append(c.example_id)
            continue
        for j in range(n):
            meta = {**c.meta, "base_example_id": c.example_id}
            out.append(
                dataclasses.replace(c, example_id=f"{c.example_id}#seg{j}", segment=j, meta=meta)
            )
    report = {
        "conversations": n_in,
        "expanded": len(out),
        "without_segments": len(missing),
        "examples": missing[:MAX_EXAMPLES],
    }
    return out, report
