"""FID (clean-fid) between a folder of generated samples and a folder of reference images.

    python eval/coco_fid.py --samples DIR --reference DIR --out outputs/eval/fid/metrics.json
        [--features inception --inception-weights /path/inception-2015-12-05.pt]
        [--features clip --clip outputs/retriever/eval_clip [--prompts prompts.json]]

`--features inception` (default) is the paper's FID: clean-fid's TorchScript Inception, read
from --inception-weights or from /tmp/inception-2015-12-05.pt where clean-fid looks; it is
never downloaded. `--features clip` computes FID-CLIP on the evaluation CLIP's image features
(the shapes-world protocol; not comparable with Inception FID) and, with --prompts (JSON
{image file relative to --samples: prompt} or a .jsonl of {file, prompt}), the CLIP score
100 * max(cos(image, prompt), 0) averaged over samples (torchmetrics' definition).
Bootstrap intervals resample both image sets (--bootstrap resamples, each one matrix square
root of the feature size: ~seconds for Inception's 2048, so e.g. --bootstrap 100 at 30K
images). Prints the paper's Table 1 beside our row. (`--ckpt` generation comes with the
decoder.)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", required=True, help="folder of generated images")
    p.add_argument("--reference", required=True, help="folder of reference images")
    p.add_argument(
        "--features",
        choices=("inception", "clip"),
        default="inception",
        help="feature space of the FID",
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
    add_run_args(p, protocol="coco-fid")
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
