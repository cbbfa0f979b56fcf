"""COCO captioning metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) of a results file.

    python eval/captioning.py --predictions results.json --annotations captions_val2014.json \
        --out outputs/eval/captioning/metrics.json

`results.json` is the COCO results format `[{"image_id": int, "caption": str}, ...]` with one
caption for every image of the annotation file. Scores are pycocoevalcap's, under its names
(`Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr`, `SPICE`); SPICE runs only when its
Stanford CoreNLP jars are installed (otherwise skipped with a message). Bootstrap 95%
intervals resample images.

Generate and score a checkpoint on the shapes world::

    python eval/captioning.py --ckpt outputs/sft [--outputs outputs] [--n 500] [--temperature 0]

Captions the first ``--n`` held-out images with the ``caption_long`` SFT template (greedy by
default) and writes, in ``<outputs>/eval/captioning/<ckpt>_shapes-heldout_n<n>_<decoding>_seed<s>/``,
``predictions.json`` (COCO results), ``annotations.json`` (the references: each scene's short
and long caption, COCO layout) and ``metrics.json``: pycocoevalcap's metrics, the claim accuracy
``caption_attr_acc`` (F1 of the (colour, kind) pairs a caption claims vs the scene's; also
``caption_attr_precision`` / ``caption_attr_recall``) and the same keys prefixed ``baseline_``
for the most frequent training caption (`lit_cm3leon.evaluation.shapes_i2t`), and
``difference_CIDEr``, ``difference_ROUGE_L`` and ``difference_caption_attr_acc``: the model's
score minus the baseline's with a paired bootstrap interval over images (the scores whose
corpus value is the mean over images). A finished run folder is not redone (``--force``
redoes it).
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
    copy_metrics,
    header_from_args,
    print_metrics,
    run_header,
    write_metrics,
)
from lit_cm3leon.evaluation.shapes_i2t import add_i2t_args, i2t_run_dir, i2t_setup


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--predictions", default=None, help="COCO results file [{image_id, caption}]")
    p.add_argument(
        "--annotations", default=None, help="COCO captions annotation file (images + annotations)"
    )
    p.add_argument(
        "--metrics",
        default=",".join(ALL_METRICS),
        help="comma-separated subset of " + ",".join(ALL_METRICS) + " (default: all)",
    )
    add_i2t_args(p, n=500, max_text_tokens=64)
    add_run_args(p, protocol="coco-captions", out_required=False)
    args = p.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in ALL_METRICS]
    if bad:
        p.error(f"--metrics: unknown {bad}; choose from {','.join(ALL_METRICS)}")
    if args.predictions is None:
        if not args.ckpt:
            p.error(
                "give --ckpt PATH (caption the shapes world) or --predictions and --annotations"
            )
        try:
            return ckpt_main(args, metrics)
        except InputError as e:  # e.g. an outputs folder whose stages mix shapes worlds
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.annotations is None or args.out is None:
        p.error("scoring a results file needs --predictions, --annotations and --out")
    try:
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


def ckpt_main(args: argparse.Namespace, metrics: list[str]) -> int:
    import json

    from lit_cm3leon.data.templates import inference_prompt
    from lit_cm3leon.evaluation import shapes_i2t as si
    from lit_cm3leon.evaluation.metrics_io import write_item_scores
    from lit_cm3leon.evaluation.world import outputs_world

    folder = i2t_run_dir(args, "captioning", "caption_long")
    out = folder / "metrics.json"
    if out.is_file() and not args.force:
        print(f"{out} exists (a finished run); pass --force to redo it")
        print(out.read_text())
        return 0
    protocol = "shapes-captions" if args.protocol == "coco-captions" else args.protocol
    world = outputs_world(args.outputs, args.ckpt)
    ids, images, refs, scenes = si.caption_items(args.n, world)
    engine, dec, hdr = i2t_setup(args)
    codes = engine.image_tokenizer.encode(images).numpy()
    prompts = [inference_prompt("caption_long", engine.codec, image=c) for c in codes]
    texts = si.generate_texts(engine, prompts, dec, args.seed, args.batch_size)
    preds = dict(zip(ids, texts, strict=True))
    baseline = si.most_frequent_caption(args.baseline_train)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictions.json").write_text(
        json.dumps([{"image_id": i, "caption": preds[i]} for i in ids], indent=1)
    )
    (folder / "annotations.json").write_text(json.dumps(si.coco_caption_file(refs), indent=1))
    record: dict = {}
    ci95: dict = {}
    skipped: dict = {}
    per_image = {}
    for prefix, p in (("", preds), ("baseline_", {i: baseline for i in ids})):
        res = score_captions(p, refs, metrics=metrics, n_bootstrap=args.bootstrap, seed=args.seed)
        skipped.update(res.skipped)
        attr = si.caption_attr_scores(p, scenes)
        # the scores whose corpus value is the mean over images (not BLEU's, not METEOR's)
        per_image[prefix] = {
            **{k: v for k, v in res.per_image.items() if k in ("CIDEr", "ROUGE_L")},
            "caption_attr_acc": attr["caption_attr_acc"],
        }
        record.update({prefix + k: v for k, v in res.scores.items()})
        record.update({prefix + k: float(v.mean()) for k, v in attr.items()})
        ci95.update({prefix + k: [round(x, 6) for x in pair] for k, pair in res.ci95.items()})
        ci = bootstrap.bootstrap_ci(
            len(ids), bootstrap.mean_statistic(attr), args.bootstrap, args.seed
        )
        ci95.update({prefix + k: [round(x, 6) for x in pair] for k, pair in ci.items()})
    write_item_scores(folder, ids, per_image[""])
    diff, diff_ci = bootstrap.differences(
        per_image[""], per_image["baseline_"], args.bootstrap, args.seed
    )
    record.update(diff)
    ci95.update({k: [round(x, 6) for x in pair] for k, pair in diff_ci.items()})
    record["baseline_caption"] = baseline
    record["baseline_definition"] = (
        f"the most frequent long caption of the first {args.baseline_train} training samples, for every image"
    )
    record["caption_attr_definition"] = (
        "per image F1 of the (colour, kind) pairs the caption claims vs the scene's pairs "
        "(precision 0 when nothing is claimed), mean over images"
    )
    written = write_metrics(
        out, run_header(protocol, args.seed, len(ids), **hdr), record, ci95,
        bootstrap.info(args.bootstrap, args.seed, unit="image"),
        extra={"task": "caption_long", "run_dir": str(folder), **({"skipped": skipped} if skipped else {})},
    )  # fmt: skip
    print_metrics(written, ci95)
    print("examples:", *[f"  {refs[i][1]!r} -> {preds[i]!r}" for i in ids[:3]], sep="\n")
    copy_metrics(out, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
