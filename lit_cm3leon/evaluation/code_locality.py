"""How local an image tokenizer's codes are: do pixels that did not change keep their codes?

Over held-out shapes-world edits (one attribute of one shape changed), the fraction of token
cells whose code is the same before and after the edit, overall and by the distance from the
cell's centre to the nearest changed pixel. A decoder that edits by copying the source image can
only be right where codes stay the same, and retrieved neighbours share codes only where codes
are local. Script: ``eval/code_locality.py``; the tokenizer's export records ``edit_codes_kept``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BIN_PX = 4  # distance bins of this many pixels; the last bin holds everything farther


def same_code_by_distance(
    before: np.ndarray, after: np.ndarray, codes_before: np.ndarray, codes_after: np.ndarray,
    n_bins: int = 5,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(same, count) per distance bin over images uint8 [N, H, W, 3] and codes [N, h, w]."""
    n, size = before.shape[0], before.shape[1]
    h = codes_before.shape[1]
    centres = (np.arange(h) + 0.5) * (size / h)
    same, count = np.zeros(n_bins), np.zeros(n_bins)
    for i in range(n):
        ys, xs = np.nonzero((before[i] != after[i]).any(-1))
        if len(ys) == 0:
            dist = np.full((h, h), np.inf)
        else:
            dy = centres[:, None] - (ys + 0.5)[None, :]  # [h, P]
            dx = centres[:, None] - (xs + 0.5)[None, :]
            dist = np.sqrt(dy[:, None, :] ** 2 + dx[None, :, :] ** 2).min(-1)  # [h, h]
        bins = np.minimum(dist // BIN_PX, n_bins - 1).astype(int)
        np.add.at(same, bins, codes_before[i] == codes_after[i])
        np.add.at(count, bins, 1)
    return same, count


def code_entropy_given_patch(
    images: np.ndarray, codes: np.ndarray, shape_mask: np.ndarray
) -> dict[str, float]:
    """Conditional entropy (nats) of a code given its own patch's exact pixels and its cell,
    over images uint8 [N, H, W, 3], codes [N, h, w] and a bool [N, H, W] mask of shape pixels:
    ``shape`` over cells whose patch holds a shape pixel, ``background`` over the others. 0 for
    codes that are a function of their patch; what exceeds 0 is code chosen by distant content,
    which a decoder must predict beyond the picture itself."""
    n, size = images.shape[0], images.shape[1]
    h = codes.shape[1]
    p = size // h
    groups: dict[tuple, dict[int, int]] = {}
    for i in range(n):
        for r in range(h):
            for c in range(h):
                patch = (slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p))
                key = (bool(shape_mask[i][patch].any()), images[i][patch].tobytes(), r, c)
                cell = groups.setdefault(key, {})
                cell[int(codes[i, r, c])] = cell.get(int(codes[i, r, c]), 0) + 1
    total = {True: [0.0, 0], False: [0.0, 0]}
    for (is_shape, *_), counts in groups.items():
        v = np.array(list(counts.values()), dtype=np.float64)
        total[is_shape][0] += -(v * np.log(v / v.sum())).sum()
        total[is_shape][1] += v.sum()
    return {
        name: float(total[k][0] / total[k][1]) if total[k][1] else float("nan")
        for name, k in (("shape", True), ("background", False))
    }


def scene_code_entropy(tokenizer: Any, world: Any, n: int = 1000) -> dict:
    """``code_entropy_given_patch_nats`` of the first ``n`` held-out scenes' codes."""
    scenes = [world.sample("heldout", i).scene for i in range(n)]
    images = np.stack([world.render(s) for s in scenes])
    shape_mask = np.stack([world.segmentation(s) > 0 for s in scenes])
    codes = np.asarray(tokenizer.encode(images))
    return {"code_entropy_given_patch_nats": code_entropy_given_patch(images, codes, shape_mask)}


def edit_code_locality(tokenizer: Any, world: Any, n: int = 300) -> dict:
    """``edit_codes_kept`` (all cells) and ``edit_codes_kept_by_distance_px`` over the first
    ``n`` held-out edits, with ``tokenizer.encode(uint8 [N, H, W, 3]) -> [N, h, w]``."""
    edits = [world.sample("heldout", i).edit for i in range(n)]
    before = np.stack([e.before_image for e in edits])
    after = np.stack([e.after_image for e in edits])
    cb = np.asarray(tokenizer.encode(before))
    ca = np.asarray(tokenizer.encode(after))
    same, count = same_code_by_distance(before, after, cb, ca)
    last = len(same) - 1
    return {
        "edit_codes_kept": float((cb == ca).mean()),
        "edit_codes_kept_by_distance_px": {
            (f"{BIN_PX * b}-{BIN_PX * (b + 1)}" if b < last else f">={BIN_PX * b}"): (
                float(same[b] / count[b]) if count[b] else None
            )
            for b in range(len(same))
        },
    }
