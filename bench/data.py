"""Pretraining data throughput: samples/s of ``PairSequences`` + collate vs what a training step eats.

The pipeline is the one pretraining runs (``lit_cm3leon.data.pretrain.PairSequences``): read a
pair from in-memory token shards, draw up to 3 retrieved documents from its candidates, encode the
documents, lay out and truncate the sequence (seq 384), apply the CM3 transform, compute loss
weights, pad, and collate a batch of 8 with the training collate (packed rows,
``lit_cm3leon.data.collate.PackedCollate``; ``--no-packing`` for padded rows). Shards have real
shapes-world sizes (8 x 8 = 64 codes per image, 256 codes, captions from ``ShapesWorld``);
retrieval candidates are a precomputed random ``[N, 16]`` array (the search itself runs once,
before training).

The consumer is one training step of the ``shapes`` preset as pretraining runs it
(``CM3LeonModule.batch_loss``: cell embedding and copy heads on, bf16 autocast, AdamW; eager
by default, ``--compile`` for torch.compile) on batches the pipeline produced, timed in the same
run. Both are repeated ``--repeats`` times (alternating) and reported as medians; the target is a
pipeline at least 5x faster than the step consumes, single process (``num_workers=0``).

    PYTHONPATH=. python bench/data.py            # ~1-2 minutes on 2 CPU cores
    PYTHONPATH=. python bench/data.py --quick    # smoke run

Writes ``bench/results/data.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from lit_cm3leon.data.collate import collate_fn
from lit_cm3leon.data.pretrain import PairSequences
from lit_cm3leon.data.shards import TokenShards
from lit_cm3leon.objective.cm3 import CM3Transform
from lit_cm3leon.tokenizer.codec import DocumentCodec
from lit_cm3leon.tokenizer.text import TextTokenizer, shapes_corpus
from lit_cm3leon.tokenizer.vocab import Vocab

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import CONFIGS, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def write_shapes_shards(
    root: Path, n: int, hw: int = 8, n_codes: int = 256, seed: int = 0, per_shard: int = 1000
) -> Path:
    """A ``prepare tokenize`` shard folder: shapes-world captions, random codes of real size."""
    from lit_cm3leon.data.shapes import ShapesWorld

    world, rng = ShapesWorld(seed=seed), np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n, per_shard)):
        rows = list(range(start, min(n, start + per_shard)))
        records = []
        for i in rows:
            sample = world.sample("train", i)
            text = sample.caption_long if i % 2 else sample.caption_short
            records.append({"doc_id": i, "text": text, "source": "shapes", "index": i})
        codes = rng.integers(0, n_codes, (len(rows), hw, hw)).astype(np.int16)
        np.savez(root / f"shard-{s:05d}.npz", codes=codes, doc_id=np.array(rows, dtype=np.int64))
        (root / f"shard-{s:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "manifest.json").write_text(
        json.dumps({"h": hw, "w": hw, "n_codes": n_codes, "count": n})
    )
    return root


def build_dataset(
    root: Path, n: int, seq_len: int, n_candidates: int = 16, seed: int = 0
) -> PairSequences:
    tok = TextTokenizer.train(
        shapes_corpus(min(n, 2000), seed=seed), vocab_size=1024, min_frequency=2
    )
    vocab = Vocab(n_text=tok.vocab_size, n_image=256, image_h=8, image_w=8)
    shards = TokenShards(write_shapes_shards(root / "tokens", n, seed=seed))
    cands = np.random.default_rng(seed).integers(0, n, (n, n_candidates))
    cm3 = CM3Transform(vocab, poisson_rate=1.0)  # configs/data/pretrain.yaml
    return PairSequences(
        shards, DocumentCodec(tok, vocab), cands, seq_len, length=10**9, seed=seed, cm3=cm3
    )


def time_batches(
    ds: PairSequences, collate, batch: int, n_batches: int, start: int
) -> tuple[float, float, list]:
    """Wall-clock and process CPU seconds per batch of ``__getitem__`` x batch + the collate, and
    the batches."""
    t0, c0, out = time.perf_counter(), time.process_time(), []
    for b in range(n_batches):
        base = start + b * batch
        out.append(collate([ds[base + j] for j in range(batch)]))
    return (time.perf_counter() - t0) / n_batches, (time.process_time() - c0) / n_batches, out


def make_step(vocab: Vocab, root: Path, compiled: bool):
    """One pretraining step of the ``shapes`` preset on a collated batch (as the module runs it)."""
    from lit_cm3leon.model import ModelConfig
    from lit_cm3leon.training.cm3leon_module import CM3LeonModule

    vocab.save(root / "vocab.json")
    torch.manual_seed(0)
    module = CM3LeonModule(
        model=vars(ModelConfig.preset("shapes")), vocab_path=str(root / "vocab.json")
    )
    if compiled:
        module.net.loss = torch.compile(module.net.loss)  # the training path: hidden states -> loss
    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = module.batch_loss(batch, batch["weights"].sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few rows and batches, 1 repeat")
    p.add_argument("--rows", type=int, default=2000, help="pairs in the shards")
    p.add_argument("--batches", type=int, default=40, help="data batches timed per repeat")
    p.add_argument("--steps", type=int, default=5, help="training steps timed per repeat")
    p.add_argument("--repeats", type=int, default=3, help="repeats (medians)")
    p.add_argument(
        "--compile", action="store_true", help="time the step with torch.compile (default eager)"
    )
    p.add_argument(
        "--no-packing",
        dest="packing",
        action="store_false",
        help="padded rows, one per sequence (data.packing=false) instead of packed ones",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the step (0 = torch's default; 1 on a shared machine, see bench/train.py)",
    )
    p.add_argument("--out", default=str(RESULTS / "data.json"), help="JSON output path")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.batches, args.steps, args.repeats = 200, 5, 2, 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    B, T = CONFIGS["shapes"]["batch"], CONFIGS["shapes"]["seq"]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ds = build_dataset(Path(tmp), args.rows, T)
        log(f"shards + tokenizer: {time.perf_counter() - t0:.1f}s")
        padded = default_collate([ds[i] for i in range(4 * B)])
        fill = float((padded["ids"] != ds.vocab.pad).float().mean())
        n_retrieved = float(((padded["ids"] == ds.vocab.sep).sum(1)).float().mean())
        collate = collate_fn(args.packing, ds.vocab.pad) or default_collate
        rows = [collate([ds[b * B + j] for j in range(B)])["ids"].shape[0] for b in range(4)]

        step = make_step(ds.vocab, Path(tmp), args.compile)
        _, _, batches = time_batches(ds, collate, B, 2, 0)
        for b in batches:
            step(b)  # warm-up (compilation, optimizer state)

        data_s, step_s, data_cpu, step_cpu, cursor = [], [], [], [], 10 * B
        for r in range(args.repeats):
            jobs = ["data", "step"] if r % 2 == 0 else ["step", "data"]
            for job in jobs:
                if job == "data":
                    wall, cpu, made = time_batches(ds, collate, B, args.batches, cursor)
                    batches = made[: args.steps] if r == 0 else batches
                    data_s.append(wall)
                    data_cpu.append(cpu)
                    cursor += args.batches * B
                else:
                    t0, c0 = time.perf_counter(), time.process_time()
                    for i in range(args.steps):
                        step(batches[i % len(batches)])
                    step_s.append((time.perf_counter() - t0) / args.steps)
                    step_cpu.append((time.process_time() - c0) / args.steps)
            log(
                f"repeat {r}: data {B / data_s[-1]:.0f} samples/s ({B / data_cpu[-1]:.0f} per CPU-s), "
                f"step {step_s[-1] * 1e3:.0f} ms (CPU {step_cpu[-1] * 1e3:.0f} ms)"
            )

    ratios = [
        s / d for d, s in zip(data_s, step_s, strict=True)
    ]  # (samples/s produced) / (samples/s consumed)
    cpu_ratios = [s / d for d, s in zip(data_cpu, step_cpu, strict=True)]
    data_med, step_med = statistics.median(data_s), statistics.median(step_s)
    data_cpu_med, step_cpu_med = statistics.median(data_cpu), statistics.median(step_cpu)
    info["loadavg_end"] = os.getloadavg()
    result = dict(
        benchmark="data",
        command="PYTHONPATH=. python bench/data.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=info,
        batch=B,
        seq_len=T,
        rows=args.rows,
        image_tokens=64,
        n_candidates=16,
        cm3_poisson_rate=1.0,
        step_mode="compile" if args.compile else "eager",
        packing=args.packing,
        mean_rows=statistics.mean(rows),
        repeats=args.repeats,
        data_batch_s=data_s,
        data_samples_per_s=B / data_med,
        data_samples_per_s_all=[B / d for d in data_s],
        step_s=step_s,
        step_samples_per_s=B / step_med,
        step_samples_per_s_all=[B / s for s in step_s],
        headroom=statistics.median(ratios),
        headroom_all=ratios,
        target_headroom=5.0,
        data_batch_cpu_s=data_cpu,
        step_cpu_s=step_cpu,
        headroom_cpu=statistics.median(cpu_ratios),
        headroom_cpu_all=cpu_ratios,
        threads=torch.get_num_threads(),
        mean_fill=fill,
        mean_separators=n_retrieved,
        wall_s=time.perf_counter() - t_start,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        f"{args.repeats} repeats, medians; single process; wall {result['wall_s']:.0f} s; load avg "
        f"{info['loadavg_start'][0]:.1f} -> {info['loadavg_end'][0]:.1f}\n"
    )
    print(
        "| what | ms per batch of 8 (wall) | samples/s (wall) | ms per batch (CPU) | samples per CPU-s |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    print(
        f"| data: PairSequences + {'packed' if args.packing else 'padded'} collate (seq {T}, CM3, <= 3 retrieved) "
        f"| {data_med * 1e3:.1f} | {B / data_med:,.0f} "
        f"| {data_cpu_med * 1e3:.1f} | {B / data_cpu_med:,.0f} |"
    )
    print(
        f"| training step, shapes preset ({result['step_mode']}, bf16, {result['threads']} thread(s)) "
        f"| {step_med * 1e3:.0f} | {B / step_med:,.1f} | {step_cpu_med * 1e3:.0f} | {B / step_cpu_med:,.1f} |"
    )
    print(
        f"\nheadroom = data rate / step consumption (median of per-repeat ratios): wall {result['headroom']:.1f}x, "
        f"CPU time {result['headroom_cpu']:.1f}x (target >= 5x); sequences {100 * fill:.0f}% non-pad on average, "
        f"{result['mean_rows']:.2f} rows per batch of {B}"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
