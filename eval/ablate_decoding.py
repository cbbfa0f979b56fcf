"""Decoding ablation in the layout of the paper's Figure 4: FID against CFG scale per model size,
and FID against samples per prompt per strategy, as CSV, markdown and PNG.

    python eval/ablate_decoding.py ablation=shapes                      # the default
    python eval/ablate_decoding.py ablation=shapes ckpts=[large=outputs/pretrain,small=outputs/pretrain_small]
    python eval/ablate_decoding.py --ablation paper --ckpts 7b=outputs/pretrain --n 1000

Arguments are given as flags (``--cfg-scales 1 2 3``) or as Hydra-style ``key=value`` (lists
as ``[a,b]``), with the same names. ``ablation=shapes``: 250 held-out prompts; CFG scale in
{1, 2, 3, 5, 7} at one sample (cfg_topp) for every checkpoint; 1, 2, 4, 8, 16 samples at scale 3
for cfg_topp, cdk and mixed on the first checkpoint (``samples_ckpts=all`` for every one).
``ablation=paper``: scales 1..7, 1..32 samples, strategies topp, cfg_topp, cdk, mixed, 1000 prompts.
Checkpoints are ``size=path`` (or a path, labelled by its folder name); missing ones are skipped
with a message. Each cell is a run folder under ``<outputs>/eval/t2i/`` reused when finished, so
a killed sweep resumes; the samples axis draws max(samples) candidates once per prompt and
re-ranks their prefixes (``lit_cm3leon/evaluation/ablation.py``). Outputs go to
``<outputs>/eval/ablation/<ablation>/figure4.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/ablate_decoding.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_cm3leon.evaluation.metrics_io import InputError
from lit_cm3leon.evaluation.t2i import CHUNK

LIST_KEYS = {"ckpts", "cfg_scales", "samples", "strategies"}


def hydra_style(argv: list[str], keys: set[str]) -> list[str]:
    """``key=value`` / ``key=[a,b]`` tokens (``key`` one of ``keys``) -> ``--key value`` /
    ``--key a b``; anything else (flags, ``size=path`` values of --ckpts) is kept."""
    out: list[str] = []
    for tok in argv:
        if tok.startswith("-") or "=" not in tok or tok.split("=", 1)[0] not in keys:
            out.append(tok)
            continue
        key, value = tok.split("=", 1)
        flag = "--" + key.replace("_", "-")
        if key in LIST_KEYS:
            items = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
            out += [flag, *items]
        else:
            out += [flag, value]
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ablation", default="shapes", choices=("shapes", "paper"), help="the grid preset"
    )
    p.add_argument("--ckpts", nargs="+", default=["large=outputs/pretrain", "small=outputs/pretrain_small"],
                   help="checkpoints as size=path (or path)")  # fmt: skip
    p.add_argument("--outputs", default="outputs", help="the pipeline's outputs/ folder")
    p.add_argument("--n", type=int, default=None, help="prompts (preset: 250 shapes, 1000 paper)")
    p.add_argument(
        "--cfg-scales", type=float, nargs="+", default=None, help="CFG scales of the left panel"
    )
    p.add_argument("--cfg-strategy", default="cfg_topp", help="strategy of the left panel")
    p.add_argument(
        "--samples", type=int, nargs="+", default=None, help="samples per prompt of the right panel"
    )
    p.add_argument(
        "--samples-cfg-scale",
        type=float,
        default=None,
        help="CFG scale of the right panel (preset 3)",
    )
    p.add_argument("--strategies", nargs="+", default=None, help="strategies of the right panel")
    p.add_argument(
        "--samples-ckpts",
        choices=("first", "all"),
        default="first",
        help="checkpoints of the right panel",
    )
    p.add_argument("--seed", type=int, default=0, help="run seed (sampling and bootstrap)")
    p.add_argument("--chunk", type=int, default=CHUNK, help="prompts per generation chunk")
    p.add_argument(
        "--bootstrap", type=int, default=None, help="bootstrap resamples per cell (preset 200)"
    )
    p.add_argument(
        "--features", choices=("clip", "inception"), default="clip", help="FID feature space"
    )
    p.add_argument(
        "--captions",
        default=None,
        help="COCO captions json for real-data prompts (needs --reference)",
    )
    p.add_argument("--reference", default=None, help="reference images for --captions")
    p.add_argument(
        "--eval-clip", default=None, help="evaluation CLIP (default <outputs>/eval_clip)"
    )
    p.add_argument(
        "--retriever-clip", default=None, help="re-ranking CLIP (default <outputs>/retriever)"
    )
    p.add_argument("--rank", type=int, default=None, help="this rank (default env RANK or 0)")
    p.add_argument(
        "--world-size", type=int, default=None, help="ranks (default env WORLD_SIZE or 1)"
    )
    p.add_argument("--out-dir", default=None, help="default <outputs>/eval/ablation/<ablation>")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    keys = {a.dest for a in p._actions if a.option_strings}
    args = p.parse_args(hydra_style(list(sys.argv[1:] if argv is None else argv), keys))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lit_cm3leon.evaluation import ablation as ab
    from lit_cm3leon.evaluation import t2i_run as tr

    try:
        ckpts = ab.parse_ckpts(args.ckpts)
        present = {s: c for s, c in ckpts.items() if tr.ckpt_file(c).is_file()}
        for s, c in ckpts.items():
            if s not in present:
                print(f"skipping {s}={c}: no checkpoint file {tr.ckpt_file(c)}", file=sys.stderr)
        if not present:
            raise InputError(f"none of the checkpoints exist: {args.ckpts}")
        cfg = ab.config(
            args.ablation, ckpts=present, n=args.n, cfg_scales=args.cfg_scales, cfg_strategy=args.cfg_strategy,
            samples=args.samples, samples_cfg_scale=args.samples_cfg_scale, strategies=args.strategies,
            samples_ckpts=args.samples_ckpts, seed=args.seed, chunk=args.chunk, bootstrap=args.bootstrap,
            features=args.features,
        )  # fmt: skip
        rank, world = tr.rank_and_world(args.rank, args.world_size)
        res = tr.Resources(args.outputs, args.eval_clip, args.retriever_clip)
        pset = tr.prompt_set(cfg.n, args.outputs, args.captions, args.reference)
        cells = ab.run(cfg, res, pset, rank, world, progress=not args.no_progress)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    waiting = [c for c in cells if c.record is None]
    if waiting:
        print(f"rank {rank}/{world}: {len(waiting)} of {len(cells)} cells wait for other ranks' samples; "
              "rerun once all ranks are done to write the figure")  # fmt: skip
        return 0
    out_dir = (
        Path(args.out_dir)
        if args.out_dir
        else Path(args.outputs) / "eval" / "ablation" / args.ablation
    )
    paths = ab.write_outputs(
        cells, out_dir, f"ablation={args.ablation}, {pset.protocol}, n={cfg.n}"
    )
    print(paths["md"].read_text())
    print("wrote", *[str(p) for p in paths.values()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
