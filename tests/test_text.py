"""Tests for elmjax.tokenize.text: tokenizer loading, chat formats (parity with transformers'
apply_chat_template on the real Jinja templates), ECG id layout, example assembly and truncation.

All tokenizers are trained here, in seconds; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from elmjax.tokenize.text import (
    ECG_SYSTEM_PROMPT,
    FAMILIES,
    GEMMA_CHAT_TEMPLATE,
    LLAMA3_CHAT_TEMPLATE,
    QWEN_DEFAULT_SYSTEM,
    EcgVocab,
    TextTooLongError,
    build_example,
    load_text_tokenizer,
    train_local_tokenizer,
)

CORPUS = [
    "What is the heart rate of this ECG? The heart rate is about 72 beats per minute.",
    "Is there atrial fibrillation?\nNo, the rhythm is regular sinus rhythm.",
    "Does this ECG show ST elevation in the inferior leads II, III and aVF?",
    "The QRS complex is wide (about 140 ms), consistent with a left bundle branch block.",
    "Résumé: normal axis, PR interval 160 ms, QTc 420 ms — no acute changes. 😀",
    "You are an expert assistant. Answer the question about the ECG briefly.",
    "yes no maybe normal abnormal sinus bradycardia tachycardia",
] * 20

SYSTEM = "You are a careful cardiologist."
Q1 = "What is the heart rate of this ECG?"
A1 = "About 72 beats per minute."
Q2 = "Is there ST elevation in II, III and aVF?"
A2 = "No, the ST segments are normal."
TURNS = [{"role": "user", "text": Q1}, {"role": "assistant", "text": A1}]
TURNS2 = TURNS + [{"role": "user", "text": Q2}, {"role": "assistant", "text": A2}]

# The real templates as they appear in the models' tokenizer_config.json (JSON-escaped).
LLAMA3_TEMPLATE_JSON = (
    r'"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '
    r"'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    r"trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    r"{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>"
    r"assistant<|end_header_id|>\n\n' }}{% endif %}" + '"'
)
GEMMA2_TEMPLATE_JSON = (
    '"'
    r"{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
    r"not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') "
    r"!= (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/"
    r"assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    r"{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ "
    r"'<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    '"'
)


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text_tokenizers")
    return {f: train_local_tokenizer(CORPUS, root / f, vocab_size=400, family=f) for f in FAMILIES}


@pytest.fixture(scope="session")
def toks(tok_dirs):
    return {f: load_text_tokenizer(d) for f, d in tok_dirs.items()}


@pytest.fixture(scope="session")
def hf_toks(tok_dirs):
    transformers = pytest.importorskip("transformers")
    return {
        f: transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        for f, d in tok_dirs.items()
    }


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> Path:
    """A Gemma-like SentencePiece directory: tokenizer.model + tokenizer_config.json only."""
    spm = pytest.importorskip("sentencepiece")
    out = tmp_path_factory.mktemp("sp_gemma")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        add_dummy_prefix=False,  # as Gemma's tokenizer.model
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "chat_template": GEMMA_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def hf_messages(family: str, turns, system: str | None) -> list[dict[str, str]]:
    """The same conversation as transformers messages (Gemma: system merged into user 1)."""
    messages = [{"role": t["role"], "content": t["text"]} for t in turns]
    if system is not None:
        if family == "gemma":
            messages[0]["content"] = system.strip() + "\n\n" + messages[0]["content"].strip()
        else:
            messages.insert(0, {"role": "system", "content": system})
    return messages


def hf_ids(hf, messages, add_generation_prompt=False) -> list[int]:
    out = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def flatten(pieces):
    """[(ids, trained), ...] -> (ids, mask) as arrays."""
    ids = [i for part, _ in pieces for i in part]
    mask = [flag for part, flag in pieces for _ in part]
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def text_len(tok, turns, **kwargs) -> int:
    """Number of text tokens of an ECG example (markers excluded)."""
    vocab = EcgVocab.for_tokenizer(tok, 50)
    ex = build_example(tok, turns, np.zeros(0, np.int32), budget=None, ecg_vocab=vocab, **kwargs)
    return ex.input_ids.size - 2


# ----------------------------------------------------------------------------------------------
# Loading


def test_local_tokenizers_write_the_real_templates(tok_dirs):
    configs = {
        f: json.loads((d / "tokenizer_config.json").read_text()) for f, d in tok_dirs.items()
    }
    assert configs["llama3"]["chat_template"] == json.loads(LLAMA3_TEMPLATE_JSON)
    assert configs["gemma"]["chat_template"] == json.loads(GEMMA2_TEMPLATE_JSON)
    assert LLAMA3_CHAT_TEMPLATE == json.loads(LLAMA3_TEMPLATE_JSON)
    assert QWEN_DEFAULT_SYSTEM in configs["chatml"]["chat_template"]
    assert configs["chatml"]["bos_token"] is None
    assert configs["llama3"]["eos_token"] == "<|eot_id|>" and "pad_token" not in configs["llama3"]


def test_special_ids_and_vocab_size(toks, hf_toks):
    for family, tok in toks.items():
        hf = hf_toks[family]
        assert tok.template == family
        assert tok.vocab_size == len(hf)
        assert tok.bos_id == hf.bos_token_id
        assert tok.eos_id == hf.eos_token_id
        assert tok.pad_id == hf.pad_token_id
    llama, chatml, gemma = toks["llama3"], toks["chatml"], toks["gemma"]
    assert llama.pad_id is None
    assert llama.eot_id == llama.token_to_id("<|eot_id|>") == llama.eos_id
    assert llama.bos_id == llama.token_to_id("<|begin_of_text|>")
    assert chatml.bos_id is None
    assert chatml.eot_id == chatml.token_to_id("<|im_end|>")
    assert chatml.pad_id == chatml.token_to_id("<|endoftext|>")
    assert chatml.default_system == QWEN_DEFAULT_SYSTEM
    assert (gemma.pad_id, gemma.eos_id, gemma.bos_id) == (0, 1, 2)  # specials first, as Gemma
    assert gemma.eot_id == gemma.token_to_id("<end_of_turn>")
    assert gemma.stop_ids == (gemma.eos_id, gemma.eot_id)
    assert llama.default_system is None and gemma.default_system is None


def test_encode_adds_no_specials_and_roundtrips(toks, hf_toks):
    text = "Résumé: QTc 420 ms — wide QRS 😀"
    for family, tok in toks.items():
        ids = tok.encode(text)
        assert ids == hf_toks[family].encode(text, add_special_tokens=False)
        assert tok.bos_id is None or tok.bos_id not in ids
        assert tok.decode(ids) == text
    assert toks["llama3"].encode("") == []
    # Picklable, for data-loader worker processes.
    copy = pickle.loads(pickle.dumps(toks["gemma"]))
    assert copy.encode(text) == toks["gemma"].encode(text) and copy.eot_id == toks["gemma"].eot_id


def test_sentencepiece_directory_loads(sp_dir):
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    tok = load_text_tokenizer(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert tok.template == "gemma"
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.eot_id == sp.piece_to_id("<end_of_turn>") == 5
    text = "Is there atrial fibrillation?\nNo, the rhythm is regular."
    assert tok.encode(text) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == text
    hf = transformers.AutoTokenizer.from_pretrained(str(sp_dir), local_files_only=True)
    assert tok.vocab_size == len(hf)
    for turns, system in [(TURNS, None), (TURNS2, SYSTEM)]:
        ex = build_example(tok, turns, None, budget=None, system=system)
        assert ex.input_ids.tolist() == hf_ids(hf, hf_messages("gemma", turns, system))


def test_load_errors_name_the_directory(tmp_path, tok_dirs):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_text_tokenizer(missing)
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="empty_tok.*no tokenizer.json or tokenizer.model"):
        load_text_tokenizer(empty)
    broken = tmp_path / "broken_tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="broken_tok.*tokenizer.json is not a valid tokenizer"):
        load_text_tokenizer(broken)
    bad_config = tmp_path / "bad_config"
    shutil.copytree(tok_dirs["llama3"], bad_config)
    (bad_config / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="bad_config.*not valid JSON"):
        load_text_tokenizer(bad_config)
    bad_sp = tmp_path / "bad_sp"
    bad_sp.mkdir()
    (bad_sp / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bad_sp"):
        load_text_tokenizer(bad_sp)


def test_family_detection(tmp_path, tok_dirs):
    # Without tokenizer_config.json: detected from the vocabulary, family bos used.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tok_dirs["llama3"] / "tokenizer.json", bare / "tokenizer.json")
    tok = load_text_tokenizer(bare)
    assert tok.template == "llama3" and tok.bos_id == tok.token_to_id("<|begin_of_text|>")
    assert tok.chat_template is None
    # Template in chat_template.jinja (as transformers 5 saves it).
    jinja = tmp_path / "jinja"
    shutil.copytree(tok_dirs["chatml"], jinja)
    config = json.loads((jinja / "tokenizer_config.json").read_text())
    (jinja / "chat_template.jinja").write_text(config.pop("chat_template"))
    (jinja / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_text_tokenizer(jinja)
    assert tok.template == "chatml" and tok.default_system == QWEN_DEFAULT_SYSTEM
    # A tokenizer with none of the families' tokens needs template=, and then its tokens.
    plain = train_local_tokenizer(CORPUS[:7], tmp_path / "plain", vocab_size=300)
    (plain / "tokenizer_config.json").unlink()
    (plain / "special_tokens_map.json").unlink()
    data = json.loads((plain / "tokenizer.json").read_text())
    data["added_tokens"] = []
    (plain / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="plain.*cannot tell the chat template family"):
        load_text_tokenizer(plain)
    with pytest.raises(ValueError, match="end of turn '<\\|im_end\\|>'.*not in the vocabulary"):
        load_text_tokenizer(plain, template="chatml")
    with pytest.raises(ValueError, match="unknown chat template family"):
        load_text_tokenizer(tok_dirs["gemma"], template="llama2")
    assert load_text_tokenizer(tok_dirs["gemma"], template="gemma").template == "gemma"


# ----------------------------------------------------------------------------------------------
# Chat format parity with transformers' apply_chat_template


PARITY_CASES = [
    ("single turn + system", TURNS, SYSTEM),
    ("single turn, no system", TURNS, None),
    ("multi-turn + system", TURNS2, SYSTEM),
    ("multi-turn, no system", TURNS2, None),
    ("ends with a user turn", TURNS2[:3], None),
    (
        "whitespace and unicode",
        [
            {"role": "user", "text": "  Résumé of the QRS?  "},
            {"role": "assistant", "text": "Wide — about 140 ms (LBBB). 😀\n"},
        ],
        "  Be brief.\n",
    ),
    ("the ECG system prompt", TURNS, ECG_SYSTEM_PROMPT),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case, turns, system", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_chat_ids_match_apply_chat_template(toks, hf_toks, family, case, turns, system):
    tok, hf = toks[family], hf_toks[family]
    messages = hf_messages(family, turns, system)
    ex = build_example(tok, turns, None, budget=None, system=system)
    assert ex.input_ids.dtype == np.int32
    assert ex.input_ids.tolist() == hf_ids(hf, messages)
    rendered = hf.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.input_ids, skip_special=False) == rendered
    assert ex.ecg_span is None and ex.prompt_len is None
    # Generation prompt: a final assistant turn is withheld; a final user turn gets a header.
    prompt = build_example(tok, turns, None, budget=None, system=system, add_generation_prompt=True)
    context = messages[:-1] if turns[-1]["role"] == "assistant" else messages
    assert prompt.input_ids.tolist() == hf_ids(hf, context, add_generation_prompt=True)
    assert prompt.prompt_len == prompt.input_ids.size


def test_chatml_default_system_prompt(toks):
    tok = toks["chatml"]
    default = build_example(tok, TURNS, None, budget=None)
    explicit = build_example(tok, TURNS, None, budget=None, system=QWEN_DEFAULT_SYSTEM)
    assert default.input_ids.tolist() == explicit.input_ids.tolist()
    assert tok.decode(default.input_ids, skip_special=False).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud."
    )


# ----------------------------------------------------------------------------------------------
# Loss masks, token by token


ECG = np.array([3, 1, 4, 1, 5], np.int32)


def test_loss_mask_llama3(toks):
    tok = toks["llama3"]
    vocab = EcgVocab.for_tokenizer(tok, 10)
    ex = build_example(tok, TURNS, ECG, budget=None, system=SYSTEM, ecg_vocab=vocab)
    sh, eh = tok.token_to_id("<|start_header_id|>"), tok.token_to_id("<|end_header_id|>")
    eot, enc = tok.eot_id, tok.encode
    ids, mask = flatten(
        [
            ([tok.bos_id, sh, *enc("system"), eh, *enc("\n\n"), *enc(SYSTEM), eot], False),
            ([sh, *enc("user"), eh, *enc("\n\n")], False),
            ([vocab.start_id, *(ECG + tok.vocab_size), vocab.end_id], False),
            ([*enc(Q1), eot, sh, *enc("assistant"), eh, *enc("\n\n")], False),
            ([*enc(A1), eot], True),
        ]
    )
    assert ex.input_ids.tolist() == ids.tolist()
    assert ex.loss_mask.dtype == bool and ex.loss_mask.tolist() == mask.tolist()
    assert tok.decode(ex.input_ids[ex.loss_mask], skip_special=False) == A1 + "<|eot_id|>"
    start = 1 + 1 + len(enc("system")) + 1 + len(enc("\n\n")) + len(enc(SYSTEM)) + 1
    start += 1 + len(enc("user")) + 1 + len(enc("\n\n")) + 1
    assert ex.ecg_span == (start, start + 5)
    assert ex.input_ids[ex.ecg_span[0] : ex.ecg_span[1]].tolist() == (ECG + tok.vocab_size).tolist()
    assert (ex.ecg_kept, ex.ecg_dropped, ex.ecg_symbols) == (5, 0, None)
    assert ex.answer_spans == ((ids.size - len(enc(A1)) - 1, ids.size),)


def test_loss_mask_chatml(toks):
    tok = toks["chatml"]
    vocab = EcgVocab.for_tokenizer(tok, 10)
    ex = build_example(tok, TURNS, ECG, budget=None, system=SYSTEM, ecg_vocab=vocab)
    ims, ime, enc = tok.token_to_id("<|im_start|>"), tok.eot_id, tok.encode
    ids, mask = flatten(
        [
            ([ims, *enc("system\n"), *enc(SYSTEM), ime, *enc("\n")], False),
            ([ims, *enc("user\n"), vocab.start_id, *(ECG + tok.vocab_size), vocab.end_id], False),
            ([*enc(Q1), ime, *enc("\n"), ims, *enc("assistant\n")], False),
            ([*enc(A1), ime], True),
            (enc("\n"), False),  # the newline after <|im_end|> is not trained
        ]
    )
    assert ex.input_ids.tolist() == ids.tolist()
    assert ex.loss_mask.tolist() == mask.tolist()
    assert tok.decode(ex.input_ids[ex.loss_mask], skip_special=False) == A1 + "<|im_end|>"
    assert not ex.loss_mask[-1]


def test_loss_mask_gemma_merges_system_into_first_user_message(toks):
    tok = toks["gemma"]
    vocab = EcgVocab.for_tokenizer(tok, 10)
    ex = build_example(tok, TURNS, ECG, budget=None, system=SYSTEM, ecg_vocab=vocab)
    sot, eot, enc = tok.token_to_id("<start_of_turn>"), tok.eot_id, tok.encode
    ids, mask = flatten(
        [
            ([tok.bos_id, sot, *enc("user\n"), *enc(SYSTEM + "\n\n")], False),
            ([vocab.start_id, *(ECG + tok.vocab_size), vocab.end_id], False),
            ([*enc(Q1), eot, *enc("\n"), sot, *enc("model\n")], False),
            ([*enc(A1), eot], True),
            (enc("\n"), False),
        ]
    )
    assert ex.input_ids.tolist() == ids.tolist()
    assert ex.loss_mask.tolist() == mask.tolist()
    assert tok.decode(ex.input_ids[ex.loss_mask], skip_special=False) == A1 + "<end_of_turn>"
    # Gemma's pad is its own; the ECG block then has no extra pad id.
    assert vocab.pad_id == tok.pad_id == 0 and vocab.total_size == tok.vocab_size + 12


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_loss_mask(toks, family):
    tok = toks[family]
    eot = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "gemma": "<end_of_turn>"}[family]
    vocab = EcgVocab.for_tokenizer(tok, 10, markers=False)
    ex = build_example(tok, TURNS2, ECG, budget=None, system=SYSTEM, ecg_vocab=vocab)
    assert runs(ex.loss_mask) == list(ex.answer_spans)
    answers = [tok.decode(ex.input_ids[a:b], skip_special=False) for a, b in ex.answer_spans]
    assert answers == [A1 + eot, A2 + eot]
    assert ex.loss_mask.sum() == len(tok.encode(A1)) + len(tok.encode(A2)) + 2
    a, b = ex.ecg_span  # no markers: the ECG ids sit right in front of the question
    assert not ex.loss_mask[a:b].any()
    assert ex.input_ids[a:b].tolist() == (ECG + tok.vocab_size).tolist()
    assert ex.input_ids[b : b + len(tok.encode(Q1))].tolist() == tok.encode(Q1)


# ----------------------------------------------------------------------------------------------
# ECG ids in the vocabulary; decoding


def test_ecg_vocab_layout():
    v = EcgVocab(100, 10)
    assert (v.start_id, v.end_id, v.pad_id, v.total_size) == (110, 111, 112, 113)
    assert v.to_llm([0, 9, 26 % 10]).tolist() == [100, 109, 106]
    assert v.to_llm(np.array([[1, 2]], np.int32)).dtype == np.int32
    assert v.is_ecg([99, 100, 109, 110, 111, 112]).tolist() == [0, 1, 1, 0, 0, 0]
    assert v.from_llm(np.array([100, 105])).tolist() == [0, 5]
    assert v.to_llm([]).tolist() == []
    for bad in ([10], [-1]):
        with pytest.raises(ValueError, match="ECG ids must be in"):
            v.to_llm(bad)
    with pytest.raises(ValueError, match="not ECG ids"):
        v.from_llm([99, 100])
    with pytest.raises(ValueError, match="integers"):
        v.to_llm(np.array([1.5]))
    assert [v.token_name(i) for i in (100, 107, 110, 111, 112)] == [
        "<ecg_0>",
        "<ecg_7>",
        "<ecg>",
        "</ecg>",
        "<pad>",
    ]
    no_markers = EcgVocab(100, 10, markers=False, text_pad_id=5)
    assert (no_markers.start_id, no_markers.end_id) == (None, None)
    assert (no_markers.pad_id, no_markers.total_size) == (5, 110)
    assert EcgVocab(100, 10, markers=False).pad_id == 110
    with pytest.raises(ValueError):
        EcgVocab(100, 10, text_pad_id=100)


def test_decode_handles_ecg_ids(toks):
    tok = toks["llama3"]
    vocab = EcgVocab.for_tokenizer(tok, 10)
    ecg_block = [vocab.start_id, *vocab.to_llm([3, 7]).tolist(), vocab.end_id]
    ids = [tok.bos_id, *tok.encode("hello"), *ecg_block, *tok.encode(" world"), tok.eot_id]
    assert tok.decode(ids) == "hello world"
    shown = tok.decode(ids + [-100], skip_special=False, ecg_vocab=vocab)
    assert shown == "<|begin_of_text|>hello<ecg><ecg_3><ecg_7></ecg> world<|eot_id|><id_-100>"
    assert tok.decode([vocab.pad_id], skip_special=False) == f"<id_{vocab.pad_id}>"
    assert toks["chatml"].decode(toks["chatml"].encode("hi") + [toks["chatml"].pad_id]) == "hi"


# ----------------------------------------------------------------------------------------------
# Truncation


# Three hand-made leads: ids and the number of symbols each token covers.
LEADS = [np.array([1, 2, 3, 4]), np.array([5, 6, 7]), np.array([8, 9, 10, 11, 12])]
LENGTHS = [np.array([2, 2, 2, 2]), np.array([1, 3, 4]), np.array([4, 1, 1, 1, 1])]
# token start offsets: lead 0 [0 2 4 6], lead 1 [0 1 4], lead 2 [0 4 5 6 7]


@pytest.mark.parametrize(
    "room, policy, kept, symbols",
    [
        (6, "head", [1, 2, 3, 4, 5, 6], None),
        (6, "time", [1, 2, 5, 6, 8], 4),  # s=5 would need 3 + 3 + 2 = 8 tokens
        (8, "time", [1, 2, 3, 5, 6, 7, 8, 9], 5),
        (2, "time", [], 0),  # fewer tokens than leads: nothing fits a common start
        (3, "time", [1, 5, 8], 1),
        (12, "time", list(range(1, 13)), 8),  # everything fits; s = the longest lead
        (0, "head", [], None),
    ],
)
def test_truncation_policies(toks, room, policy, kept, symbols):
    tok = toks["llama3"]
    vocab = EcgVocab.for_tokenizer(tok, 20)
    budget = text_len(tok, TURNS) + 2 + room
    ex = build_example(
        tok, TURNS, LEADS, budget=budget, policy=policy, ecg_vocab=vocab, token_lengths=LENGTHS
    )
    assert ex.input_ids.size <= budget
    a, b = ex.ecg_span
    assert vocab.from_llm(ex.input_ids[a:b]).tolist() == kept
    assert (ex.ecg_kept, ex.ecg_dropped, ex.ecg_symbols) == (len(kept), 12 - len(kept), symbols)
    assert ex.input_ids[a - 1] == vocab.start_id and ex.input_ids[b] == vocab.end_id


def test_time_policy_matches_brute_force_on_12_leads(toks):
    tok = toks["chatml"]
    vocab = EcgVocab.for_tokenizer(tok, 50)
    n_text = text_len(tok, TURNS)
    rng = np.random.default_rng(0)
    for trial in range(20):
        lengths = [rng.integers(1, 9, size=rng.integers(5, 40)) for _ in range(12)]
        leads = [rng.integers(0, 50, size=n.size) for n in lengths]
        starts = [np.cumsum(n) - n for n in lengths]
        total = sum(n.size for n in lengths)
        room = int(rng.integers(0, total + 5))
        # The largest s whose covering tokens (start < s) fit, capped at the longest lead.
        fits = [t for t in range(400) if sum(int((st < t).sum()) for st in starts) <= room]
        best = min(max(fits), max(int(n.sum()) for n in lengths))
        expected = np.concatenate([lead[st < best] for lead, st in zip(leads, starts, strict=True)])
        ex = build_example(
            tok,
            TURNS,
            leads,
            budget=n_text + 2 + room,
            policy="time",
            ecg_vocab=vocab,
            token_lengths=lengths,
        )
        a, b = ex.ecg_span
        assert ex.ecg_symbols == best, trial
        assert vocab.from_llm(ex.input_ids[a:b]).tolist() == expected.tolist(), trial
        assert ex.ecg_kept + ex.ecg_dropped == total and ex.ecg_kept <= room


def test_head_accepts_a_stream_or_leads(toks):
    tok = toks["chatml"]
    vocab = EcgVocab.for_tokenizer(tok, 20)
    budget = text_len(tok, TURNS) + 2 + 7
    from_leads = build_example(tok, TURNS, LEADS, budget=budget, ecg_vocab=vocab)
    stream = np.concatenate(LEADS)
    from_stream = build_example(tok, TURNS, stream, budget=budget, ecg_vocab=vocab)
    assert from_leads.input_ids.tolist() == from_stream.input_ids.tolist()
    assert from_stream.input_ids.size == budget
    a, b = from_stream.ecg_span
    assert vocab.from_llm(from_stream.input_ids[a:b]).tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_text_too_long(toks):
    tok = toks["gemma"]
    vocab = EcgVocab.for_tokenizer(tok, 20)
    n = text_len(tok, TURNS2)
    with pytest.raises(TextTooLongError, match="'ecgqa-17'.*needs \\d+ tokens") as info:
        build_example(tok, TURNS2, LEADS, budget=n + 1, ecg_vocab=vocab, name="ecgqa-17")
    assert (info.value.name, info.value.needed, info.value.budget) == ("ecgqa-17", n + 2, n + 1)
    assert isinstance(info.value, ValueError)
    # Exactly enough for the text and the markers: an empty ECG block.
    ex = build_example(tok, TURNS2, LEADS, budget=n + 2, ecg_vocab=vocab)
    assert (ex.ecg_kept, ex.ecg_dropped, ex.input_ids.size) == (0, 12, n + 2)
    a, b = ex.ecg_span
    assert a == b and ex.input_ids[a - 1] == vocab.start_id and ex.input_ids[a] == vocab.end_id
    # Without markers the text alone may fill the budget.
    bare = EcgVocab.for_tokenizer(tok, 20, markers=False)
    ex = build_example(tok, TURNS2, LEADS, budget=n, ecg_vocab=bare)
    assert ex.input_ids.size == n and ex.ecg_kept == 0
    # Text-only examples are limited by the text too.
    with pytest.raises(TextTooLongError):
        build_example(tok, TURNS2, None, budget=n - 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["head", "time"])
def test_eval_prompt_is_the_training_prefix(toks, family, policy):
    tok = toks[family]
    vocab = EcgVocab.for_tokenizer(tok, 20)
    room = 7
    budget = text_len(tok, TURNS2, system=SYSTEM) + 2 + room
    kwargs = dict(budget=budget, policy=policy, system=SYSTEM, ecg_vocab=vocab)
    train = build_example(tok, TURNS2, LEADS, token_lengths=LENGTHS, **kwargs)
    prompt = build_example(
        tok, TURNS2, LEADS, token_lengths=LENGTHS, add_generation_prompt=True, **kwargs
    )
    assert train.input_ids.size <= budget and train.ecg_dropped > 0
    n = prompt.prompt_len
    assert n == prompt.input_ids.size == train.answer_spans[-1][0]
    assert prompt.input_ids.tolist() == train.input_ids[:n].tolist()
    assert prompt.loss_mask.tolist() == train.loss_mask[:n].tolist()
    assert prompt.ecg_span == train.ecg_span
    assert (prompt.ecg_kept, prompt.ecg_symbols) == (train.ecg_kept, train.ecg_symbols)
    assert prompt.answer_spans == train.answer_spans[:1]
    eot = tok.decode([tok.eot_id], skip_special=False)
    assert tok.decode(train.input_ids[n : train.answer_spans[-1][1]], skip_special=False) == (
        A2 + eot
    )
    # Earlier answers: their prompts are training prefixes ending with the assistant header.
    header = {
        "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "chatml": "\n<|im_start|>assistant\n",  # after the newline that closes a turn
        "gemma": "\n<start_of_turn>model\n",
    }[family]
    first = train.input_ids[: train.answer_spans[0][0]]
    assert tok.decode(first, skip_special=False).endswith(Q1 + eot + header)


def test_chat_prompt_gives_the_ecg_the_rest_of_the_budget(toks):
    tok = toks["llama3"]
    vocab = EcgVocab.for_tokenizer(tok, 20)
    question = TURNS[:1]
    prompt = build_example(
        tok, question, LEADS, budget=None, ecg_vocab=vocab, add_generation_prompt=True
    )
    assert prompt.ecg_kept == 12 and prompt.ecg_dropped == 0
    assert tok.decode(prompt.input_ids, skip_special=False, ecg_vocab=vocab).endswith(
        "</ecg>" + Q1 + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    cut = build_example(
        tok,
        question,
        LEADS,
        budget=prompt.input_ids.size - 5,
        ecg_vocab=vocab,
        add_generation_prompt=True,
    )
    assert cut.ecg_kept == 7 and cut.input_ids.size == prompt.input_ids.size - 5


def test_argument_errors(toks):
    tok = toks["llama3"]
    vocab = EcgVocab.for_tokenizer(tok, 20)
    with pytest.raises(ValueError, match="unknown truncation policy"):
        build_example(tok, TURNS, ECG, budget=100, policy="tail", ecg_vocab=vocab)
    with pytest.raises(ValueError, match="needs ecg_vocab"):
        build_example(tok, TURNS, ECG, budget=100)
    with pytest.raises(ValueError, match="overlap"):
        build_example(tok, TURNS, ECG, budget=100, ecg_vocab=EcgVocab(10, 20))
    with pytest.raises(ValueError, match="token_lengths"):
        build_example(tok, TURNS, LEADS, budget=100, policy="time", ecg_vocab=vocab)
    with pytest.raises(ValueError, match="token_lengths"):
        build_example(
            tok, TURNS, ECG, budget=100, policy="time", ecg_vocab=vocab, token_lengths=LENGTHS
        )
    with pytest.raises(ValueError, match="lead 1"):
        build_example(
            tok,
            TURNS,
            LEADS,
            budget=100,
            policy="time",
            ecg_vocab=vocab,
            token_lengths=[LENGTHS[0], LENGTHS[1][:2], LENGTHS[2]],
        )
    with pytest.raises(ValueError, match="ECG ids must be in"):
        build_example(tok, TURNS, np.array([20]), budget=100, ecg_vocab=vocab)
    with pytest.raises(ValueError, match="'bad'.*turn 1 must be"):
        build_example(tok, [TURNS[0], TURNS[0]], None, budget=None, name="bad")
    with pytest.raises(ValueError, match="turn 0 must be"):
        build_example(tok, [{"role": "user", "content": Q1}], None, budget=None)
    with pytest.raises(ValueError, match="no turns"):
        build_example(tok, [], None, budget=None)
