"""The memory bank: a faiss inner-product index over document vectors, with metadata.

Folder layout (``MemoryBank.save`` / ``MemoryBank.open``)::

    index.faiss     the faiss index (row r of the index is row r of the metadata)
    meta.npz        doc_id int64[N], has_text bool[N], has_image bool[N],
                    shard int32[N], row int32[N]  (where the document's tokens are; -1 if none)
    manifest.json   encoder name + hash, dim, count, kind, index params, checksum, skipped counts
    modalities.npz  optional: text, image float16[N, D], each document's per-modality vectors
                    (zero rows where a modality is absent), so training-pair retrieval can
                    search with a pair's image without embedding it again
    lexical.npz     optional: TF-IDF rows of the documents' texts (``lexical.LexicalIndex``),
                    for the retriever's exact-word score beside the dense one

Kinds: ``flat`` (exact; small banks), ``ivf`` (IVFFlat), ``ivfpq`` (IVF with product
quantization; large banks), ``hnsw``. IVF kinds are trained once on a sample, then every shard of
vectors is added to its own copy of the trained empty index and the copies are merged, so shards
can be built independently.

CLI: ``python -m lit_cm3leon.prepare index --encoder outputs/retriever --tokens <dir>
--out outputs/index [--kind flat|ivf|ivfpq|hnsw]`` (see ``cli``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np

from lit_cm3leon.retrieval.lexical import LEXICAL_FILE, LexicalIndex

KINDS = ("flat", "ivf", "ivfpq", "hnsw")
INDEX_FILE, META_FILE, MANIFEST_FILE = "index.faiss", "meta.npz", "manifest.json"
MODALITIES_FILE = "modalities.npz"
META_KEYS = ("doc_id", "has_text", "has_image", "shard", "row")


def default_params(kind: str, n: int) -> dict:
    """Index settings for ``n`` vectors (``nlist`` about 2 sqrt(n), at least 40 points per list)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    nlist = int(max(1, min(2 * math.sqrt(max(n, 1)), n // 40 if n >= 40 else 1)))
    return {
        "flat": {},
        "ivf": {"nlist": nlist, "nprobe": 16},
        "ivfpq": {"nlist": nlist, "nprobe": 16, "pq_m": 16, "pq_bits": 8},
        "hnsw": {"hnsw_m": 32, "ef_construction": 80, "ef_search": 64},
    }[kind]


def _empty_index(kind: str, dim: int, params: dict) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], ip)
    if kind == "ivfpq":
        if dim % params["pq_m"]:
            raise ValueError(f"pq_m={params['pq_m']} must divide the dimension {dim}")
        return faiss.IndexIVFPQ(
            faiss.IndexFlatIP(dim), dim, params["nlist"], params["pq_m"], params["pq_bits"], ip
        )
    index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], ip)
    index.hnsw.efConstruction = params["ef_construction"]
    return index


def _apply_search_params(index: faiss.Index, kind: str, params: dict) -> None:
    if kind in ("ivf", "ivfpq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = params["nprobe"]
        ivf.make_direct_map()  # reconstruct(row) for the diversity rule
    elif kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]


def build_index(
    shards: Sequence[np.ndarray], kind: str = "flat", params: dict | None = None, seed: int = 0
) -> faiss.Index:
    """A faiss index over the rows of ``shards`` (list of float32 [n_i, D]), in order."""
    shards = [np.ascontiguousarray(s, dtype=np.float32) for s in shards if len(s)]
    if not shards:
        raise ValueError("no vectors to index")
    dim = shards[0].shape[1]
    n = sum(len(s) for s in shards)
    params = {**default_params(kind, n), **(params or {})}
    template = _empty_index(kind, dim, params)
    if kind in ("ivf", "ivfpq"):
        rng = np.random.default_rng(seed)
        n_train = min(n, max(40 * params["nlist"], 4096 if kind == "ivfpq" else 0))
        allv = shards[0] if len(shards) == 1 else None
        take = np.sort(rng.choice(n, size=n_train, replace=False))
        if allv is None:
            offsets = np.cumsum([0] + [len(s) for s in shards])
            sample = np.concatenate(
                [
                    shards[j][take[(take >= offsets[j]) & (take < offsets[j + 1])] - offsets[j]]
                    for j in range(len(shards))
                ]
            )
        else:
            sample = allv[take]
        template.train(sample)
        merged = None
        for s in shards:  # one index per shard, then merged (shards can be built apart)
            part = faiss.clone_index(template)
            part.add(s)
            if merged is None:
                merged = part
            else:
                merged.merge_from(part, merged.ntotal)
        index = merged
    else:
        index = template
        for s in shards:
            index.add(s)
    _apply_search_params(index, kind, params)
    return index


def _sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


class BankMismatchError(ValueError):
    """A memory bank opened with an encoder other than the one that built it."""


class MemoryBank:
    """Document vectors in a faiss index plus per-row metadata (see module docstring)."""

    def __init__(
        self,
        index: faiss.Index,
        meta: dict[str, np.ndarray],
        manifest: dict,
        modalities: dict[str, np.ndarray] | None = None,
        lexical: LexicalIndex | None = None,
    ) -> None:
        n = index.ntotal
        if lexical is not None and len(lexical) != n:
            raise ValueError(f"lexical index has {len(lexical)} rows, index has {n}")
        for k in META_KEYS:
            if len(meta[k]) != n:
                raise ValueError(f"metadata {k!r} has {len(meta[k])} rows, index has {n}")
        for k, v in (modalities or {}).items():
            if v.shape != (n, index.d):
                raise ValueError(f"modality vectors {k!r} are {v.shape}, expected {(n, index.d)}")
        self.index, self.meta, self.manifest = index, meta, manifest
        self.modalities = modalities  # {"text", "image"}: float16 [N, D], or None
        self.lexical = lexical  # LexicalIndex over the documents' texts, or None
        self.doc_ids = meta["doc_id"]
        self.multimodal = meta["has_text"] & meta["has_image"]
        self._row_of = {int(d): r for r, d in enumerate(self.doc_ids)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        vectors: np.ndarray | Sequence[np.ndarray],
        doc_ids,
        has_text=None,
        has_image=None,
        shard=None,
        row=None,
        encoder_name: str = "",
        encoder_hash: str = "",
        kind: str = "flat",
        params: dict | None = None,
        extra: dict | None = None,
        modalities: dict[str, np.ndarray | Sequence[np.ndarray]] | None = None,
        texts: Sequence[str | None] | None = None,
    ) -> MemoryBank:
        """``texts``: the documents' texts, row-aligned; given, the bank keeps a lexical index."""
        shards = [vectors] if isinstance(vectors, np.ndarray) else list(vectors)
        n = sum(len(s) for s in shards)
        dim = int(shards[0].shape[1])
        full = {**default_params(kind, n), **(params or {})}
        index = build_index(shards, kind, full)
        ones, minus = np.ones(n, bool), -np.ones(n, np.int32)
        meta = {
            "doc_id": np.asarray(doc_ids, np.int64),
            "has_text": ones if has_text is None else np.asarray(has_text, bool),
            "has_image": ones if has_image is None else np.asarray(has_image, bool),
            "shard": minus if shard is None else np.asarray(shard, np.int32),
            "row": minus if row is None else np.asarray(row, np.int32),
        }
        if len(np.unique(meta["doc_id"])) != n:
            raise ValueError("doc ids in a memory bank must be unique")
        manifest = {
            "format": 1,
            "encoder": {"name": encoder_name, "hash": encoder_hash},
            "dim": dim,
            "count": n,
            "kind": kind,
            "params": full,
            "n_multimodal": int((meta["has_text"] & meta["has_image"]).sum()),
            **(extra or {}),
        }
        if modalities is not None:
            modalities = {
                k: np.concatenate([v] if isinstance(v, np.ndarray) else list(v)).astype(np.float16)
                for k, v in modalities.items()
            }
        lexical = None if texts is None else LexicalIndex.build(list(texts))
        return cls(index, meta, manifest, modalities, lexical)

    def save(self, directory: str | Path) -> dict:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(d / INDEX_FILE))
        np.savez(d / META_FILE, **{k: self.meta[k] for k in META_KEYS})
        files = [d / INDEX_FILE, d / META_FILE]
        if self.modalities is not None:
            np.savez(d / MODALITIES_FILE, **self.modalities)
            files.append(d / MODALITIES_FILE)
        else:
            (d / MODALITIES_FILE).unlink(missing_ok=True)
        if self.lexical is not None:
            files.append(self.lexical.save(d))
        else:
            (d / LEXICAL_FILE).unlink(missing_ok=True)
        self.manifest["modalities"] = self.modalities is not None
        self.manifest["lexical"] = self.lexical is not None
        self.manifest["checksum"] = _sha256(*files)
        (d / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2))
        return self.manifest

    @classmethod
    def open(cls, directory: str | Path, encoder=None, verify: bool = True) -> MemoryBank:
        """Open a saved bank. With ``encoder`` (a ``ClipEncoder``), its weights hash and
        dimension must be the ones the bank was built with."""
        d = Path(directory)
        missing = [f for f in (INDEX_FILE, META_FILE, MANIFEST_FILE) if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{d} is not a memory bank (missing {missing}); build one with "
                f"`python -m lit_cm3leon.prepare index --encoder outputs/retriever ... --out {d}`"
            )
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        if encoder is not None:
            want = manifest["encoder"]
            if encoder.hash != want["hash"] or encoder.dim != manifest["dim"]:
                raise BankMismatchError(
                    f"memory bank {d} was built with encoder {want['name']!r} "
                    f"(hash {want['hash']}, dim {manifest['dim']}) but is opened with encoder "
                    f"{encoder.name!r} (hash {encoder.hash}, dim {encoder.dim}); rebuild the bank "
                    f"with this encoder or open it with the one that built it"
                )
        files = [d / INDEX_FILE, d / META_FILE]
        if manifest.get("modalities"):
            if not (d / MODALITIES_FILE).is_file():
                raise FileNotFoundError(
                    f"{d}: the manifest lists {MODALITIES_FILE} but it is missing; rebuild the bank"
                )
            files.append(d / MODALITIES_FILE)
        if manifest.get("lexical"):
            if not (d / LEXICAL_FILE).is_file():
                raise FileNotFoundError(
                    f"{d}: the manifest lists {LEXICAL_FILE} but it is missing; rebuild the bank"
                )
            files.append(d / LEXICAL_FILE)
        if verify and manifest.get("checksum") != _sha256(*files):
            raise ValueError(f"memory bank {d}: files do not match the manifest checksum")
        index = faiss.read_index(str(d / INDEX_FILE))
        _apply_search_params(index, manifest["kind"], manifest["params"])
        with np.load(d / META_FILE, allow_pickle=False) as z:
            meta = {k: z[k] for k in META_KEYS}
        modalities = None
        if manifest.get("modalities"):
            with np.load(d / MODALITIES_FILE, allow_pickle=False) as z:
                modalities = {k: z[k] for k in ("text", "image")}
        lexical = LexicalIndex.load(d) if manifest.get("lexical") else None
        return cls(index, meta, manifest, modalities, lexical)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [Q, D] -> (scores [Q, k] descending, rows [Q, k]; -1 where fewer)."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query dimension {q.shape[1]} != bank dimension {self.dim}")
        scores, rows = self.index.search(q, min(int(k), len(self)))
        return scores, rows

    def vectors(self, rows: Iterable[int]) -> np.ndarray:
        """Stored vectors of ``rows`` [n] -> [n, D] (approximate for ivfpq)."""
        rows = np.asarray(list(rows), np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.index.reconstruct_batch(rows)

    def row_of(self, doc_id: int) -> int:
        """Row of a document id (-1 when absent)."""
        return self._row_of.get(int(doc_id), -1)

    def modality_vectors(self, doc_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """(text, image) float32 [n, D] stored for ``doc_ids``; None when the bank has no
        modality vectors or one of the documents is not in it."""
        if self.modalities is None:
            return None
        rows = [self.row_of(d) for d in doc_ids]
        if min(rows, default=0) < 0:
            return None
        return tuple(self.modalities[k][rows].astype(np.float32) for k in ("text", "image"))


# ---------------------------------------------------------------------- CLI
def _iter_token_records(tokens: Path):
    """(shard number, line number, record) for every ``shard-*.jsonl`` line; bad lines -> None."""
    files = sorted(tokens.glob("shard-*.jsonl"))
    if not files:
        raise FileNotFoundError(
            f"no shard-*.jsonl under {tokens}: expected the folder written by "
            f"`python -m lit_cm3leon.prepare tokenize` (shard-00000.npz + shard-00000.jsonl ...)"
        )
    for f in files:
        shard_no = int(f.stem.split("-")[-1])
        with open(f) as fh:
            for line_no, line in enumerate(fh):
                try:
                    yield shard_no, line_no, json.loads(line)
                except json.JSONDecodeError:
                    yield shard_no, line_no, None


def _load_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _make_world(kwargs: dict):
    """``ShapesWorld(**kwargs)``; a ``_target_`` key names another class with the same API."""
    import importlib

    kwargs = dict(kwargs)
    target = kwargs.pop("_target_", "lit_cm3leon.data.shapes.ShapesWorld")
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _token_source(tokens: Path) -> dict:
    """The ``source`` block of the shard folder's manifest (what ``prepare tokenize`` was given)."""
    m = tokens / "manifest.json"
    if not m.is_file():
        return {}
    try:
        return dict(json.loads(m.read_text()).get("source") or {})
    except (json.JSONDecodeError, AttributeError):
        return {}


def _documents(
    args, skipped: dict
) -> Iterable[tuple[int, str | None, np.ndarray | None, int, int]]:
    """(doc_id, text, image, shard, row) per document; bad records are counted in ``skipped``.

    Images: shapes records are re-rendered from the world by (split, index); folder records are
    read from ``<root>/<path>``; records with an ``image_path`` (absolute or relative to the shard
    folder) are read from it.
    """
    world_kwargs = json.loads(args.world) if args.world else None
    if args.tokens is None:
        if args.source != "shapes" or args.n is None:
            raise SystemExit("give --tokens DIR, or --source shapes --n N")
        world = _make_world(world_kwargs or {})
        for i in range(args.n):
            s = world.sample("train", i)
            yield i, getattr(s, f"caption_{args.caption}"), s.image, -1, -1
        return
    tokens = Path(args.tokens)
    src = _token_source(tokens)
    from lit_cm3leon.data.shards import shapes_record_sample

    if world_kwargs is None and src.get("source") == "shapes":
        from lit_cm3leon.data.shards import shapes_world_kwargs

        world_kwargs = shapes_world_kwargs(src)
    world = None
    root = Path(src["root"]) if src.get("root") else None
    for shard_no, line_no, rec in _iter_token_records(tokens):
        if rec is None or "doc_id" not in rec:
            skipped["bad_record"] = skipped.get("bad_record", 0) + 1
            continue
        if args.n is not None and rec.get("index", rec["doc_id"]) >= args.n:
            continue
        text = rec.get("text") or None
        shapes = args.source == "shapes" or rec.get("source") == "shapes"
        try:
            if shapes:
                world = world or _make_world(world_kwargs or {})
                image = shapes_record_sample(world, rec).image
            elif rec.get("image_path"):
                p = Path(rec["image_path"])
                image = _load_image(p if p.is_absolute() else tokens / p)
            elif rec.get("path") and root is not None:
                image = _load_image(root / rec["path"])
            else:
                image = None
        except Exception:  # unreadable image, or a shapes record without its world index
            skipped["unreadable_image"] = skipped.get("unreadable_image", 0) + 1
            continue
        if text is None and image is None:
            skipped["empty"] = skipped.get("empty", 0) + 1
            continue
        yield int(rec["doc_id"]), text, image, shard_no, line_no


def build_from_args(args) -> dict:
    import torch

    from lit_cm3leon.retrieval.encoder import ClipEncoder, mean_of_modalities

    encoder = ClipEncoder.load(args.encoder)
    encoder.batch_size = args.batch_size
    t0 = time.time()
    shards, cols = [], {k: [] for k in META_KEYS}
    texts: list[str | None] = []
    modalities: dict[str, list[np.ndarray]] = {"text": [], "image": []}
    skipped: dict[str, int] = {}
    buf: list = []

    # bf16 autocast: 2.1x the images and 1.6x the texts per CPU-second of float32 on the shapes
    # CLIP (one thread), each vector within cosine 0.996 of its float32 one
    amp = torch.autocast(
        encoder.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"
    )

    def flush():
        if buf:
            with amp:
                t_emb, i_emb = encoder.embed_modalities([b[1] for b in buf], [b[2] for b in buf])
            shards.append(mean_of_modalities(t_emb, i_emb))
            modalities["text"].append(t_emb)
            modalities["image"].append(i_emb)
            for b in buf:
                texts.append(b[1])
                cols["doc_id"].append(b[0])
                cols["has_text"].append(b[1] is not None)
                cols["has_image"].append(b[2] is not None)
                cols["shard"].append(b[3])
                cols["row"].append(b[4])
            buf.clear()

    for doc in _documents(args, skipped):
        buf.append(doc)
        if len(buf) >= args.shard_size:
            flush()
    flush()
    n = sum(len(s) for s in shards)
    if n == 0:
        raise SystemExit(f"no documents to index (skipped: {skipped})")
    t_embed = time.time() - t0
    params = {k: v for k, v in {"nlist": args.nlist, "nprobe": args.nprobe}.items() if v}
    t1 = time.time()
    bank = MemoryBank.build(
        shards,
        cols["doc_id"],
        cols["has_text"],
        cols["has_image"],
        cols["shard"],
        cols["row"],
        encoder_name=encoder.name,
        encoder_hash=encoder.hash,
        kind=args.kind,
        params=params,
        extra={
            "source": args.source,
            "tokens": str(args.tokens) if args.tokens else None,
            "skipped": skipped,
            "precision": args.precision,
            "embed_seconds": round(t_embed, 3),
            "docs_per_second": round(n / max(t_embed, 1e-9), 1),
        },
        modalities=modalities if args.modality_vectors else None,
        texts=texts if args.lexical else None,
    )
    bank.manifest["build_seconds"] = round(time.time() - t1, 3)
    return bank.save(args.out)


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lit_cm3leon.prepare index",
        description="Embed training documents into a memory bank.",
    )
    p.add_argument("--encoder", required=True, help="saved encoder folder (outputs/retriever)")
    p.add_argument("--tokens", default=None, help="pre-tokenized shard folder (shard-*.jsonl)")
    p.add_argument(
        "--source",
        choices=["auto", "shapes", "files"],
        default="auto",
        help="shapes: re-render images from the world by (split, index); files: read "
        "images from the records; auto: from each record and the shard manifest",
    )
    p.add_argument("--n", type=int, default=None, help="shapes: index world train samples 0..N-1")
    p.add_argument(
        "--world", default=None, help='shapes: ShapesWorld kwargs as JSON, e.g. {"seed":0}'
    )
    p.add_argument(
        "--caption",
        choices=["short", "long"],
        default="long",
        help="shapes without --tokens: which caption is the document text",
    )
    p.add_argument("--out", required=True, help="output folder (outputs/index)")
    p.add_argument("--kind", choices=KINDS, default="flat")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query")
    p.add_argument("--shard-size", type=int, default=8192, help="documents embedded per shard")
    p.add_argument("--batch-size", type=int, default=256, help="encoder batch size")
    p.add_argument(
        "--precision",
        choices=["bf16", "32"],
        default="bf16",
        help="embed under bf16 autocast (default) or in float32",
    )
    p.add_argument(
        "--no-modality-vectors",
        dest="modality_vectors",
        action="store_false",
        help="do not keep each document's text and image vectors (modalities.npz, 2 x N x D "
        "float16); without them, pretraining embeds every training pair again to search with it",
    )
    p.add_argument(
        "--no-lexical",
        dest="lexical",
        action="store_false",
        help="do not keep the TF-IDF rows of the documents' texts (lexical.npz); the retriever's "
        "lexical_weight then has nothing to add",
    )
    args = p.parse_args(argv)
    if args.source != "shapes" and args.tokens is None:
        p.error(f"--source {args.source} needs --tokens DIR")
    if not Path(args.encoder).is_dir():
        p.error(
            f"--encoder {args.encoder} is not a folder; train it with "
            f"`python -m lit_cm3leon.fit experiment=retriever`"
        )
    manifest = build_from_args(args)
    print(
        json.dumps(
            {
                k: manifest[k]
                for k in (
                    "count",
                    "dim",
                    "kind",
                    "skipped",
                    "docs_per_second",
                    "build_seconds",
                    "checksum",
                )
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
