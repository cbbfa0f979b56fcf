"""Official VQA accuracy on crafted cases computed by hand (normalization, its quirks, the
leave-one-out average, answer types, Python 2 rounding) and the CLI's bad-input errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import vqa as vqa_cli  # noqa: E402

from lit_cm3leon.evaluation.metrics_io import HEADER_KEYS, InputError  # noqa: E402
from lit_cm3leon.evaluation.vqa_accuracy import (  # noqa: E402
    normalize_answer,
    py2_round,
    question_accuracy,
    score_vqa,
)


def _answers(*groups: tuple[str, int]) -> list[dict]:
    out = []
    for text, count in groups:
        out += [
            {"answer": text, "answer_confidence": "yes", "answer_id": len(out) + i + 1}
            for i in range(count)
        ]
    return out


def test_leave_one_out_average():
    # 2 of 10 said "yes": held-out "yes" -> 1 match (1/3), held-out "no" -> 2 matches (2/3)
    assert question_accuracy("yes", _answers(("yes", 2), ("no", 8))) == pytest.approx(
        (2 * 1 / 3 + 8 * 2 / 3) / 10
    )
    assert question_accuracy("no", _answers(("yes", 2), ("no", 8))) == 1.0
    # 3 of 10: held-out match -> 2/3, otherwise 3/3 -> 0.9
    assert question_accuracy("cat", _answers(("cat", 3), ("dog", 7))) == pytest.approx(0.9)
    assert question_accuracy("bird", _answers(("cat", 3), ("dog", 7))) == 0.0


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Two.", "2"),
        ("A red car!", "red car"),
        ("the dog", "dog"),
        ("dont know", "don't know"),
        ("1,000", "1000"),  # a digit,digit comma: punctuation deleted, not spaced
        ("red,blue", "red blue"),  # otherwise replaced by a space
        ("red, blue", "red blue"),  # a mark next to a space is deleted
        ("3.5", "3.5"),  # period before a digit kept
        ("e.g.", "eg"),
        ("none", "0"),
        ("Ten\tdogs\n", "10 dogs"),
        ("hot-dog", "hot dog"),
        ("it's", "it's"),  # the apostrophe is not in the official punctuation list
        ("5.", "5"),  # the mistyped look-behind: a period after a digit goes too
        ("." * 40, "." * 8),  # at most 32 periods are deleted (re.UNICODE passed as count)
    ],
)
def test_normalization(raw, norm):
    assert normalize_answer(raw) == norm


def test_normalization_only_when_humans_disagree():
    # all ten agree on "two dogs": the prediction is compared raw (after strip) -> "2 dogs" scores 0
    assert question_accuracy("2 dogs", _answers(("two dogs", 10))) == 0.0
    assert question_accuracy(" two dogs\n", _answers(("two dogs", 10))) == 1.0
    # once they disagree, both sides are normalized: "two"->"2" makes 7 matches
    assert question_accuracy("Two.", _answers(("two", 4), ("2", 3), ("3", 3))) == 1.0
    assert question_accuracy("1,000", _answers(("1000", 3), ("1,000", 2), ("many", 5))) == 1.0


def test_answer_types_overall_and_rounding():
    anns = [
        {
            "question_id": 1,
            "answers": _answers(("yes", 10)),
            "answer_type": "yes/no",
            "question_type": "is the",
        },
        {
            "question_id": 2,
            "answers": _answers(("yes", 2), ("no", 8)),
            "answer_type": "yes/no",
            "question_type": "is the",
        },
        {
            "question_id": 3,
            "answers": _answers(("2", 6), ("3", 4)),
            "answer_type": "number",
            "question_type": "how many",
        },
    ]
    s = score_vqa({1: "yes", 2: "yes", 3: "four"}, anns)
    assert s.perAnswerType == {"yes/no": 80.0, "number": 0.0}  # (1 + 0.6) / 2
    assert s.perQuestionType == {"is the": 80.0, "how many": 0.0}
    assert s.overall == 53.33  # 160 / 3
    # Python 2 rounding (ties away from zero): 1 right of 800 is 0.125 % -> 0.13 (Python 3: 0.12)
    assert py2_round(0.125) == 0.13 and round(0.125, 2) == 0.12
    many = [
        {"question_id": i, "answers": _answers(("a1", 10)), "answer_type": "other"}
        for i in range(800)
    ]
    preds = {i: ("a1" if i == 0 else "zz") for i in range(800)}
    assert score_vqa(preds, many).overall == 0.13


def _write_files(tmp: Path) -> tuple[Path, Path]:
    anns = {
        "annotations": [
            {"question_id": 10, "image_id": 1, "answers": _answers(("yes", 10)), "answer_type": "yes/no", "question_type": "is the"},
            {"question_id": 11, "image_id": 1, "answers": _answers(("yes", 2), ("no", 8)), "answer_type": "yes/no", "question_type": "is the"},
            {"question_id": 12, "image_id": 2, "answers": _answers(("2", 6), ("3", 4)), "answer_type": "number", "question_type": "how many"},
        ]
    }  # fmt: skip
    ques = {"questions": [{"question_id": q, "image_id": 1, "question": "?"} for q in (10, 11, 12)]}
    (tmp / "A.json").write_text(json.dumps(anns))
    (tmp / "Q.json").write_text(json.dumps(ques))
    return tmp / "Q.json", tmp / "A.json"


def _run(tmp: Path, preds, name: str = "m.json", extra: tuple = ()) -> tuple[int, Path]:
    q, a = _write_files(tmp)
    p = tmp / "results.json"
    p.write_text(preds if isinstance(preds, str) else json.dumps(preds))
    out = tmp / name
    rc = vqa_cli.main(["--predictions", str(p), "--questions", str(q), "--annotations", str(a), "--out", str(out),
                       "--bootstrap", "200", *extra])  # fmt: skip
    return rc, out


def test_cli_writes_metrics(tmp_path, capsys):
    preds = [
        {"question_id": 10, "answer": "Yes"},
        {"question_id": 11, "answer": "yes"},
        {"question_id": 12, "answer": "two"},
    ]
    rc, out = _run(tmp_path, preds, extra=("--ckpt", "outputs/sft/last.ckpt", "--seed", "3"))
    assert rc == 0
    m = json.loads(out.read_text())
    assert (
        all(k in m for k in HEADER_KEYS)
        and m["n"] == 3
        and m["seed"] == 3
        and m["protocol"] == "vqa2"
    )
    # q10: all humans say "yes", prediction "Yes" compared raw -> 0; q11 -> 0.6; q12 "two" -> "2": 6 matches -> 1
    assert m["overall"] == 53.33
    assert m["perAnswerType"] == {"yes/no": 30.0, "number": 100.0}
    assert m["perQuestionType"] == {"is the": 30.0, "how many": 100.0}
    lo, hi = m["ci95"]["overall"]
    assert 0 <= lo <= m["overall"] <= hi <= 100
    assert set(m["ci95"]["perAnswerType"]) == {"yes/no", "number"}
    assert m["bootstrap"]["resamples"] == 200
    assert "Overall Accuracy is: 53.33" in capsys.readouterr().out


@pytest.mark.parametrize(
    "preds, message",
    [
        (
            [{"question_id": 10, "answer": "yes"}, {"question_id": 99, "answer": "no"}],
            "unknown question_id 99",
        ),
        (
            [{"question_id": 10, "answer": "yes"}, {"question_id": 12, "answer": "2"}],
            "no prediction for question_id 11",
        ),
        (
            [{"question_id": 10, "answer": "yes"}, {"question_id": 10, "answer": "no"}],
            "entry 1 repeats question_id 10",
        ),
        ([{"question_id": 10, "answer": "yes"}, {"question_id": 11}], "entry 1"),
        ('[{"question_id": 10, "answer": "yes"},\n {"question_id": 11, answer: "no"}]', "line 2"),
        ({"question_id": 10}, "must be a JSON list"),
    ],
)
def test_cli_bad_predictions(tmp_path, capsys, preds, message):
    rc, out = _run(tmp_path, preds)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_score_vqa_names_unknown_id():
    anns = [{"question_id": 1, "answers": _answers(("a", 10)), "answer_type": "other"}]
    with pytest.raises(InputError, match="unknown question_id 7"):
        score_vqa({1: "a", 7: "b"}, anns)
