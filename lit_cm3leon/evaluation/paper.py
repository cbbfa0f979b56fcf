"""The paper's figures (CM3Leon, Yu et al. 2023, arXiv 2309.02591) and the tables that print
them beside ours, labelled.

Only figures we could check against more than one account of the paper are listed; a figure
we could not verify is left out rather than guessed (e.g. the 350M/760M rows of Table 1 and the
baselines of other papers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

SOURCE = "paper (CM3Leon, arXiv 2309.02591)"

# Table 1: zero-shot MS-COCO (30K prompts) FID of CM3Leon-7B by retrieved documents at inference.
TABLE1 = (
    {"model": "CM3Leon-7B", "retrieve_k": 0, "fid": 10.82},
    {"model": "CM3Leon-7B", "retrieve_k": 1, "fid": 5.78},
    {"model": "CM3Leon-7B", "retrieve_k": 2, "fid": 4.88},
)

# Table 2: zero-shot image-to-text results of the SFT model (CIDEr x 100; VQA accuracy in %).
TABLE2_COLUMNS = (  # (column title, protocol keyword, metric key)
    ("MS-COCO CIDEr", "coco", "CIDEr"),
    ("VQA2 acc.", "vqa2", "overall"),
    ("VizWiz acc.", "vizwiz", "overall"),
    ("OKVQA acc.", "okvqa", "overall"),
)
TABLE2 = {
    "model": "SFT-CM3Leon-7B",
    "MS-COCO CIDEr": 61.6,
    "VQA2 acc.": 47.6,
    "VizWiz acc.": 37.6,
    "OKVQA acc.": 23.8,
}


# Row labels of the baselines that `eval/captioning.py --ckpt` / `eval/vqa.py --ckpt` score.
BASELINE_LABELS = {
    "CIDEr": "baseline: most frequent training caption",
    "overall": "baseline: question-only answer prior",
}


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ci(pair: Any, scale: float = 1.0, digits: int = 2) -> str:
    if not pair or len(pair) != 2:
        return "–"
    return f"[{pair[0] * scale:.{digits}f}, {pair[1] * scale:.{digits}f}]"


def _run_label(rec: Mapping[str, Any]) -> str:
    name = str(rec.get("ckpt") or "(no checkpoint recorded)")
    bits = [
        f"{k}={rec[k]}" for k in ("strategy", "cfg_scale", "num_samples") if rec.get(k) is not None
    ]
    return name + (f" ({', '.join(bits)})" if bits else "")


def table1_markdown(records: Iterable[Mapping[str, Any]]) -> str:
    """Table 1 layout (zero-shot FID): the paper's CM3Leon-7B rows, then ours, one per
    metrics.json. Our FID on other features is labelled with its features (FID-CLIP)."""
    lines = [
        "Table 1: zero-shot text-to-image FID (lower is better)",
        "",
        "| source | model / checkpoint | protocol | retrieved docs | metric | value | 95% CI | n |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in TABLE1:
        lines.append(
            f"| {SOURCE} | {row['model']} | MS-COCO 30K | {row['retrieve_k']} | FID | {row['fid']:.2f} | – | 30000 |"
        )
    for rec in records:
        metric = rec.get("metric") or (
            "FID" if rec.get("features") == "inception" else f"FID-{rec.get('features')}"
        )
        lines.append(
            f"| ours | {_run_label(rec)} | {rec['protocol']} | {_fmt(rec.get('retrieve_k'))} | {metric} | "
            f"{_fmt(rec['fid'])} | {_ci(rec.get('ci95', {}).get('fid'))} | {rec.get('n')} |"
        )
    lines += [
        "",
        "FID-CLIP uses the evaluation CLIP's image features and is not comparable with Inception FID.",
    ]
    return "\n".join(lines)


def _table2_column(rec: Mapping[str, Any]) -> tuple[str, str, float] | None:
    """(column title, metric key, display scale) of one of our metrics files, None if neither
    captioning nor VQA."""
    protocol = str(rec.get("protocol", "")).lower()
    kind = "CIDEr" if "CIDEr" in rec else ("overall" if "overall" in rec else None)
    if kind is None:
        return None
    for title, keyword, key in TABLE2_COLUMNS:
        if key == kind and keyword in protocol:
            return title, key, 100.0 if key == "CIDEr" else 1.0
    if kind == "CIDEr":
        return f"{rec['protocol']} CIDEr", "CIDEr", 100.0
    return f"{rec['protocol']} acc.", "overall", 1.0


def table2_markdown(records: Iterable[Mapping[str, Any]]) -> str:
    """Table 2 layout (captioning / VQA after SFT): the paper's SFT-CM3Leon-7B row, then one row
    per checkpoint of ours; CIDEr shown x 100 as the paper prints it."""
    columns = [c[0] for c in TABLE2_COLUMNS]
    ours: dict[str, dict[str, str]] = {}
    for rec in records:
        col = _table2_column(rec)
        if col is None:
            continue
        title, key, scale = col
        if title not in columns:
            columns.append(title)
        ci = _ci(rec.get("ci95", {}).get(key), scale, 1)
        cell = f"{rec[key] * scale:.1f} {ci}" if ci != "–" else f"{rec[key] * scale:.1f}"
        ours.setdefault(_run_label(rec), {})[title] = cell
        if f"baseline_{key}" in rec:  # the honest baseline scored in the same run (shapes --ckpt)
            bci = _ci(rec.get("ci95", {}).get(f"baseline_{key}"), scale, 1)
            bval = rec[f"baseline_{key}"] * scale
            ours.setdefault(BASELINE_LABELS[key], {})[title] = (
                f"{bval:.1f} {bci}" if bci != "–" else f"{bval:.1f}"
            )
    lines = [
        "Table 2: image-to-text after SFT (CIDEr x 100, VQA accuracy %; our 95% CI in brackets)",
        "",
        "| source | model / checkpoint | " + " | ".join(columns) + " |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " |",
        f"| {SOURCE} | {TABLE2['model']} | "
        + " | ".join(_fmt(TABLE2.get(c), 1) for c in columns)
        + " |",
    ]
    for label, cells in ours.items():
        lines.append(f"| ours | {label} | " + " | ".join(cells.get(c, "–") for c in columns) + " |")
    return "\n".join(lines)
