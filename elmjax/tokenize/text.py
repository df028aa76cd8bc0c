"""The LLM side of an ECG-language model: text tokenizer, chat format, ECG ids, model examples.

Text tokenizer
--------------
``load_text_tokenizer(dir)`` reads a local Hugging Face tokenizer directory (``tokenizer.json``, or
a SentencePiece ``tokenizer.model`` that ``transformers`` converts) plus ``tokenizer_config.json``
/ ``special_tokens_map.json`` / ``chat_template.jinja``. Nothing is downloaded. Every tokenizer
ends up as a ``tokenizers.Tokenizer``, the engine behind ``transformers``' fast tokenizers.

Chat format
-----------
Three families, written out in Python so that every token's role is known, and tested against
``transformers.apply_chat_template`` with each family's real Jinja template:

- ``llama3``: the plain Llama 3 template (Meta-Llama-3-Instruct), as in the reference::

      <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{sys}<|eot_id|>
      <|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|>
      <|start_header_id|>assistant<|end_header_id|>\\n\\n{a}<|eot_id|>

  The Llama 3.1/3.2 templates add a "Cutting Knowledge Date / Today Date" block to the system
  message; we do not: the date changes the prompt with the calendar, and the reference trained
  without it. A tokenizer whose template has the date block is still formatted the plain way.
  Message texts are stripped, as the template's ``| trim`` does.
- ``chatml``: Qwen 2.5's ChatML, with Qwen's default system prompt when none is given (only if
  the tokenizer's template carries it)::

      <|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n
      <|im_start|>assistant\\n{a}<|im_end|>\\n

- ``gemma``: Gemma 2, which has no system role (its template raises on one). A system prompt is
  prepended to the first user message as ``system + "\\n\\n" + question`` (what Gemma 3's template
  does); pass ``system=None`` to leave it out, as the reference did::

      <bos><start_of_turn>user\\n{q}<end_of_turn>\\n<start_of_turn>model\\n{a}<end_of_turn>\\n

The role header (e.g. ``<|im_start|>assistant\\n``) and the message text are tokenized
separately, so a generation prompt is always an exact prefix of the training sequence. For the
byte-level tokenizers of these families this gives the same ids as tokenizing the whole rendered
string (special tokens split it anyway); a message that itself starts with whitespace could
tokenize differently at that boundary.

ECG ids in the LLM vocabulary
-----------------------------
ECG-Byte ids ``0..V_ecg-1`` map to ``text_vocab_size + ecg_id``, followed by the ``<ecg>`` and
``</ecg>`` markers (optional) and, only if the text tokenizer has no pad token, one pad id
(``EcgVocab``). No strings are added to the text tokenizer; ``decode`` drops these ids.

Examples
--------
``build_example`` is the one function that turns (turns, ECG ids, budget) into a model example
for shard preparation, evaluation and chat. The ECG block goes at the start of the first user
message. The text is never cut; the ECG gets the rest of the budget, cut by one of two policies:

- ``head``: the first N ids of the lead-major stream (the reference; for T = 1024 this is the
  first lead or two).
- ``time``: the same first seconds of every lead: the largest number of symbols ``s`` such that
  the tokens that start before symbol ``s`` of each lead fit, all leads concatenated in order.

Evaluation calls it with the reference answer still in ``turns`` and ``add_generation_prompt=True``:
the answer counts toward the budget but is withheld from ``input_ids``, so the prompt is exactly
the training sequence up to the answer, ECG cut included.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

FAMILIES: tuple[str, ...] = ("llama3", "chatml", "gemma")
POLICIES: tuple[str, ...] = ("head", "time")

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Our wording of the reference's end-to-end system prompt (data/system_prompt_e2e.txt).
ECG_SYSTEM_PROMPT = (
    "You are an expert multimodal assistant for electrocardiography. You are given a 12-lead "
    "ECG as a sequence of signal tokens, followed by a question about it. Read the ECG as a "
    "cardiac electrophysiologist would, considering rhythm, rate, intervals, axis, waveform "
    "morphology and ST-T changes, and answer the question accurately and concisely."
)

# The templates train_local_tokenizer writes; the ones the Python formatting matches.
LLAMA3_CHAT_TEMPLATE = (  # Meta-Llama-3-8B-Instruct, verbatim
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CHATML_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \
\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # Qwen2.5-Instruct, verbatim (long lines joined with backslash-newline)
GEMMA_CHAT_TEMPLATE = (  # gemma-2-*-it, verbatim
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class _Family:
    """What a chat family needs from the vocabulary, and what train_local_tokenizer writes."""

    control: tuple[str, ...]  # tokens the format itself emits (besides bos)
    eot: str  # ends every message; the stop token for generation
    specials: tuple[str, ...]  # all special tokens of a locally trained tokenizer
    bos: str | None
    eos: str
    pad: str | None
    chat_template: str


_FAMILY: dict[str, _Family] = {
    "llama3": _Family(
        control=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        eot="<|eot_id|>",
        specials=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,  # as Llama 3: no pad token (EcgVocab then provides one)
        chat_template=LLAMA3_CHAT_TEMPLATE,
    ),
    "chatml": _Family(
        control=("<|im_start|>", "<|im_end|>"),
        eot="<|im_end|>",
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=CHATML_CHAT_TEMPLATE,
    ),
    "gemma": _Family(
        control=("<start_of_turn>", "<end_of_turn>"),
        eot="<end_of_turn>",
        specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        chat_template=GEMMA_CHAT_TEMPLATE,
    ),
}

# Llama 3's pre-tokenizer split (Qwen 2 uses the same one with single digits).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ----------------------------------------------------------------------------------------------
# Text tokenizer
# ----------------------------------------------------------------------------------------------


class TextTokenizer:
    """A text tokenizer with its chat family and special ids.

    Attributes:
      backend: the ``tokenizers.Tokenizer`` doing the work.
      template: the chat family, one of ``FAMILIES``.
      vocab_size: number of text ids, added special tokens included (largest id + 1).
      bos_id, eos_id, pad_id: the tokenizer's own special ids, or None where it has none (Llama 3
        has no pad; ``EcgVocab`` then appends a dedicated pad id after the ECG block).
      eot_id: the end-of-turn id that closes every message (``<|eot_id|>``, ``<|im_end|>``,
        ``<end_of_turn>``).
      stop_ids: ids that end generation (end of turn and eos).
      default_system: the system prompt used when ``system=None`` (Qwen's, for a ChatML
        tokenizer whose template has it; else None).
      chat_template: the raw Jinja chat template, if the directory had one.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        template: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        name: str = "<in memory>",
    ):
        if template not in FAMILIES:
            raise ValueError(f"{name}: unknown chat template family {template!r}; use {FAMILIES}")
        family = _FAMILY[template]
        self.backend = backend
        self.template = template
        self.name = name
        self.chat_template = chat_template
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        if bos_token is None and template != "chatml":
            bos_token = family.bos  # the format needs a bos; use the family's usual one
        self.bos_id = None if bos_token is None else self._require(bos_token, "bos_token")
        self.eos_id = None if eos_token is None else self._require(eos_token, "eos_token")
        self.pad_id = None if pad_token is None else self._require(pad_token, "pad_token")
        self.eot_id = self._require(family.eot, "end of turn")
        self._control = {t: self._require(t, "control token") for t in family.control}
        self.stop_ids = tuple(sorted({self.eot_id} | ({self.eos_id} - {None})))
        self.default_system = None
        if template == "chatml" and chat_template and QWEN_DEFAULT_SYSTEM in chat_template:
            self.default_system = QWEN_DEFAULT_SYSTEM
        added = backend.get_added_tokens_decoder()
        special = {i for i, token in added.items() if token.special}
        special |= set(self._control.values()) | {self.eot_id}
        special |= {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        self.special_ids = frozenset(special)
        self._cache: dict[str, list[int]] = {}

    def _require(self, token: str, what: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"{self.name}: {what} {token!r} (for the {self.template} chat format) is not in "
                "the vocabulary"
            )
        return token_id

    def __repr__(self) -> str:
        return (
            f"TextTokenizer({self.name!r}, template={self.template!r}, "
            f"vocab_size={self.vocab_size})"
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS or other special tokens are added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (e.g. ``"<|eot_id|>"``), or None."""
        return self.backend.token_to_id(token)

    def decode(
        self, ids: Iterable[int], skip_special: bool = True, ecg_vocab: EcgVocab | None = None
    ) -> str:
        """Text of ``ids``.

        Ids outside the text vocabulary (ECG ids, ``<ecg>``/``</ecg>``, our pad, -100 labels)
        are not text: they are dropped with ``skip_special=True``; otherwise they are shown as
        ``ecg_vocab.token_name(id)`` (``<ecg_17>``, ``<ecg>``, ...) or ``<id_N>``.
        ``skip_special`` also drops the text tokenizer's special tokens (bos, end of turn, ...).
        """
        pieces: list[str] = []
        run: list[int] = []
        for token_id in map(int, ids):
            if 0 <= token_id < self.vocab_size:
                if not (skip_special and token_id in self.special_ids):
                    run.append(token_id)
                continue
            if skip_special:
                continue
            if run:
                pieces.append(self.backend.decode(run, skip_special_tokens=False))
                run = []
            if (
                ecg_vocab is not None
                and ecg_vocab.text_vocab_size <= token_id < ecg_vocab.total_size
            ):
                pieces.append(ecg_vocab.token_name(token_id))
            else:
                pieces.append(f"<id_{token_id}>")
        if run:
            pieces.append(self.backend.decode(run, skip_special_tokens=False))
        return "".join(pieces)

    # Cached token ids of the fixed parts of the chat format.
    def _cached(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.encode(text)
        return self._cache[text]

    def _header(self, role: str) -> list[int]:
        """Ids that open a message of ``role`` ("system", "user" or "assistant")."""
        c = self._control
        if self.template == "llama3":
            return [
                c["<|start_header_id|>"],
                *self._cached(role),
                c["<|end_header_id|>"],
                *self._cached("\n\n"),
            ]
        if self.template == "chatml":
            return [c["<|im_start|>"], *self._cached(role + "\n")]
        gemma_role = "model" if role == "assistant" else role
        return [c["<start_of_turn>"], *self._cached(gemma_role + "\n")]

    def _trailer(self) -> list[int]:
        """Ids after a message's end-of-turn token (a newline for ChatML and Gemma)."""
        return [] if self.template == "llama3" else self._cached("\n")

    def _clean(self, text: str) -> str:
        """Message text as the family's template writes it (Llama 3 and Gemma 2 trim it)."""
        return text if self.template == "chatml" else text.strip()


def load_text_tokenizer(path: str | Path, template: str | None = None) -> TextTokenizer:
    """Loads a local Hugging Face tokenizer directory; nothing is downloaded.

    Reads ``tokenizer.json`` (with ``tokenizers``) or, without it, a SentencePiece
    ``tokenizer.model`` (converted by ``transformers.AutoTokenizer``, local files only), and the
    bos/eos/pad tokens and chat template from ``tokenizer_config.json``,
    ``special_tokens_map.json``, ``chat_template.jinja`` or ``chat_template.json``.

    Args:
      path: the tokenizer directory.
      template: the chat family (``"llama3"``, ``"chatml"``, ``"gemma"``); by default it is
        detected from the chat template, else from the special tokens in the vocabulary.

    Raises:
      FileNotFoundError: the directory or its tokenizer files are missing.
      ValueError: a file is not a valid tokenizer, or the chat family cannot be told.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    config = _read_json(path / "tokenizer_config.json")
    special_map = _read_json(path / "special_tokens_map.json")
    backend = _load_backend(path)

    def special(key: str) -> str | None:
        value = config[key] if key in config else special_map.get(key)
        if isinstance(value, Mapping):  # older AddedToken serialisation
            value = value.get("content")
        return value

    chat_template = _read_chat_template(path, config)
    if template is None:
        template = _detect_family(chat_template, backend)
        if template is None:
            raise ValueError(
                f"{path}: cannot tell the chat template family from its chat template or special "
                f"tokens; pass template= one of {FAMILIES}"
            )
    return TextTokenizer(
        backend,
        template=template,
        bos_token=special("bos_token"),
        eos_token=special("eos_token"),
        pad_token=special("pad_token"),
        chat_template=chat_template,
        name=str(path),
    )


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return value


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    if (path / "tokenizer.json").is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            raise ValueError(f"{path}: tokenizer.json is not a valid tokenizer: {e}") from e
    if (path / "tokenizer.model").is_file():
        import transformers  # slow to import; only SentencePiece directories need it

        try:
            hf = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot load tokenizer.model: {e}") from e
        backend = getattr(hf, "backend_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise ValueError(
                f"{path}: transformers loaded {type(hf).__name__}, which has no fast "
                "(tokenizers) backend"
            )
        return backend
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")


def _read_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", template[0].get("template") if template else None)
    return template


def _detect_family(chat_template: str | None, backend: tokenizers.Tokenizer) -> str | None:
    markers = {
        "llama3": "<|start_header_id|>",
        "chatml": "<|im_start|>",
        "gemma": "<start_of_turn>",
    }
    if chat_template:
        for family, marker in markers.items():
            if marker in chat_template:
                return family
    for family, marker in markers.items():
        if backend.token_to_id(marker) is not None:
            return family
    return None


def train_local_tokenizer(
    texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 512, family: str = "llama3"
) -> Path:
    """Trains a small byte-level BPE and writes it as a Hugging Face tokenizer directory.

    For tests and demos. The tokenizer splits text like Llama 3 (its regex, then bytes), has the
    family's special tokens and bos/eos/pad settings (Llama 3: bos, eos = ``<|eot_id|>``, no pad;
    ChatML: no bos, eos = ``<|im_end|>``, pad = ``<|endoftext|>``; Gemma: ``<bos>``, ``<eos>``,
    ``<pad>``, with the special tokens first as in Gemma), and its real chat template.
    ``transformers.AutoTokenizer`` and ``load_text_tokenizer`` both load the directory.

    Args:
      texts: training text.
      out_dir: directory to write (created if needed).
      vocab_size: BPE vocabulary size, the 256 byte tokens included, special tokens excluded
        (the trainer may stop earlier on a small corpus).
      family: ``"llama3"``, ``"chatml"`` or ``"gemma"``.

    Returns:
      ``out_dir`` as a Path, holding ``tokenizer.json``, ``tokenizer_config.json`` and
      ``special_tokens_map.json``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    spec = _FAMILY[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials_first = family == "gemma"
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + (len(spec.specials) if specials_first else 0),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(spec.specials) if specials_first else [],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if not specials_first:
        tok.add_special_tokens(list(spec.specials))
    if spec.bos is not None:  # like the real ones: add_special_tokens=True prepends bos
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A",
            pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, tok.token_to_id(spec.bos))],
        )
    tok.save(str(out_dir / "tokenizer.json"))

    special_map = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad}
    special_map = {k: v for k, v in special_map.items() if v is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": spec.chat_template,
    }
    if spec.bos is None:
        config["bos_token"] = None  # as Qwen 2.5 writes it
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special_map, indent=2), encoding="utf-8"
    )
    return out_dir


# ----------------------------------------------------------------------------------------------
# ECG ids in the LLM vocabulary
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EcgVocab:
    """Where the ECG ids live in the LLM vocabulary.

    Layout (ids): ``[0, text_vocab_size)`` text | ``text_vocab_size + ecg_id`` for
    ``ecg_id in [0, ecg_vocab_size)`` | ``<ecg>``, ``</ecg>`` if ``markers`` | a pad id if
    ``text_pad_id`` is None (the text tokenizer has no pad token). ``total_size`` is the number
    of embedding rows the LLM needs.

    Attributes:
      text_vocab_size: first id after the text vocabulary (``tok.vocab_size``, or the model's
        embedding size if that is larger and its spare rows should stay unused).
      ecg_vocab_size: number of ECG-Byte ids.
      markers: whether ``<ecg>``/``</ecg>`` ids exist and enclose the ECG.
      text_pad_id: the text tokenizer's pad id, or None to append a dedicated one.
    """

    text_vocab_size: int
    ecg_vocab_size: int
    markers: bool = True
    text_pad_id: int | None = None

    def __post_init__(self):
        if self.text_vocab_size <= 0 or self.ecg_vocab_size <= 0:
            raise ValueError(f"vocabulary sizes must be positive: {self}")
        if self.text_pad_id is not None and not 0 <= self.text_pad_id < self.text_vocab_size:
            raise ValueError(f"text_pad_id must be a text id: {self}")

    @classmethod
    def for_tokenizer(
        cls, tok: TextTokenizer, ecg_vocab_size: int, *, markers: bool = True
    ) -> EcgVocab:
        """The ECG block right after ``tok``'s vocabulary, reusing its pad token if it has one."""
        return cls(tok.vocab_size, ecg_vocab_size, markers=markers, text_pad_id=tok.pad_id)

    @property
    def start_id(self) -> int | None:
        """Id of ``<ecg>``, or None without markers."""
        return self.text_vocab_size + self.ecg_vocab_size if self.markers else None

    @property
    def end_id(self) -> int | None:
        """Id of ``</ecg>``, or None without markers."""
        return self.text_vocab_size + self.ecg_vocab_size + 1 if self.markers else None

    @property
    def pad_id(self) -> int:
        """The pad id: the text tokenizer's, else the last id of the block."""
        if self.text_pad_id is not None:
            return self.text_pad_id
        return self.text_vocab_size + self.ecg_vocab_size + (2 if self.markers else 0)

    @property
    def total_size(self) -> int:
        """Number of LLM ids (embedding rows) needed."""
        extra = (2 if self.markers else 0) + (1 if self.text_pad_id is None else 0)
        return self.text_vocab_size + self.ecg_vocab_size + extra

    def to_llm(self, ecg_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """ECG-Byte ids -> LLM ids (int32, same shape). Raises ValueError when out of range."""
        ids = np.asarray(ecg_ids)
        if ids.size == 0:
            return np.zeros(ids.shape, np.int32)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ECG ids must be integers; got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.ecg_vocab_size):
            raise ValueError(
                f"ECG ids must be in [0, {self.ecg_vocab_size}); got [{ids.min()}, {ids.max()}]"
            )
        return (ids.astype(np.int64) + self.text_vocab_size).astype(np.int32)

    def is_ecg(self, llm_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Boolean mask of the LLM ids that are ECG ids (not markers, not pad)."""
        ids = np.asarray(llm_ids)
        return (ids >= self.text_vocab_size) & (ids < self.text_vocab_size + self.ecg_vocab_size)

    def from_llm(self, llm_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """LLM ids -> ECG-Byte ids (int32). Raises ValueError if any id is not an ECG id."""
        ids = np.asarray(llm_ids)
        if not self.is_ecg(ids).all():
            raise ValueError("from_llm got ids that are not ECG ids; select them with is_ecg")
        return (ids - self.text_vocab_size).astype(np.int32)

    def token_name(self, llm_id: int) -> str:
        """Display name of an id of the block: ``<ecg_17>``, ``<ecg>``, ``</ecg>`` or ``<pad>``."""
        llm_id = int(llm_id)
        if self.text_vocab_size <= llm_id < self.text_vocab_size + self.ecg_vocab_size:
            return f"<ecg_{llm_id - self.text_vocab_size}>"
        if llm_id == self.start_id:
            return "<ecg>"
        if llm_id == self.end_id:
            return "</ecg>"
        if self.text_pad_id is None and llm_id == self.pad_id:
            return "<pad>"
        raise ValueError(f"id {llm_id} is not in the ECG block [{self.text_vocab_size}, ...)")


# ----------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------


class TextTooLongError(ValueError):
    """The text of an example (with the ECG markers) does not fit the token budget."""

    def __init__(self, name: str | None, needed: int, budget: int):
        self.name = name
        self.needed = needed
        self.budget = budget
        super().__init__(
            f"example {name!r}: the text needs {needed} tokens (ECG markers included) but the "
            f"budget is {budget}"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One model example (unpadded).

    Attributes:
      input_ids: int32 [n] LLM ids.
      loss_mask: bool [n]; True exactly on assistant answer tokens and each answer's
        end-of-turn token.
      ecg_span: (start, end) of the ECG ids in ``input_ids`` (markers excluded), or None when
        the example has no ECG.
      ecg_kept, ecg_dropped: number of ECG ids kept and cut off.
      ecg_symbols: for ``policy="time"``, the number of leading symbols ``s`` covered in every
        lead; else None.
      answer_spans: (start, end) of each answer (end-of-turn included) in ``input_ids``; the
        prompt to generate answer k is ``input_ids[:answer_spans[k][0]]``.
      prompt_len: with ``add_generation_prompt``, where generation starts (``len(input_ids)``);
        else None.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    ecg_span: tuple[int, int] | None
    ecg_kept: int
    ecg_dropped: int
    ecg_symbols: int | None
    answer_spans: tuple[tuple[int, int], ...]
    prompt_len: int | None


# Kinds of chat segments: text (not trained), answer (trained), ecg (the slot of the ECG block),
# withheld (the reference answer at evaluation: counted in the budget, not emitted).
_TEXT, _ANSWER, _ECG, _WITHHELD = "text", "answer", "ecg", "withheld"


def _check_turns(turns: Sequence[Mapping[str, str]], name: str | None) -> None:
    if not turns:
        raise ValueError(f"example {name!r}: no turns")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.get("role") != expected or not isinstance(turn.get("text"), str):
            raise ValueError(
                f"example {name!r}: turn {i} must be {{'role': {expected!r}, 'text': str}} "
                f"(turns alternate user/assistant, starting with user); got {dict(turn)!r}"
            )


def _render_chat(
    tok: TextTokenizer,
    turns: Sequence[Mapping[str, str]],
    *,
    system: str | None,
    with_ecg: bool,
    add_generation_prompt: bool,
) -> list[tuple[str, list[int]]]:
    """The conversation as (kind, ids) segments, in order."""
    if system is None:
        system = tok.default_system
    withhold_last = add_generation_prompt and turns[-1]["role"] == "assistant"
    segments: list[tuple[str, list[int]]] = []
    if tok.template != "chatml":
        segments.append((_TEXT, [tok.bos_id]))
    if system is not None and tok.template != "gemma":
        system_ids = tok._header("system") + tok.encode(tok._clean(system)) + [tok.eot_id]
        segments.append((_TEXT, system_ids + tok._trailer()))
    for i, turn in enumerate(turns):
        segments.append((_TEXT, tok._header(turn["role"])))
        text = tok._clean(turn["text"])
        if turn["role"] == "user":
            prefix = ""
            if i == 0 and tok.template == "gemma" and system is not None:
                prefix = system.strip() + "\n\n"  # Gemma has no system role
            if i == 0 and with_ecg:
                segments.append((_TEXT, tok.encode(prefix)))
                segments.append((_ECG, []))
                segments.append((_TEXT, tok.encode(text)))
            else:
                segments.append((_TEXT, tok.encode(tok._clean(prefix + text))))
            segments.append((_TEXT, [tok.eot_id] + tok._trailer()))
        else:
            withheld = withhold_last and i == len(turns) - 1
            segments.append((_WITHHELD if withheld else _ANSWER, tok.encode(text) + [tok.eot_id]))
            segments.append((_WITHHELD if withheld else _TEXT, tok._trailer()))
    if add_generation_prompt and turns[-1]["role"] == "user":
        segments.append((_TEXT, tok._header("assistant")))
    return segments


def _cut_ecg(
    ecg: np.ndarray | Sequence[np.ndarray],
    room: int | None,
    policy: str,
    token_lengths: Sequence[np.ndarray] | None,
) -> tuple[np.ndarray, int, int | None]:
    """Returns (kept ECG ids, total number of ids, symbols covered per lead or None)."""
    if policy == "head":
        if isinstance(ecg, np.ndarray):
            stream = ecg
        else:
            stream = np.concatenate([np.asarray(lead) for lead in ecg]) if len(ecg) else []
        stream = np.asarray(stream)
        if stream.ndim != 1:
            raise ValueError(f"policy 'head' needs a 1-D id stream; got shape {stream.shape}")
        return stream[:room], stream.size, None

    # policy == "time"
    if isinstance(ecg, np.ndarray) or token_lengths is None or len(token_lengths) != len(ecg):
        raise ValueError(
            "policy 'time' needs a list of per-lead id arrays and token_lengths, one per lead"
        )
    leads = [np.asarray(lead) for lead in ecg]
    lengths = [np.asarray(n) for n in token_lengths]
    for k, (lead, n) in enumerate(zip(leads, lengths, strict=True)):
        if lead.ndim != 1 or lead.shape != n.shape:
            raise ValueError(f"lead {k}: ids {lead.shape} and token_lengths {n.shape} differ")
        if n.size and n.min() < 1:
            raise ValueError(f"lead {k}: token lengths must be >= 1")
    starts = [np.cumsum(n) - n for n in lengths]  # symbol offset where each token starts
    total = sum(lead.size for lead in leads)
    if room is None or total <= room:
        symbols = max((int(n.sum()) for n in lengths), default=0)
        return np.concatenate(leads) if leads else np.zeros(0, np.int32), total, symbols
    # The number of tokens starting before symbol s, summed over leads, is the count of all
    # start offsets < s. The largest s for which that count is <= room is the (room+1)-th
    # smallest offset: all offsets below it are fewer than room+1, and s+1 would admit it.
    symbols = int(np.sort(np.concatenate(starts))[room])
    kept = [
        lead[: np.searchsorted(st, symbols, side="left")]
        for lead, st in zip(leads, starts, strict=True)
    ]
    return np.concatenate(kept), total, symbols


def build_example(
    tok: TextTokenizer,
    turns: Sequence[Mapping[str, str]],
    ecg: np.ndarray | Sequence[np.ndarray] | None,
    *,
    budget: int | None,
    policy: str = "head",
    system: str | None = None,
    ecg_vocab: EcgVocab | None = None,
    add_generation_prompt: bool = False,
    token_lengths: Sequence[np.ndarray] | None = None,
    name: str | None = None,
) -> Example:
    """Turns a conversation and an ECG into a model example within a token budget.

    The one function used by shard preparation, evaluation and chat. The ECG block
    (``<ecg>`` ids ``</ecg>``, markers per ``ecg_vocab``) opens the first user message, before
    its text (for Gemma after the merged system prompt). The text is never cut; the ECG gets
    ``budget - text tokens - markers`` ids:

    - ``policy="head"``: the first ids of the lead-major stream.
    - ``policy="time"``: every lead cut at the same symbol ``s``, the largest such that the
      tokens starting before symbol ``s`` of each lead fit; kept tokens concatenated lead by
      lead. ``s`` is ``Example.ecg_symbols``.

    Train/eval identity: at evaluation pass the same turns, reference answer included, with
    ``add_generation_prompt=True``. A final assistant turn is then withheld: it counts toward the
    budget exactly as in training but is left out of ``input_ids``, which end with the
    assistant header. So the prompt equals the training ``input_ids[:prompt_len]``, ECG ids
    included. With a final user turn (chat) an assistant header is appended and the ECG gets
    all the remaining budget (pass ``budget=T - max_new_tokens`` to leave room to generate).
    For earlier answers of a multi-turn example use ``answer_spans`` of the training example.

    Args:
      tok: the text tokenizer.
      turns: ``[{"role": "user" | "assistant", "text": str}, ...]``, alternating, user first.
      ecg: ECG-Byte ids: a 1-D lead-major stream, or a list of per-lead 1-D arrays (required
        for ``policy="time"``; ``head`` concatenates them); None for a text-only example.
      budget: the token budget T, or None for no limit (the whole ECG).
      policy: ``"head"`` or ``"time"``.
      system: system prompt; None uses the template's default (Qwen's for ChatML, else none).
      ecg_vocab: the ECG id layout; required when ``ecg`` is given.
      add_generation_prompt: build an inference prompt (see above).
      token_lengths: for ``policy="time"``, per lead the number of symbols of each token
        (same shapes as the per-lead ids); ignored by ``head``.
      name: the example's name, for error messages.

    Raises:
      TextTooLongError: the text (plus markers) alone exceeds ``budget``.
      ValueError: malformed turns, ECG ids or arguments.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown truncation policy {policy!r}; use one of {POLICIES}")
    _check_turns(turns, name)
    if ecg is not None:
        if ecg_vocab is None:
            raise ValueError("build_example needs ecg_vocab when an ECG is given")
        if ecg_vocab.text_vocab_size < tok.vocab_size:
            raise ValueError(
                f"ecg_vocab.text_vocab_size {ecg_vocab.text_vocab_size} < text vocabulary size "
                f"{tok.vocab_size}: ECG ids would overlap text ids"
            )
    segments = _render_chat(
        tok,
        turns,
        system=system,
        with_ecg=ecg is not None,
        add_generation_prompt=add_generation_prompt,
    )
    text_len = sum(len(ids) for kind, ids in segments if kind != _ECG)
    n_markers = 2 if ecg is not None and ecg_vocab.markers else 0
    room = None
    if budget is not None:
        room = budget - text_len - n_markers
        if room < 0:
            raise TextTooLongError(name, text_len + n_markers, budget)

    ecg_block: list[int] = []
    kept = dropped = 0
    symbols = None
    if ecg is not None:
        kept_ids, total, symbols = _cut_ecg(ecg, room, policy, token_lengths)
        kept, dropped = int(kept_ids.size), int(total - kept_ids.size)
        ecg_block = ecg_vocab.to_llm(kept_ids).tolist()

    input_ids: list[int] = []
    loss_mask: list[bool] = []
    answer_spans: list[tuple[int, int]] = []
    ecg_span = None
    for kind, ids in segments:
        if kind == _WITHHELD:
            continue
        if kind == _ECG:
            if ecg_vocab.markers:
                ids = [ecg_vocab.start_id, *ecg_block, ecg_vocab.end_id]
                ecg_span = (len(input_ids) + 1, len(input_ids) + 1 + kept)
            else:
                ids = ecg_block
                ecg_span = (len(input_ids), len(input_ids) + kept)
        if kind == _ANSWER:
            answer_spans.append((len(input_ids), len(input_ids) + len(ids)))
        input_ids.extend(ids)
        loss_mask.extend([kind == _ANSWER] * len(ids))
    return Example(
        input_ids=np.asarray(input_ids, dtype=np.int32),
        loss_mask=np.asarray(loss_mask, dtype=bool),
        ecg_span=ecg_span,
        ecg_kept=kept,
        ecg_dropped=dropped,
        ecg_symbols=symbols,
        answer_spans=tuple(answer_spans),
        prompt_len=len(input_ids) if add_generation_prompt else None,
    )
