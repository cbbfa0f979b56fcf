"""Bad data in pre-tokenized shards: skipped and counted, and too much of it stops the run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lit_cm3leon.data.shards import TokenShards
from lit_cm3leon.fit import train
from tests.fixtures import make_text_tokenizer, make_token_shards, tiny_pretrain_overrides


def damage(root):
    """shard-00001.npz truncated (20 rows), one malformed line and one line without text in
    shard-00000.jsonl, one row of out-of-range codes in shard-00002.npz."""
    npz = root / "shard-00001.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    jsonl = root / "shard-00000.jsonl"
    lines = jsonl.read_text().splitlines()
    lines[3] = lines[3][:-7]  # cut mid-record
    rec = json.loads(lines[5])
    del rec["text"]
    lines[5] = json.dumps(rec)
    jsonl.write_text("\n".join(lines) + "\n")
    with np.load(root / "shard-00002.npz") as z:
        codes, doc_id = z["codes"].copy(), z["doc_id"].copy()
    codes[0, 0, 0] = 999
    np.savez(root / "shard-00002.npz", codes=codes, doc_id=doc_id)


def test_bad_records_are_skipped_and_counted(tmp_path):
    root = make_token_shards(tmp_path / "shards", 60, per_shard=20)
    clean = TokenShards(root)
    assert clean.bad_records == 0 and len(clean) == 60
    damage(root)
    shards = TokenShards(root, max_bad_fraction=0.5)
    assert shards.bad_files == {"shard-00001.npz": 20, "shard-00000.npz": 2, "shard-00002.npz": 1}
    assert shards.bad_records == 23 and len(shards) == 37
    assert "unreadable" in shards.errors["shard-00001.npz"]
    assert "line 4" in shards.errors["shard-00000.npz"]
    assert "outside [0, 16)" in shards.errors["shard-00002.npz"]
    kept = set(shards.doc_ids.tolist())
    assert kept == set(range(60)) - set(range(20, 40)) - {3, 5, 40}
    for row in range(len(shards)):  # texts stay aligned with their codes
        d = int(shards.doc_ids[row])
        assert shards.records[row]["doc_id"] == d
        assert np.array_equal(shards.codes[row], clean.codes[clean.row_of[d]])
        assert shards.text(row) == clean.text(clean.row_of[d])


def test_too_many_bad_records_stop_with_the_worst_files(tmp_path):
    root = make_token_shards(tmp_path / "shards", 60, per_shard=20)
    damage(root)
    with pytest.raises(
        ValueError,
        match=r"23 of 60 records.*max_bad_fraction=0.1.*Worst files: shard-00001.npz: 20 rows",
    ):
        TokenShards(root, max_bad_fraction=0.1)


def test_fit_stops_on_bad_shards_naming_the_setting(compose, tmp_path):
    out = tmp_path / "outputs"
    make_text_tokenizer(out / "text_tokenizer")
    damage(make_token_shards(out / "tokens" / "shapes-train", 60, per_shard=20))
    make_token_shards(out / "tokens" / "shapes-heldout", 8, seed=1)
    args = tiny_pretrain_overrides(2)
    with pytest.raises(ValueError, match=r"shard-00001.npz.*raise data.max_bad_fraction"):
        train(compose(args))
    train(compose([*args, "data.max_bad_fraction=0.5"]))  # tolerated: trains on the 37 good rows
    assert (out / "pretrain" / "model.pt").is_file()
