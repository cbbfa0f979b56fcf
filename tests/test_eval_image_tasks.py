"""Editing and spatially grounded generation on the shapes world: the scene-parser scores on
known images (copy, oracle, shuffled) and the exact chance of a random placement."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import numpy as np
import pytest

from lit_cm3leon.data.shapes import COLORS, KINDS, SIZES, Scene, ShapesWorld
from lit_cm3leon.evaluation import shapes_edit as se
from lit_cm3leon.evaluation import shapes_spatial as ss

N = 60


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()


@pytest.fixture(scope="module")
def edits(world):
    return se.edit_items(N, world)


@pytest.fixture(scope="module")
def items(world):
    return ss.spatial_items(N, world)


# --- edits ---------------------------------------------------------------------------------
def test_copy_keeps_everything_and_never_changes(world, edits):
    assert {e.attribute for e in edits} == set(se.EDIT_ATTRIBUTES)  # every kind of edit is tested
    scores = se.edit_scores(np.stack([e.before_image for e in edits]), edits, world)
    assert scores["success"].sum() == 0 and scores["changed"].sum() == 0
    assert scores["kept"].min() == 1.0


def test_oracle_target_scores_one(world, edits):
    scores = se.edit_scores(np.stack([e.after_image for e in edits]), edits, world)
    for k in se.OUTCOMES:
        assert scores[k].min() == 1.0, k
    assert se.by_attribute(scores["success"], edits) == {a: 1.0 for a in se.EDIT_ATTRIBUTES}


def _perturb(scene: Scene, rng: random.Random) -> Scene:
    """The scene with one random change: an attribute, the background, a shape dropped or added."""
    shapes = list(scene.shapes)
    what = rng.choice(["color", "kind", "size", "move", "drop", "add", "background"])
    i = rng.randrange(len(shapes))
    free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in {s.cell for s in shapes}]
    if what in ("color", "kind", "size"):
        pool = {"color": COLORS, "kind": KINDS, "size": SIZES}[what]
        shapes[i] = replace(shapes[i], **{what: rng.choice(pool)})
    elif what == "move" and free:
        shapes[i] = replace(shapes[i], row=free[0][0], col=free[0][1])
    elif what == "drop":
        shapes.pop(i)
    elif what == "add" and free:
        shapes.append(replace(shapes[i], row=free[-1][0], col=free[-1][1]))
    else:
        return Scene(rng.choice(["black", "white", "gray"]), scene.shapes)
    return Scene(scene.background, tuple(shapes))


def test_success_is_changed_and_kept_is_the_exact_target(edits):
    """On perturbed sources and targets: success == changed and kept == (output == target)."""
    rng = random.Random(0)
    seen = set()
    for e in edits:
        for base in (e.before, e.after):
            for _ in range(5):
                out = _perturb(base, rng)
                r = se.edit_outcome(out, e)
                assert r["success"] == float(r["changed"] and r["kept"])
                assert r["success"] == float(out.attributes() == e.after.attributes())
                seen.add((r["changed"], r["kept"]))
    assert seen == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}  # both parts vary apart


def test_edit_parts_on_hand_made_outputs(edits):
    colour = next(e for e in edits if e.attribute == "color")
    new = colour.after.shapes[colour.shape_index]
    other = next(c for c in COLORS if c != new.color)
    wrong_kind = next(k for k in KINDS if k != new.kind)
    # the colour changed, but the shape's kind changed too: changed, not kept
    out = list(colour.after.shapes)
    out[colour.shape_index] = replace(new, kind=wrong_kind)
    assert se.edit_outcome(Scene(colour.after.background, tuple(out)), colour) == {
        "success": 0.0, "changed": 1.0, "kept": 0.0,
    }  # fmt: skip
    # the wrong new colour, the rest kept
    out[colour.shape_index] = replace(new, color=other)
    r = se.edit_outcome(Scene(colour.after.background, tuple(out)), colour)
    assert r["changed"] == 0.0 and r["kept"] == 1.0
    # a move that leaves a copy behind: the old cell is not empty, and there is an extra shape
    move = next(e for e in edits if e.attribute == "position")
    both = Scene(move.after.background, (*move.after.shapes, move.before.shapes[move.shape_index]))
    assert se.edit_outcome(both, move) == {"success": 0.0, "changed": 0.0, "kept": 0.0}


# --- spatial -------------------------------------------------------------------------------
def test_box_cells_are_the_shapes_cells(world, items):
    for it in items:
        assert [cell for _, _, cell in it.requests] == [s.cell for s in it.scene.shapes]
        assert [o["label"] for o in it.objects] == [
            f"a {s.color} {s.kind}" for s in it.scene.shapes
        ]


def test_true_images_score_one_and_shuffled_ones_do_not(world, items):
    truth = np.stack([world.render(it.scene) for it in items])
    scores = ss.spatial_scores(truth, items, world)
    for k in ss.OUTCOMES:
        assert scores[k].min() == 1.0, k
    shuffled = ss.spatial_scores(np.roll(truth, 1, axis=0), items, world)
    assert shuffled["placed"].mean() < 0.3 and shuffled["exact"].mean() < 0.1


def _enumerated_chance(it: ss.SpatialItem, n_cells: int = 9) -> dict[str, float]:
    """Average spatial_outcome over every placement of the requested shapes in distinct cells."""
    from lit_cm3leon.data.shapes import Shape

    rows = []
    for cells in itertools.permutations(range(n_cells), len(it.requests)):
        shapes = tuple(
            Shape(kind, color, "small", *divmod(c, 3))
            for (color, kind, _), c in zip(it.requests, cells, strict=True)
        )
        rows.append(ss.spatial_outcome(Scene("white", shapes), it))
    return {k: float(np.mean([r[k] for r in rows])) for k in ss.OUTCOMES}


def test_chance_is_exact(world, items):
    # repeated labels (two yellow circles) are where the closed form can go wrong: include some
    repeated = [it for it in items if len({r[:2] for r in it.requests}) < len(it.requests)]
    assert repeated
    for it in items[:15] + repeated[:5]:
        closed = ss.chance_outcome(it, 9)
        enumerated = _enumerated_chance(it)
        for k in ss.OUTCOMES:
            assert closed[k] == pytest.approx(enumerated[k], abs=1e-12), (k, it.requests)
    chance = ss.chance_scores(items, world)
    assert 0.0 < chance["placed"].mean() < 0.2 and chance["exact"].mean() < 0.1
