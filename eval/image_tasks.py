"""Image-output SFT tasks on the shapes world, judged by the scene parser, beside their baselines.

    python eval/image_tasks.py --task edit --ckpt outputs/sft [--outputs outputs] [--n 300]
    python eval/image_tasks.py --task spatial --ckpt outputs/sft [--n 300]

``edit``: text-guided editing of the first ``--n`` held-out scenes' edits
(`lit_cm3leon.evaluation.shapes_edit`): ``edit_success`` (the requested attribute changed and
everything else kept, i.e. the parsed output equals the target scene), ``edit_changed`` and
``edit_kept`` (the two parts), per edited attribute in ``edit_success_by_attribute``. Baseline
(``baseline_``): the source image copied unchanged; also ``copy_recon_``: the source copied
through the image tokenizer.

``spatial``: spatially grounded generation of the first ``--n`` held-out scenes, each shape
asked for with its box in ``<loc:N>`` tokens (`lit_cm3leon.evaluation.shapes_spatial`):
``spatial_placed`` (requested objects found in their box's cell with the requested colour and
kind), ``spatial_occupied`` (box cells holding any shape), ``spatial_in_box`` (the output's
shapes lying in a box cell: occupancy without credit for crowding) and ``spatial_exact``. Baseline (``baseline_``): the requested shapes
put in uniformly random distinct cells, expected scores computed exactly. ``--spatial-prompt
words`` asks for the same scenes with the long caption instead (each shape's cell named in
words), ``none`` with the short caption (no positions): what the decoder places without the
location tokens.

Both: ``difference_<score>`` is the SFT score minus the baseline's, with a paired bootstrap
interval (the same items resampled for both: ``lit_cm3leon.evaluation.bootstrap.differences``);
an interval above 0 is a clear win over the baseline. ``ceiling_`` is the parser on the image
tokenizer's reconstruction of the true output (the best a model emitting the right codes can
score through this tokenizer). Decoding defaults to the text-to-image protocol's (``cfg_topp``,
CFG 3, top-p 0.9, temperature 1, one sample).
Writes ``<outputs>/eval/<task>/<ckpt>_shapes-heldout_n<n>_<strategy>_cfg<s>_seed<s>/`` with
``samples/*.png``, ``items.json`` (prompt, target and parsed scene, scores per item) and
``metrics.json`` (copied to ``--out`` when given). A finished run folder is not redone
(``--force`` redoes it). The scenes are drawn and parsed in the world the stages under
``--outputs`` were made in (``lit_cm3leon.evaluation.world``; its geometry is the record's
``world``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/image_tasks.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from lit_cm3leon.data.shapes import parse_scene
from lit_cm3leon.evaluation import bootstrap
from lit_cm3leon.evaluation.metrics_io import (
    InputError,
    add_run_args,
    copy_metrics,
    print_metrics,
    run_header,
    write_metrics,
)

TASKS = ("edit", "spatial")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", choices=TASKS, required=True, help="edit | spatial")
    p.add_argument(
        "--outputs",
        default="outputs",
        help="the pipeline's outputs/ folder (tokenizers; runs go to <outputs>/eval/<task>/)",
    )
    p.add_argument("--n", type=int, default=300, help="held-out items (default 300)")
    p.add_argument(
        "--spatial-prompt",
        choices=("loc", "words", "none"),
        default="loc",
        help="spatial only: loc = boxes as <loc:N> tokens (the task); words = the long caption "
        "(cells named in words); none = the short caption (no positions: a control)",
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)"
    )
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass")
    p.add_argument("--top-k", type=int, default=0, help="top-k (0: off)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch")
    p.add_argument("--run-dir", default=None, help="run folder (default named after the settings)")
    add_run_args(p, protocol="", out_required=False)
    args = p.parse_args(argv)
    if not args.ckpt:
        p.error("--ckpt is required (the decoder to evaluate, e.g. outputs/sft)")
    args.protocol = args.protocol or f"shapes-{args.task}"
    args.strategy = args.strategy or "cfg_topp"
    args.cfg_scale = 3.0 if args.cfg_scale is None else args.cfg_scale
    if args.num_samples not in (None, 1):
        p.error("--num-samples: one sample per prompt only (no re-ranking for these tasks)")
    if args.retrieve_k not in (None, 0):
        p.error("--retrieve-k: these prompts take no retrieved documents (use 0)")
    if args.n < 1:
        p.error("--n must be >= 1")
    return args


def run_dir(args: argparse.Namespace) -> Path:
    from lit_cm3leon.evaluation.t2i_run import ckpt_label

    if args.run_dir:
        return Path(args.run_dir)
    name = (
        f"{ckpt_label(args.ckpt)}_shapes-heldout_n{args.n}_{args.strategy}"
        f"_cfg{args.cfg_scale:g}_seed{args.seed}"
    )
    if args.task == "spatial" and args.spatial_prompt != "loc":
        name += f"_prompt-{args.spatial_prompt}"
    return Path(args.outputs) / "eval" / args.task / name


def edit_run(engine, dec, args, world) -> tuple[dict, list[dict], np.ndarray]:
    """(metric arrays by prefix, per-item records, generated images)."""
    from lit_cm3leon.evaluation import shapes_edit as se

    edits = se.edit_items(args.n, world)
    source = np.stack([e.before_image for e in edits])
    codes = engine.image_tokenizer.encode(source).numpy()
    cond, uncond = se.edit_prompts(engine, codes, edits)
    images = engine.decode_images(
        engine.prompt_to_image_codes(cond, uncond, dec, args.seed, args.batch_size)[:, 0]
    )
    target_recon = engine.decode_images(
        engine.image_tokenizer.encode(np.stack([e.after_image for e in edits])).numpy()
    )
    parsed = [parse_scene(img, world) for img in images]
    scores = {
        "": se.edit_scores(None, edits, world, scenes=parsed),
        "baseline_": se.edit_scores(source, edits, world),
        "copy_recon_": se.edit_scores(engine.decode_images(codes), edits, world),
        "ceiling_": se.edit_scores(target_recon, edits, world),
    }
    records = [
        {
            "instruction": e.instruction,
            "attribute": e.attribute,
            "source": e.before.key(),
            "target": e.after.key(),
            "parsed": p.key(),
            **{k: float(v[i]) for k, v in scores[""].items()},
        }
        for i, (e, p) in enumerate(zip(edits, parsed, strict=True))
    ]
    return (
        {pre: {f"edit_{k}": v for k, v in s.items()} for pre, s in scores.items()},
        records,
        images,
    )


def spatial_run(engine, dec, args, world) -> tuple[dict, list[dict], np.ndarray]:
    from lit_cm3leon.evaluation import shapes_spatial as ss

    items = ss.spatial_items(args.n, world)
    cond, uncond = ss.spatial_prompts(engine, items, args.spatial_prompt, world)
    images = engine.decode_images(
        engine.prompt_to_image_codes(cond, uncond, dec, args.seed, args.batch_size)[:, 0]
    )
    truth = np.stack([world.render(it.scene) for it in items])
    truth_recon = engine.decode_images(engine.image_tokenizer.encode(truth).numpy())
    parsed = [parse_scene(img, world) for img in images]
    scores = {
        "": ss.spatial_scores(None, items, world, scenes=parsed),
        "baseline_": ss.chance_scores(items, world),
        "ceiling_": ss.spatial_scores(truth_recon, items, world),
    }
    records = [
        {
            "prompt": engine.codec.decode_text(
                [t for t in c if engine.vocab.is_text(t) or engine.vocab.is_loc(t)]
            ),
            "target": it.scene.key(),
            "parsed": p.key(),
            **{k: float(v[i]) for k, v in scores[""].items()},
        }
        for i, (it, p, c) in enumerate(zip(items, parsed, cond, strict=True))
    ]
    out = {pre: {f"spatial_{k}": v for k, v in s.items()} for pre, s in scores.items()}
    return out, records, images


DEFINITIONS = {
    "edit": {
        "edit_definition": (
            "scene parser on the output vs the target scene: changed = the requested attribute has "
            "its new value (position: the new cell holds a shape and the old one is empty); kept = "
            "with that attribute set to the target's, the scene equals the target; success = both"
        ),
        "baseline_definition": "copy: the source image, unchanged",
        "copy_recon_definition": "copy through the tokenizer: the source image's reconstruction",
        "ceiling_definition": "the image tokenizer's reconstruction of the true target image",
    },
    "spatial": {
        "spatial_definition": (
            "scene parser on the output: placed = fraction of requested objects whose box cell holds "
            "a shape of the requested colour and kind; occupied = fraction of box cells holding a "
            "shape; in_box = fraction of the output's shapes lying in a box cell; exact = all placed "
            "and no shape elsewhere"
        ),
        "baseline_definition": (
            "chance: the requested shapes in uniformly random distinct cells, expectation computed exactly"
        ),
        "ceiling_definition": "the image tokenizer's reconstruction of the true image",
    },
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = run_dir(args)
    out = folder / "metrics.json"
    if out.is_file() and not args.force:
        print(f"{out} exists (a finished run); pass --force to redo it")
        copy_metrics(out, args.out)
        return 0
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from PIL import Image

    from lit_cm3leon.engine import Decoding, Engine
    from lit_cm3leon.evaluation.world import geometry, outputs_world

    t0 = time.time()
    try:
        world = outputs_world(args.outputs, args.ckpt)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = Engine.load(args.ckpt, args.outputs, retrieval=False)
    dec = Decoding(
        strategy=args.strategy,
        cfg_scale=args.cfg_scale,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
    )
    task_run = edit_run if args.task == "edit" else spatial_run
    scores, records, images = task_run(engine, dec, args, world)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / "samples" / f"{i:05d}.png")
    (folder / "items.json").write_text(json.dumps(records, indent=1))
    record: dict = {}
    ci95: dict = {}
    for prefix, arrays in scores.items():
        record.update({prefix + k: float(v.mean()) for k, v in arrays.items()})
        ci = bootstrap.bootstrap_ci(
            args.n, bootstrap.mean_statistic(arrays), args.bootstrap, args.seed
        )
        ci95.update({prefix + k: [round(x, 6) for x in pair] for k, pair in ci.items()})
    diff, diff_ci = bootstrap.differences(
        scores[""], scores["baseline_"], args.bootstrap, args.seed
    )
    record.update(diff)
    ci95.update({k: [round(x, 6) for x in pair] for k, pair in diff_ci.items()})
    if args.task == "edit":
        from lit_cm3leon.evaluation.shapes_edit import by_attribute, edit_items

        edits = edit_items(args.n, world)
        for prefix in ("", "ceiling_"):
            record[f"{prefix}edit_success_by_attribute"] = by_attribute(
                scores[prefix]["edit_success"], edits
            )
    record.update(DEFINITIONS[args.task])
    record["world"] = geometry(vars(world))
    record["decoding"] = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if args.task == "spatial":
        record["spatial_prompt"] = args.spatial_prompt
    header = run_header(args.protocol, args.seed, args.n, ckpt=str(args.ckpt),
                        strategy=args.strategy, cfg_scale=args.cfg_scale, num_samples=1,
                        retrieve_k=0)  # fmt: skip
    written = write_metrics(
        out, header, record, ci95, bootstrap.info(args.bootstrap, args.seed, unit="item"),
        extra={"task": args.task, "run_dir": str(folder), "seconds": round(time.time() - t0, 1)},
    )  # fmt: skip
    print_metrics(written, ci95, skip=("seconds",))
    copy_metrics(out, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
