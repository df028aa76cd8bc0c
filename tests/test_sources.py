"""Conversation sources: every published format into one schema, skips, path safety, splits."""

from __future__ import annotations

import csv
import json
import os
import shutil

import h5py
import numpy as np
import pytest
from conftest import SHARED_DATA

from elmjax.data import sources
from elmjax.data.sources import Conversation, SourceFormatError, UnsafePathError
from elmjax.ecg.synth import generate_corpus

FORMATS = SHARED_DATA / "formats"

# ---------------------------------------------------------------------------------------------
# Fixture writers
# ---------------------------------------------------------------------------------------------


def touch_record(root, relpath):
    """A WFDB record that exists as far as the layouts can tell (the header file)."""
    hea = root / f"{relpath}.hea"
    hea.parent.mkdir(parents=True, exist_ok=True)
    hea.write_text(f"{hea.stem} 12 500 5000\n")


def ptbxl_name(ecg_id):
    return f"records500/{ecg_id // 1000 * 1000:05d}/{ecg_id:05d}_hr"


def write_ptbxl(root, rows, on_disk):
    """ptbxl_database.csv with PTB-XL's real columns; rows are (ecg_id, patient_id, fold)."""
    with open(FORMATS / "ptbxl_database.header_and_first5rows.csv", newline="") as f:
        reader = csv.DictReader(f)
        columns, template = reader.fieldnames, next(reader)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "ptbxl_database.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for ecg_id, patient, fold in rows:
            name = ptbxl_name(ecg_id)
            writer.writerow(
                {
                    **template,
                    "ecg_id": ecg_id,
                    "patient_id": f"{patient}.0",
                    "strat_fold": fold,
                    "filename_hr": name,
                    "filename_lr": name.replace("500", "100").replace("_hr", "_lr"),
                }
            )
            if ecg_id in on_disk:
                touch_record(root, name)


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def qa_item(question_type, question, answer, ecg_id, sample_id=0, template_id=26):
    return {
        "template_id": template_id,
        "question_id": 1,
        "sample_id": sample_id,
        "question_type": question_type,
        "attribute_type": "scp_code",
        "question": question,
        "answer": answer,
        "ecg_id": ecg_id,
        "attribute": None,
    }


# PTB-XL: the single-verify ECGs of the real ECG-QA extract, plus ecg 1 (PULSE) and 6048, which
# is in the table but not on disk. Patient 100 has two ECGs.
PTBXL_ROWS = [
    (3637, 100, 1),
    (17626, 100, 1),
    (1473, 200, 10),
    (6048, 300, 9),
    (1, 15709, 3),
    (5, 17448, 4),
]
MIMIC_ROWS = [  # (subject_id, study_id), the first from the real record_list sample
    (10000032, 40689238),
    (10000033, 41006988),
    (10000034, 42000000),  # listed, not on disk
]


def mimic_path(subject, study):
    return f"files/p{str(subject)[:4]}/p{subject}/s{study}/{study}"


@pytest.fixture
def data(tmp_path):
    """PTB-XL, MIMIC-IV-ECG and CODE-15% roots, and ECG-QA files in both published variants."""
    ptbxl, mimic, code15, ecgqa = (tmp_path / n for n in ("ptbxl", "mimic", "code15", "ecgqa"))
    write_ptbxl(ptbxl, PTBXL_ROWS, on_disk={3637, 17626, 1473, 1, 5})

    mimic.mkdir()
    with open(FORMATS / "mimic_iv_ecg_record_list.sample.csv") as f:
        sample = f.read().splitlines()
    lines = sample[:2] + [
        f"{s},{t},{t},2180-07-24 08:00:00,{mimic_path(s, t)}" for s, t in MIMIC_ROWS[1:]
    ]
    (mimic / "record_list.csv").write_text("\n".join(lines) + "\n")
    for subject, study in MIMIC_ROWS[:2]:
        touch_record(mimic, mimic_path(subject, study))

    code15.mkdir()
    (code15 / "exams.csv").write_text("exam_id,age,is_male,patient_id\n2508875,60,True,777\n")
    with h5py.File(code15 / "exams_part0.hdf5", "w") as f:
        f["exam_id"] = np.array([2508875, 0])
        f["tracings"] = np.zeros((2, 16, 12), np.float32)

    test_dir = ecgqa / "ptbxl" / "template" / "test"
    test_dir.mkdir(parents=True)
    shutil.copy(FORMATS / "ecgqa_ptbxl_upstream_items.json", test_dir / "00000.json")
    shutil.copy(
        FORMATS / "ecgqa_meta" / "ptbxl_answers_for_each_template.csv",
        ecgqa / "ptbxl" / "answers_for_each_template.csv",
    )
    train = [
        qa_item("single-choose", "Which one: mi or none?", ["none"], [1473], 1, 3),
        qa_item(
            "single-query",
            "Which features?",
            ["qrs duration", "p duration", "qrs duration"],
            [1],
            2,
        ),
        qa_item("single-guess", "Unknown type?", ["yes"], [1]),
        qa_item("single-verify", "Two ECGs?", ["yes"], [1, 1473]),
        qa_item("single-verify", "No answer?", [], [1]),
        qa_item("single-verify", "   ", ["yes"], [1]),
        "not an item",
        qa_item("single-verify", "Not in the table?", ["no"], [99999]),
    ]
    write_json(ecgqa / "ptbxl" / "template" / "train" / "00000.json", train)
    write_json(
        ecgqa / "ptbxl" / "paraphrased" / "valid" / "00000.json",
        [qa_item("single-verify", "Is static noise seen in lead aVL?", ["no"], [5], 7)],
    )

    mimic_test = ecgqa / "mimic-iv-ecg" / "template" / "test"
    mimic_test.mkdir(parents=True)
    shutil.copy(FORMATS / "ecgqa_mimic_iv_ecg_upstream_items.json", mimic_test / "270000.json")
    write_json(
        ecgqa / "mimic-iv-ecg" / "paraphrased" / "test" / "00000.json",
        [qa_item("single-verify", "Any atrial fibrillation?", ["no"], [40689238], 3)],
    )
    return {"ptbxl": ptbxl, "mimic": mimic, "code15": code15, "ecgqa": ecgqa, "tmp": tmp_path}


def by_id(conversations):
    return {c.example_id: c for c in conversations}


# ---------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------


def make(example_id="x:0", patient="1", layout="ptbxl", record="records500/00000/00001_hr", **kw):
    turns = kw.pop("turns", ({"role": "user", "text": "q?"}, {"role": "assistant", "text": "a"}))
    return Conversation(example_id, record, layout, patient, kw.pop("segment", None), turns, kw)


def test_conversation_json_round_trip_and_validation():
    c = make(source="s", answer=["a", "b"])
    again = Conversation.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c and isinstance(again.turns, tuple)
    bad_turns = [
        ({"role": "assistant", "text": "a"}, {"role": "user", "text": "q"}),
        ({"role": "user", "text": "q"},),
        ({"role": "user", "text": "q"}, {"role": "assistant", "text": "  "}),
        ({"role": "user", "text": "q"}, {"role": "system", "text": "a"}),
    ]
    for turns in bad_turns:
        with pytest.raises(ValueError, match="x:0"):
            make(turns=turns)
    with pytest.raises(ValueError, match="layout"):
        make(layout="png")
    with pytest.raises(ValueError, match="segment"):
        make(segment=-1)


# ---------------------------------------------------------------------------------------------
# ECG-QA
# ---------------------------------------------------------------------------------------------


def test_ecgqa_ptbxl_exact_conversations_and_every_skip(data):
    convs, report = sources.load_ecgqa(data["ecgqa"], data["ptbxl"], "ptbxl")
    got = by_id(convs)
    first = got["ecgqa-ptbxl:template/test/00000.json:0"]
    assert first.record == "records500/03000/03637_hr" and first.layout == "ptbxl"
    assert first.patient_id == "100" and first.segment is None  # patient_id, not ecg_id
    assert first.turns == (
        {"role": "user", "text": "Does this ECG show static noise in lead aVL?"},
        {"role": "assistant", "text": "no"},
    )
    assert first.meta["sample_id"] == 120000 and first.meta["split"] == "test"
    assert first.meta["variant"] == "template" and first.meta["options"] == ["no", "yes"]
    assert first.meta["question_type"] == "single-verify" and first.meta["source"] == "ecgqa-ptbxl"

    # The real extract: 7 single-verify items, one on ecg 6048 (not on disk); 10 comparisons.
    test_ids = sorted(i for i in got if "/test/" in i)
    assert [int(i.rsplit(":", 1)[1]) for i in test_ids] == [0, 1, 2, 4, 5, 6]
    assert got["ecgqa-ptbxl:template/test/00000.json:4"].turns[0]["text"] == (
        "Is static noise present in lead aVL based on the ECG?"
    )
    assert got["ecgqa-ptbxl:template/test/00000.json:2"].record == "records500/01000/01473_hr"

    query = got["ecgqa-ptbxl:template/train/00000.json:1"]
    assert query.turns[1]["text"] == "p duration, qrs duration"  # a set: sorted, distinct
    assert query.meta["answer"] == ["qrs duration", "p duration", "qrs duration"]
    assert query.patient_id == "15709" and query.record == "records500/00000/00001_hr"
    para = got["ecgqa-ptbxl:paraphrased/valid/00000.json:0"]
    assert para.meta["variant"] == "paraphrased" and para.meta["split"] == "valid"
    assert len(convs) == 6 + 2 + 1

    assert report["items"] == 17 + 8 + 1 and report["kept"] == 9
    assert report["skipped"] == {
        "empty answer": 1,
        "empty question": 1,
        "malformed item": 1,
        "missing record": 2,
        "more than one ECG": 1,
        "question type comparison_irrelevant-query not used": 10,
        "unknown question type single-guess": 1,
    }
    missing = report["examples"]["missing record"]
    assert [(os.path.basename(os.path.dirname(m["file"])), m["item"]) for m in missing] == [
        ("train", 7),  # the splits are read in the order train, valid, test
        ("test", 3),
    ]
    assert "ptbxl_database.csv" in missing[0]["detail"] and "file not found" in missing[1]["detail"]
    assert report["examples"]["malformed item"][0]["item"] == 6


def test_ecgqa_mimic_uses_record_list(data):
    convs, report = sources.load_ecgqa(data["ecgqa"], data["mimic"], "mimic-iv-ecg")
    assert len(convs) == 1
    c = convs[0]
    assert c.example_id == "ecgqa-mimic-iv-ecg:paraphrased/test/00000.json:0"
    assert c.layout == "mimic" and c.patient_id == "10000032"
    assert c.record == "files/p1000/p10000032/s40689238/40689238"
    assert c.turns[1]["text"] == "no"
    assert report["skipped"] == {"question type comparison_irrelevant-query not used": 6}


def test_ecgqa_question_types_and_missing_files(data):
    convs, report = sources.load_ecgqa(
        data["ecgqa"], data["ptbxl"], question_types=("single-verify",), variants=("template",)
    )
    assert {c.meta["question_type"] for c in convs} == {"single-verify"}
    assert report["skipped"]["question type single-query not used"] == 1
    with pytest.raises(ValueError, match="unknown ECG-QA question types"):
        sources.load_ecgqa(data["ecgqa"], data["ptbxl"], question_types=("single-guess",))
    with pytest.raises(FileNotFoundError):
        sources.load_ecgqa(data["tmp"] / "nowhere", data["ptbxl"])


def test_malformed_json_names_file_line_and_column(data):
    bad = data["ecgqa"] / "ptbxl" / "template" / "valid" / "00000.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('[\n  {"question": "ok"},\n  {"question": "broken",,}\n]\n')
    with pytest.raises(SourceFormatError, match=r"valid/00000\.json: invalid JSON at line 3, col"):
        sources.load_ecgqa(data["ecgqa"], data["ptbxl"])
    not_list = write_json(data["tmp"] / "ECGInstruct.json", {"id": 1})
    with pytest.raises(SourceFormatError, match="ECGInstruct.json: expected a JSON list"):
        sources.load_pulse(not_list, {"ptbxl": data["ptbxl"]})


# ---------------------------------------------------------------------------------------------
# PULSE ECGInstruct and ECG-Chat
# ---------------------------------------------------------------------------------------------


def turn(role, text, role_key="from", text_key="value"):
    return {role_key: role, text_key: text}


def pulse_item(image, *turns):
    return {"id": "x", "image": image, "conversations": list(turns)}


PULSE_ITEMS = [
    {  # the item quoted in PULSE issue #2 (text shortened), image path as published
        "id": "mimic-40689238",
        "image": "mimic/p1000/p10000032/s40689238/40689238-0.png",
        "conversations": [
            turn("human", "<image>\nWhat can be inferred about the cardiac axis on this image?"),
            turn("gpt", "This image indicates that the cardiac axis is indeterminate."),
        ],
    },
    {  # variant keys: "conversation", role/user/assistant, placeholder after the question
        "id": "ptb-xl-00001",
        "image": "ptb-xl/records500/00000/00001_hr-0.png",
        "conversation": [
            turn("user", "Describe the rhythm.\n<image>", "role"),
            turn("assistant", "Images show sinus rhythm; it is well imaged.", "role"),
        ],
    },
    {  # multi-turn, <ecg> inside the text
        "id": "code15-2508875",
        "image": "code15_v4/2508875-0.png",
        "conversations": [
            turn("human", "Look at <ecg> and name the rhythm."),
            turn("gpt", "Sinus rhythm."),
            turn("human", "Any block?"),
            turn("gpt", "No."),
        ],
    },
    # one item per skip reason, in the order of the report's examples below
    pulse_item("cpsc/A0001-0.png", turn("human", "q"), turn("gpt", "a")),
    pulse_item("ptb-xl/00001_hr-0.png", turn("system", "s")),
    pulse_item("ptb-xl/00001_hr-0.png", turn("gpt", "a"), turn("human", "q")),
    pulse_item("ptb-xl/00001_hr-0.png", turn("human", "q"), turn("gpt", " ")),
    pulse_item("ptb-xl/00002_hr-0.png", turn("human", "q"), turn("gpt", "a")),  # not in table
    {"id": "x", "image": "ptb-xl/00001_hr-0.png"},
    pulse_item("ptb-xl/00001_hr-0.png", turn("human", "<image>"), turn("gpt", "a")),
]


def test_pulse_exact_conversations_and_every_skip(data):
    path = write_json(data["tmp"] / "ECGInstruct.json", PULSE_ITEMS)
    roots = {k: data[k] for k in ("ptbxl", "mimic", "code15")}
    convs, report = sources.load_pulse(path, roots)
    got = by_id(convs)
    assert list(got) == [f"pulse-ecginstruct:ECGInstruct.json:{i}" for i in range(3)]
    mimic, ptb, code15 = convs
    assert (mimic.layout, mimic.record, mimic.patient_id) == (
        "mimic",
        "files/p1000/p10000032/s40689238/40689238",
        "10000032",
    )
    assert mimic.turns == (
        {"role": "user", "text": "What can be inferred about the cardiac axis on this signal?"},
        {
            "role": "assistant",
            "text": "This signal indicates that the cardiac axis is indeterminate.",
        },
    )
    assert mimic.meta["original_id"] == "mimic-40689238" and mimic.meta["image"].endswith(".png")
    assert (ptb.layout, ptb.record, ptb.patient_id) == (
        "ptbxl",
        "records500/00000/00001_hr",
        "15709",
    )
    assert ptb.turns[0]["text"] == "Describe the rhythm."
    assert ptb.turns[1]["text"] == "Signals show sinus rhythm; it is well imaged."  # words only
    assert (code15.layout, code15.record, code15.patient_id) == (
        "code15",
        "exams_part0.hdf5#0",
        "777",
    )
    assert [t["text"] for t in code15.turns] == [
        "Look at and name the rhythm.",
        "Sinus rhythm.",
        "Any block?",
        "No.",
    ]
    assert report["skipped"] == {
        "empty answer": 1,
        "empty question": 1,
        "malformed item": 1,
        "missing record": 1,
        "roles out of order": 1,
        "unknown role": 1,
        "unrecognised image path": 1,
    }
    assert report["examples"]["missing record"][0]["item"] == 7
    assert report["examples"]["unknown role"][0]["file"] == str(path)

    kept_text, _ = sources.load_pulse(path, roots, image_to_signal=False)
    assert "image" in kept_text[0].turns[0]["text"]
    _, no_code15 = sources.load_pulse(path, {"ptbxl": data["ptbxl"], "mimic": data["mimic"]})
    assert no_code15["skipped"]["no data root for code15"] == 1


def test_pulse_image_path_mapping():
    f = sources.pulse_image_record
    assert f("mimic_v4/p1127/p11273115/s44111511/44111511-0.png") == (
        "mimic",
        "files/p1127/p11273115/s44111511/44111511",
    )
    assert f("mimic/files/p1/p2/s3/3.png") == ("mimic", "files/p1/p2/s3/3")
    assert f("ptb-xl/records500/21000/21837_hr-0.png") == ("ptbxl", "21837")
    assert f("ptbxl/00042_lr-1.png") == ("ptbxl", "42")
    assert f("code15/some/folder/2508875-0.png") == ("code15", "2508875")
    for bad in ("cpsc/A0001-0.png", "ptb-xl/abc_hr-0.png", "2508875-0.png", "/abs/mimic/1-0.png"):
        assert f(bad) is None


def test_clean_text():
    assert sources.clean_text("<image>\nWhat is shown?") == "What is shown?"
    assert sources.clean_text("What is shown?\n<ECG>") == "What is shown?"
    assert sources.clean_text("Line one\n<image>\nLine two") == "Line one\nLine two"
    assert sources.clean_text("An Image and images, imaged, imagery") == (
        "An Signal and signals, imaged, imagery"
    )
    assert sources.clean_text("An image", image_to_signal=False) == "An image"


def test_ecg_chat_both_path_forms_and_skips(data):
    items = [
        {
            "id": "40689238",
            "ecg": "files/p1000/p10000032/s40689238/40689238",
            "conversations": [
                turn("human", "<ecg>\nPlease describe this ECG."),
                turn("gpt", "Sinus rhythm."),
            ],
        },
        {  # relative to files/, "conversation", user/assistant, placeholder after the question
            "id": "41006988",
            "ecg": "p1000/p10000033/s41006988/41006988",
            "conversation": [
                turn("user", "Is the axis normal? <ecg>", "role"),
                turn("assistant", "Yes.", "role"),
            ],
        },
        {
            "ecg": mimic_path(10000034, 42000000),
            "conversations": [turn("human", "q"), turn("gpt", "a")],
        },
        {
            "ecg": "files/p1000/p10000099/s4/4",
            "conversations": [turn("human", "q"), turn("gpt", "a")],
        },
        {
            "ecg": mimic_path(10000032, 40689238),
            "conversations": [turn("human", "q"), turn("human", "a")],
        },
        {
            "ecg": mimic_path(10000032, 40689238),
            "conversations": [turn("bot", "q"), turn("gpt", "a")],
        },
        {"conversations": []},
        {  # absolute, but inside the root: accepted
            "ecg": str(data["mimic"] / mimic_path(10000032, 40689238)),
            "conversations": [turn("human", "Rate?"), turn("gpt", "70 bpm.")],
        },
    ]
    path = write_json(data["tmp"] / "ecg_instruct_45k.json", items)
    convs, report = sources.load_ecg_chat(path, data["mimic"])
    assert [c.example_id for c in convs] == [
        "ecgchat-ecg_instruct_45k:ecg_instruct_45k.json:0",
        "ecgchat-ecg_instruct_45k:ecg_instruct_45k.json:1",
        "ecgchat-ecg_instruct_45k:ecg_instruct_45k.json:7",
    ]
    assert convs[0].turns[0]["text"] == "Please describe this ECG."
    assert (convs[1].record, convs[1].patient_id) == (
        "files/p1000/p10000033/s41006988/41006988",
        "10000033",
    )
    assert convs[1].turns[0]["text"] == "Is the axis normal?"
    assert convs[2].record == convs[0].record and convs[2].layout == "mimic"
    assert report["skipped"] == {
        "malformed item": 1,
        "missing record": 2,
        "roles out of order": 1,
        "unknown role": 1,
    }
    details = sorted(e["detail"] for e in report["examples"]["missing record"])
    assert "record file not found" in details[0] and "not in record_list.csv" in details[1]


# ---------------------------------------------------------------------------------------------
# Path safety
# ---------------------------------------------------------------------------------------------


def chat_item(ecg):
    return {"ecg": ecg, "conversations": [turn("human", "q"), turn("gpt", "a")]}


def test_escaping_record_paths_are_refused(data):
    outside = data["tmp"] / "outside" / "s1"
    touch_record(outside, "1")
    # A symlinked patient folder that points out of the root, listed in record_list.csv.
    link = data["mimic"] / "files" / "p1000" / "p10000077"
    os.symlink(data["tmp"] / "outside", link)
    with open(data["mimic"] / "record_list.csv", "a") as f:
        f.write("10000077,1,1,2180-01-01 00:00:00,files/p1000/p10000077/s1/1\n")
    cases = {
        "dotdot": "files/../../outside/s1/1",
        "absolute": str(outside / "1"),
        "symlink": "files/p1000/p10000077/s1/1",
    }
    for name, ecg in cases.items():
        path = write_json(
            data["tmp"] / f"{name}.json",
            [chat_item(mimic_path(10000032, 40689238)), chat_item(ecg)],
        )
        with pytest.raises(UnsafePathError) as info:
            sources.load_ecg_chat(path, data["mimic"])
        message = str(info.value)
        assert f"{name}.json" in message and "item 1" in message and repr(ecg) in message

    pulse = write_json(
        data["tmp"] / "pulse.json",
        [
            {
                "image": "mimic/../../outside/s1/1-0.png",
                "conversations": [turn("human", "q"), turn("gpt", "a")],
            }
        ],
    )
    with pytest.raises(UnsafePathError, match=r"pulse\.json: item 0"):
        sources.load_pulse(pulse, {"mimic": data["mimic"]})


def test_table_record_path_outside_root_is_refused(data):
    touch_record(data["tmp"], "outside/00009_hr")  # exists, but outside the PTB-XL root
    with open(data["ptbxl"] / "ptbxl_database.csv") as f:
        rows = list(csv.DictReader(f))
    row = {**rows[0], "ecg_id": "9", "patient_id": "9.0", "filename_hr": "../outside/00009_hr"}
    with open(data["ptbxl"] / "ptbxl_database.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow(row)
    write_json(
        data["ecgqa"] / "ptbxl" / "template" / "valid" / "00000.json",
        [qa_item("single-verify", "Escape?", ["no"], [9])],
    )
    with pytest.raises(UnsafePathError, match=r"ptbxl_database\.csv: item ptbxl record 9"):
        sources.load_ecgqa(data["ecgqa"], data["ptbxl"])


def test_resolve_record(tmp_path):
    root = tmp_path / "root"
    touch_record(root, "records500/00000/00001_hr")
    assert sources.resolve_record(root, "records500/00000/../00000/00001_hr") == (
        root / "records500/00000/00001_hr"
    )
    assert sources.resolve_record(root, root / "a" / "b") == root / "a" / "b"
    (tmp_path / "secret.hea").write_text("x")
    os.symlink(tmp_path / "secret.hea", root / "records500" / "evil.hea")  # the header escapes
    for bad in ("../root2/x", "/etc/passwd", "records500/evil", "records500/../../x", "a\0b"):
        with pytest.raises(UnsafePathError, match="outside the data root"):
            sources.resolve_record(root, bad, source_file="f.json", item=3)
    assert issubclass(UnsafePathError, ValueError)


# ---------------------------------------------------------------------------------------------
# Splits and segments
# ---------------------------------------------------------------------------------------------


def population(n_patients, per_patient=3):
    return [
        make(f"s:{p}:{k}", patient=str(p))
        for p in range(n_patients)
        for k in range(1 + p % per_patient)
    ]


def split_of_patients(splits):
    return {sources.patient_key(c): name for name, items in splits.items() for c in items}


def test_split_by_patient_is_disjoint_deterministic_and_stable():
    convs = population(1000)
    a = sources.split_by_patient(convs, seed=0)
    assert a == sources.split_by_patient(convs, seed=0)
    assert set(sources.patient_overlap(a).values()) == {0}
    assert sum(len(v) for v in a.values()) == len(convs)
    patients = split_of_patients(a)
    share = {name: sum(s == name for s in patients.values()) / 1000 for name in a}
    assert share["train"] == pytest.approx(0.8, abs=0.05) and share["test"] == pytest.approx(
        0.1, abs=0.03
    )
    assert split_of_patients(sources.split_by_patient(convs, seed=1)) != patients

    grown = convs + [make("new:0", patient="new-patient"), make("new:1", patient="new-patient")]
    after = split_of_patients(sources.split_by_patient(grown, seed=0))
    assert {k: after[k] for k in patients} == patients  # nobody else moved
    # Same patient id in another layout is another patient.
    assert sources.patient_key(make(layout="mimic", record="files/x")) != sources.patient_key(
        make()
    )
    with pytest.raises(ValueError, match="sum to 1"):
        sources.split_by_patient(convs, {"train": 0.5, "test": 0.4})


def test_split_published_detects_overlap_and_follows_patients(data):
    qa, _ = sources.load_ecgqa(data["ecgqa"], data["ptbxl"])
    # Patient 200 (ecg 1473) is in the train file and in the test file of this fixture.
    with pytest.raises(ValueError, match="share 1 patients"):
        sources.split_published(qa)
    pulse, _ = sources.load_pulse(
        write_json(data["tmp"] / "p.json", PULSE_ITEMS), {"ptbxl": data["ptbxl"]}
    )
    splits, report = sources.split_published(qa + pulse, on_overlap="report")
    assert report["overlap_patients"] == 1 and report["overlap_examples"] == ["ptbxl:200"]
    assert report["overlap"]["train/test"] == 1 and report["overlap"]["train/valid"] == 0
    assert report["published"] == len(qa) and report["followed_patient"] == 1
    ptb_pulse = [c for c in pulse if c.layout == "ptbxl"][0]
    assert ptb_pulse in splits["train"]  # patient 15709 is published in train by ECG-QA


def test_expand_segments_unique_ids_and_patient_level_splits(data):
    convs, _ = sources.load_ecgqa(data["ecgqa"], data["ptbxl"])
    counts = {
        "records500/03000/03637_hr": 2,
        "records500/01000/01473_hr": 1,
        "records500/00000/00001_hr": 0,
    }
    expanded, report = sources.expand_segments(convs, counts)
    first = [
        c for c in expanded if c.meta["base_example_id"] == "ecgqa-ptbxl:template/test/00000.json:0"
    ]
    assert [(c.example_id.rsplit(":", 1)[1], c.segment) for c in first] == [
        ("0#seg0", 0),
        ("0#seg1", 1),
    ]
    assert len({c.example_id for c in expanded}) == len(expanded)
    n_3637 = sum(c.record.endswith("03637_hr") for c in convs)
    n_1473 = sum(c.record.endswith("01473_hr") for c in convs)
    assert len(expanded) == 2 * n_3637 + n_1473
    assert report["without_segments"] == len(convs) - n_3637 - n_1473
    before = sources.split_by_patient(convs, seed=3)
    after = sources.split_by_patient(expanded, seed=3)
    where = {c.example_id: name for name, items in before.items() for c in items}
    for name, items in after.items():
        assert all(where[c.meta["base_example_id"]] == name for c in items)
    with pytest.raises(ValueError, match="already linked"):
        sources.expand_segments(expanded, counts)
    with pytest.raises(ValueError, match="duplicate"):
        sources.expand_segments(convs[:1] * 2, counts)


# ---------------------------------------------------------------------------------------------
# The built-in synthetic set
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_corpus(out, num_ecgs=40, seed=0, workers=1, progress=False)
    return out


def test_synthetic_set_published_split_is_patient_disjoint(synthetic):
    convs, report = sources.load_synthetic(synthetic)
    assert report["skipped"] == {} and report["kept"] == report["items"] == len(convs) > 0
    labels = {}
    with open(synthetic / "synth_labels.jsonl") as f:
        for line in f:
            row = json.loads(line)
            labels[row["ecg_id"]] = row
    for c in convs:
        row = labels[c.meta["ecg_id"]]
        assert c.meta["source"] == "synthetic" and c.layout == "ptbxl"
        assert c.record == row["filename_hr"] and c.patient_id == str(row["patient_id"])
        assert c.meta["split"] == row["split"]
        assert c.meta["question_type"] in sources.USED_QUESTION_TYPES
    splits, split_report = sources.split_published(convs)
    assert all(len(splits[name]) > 0 for name in sources.SPLITS)
    assert set(split_report["overlap"].values()) == {0} and split_report["overlap_patients"] == 0
    assert split_report["published"] == len(convs)
    hashed = sources.split_by_patient(convs, seed=0)
    assert set(sources.patient_overlap(hashed).values()) == {0}
