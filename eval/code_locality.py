"""How local an image tokenizer's codes are: do pixels that did not change keep their codes?

    python eval/code_locality.py --tokenizer outputs/image_tokenizer [--n 300] [--out metrics.json]

Encodes each of the first ``--n`` held-out shapes-world edits before and after the edit (one
attribute of one shape changed) and reports the fraction of token cells whose code is the same
in both, overall and by the distance from the cell's centre to the nearest changed pixel. A
decoder that edits by copying the source image can only be right where codes stay the same, and
retrieved neighbours only share codes where they are local.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/code_locality.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

BIN_PX = 4  # distance bins of this many pixels; the last bin holds everything farther


def same_code_by_distance(
    before: np.ndarray, after: np.ndarray, codes_before: np.ndarray, codes_after: np.ndarray,
    n_bins: int = 5,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(same, count) per distance bin over images uint8 [N, H, W, 3] and codes [N, h, w]."""
    n, size = before.shape[0], before.shape[1]
    h = codes_before.shape[1]
    px = size / h
    centres = (np.arange(h) + 0.5) * px
    same, count = np.zeros(n_bins), np.zeros(n_bins)
    for i in range(n):
        changed = (before[i] != after[i]).any(-1)
        ys, xs = np.nonzero(changed)
        if len(ys) == 0:
            dist = np.full((h, h), np.inf)
        else:
            dy = centres[:, None] - (ys + 0.5)[None, :]  # [h, P]
            dx = centres[:, None] - (xs + 0.5)[None, :]
            dist = np.sqrt(dy[:, None, :] ** 2 + dx[None, :, :] ** 2).min(-1)  # [h, h]
        bins = np.minimum(dist // BIN_PX, n_bins - 1).astype(int)
        eq = codes_before[i] == codes_after[i]
        np.add.at(same, bins, eq)
        np.add.at(count, bins, 1)
    return same, count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokenizer", required=True, help="a published image tokenizer folder")
    p.add_argument("--n", type=int, default=300, help="held-out edits (default 300)")
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    import torch

    from lit_cm3leon.data.shapes import ShapesWorld
    from lit_cm3leon.tokenizer.image import load_image_tokenizer

    torch.set_grad_enabled(False)
    tok = load_image_tokenizer(args.tokenizer)
    world = ShapesWorld()
    edits = [world.sample("heldout", i).edit for i in range(args.n)]
    before = np.stack([e.before_image for e in edits])
    after = np.stack([e.after_image for e in edits])
    cb, ca = tok.encode(before).numpy(), tok.encode(after).numpy()
    same, count = same_code_by_distance(before, after, cb, ca)
    record = {
        "tokenizer": str(args.tokenizer),
        "n": args.n,
        "same_code": float((cb == ca).mean()),
        "same_code_by_distance_px": {
            (f"{BIN_PX * b}-{BIN_PX * (b + 1)}" if b < len(same) - 1 else f">={BIN_PX * b}"): (
                float(same[b] / count[b]) if count[b] else None
            )
            for b in range(len(same))
        },
    }
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
