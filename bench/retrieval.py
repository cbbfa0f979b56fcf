"""Memory-bank benchmark: build time, query latency and IVF recall@k against exact search.

    PYTHONPATH=. python bench/retrieval.py [--sizes 100000 1000000] [--nprobe 8 32 128]

Bank and queries are random unit vectors (D=128 by default), the hardest case for IVF (no
cluster structure); ``--clusters C`` draws them around C directions instead, closer to CLIP
vectors, which reach a given recall with far fewer probes.
Also measures the shapes-clip encoder's document throughput (text + 32px image per document).
Prints one JSON object, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from lit_cm3leon.retrieval.index import build_index, default_params


def unit(n: int, d: int, seed: int, clusters: int = 0, spread: float = 0.5) -> np.ndarray:
    """n random unit vectors; with ``clusters`` > 0, unit centers (seed 0) plus Gaussian noise
    of norm about ``spread``, a closer stand-in for CLIP vectors than uniform ones."""
    rng = np.random.default_rng(seed)
    centers = None
    if clusters:
        centers = np.random.default_rng(0).standard_normal((clusters, d), dtype=np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):  # in chunks, to bound peak memory
        v = rng.standard_normal((min(100_000, n - s), d), dtype=np.float32)
        if centers is not None:
            v = centers[rng.integers(clusters, size=len(v))] + v * (spread / np.sqrt(d))
        out[s : s + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_bank(
    n: int, d: int, n_queries: int, k: int, nprobes: list[int], shard: int, clusters: int = 0
) -> list[dict]:
    vecs, q = unit(n, d, 0, clusters), unit(n_queries, d, 1, clusters)
    shards = [vecs[s : s + shard] for s in range(0, n, shard)]
    rows = []
    flat, t_build = timed(lambda: build_index(shards, "flat"))
    (_, exact), t_q = timed(lambda: flat.search(q, k))
    rows.append(
        {
            "n": n,
            "kind": "flat",
            "params": "",
            "build_s": t_build,
            "query_s": t_q,
            "ms_per_query": 1000 * t_q / n_queries,
            "recall": 1.0,
        }
    )
    flat = None  # free the exact index before building IVF
    params = default_params("ivf", n)
    ivf, t_build = timed(lambda: build_index(shards, "ivf", params))
    ivf_inner = faiss.extract_index_ivf(ivf)
    for nprobe in nprobes:
        ivf_inner.nprobe = nprobe
        (_, got), t_q = timed(lambda: ivf.search(q, k))
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact, strict=True)]))
        rows.append(
            {
                "n": n,
                "kind": "ivf",
                "params": f"nlist={params['nlist']} nprobe={nprobe}",
                "build_s": t_build,
                "query_s": t_q,
                "ms_per_query": 1000 * t_q / n_queries,
                "recall": recall,
            }
        )
    return rows


def bench_encoder(n_docs: int) -> dict:
    import torch

    from lit_cm3leon.retrieval.encoder import ClipEncoder

    torch.manual_seed(0)
    enc = ClipEncoder.from_arch("shapes-clip")
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (n_docs, 32, 32, 3), dtype=np.uint8))
    texts = [
        f"a red circle at the top left, a blue square at the middle center {i}"
        for i in range(n_docs)
    ]
    enc.embed_documents(texts[:32], images[:32])  # warm up
    cpu = time.process_time()
    _, t = timed(lambda: enc.embed_documents(texts, images))
    cpu = time.process_time() - cpu  # CPU seconds: comparable on a shared machine
    return {
        "encoder": "shapes-clip",
        "docs": n_docs,
        "seconds": t,
        "docs_per_s": n_docs / t,
        "cpu_seconds": cpu,
        "docs_per_cpu_s": n_docs / cpu,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--shard", type=int, default=100_000, help="vectors per shard (IVF: merged)")
    p.add_argument(
        "--clusters",
        type=int,
        default=0,
        help="0: uniform random unit vectors; C: C clustered directions plus noise",
    )
    p.add_argument("--embed-docs", type=int, default=1024, help="0 skips the encoder benchmark")
    args = p.parse_args(argv)
    rows = [
        r
        for n in args.sizes
        for r in bench_bank(
            n, args.dim, args.queries, args.k, args.nprobe, args.shard, args.clusters
        )
    ]
    result = {
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "clusters": args.clusters,
        "faiss_threads": faiss.omp_get_max_threads(),
        "banks": rows,
    }
    if args.embed_docs:
        result["embedding"] = bench_encoder(args.embed_docs)
    print(json.dumps(result, indent=1))
    print(
        f"\n| vectors | index | settings | build s | {args.queries} queries s | ms/query "
        f"| recall@{args.k} vs flat |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['kind']} | {r['params']} | {r['build_s']:.2f} | "
            f"{r['query_s']:.3f} | {r['ms_per_query']:.3f} | {r['recall']:.3f} |"
        )
    if args.embed_docs:
        e = result["embedding"]
        print(
            f"\nencoder {e['encoder']}: {e['docs_per_s']:.0f} docs/s wall, "
            f"{e['docs_per_cpu_s']:.0f} docs per CPU-second (text + 32px image, "
            f"{e['torch_threads']} threads)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
