"""COCO captioning metrics through pycocoevalcap, with per-image scores for bootstrap intervals.

The point estimates are pycocoevalcap's own numbers (PTBTokenizer, then Bleu(4) with the
"closest" reference length, Meteor 1.5, Rouge-L, CIDEr-D, SPICE), under pycocoevalcap's names.
Intervals resample images: BLEU is recomputed at corpus level from per-image n-gram counts,
ROUGE_L/CIDEr/SPICE are means of per-image scores (CIDEr's document frequencies stay those of
the full reference set), and METEOR uses the mean of per-image scores (the corpus METEOR of the
jar aggregates statistics instead; the interval is of the segment mean).

SPICE needs the Stanford CoreNLP 3.6.0 jars in pycocoevalcap's `spice/lib/`; without them it is
skipped with a message (pycocoevalcap would try to download them).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lit_cm3leon.evaluation import bootstrap
from lit_cm3leon.evaluation.metrics_io import InputError, check_predictions, load_json, read_results

BLEU = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
ALL_METRICS = (*BLEU, "METEOR", "ROUGE_L", "CIDEr", "SPICE")
DEFAULT_METRICS = ALL_METRICS  # SPICE is dropped with a message when its jars are absent


def spice_jars() -> list[Path]:
    """Where pycocoevalcap's SPICE looks for Stanford CoreNLP (it downloads them when absent)."""
    import pycocoevalcap.spice.spice as spice_mod

    lib = Path(spice_mod.__file__).parent / "lib"
    return [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]


def spice_unavailable_reason() -> str | None:
    """None when SPICE can run; otherwise why not and how to fix it."""
    if shutil.which("java") is None:
        return "SPICE skipped: no `java` on PATH"
    missing = [str(p) for p in spice_jars() if not p.is_file()]
    if missing:
        return (
            "SPICE skipped: Stanford CoreNLP 3.6.0 jars not found at "
            + ", ".join(missing)
            + " (copy stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar from "
            "stanford-corenlp-full-2015-12-09 there)"
        )
    return None


def ptb_tokenize(captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    """pycocoevalcap's PTBTokenizer (Java): lowercase, PTB tokens, punctuation removed."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


@dataclass
class CaptionScores:
    scores: dict[str, float]  # pycocoevalcap's corpus scores, by pycocoevalcap's names
    per_image: dict[str, np.ndarray]  # per-image scores, in `ids` order
    ids: list
    ci95: dict[str, list[float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> reason


def score_captions(
    preds: Mapping[Any, str],
    refs: Mapping[Any, Sequence[str]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    tokenize: bool = True,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> CaptionScores:
    """Score one caption per id (`preds`) against reference captions (`refs`, order = image
    order) with pycocoevalcap. Works on plain dicts (e.g. the shapes world)."""
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown}; choose from {ALL_METRICS}")
    check_predictions(preds, list(refs), id_name="image_id")
    for k, v in refs.items():
        if len(v) == 0:
            raise InputError(f"image_id {k!r} has no reference caption")
    ids = list(refs)
    if tokenize:
        # one Java call for both sides: the tokenizer treats every line on its own
        both = ptb_tokenize(
            {**{("ref", k): list(refs[k]) for k in ids}, **{("hyp", k): [preds[k]] for k in ids}}
        )
        gts = {k: both[("ref", k)] for k in ids}
        res = {k: both[("hyp", k)] for k in ids}
    else:
        gts = {k: list(refs[k]) for k in ids}
        res = {k: [preds[k]] for k in ids}
    scores: dict[str, float] = {}
    per_image: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    stats: dict[str, Any] = {}
    wanted = list(metrics)

    if any(m in wanted for m in BLEU):
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer

        scorer = BleuScorer(n=4)
        for k in ids:
            scorer += (res[k][0], gts[k])
        corpus, per = scorer.compute_score(option="closest", verbose=0)
        stats["bleu"] = _bleu_stats(scorer)
        for i, m in enumerate(BLEU):
            if m in wanted:
                scores[m] = float(corpus[i])
                per_image[m] = np.asarray(per[i], dtype=np.float64)
    if "METEOR" in wanted:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            s, per = meteor.compute_score(gts, res)
        finally:
            _close_meteor(meteor)
        scores["METEOR"], per_image["METEOR"] = float(s), np.asarray(per, dtype=np.float64)
    if "ROUGE_L" in wanted:
        from pycocoevalcap.rouge.rouge import Rouge

        s, per = Rouge().compute_score(gts, res)
        scores["ROUGE_L"], per_image["ROUGE_L"] = float(s), np.asarray(per, dtype=np.float64)
    if "CIDEr" in wanted:
        from pycocoevalcap.cider.cider import Cider

        s, per = Cider().compute_score(gts, res)
        scores["CIDEr"], per_image["CIDEr"] = float(s), np.asarray(per, dtype=np.float64)
    if "SPICE" in wanted:
        reason = spice_unavailable_reason()
        if reason is not None:
            skipped["SPICE"] = reason
        else:
            from pycocoevalcap.spice.spice import Spice

            s, per = Spice().compute_score(gts, res)
            # Spice sorts ids; put per-image scores back in `ids` order
            by_id = dict(zip(sorted(ids), (p["All"]["f"] for p in per), strict=True))
            scores["SPICE"] = float(s)
            per_image["SPICE"] = np.asarray([by_id[k] for k in ids], dtype=np.float64)

    ci95 = bootstrap.bootstrap_ci(len(ids), _caption_statistic(per_image, stats), n_bootstrap, seed)
    return CaptionScores(scores, per_image, ids, ci95, skipped)


def _close_meteor(meteor: Any) -> None:
    """Stop the Meteor JVM now rather than at garbage collection."""
    proc = getattr(meteor, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        with meteor.lock:
            proc.stdin.close()
            proc.kill()
            proc.wait()


def _bleu_stats(scorer: Any) -> dict[str, np.ndarray]:
    """Per-image BLEU statistics (hypothesis length, closest reference length, n-gram guesses
    and matches) from a scored pycocoevalcap BleuScorer."""
    testlen, reflen, guess, correct = [], [], [], []
    for comps in scorer.ctest:
        t = comps["testlen"]
        testlen.append(t)
        reflen.append(scorer._single_reflen(comps["reflen"], "closest", t))
        guess.append(comps["guess"])
        correct.append(comps["correct"])
    return {
        "testlen": np.asarray(testlen, dtype=np.float64),
        "reflen": np.asarray(reflen, dtype=np.float64),
        "guess": np.asarray(guess, dtype=np.float64),
        "correct": np.asarray(correct, dtype=np.float64),
    }


def corpus_bleu(stats: Mapping[str, np.ndarray], idx: np.ndarray | None = None) -> list[float]:
    """Corpus BLEU-1..4 from per-image statistics (pycocoevalcap's formula, its smoothing
    constants included), on the images `idx` (all when None)."""
    if idx is None:
        idx = np.arange(len(stats["testlen"]))
    tiny, small = 1e-15, 1e-9
    testlen = float(stats["testlen"][idx].sum())
    reflen = float(stats["reflen"][idx].sum())
    guess = stats["guess"][idx].sum(axis=0)
    correct = stats["correct"][idx].sum(axis=0)
    out, prod = [], 1.0
    for k in range(len(guess)):
        prod *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
        out.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


def _caption_statistic(per_image: Mapping[str, np.ndarray], stats: Mapping[str, Any]):
    means = {k: v for k, v in per_image.items() if k not in BLEU}
    bleu_names = [m for m in BLEU if m in per_image]

    def stat(idx: np.ndarray) -> dict[str, float]:
        out = {k: float(v[idx].mean()) for k, v in means.items()}
        if bleu_names:
            b = corpus_bleu(stats["bleu"], idx)
            out.update({m: b[BLEU.index(m)] for m in bleu_names})
        return out

    return stat


def load_coco_captions(path: str | Path) -> dict[Any, list[str]]:
    """Reference captions of a COCO captions annotation file, {image_id: [caption, ...]} in the
    order of its `images` list (pycocotools' order), captions in annotation order."""
    data = load_json(path, "annotations")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(
            f"annotations: {path} must be a COCO captions file (an object with 'images' and 'annotations')"
        )
    refs: dict[Any, list[str]] = {}
    for img in data.get("images", []):
        if not isinstance(img, dict) or "id" not in img:
            raise InputError(
                f"annotations: {path} has an image record without 'id': {str(img)[:80]}"
            )
        refs.setdefault(img["id"], [])
    for i, ann in enumerate(data["annotations"]):
        if (
            not isinstance(ann, dict)
            or "image_id" not in ann
            or not isinstance(ann.get("caption"), str)
        ):
            raise InputError(
                f"annotations: {path} annotation {i} lacks 'image_id' or a string 'caption'"
            )
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    empty = [k for k, v in refs.items() if not v]
    if empty:
        raise InputError(f"annotations: {path} image {empty[0]!r} has no caption")
    return refs


def load_caption_results(path: str | Path) -> dict[Any, str]:
    """COCO results format `[{"image_id", "caption"}]`, one caption per image."""
    return read_results(path, "image_id", "caption")
