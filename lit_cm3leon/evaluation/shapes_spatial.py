"""Spatially grounded generation on the shapes world: objects in boxes -> image, scored by the
scene parser, beside the exact chance of a random placement.

Items: the first ``n`` held-out scenes. The prompt is the SFT ``spatial`` template, one object
per shape with its tight box as four ``<loc:N>`` tokens ("Generate an image with a red circle
<loc:9><loc:9><loc:34><loc:34> and ..."), exactly as in training; for the guided strategies the
unconditional stream is ``<bos> <mask:0> <break>`` (as for text to image). A box lies inside one
grid cell, its *box cell*.

Scores per image (:func:`spatial_outcome`):

* ``placed``: fraction of requested objects whose box cell holds a parsed shape of the
  requested colour and kind (size is not asked for, so not scored);
* ``occupied``: fraction of box cells that hold any shape;
* ``in_box``: fraction of the output's shapes that lie in a box cell (0 when none is parsed):
  ``occupied`` alone rewards crowding the image with shapes, this does not;
* ``exact``: every object placed and no shape outside the box cells.

Chance (:func:`chance_scores`): the requested shapes (right colour and kind) put in distinct
cells drawn uniformly at random, the expected scores computed exactly: with ``G`` cells, ``n``
objects and ``m(o)`` the number of objects sharing object ``o``'s colour and kind,
``placed = mean_o m(o) / G``, ``occupied = in_box = n / G`` and ``exact = prod_l m_l! / (G! / (G - n)!)``
over the distinct labels ``l``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lit_cm3leon.data.shapes import Scene, ShapesWorld
from lit_cm3leon.evaluation.shapes_edit import score_scenes

OUTCOMES: tuple[str, ...] = ("placed", "occupied", "in_box", "exact")


@dataclass(frozen=True)
class SpatialItem:
    """One prompt: the template's ``objects`` and ``size``, and what each object asks for."""

    scene: Scene
    objects: list[dict]  # [{label: "a red circle", box: [x0, y0, x1, y1]}]
    size: list[int]  # [W, H]
    requests: tuple[tuple[str, str, tuple[int, int]], ...]  # (colour, kind, box cell)


def box_cell(box: Sequence[float], world: ShapesWorld) -> tuple[int, int]:
    """(row, col) of the grid cell holding the centre of a pixel box ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = box
    last = world.grid - 1

    def index(c: float) -> int:
        return min(last, max(0, int((c - world.margin) // world.cell_size)))

    return index((y0 + y1) / 2), index((x0 + x1) / 2)


def spatial_items(n: int, world: ShapesWorld | None = None) -> list[SpatialItem]:
    """The first ``n`` held-out scenes as spatial prompts (the SFT template's objects)."""
    from lit_cm3leon.data.sft import spatial_objects

    world = world or ShapesWorld()
    items = []
    for i in range(n):
        scene = world.scene("heldout", i)
        boxes = world.boxes(scene)
        requests = tuple(
            (s.color, s.kind, box_cell(b, world)) for s, b in zip(scene.shapes, boxes, strict=True)
        )
        size = [world.image_size, world.image_size]
        items.append(SpatialItem(scene, spatial_objects(scene, boxes), size, requests))
    return items


def spatial_outcome(parsed: Scene, item: SpatialItem) -> dict[str, float]:
    """``placed``, ``occupied``, ``in_box`` and ``exact`` of one output scene (module doc)."""
    by_cell = {s.cell: s for s in parsed.shapes}
    hits = [
        cell in by_cell and (by_cell[cell].color, by_cell[cell].kind) == (color, kind)
        for color, kind, cell in item.requests
    ]
    cells = {cell for _, _, cell in item.requests}
    occupied = [cell in by_cell for cell in cells]
    return {
        "placed": float(np.mean(hits)),
        "occupied": float(np.mean(occupied)),
        "in_box": float(np.mean([c in cells for c in by_cell])) if by_cell else 0.0,
        "exact": float(all(hits) and set(by_cell) <= cells),
    }


def spatial_scores(
    images: np.ndarray | Sequence[np.ndarray] | None,
    items: Sequence[SpatialItem],
    world: ShapesWorld | None = None,
    scenes: Sequence[Scene] | None = None,
) -> dict[str, np.ndarray]:
    """Per image ``placed``/``occupied``/``in_box``/``exact`` of output images uint8 [N, H, W, 3] (or of
    already parsed ``scenes``)."""
    return score_scenes(spatial_outcome, images, items, OUTCOMES, world, scenes)


def chance_outcome(item: SpatialItem, n_cells: int) -> dict[str, float]:
    """Expected scores of the requested shapes placed in distinct uniformly random cells."""
    labels = Counter((color, kind) for color, kind, _ in item.requests)
    n = len(item.requests)
    placements = math.perm(n_cells, n)
    return {
        "placed": float(np.mean([labels[(c, k)] / n_cells for c, k, _ in item.requests])),
        "occupied": n / n_cells,
        "in_box": n / n_cells,
        "exact": math.prod(math.factorial(m) for m in labels.values()) / placements,
    }


def chance_scores(items: Sequence[SpatialItem], world: ShapesWorld | None = None):
    """Per image expected ``placed``/``occupied``/``exact`` of a uniformly random placement."""
    world = world or ShapesWorld()
    rows = [chance_outcome(it, world.grid * world.grid) for it in items]
    return {k: np.array([r[k] for r in rows]) for k in OUTCOMES}


PROMPTS: tuple[str, ...] = ("loc", "words", "none")


def spatial_prompts(
    engine, items: Sequence[SpatialItem], prompt: str = "loc", world: ShapesWorld | None = None
):
    """(cond, uncond) prompt ids; uncond is ``<bos> <mask:0> <break>``. ``prompt``: ``loc``, the
    ``spatial`` template (boxes as ``<loc:N>`` tokens); ``words``, the ``text2image`` template
    with the scene's long caption (each shape's cell named in words: "at the top left");
    ``none``, ``text2image`` with the short caption (no position at all: a placement-blind
    control that draws the same shapes)."""
    from lit_cm3leon.data.templates import inference_prompt
    from lit_cm3leon.decode.generate import make_uncond_prompt

    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    world = world or ShapesWorld()
    v = engine.vocab
    if prompt == "loc":
        cond = [
            inference_prompt("spatial", engine.codec, objects=it.objects, size=it.size)
            for it in items
        ]
    else:
        caption = world.caption_long if prompt == "words" else world.caption_short
        cond = [
            inference_prompt("text2image", engine.codec, caption=caption(it.scene)) for it in items
        ]
    uncond = [make_uncond_prompt(v, [v.bos], [v.brk]) for _ in items]
    return cond, uncond
