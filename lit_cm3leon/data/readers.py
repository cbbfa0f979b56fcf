"""Readers for the official file formats of the SFT datasets -> uniform example dicts.

Every reader takes the dataset's root folder and a split name and returns :class:`Records`:
example dicts in the template keys of :mod:`lit_cm3leon.data.templates` with image *paths*
(``image``, and ``target`` for edits), plus ``id`` and ``source``. A missing root, annotation
file or image folder raises :class:`LayoutError` naming the files expected; records that cannot
be used (missing fields, empty text, image file absent) are skipped and counted
(``Records.skipped``, ``Records.reasons``).

==================  =====================================================================  ====================
reader              files under ``root``                                                   example keys
==================  =====================================================================  ====================
coco_captions       ``annotations/captions_<split>.json`` (or ``captions_<split>.json``),     image, caption,
                    images ``<split>/<file_name>``; split e.g. ``train2014``, ``val2017``    captions
coco_karpathy       ``dataset_coco.json``, images ``<filepath>/<filename>``; split train      image, caption,
                    (train + restval), restval, val, test                                  captions
flickr30k           ``dataset_flickr30k.json`` (Karpathy), images ``flickr30k-images/`` or    image, caption,
                    ``images/``; split train, val, test                                    captions
vqa2                ``v2_OpenEnded_mscoco_<split>_questions.json`` +                         image, question,
                    ``v2_mscoco_<split>_annotations.json``, images                           answer, answers
                    ``<split>/COCO_<split>_<image_id:012d>.jpg``; split train2014, val2014
okvqa               ``OpenEnded_mscoco_<split>_questions.json`` +                            as vqa2
                    ``mscoco_<split>_annotations.json`` (the VQA layout), COCO images as vqa2
vizwiz              ``<split>.json`` (or ``Annotations/<split>.json``): list of {image,       image, question,
                    question, answers: [{answer, answer_confidence}], answer_type,           answer, answers
                    answerable}; images ``<split>/<image>``; split train, val
image_paragraph     ``paragraphs_v1.json`` (list of {image_id, paragraph, url}) +            image, paragraph
                    ``<split>_split.json`` (image ids); images ``images/``, ``VG_100K/`` or
                    ``VG_100K_2/`` as ``<image_id>.jpg``; split train, val, test
instructpix2pix     the released generated dataset: ``seeds.json`` = [[prompt_dir,            image, target,
                    [seed, ...]], ...]; each ``<prompt_dir>/prompt.json`` holds ``edit``      instruction
                    (and ``input``/``output`` captions), images ``<seed>_0.jpg`` (before)
                    and ``<seed>_1.jpg`` (after). Split train / val / test = the first 90% /
                    next 5% / last 5% of seeds.json, as the dataset's own loader. Without
                    seeds.json, every sub-folder holding a prompt.json is a prompt dir (sorted)
                    and its ``*_0.jpg`` files give the seeds.
==================  =====================================================================  ====================

VQA answers: ``answer`` is the official ``multiple_choice_answer`` when present, else the most
frequent of the human answers; ``answers`` keeps all of them (for sampling and for scoring).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LayoutError(FileNotFoundError):
    """A dataset folder that is missing or not in the official layout; names the files expected."""


@dataclass
class Records:
    """The usable examples of one split of one dataset, and what was skipped."""

    source: str
    split: str
    examples: list[dict] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)  # why records were skipped
    _exists: dict = field(default_factory=dict, repr=False)  # image path -> is a file

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def skip(self, reason: str) -> None:
        self.reasons[reason] += 1

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def _root(root: str | Path, what: str, expected: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{what}: no folder at {root}; expected {expected}")
    return root


def _first(root: Path, candidates: list[str], what: str, expected: str) -> Path:
    for c in candidates:
        if (root / c).exists():
            return root / c
    raise LayoutError(
        f"{what}: none of {', '.join(str(root / c) for c in candidates)} exists; expected {expected}"
    )


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayoutError(f"{what}: {path} is not readable JSON ({e})") from None


def _text(x: Any) -> str | None:
    return x.strip() if isinstance(x, str) and x.strip() else None


def _with_image(rec: Records, example: dict, *keys: str) -> None:
    for k in keys:
        path = str(example[k])
        if path not in rec._exists:  # VQA questions share images: stat each file once per read
            rec._exists[path] = Path(path).is_file()
        if not rec._exists[path]:
            rec.skip("image file missing")
            return
    rec.examples.append(example)


# --- captions ------------------------------------------------------------------------------
def read_coco_captions(root: str | Path, split: str) -> Records:
    """Official COCO caption annotations (``captions_<split>.json``)."""
    expected = (
        f"annotations/captions_{split}.json and images in {split}/ (the official COCO layout)"
    )
    root = _root(root, "COCO captions", expected)
    path = _first(
        root,
        [f"annotations/captions_{split}.json", f"captions_{split}.json"],
        "COCO captions",
        expected,
    )
    data = _load_json(path, "COCO captions")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise LayoutError(
            f"COCO captions: {path} lacks 'images'/'annotations'; expected {expected}"
        )
    image_dir = _first(root, [split, f"images/{split}"], "COCO captions", expected)
    rec = Records("coco_captions", split)
    files: dict[int, str] = {}
    for im in data["images"]:
        try:
            files[int(im["id"])] = str(im["file_name"])
        except (KeyError, TypeError, ValueError):
            rec.skip("malformed image entry")
    captions: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        try:
            image_id, caption = int(ann["image_id"]), _text(ann.get("caption"))
        except (KeyError, TypeError, ValueError):
            rec.skip("malformed annotation")
            continue
        if caption is None or image_id not in files:
            rec.skip("empty caption" if caption is None else "caption of an unknown image")
            continue
        captions.setdefault(image_id, []).append(caption)
    for image_id in sorted(captions):
        caps = captions[image_id]
        ex = {
            "source": "coco_captions",
            "id": image_id,
            "image": str(image_dir / files[image_id]),
            "caption": caps[0],
            "captions": caps,
        }
        _with_image(rec, ex, "image")
    return rec


def _karpathy(
    name: str, root: str | Path, split: str, json_name: str, image_dirs: list[str] | None
) -> Records:
    splits = {
        "train": ("train", "restval"),
        "restval": ("restval",),
        "val": ("val",),
        "test": ("test",),
    }
    if split not in splits:
        raise ValueError(f"{name}: split must be one of {sorted(splits)}, got {split!r}")
    expected = f"{json_name} (Karpathy split) beside the image folders"
    root = _root(root, name, expected)
    path = _first(root, [json_name, f"annotations/{json_name}"], name, expected)
    data = _load_json(path, name)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise LayoutError(f"{name}: {path} has no 'images' list; expected {expected}")
    base = (
        _first(root, image_dirs, name, f"images in {' or '.join(image_dirs)}")
        if image_dirs
        else root
    )
    rec = Records(name, split)
    for im in data["images"]:
        try:
            if im["split"] not in splits[split]:
                continue
            caps = [t for t in (_text(s.get("raw")) for s in im["sentences"]) if t]
            rel = Path(im.get("filepath", "")) / im["filename"]
            image_id = im.get("cocoid", im.get("imgid"))
        except (KeyError, TypeError, AttributeError):
            rec.skip("malformed image entry")
            continue
        if not caps:
            rec.skip("no caption")
            continue
        ex = {
            "source": name,
            "id": image_id,
            "image": str(base / rel),
            "caption": caps[0],
            "captions": caps,
        }
        _with_image(rec, ex, "image")
    return rec


def read_coco_karpathy(root: str | Path, split: str) -> Records:
    """Karpathy's ``dataset_coco.json``; ``train`` includes ``restval``."""
    return _karpathy("coco_karpathy", root, split, "dataset_coco.json", None)


def read_flickr30k(root: str | Path, split: str) -> Records:
    """Karpathy's ``dataset_flickr30k.json`` with images in ``flickr30k-images/`` (or ``images/``)."""
    return _karpathy(
        "flickr30k", root, split, "dataset_flickr30k.json", ["flickr30k-images", "images"]
    )


# --- VQA -----------------------------------------------------------------------------------
def _majority(answers: list[str]) -> str | None:
    if not answers:
        return None
    counts = Counter(answers)
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))


def _vqa_layout(
    name: str,
    root: str | Path,
    split: str,
    questions: str,
    annotations: str,
    image_dir: str | Path | None = None,
) -> Records:
    expected = f"{questions} and {annotations} (the VQA layout), images in {split}/COCO_{split}_<image_id:012d>.jpg"
    root = _root(root, name, expected)
    qpath = _first(
        root, [questions, f"Questions/{questions}", f"questions/{questions}"], name, expected
    )
    apath = _first(
        root,
        [annotations, f"Annotations/{annotations}", f"annotations/{annotations}"],
        name,
        expected,
    )
    qdata, adata = _load_json(qpath, name), _load_json(apath, name)
    if not isinstance(qdata, dict) or "questions" not in qdata:
        raise LayoutError(f"{name}: {qpath} has no 'questions'; expected {expected}")
    if not isinstance(adata, dict) or "annotations" not in adata:
        raise LayoutError(f"{name}: {apath} has no 'annotations'; expected {expected}")
    image_dir = _first(
        Path(image_dir) if image_dir else root, [split, f"images/{split}"], name, expected
    )
    rec = Records(name, split)
    anns: dict[int, dict] = {}
    for a in adata["annotations"]:
        try:
            anns[int(a["question_id"])] = a
        except (KeyError, TypeError, ValueError):
            rec.skip("malformed annotation")
    for q in qdata["questions"]:
        try:
            qid, image_id, question = (
                int(q["question_id"]),
                int(q["image_id"]),
                _text(q["question"]),
            )
            ann = anns.get(qid)
            answers = (
                [t for t in (_text(a.get("answer")) for a in ann["answers"]) if t] if ann else []
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            rec.skip("malformed question")
            continue
        if question is None or ann is None or not answers:
            rec.skip("question without annotation" if ann is None else "empty question or answers")
            continue
        answer = _text(ann.get("multiple_choice_answer")) or _majority(answers)
        image = image_dir / f"COCO_{split}_{image_id:012d}.jpg"
        ex = {
            "source": name,
            "id": qid,
            "image_id": image_id,
            "image": str(image),
            "question": question,
            "answer": answer,
            "answers": answers,
            "answer_type": ann.get("answer_type"),
        }
        _with_image(rec, ex, "image")
    return rec


def read_vqa2(root: str | Path, split: str, image_dir: str | Path | None = None) -> Records:
    """VQA v2 (``v2_OpenEnded_mscoco_<split>_questions.json`` + ``v2_mscoco_<split>_annotations.json``).

    ``image_dir``: the folder holding ``<split>/`` of COCO images when it is not ``root``
    (e.g. ``data/coco``, shared with the caption datasets)."""
    q, a = f"v2_OpenEnded_mscoco_{split}_questions.json", f"v2_mscoco_{split}_annotations.json"
    return _vqa_layout("vqa2", root, split, q, a, image_dir)


def read_okvqa(root: str | Path, split: str, image_dir: str | Path | None = None) -> Records:
    """OK-VQA (``OpenEnded_mscoco_<split>_questions.json`` + ``mscoco_<split>_annotations.json``)."""
    q, a = f"OpenEnded_mscoco_{split}_questions.json", f"mscoco_{split}_annotations.json"
    return _vqa_layout("okvqa", root, split, q, a, image_dir)


def read_vizwiz(root: str | Path, split: str) -> Records:
    """VizWiz-VQA (``<split>.json``: a list of {image, question, answers, answer_type, answerable})."""
    expected = f"{split}.json or Annotations/{split}.json and the images in {split}/"
    root = _root(root, "VizWiz", expected)
    path = _first(
        root,
        [f"{split}.json", f"Annotations/{split}.json", f"annotations/{split}.json"],
        "VizWiz",
        expected,
    )
    data = _load_json(path, "VizWiz")
    if not isinstance(data, list):
        raise LayoutError(f"VizWiz: {path} is not a list of questions; expected {expected}")
    image_dir = _first(root, [split, f"images/{split}"], "VizWiz", expected)
    rec = Records("vizwiz", split)
    for k, q in enumerate(data):
        try:
            question = _text(q["question"])
            answers = [t for t in (_text(a.get("answer")) for a in q["answers"]) if t]
            image = image_dir / str(q["image"])
        except (KeyError, TypeError, AttributeError):
            rec.skip("malformed record")
            continue
        if question is None or not answers:
            rec.skip("empty question or answers")
            continue
        ex = {
            "source": "vizwiz",
            "id": q.get("image", k),
            "image": str(image),
            "question": question,
            "answer": _majority(answers),
            "answers": answers,
            "answer_type": q.get("answer_type"),
            "answerable": q.get("answerable"),
        }
        _with_image(rec, ex, "image")
    return rec


# --- paragraphs ----------------------------------------------------------------------------
def read_image_paragraph(root: str | Path, split: str) -> Records:
    """Stanford Image Paragraph (``paragraphs_v1.json`` + ``<split>_split.json``, Visual Genome images)."""
    expected = f"paragraphs_v1.json, {split}_split.json and the images as images/<image_id>.jpg (or VG_100K/)"
    root = _root(root, "Image Paragraph", expected)
    ppath = _first(root, ["paragraphs_v1.json"], "Image Paragraph", expected)
    spath = _first(root, [f"{split}_split.json"], "Image Paragraph", expected)
    paragraphs, ids = _load_json(ppath, "Image Paragraph"), _load_json(spath, "Image Paragraph")
    if not isinstance(paragraphs, list) or not isinstance(ids, list):
        raise LayoutError(
            f"Image Paragraph: {ppath} and {spath} must be JSON lists; expected {expected}"
        )
    dirs = [d for d in ("images", "VG_100K", "VG_100K_2") if (root / d).is_dir()]
    if not dirs:
        raise LayoutError(f"Image Paragraph: no image folder under {root}; expected {expected}")
    wanted = {int(i) for i in ids if isinstance(i, int | str) and str(i).isdigit()}
    rec = Records("image_paragraph", split)
    for p in paragraphs:
        try:
            image_id, text = int(p["image_id"]), _text(p["paragraph"])
        except (KeyError, TypeError, ValueError):
            rec.skip("malformed record")
            continue
        if image_id not in wanted:
            continue
        if text is None:
            rec.skip("empty paragraph")
            continue
        image = next(
            (
                root / d / f"{image_id}.jpg"
                for d in dirs
                if (root / d / f"{image_id}.jpg").is_file()
            ),
            root / dirs[0] / f"{image_id}.jpg",
        )
        _with_image(
            rec,
            {"source": "image_paragraph", "id": image_id, "image": str(image), "paragraph": text},
            "image",
        )
    return rec


# --- edits ---------------------------------------------------------------------------------
IP2P_SPLITS = {"train": (0.0, 0.9), "val": (0.9, 0.95), "test": (0.95, 1.0)}


def read_instructpix2pix(root: str | Path, split: str) -> Records:
    """InstructPix2Pix's generated dataset (``seeds.json``, ``<dir>/prompt.json``, ``<seed>_0/1.jpg``)."""
    expected = "seeds.json and prompt folders holding prompt.json with 'edit', <seed>_0.jpg and <seed>_1.jpg"
    if split not in IP2P_SPLITS:
        raise ValueError(
            f"instructpix2pix: split must be one of {sorted(IP2P_SPLITS)}, got {split!r}"
        )
    root = _root(root, "InstructPix2Pix", expected)
    rec = Records("instructpix2pix", split)
    if (root / "seeds.json").is_file():
        seeds = _load_json(root / "seeds.json", "InstructPix2Pix")
        if not isinstance(seeds, list):
            raise LayoutError(
                f"InstructPix2Pix: {root / 'seeds.json'} is not a list of [dir, [seeds]]"
            )
    else:
        dirs = sorted(p.parent for p in root.glob("*/prompt.json"))
        if not dirs:
            raise LayoutError(
                f"InstructPix2Pix: neither seeds.json nor */prompt.json under {root}; expected {expected}"
            )
        seeds = [
            [d.name, sorted(f.name[: -len("_0.jpg")] for f in d.glob("*_0.jpg"))] for d in dirs
        ]
    lo, hi = IP2P_SPLITS[split]
    for entry in seeds[math.floor(lo * len(seeds)) : math.floor(hi * len(seeds))]:
        try:
            name, keys = str(entry[0]), list(entry[1])
            prompt = json.loads((root / name / "prompt.json").read_text(encoding="utf-8"))
            instruction = _text(prompt["edit"])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            rec.skip("unreadable prompt.json")
            continue
        if instruction is None or not keys:
            rec.skip("empty edit or no seeds")
            continue
        for key in keys:
            ex = {
                "source": "instructpix2pix",
                "id": f"{name}/{key}",
                "image": str(root / name / f"{key}_0.jpg"),
                "target": str(root / name / f"{key}_1.jpg"),
                "instruction": instruction,
                "input_caption": prompt.get("input"),
                "output_caption": prompt.get("output"),
            }
            _with_image(rec, ex, "image", "target")
    return rec


READERS: dict[str, Callable[..., Records]] = {
    "coco_captions": read_coco_captions,
    "coco_karpathy": read_coco_karpathy,
    "flickr30k": read_flickr30k,
    "vqa2": read_vqa2,
    "okvqa": read_okvqa,
    "vizwiz": read_vizwiz,
    "image_paragraph": read_image_paragraph,
    "instructpix2pix": read_instructpix2pix,
}


def read_source(
    reader: str,
    root: str | Path,
    split: str,
    max_examples: int | None = None,
    image_dir: str | Path | None = None,
) -> Records:
    """Run a reader by name; keep the first ``max_examples`` examples when set. ``image_dir``
    (vqa2, okvqa only) points at the COCO images when they are not under ``root``."""
    if reader not in READERS:
        raise KeyError(f"unknown reader {reader!r}; readers: {', '.join(READERS)}")
    if image_dir is not None:
        if reader not in ("vqa2", "okvqa"):
            raise ValueError(
                f"image_dir is an option of the vqa2 and okvqa readers, not of {reader}"
            )
        rec = READERS[reader](root, split, image_dir=image_dir)
    else:
        rec = READERS[reader](root, split)
    if max_examples is not None:
        rec.examples = rec.examples[: int(max_examples)]
    return rec
