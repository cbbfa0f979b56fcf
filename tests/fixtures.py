"""Small artifacts in the suite's real formats, written by the tests themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = ["red", "green", "blue", "circle", "square", "triangle", "a", "and", "small", "large"]


def make_token_shards(root: Path, n: int, hw: int = 4, n_codes: int = 16, seed: int = 0, per_shard: int = 50) -> Path:
    """A pre-tokenized shard folder (the `prepare tokenize` layout) with learnable structure:
    the first word of each caption decides the image's codes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n, per_shard)):
        rows = range(start, min(n, start + per_shard))
        codes, records = [], []
        for i in rows:
            color = int(rng.integers(0, 3))
            codes.append(np.full((hw, hw), color * 5, dtype=np.int16) + rng.integers(0, 2, (hw, hw)).astype(np.int16))
            text = f"a {WORDS[color]} {WORDS[3 + int(rng.integers(0, 3))]}"
            records.append({"doc_id": i, "text": text, "source": "fixture"})
        name = f"shard-{s:05d}"
        np.savez(root / f"{name}.npz", codes=np.stack(codes), doc_id=np.array(list(rows), dtype=np.int64))
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "manifest.json").write_text(json.dumps({"h": hw, "w": hw, "n_codes": n_codes, "count": n}))
    return root


def make_text_tokenizer(root: Path, n_codes: int = 16, hw: int = 4, vocab_size: int = 300) -> Path:
    """tokenizer.json + vocab.json for the fixture's captions."""
    from lit_cm3leon.tokenizer.text import TextTokenizer
    from lit_cm3leon.tokenizer.vocab import Vocab

    corpus = [" ".join(WORDS)] * 10 + [f"a {c} {k}" for c in WORDS[:3] for k in WORDS[3:6]] * 5
    tok = TextTokenizer.train(corpus, vocab_size=vocab_size, min_frequency=1)
    tok.save(root)
    Vocab(n_text=tok.vocab_size, n_image=n_codes, image_h=hw, image_w=hw).save(root / "vocab.json")
    return root
