"""eval/captioning.py equals pycocoevalcap's COCOEvalCap on the same files (SPICE stubbed out
there, since its CoreNLP jars are absent; the Meteor JVM run once per distinct input); per-image
scores and bootstrap BLEU agree with it; bad inputs are named."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import captioning as captioning_cli  # noqa: E402

from lit_cm3leon.evaluation import captioning as caplib  # noqa: E402
from lit_cm3leon.evaluation.metrics_io import HEADER_KEYS, InputError  # noqa: E402

WORDS = "a man dog cat riding on the red blue bike street park with two small large sitting next to".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + rng.choice(
        [".", "", " !", ", too."]
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    rng = random.Random(1)
    tmp = tmp_path_factory.mktemp("captions")
    images = [{"id": 100 + 7 * i, "file_name": f"{i}.jpg"} for i in range(12)]
    anns = [
        {"id": j, "image_id": img["id"], "caption": _sentence(rng)}
        for j, img in enumerate(images * 5)
    ]
    (tmp / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    results = [{"image_id": img["id"], "caption": _sentence(rng)} for img in reversed(images)]
    results[0]["caption"] = anns[11]["caption"]  # one exact hit
    (tmp / "results.json").write_text(json.dumps(results))
    return tmp / "captions.json", tmp / "results.json", results


class _NoSpice:
    """Stand-in for pycocoevalcap's Spice (its constructor downloads CoreNLP)."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


class _OnceMeteor:
    """Meteor is a deterministic function of its inputs and its JVM start is slow: run the real
    one once per distinct input and count the distinct inputs seen."""

    real = None
    cache: dict = {}

    def compute_score(self, gts, res):
        key = json.dumps([[str(k), gts[k], res[k]] for k in gts])
        if key not in self.cache:
            meteor = self.real()
            try:
                self.cache[key] = meteor.compute_score(gts, res)
            finally:
                caplib._close_meteor(meteor)
        return self.cache[key]

    def method(self):
        return "METEOR"


def test_cli_equals_cocoevalcap(files, tmp_path, monkeypatch, capsys):
    import pycocoevalcap.eval as coco_eval_mod
    import pycocoevalcap.meteor.meteor as meteor_mod
    from pycocotools.coco import COCO

    monkeypatch.setattr(_OnceMeteor, "real", meteor_mod.Meteor)
    monkeypatch.setattr(_OnceMeteor, "cache", {})
    monkeypatch.setattr(meteor_mod, "Meteor", _OnceMeteor)
    monkeypatch.setattr(coco_eval_mod, "Meteor", _OnceMeteor)
    ann_path, res_path, _ = files
    out = tmp_path / "metrics.json"
    rc = captioning_cli.main(["--predictions", str(res_path), "--annotations", str(ann_path), "--out", str(out),
                              "--bootstrap", "100", "--seed", "5"])  # fmt: skip
    assert rc == 0
    ours = json.loads(out.read_text())

    monkeypatch.setattr(coco_eval_mod, "Spice", _NoSpice)
    coco = COCO(str(ann_path))
    evaluator = coco_eval_mod.COCOEvalCap(coco, coco.loadRes(str(res_path)))
    evaluator.evaluate()
    for m in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert ours[m] == evaluator.eval[m], m
    assert len(_OnceMeteor.cache) == 1  # METEOR saw the same tokenized inputs in both
    assert all(k in ours for k in HEADER_KEYS) and ours["n"] == 12 and ours["seed"] == 5
    assert ours["protocol"] == "coco-captions"
    assert "SPICE" not in ours and "SPICE" in ours["skipped"]
    for m in ("Bleu_4", "CIDEr", "METEOR", "ROUGE_L"):
        lo, hi = ours["ci95"][m]
        assert lo <= hi
    assert ours["ci95"]["CIDEr"][0] < ours["CIDEr"] < ours["ci95"]["CIDEr"][1]
    err = capsys.readouterr().err
    if caplib.spice_unavailable_reason() is not None:
        assert "SPICE skipped" in err and "stanford-corenlp-3.6.0.jar" in err

    # per-image scores match COCOEvalCap's imgToEval; corpus BLEU from per-image counts matches too
    refs = caplib.load_coco_captions(ann_path)
    preds = caplib.load_caption_results(res_path)
    lib = caplib.score_captions(preds, refs, metrics=("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"),
                                n_bootstrap=0)  # fmt: skip
    assert lib.ids == [img["id"] for img in json.loads(ann_path.read_text())["images"]]
    for m in ("ROUGE_L", "CIDEr", "Bleu_2"):
        np.testing.assert_allclose(
            lib.per_image[m], [evaluator.imgToEval[i][m] for i in lib.ids], rtol=0, atol=0
        )
    assert lib.scores["CIDEr"] == ours["CIDEr"]


def test_bootstrap_bleu_formula_matches_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    rng = random.Random(3)
    gts = {
        i: [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(3)]
        for i in range(15)
    }
    res = {i: [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))] for i in range(15)}
    expected, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scorer = BleuScorer(n=4)
    for i in gts:
        scorer += (res[i][0], gts[i])
    scorer.compute_score(option="closest", verbose=0)
    stats = caplib._bleu_stats(scorer)
    assert caplib.corpus_bleu(stats) == pytest.approx(expected, rel=1e-12)
    idx = np.array([0, 0, 3, 5, 5, 5, 9, 14])  # a resample = the duplicated items scored again
    sub = BleuScorer(n=4)
    for i in idx:
        sub += (res[int(i)][0], gts[int(i)])
    want, _ = sub.compute_score(option="closest", verbose=0)
    assert caplib.corpus_bleu(stats, idx) == pytest.approx(want, rel=1e-12)


def test_score_captions_on_plain_dicts():
    refs = {
        "s0": ["a red circle", "one red circle"],
        "s1": ["two blue squares", "blue squares"],
        "s2": ["a green triangle"],
    }
    perfect = caplib.score_captions({"s0": "a red circle", "s1": "two blue squares", "s2": "a green triangle"}, refs,
                                    metrics=("Bleu_1", "ROUGE_L", "CIDEr"), tokenize=False, n_bootstrap=50)  # fmt: skip
    wrong = caplib.score_captions({"s0": "blue squares", "s1": "a green triangle", "s2": "a red circle"}, refs,
                                  metrics=("Bleu_1", "ROUGE_L", "CIDEr"), tokenize=False, n_bootstrap=0)  # fmt: skip
    assert (
        perfect.scores["Bleu_1"] == pytest.approx(1.0, abs=1e-6)
        and perfect.scores["ROUGE_L"] == 1.0
    )
    assert perfect.scores["CIDEr"] > wrong.scores["CIDEr"] and wrong.scores["ROUGE_L"] < 1.0
    assert set(perfect.ci95) == {"Bleu_1", "ROUGE_L", "CIDEr"}
    with pytest.raises(ValueError, match="unknown caption metrics"):
        caplib.score_captions({"s0": "x"}, {"s0": ["x"]}, metrics=("BLEU",), tokenize=False)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r + [{"image_id": 999, "caption": "x"}], "unknown image_id 999"),
        (lambda r: r[1:], "no prediction for image_id"),
        (lambda r: r + [dict(r[0])], "repeats image_id"),
        (lambda r: [{"image_id": r[0]["image_id"], "caption": 3}] + r[1:], "entry 0"),
        (lambda r: json.dumps(r)[:-2], "not valid JSON (line 1"),
    ],
)
def test_cli_bad_predictions(files, tmp_path, capsys, mutate, message):
    ann_path, _, results = files
    bad = mutate([dict(r) for r in results])
    p = tmp_path / "bad.json"
    p.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    out = tmp_path / "m.json"
    rc = captioning_cli.main(
        ["--predictions", str(p), "--annotations", str(ann_path), "--out", str(out)]
    )
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_annotation_file_named(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        caplib.load_coco_captions(tmp_path / "nope.json")
