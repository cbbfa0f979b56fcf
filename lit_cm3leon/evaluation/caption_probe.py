"""Which words of a caption the decoder's image likelihood depends on (the shapes world).

For each held-out scene, the NLL of its image codes given its long caption is compared with the
NLL given the same caption with one thing changed (:func:`counterfactual_scenes`): the first
shape's colour, its kind or its cell, the background, or the caption of another scene. A decoder
that reads a word pays for the wrong one: ``delta`` = extra nats over the whole image (NLL per
token times the image's tokens). A delta near 0 means the image's likelihood does not depend on
that word, whatever the caption says. :func:`by_shape_count` splits the per-image values by the
scene's number of shapes: with one shape no phrase has to be matched to a place, so a colour
delta near 0 there too means the colour word is not read at all.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from lit_cm3leon.data.shapes import BACKGROUNDS, COLORS, KINDS, Scene, ShapesWorld

CHANGES: tuple[str, ...] = ("colour", "kind", "position", "background", "other_scene")


def counterfactual_scenes(
    scene: Scene, other: Scene, world: ShapesWorld, rng: random.Random
) -> dict[str, Scene]:
    """``scene`` with one thing changed, per name in :data:`CHANGES` (``other_scene``: ``other``).
    The first shape changes colour, kind or cell (a free one; the scene itself when every cell
    is taken); the background changes to another."""
    s0 = scene.shapes[0]

    def first(shape) -> Scene:
        return Scene(scene.background, (shape, *scene.shapes[1:]))

    taken = {s.cell for s in scene.shapes}
    free = [(r, c) for r in range(world.grid) for c in range(world.grid) if (r, c) not in taken]
    row, col = rng.choice(free) if free else s0.cell
    return {
        "colour": first(replace(s0, color=rng.choice([c for c in COLORS if c != s0.color]))),
        "kind": first(replace(s0, kind=rng.choice([k for k in KINDS if k != s0.kind]))),
        "position": first(replace(s0, row=row, col=col)),
        "background": Scene(
            rng.choice([b for b in BACKGROUNDS if b != scene.background]), scene.shapes
        ),
        "other_scene": other,
    }


CAPTIONS = ("long", "boxes")  # ShapesWorld.caption_long / caption_boxes (positions as <loc> boxes)


def caption_deltas(
    engine,
    world: ShapesWorld,
    scenes: Sequence[Scene],
    codes: np.ndarray,
    seed: int = 0,
    caption: str = "long",
) -> dict[str, np.ndarray]:
    """Per image: ``nll_true`` (mean NLL per code given its caption) and, per change,
    ``delta_<change>``, the extra nats over the whole image given the changed caption.
    ``caption``: one of :data:`CAPTIONS`, how the captions are written."""
    if caption not in CAPTIONS:
        raise ValueError(f"caption must be one of {CAPTIONS}, got {caption!r}")
    write = world.caption_long if caption == "long" else world.caption_boxes
    rng = random.Random(seed)
    captions: dict[str, list[str]] = {c: [] for c in CHANGES}
    for i, scene in enumerate(scenes):
        changed = counterfactual_scenes(scene, scenes[(i + 1) % len(scenes)], world, rng)
        for name, s in changed.items():
            captions[name].append(write(s))
    true = engine.image_nll([write(s) for s in scenes], codes)
    tokens = int(np.asarray(codes[0]).size)
    out = {"nll_true": true}
    for name, caps in captions.items():
        out[f"delta_{name}"] = (engine.image_nll(caps, codes) - true) * tokens
    return out


def by_shape_count(
    values: dict[str, np.ndarray], scenes: Sequence[Scene]
) -> dict[int, dict[str, np.ndarray]]:
    """The per-image ``values`` of the scenes with 1, 2, ... shapes (counts present only)."""
    counts = np.array([len(s.shapes) for s in scenes])
    return {
        int(c): {k: np.asarray(v)[counts == c] for k, v in values.items()}
        for c in np.unique(counts)
    }
