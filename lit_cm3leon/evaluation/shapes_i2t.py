"""Image-to-text evaluation of a checkpoint on the shapes world: captioning and VQA items,
generation through the SFT templates, caption claim accuracy and the honest baselines.

Captioning: the first ``n`` held-out scenes; references = the scene's short and long caption;
the prompt is the ``caption_long`` template. ``caption_attr_acc`` reads the (colour, kind) pairs a
caption claims (``claims_from_caption``, positions dropped) and compares them with the scene's
pairs: per image precision = right claims / claims (0 when nothing is claimed), recall = scene
pairs claimed / scene pairs, and ``caption_attr_acc`` = their F1 (0 when both are 0), each
averaged over images. Baseline: the most frequent long caption of the training split, given for
every image and scored the same way.

VQA: the held-out scenes' questions in order (scene 0's, then scene 1's, ...) until ``n``; the
``reasoning`` template for yes/no questions and ``vqa`` for the rest, as in SFT. Official files:
question ids ``10 * scene + k``, answer type ``yes/no`` / ``number`` / ``other``, question type
= the world's question type, and the 10 human answers = the exact answer 10 times. Baseline: the
question-only prior, the most frequent training answer of each question type (ties: the
alphabetically first).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lit_cm3leon.data.shapes import ShapesWorld, claims_from_caption

ANSWER_TYPES = {"yesno": "yes/no", "count": "number"}  # every other question type: "other"


def caption_items(n: int, world: ShapesWorld | None = None):
    """(image ids, images uint8 [n,H,W,3], {id: [short, long]}, {id: scene}) of held-out scenes."""
    world = world or ShapesWorld()
    samples = [world.sample("heldout", i) for i in range(n)]
    ids = list(range(n))
    refs = {i: [s.caption_short, s.caption_long] for i, s in zip(ids, samples, strict=True)}
    return (
        ids,
        np.stack([s.image for s in samples]),
        refs,
        {i: s.scene for i, s in zip(ids, samples, strict=True)},
    )


def coco_caption_file(refs: Mapping[int, Sequence[str]]) -> dict:
    """References in the COCO captions annotation layout (for rescoring with --annotations)."""
    images = [{"id": i, "file_name": f"heldout-{i:05d}.png"} for i in refs]
    anns = [
        {"id": 10 * i + j, "image_id": i, "caption": c}
        for i, caps in refs.items()
        for j, c in enumerate(caps)
    ]
    return {"images": images, "annotations": anns}


def pair_claims(text: str) -> set[tuple[str, str]]:
    return {c[:2] for c in claims_from_caption(text)}


def caption_attr_scores(preds: Mapping, scenes: Mapping) -> dict[str, np.ndarray]:
    """Per image (in ``scenes`` order) precision, recall and F1 of the claimed (colour, kind) pairs."""
    prec, rec, f1 = [], [], []
    for k, scene in scenes.items():
        claimed = pair_claims(preds[k])
        truth = scene.claims()
        hit = len(claimed & truth)
        p = hit / len(claimed) if claimed else 0.0
        r = hit / len(truth) if truth else float(not claimed)
        prec.append(p)
        rec.append(r)
        f1.append(2 * p * r / (p + r) if p + r > 0 else 0.0)
    return {
        "caption_attr_acc": np.array(f1),
        "caption_attr_precision": np.array(prec),
        "caption_attr_recall": np.array(rec),
    }


def most_frequent_caption(n_train: int, world: ShapesWorld | None = None) -> str:
    """The most frequent long caption among the first ``n_train`` training samples (ties: first seen)."""
    world = world or ShapesWorld()
    counts = Counter(world.caption_long(world.scene("train", i)) for i in range(n_train))
    return counts.most_common(1)[0][0]


@dataclass
class VQAItem:
    question_id: int
    scene_index: int
    question: str
    answer: str
    qtype: str

    @property
    def answer_type(self) -> str:
        return ANSWER_TYPES.get(self.qtype, "other")

    @property
    def task(self) -> str:
        return "reasoning" if self.qtype == "yesno" else "vqa"


def vqa_items(n: int, world: ShapesWorld | None = None) -> list[VQAItem]:
    world = world or ShapesWorld()
    items: list[VQAItem] = []
    i = 0
    while len(items) < n:
        for k, qa in enumerate(world.sample("heldout", i).vqa):
            if len(items) < n:
                items.append(VQAItem(10 * i + k, i, qa.question, qa.answer, qa.qtype))
        i += 1
    return items


def official_vqa_files(items: Sequence[VQAItem]) -> tuple[dict, dict]:
    """(questions, annotations) in the official VQA v2 layout."""
    questions = {
        "data_subtype": "shapes-heldout",
        "questions": [
            {"image_id": it.scene_index, "question": it.question, "question_id": it.question_id}
            for it in items
        ],
    }
    annotations = {
        "data_subtype": "shapes-heldout",
        "annotations": [
            {
                "question_id": it.question_id,
                "image_id": it.scene_index,
                "question_type": it.qtype,
                "answer_type": it.answer_type,
                "multiple_choice_answer": it.answer,
                "answers": [
                    {"answer": it.answer, "answer_confidence": "yes", "answer_id": j + 1}
                    for j in range(10)
                ],
            }
            for it in items
        ],
    }
    return questions, annotations


def answer_prior(n_train: int, world: ShapesWorld | None = None) -> dict[str, str]:
    """Most frequent training answer per question type (ties: alphabetically first)."""
    world = world or ShapesWorld()
    counts: dict[str, Counter] = {}
    for i in range(n_train):
        for qa in world.vqa(world.scene("train", i), world._rng("train", i, "vqa")):
            counts.setdefault(qa.qtype, Counter())[qa.answer] += 1
    return {q: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for q, c in counts.items()}


def generate_texts(
    engine, prompts: Sequence[list[int]], dec, seed: int = 0, batch_size: int = 64
) -> list[str]:
    """Text continuation of each prompt (ids from ``inference_prompt``), batch by batch."""
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        part = list(prompts[s : s + batch_size])
        out += engine.image_to_text(np.zeros((len(part), 1, 1)), dec, seed=seed + s, prompts=part)
    return [t.split("\n")[0].strip() for t in out]


# --- command-line pieces shared by eval/captioning.py and eval/vqa.py -------------------
def add_i2t_args(p: argparse.ArgumentParser, n: int, max_text_tokens: int) -> None:
    g = p.add_argument_group("generate with --ckpt (shapes world)")
    g.add_argument(
        "--outputs",
        default="outputs",
        help="the pipeline's outputs/ folder (tokenizers; runs go to <outputs>/eval/)",
    )
    g.add_argument(
        "--n", type=int, default=n, help=f"held-out items (default {n}, the shapes protocol)"
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    g.add_argument("--top-k", type=int, default=0, help="top-k when sampling (0: off)")
    g.add_argument(
        "--max-text-tokens", type=int, default=max_text_tokens, help="new text tokens at most"
    )
    g.add_argument(
        "--baseline-train",
        type=int,
        default=5000,
        help="training samples the baseline is counted on",
    )
    g.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    g.add_argument(
        "--run-dir",
        default=None,
        help="run folder (default named after the settings under <outputs>/eval/)",
    )


def i2t_run_dir(args: argparse.Namespace, kind: str, task: str) -> Path:
    from lit_cm3leon.evaluation.t2i_run import ckpt_label

    if args.run_dir:
        return Path(args.run_dir)
    dec = (
        "greedy"
        if args.temperature <= 0
        else f"t{args.temperature:g}" + (f"_topk{args.top_k}" if args.top_k else "")
    )
    name = f"{ckpt_label(args.ckpt)}_shapes-heldout_n{args.n}_{task}_{dec}_seed{args.seed}"
    return Path(args.outputs) / "eval" / kind / name


def i2t_setup(args: argparse.Namespace):
    """(engine, decoding, header kwargs) for --ckpt generation."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lit_cm3leon.engine import Decoding, Engine

    engine = Engine.load(args.ckpt, args.outputs, retrieval=False)
    dec = Decoding(
        temperature=args.temperature, top_k=args.top_k, max_text_tokens=args.max_text_tokens
    )
    strategy = "greedy" if args.temperature <= 0 else "temperature"
    return (
        engine,
        dec,
        dict(ckpt=str(args.ckpt), strategy=strategy, cfg_scale=None, num_samples=1, retrieve_k=0),
    )
