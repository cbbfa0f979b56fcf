"""``python -m lit_cm3leon.prepare tokenize``: images (+ captions) -> pre-tokenized shards.

Output folder::

    shard-00000.npz        np.savez (no pickle): codes int16[N, h, w], doc_id int64[N]
    shard-00000.jsonl      one record per line: doc_id, text, plus source metadata
    shard-00000.meta.json  per-shard counts (records, bad records by kind) and the job's
                           signature: lets a resumed run rebuild the manifest without re-reading
                           finished shards, and refuse one written for other arguments
    manifest.json          image tokenizer hash/preset, h, w, n_codes, count, bad-record counts

Sources: the shapes world (``--source shapes --n N``; captions from the world), an image folder
(``--source folder --root DIR``; caption in ``<stem>.txt`` beside each image), webdataset shards
in the img2dataset layout (``--source wds --shards 'dir/*.tar'``; one output shard per tar).
Shards are independent jobs run over ``--workers`` processes; a shard whose ``.npz`` exists is
finished and skipped, so an interrupted run resumes. Unreadable images, empty captions and
truncated tars are skipped and counted, never fatal.

``doc_id``: shapes / folder -> the record's index in the source order; shapes landmark views
(``--landmark-views M``, after the ``--n`` samples) -> ``10**8 + index``; wds -> ``tar_index *
10**7 + position in the tar``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from lit_cm3leon.data.shards import shapes_world_kwargs

WDS_STRIDE = 10**7
LANDMARK_DOC_BASE = 10**8  # shapes: doc id of landmark view i is LANDMARK_DOC_BASE + i

_TOKENIZER = None


def _tokenizer(path: str, max_pixels: int | None):
    global _TOKENIZER
    if _TOKENIZER is None:
        import torch

        from lit_cm3leon.tokenizer.image import load_image_tokenizer

        torch.set_num_threads(1)
        _TOKENIZER = load_image_tokenizer(path, max_image_pixels=max_pixels)
    return _TOKENIZER


def _shard_names(out: Path, i: int) -> tuple[Path, Path, Path]:
    stem = out / f"shard-{i:05d}"
    return stem.with_suffix(".npz"), stem.with_suffix(".jsonl"), stem.with_suffix(".meta.json")


def _records_for_job(job: dict, bad: Counter) -> list[tuple[int, Any, str, dict]]:
    """Load (doc_id, image, text, metadata) for one shard's job; bad records are counted."""
    from lit_cm3leon.tokenizer.image import open_image

    src, recs = job["source"], []
    if src == "shapes":
        from lit_cm3leon.data.shapes import ShapesWorld

        world = ShapesWorld(**job["world"])
        landmarks = job.get("landmarks", 0)
        for i in range(job["start"], job["stop"]):
            if landmarks:
                s, doc_id = world.landmark_sample(job["split"], i, landmarks), LANDMARK_DOC_BASE + i
            else:
                s, doc_id = world.sample(job["split"], i), i
            text = s.caption_long if job["caption"] == "long" else s.caption_short
            meta = {
                "source": "shapes",
                "split": job["split"],
                "index": i,
                **({"landmarks": landmarks} if landmarks else {}),
                "caption_short": s.caption_short,
                "caption_long": s.caption_long,
            }
            recs.append((doc_id, np.asarray(s.image, dtype=np.uint8), text, meta))
    elif src == "folder":
        for i, p in zip(range(job["start"], job["stop"]), job["paths"], strict=True):
            p = Path(p)
            cap = p.with_suffix(".txt")
            text = (
                cap.read_text(encoding="utf-8", errors="replace").strip() if cap.is_file() else ""
            )
            if not text and not job["allow_empty_text"]:
                bad["empty_caption"] += 1
                continue
            try:
                im = open_image(p, job["max_pixels"])
            except Exception:
                bad["unreadable_image"] += 1
                continue
            recs.append(
                (i, im, text, {"source": "folder", "path": str(p.relative_to(job["root"]))})
            )
    elif src == "wds":
        from lit_cm3leon.data.images import decode_wds_image, iter_wds_samples, wds_caption

        counts: dict[str, int] = {}
        for pos, (key, group, shard) in enumerate(iter_wds_samples([job["tar"]], counts)):
            text, meta = wds_caption(group)
            if not text and not job["allow_empty_text"]:
                bad["empty_caption"] += 1
                continue
            try:
                im = decode_wds_image(group, job["max_pixels"])
            except Exception:
                bad["unreadable_image"] += 1
                continue
            m = {"source": "wds", "shard": Path(shard).name, "key": key}
            m.update({k: v for k, v in meta.items() if k in ("url", "width", "height")})
            recs.append((job["index"] * WDS_STRIDE + pos, im, text, m))
        bad.update(counts)
    return recs


def job_signature(job: dict) -> str:
    """What a shard's contents depend on (its records, source, tokenizer and precision), hashed:
    a finished shard is only reused by a job with the same signature."""
    import hashlib

    fields = {k: v for k, v in job.items() if k != "out"}  # a moved folder still resumes
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_job(job: dict) -> dict:
    """Tokenize one shard and write it atomically (jsonl and meta first, the npz last = done)."""
    out = Path(job["out"])
    npz, jsonl, meta = _shard_names(out, job["index"])
    signature = job_signature(job)
    if npz.exists():
        info = (
            json.loads(meta.read_text()) if meta.exists() else {"index": job["index"], "count": -1}
        )
        if info.get("job", signature) != signature:
            raise ValueError(
                f"{npz} was written by another tokenize job (other records, source or tokenizer), "
                f"so it cannot be resumed: write to a new --out, or delete {out} to redo it"
            )
        return info
    tok = _tokenizer(job["tokenizer"], job["max_pixels"])
    bad: Counter = Counter()
    recs = _records_for_job(job, bad)
    codes = np.zeros((0, tok.h, tok.w), dtype=np.int16)
    if recs:
        if job["source"] == "shapes":
            codes = tok.encode(np.stack([r[1] for r in recs]), bf16=job["bf16"]).numpy()
        else:
            codes = np.concatenate([tok.encode(r[1], bf16=job["bf16"]).numpy() for r in recs])
        if tok.n_codes > 32768:
            raise ValueError(f"{tok.n_codes} codes do not fit the shard format's int16")
        codes = codes.astype(np.int16)
    doc_ids = np.array([r[0] for r in recs], dtype=np.int64)
    tmp = jsonl.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc_id, _im, text, m in recs:
            f.write(
                json.dumps({"doc_id": int(doc_id), "text": text, **m}, ensure_ascii=False) + "\n"
            )
    os.replace(tmp, jsonl)
    info = {"index": job["index"], "count": len(recs), "bad": dict(bad), "job": signature}
    meta.write_text(json.dumps(info) + "\n")
    tmp_npz = npz.with_name(npz.stem + ".tmp.npz")
    np.savez(tmp_npz, codes=codes, doc_id=doc_ids)
    os.replace(tmp_npz, npz)
    return info


def build_jobs(args: argparse.Namespace) -> list[dict]:
    common = {
        "out": str(args.out),
        "tokenizer": str(args.tokenizer),
        "max_pixels": args.max_image_pixels,
        "allow_empty_text": args.allow_empty_text,
        "source": args.source,
        "bf16": not args.fp32,
    }
    jobs = []
    if args.source == "shapes":
        world = shapes_world_kwargs(vars(args))
        for i, start in enumerate(range(0, args.n, args.shard_size)):
            jobs.append(
                {
                    **common,
                    "index": i,
                    "start": start,
                    "stop": min(args.n, start + args.shard_size),
                    "world": world,
                    "split": args.split,
                    "caption": args.caption,
                }
            )
        first = len(jobs)
        for i, start in enumerate(range(0, args.landmark_views, args.shard_size)):
            jobs.append(
                {
                    **common,
                    "index": first + i,
                    "start": start,
                    "stop": min(args.landmark_views, start + args.shard_size),
                    "world": world,
                    "split": args.split,
                    "caption": args.caption,
                    "landmarks": args.landmarks,
                }
            )
    elif args.source == "folder":
        from lit_cm3leon.data.images import list_images

        root = Path(args.root)
        paths = list_images(root)
        if args.n:
            paths = paths[: args.n]
        if not paths:
            raise SystemExit(
                f"no images under {root} (expected image files with a <stem>.txt caption beside each)"
            )
        for i, start in enumerate(range(0, len(paths), args.shard_size)):
            chunk = paths[start : start + args.shard_size]
            jobs.append(
                {
                    **common,
                    "index": i,
                    "start": start,
                    "stop": start + len(chunk),
                    "paths": [str(p) for p in chunk],
                    "root": str(root),
                }
            )
    else:
        tars = sorted(p for pat in args.shards for p in glob.glob(pat))
        if not tars:
            raise SystemExit(
                f"no tar shards match {args.shards} (expected img2dataset output: {{key}}.jpg/.txt/.json in .tar files)"
            )
        jobs = [{**common, "index": i, "tar": t} for i, t in enumerate(tars)]
    return jobs


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lit_cm3leon.prepare tokenize", description=__doc__.split("\n")[0]
    )
    p.add_argument("--source", choices=["shapes", "folder", "wds"], default="shapes")
    p.add_argument(
        "--tokenizer",
        default="outputs/image_tokenizer",
        help="tokenizer folder/.ckpt or preset name",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder of shards")
    p.add_argument(
        "--n", type=int, default=0, help="shapes: number of samples; folder: cap (0 = all)"
    )
    p.add_argument("--split", default="train", help="shapes split (train | heldout)")
    p.add_argument(
        "--caption", choices=["short", "long"], default="short", help="shapes caption used as text"
    )
    p.add_argument(
        "--landmarks",
        type=int,
        default=100,
        help="shapes: distinct landmarks (named scenes) the views are drawn from",
    )
    p.add_argument(
        "--landmark-views",
        type=int,
        default=0,
        help="shapes: landmark views added after the --n samples (doc ids from 10**8)",
    )
    p.add_argument("--image-size", type=int, default=32, help="shapes world image size")
    p.add_argument("--world-seed", type=int, default=0, help="shapes world seed")
    p.add_argument(
        "--cell-align",
        type=int,
        default=1,
        help="shapes world: cells start on and span multiples of this many px (ShapesWorld.cell_align)",
    )
    p.add_argument("--root", help="folder source: image folder (captions as <stem>.txt)")
    p.add_argument("--shards", nargs="+", default=[], help="wds source: tar paths or globs")
    p.add_argument(
        "--shard-size", type=int, default=5000, help="records per output shard (shapes/folder)"
    )
    p.add_argument("--workers", type=int, default=1, help="parallel processes (one shard per job)")
    p.add_argument(
        "--fp32", action="store_true", help="encode in fp32 (default: bf16 autocast, ~2.8x faster)"
    )
    p.add_argument("--allow-empty-text", action="store_true", help="keep images without a caption")
    p.add_argument(
        "--max-image-pixels", type=int, default=89_478_485, help="refuse larger images (bomb guard)"
    )
    args = p.parse_args(argv)
    if args.source == "shapes" and args.n <= 0 and args.landmark_views <= 0:
        p.error("--source shapes needs --n <number of samples> (or --landmark-views)")
    if args.landmark_views and not 1 <= args.landmarks <= 4096:
        p.error("--landmarks must be in 1..4096")
    if args.source == "folder" and not args.root:
        p.error("--source folder needs --root <image folder>")
    if args.source == "wds" and not args.shards:
        p.error("--source wds needs --shards <tar paths or globs>")
    return args


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from lit_cm3leon.tokenizer.image import load_image_tokenizer

    tok = load_image_tokenizer(str(args.tokenizer))  # validate before spawning workers
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(args)
    done_before = sum(_shard_names(args.out, j["index"])[0].exists() for j in jobs)
    t0 = time.time()
    if args.workers <= 1:
        global _TOKENIZER
        _TOKENIZER = tok
        infos = [run_job(j) for j in jobs]
    else:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as ex:
            infos = list(ex.map(run_job, jobs))
    bad: Counter = Counter()
    for info in infos:
        bad.update(info.get("bad", {}))
    manifest = {
        "image_tokenizer": {
            "path": str(args.tokenizer),
            "hash": tok.hash,
            "preset": tok.info.get("preset"),
        },
        "h": tok.h,
        "w": tok.w,
        "n_codes": tok.n_codes,
        "precision": "fp32" if args.fp32 else "bf16",
        "count": sum(max(0, i["count"]) for i in infos),
        "bad": dict(bad),
        "shards": [f"shard-{j['index']:05d}" for j in jobs],
        "source": {k: v for k, v in vars(args).items() if k not in ("out", "workers")}
        | {"out": str(args.out)},
    }
    manifest["source"]["tokenizer"] = str(args.tokenizer)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    print(
        f"tokenized {manifest['count']} records into {len(jobs)} shards ({done_before} already done) "
        f"in {time.time() - t0:.1f}s; bad records: {dict(bad) or 0} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
