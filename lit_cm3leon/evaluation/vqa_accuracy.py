"""The official VQA accuracy (VQA v2 evaluation, GT-Vision-Lab/VQA `vqaEval.py`), reproduced
to the digit, quirks included:

* Answers (prediction and the 10 human answers) have newlines/tabs turned into spaces and are
  stripped. Only when the human answers DISAGREE (more than one distinct string) are the human
  answers and the prediction normalized (punctuation, then digit words / articles /
  contractions); when all 10 agree, the comparison is on the stripped raw strings.
* Punctuation: each mark is deleted if it touches a space anywhere in the answer (or the answer
  has a digit,digit comma), otherwise replaced by a space; then periods not followed by a digit
  are deleted (the official look-behind is mistyped, so a period after a digit is deleted too,
  and at most 32 periods are removed: `re.UNICODE` lands in the `count` argument).
* Per question: for each of the 10 human answers, min(#matches among the other answers / 3, 1);
  the question's accuracy is the mean of those 10 numbers. "The other answers" are those whose
  answer record differs from the held-out record, as the official comparison of dicts does.
* Overall, per answer type and per question type: mean of per-question accuracies x 100,
  rounded to 2 decimals the Python 2 way (half away from zero on the exact binary value).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import numpy as np

from lit_cm3leon.evaluation.metrics_io import InputError, check_predictions, load_json, read_results

# Official tables (vqaEval.py, master). Keys without apostrophes map to the contracted form.
# fmt: off
CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've",
    'couldnt': "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't",
    'doesnt': "doesn't", 'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've", 'hasnt': "hasn't", 'havent': "haven't", 'hed': "he'd",
    "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've",
    'Im': "I'm", 'Ive': "I've", 'isnt': "isn't", 'itd': "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", "let's": "let's",
    'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't",
    'notve': "not've", 'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd', "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll", 'somebodys': "somebody's", 'someoned': "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", 'someonell': "someone'll", 'someones': "someone's",
    'somethingd': "something'd", "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve': "they've",
    'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    'weve': "we've", 'werent': "weren't", 'whatll': "what'll", 'whatre': "what're",
    'whats': "what's", 'whatve': "what've", 'whens': "when's", 'whered': "where'd",
    'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's", 'whove': "who've",
    'whyll': "why'll", 'whyre': "why're", 'whys': "why's", 'wont': "won't",
    'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# fmt: on
# The official pattern, verbatim: "(?!<=" is a negative look-AHEAD for the literal "<=", not
# the intended look-behind for a digit; kept so that scores match.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PERIOD_COUNT = int(re.UNICODE)  # the official call passes re.UNICODE (32) as `count`


def process_punctuation(text: str) -> str:
    """Official punctuation handling (see module docstring)."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lowercase, number words -> digits, drop articles, then the contractions map."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Full official normalization of one answer string (whitespace, punctuation, words)."""
    return process_digit_article(process_punctuation(_clean_ws(text)))


def _clean_ws(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(prediction: str, answers: Sequence[str | Mapping[str, Any]]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the human answers of one question.

    `answers` are strings or official answer records (`{"answer", "answer_id", ...}`); with
    records, "the other answers" are those whose record differs from the held-out one (the
    official dict comparison), with strings those at other positions."""
    if len(answers) == 0:
        raise ValueError("a question needs at least one human answer")
    records = [
        dict(a) if isinstance(a, Mapping) else {"answer": a, "answer_id": i}
        for i, a in enumerate(answers)
    ]
    for r in records:
        r["answer"] = _clean_ws(r["answer"])
    pred = _clean_ws(prediction)
    if len({r["answer"] for r in records}) > 1:
        for r in records:
            r["answer"] = process_digit_article(process_punctuation(r["answer"]))
        pred = process_digit_article(process_punctuation(pred))
    accs = []
    for held in records:
        matches = sum(1 for r in records if r != held and r["answer"] == pred)
        accs.append(min(1.0, matches / 3))
    return float(sum(accs)) / len(accs)


def py2_round(x: float, ndigits: int = 2) -> float:
    """Python 2's round(): correctly rounded, ties away from zero (the official tool is Python 2)."""
    q = Decimal(1).scaleb(-ndigits)
    return float(Decimal(x).quantize(q, rounding=ROUND_HALF_UP))


@dataclass
class VQAScores:
    """Official summary (percent, 2 decimals) plus the unrounded per-question accuracies in [0, 1]."""

    overall: float
    perAnswerType: dict[str, float]
    perQuestionType: dict[str, float]
    question_ids: list = field(default_factory=list)
    accuracy: np.ndarray = field(default_factory=lambda: np.zeros(0))
    answer_types: list[str] = field(default_factory=list)
    question_types: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"overall": self.overall, "perAnswerType": self.perAnswerType}
        if self.perQuestionType:
            out["perQuestionType"] = self.perQuestionType
        return out


def score_vqa(
    predictions: Mapping[Any, str],
    annotations: Sequence[Mapping[str, Any]],
    ndigits: int = 2,
) -> VQAScores:
    """Official VQA accuracy of `predictions` ({question_id: answer}) over the official
    annotation records (`question_id, answers, answer_type[, question_type]`), in their order.

    Every annotated question must have a prediction and no prediction may be unannotated
    (the official loader asserts the same); `check_predictions` names the offender."""
    check_predictions(predictions, [a["question_id"] for a in annotations])
    qids, accs, atypes, qtypes = [], [], [], []
    for ann in annotations:
        qid = ann["question_id"]
        accs.append(question_accuracy(predictions[qid], ann["answers"]))
        qids.append(qid)
        atypes.append(ann.get("answer_type", "all"))
        qtypes.append(ann.get("question_type"))
    per_atype = _group_mean(accs, atypes, ndigits)
    per_qtype = _group_mean(accs, qtypes, ndigits) if all(q is not None for q in qtypes) else {}
    overall = py2_round(100 * float(sum(accs)) / len(accs), ndigits) if accs else float("nan")
    return VQAScores(
        overall, per_atype, per_qtype, qids, np.asarray(accs, dtype=np.float64), atypes, qtypes
    )


def _group_mean(accs: list[float], groups: list, ndigits: int) -> dict[str, float]:
    buckets: dict[str, list[float]] = {}
    for a, g in zip(accs, groups, strict=True):
        buckets.setdefault(g, []).append(a)
    return {g: py2_round(100 * float(sum(v)) / len(v), ndigits) for g, v in buckets.items()}


def vqa_bootstrap_statistic(scores: VQAScores):
    """Statistic for `bootstrap_ci`: overall and per-answer-type accuracy (percent) of a resample."""
    acc = scores.accuracy
    types = np.asarray(scores.answer_types, dtype=object)
    masks = {t: types == t for t in dict.fromkeys(scores.answer_types)}

    def stat(idx: np.ndarray) -> dict[str, float]:
        out = {"overall": 100 * float(acc[idx].mean())}
        for t, m in masks.items():
            sel = m[idx]
            out[f"perAnswerType/{t}"] = (
                100 * float(acc[idx][sel].mean()) if sel.any() else float("nan")
            )
        return out

    return stat


def load_vqa(
    predictions_path: str | Path, questions_path: str | Path, annotations_path: str | Path
) -> tuple[dict[Any, str], list[dict[str, Any]]]:
    """Read official results, questions and annotations files and check they agree."""
    anns = load_json(annotations_path, "annotations")
    if not isinstance(anns, dict) or not isinstance(anns.get("annotations"), list):
        raise InputError(
            f"annotations: {annotations_path} must be an official VQA annotation file (an object with an 'annotations' list)"
        )
    for i, a in enumerate(anns["annotations"]):
        if (
            not isinstance(a, dict)
            or "question_id" not in a
            or not isinstance(a.get("answers"), list)
            or not a["answers"]
        ):
            raise InputError(
                f"annotations: {annotations_path} record {i} lacks 'question_id' or a non-empty 'answers' list"
            )
    ques = load_json(questions_path, "questions")
    if not isinstance(ques, dict) or not isinstance(ques.get("questions"), list):
        raise InputError(
            f"questions: {questions_path} must be an official VQA question file (an object with a 'questions' list)"
        )
    qids = {q.get("question_id") for q in ques["questions"] if isinstance(q, dict)}
    for a in anns["annotations"]:
        if a["question_id"] not in qids:
            raise InputError(
                f"questions: {questions_path} has no question {a['question_id']!r} of the annotations"
            )
    preds = read_results(predictions_path, "question_id", "answer")
    check_predictions(preds, [a["question_id"] for a in anns["annotations"]])
    return preds, anns["annotations"]
