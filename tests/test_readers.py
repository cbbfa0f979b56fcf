"""Readers of the official dataset formats, each on a tiny fixture in that format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from lit_cm3leon.data.readers import READERS, LayoutError, read_source
from lit_cm3leon.tokenizer.vqgan import PRESETS


def write_image(path: Path, color=(200, 30, 30), size=(12, 10)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", size, color).save(path)
    return path.name


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


# --- fixtures in the official layouts ------------------------------------------------------
def make_coco_captions(root: Path, split: str = "val2014") -> None:
    images = [
        {"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg", "height": 10, "width": 12}
        for i in (1, 2, 3)
    ]
    for im in images[:2]:  # image 3's file is missing
        write_image(root / split / im["file_name"])
    anns = [
        {"id": 10, "image_id": 1, "caption": "A red square."},
        {"id": 11, "image_id": 1, "caption": "A square."},
        {"id": 12, "image_id": 2, "caption": "  "},
        {"id": 13, "image_id": 2, "caption": "Blue sky."},
        {"id": 14, "image_id": 3, "caption": "Lost."},
        {"id": 15, "image_id": 99, "caption": "No image."},
        {"id": 16, "caption": "no image id"},
    ]
    dump(
        root / "annotations" / f"captions_{split}.json",
        {"info": {}, "images": images, "annotations": anns},
    )


def make_karpathy(root: Path, name: str, with_filepath: bool, image_dir: str = "") -> None:
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "train"]):
        filepath = "val2014" if with_filepath else ""
        filename = f"img{i}.jpg"
        if i != 4:  # the last one's file is missing
            write_image(root / (image_dir or filepath) / filename)
        entry = {
            "filename": filename,
            "imgid": i,
            "split": split,
            "sentid": [i],
            "sentences": [
                {"raw": f"caption {i} a", "tokens": ["caption"]},
                {"raw": f"caption {i} b", "tokens": []},
            ],
        }
        if with_filepath:
            entry.update(filepath=filepath, cocoid=100 + i)
        images.append(entry)
    images.append(
        {"filename": "x.jpg", "imgid": 9, "split": "train", "sentences": []}
    )  # no caption
    dump(root / name, {"images": images, "dataset": "coco" if with_filepath else "flickr30k"})


def make_vqa(
    root: Path, split: str, questions: str, annotations: str, n: int = 4, images: Path | None = None
) -> None:
    qs, anns = [], []
    for k in range(n):
        image_id = 10 + k
        write_image((images or root) / split / f"COCO_{split}_{image_id:012d}.jpg")
        qid = image_id * 10
        qs.append({"image_id": image_id, "question": f"is it red {k}?", "question_id": qid})
        answers = [
            {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
            for j, a in enumerate(["yes"] * 6 + ["no"] * 4)
        ]
        ann = {
            "question_id": qid,
            "image_id": image_id,
            "answers": answers,
            "answer_type": "yes/no",
            "question_type": "is it",
        }
        if k % 2 == 0:
            ann["multiple_choice_answer"] = "yes"
        anns.append(ann)
    qs.append({"image_id": 99, "question": "orphan?", "question_id": 990})  # no annotation
    dump(root / questions, {"data_subtype": split, "questions": qs})
    dump(root / annotations, {"data_subtype": split, "annotations": anns})


def make_vizwiz(root: Path, split: str) -> None:
    recs = []
    for k in range(3):
        name = f"VizWiz_{split}_{k:08d}.jpg"
        write_image(root / split / name)
        answers = [
            {"answer": a, "answer_confidence": "yes"}
            for a in ["coffee"] * 3 + ["tea"] * 5 + ["unanswerable"] * 2
        ]
        recs.append(
            {
                "image": name,
                "question": f"What is this {k}?",
                "answers": answers,
                "answer_type": "other",
                "answerable": 1,
            }
        )
    recs.append(
        {
            "image": "missing.jpg",
            "question": "where?",
            "answers": [{"answer": "x", "answer_confidence": "no"}],
        }
    )
    recs.append({"question": "no image"})
    dump(root / f"{split}.json", recs)


def make_paragraphs(root: Path) -> None:
    paragraphs = []
    for image_id in (1, 2, 3, 4):
        write_image(root / "images" / f"{image_id}.jpg")
        paragraphs.append(
            {
                "image_id": image_id,
                "paragraph": f"There is a square. It is red {image_id}.",
                "url": "x",
            }
        )
    paragraphs.append({"image_id": 5, "paragraph": "", "url": "x"})
    dump(root / "paragraphs_v1.json", paragraphs)
    dump(root / "train_split.json", [1, 2, 5])
    dump(root / "val_split.json", [3])
    dump(root / "test_split.json", [4])


def make_ip2p(root: Path, n: int = 20, seeds_json: bool = True) -> None:
    seeds = []
    for k in range(n):
        d = root / f"{k:07d}"
        dump(
            d / "prompt.json",
            {"input": f"a photo {k}", "edit": f"make it blue {k}", "output": f"a blue photo {k}"},
        )
        keys = [f"{1000 + k}", f"{2000 + k}"] if k % 3 == 0 else [f"{1000 + k}"]
        for key in keys:
            write_image(d / f"{key}_0.jpg", (200, 30, 30))
            write_image(d / f"{key}_1.jpg", (30, 30, 200))
        seeds.append([d.name, keys])
    (root / seeds[1][0] / f"{seeds[1][1][0]}_1.jpg").unlink()  # one pair without its edited image
    if seeds_json:
        dump(root / "seeds.json", seeds)


# --- tests ---------------------------------------------------------------------------------
def test_coco_captions(tmp_path):
    make_coco_captions(tmp_path)
    rec = read_source("coco_captions", tmp_path, "val2014")
    assert [ex["id"] for ex in rec] == [1, 2]
    assert (
        rec[0]["captions"] == ["A red square.", "A square."]
        and rec[0]["caption"] == "A red square."
    )
    assert rec[1]["captions"] == ["Blue sky."] and Path(rec[0]["image"]).is_file()
    # empty caption, unknown image, malformed annotation, image 3 missing on disk
    assert rec.skipped == 4 and rec.reasons["image file missing"] == 1


def test_coco_karpathy_and_flickr30k(tmp_path):
    make_karpathy(tmp_path / "coco", "dataset_coco.json", with_filepath=True)
    train = read_source("coco_karpathy", tmp_path / "coco", "train")  # train + restval
    assert [ex["id"] for ex in train] == [100, 101] and train[0]["captions"] == [
        "caption 0 a",
        "caption 0 b",
    ]
    assert train.skipped == 2  # missing file, no caption
    assert [ex["id"] for ex in read_source("coco_karpathy", tmp_path / "coco", "test")] == [103]
    make_karpathy(
        tmp_path / "f30k",
        "dataset_flickr30k.json",
        with_filepath=False,
        image_dir="flickr30k-images",
    )
    val = read_source("flickr30k", tmp_path / "f30k", "val")
    assert len(val) == 1 and val[0]["image"].endswith("flickr30k-images/img2.jpg")
    with pytest.raises(ValueError, match="split must be one of"):
        read_source("flickr30k", tmp_path / "f30k", "dev")


def test_vqa2_and_okvqa(tmp_path):
    make_vqa(
        tmp_path / "vqa2",
        "val2014",
        "v2_OpenEnded_mscoco_val2014_questions.json",
        "v2_mscoco_val2014_annotations.json",
    )
    rec = read_source("vqa2", tmp_path / "vqa2", "val2014")
    assert len(rec) == 4 and rec.skipped == 1  # the orphan question
    ex = rec[1]
    assert ex["question"] == "is it red 1?" and ex["answer"] == "yes" and len(ex["answers"]) == 10
    assert ex["image"].endswith("val2014/COCO_val2014_000000000011.jpg")
    make_vqa(
        tmp_path / "okvqa",
        "train2014",
        "OpenEnded_mscoco_train2014_questions.json",
        "mscoco_train2014_annotations.json",
        n=2,
    )
    assert len(read_source("okvqa", tmp_path / "okvqa", "train2014")) == 2
    with pytest.raises(LayoutError, match="v2_OpenEnded_mscoco_train2014_questions.json"):
        read_source("vqa2", tmp_path / "vqa2", "train2014")
    make_vqa(
        tmp_path / "v",
        "val2014",
        "v2_OpenEnded_mscoco_val2014_questions.json",
        "v2_mscoco_val2014_annotations.json",
        n=2,
        images=tmp_path / "coco",
    )
    rec = read_source("vqa2", tmp_path / "v", "val2014", image_dir=tmp_path / "coco")
    assert len(rec) == 2 and rec[0]["image"].startswith(str(tmp_path / "coco" / "val2014"))
    with pytest.raises(LayoutError, match="val2014"):
        read_source("vqa2", tmp_path / "v", "val2014")  # images are not under the root


def test_vizwiz(tmp_path):
    make_vizwiz(tmp_path, "train")
    rec = read_source("vizwiz", tmp_path, "train")
    assert len(rec) == 3 and rec.skipped == 2
    assert (
        rec[0]["answer"] == "tea"
        and rec[0]["answers"].count("coffee") == 3
        and rec[0]["answerable"] == 1
    )


def test_image_paragraph(tmp_path):
    make_paragraphs(tmp_path)
    train = read_source("image_paragraph", tmp_path, "train")
    assert [ex["id"] for ex in train] == [1, 2] and train.skipped == 1  # the empty paragraph
    assert train[0]["paragraph"].startswith("There is a square.")
    assert [ex["id"] for ex in read_source("image_paragraph", tmp_path, "test")] == [4]


@pytest.mark.parametrize("seeds_json", [True, False])
def test_instructpix2pix(tmp_path, seeds_json):
    make_ip2p(tmp_path, seeds_json=seeds_json)
    train = read_source("instructpix2pix", tmp_path, "train")  # first 18 of 20 prompt dirs
    dirs = {ex["id"].split("/")[0] for ex in train}
    assert len(dirs) == 17 and train.skipped == 1  # dir 1 lost its only pair (no edited image)
    ex = train[0]
    assert (
        ex["instruction"] == "make it blue 0"
        and ex["image"].endswith("_0.jpg")
        and ex["target"].endswith("_1.jpg")
    )
    assert len(train) == 18 + 6 - 1  # dirs 0, 3, ..., 15 hold two seeds
    val = read_source("instructpix2pix", tmp_path, "val")
    assert [ex["id"] for ex in val] == [
        "0000018/1018",
        "0000018/2018",
    ]  # next 5%: dir 18, two seeds


@pytest.mark.parametrize("reader", sorted(READERS))
def test_missing_root_names_the_expected_files(tmp_path, reader):
    split = {"coco_captions": "val2014", "vqa2": "val2014", "okvqa": "val2014"}.get(reader, "train")
    with pytest.raises(LayoutError, match="expected"):
        read_source(reader, tmp_path / "nothing", split)
    (tmp_path / "empty").mkdir(exist_ok=True)
    with pytest.raises(LayoutError, match=r"\.json"):
        read_source(reader, tmp_path / "empty", split)


def test_wrong_layout_is_an_error(tmp_path):
    dump(tmp_path / "annotations" / "captions_val2014.json", {"images": []})
    with pytest.raises(LayoutError, match="annotations"):
        read_source("coco_captions", tmp_path, "val2014")
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "train.json").write_text("{not json")
    with pytest.raises(LayoutError, match="not readable JSON"):
        read_source("vizwiz", tmp_path / "v", "train")


def test_real_data_mixture_from_its_config(compose, tmp_path):
    """configs/data/sft_coco_vqa.yaml on fixtures of all six sources: pools, skips, items."""
    from hydra.utils import instantiate

    from lit_cm3leon.tokenizer.image import load_image_tokenizer
    from tests.fixtures import make_text_tokenizer

    data, out = tmp_path / "data", tmp_path / "outputs"
    make_karpathy(data / "coco", "dataset_coco.json", with_filepath=True)
    for split in ("train2014", "val2014"):
        coco = data / "coco"  # VQA images live with the COCO captions' images (image_dir)
        make_vqa(
            data / "vqa2",
            split,
            f"v2_OpenEnded_mscoco_{split}_questions.json",
            f"v2_mscoco_{split}_annotations.json",
            images=coco,
        )
        make_vqa(
            data / "okvqa",
            split,
            f"OpenEnded_mscoco_{split}_questions.json",
            f"mscoco_{split}_annotations.json",
            n=2,
            images=coco,
        )
    make_vizwiz(data / "vizwiz", "train")
    make_vizwiz(data / "vizwiz", "val")
    make_paragraphs(data / "image_paragraph")
    make_ip2p(data / "instructpix2pix")
    (data / "coco" / "val2014" / "img0.jpg").write_bytes(
        b"not a jpeg"
    )  # unreadable: skipped, counted
    make_text_tokenizer(out / "text_tokenizer", n_codes=PRESETS["shapes"].n_embed, hw=8)
    load_image_tokenizer("shapes").save(out / "image_tokenizer")
    cfg = compose(
        [
            "experiment=sft",
            "data=sft_coco_vqa",
            "data.max_steps=10",
            "data.batch_size=2",
            "data.max_bad_fraction=0.9",
        ]
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    sizes = {t: len(p) for t, p in dm.train_ds.pools.items()}
    # coco train: 2 records, img0 unreadable -> 1; vqa: 4 vqa2 + 2 okvqa + 3 vizwiz; all yes/no -> reasoning 4
    assert sizes == {
        "caption_short": 1,
        "text2image": 1,
        "vqa": 9,
        "reasoning": 4,
        "paragraph": 2,
        "edit": 23,
    }
    assert dm.skipped["coco_karpathy:train"] == 3  # missing file, no caption, unreadable image
    assert set(dm.rates) == set(sizes) and abs(sum(dm.rates.values()) - 1) < 1e-9
    natural = {t: n / sum(sizes.values()) for t, n in sizes.items()}
    assert all(0.3 * natural[t] - 1e-9 <= r <= 3 * natural[t] + 1e-9 for t, r in dm.rates.items())
    item = dm.train_ds[0]
    assert item["ids"].shape == (193,) and item["weights"].sum() > 0
    assert len(dm.val_ds) > 0 and {dm.val_ds.task_of(i)[0] for i in range(len(dm.val_ds))} >= {
        "vqa",
        "edit",
        "paragraph",
    }
    assert list((out / "cache").glob("sft-*.npz"))  # codes cached
    np.testing.assert_array_equal(dm.train_ds[5]["ids"], dm.train_ds[5]["ids"])
    # a source that is mostly unusable stops the run and says why
    for f in (data / "vizwiz" / "train").glob("*.jpg"):
        f.write_bytes(b"broken")
    cfg = compose(
        [
            "experiment=sft",
            "data=sft_coco_vqa",
            "data.max_steps=10",
            f"data.cache_dir={tmp_path}/cache2",
            "data.max_bad_fraction=0.9",
        ]
    )
    with pytest.raises(ValueError, match=r"vizwiz:train .*unreadable image"):
        instantiate(cfg.data).setup("fit")
