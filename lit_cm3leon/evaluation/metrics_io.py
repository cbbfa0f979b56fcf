"""The `metrics.json` written by every evaluation, and the reading of its inputs.

Every file holds the run header (`protocol, seed, ckpt, strategy, cfg_scale, num_samples,
retrieve_k, n`), the metric keys, `ci95` (a bootstrap 95% interval per metric, same nesting as
the metric) and `bootstrap` (how the intervals were made). A table can then say which protocol
and which decoding settings produced each number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HEADER_KEYS = (
    "protocol",
    "seed",
    "ckpt",
    "strategy",
    "cfg_scale",
    "num_samples",
    "retrieve_k",
    "n",
)


class InputError(ValueError):
    """An input file is missing, malformed or does not match its reference set."""


def load_json(path: str | Path, what: str) -> Any:
    """Read a JSON file; a missing or malformed file is an `InputError` naming it, the line and column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what}: no such file {path}")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"{what}: {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None


def run_header(
    protocol: str,
    seed: int,
    n: int,
    ckpt: str | None = None,
    strategy: str | None = None,
    cfg_scale: float | None = None,
    num_samples: int | None = None,
    retrieve_k: int | None = None,
) -> dict[str, Any]:
    """The keys every metrics.json carries. Scoring an existing predictions file has no
    checkpoint or decoding settings: those stay null."""
    return {
        "protocol": protocol,
        "seed": seed,
        "ckpt": ckpt,
        "strategy": strategy,
        "cfg_scale": cfg_scale,
        "num_samples": num_samples,
        "retrieve_k": retrieve_k,
        "n": n,
    }


def add_run_args(parser: argparse.ArgumentParser, protocol: str, out_required: bool = True) -> None:
    """The flags shared by every eval script (same names as the Hydra keys, kebab-case).
    ``out_required=False`` for scripts that can name their own metrics.json (``--ckpt`` runs)."""
    g = parser.add_argument_group("run header (recorded in metrics.json)")
    g.add_argument(
        "--protocol",
        default=protocol,
        help=f"protocol name recorded in metrics.json (default {protocol})",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="run seed; also seeds the bootstrap resampling"
    )
    g.add_argument(
        "--ckpt",
        default=None,
        help="checkpoint that produced the predictions (recorded); scripts with a --ckpt mode generate from it when no predictions are given",
    )
    g.add_argument(
        "--strategy",
        default=None,
        help="decoding strategy of the predictions (recorded; coco_fid.py --ckpt: used, default cfg_topp)",
    )
    g.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="CFG scale (recorded; coco_fid.py --ckpt: used, default 3)",
    )
    g.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="samples per prompt (recorded; coco_fid.py --ckpt: used, default 1)",
    )
    g.add_argument(
        "--retrieve-k",
        type=int,
        default=None,
        help="retrieved documents per prompt (recorded; coco_fid.py --ckpt: used, default 0)",
    )
    g.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for the 95%% intervals (0: none)",
    )
    g.add_argument(
        "--out",
        required=out_required,
        help="metrics.json to write"
        + ("" if out_required else " (with --ckpt: default inside the run folder)"),
    )
    g.add_argument("--force", action="store_true", help="overwrite an existing --out")


def header_from_args(args: argparse.Namespace, n: int) -> dict[str, Any]:
    return run_header(
        protocol=args.protocol,
        seed=args.seed,
        n=n,
        ckpt=args.ckpt,
        strategy=args.strategy,
        cfg_scale=args.cfg_scale,
        num_samples=args.num_samples,
        retrieve_k=args.retrieve_k,
    )


def ckpt_run_out(
    parser: argparse.ArgumentParser, args: argparse.Namespace, ckpt: str
) -> Path | None:
    """The checked ``--out`` of a script that scores a checkpoint: ``--ckpt`` is required (a
    usage error naming ``ckpt``, e.g. "a published decoder, e.g. outputs/pretrain"), and a
    finished ``--out`` is kept unless ``--force``. None after printing why (the script exits 2)."""
    if not args.ckpt:
        parser.error(f"--ckpt is required ({ckpt})")
    try:
        return check_out(args.out, args.force)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def print_metrics(
    record: Mapping[str, Any], ci95: Mapping[str, Any], skip: Sequence[str] = ()
) -> None:
    """One line per float metric of a written record, with its 95% interval."""
    for k, v in record.items():
        if isinstance(v, float) and k not in (*HEADER_KEYS, *skip):
            print(f"{k}: {v:.4f}  95% CI {ci95.get(k, '-')}")


def check_out(path: str | Path, force: bool) -> Path:
    """Refuse to overwrite a finished run unless asked; checked before any heavy work."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError(
            f"{path} exists (a finished run); pass --force to overwrite it or choose another --out"
        )
    return path


def write_metrics(
    path: str | Path,
    header: dict[str, Any],
    metrics: dict[str, Any],
    ci95: dict[str, Any],
    bootstrap: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write metrics.json atomically (tmp file + rename) and return the written dict."""
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise ValueError(f"run header lacks {missing}")
    clash = set(metrics) & (set(HEADER_KEYS) | {"ci95", "bootstrap"})
    if clash:
        raise ValueError(f"metric names clash with reserved keys: {sorted(clash)}")
    record = {
        **{k: header[k] for k in HEADER_KEYS},
        **metrics,
        "ci95": ci95,
        "bootstrap": bootstrap,
    }
    if extra:
        record.update(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return record


def copy_metrics(src: str | Path, dst: str | Path | None) -> None:
    """Copy a written metrics file to the caller's ``--out`` path (nothing when ``dst`` is None)."""
    if dst:
        import shutil

        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Load a metrics.json and check it has the run header."""
    record = load_json(path, "metrics")
    if not isinstance(record, dict):
        raise InputError(f"{path}: a metrics.json is a JSON object, got {type(record).__name__}")
    missing = [k for k in HEADER_KEYS if k not in record]
    if missing:
        raise InputError(f"{path}: not a metrics.json of this suite (missing {missing})")
    return record


def check_predictions(
    predictions: Mapping[Any, Any], expected_ids: Sequence[Any], id_name: str = "question_id"
) -> None:
    """Predictions must cover exactly `expected_ids`; name the first unknown or missing id."""
    expected = set(expected_ids)
    for pid in predictions:
        if pid not in expected:
            raise InputError(f"prediction for unknown {id_name} {pid!r} (not in the annotations)")
    for eid in expected_ids:
        if eid not in predictions:
            raise InputError(
                f"no prediction for {id_name} {eid!r} (every annotated {id_name} needs one)"
            )


def read_results(path: str | Path, id_key: str, value_key: str) -> dict[Any, Any]:
    """Read an official results file `[{id_key: ..., value_key: ...}, ...]` into {id: value};
    a malformed entry or a repeated id is an `InputError` naming the entry's index and id."""
    data = load_json(path, "predictions")
    if not isinstance(data, list):
        raise InputError(
            f"predictions: {path} must be a JSON list of {{{id_key!r}, {value_key!r}}} objects, got {type(data).__name__}"
        )
    out: dict[Any, Any] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or id_key not in entry or value_key not in entry:
            raise InputError(
                f"predictions: {path} entry {i} ({str(entry)[:80]}) lacks {id_key!r} or {value_key!r}"
            )
        if not isinstance(entry[value_key], str):
            raise InputError(
                f"predictions: {path} entry {i} ({id_key} {entry[id_key]!r}): {value_key!r} must be a string"
            )
        if entry[id_key] in out:
            raise InputError(f"predictions: {path} entry {i} repeats {id_key} {entry[id_key]!r}")
        out[entry[id_key]] = entry[value_key]
    return out


ITEM_SCORES = "item_scores.json"  # a run folder's per-item scores, for comparing two models


def write_item_scores(folder: str | Path, ids: Sequence[Any], scores: Mapping[str, Any]) -> Path:
    """``<folder>/item_scores.json``: ``{"ids": [...], "scores": {key: [one per id]}}``, the
    per-item scores of one model's run, so that two runs over the same items can be compared
    pairwise (:func:`lit_cm3leon.evaluation.bootstrap.versus`)."""
    ids = [i.item() if hasattr(i, "item") else i for i in ids]  # numpy scalars as JSON numbers
    out = {"ids": ids, "scores": {}}
    for key, values in scores.items():
        values = [float(v) for v in values]
        if len(values) != len(ids):
            raise ValueError(f"{key}: {len(values)} scores for {len(ids)} items")
        out["scores"][key] = values
    path = Path(folder) / ITEM_SCORES
    path.write_text(json.dumps(out))
    return path


def read_item_scores(folder: str | Path) -> tuple[list, dict[str, list[float]]]:
    """``(ids, {key: scores})`` of a run folder (:func:`write_item_scores`)."""
    data = load_json(Path(folder) / ITEM_SCORES, "per-item scores")
    if not isinstance(data, dict) or not isinstance(data.get("scores"), dict) or "ids" not in data:
        raise InputError(
            f"{Path(folder) / ITEM_SCORES}: expected {{'ids': [...], 'scores': {{...}}}}"
        )
    return data["ids"], data["scores"]
