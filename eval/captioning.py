"""COCO captioning metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) of a results file.

    python eval/captioning.py --predictions results.json --annotations captions_val2014.json \
        --out outputs/eval/captioning/metrics.json

`results.json` is the COCO results format `[{"image_id": int, "caption": str}, ...]` with one
caption for every image of the annotation file. Scores are pycocoevalcap's, under its names
(`Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr`, `SPICE`); SPICE runs only when its
Stanford CoreNLP jars are installed (otherwise skipped with a message). Bootstrap 95%
intervals resample images. (`--ckpt` generation comes with the decoder.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/captioning.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_cm3leon.evaluation import bootstrap
from lit_cm3leon.evaluation.captioning import (
    ALL_METRICS,
    load_caption_results,
    load_coco_captions,
    score_captions,
)
from lit_cm3leon.evaluation.metrics_io import (
    InputError,
    add_run_args,
    check_out,
    check_predictions,
    header_from_args,
    write_metrics,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--predictions", required=True, help="COCO results file [{image_id, caption}]")
    p.add_argument(
        "--annotations", required=True, help="COCO captions annotation file (images + annotations)"
    )
    p.add_argument(
        "--metrics",
        default=",".join(ALL_METRICS),
        help="comma-separated subset of " + ",".join(ALL_METRICS) + " (default: all)",
    )
    add_run_args(p, protocol="coco-captions")
    args = p.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        bad = [m for m in metrics if m not in ALL_METRICS]
        if bad:
            raise InputError(f"--metrics: unknown {bad}; choose from {','.join(ALL_METRICS)}")
        out = check_out(args.out, args.force)
        refs = load_coco_captions(args.annotations)
        preds = load_caption_results(args.predictions)
        check_predictions(preds, list(refs), id_name="image_id")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = score_captions(
        preds, refs, metrics=metrics, n_bootstrap=args.bootstrap, seed=args.seed
    )
    for reason in result.skipped.values():
        print(reason, file=sys.stderr)
    ci95 = {k: [round(v, 6) for v in pair] for k, pair in result.ci95.items()}
    write_metrics(
        out,
        header_from_args(args, n=len(result.ids)),
        result.scores,
        ci95,
        bootstrap.info(args.bootstrap, args.seed, unit="image"),
        extra={"skipped": result.skipped} if result.skipped else None,
    )
    for m, v in result.scores.items():
        ci = f"  95% CI [{ci95[m][0]:.3f}, {ci95[m][1]:.3f}]" if m in ci95 else ""
        print(f"{m}: {v:.3f}{ci}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
