"""The caption probe: counterfactual captions change one thing; deltas measure what is read."""

import importlib.util
import json
import random
import re

import numpy as np
import pytest

from lit_cm3leon.data.shapes import COLORS, ShapesWorld
from lit_cm3leon.evaluation.caption_probe import (
    CHANGES,
    by_shape_count,
    caption_deltas,
    counterfactual_scenes,
)
from tests.conftest import ROOT


def test_each_counterfactual_changes_only_its_attribute():
    world, rng = ShapesWorld(), random.Random(0)
    for i in range(40):
        scene = world.sample("heldout", i).scene
        other = world.sample("heldout", i + 1).scene
        cf = counterfactual_scenes(scene, other, world, rng)
        assert set(cf) == set(CHANGES) and cf["other_scene"] == other
        assert cf["background"].background != scene.background
        assert cf["background"].shapes == scene.shapes
        a, b = scene.shapes[0], cf["colour"].shapes[0]
        assert b.color != a.color and (b.kind, b.size, b.cell) == (a.kind, a.size, a.cell)
        b = cf["kind"].shapes[0]
        assert b.kind != a.kind and (b.color, b.size, b.cell) == (a.color, a.size, a.cell)
        b = cf["position"].shapes[0]
        assert (b.kind, b.color, b.size) == (a.kind, a.color, a.size)
        assert b.cell not in {s.cell for s in scene.shapes[1:]}
        for name in ("colour", "kind", "position"):
            assert cf[name].background == scene.background
            assert cf[name].shapes[1:] == scene.shapes[1:]


class Reader:
    """An engine whose image NLL is 1 per token when ``words(caption)`` equals that of the image's
    true caption and 2 otherwise: it reads those words and nothing else (an image's row is its
    first code)."""

    def __init__(self, words, true_captions):
        self.words = words
        self.truth = [words(c) for c in true_captions]

    def image_nll(self, captions, codes):
        rows = [int(np.asarray(c).reshape(-1)[0]) for c in codes]
        return np.array(
            [
                1.0 if self.words(c) == self.truth[r] else 2.0
                for c, r in zip(captions, rows, strict=True)
            ]
        )


def colours(caption):
    return sorted(w for w in caption.replace(",", " ").split() if w in COLORS)


def boxes(caption):
    return re.findall(r"<loc:\d+>", caption)


def test_deltas_show_the_words_an_engine_reads():
    world = ShapesWorld()
    scenes = [world.sample("heldout", i).scene for i in range(30)]
    codes = np.repeat(np.arange(30)[:, None, None], 4, 1).repeat(4, 2)  # row i: codes i, 4 x 4
    engine = Reader(colours, [world.caption_long(s) for s in scenes])
    d = caption_deltas(engine, world, scenes, codes)
    assert np.all(d["nll_true"] == 1.0)
    assert np.all(d["delta_colour"] == 16.0)  # one nat per token more, over 16 tokens
    for name in ("kind", "position", "background"):
        assert np.all(d[f"delta_{name}"] == 0.0), name
    assert d["delta_other_scene"].mean() > 8.0  # other scenes mostly name other colours
    split = by_shape_count({**d, "index": np.arange(30)}, scenes)
    assert sorted(split) == sorted({len(s.shapes) for s in scenes})
    for count, values in split.items():  # each group holds exactly its scenes, in order
        assert values["index"].tolist() == [
            i for i, s in enumerate(scenes) if len(s.shapes) == count
        ]
        assert np.all(values["delta_colour"] == 16.0)


def test_box_captions_carry_the_position_as_loc_tokens():
    world = ShapesWorld()
    scenes = [world.sample("heldout", i).scene for i in range(30)]
    codes = np.repeat(np.arange(30)[:, None, None], 4, 1).repeat(4, 2)
    for caption, write in (("boxes", world.caption_boxes), ("long", world.caption_long)):
        d = caption_deltas(
            Reader(boxes, [write(s) for s in scenes]), world, scenes, codes, caption=caption
        )
        moved = 16.0 if caption == "boxes" else 0.0  # long captions have no boxes to read
        assert np.all(d["delta_position"] == moved), caption
        assert np.all(d["delta_colour"] == 0.0) and np.all(d["delta_background"] == 0.0)
    with pytest.raises(ValueError, match="caption must be one of"):
        caption_deltas(Reader(boxes, []), world, scenes, codes, caption="short")


def test_script_scores_heldout_pairs_and_refuses_other_shards(tmp_path):
    from tests.fixtures import make_tiny_outputs

    out = make_tiny_outputs(tmp_path / "outputs")
    world = ShapesWorld()
    shards = out / "tokens" / "shapes-heldout"
    shards.mkdir(parents=True)
    n = 6
    texts = [world.caption_long(world.sample("heldout", i).scene) for i in range(n)]
    codes = np.random.default_rng(0).integers(0, 16, (n, 8, 8)).astype(np.int16)
    np.savez(shards / "shard-00000.npz", codes=codes, doc_id=np.arange(n, dtype=np.int64))
    (shards / "shard-00000.jsonl").write_text(
        "".join(
            json.dumps({"doc_id": i, "text": t, "source": "shapes"}) + "\n"
            for i, t in enumerate(texts)
        )
    )
    (shards / "manifest.json").write_text(json.dumps({"h": 8, "w": 8, "n_codes": 16, "count": n}))
    spec = importlib.util.spec_from_file_location(
        "caption_probe", ROOT / "eval" / "caption_probe.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--outputs", str(out), "--ckpt", str(out / "pretrain"), "--bootstrap", "20"]
    metrics = tmp_path / "m.json"
    assert module.main([*args, "--out", str(metrics)]) == 0
    record = json.loads(metrics.read_text())
    keys = {"nll_true", *(f"delta_{c}" for c in CHANGES)}
    counts = {len(world.sample("heldout", i).scene.shapes) for i in range(n)}
    keys |= {f"{k}_{c}_shapes" for k in keys for c in counts}
    assert keys <= set(record) and keys == set(record["ci95"])
    assert record["nll_true"] > 0 and record["delta_other_scene"] != 0

    (shards / "shard-00000.jsonl").write_text(
        "".join(
            json.dumps({"doc_id": i, "text": "a red circle", "source": "x"}) + "\n"
            for i in range(n)
        )
    )
    assert module.main([*args, "--out", str(tmp_path / "m2.json")]) == 2
