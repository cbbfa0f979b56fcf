"""Read pre-tokenized shards (written by ``python -m lit_cm3leon.prepare tokenize``).

Layout of a shard folder::

    manifest.json            image tokenizer, h, w, n_codes, count, bad-record counts
    shard-00000.npz          codes int16[N, h, w], doc_id int64[N]   (np.savez, no pickle)
    shard-00000.jsonl        one JSON record per line: doc_id, text, source metadata
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LAYOUT = (
    "a folder with manifest.json and shard-NNNNN.npz (codes int16[N,h,w], doc_id int64[N]) "
    "+ shard-NNNNN.jsonl (doc_id, text) files, written by `python -m lit_cm3leon.prepare tokenize`"
)


def shapes_world_kwargs(source: dict) -> dict:
    """``ShapesWorld`` arguments of shapes-world shards, from their manifest's ``source`` block
    (what ``prepare tokenize`` was given): records are re-rendered from this world. Shards
    written before ``--cell-align`` existed have none in their manifest; they were made with the
    largest cells that fit, which is ``cell_align=1``."""
    return {
        "image_size": source.get("image_size", 32),
        "seed": source.get("world_seed", 0),
        "cell_align": source.get("cell_align", 1),
    }


def shapes_record_sample(world, rec: dict):
    """The ``ShapesSample`` a shapes-world shard record was made from (a landmark view when the
    record has ``landmarks``), re-rendered by ``world``."""
    split, index = rec.get("split", "train"), int(rec["index"])
    if rec.get("landmarks"):
        return world.landmark_sample(split, index, int(rec["landmarks"]))
    return world.sample(split, index)


def shapes_scene(world, rec: dict):
    """The ``Scene`` of a shapes-world scene record, ``None`` for a landmark view (a named scene
    plus a shape) or a record without an index."""
    if rec.get("landmarks") or "index" not in rec:
        return None
    return world.scene(rec.get("split", "train"), int(rec["index"]))


class TokenShards:
    """All records of a shard folder in memory: image codes, texts and metadata by row.

    Unreadable data is skipped and counted, not fatal: a truncated or corrupt ``.npz`` drops its
    shard, a malformed ``.jsonl`` line drops the row with its ``doc_id``, codes outside
    ``[0, n_codes)`` or of the wrong grid drop their row. ``bad_files`` maps each file to its
    dropped rows and ``errors`` to the first reason; when more than ``max_bad_fraction`` of all
    rows are dropped, loading stops with a message naming the worst files.
    """

    def __init__(self, root: str | Path, max_bad_fraction: float = 0.01) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"no pre-tokenized shards at {self.root}: expected {LAYOUT}")
        self.manifest = json.loads(manifest.read_text())
        self.bad_files: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        codes, doc_ids, records = [], [], []
        npzs = sorted(self.root.glob("shard-*.npz"))
        for npz in npzs:
            kept = self._read_shard(npz)
            if kept is not None:
                codes.append(kept[0])
                doc_ids.append(kept[1])
                records.extend(kept[2])
        if not npzs:
            raise FileNotFoundError(
                f"{self.root} has a manifest but no shard-*.npz: expected {LAYOUT}"
            )
        n_good = sum(len(d) for d in doc_ids)
        self.bad_records = sum(self.bad_files.values())
        total = n_good + self.bad_records
        if self.bad_records:
            worst = sorted(self.bad_files.items(), key=lambda kv: -kv[1])[:5]
            detail = "; ".join(f"{name}: {n} rows ({self.errors[name]})" for name, n in worst)
            if not n_good or self.bad_records > max_bad_fraction * total:
                raise ValueError(
                    f"{self.root}: {self.bad_records} of {total} records are unreadable, more than "
                    f"max_bad_fraction={max_bad_fraction}. Worst files: {detail}. Rewrite them with "
                    "`python -m lit_cm3leon.prepare tokenize`, delete them, or raise data.max_bad_fraction"
                )
            log.warning(
                "%s: skipped %d of %d unreadable records: %s",
                self.root,
                self.bad_records,
                total,
                detail,
            )
        self.codes = np.concatenate(codes)  # [N, h, w]
        self.doc_ids = np.concatenate(doc_ids)  # [N]
        self.records = records
        self.row_of = {int(d): i for i, d in enumerate(self.doc_ids)}

    def _bad(self, name: str, n: int, reason: str) -> None:
        if n > 0:
            self.bad_files[name] = self.bad_files.get(name, 0) + n
            self.errors.setdefault(name, reason)

    def _read_records(self, jsonl: Path) -> tuple[dict[int, dict], int]:
        """doc_id -> record of the well-formed lines, and the number of non-empty lines."""
        by_id: dict[int, dict] = {}
        n_lines = 0
        reason = None
        for k, line in enumerate(jsonl.read_text(errors="replace").splitlines()):
            if not line.strip():
                continue
            n_lines += 1
            try:
                rec = json.loads(line)
                doc_id = rec["doc_id"]
                if (
                    not isinstance(rec["text"], str)
                    or isinstance(doc_id, bool)
                    or not isinstance(doc_id, int)
                ):
                    raise TypeError("doc_id must be an int and text a string")
            except (ValueError, KeyError, TypeError) as err:
                reason = reason or f"line {k + 1}: {type(err).__name__}: {err}"
                continue
            by_id.setdefault(doc_id, rec)
        self._jsonl_reason = reason
        return by_id, n_lines

    def _read_shard(self, npz: Path) -> tuple[np.ndarray, np.ndarray, list[dict]] | None:
        jsonl = npz.with_suffix(".jsonl")
        try:
            by_id, n_lines = self._read_records(jsonl)
        except OSError as err:
            by_id, n_lines, self._jsonl_reason = {}, 0, f"{jsonl.name} unreadable: {err}"
        try:
            with np.load(npz, allow_pickle=False) as z:
                codes = np.asarray(z["codes"]).astype(np.int64)
                doc_id = np.asarray(z["doc_id"]).astype(np.int64)
            if codes.ndim != 3 or doc_id.ndim != 1 or len(codes) != len(doc_id):
                raise ValueError(
                    f"codes {codes.shape} and doc_id {doc_id.shape} do not form [N,h,w] + [N]"
                )
            h, w = self.manifest.get("h"), self.manifest.get("w")
            if h and w and codes.shape[1:] != (h, w):
                raise ValueError(f"codes grid {codes.shape[1:]} but manifest.json says {(h, w)}")
        except (
            Exception
        ) as err:  # truncated zip, bad header, missing array: the whole shard is lost
            self._bad(npz.name, max(n_lines, 1), f"unreadable: {type(err).__name__}: {err}")
            return None
        keep = np.array([int(d) in by_id for d in doc_id], dtype=bool)
        if not keep.all():
            reason = self._jsonl_reason or f"doc_ids without a record in {jsonl.name}"
            self._bad(npz.name, int((~keep).sum()), f"{jsonl.name} {reason}")
        n_codes = self.manifest.get("n_codes")
        if n_codes:
            in_range = ((codes >= 0) & (codes < n_codes)).all(axis=(1, 2))
            if (keep & ~in_range).any():
                self._bad(
                    npz.name, int((keep & ~in_range).sum()), f"image codes outside [0, {n_codes})"
                )
            keep &= in_range
        return codes[keep], doc_id[keep], [by_id[int(d)] for d in doc_id[keep]]

    def __len__(self) -> int:
        return len(self.doc_ids)

    def text(self, row: int) -> str:
        return self.records[row]["text"]

    def shapes_world(self):
        """The ``ShapesWorld`` these shards were made from, ``None`` for other sources."""
        from lit_cm3leon.data.shapes import ShapesWorld

        source = self.manifest.get("source", {})
        if source.get("source") != "shapes":
            return None
        return ShapesWorld(**shapes_world_kwargs(source))
