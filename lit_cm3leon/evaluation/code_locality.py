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
