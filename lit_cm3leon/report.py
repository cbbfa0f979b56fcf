"""``python -m lit_cm3leon.report [--outputs outputs]``: ``outputs/report.md`` from what the
pipeline published (manifests, eval ``metrics.json`` files, sample folders, stage times).

Every number in the report is read from a file a stage wrote; a stage that has not run shows
as "not run". The paper's figures stand beside ours, labelled, and the paper's four findings
are each marked reproduced or not, with the numbers that decide it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lit_cm3leon.evaluation.paper import SOURCE, TABLE1, TABLE2

# Background delta (nats) under which the pretrained decoder counts as not reading the caption:
# runs that hardly read it ended at 0.05-0.27 (0.66 once), runs that read the colour words at 2.0-4.7.
UNREAD_BACKGROUND_NATS = 0.5


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _num(x: Any, digits: int = 3) -> str:
    if isinstance(x, int | float) and np.isfinite(x):
        return f"{x:.{digits}f}" if isinstance(x, float) else str(x)
    return "–"


def _ci(rec: dict | None, key: str, digits: int = 3) -> str:
    pair = (rec or {}).get("ci95", {}).get(key)
    return f"[{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]" if pair and len(pair) == 2 else "–"


def _diff(rec: dict | None, key: str, digits: int = 3) -> str:
    """``difference_<key>`` (model minus baseline) and its paired interval, or – when absent."""
    d = f"difference_{key}"
    return f"{_num((rec or {}).get(d), digits)} {_ci(rec, d, digits)}" if d in (rec or {}) else "–"


def busy_seconds(timings) -> float:
    """Wall time covered by the stages' ``[start, end]`` intervals (overlaps counted once;
    the gap between a killed run and its rerun not at all). Records without ``start`` (older
    pipeline.json files) add their ``seconds``."""
    spans = sorted((t["start"], t["end"]) for t in timings if "start" in t and "end" in t)
    total = sum(t["seconds"] for t in timings if "start" not in t or "end" not in t)
    lo = hi = None
    for a, b in spans:
        if hi is None or a > hi:
            total += 0.0 if hi is None else hi - lo
            lo, hi = a, b
        else:
            hi = max(hi, b)
    return total + (0.0 if hi is None else hi - lo)


class Report:
    def __init__(self, outputs: Path) -> None:
        self.out = outputs
        self.lines: list[str] = []

    def ev(self, name: str) -> dict | None:
        return _load(self.out / "eval" / name / "metrics.json")

    def manifest(self, stage: str) -> dict | None:
        return _load(self.out / stage / "manifest.json")

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    # --- sections ------------------------------------------------------------------------
    def stages(self) -> None:
        timings = _load(self.out / "pipeline.json") or {}
        self.add(
            "## Stages",
            "",
            "Stages that do not depend on each other run side by side (`--jobs` of the pipeline; "
            "threads: each stage's share of the cores); the training stages whose step scales "
            "with threads run alone with every core. Wall time is per stage; the total counts "
            "overlapping time once.",
            "",
            "| stage | wall time (s) | threads | budget (min, full run) | run |",
            "| --- | --- | --- | --- | --- |",
        )
        for name, t in timings.items():
            self.add(
                f"| {name} | {t['seconds']:.0f} | {t.get('threads', '')} | "
                f"{t.get('budget_min', 0):g} | {t.get('budget', '')} |"
            )
        self.add("", f"Total wall time: {busy_seconds(timings.values()) / 60:.1f} min.", "")

    def tokenizers(self) -> None:
        m = (self.manifest("image_tokenizer") or {}).get("metrics", {})
        r = (self.manifest("retriever") or {}).get("metrics", {})
        self.add("## Tokenizer and retriever", "", "| what | ours |", "| --- | --- |")
        for k in ("psnr", "codebook_usage", "perplexity", "parser_agreement", "edit_codes_kept"):
            self.add(f"| image tokenizer {k} | {_num(m.get(k))} |")
        for k, v in sorted(r.items()):
            if "recall" in k or "r1" in k or "r5" in k or "chance" in k:
                self.add(f"| retriever {k} | {_num(v)} |")
        self.add("")

    def table1(self) -> dict:
        rows = {k: self.ev(f"t2i_k{k}") for k in (0, 1, 2)}
        untrained = self.ev("t2i_untrained")
        self.add(
            "## Table 1 layout: zero-shot text-to-image",
            "",
            "Ours: shapes-world protocol, held-out prompts, FID on the evaluation CLIP's image features "
            "(FID-CLIP, not comparable with Inception FID); the paper: MS-COCO 30K, Inception FID.",
            "",
            "| source | model | retrieved docs | FID | CLIP score | attribute acc. | attribute acc. (strict) | n |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        )
        for row in TABLE1:
            self.add(
                f"| {SOURCE} | {row['model']} | {row['retrieve_k']} | {row['fid']:.2f} (Inception) | – | – | – | 30000 |"
            )
        for k, rec in rows.items():
            self._t2i_row(
                f"ours, pretrained (cfg_topp, CFG {(rec or {}).get('cfg_scale', '')})", k, rec
            )
        self._t2i_row("ours, untrained (baseline)", 0, untrained)
        self.add("")
        return {"rows": rows, "untrained": untrained}

    def _t2i_row(self, label: str, k: int, rec: dict | None) -> None:
        if rec is None:
            self.add(f"| ours | {label} | {k} | not run | | | | |")
            return
        self.add(
            f"| ours | {label} | {k} | {_num(rec.get('fid'))} {_ci(rec, 'fid')} | {_num(rec.get('clip_score'), 2)} | "
            f"{_num(rec.get('attr_acc'))} {_ci(rec, 'attr_acc')} | "
            f"{_num(rec.get('attr_acc_strict'))} {_ci(rec, 'attr_acc_strict')} | {rec.get('n')} |"
        )

    def decoding(self) -> dict:
        base, cfg1 = self.ev("t2i_k0"), self.ev("t2i_cfg1")
        n8 = self.ablation_run("cfg_topp", 8)
        self.add(
            "## Decoding: CFG and re-ranking (pretrained model, no retrieval)",
            "",
            "| setting | FID-CLIP | CLIP score | attribute acc. | attribute acc. (strict) | n |",
            "| --- | --- | --- | --- | --- | --- |",
        )
        for label, rec in (
            ("cfg_scale 1 (no guidance)", cfg1),
            ("cfg_scale 3", base),
            ("cfg_scale 3, 8 samples + CLIP re-rank (the ablation's run)", n8),
        ):
            if rec is None:
                self.add(f"| {label} | not run | | | | |")
            else:
                self.add(
                    f"| {label} | {_num(rec.get('fid'))} | {_num(rec.get('clip_score'), 2)} | "
                    f"{_num(rec.get('attr_acc'))} {_ci(rec, 'attr_acc')} | "
                    f"{_num(rec.get('attr_acc_strict'))} {_ci(rec, 'attr_acc_strict')} | "
                    f"{rec.get('n')} |"
                )
        self.add(
            "",
            "Attribute accuracy: the scene parser's colour/kind/size/position agreement of the "
            "prompt's shapes with their matched parsed shapes; strict: every parsed shape beyond "
            "the prompt's count counts as a wrong one (noise crowded with shape-like blobs scores "
            "well on the first, not on the second).",
        )
        self.add("")
        return {"cfg1": cfg1, "cfg3": base, "n8": n8}

    def perplexity(self) -> dict | None:
        rec = self.ev("perplexity")
        self.add(
            "## Held-out image-token perplexity",
            "",
            "| held-out images | model input | perplexity | 95% CI |",
            "| --- | --- | --- | --- |",
        )
        if rec is None:
            self.add("| not run | | | |", "")
            return None
        for prefix, label in (("ppl_image_", "scenes"), ("ppl_landmark_", "landmark views")):
            for key in sorted(k for k in rec if k.startswith(prefix)):
                self.add(
                    f"| {label} | {key.removeprefix(prefix)} | {_num(rec[key])} | {_ci(rec, key)} |"
                )
        self.add(
            "",
            "k<n>: pretrained decoder with n retrieved documents; own: the image's own document "
            "retrieved (the most retrieval could give: a decoder that copies from retrieved images "
            "nears 1); unigram: per-position code frequencies of the training shards. Scenes: captions describe every shape. Landmark "
            "views: captions name one of the world's landmarks (a fixed scene) and describe only "
            "the shape added to it, so the rest is knowledge: memorised, or read from a retrieved "
            "view of the same landmark.",
            "",
        )
        return rec

    def table2(self) -> dict:
        caps = {m: self.ev(f"captioning_{m}") for m in ("pretrain", "sft")}
        vqas = {m: self.ev(f"vqa_{m}") for m in ("pretrain", "sft")}
        self.add(
            "## Table 2 layout: image to text",
            "",
            "| source | model | CIDEr | caption attribute acc. | VQA acc. (%) |",
            "| --- | --- | --- | --- | --- |",
        )
        self.add(
            f"| {SOURCE} | {TABLE2['model']} (MS-COCO, VQA2) | {TABLE2['MS-COCO CIDEr']} | – | {TABLE2['VQA2 acc.']} |"
        )
        for m in ("pretrain", "sft"):
            c, v = caps[m] or {}, vqas[m] or {}
            self.add(
                f"| ours, shapes | {m} | {_num(c.get('CIDEr'))} | {_num(c.get('caption_attr_acc'))} | {_num(v.get('overall'), 2)} |"
            )
        c, v = caps["sft"] or {}, vqas["sft"] or {}
        self.add(
            f"| ours, shapes | baseline: most frequent caption / question-type prior | {_num(c.get('baseline_CIDEr'))} | "
            f"{_num(c.get('baseline_caption_attr_acc'))} | {_num(v.get('baseline_overall'), 2)} |",
            f"| ours, shapes | sft minus the baseline [paired 95% CI] | {_diff(c, 'CIDEr')} | "
            f"{_diff(c, 'caption_attr_acc')} | {_diff(v, 'overall', 2)} |",
        )
        notes: list[str] = []
        c = self.sft_versus_pretrain("captioning", notes)
        v = self.sft_versus_pretrain("vqa", notes, 100.0)
        self.add(
            f"| ours, shapes | sft minus pretrain [paired 95% CI] | {_diff(c, 'CIDEr')} | "
            f"{_diff(c, 'caption_attr_acc')} | {_diff(v, 'overall', 2)} |",
            "",
            "Paired: the same images and questions resampled for the model and its baseline (or "
            "the pretrained model, from both runs' item_scores.json); an interval above 0 is a "
            "clear win.",
            *notes,
            "",
        )
        return {"cap": caps, "vqa": vqas, "versus": {"cap": c, "vqa": v}}

    def sft_versus_pretrain(self, name: str, notes: list[str], scale: float = 1.0) -> dict | None:
        """``{difference_<key>: ..., ci95: {...}}``: the SFT model minus the pretrained one on the
        same items of ``eval/<name>_{sft,pretrain}`` (None when a run or its scores are absent;
        why they were not compared goes to ``notes``)."""
        from lit_cm3leon.evaluation.bootstrap import versus
        from lit_cm3leon.evaluation.metrics_io import ITEM_SCORES, InputError

        runs = [self.out / "eval" / f"{name}_{m}" / "run" for m in ("sft", "pretrain")]
        if not all((r / ITEM_SCORES).is_file() for r in runs):
            return None
        boot = (self.ev(f"{name}_sft") or {}).get("bootstrap") or {}
        try:
            points, ci = versus(*runs, boot.get("resamples", 1000), boot.get("seed", 0), scale)
        except InputError as e:
            notes.append(f"{name}: sft and pretrain not compared: {e}.")
            return None
        return {**points, "ci95": ci}

    def caption_reading(self) -> None:
        """Which caption words the decoders' image likelihood depends on (eval/caption_probe.py)."""
        recs = {m: self.ev(f"caption_probe_{m}") for m in ("pretrain", "sft")}
        changes = ("colour", "kind", "position", "background", "other_scene")
        self.add(
            "## What the decoder reads in a caption (shapes world)",
            "",
            "Extra nats over a held-out image's codes when its long caption has one thing wrong: "
            "the first shape's colour, kind or cell, the background, or another scene's caption. "
            "A decoder that ignores a word pays 0 for it (the baseline); 95% intervals over images.",
            "",
            "| model | " + " | ".join(c.replace("_", " ") for c in changes) + " | n |",
            "| --- | " + "--- | " * len(changes) + "--- |",
        )
        for m, rec in recs.items():
            if rec is None:
                self.add(f"| {m} | not run |" + " |" * len(changes))
                continue
            cells = [
                f"{_num(rec[f'delta_{c}'])} {_ci(rec, f'delta_{c}')}"
                if f"delta_{c}" in rec
                else "–"
                for c in changes
            ]
            self.add(f"| {m} | " + " | ".join(cells) + f" | {rec.get('n')} |")
        pre = recs["pretrain"] or {}
        background = pre.get("delta_background")
        if background is not None and background < UNREAD_BACKGROUND_NATS:
            self.add(
                "",
                f"The pretrained decoder hardly reads the caption (background "
                f"{_num(background)} nats; 2-5 in the runs that read it): whether a "
                "run starts reading it by the default steps varies with the seed (README: Results).",
            )
        self.add("")

    def image_tasks(self) -> dict:
        """Editing and spatially grounded generation after SFT, beside baselines and ceilings."""
        recs = {t: self.ev(f"{t}_sft") for t in ("edit", "spatial")}
        self.add(
            "## Image editing and spatially grounded generation (SFT, scene parser)",
            "",
            "| task | metric | SFT | 95% CI | baseline | SFT minus baseline [paired 95% CI] | ceiling: the true output through the image tokenizer | n |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        )
        rows = (
            ("edit", "success", "copy"), ("edit", "changed", "copy"), ("edit", "kept", "copy"),
            ("spatial", "placed", "chance"), ("spatial", "occupied", "chance"),
            ("spatial", "in_box", "chance"), ("spatial", "exact", "chance"),
        )  # fmt: skip
        for task, metric, base in rows:
            rec, key = recs[task], f"{task}_{metric}"
            if rec is None:
                self.add(f"| {task} | {metric} | not run | | | | | |")
                continue
            self.add(
                f"| {task} | {metric} | {_num(rec.get(key))} | {_ci(rec, key)} | "
                f"{_num(rec.get('baseline_' + key))} ({base}) | {_diff(rec, key)} | "
                f"{_num(rec.get('ceiling_' + key))} | {rec.get('n')} |"
            )
        edit = recs["edit"] or {}
        self.add(
            "",
            "Edit: success = the parsed output equals the target scene; changed = the requested "
            "attribute has its new value; kept = everything else unchanged. Baseline: the source "
            "image copied (keeps everything, never makes the change); copied through the image "
            f"tokenizer it scores success {_num(edit.get('copy_recon_edit_success'))}, changed "
            f"{_num(edit.get('copy_recon_edit_changed'))}, kept {_num(edit.get('copy_recon_edit_kept'))}. "
            "Spatial: placed = requested objects found in their box's grid cell with the requested "
            "colour and kind; occupied = box cells holding any shape; in_box = the output's shapes "
            "lying in a box cell (occupancy that crowding the image does not buy); baseline: the "
            "requested shapes in uniformly random distinct cells "
            "(exact expectation). Ceiling: the score of the true output's own codes, decoded by this "
            "image tokenizer (what a model that emits exactly the right codes would get).",
            "",
        )
        return recs

    def _grid(self, name: str, n: int = 24, cols: int = 8) -> Path | None:
        """A PNG grid of the first n samples of an eval run (written beside the report)."""
        from PIL import Image

        from lit_cm3leon.generate import save_grid

        files = sorted((self.out / "eval" / name / "run" / "samples").glob("*.png"))[:n]
        if not files:
            return None
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        rows = len(images) // cols
        if rows == 0:
            return None
        path = self.out / "figures" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images[: rows * cols].reshape(rows, cols, *images.shape[1:]), path)
        return path

    def figures(self) -> None:
        self.add("## Figures", "")
        for name, title in (
            ("t2i_k2", "Text to image, 2 retrieved documents"),
            ("t2i_k0", "Text to image, no retrieval"),
            ("t2i_untrained", "Untrained decoder (baseline)"),
        ):
            grid = self._grid(name)
            if grid is not None:
                prompts = _load(self.out / "eval" / name / "run" / "prompts.json") or {}
                first = "; ".join(list(prompts.values())[:3])
                self.add(
                    f"### {title}",
                    "",
                    f"![{title}]({grid.relative_to(self.out)})",
                    "",
                    f"First prompts (row-major): {first}" if first else "",
                    "",
                )
        plot = self.out / "eval" / "ablation" / "shapes" / "figure4.png"
        if plot.is_file():
            self.add(
                "### Decoding ablation (paper Figure 4 layout)",
                "",
                f"![ablation]({plot.relative_to(self.out)})",
                "",
            )
        self._sft_image_tasks()
        for m in ("pretrain", "sft"):
            preds = _load(self.out / "eval" / f"captioning_{m}" / "run" / "predictions.json")
            if preds:
                self.add(
                    f"### Captions ({m}, first held-out images)",
                    "",
                    *[f"- {p['caption']}" for p in preds[:6]],
                    "",
                )

    def _sft_image_tasks(self, n: int = 8, per_row: int = 4, scale: int = 3) -> None:
        """Figures of the SFT model's first ``n`` held-out edits ([source, output, target] each)
        and spatial prompts ([output, true scene] each), ``per_row`` items to a row, enlarged
        ``scale`` times (nearest neighbour), with their instructions and outcomes. The inputs and
        references are the world's own renders of the evaluation's items."""
        from PIL import Image

        from lit_cm3leon.evaluation.metrics_io import InputError
        from lit_cm3leon.evaluation.shapes_edit import edit_items
        from lit_cm3leon.evaluation.shapes_spatial import spatial_items
        from lit_cm3leon.evaluation.world import outputs_world
        from lit_cm3leon.generate import save_grid

        try:
            world = outputs_world(self.out)
        except InputError:
            return  # the evaluations refused this folder already; nothing of theirs to show
        for name, title, text_key, score in (
            ("edit_sft", "Edits (sft): source, output, target", "instruction", "success"),
            (
                "spatial_sft",
                "Spatially grounded generation (sft): output, true scene",
                "prompt",
                "placed",
            ),
        ):
            run = self.out / "eval" / name / "run"
            records = (_load(run / "items.json") or [])[:n]
            files = sorted((run / "samples").glob("*.png"))[: len(records)]
            if len(files) < per_row or len(records) < per_row:
                continue
            k = len(files) // per_row * per_row
            outputs = [np.asarray(Image.open(f).convert("RGB")) for f in files[:k]]
            if name == "edit_sft":
                refs = edit_items(k, world)
                cells = [
                    [e.before_image, o, e.after_image] for e, o in zip(refs, outputs, strict=True)
                ]
            else:
                refs = spatial_items(k, world)
                cells = [[o, world.render(it.scene)] for it, o in zip(refs, outputs, strict=True)]
            if any(c[-1].shape != outputs[0].shape for c in cells):
                continue  # samples from another image size than this world's
            grid = np.asarray(cells).reshape(
                k // per_row, per_row * len(cells[0]), *outputs[0].shape
            )
            path = self.out / "figures" / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_grid(grid.repeat(scale, 2).repeat(scale, 3), path)
            self.add(
                f"### {title}",
                "",
                f"![{title}]({path.relative_to(self.out)})",
                "",
                *[
                    f"{i + 1}. `{r[text_key]}`: {score} {r[score]:.2f}"
                    for i, r in enumerate(records[:k])
                ],
                "",
            )

    def _ablation_rows(self) -> list[dict]:
        import csv

        path = self.out / "eval" / "ablation" / "shapes" / "figure4.csv"
        return [r for r in csv.DictReader(path.open()) if r["fid"]] if path.is_file() else []

    def ablation_run(self, strategy: str, num_samples: int) -> dict | None:
        """metrics.json of the ablation's run of the ``shapes`` model with ``num_samples``
        CLIP-re-ranked samples of ``strategy`` (its folder under ``eval/t2i/``)."""
        for r in self._ablation_rows():
            if (r["panel"], r["size"], r["strategy"], int(r["num_samples"])) == (
                "samples",
                "shapes",
                strategy,
                num_samples,
            ):
                return _load(self.out / "eval" / "t2i" / Path(r["run_dir"]).name / "metrics.json")
        return None

    def ablation_findings(self) -> tuple[bool | None, str, bool | None, str]:
        rows = self._ablation_rows()
        if not rows:
            return None, "", None, ""
        best: dict[str, tuple[float, float]] = {}
        scales = sorted({float(r["cfg_scale"]) for r in rows if r["panel"] == "cfg"})
        for r in rows:
            if r["panel"] == "cfg":
                key = (float(r["fid"]), float(r["cfg_scale"]))
                best[r["size"]] = min(best.get(r["size"], key), key)
        steps = [scales.index(v[1]) for v in best.values()]
        ok2 = (max(steps) - min(steps) <= 1) if len(best) > 1 else None
        d2 = "best CFG scale " + ", ".join(
            f"{k}: {v[1]:g} (FID-CLIP {v[0]:.3f})" for k, v in best.items()
        )
        gains = {}
        for strategy in sorted({r["strategy"] for r in rows if r["panel"] == "samples"}):
            pts = sorted(
                (int(r["num_samples"]), float(r["fid"]))
                for r in rows
                if r["panel"] == "samples" and r["strategy"] == strategy
            )
            if len(pts) >= 2:
                gains[strategy] = (pts[-2][1] - pts[-1][1], pts)
        ok3 = None
        if {"mixed", "cfg_topp", "cdk"} <= set(gains):
            ok3 = gains["mixed"][0] > max(gains["cfg_topp"][0], gains["cdk"][0])
        d3 = "; ".join(
            f"{s}: " + " -> ".join(f"{f:.3f}" for _, f in g[1]) for s, g in gains.items()
        )
        return ok2, d2, ok3, ("FID-CLIP by samples " + d3) if d3 else ""

    def findings(self, t1: dict, dec: dict, ppl: dict | None, t2: dict) -> None:
        self.add("## The paper's findings on the shapes world", "")

        def verdict(ok: bool | None) -> str:
            return "not run" if ok is None else ("**reproduced**" if ok else "**not reproduced**")

        fids = [(r or {}).get("fid") for r in t1["rows"].values()]
        ok1 = None if None in fids else fids[0] > fids[1] > fids[2]
        ppl_note = ""
        if ppl:
            ppl_note = f"; image perplexity k0 {_num(ppl.get('ppl_image_k0'))}, k2 {_num(ppl.get('ppl_image_k2'))}"
            if "ppl_landmark_k0" in ppl:
                ppl_note += (
                    f" (landmark views: k0 {_num(ppl.get('ppl_landmark_k0'))}, "
                    f"k2 {_num(ppl.get('ppl_landmark_k2'))})"
                )
        self.add(
            f"1. Retrieval lowers FID (0 -> 1 -> 2 documents): {verdict(ok1)}: FID-CLIP {', '.join(_num(f) for f in fids)}{ppl_note}."
        )
        if ppl and "ppl_landmark_k0" in ppl:
            k0, k2, own = (ppl.get(f"ppl_landmark_{k}") for k in ("k0", "k2", "own"))
            self.add(
                f"1b. Retrieval lowers held-out image perplexity where the caption leaves the "
                f"image to knowledge (landmark views, 2 retrieved documents vs none): "
                f"{verdict(k2 < k0)}: k0 {_num(k0)}, k2 {_num(k2)}, own document {_num(own)}."
            )
        ok2, d2, ok3, d3 = self.ablation_findings()
        self.add(
            f"2. The best CFG scale is about the same across model sizes (at most one grid step apart): {verdict(ok2)}: {d2}."
        )
        self.add(
            f"3. The mixed strategy keeps improving with more samples where cfg_topp and cdk flatten "
            f"(its last doubling gains more than theirs): {verdict(ok3)}: {d3}."
        )
        cp, cs = (t2["cap"]["pretrain"] or {}).get("CIDEr"), (t2["cap"]["sft"] or {}).get("CIDEr")
        vp, vs = (
            (t2["vqa"]["pretrain"] or {}).get("overall"),
            (t2["vqa"]["sft"] or {}).get("overall"),
        )
        ok4 = None if None in (cp, cs, vp, vs) else (cs > cp and vs > vp)
        vc, vv = t2["versus"]["cap"], t2["versus"]["vqa"]
        paired = ""
        if vc and vv and ok4 is not None:  # with both runs' items: a clear win, paired
            lows = (vc["ci95"]["difference_CIDEr"][0], vv["ci95"]["difference_overall"][0])
            ok4 = ok4 and min(lows) > 0
            paired = (
                f" (paired differences {_diff(vc, 'CIDEr')} and {_diff(vv, 'overall', 2)}, "
                "reproduced when both intervals are above 0)"
            )
        self.add(
            f"4. SFT lifts VQA and captioning over the pretrained model: {verdict(ok4)}: CIDEr {_num(cp)} -> {_num(cs)}, "
            f"VQA {_num(vp, 2)} -> {_num(vs, 2)}{paired}.",
            "",
        )

    def build(self) -> str:
        self.add(
            "# lit_cm3leon report: the shapes world",
            "",
            "Made by `python -m lit_cm3leon.report` from the files under outputs/. Paper figures are labelled "
            f'"{SOURCE}"; every other number comes from this run.',
            "",
        )
        self.stages()
        self.tokenizers()
        t1 = self.table1()
        dec = self.decoding()
        ppl = self.perplexity()
        t2 = self.table2()
        self.image_tasks()
        self.caption_reading()
        self.findings(t1, dec, ppl, t2)
        self.figures()
        return "\n".join(self.lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--outputs", default="outputs", help="the pipeline's outputs/ folder")
    args = ap.parse_args(argv)
    out = Path(args.outputs)
    text = Report(out).build()
    (out / "report.md").write_text(text)
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
