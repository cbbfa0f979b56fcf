"""How local an image tokenizer's codes are: do pixels that did not change keep their codes?

    python eval/code_locality.py --tokenizer outputs/image_tokenizer [--n 300] [--out metrics.json]

Encodes each of the first ``--n`` held-out shapes-world edits before and after the edit (one
attribute of one shape changed) and reports the fraction of token cells whose code is the same
in both (``edit_codes_kept``), overall and by the distance from the cell's centre to the nearest
changed pixel (`lit_cm3leon.evaluation.code_locality`); and, over the first ``--n-scenes``
held-out scenes, the entropy of a code given its own patch's exact pixels and its cell
(``code_entropy_given_patch_nats``, shape and background patches apart).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/code_locality.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokenizer", required=True, help="a published image tokenizer folder")
    p.add_argument("--n", type=int, default=300, help="held-out edits (default 300)")
    p.add_argument(
        "--n-scenes",
        type=int,
        default=1000,
        help="held-out scenes for the code entropy given a patch's pixels and cell (default 1000)",
    )
    p.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    import torch

    from lit_cm3leon.evaluation.code_locality import edit_code_locality, scene_code_entropy
    from lit_cm3leon.evaluation.world import tokenizer_world
    from lit_cm3leon.tokenizer.image import load_image_tokenizer

    torch.set_grad_enabled(False)
    tokenizer, world = load_image_tokenizer(args.tokenizer), tokenizer_world(args.tokenizer)
    record = {
        "tokenizer": str(args.tokenizer),
        "n": args.n,
        **edit_code_locality(tokenizer, world, args.n),
        "n_scenes": args.n_scenes,
        **scene_code_entropy(tokenizer, world, args.n_scenes),
    }
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
