"""Which caption words the decoder's image likelihood depends on (shapes world).

    python eval/caption_probe.py --ckpt outputs/pretrain --out outputs/eval/caption_probe/metrics.json

Scores the first ``--n`` held-out pairs of ``<outputs>/tokens/shapes-heldout`` (long captions)
with their own caption (``--caption boxes``: each shape's position as its box in ``<loc>``
tokens) and with the caption changed in one thing (the first shape's colour,
kind or cell, the background, another scene's caption;
``lit_cm3leon.evaluation.caption_probe``): ``delta_<change>`` is the mean extra NLL in nats over
the whole image, with bootstrap 95% intervals over images; ``<key>_<k>_shapes`` is the same over
the scenes with ``k`` shapes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lit_cm3leon.evaluation import bootstrap
from lit_cm3leon.evaluation.metrics_io import (
    InputError,
    add_run_args,
    ckpt_run_out,
    header_from_args,
    print_metrics,
    write_metrics,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--outputs", default="outputs", help="the pipeline's outputs/ folder")
    p.add_argument(
        "--heldout", default=None, help="held-out shards (default <outputs>/tokens/shapes-heldout)"
    )
    p.add_argument("--n", type=int, default=300, help="held-out pairs to score")
    p.add_argument(
        "--caption",
        choices=["long", "boxes"],
        default="long",
        help="how the scored captions are written: long (positions in words) or boxes (each "
        "shape's box as <loc> tokens, as data.box_caption_prob pretrains)",
    )
    add_run_args(p, protocol="shapes-caption-probe")
    args = p.parse_args(argv)
    out = ckpt_run_out(p, args, "a published decoder, e.g. outputs/pretrain")
    if out is None:
        return 2
    import torch

    from lit_cm3leon.data.shards import TokenShards
    from lit_cm3leon.engine import Engine
    from lit_cm3leon.evaluation.caption_probe import by_shape_count, caption_deltas
    from lit_cm3leon.evaluation.world import outputs_world

    torch.manual_seed(args.seed)
    outputs = Path(args.outputs)
    heldout = TokenShards(args.heldout or outputs / "tokens" / "shapes-heldout")
    n = min(args.n, len(heldout))
    try:
        world = outputs_world(outputs, args.ckpt)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scenes = [world.sample("heldout", i).scene for i in range(n)]
    for i, s in enumerate(scenes):  # the shards must be the world's held-out pairs, in order
        if world.caption_long(s) != heldout.text(i):
            print(
                f"error: held-out pair {i} of {heldout.root} is not the shapes world's held-out "
                f"scene {i} with its long caption (made by `python -m lit_cm3leon.prepare "
                "tokenize --source shapes --split heldout --caption long`)",
                file=sys.stderr,
            )
            return 2
    engine = Engine.load(args.ckpt, outputs, retrieval=False)
    values = caption_deltas(
        engine, world, scenes, heldout.codes[:n], seed=args.seed, caption=args.caption
    )
    stat = bootstrap.mean_statistic(values)
    metrics = stat(slice(None))
    ci95 = bootstrap.bootstrap_ci(n, stat, args.bootstrap, args.seed)
    for count, subset in by_shape_count(values, scenes).items():  # e.g. delta_colour_1_shapes
        sub = bootstrap.mean_statistic({f"{k}_{count}_shapes": v for k, v in subset.items()})
        m = len(next(iter(subset.values())))
        metrics.update(sub(slice(None)))
        ci95.update(bootstrap.bootstrap_ci(m, sub, args.bootstrap, args.seed))
    header = {**header_from_args(args, n), "caption": args.caption}
    record = write_metrics(
        out, header, metrics, ci95, bootstrap.info(args.bootstrap, args.seed, unit="image")
    )
    print_metrics(record, record["ci95"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
