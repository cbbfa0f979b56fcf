"""Zero-shot text-to-image FID of a checkpoint (``--ckpt``), or of an existing sample folder.

Generate and score (the shapes-world protocol by default)::

    python eval/coco_fid.py --ckpt outputs/pretrain [--outputs outputs] [--n 1000]
        [--strategy cfg_topp --cfg-scale 3 --num-samples 1 --retrieve-k 0 --seed 0]
        [--captions captions_val2014.json --reference val2014/ --features inception]
        [--rank R --world-size W]

Prompts are the long captions of the first ``--n`` held-out scenes (references: those scenes
rendered), or with ``--captions`` the first caption of each of the first ``--n`` images of a
COCO captions file (references: ``--reference``, a folder of images). Samples go to a run folder
under ``<outputs>/eval/t2i/`` named after the checkpoint, protocol, n, strategy, CFG scale,
samples, retrieved docs and seed (``lit_cm3leon.evaluation.t2i_run``): a killed run resumes
(finished chunks are kept, never regenerated), a finished one (``metrics.json``) is reported
again, not redone (``--force`` rescores its samples). With ``--num-samples`` > 1 each prompt's
candidates are re-ranked by the retriever CLIP (``<outputs>/retriever``). Scores: FID-CLIP on
the evaluation CLIP (``<outputs>/eval_clip``; ``--features inception`` for the paper's FID),
CLIP score, and on the shapes world the scene parser's ``attr_acc`` and ``exact``, each with a
bootstrap 95% interval. With several ranks (``--rank/--world-size`` or RANK/WORLD_SIZE), each
rank generates its chunks; the rank that finds every sample present scores.

Score an existing folder::

    python eval/coco_fid.py --samples DIR --reference DIR --out outputs/eval/fid/metrics.json
        [--features inception --inception-weights /path/inception-2015-12-05.pt]
        [--features clip --clip outputs/eval_clip [--prompts prompts.json]]

`--features inception` (default here) is the paper's FID: clean-fid's TorchScript Inception, read
from --inception-weights or from /tmp/inception-2015-12-05.pt where clean-fid looks; it is
never downloaded. `--features clip` computes FID-CLIP on the evaluation CLIP's image features
(the shapes-world protocol; not comparable with Inception FID) and, with --prompts (JSON
{image file relative to --samples: prompt} or a .jsonl of {file, prompt}), the CLIP score
100 * max(cos(image, prompt), 0) averaged over samples (torchmetrics' definition).
Bootstrap intervals resample both image sets (--bootstrap resamples, each one matrix square
root of the feature size: ~seconds for Inception's 2048, so e.g. --bootstrap 100 at 30K
images). Both modes print the paper's Table 1 beside our row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/coco_fid.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from lit_cm3leon.evaluation import bootstrap
from lit_cm3leon.evaluation import fid as fidlib
from lit_cm3leon.evaluation.metrics_io import (
    InputError,
    add_run_args,
    check_out,
    header_from_args,
    write_metrics,
)
from lit_cm3leon.evaluation.paper import table1_markdown
from lit_cm3leon.evaluation.t2i import CHUNK


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", default=None, help="folder of generated images (scoring mode)")
    p.add_argument(
        "--reference",
        default=None,
        help="folder of reference images (scoring mode; with --ckpt --captions: the COCO images)",
    )
    p.add_argument(
        "--features",
        choices=("inception", "clip"),
        default=None,
        help="feature space of the FID (default: clip on the shapes world, inception otherwise)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help=f"TorchScript Inception file (default {fidlib.CLEANFID_INCEPTION})",
    )
    p.add_argument(
        "--clip",
        default=None,
        help="evaluation CLIP folder (ClipEncoder.save), for --features clip / --prompts",
    )
    p.add_argument(
        "--prompts", default=None, help="prompts of the samples, for the CLIP score (needs --clip)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per feature batch")
    add_ckpt_args(p)
    add_run_args(p, protocol="coco-fid", out_required=False)
    args = p.parse_args(argv)
    if args.samples is None:
        if not args.ckpt:
            p.error(
                "give --ckpt PATH (generate and score) or --samples DIR --reference DIR (score)"
            )
        return ckpt_main(args)
    if args.reference is None or args.out is None:
        p.error("scoring a folder needs --samples, --reference and --out")
    args.features = args.features or "inception"
    try:
        out = check_out(args.out, args.force)
        fidlib.list_images(args.samples)
        fidlib.list_images(args.reference)
        if (args.features == "clip" or args.prompts) and not args.clip:
            raise InputError("--features clip and --prompts need --clip DIR (the evaluation CLIP)")
        encoder = fidlib.load_clip_encoder(args.clip) if args.clip else None
        prompt_files = fidlib.load_prompts(args.prompts, args.samples) if args.prompts else None
        if args.features == "inception":
            extractor, fn_resize = fidlib.inception_extractor(args.inception_weights), None
        else:
            extractor, fn_resize = fidlib.clip_extractor(encoder)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = fidlib.score_fid(
        args.samples,
        args.reference,
        extractor,
        fn_resize,
        args.bootstrap,
        args.seed,
        args.batch_size,
    )
    metrics = dict(fidlib.summary(res, args.features))
    ci95 = {"fid": [round(v, 4) for v in res.ci95]} if res.ci95 else {}
    if prompt_files is not None:
        per = fidlib.score_clip(*prompt_files, encoder)
        metrics["clip_score"] = float(per.mean())
        metrics["clip_score_definition"] = (
            "100 * max(cos(image, text), 0), mean over samples (torchmetrics CLIPScore)"
        )
        ci = bootstrap.bootstrap_ci(
            len(per), bootstrap.mean_statistic({"clip_score": per}), args.bootstrap, args.seed
        )
        ci95.update({k: [round(v, 4) for v in pair] for k, pair in ci.items()})
    record = write_metrics(
        out,
        header_from_args(args, n=res.n_samples),
        metrics,
        ci95,
        bootstrap.info(args.bootstrap, args.seed, unit="image set (both folders resampled)"),
    )
    print(table1_markdown([record]))
    if "clip_score" in record:
        print(
            f"\nCLIP score (ours): {record['clip_score']:.2f}  95% CI {np.round(ci95.get('clip_score', []), 2).tolist()}"
        )
    print(f"wrote {out}")
    return 0


def add_ckpt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "generate with --ckpt (the decoding flags below and --strategy, --cfg-scale, ...)"
    )
    g.add_argument(
        "--outputs",
        default="outputs",
        help="the pipeline's outputs/ folder (tokenizers, CLIPs, index; runs go to <outputs>/eval/t2i/)",
    )
    g.add_argument(
        "--n", type=int, default=1000, help="prompts (default 1000, the shapes protocol)"
    )
    g.add_argument(
        "--captions",
        default=None,
        help="COCO captions json: first caption of each image as the prompt (default: the shapes world)",
    )
    g.add_argument(
        "--eval-clip", default=None, help="evaluation CLIP folder (default <outputs>/eval_clip)"
    )
    g.add_argument(
        "--retriever-clip",
        default=None,
        help="re-ranking CLIP folder (default <outputs>/retriever)",
    )
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=0.9, help="top-p of topp / cfg_topp")
    g.add_argument("--top-k", type=int, default=0, help="top-k (0: off)")
    g.add_argument("--cdk-alpha", type=float, default=0.5, help="CD-K plausibility factor")
    g.add_argument("--cdk-k", type=int, default=5, help="CD-K's k")
    g.add_argument(
        "--chunk",
        type=int,
        default=CHUNK,
        help="prompts per generation chunk (the unit of resuming and sharding)",
    )
    g.add_argument(
        "--rank", type=int, default=None, help="this process's rank (default env RANK or 0)"
    )
    g.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks sharing the run (default env WORLD_SIZE or 1)",
    )
    g.add_argument(
        "--run-dir",
        default=None,
        help="run folder (default named after the settings under <outputs>/eval/t2i/)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def decoding_from_args(args: argparse.Namespace):
    from lit_cm3leon.engine import Decoding

    d = Decoding(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        cdk_alpha=args.cdk_alpha, cdk_k=args.cdk_k,
    )  # fmt: skip
    for k in ("strategy", "cfg_scale", "num_samples", "retrieve_k"):
        if getattr(args, k) is not None:
            setattr(d, k, getattr(args, k))
    return d


def ckpt_main(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lit_cm3leon.evaluation import t2i_run

    dec = decoding_from_args(args)
    features = args.features or ("clip" if args.captions is None else "inception")
    try:
        rank, world = t2i_run.rank_and_world(args.rank, args.world_size)
        out = check_out(args.out, args.force) if args.out else None
        res = t2i_run.Resources(args.outputs, args.eval_clip, args.retriever_clip)
        pset = t2i_run.prompt_set(args.n, args.outputs, args.captions, args.reference)
        if args.protocol != "coco-fid":  # an explicit --protocol names the run
            pset.protocol = args.protocol
        folder, record = t2i_run.evaluate_ckpt(
            args.ckpt, dec, res, pset, args.seed, features, args.inception_weights, args.chunk, rank, world,
            args.bootstrap, args.run_dir, rescore=args.force, progress=not args.no_progress,
        )  # fmt: skip
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if record is None:
        left = len(t2i_run.missing_samples(folder, len(pset.prompts)))
        print(
            f"rank {rank}/{world}: my chunks are done; {left} samples left to other ranks. "
            f"The rank that finishes last scores (or rerun this command once all are done): {folder}"
        )
        return 0
    if out is not None:
        import shutil

        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "metrics.json", out)
    print(table1_markdown([record]))
    ci = record["ci95"]
    for k in ("clip_score", "attr_acc", "attr_acc_strict", "exact", "count_acc"):
        if k in record:
            print(f"{k}: {record[k]:.4f}  95% CI {ci.get(k, '-')}")
    print(f"run folder: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
