"""Read pre-tokenized shards (written by ``python -m lit_cm3leon.prepare tokenize``).

Layout of a shard folder::

    manifest.json            image tokenizer, h, w, n_codes, count, bad-record counts
    shard-00000.npz          codes int16[N, h, w], doc_id int64[N]   (np.savez, no pickle)
    shard-00000.jsonl        one JSON record per line: doc_id, text, source metadata
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LAYOUT = (
    "a folder with manifest.json and shard-NNNNN.npz (codes int16[N,h,w], doc_id int64[N]) "
    "+ shard-NNNNN.jsonl (doc_id, text) files, written by `python -m lit_cm3leon.prepare tokenize`"
)


class TokenShards:
    """All records of a shard folder in memory: image codes, texts and metadata by row."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"no pre-tokenized shards at {self.root}: expected {LAYOUT}")
        self.manifest = json.loads(manifest.read_text())
        codes, doc_ids, records = [], [], []
        for npz in sorted(self.root.glob("shard-*.npz")):
            with np.load(npz, allow_pickle=False) as z:
                codes.append(z["codes"].astype(np.int64))
                doc_ids.append(z["doc_id"].astype(np.int64))
            lines = npz.with_suffix(".jsonl").read_text().splitlines()
            recs = [json.loads(line) for line in lines if line.strip()]
            if len(recs) != len(doc_ids[-1]):
                raise ValueError(f"{npz} has {len(doc_ids[-1])} rows but its .jsonl has {len(recs)} records")
            records.extend(recs)
        if not codes:
            raise FileNotFoundError(f"{self.root} has a manifest but no shard-*.npz: expected {LAYOUT}")
        self.codes = np.concatenate(codes)  # [N, h, w]
        self.doc_ids = np.concatenate(doc_ids)  # [N]
        self.records = records
        self.row_of = {int(d): i for i, d in enumerate(self.doc_ids)}

    def __len__(self) -> int:
        return len(self.doc_ids)

    def text(self, row: int) -> str:
        return self.records[row]["text"]
