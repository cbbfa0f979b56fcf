"""From retrieved document ids to the documents themselves (captions and image codes).

The memory bank stores vectors and document ids; the tokens live in the pre-tokenized shards
that the bank was built from. These helpers search with a :class:`Retriever` and return shard
rows, so the data modules and the inference engine read retrieved documents as tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lit_cm3leon.data.shards import TokenShards, shapes_record_sample, shapes_world_kwargs


def shard_images(shards: TokenShards, rows) -> np.ndarray:
    """uint8 [n, H, W, 3] of shard rows, for embedding: shapes-world records are re-rendered
    from their (split, index); file records are read from their ``image_path``."""
    from lit_cm3leon.data.shapes import ShapesWorld
    from lit_cm3leon.tokenizer.image import open_image

    world = None
    out = []
    for r in rows:
        rec = shards.records[int(r)]
        if rec.get("source") == "shapes":
            world = world or ShapesWorld(**shapes_world_kwargs(shards.manifest.get("source", {})))
            out.append(shapes_record_sample(world, rec).image)
        elif rec.get("image_path"):
            path = Path(rec["image_path"])
            path = path if path.is_absolute() else shards.root / path
            out.append(np.asarray(open_image(path)))
        else:
            raise ValueError(
                f"{shards.root}: record {rec.get('doc_id')} has neither a shapes index nor an image_path"
            )
    return np.stack(out)


def rows_of(shards: TokenShards, doc_ids_per_query: list[list[int]], width: int) -> np.ndarray:
    """int64 [n, width] of shard rows (-1 where fewer documents were found)."""
    out = np.full((len(doc_ids_per_query), width), -1, dtype=np.int64)
    for i, ids in enumerate(doc_ids_per_query):
        rows = [shards.row_of[d] for d in ids if d in shards.row_of][:width]
        out[i, : len(rows)] = rows
    return out


UNSEARCHED = -2  # a candidate row never searched (-1: searched, fewer candidates found)


def training_candidates(
    retriever,
    shards: TokenShards,
    pool: int,
    seed: int = 0,
    batch: int = 256,
    progress: bool = True,
    reuse_bank_vectors: bool = True,
    rows=None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Admissible, diverse candidates int64 [N, pool] for the training pairs of ``shards``
    (searched with the pair's image and its query-dropped caption; the pair itself excluded).
    Pairs that are in the memory bank reuse its stored text and image vectors, when it keeps
    them.

    ``rows``: the pairs to search (default all); the others stay :data:`UNSEARCHED` (or keep
    their values in ``out``, which is filled in place when given). Each pair draws its query
    dropout from its own generator (``seed``, its row), so a pair's candidates are the same
    whichever other pairs are searched with it."""
    from dataclasses import replace

    retriever.cfg = replace(
        retriever.cfg, n_train_docs=pool, candidates=max(pool, retriever.cfg.candidates)
    )
    n = len(shards)
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    if out is None:
        out = np.full((n, pool), UNSEARCHED, dtype=np.int64)
    elif out.shape != (n, pool):
        raise ValueError(f"candidates of shape {out.shape}, expected {(n, pool)}")
    reuse = len(rows) > 0 and reuse_bank_vectors and stored_vectors_match(retriever, shards)
    starts = range(0, len(rows), batch)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="retrieval candidates", unit="batch")
    for s in starts:
        part = rows[s : s + batch]
        texts = [shards.text(r) for r in part]
        doc_ids = [int(shards.doc_ids[r]) for r in part]
        rngs = [np.random.default_rng([seed, 104729, int(r)]) for r in part]
        stored = retriever.bank.modality_vectors(doc_ids) if reuse else None
        images = shard_images(shards, part) if stored is None else None
        ids = retriever.training_docs(texts, images, doc_ids, rngs, embeddings=stored)
        out[part] = rows_of(shards, ids, pool)
    return out


def stored_vectors_match(retriever, shards: TokenShards, n: int = 8) -> bool:
    """Whether the bank keeps modality vectors for ``shards``' documents: their doc ids are in
    it and, for the first ``n`` pairs, the stored text vector is the caption's embedding (doc
    ids alone could name other documents if the bank was built from other shards)."""
    rows = range(min(n, len(shards)))
    stored = retriever.bank.modality_vectors([int(shards.doc_ids[r]) for r in rows])
    if stored is None:
        return False
    fresh = retriever.encoder.embed_text([shards.text(r) for r in rows])
    return bool(((fresh * stored[0]).sum(1) > 0.99).all())


def prompt_rows(retriever, bank_shards: TokenShards, texts: list[str], k: int) -> np.ndarray:
    """int64 [len(texts), k] rows of ``bank_shards`` retrieved for each prompt text."""
    return rows_of(bank_shards, retriever.prompt_docs(texts, k), k)


DEFAULT_STRATEGY = Path(__file__).resolve().parents[2] / "configs" / "retrieval" / "default.yaml"


def default_strategy() -> dict:
    """The strategy thresholds of ``configs/retrieval/default.yaml`` (what training uses by
    default), so inference outside Hydra retrieves with the same rules."""
    import yaml

    cfg = yaml.safe_load(DEFAULT_STRATEGY.read_text())
    return {k: v for k, v in cfg.items() if k not in ("encoder", "bank", "defaults")}


def trained_strategy(ckpt: str | Path) -> dict:
    """The strategy a published decoder was trained with (its manifest's ``data.retrieval``)
    over :func:`default_strategy`, so inference retrieves by the same rules (e.g. the same
    ``lexical_weight``). Checkpoints without one (SFT, older runs) get the defaults."""
    import json

    out = default_strategy()
    path = Path(ckpt) / "manifest.json"
    if path.is_file():
        data = (json.loads(path.read_text()).get("config") or {}).get("data") or {}
        trained = data.get("retrieval") if isinstance(data, dict) else None
        if isinstance(trained, dict):
            out.update({k: v for k, v in trained.items() if k in out})
    return out


def open_retriever(index_dir: str | Path, encoder_dir: str | Path, cfg: Mapping | None = None):
    """A Retriever over the bank at ``index_dir``; ``cfg`` None = :func:`default_strategy`."""
    from lit_cm3leon.retrieval.encoder import ClipEncoder
    from lit_cm3leon.retrieval.index import MemoryBank
    from lit_cm3leon.retrieval.strategy import Retriever

    encoder = ClipEncoder.load(encoder_dir)
    bank = MemoryBank.open(index_dir, encoder)
    cfg = default_strategy() if cfg is None else cfg
    return Retriever(bank, encoder, {k: v for k, v in cfg.items() if k not in ("encoder", "bank")})


def bank_retrieve_fn(outputs: str | Path, cfg: Mapping | None = None):
    """The engine's retriever: prompt texts, k -> per prompt, k (caption, codes) documents."""
    outputs = Path(outputs)
    retriever = open_retriever(outputs / "index", outputs / "retriever", cfg)
    bank = TokenShards(outputs / "tokens" / "shapes-train")

    def retrieve(texts, k: int):
        rows = prompt_rows(retriever, bank, list(texts), k)
        return [[(bank.text(r), bank.codes[r]) for r in row if r >= 0] for row in rows]

    return retrieve
