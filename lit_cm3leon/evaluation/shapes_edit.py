"""Text-guided image editing on the shapes world: held-out edits, generation, scene-parser scores.

Items: the edit of each of the first ``n`` held-out samples (``ShapesSample.edit``: one
attribute of one shape changed, the instruction in the world's words). The prompt is the SFT
``edit`` template, ``<bos> IMG_src <break> "Edit the image: <instruction>" <break>``, whose
continuation is the edited image. For the guided strategies the unconditional stream keeps the
source image and masks the instruction (``<bos> IMG_src <break> <mask:0> <break>``), so CFG
pushes along the instruction only (InstructPix2Pix's text guidance at image scale 1).

Scores of a parsed output scene against the edit (:func:`edit_outcome`), per item:

* ``changed``: the requested attribute has its new value: for colour / kind / size, the shape
  found in the edited shape's cell has the new value; for position, the new cell holds a shape
  and the old cell is empty.
* ``kept``: everything else is unchanged: once the edited shape (the one in its new cell, else
  the one in its old cell) is given the requested value, the scene equals the target scene
  (background, every other shape, the edited shape's other attributes, no extra shape).
* ``success``: both; this is the same as the parsed scene equalling the target scene.

Baseline: copying the source image (parsed as is; it keeps everything and never makes the
change, so ``changed`` = ``success`` = 0 and ``kept`` = 1 up to parser errors), and copying it
through the image tokenizer (its reconstruction, what a model that copies the source codes
perfectly would show). Ceiling: the tokenizer's reconstruction of the true target image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from lit_cm3leon.data.shapes import Edit, Scene, Shape, ShapesWorld, parse_scene

EDIT_ATTRIBUTES: tuple[str, ...] = ("color", "kind", "size", "position")
OUTCOMES: tuple[str, ...] = ("success", "changed", "kept")


def edit_items(n: int, world: ShapesWorld | None = None) -> list[Edit]:
    """The edits of the first ``n`` held-out samples."""
    world = world or ShapesWorld()
    return [world.sample("heldout", i).edit for i in range(n)]


def _set(shape: Shape, attribute: str, target: Shape) -> Shape:
    if attribute == "position":
        return replace(shape, row=target.row, col=target.col)
    return replace(shape, **{attribute: getattr(target, attribute)})


def edit_outcome(parsed: Scene, edit: Edit) -> dict[str, float]:
    """``changed``, ``kept`` and ``success`` (each 0 or 1) of one output scene (module doc)."""
    old = edit.before.shapes[edit.shape_index]
    new = edit.after.shapes[edit.shape_index]
    attr = edit.attribute
    by_cell = {s.cell: s for s in parsed.shapes}
    if attr == "position":
        changed = new.cell in by_cell and old.cell not in by_cell
    else:
        found = by_cell.get(new.cell)
        changed = found is not None and getattr(found, attr) == getattr(new, attr)
    edited = by_cell.get(new.cell) or by_cell.get(old.cell)
    kept = False
    if edited is not None:
        others = tuple(s for s in parsed.shapes if s is not edited)
        fixed = Scene(parsed.background, (*others, _set(edited, attr, new)))
        kept = fixed.attributes() == edit.after.attributes()
    return {"success": float(changed and kept), "changed": float(changed), "kept": float(kept)}


def edit_scores(
    images: np.ndarray | Sequence[np.ndarray] | None,
    edits: Sequence[Edit],
    world: ShapesWorld | None = None,
    scenes: Sequence[Scene] | None = None,
) -> dict[str, np.ndarray]:
    """Per item ``success``/``changed``/``kept`` of output images uint8 [N, H, W, 3] (or of
    already parsed ``scenes``)."""
    return score_scenes(edit_outcome, images, edits, OUTCOMES, world, scenes)


def score_scenes(outcome, images, items, keys, world=None, scenes=None) -> dict[str, np.ndarray]:
    """``outcome(scene, item) -> {key: float}`` over parsed output images (or given ``scenes``),
    as one array per key."""
    world = world or ShapesWorld()
    if scenes is None:
        scenes = [parse_scene(img, world) for img in images]
    rows = [outcome(s, it) for s, it in zip(scenes, items, strict=True)]
    return {k: np.array([r[k] for r in rows]) for k in keys}


def by_attribute(values: np.ndarray, edits: Sequence[Edit]) -> dict[str, float | None]:
    """Mean of per-item ``values`` over the items editing each attribute (None if there are none)."""
    attrs = np.array([e.attribute for e in edits])
    return {
        a: (float(values[attrs == a].mean()) if (attrs == a).any() else None)
        for a in EDIT_ATTRIBUTES
    }


def edit_prompts(engine, source_codes: np.ndarray, edits: Sequence[Edit]):
    """(cond, uncond) prompt ids: the ``edit`` template, and the same with the text masked."""
    from lit_cm3leon.data.templates import inference_prompt, inference_uncond_prompt

    pairs = [
        {"image": c, "instruction": e.instruction} for c, e in zip(source_codes, edits, strict=True)
    ]
    cond = [inference_prompt("edit", engine.codec, **x) for x in pairs]
    uncond = [inference_uncond_prompt("edit", engine.codec, **x) for x in pairs]
    return cond, uncond
