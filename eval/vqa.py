"""Official VQA accuracy of a results file (VQA v2 format; VizWiz/OKVQA files in the same layout).

    python eval/vqa.py --predictions results.json --questions Q.json --annotations A.json \
        --out outputs/eval/vqa/metrics.json

`results.json` is the official results format `[{"question_id": int, "answer": str}, ...]`
with exactly one answer per annotated question. Writes metrics.json with `overall`,
`perAnswerType`, `perQuestionType` (percent, 2 decimals, as the official tool prints them)
and bootstrap 95% intervals over questions. (`--ckpt` generation comes with the decoder.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/vqa.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_cm3leon.evaluation import bootstrap
from lit_cm3leon.evaluation.metrics_io import (
    InputError,
    add_run_args,
    check_out,
    header_from_args,
    write_metrics,
)
from lit_cm3leon.evaluation.vqa_accuracy import load_vqa, score_vqa, vqa_bootstrap_statistic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--predictions", required=True, help="official results file [{question_id, answer}]"
    )
    p.add_argument(
        "--questions", required=True, help="official question file (an object with 'questions')"
    )
    p.add_argument(
        "--annotations",
        required=True,
        help="official annotation file (an object with 'annotations')",
    )
    add_run_args(p, protocol="vqa2")
    args = p.parse_args(argv)
    try:
        out = check_out(args.out, args.force)
        preds, anns = load_vqa(args.predictions, args.questions, args.annotations)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scores = score_vqa(preds, anns)
    flat = bootstrap.bootstrap_ci(
        len(anns), vqa_bootstrap_statistic(scores), args.bootstrap, args.seed
    )
    ci95: dict = {}
    if flat:
        ci95 = {
            "overall": _r(flat.pop("overall")),
            "perAnswerType": {k.split("/", 1)[1]: _r(v) for k, v in flat.items()},
        }
    record = write_metrics(
        out,
        header_from_args(args, n=len(anns)),
        scores.summary(),
        ci95,
        bootstrap.info(args.bootstrap, args.seed, unit="question"),
    )
    print(f"Overall Accuracy is: {record['overall']:.2f}")
    print("Per Answer Type Accuracy is the following:")
    for t, v in record["perAnswerType"].items():
        print(f"{t} : {v:.2f}")
    if ci95:
        print(
            f"bootstrap 95% interval (overall): [{ci95['overall'][0]:.2f}, {ci95['overall'][1]:.2f}]"
        )
    print(f"wrote {out}")
    return 0


def _r(pair: list[float]) -> list[float]:
    return [round(x, 4) for x in pair]


if __name__ == "__main__":
    sys.exit(main())
