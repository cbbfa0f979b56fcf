"""Official VQA accuracy of a results file (VQA v2 format; VizWiz/OKVQA files in the same layout).

    python eval/vqa.py --predictions results.json --questions Q.json --annotations A.json \
        --out outputs/eval/vqa/metrics.json

`results.json` is the official results format `[{"question_id": int, "answer": str}, ...]`
with exactly one answer per annotated question. Writes metrics.json with `overall`,
`perAnswerType`, `perQuestionType` (percent, 2 decimals, as the official tool prints them)
and bootstrap 95% intervals over questions.

Generate and score a checkpoint on the shapes world::

    python eval/vqa.py --ckpt outputs/sft [--outputs outputs] [--n 1000] [--temperature 0]

Answers the first ``--n`` held-out questions (``reasoning`` template for yes/no questions,
``vqa`` for the rest; greedy by default) and writes, in
``<outputs>/eval/vqa/<ckpt>_shapes-heldout_n<n>_vqa_<decoding>_seed<s>/``, the official files
``questions.json``, ``annotations.json`` (10 human answers = the exact answer 10 times),
``results.json`` and ``baseline_results.json``, and ``metrics.json`` scored with the official
metric: ``overall``, ``perAnswerType``, ``perQuestionType`` and the same prefixed ``baseline_``
for the question-only prior (the most frequent training answer of each question type,
``baseline_prior``), and ``difference_overall``: the model's accuracy minus the prior's, with a
paired bootstrap interval over questions (above 0: the model clearly beats the prior). A
finished run folder is not redone (``--force`` redoes it).
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
    copy_metrics,
    header_from_args,
    write_metrics,
)
from lit_cm3leon.evaluation.shapes_i2t import add_i2t_args, i2t_run_dir, i2t_setup
from lit_cm3leon.evaluation.vqa_accuracy import load_vqa, score_vqa, vqa_bootstrap_statistic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--predictions", default=None, help="official results file [{question_id, answer}]"
    )
    p.add_argument(
        "--questions", default=None, help="official question file (an object with 'questions')"
    )
    p.add_argument(
        "--annotations",
        default=None,
        help="official annotation file (an object with 'annotations')",
    )
    add_i2t_args(p, n=1000, max_text_tokens=8)
    add_run_args(p, protocol="vqa2", out_required=False)
    args = p.parse_args(argv)
    if args.predictions is None:
        if not args.ckpt:
            p.error(
                "give --ckpt PATH (answer shapes-world questions) or --predictions, --questions, --annotations"
            )
        try:
            return ckpt_main(args)
        except InputError as e:  # e.g. an outputs folder whose stages mix shapes worlds
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.questions is None or args.annotations is None or args.out is None:
        p.error("scoring a results file needs --predictions, --questions, --annotations and --out")
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


def _nested_ci(scores, n_bootstrap: int, seed: int) -> dict:
    flat = bootstrap.bootstrap_ci(
        len(scores.accuracy), vqa_bootstrap_statistic(scores), n_bootstrap, seed
    )
    if not flat:
        return {}
    return {
        "overall": _r(flat.pop("overall")),
        "perAnswerType": {k.split("/", 1)[1]: _r(v) for k, v in flat.items()},
    }


def ckpt_main(args: argparse.Namespace) -> int:
    import json

    from lit_cm3leon.data.templates import inference_prompt
    from lit_cm3leon.evaluation import shapes_i2t as si
    from lit_cm3leon.evaluation.metrics_io import run_header, write_item_scores
    from lit_cm3leon.evaluation.world import outputs_world

    folder = i2t_run_dir(args, "vqa", "vqa")
    out = folder / "metrics.json"
    if out.is_file() and not args.force:
        print(f"{out} exists (a finished run); pass --force to redo it")
        print(out.read_text())
        return 0
    protocol = "shapes-vqa" if args.protocol == "vqa2" else args.protocol
    world = outputs_world(args.outputs, args.ckpt)
    items = si.vqa_items(args.n, world)
    _, images, _, _ = si.caption_items(items[-1].scene_index + 1, world)
    engine, dec, hdr = i2t_setup(args)
    codes = engine.image_tokenizer.encode(images).numpy()
    prompts = [
        inference_prompt(it.task, engine.codec, image=codes[it.scene_index], question=it.question)
        for it in items
    ]
    answers = si.generate_texts(engine, prompts, dec, args.seed, args.batch_size)
    prior = si.answer_prior(args.baseline_train)
    questions, annotations = si.official_vqa_files(items)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "questions.json": questions,
        "annotations.json": annotations,
        "results.json": [
            {"question_id": it.question_id, "answer": a}
            for it, a in zip(items, answers, strict=True)
        ],
        "baseline_results.json": [
            {"question_id": it.question_id, "answer": prior.get(it.qtype, "")} for it in items
        ],
    }
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data, indent=1))
    record: dict = {}
    ci95: dict = {}
    accuracy = {}
    for prefix, results in (("", "results.json"), ("baseline_", "baseline_results.json")):
        preds, anns = load_vqa(
            folder / results, folder / "questions.json", folder / "annotations.json"
        )
        scores = score_vqa(preds, anns)
        accuracy[prefix] = {"overall": scores.accuracy}
        if not prefix:
            write_item_scores(folder, scores.question_ids, accuracy[""])
        record.update({prefix + k: v for k, v in scores.summary().items()})
        ci95.update(
            {prefix + k: v for k, v in _nested_ci(scores, args.bootstrap, args.seed).items()}
        )
    diff, diff_ci = bootstrap.differences(
        accuracy[""], accuracy["baseline_"], args.bootstrap, args.seed, scale=100.0
    )
    record.update({k: round(v, 2) for k, v in diff.items()})
    ci95.update({k: _r(pair) for k, pair in diff_ci.items()})
    record["baseline_prior"] = prior
    record["baseline_definition"] = (
        f"question-only prior: the most frequent answer of each question type in the first "
        f"{args.baseline_train} training scenes (ties: alphabetically first)"
    )
    written = write_metrics(
        out, run_header(protocol, args.seed, len(items), **hdr), record, ci95,
        bootstrap.info(args.bootstrap, args.seed, unit="question"), extra={"run_dir": str(folder)},
    )  # fmt: skip
    print(
        f"Overall Accuracy is: {written['overall']:.2f}  (baseline prior {written['baseline_overall']:.2f})"
    )
    for t, v in written["perAnswerType"].items():
        print(
            f"{t} : {v:.2f}  (baseline {written['baseline_perAnswerType'].get(t, float('nan')):.2f})"
        )
    for it, a in list(zip(items, answers, strict=True))[:3]:
        print(f"  {it.question!r} -> {a!r} (truth {it.answer!r})")
    copy_metrics(out, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
