"""Encoding throughput (images/s) of the image tokenizer presets on this machine.

    python bench/image_tokenizer.py [--threads 2] [--bf16] [--out bench_image_tokenizer.json]

Random-init weights (throughput does not depend on training). Median of ``--repeats`` timed
batches after one warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lit_cm3leon import load_image_tokenizer

BATCH = {"shapes": 256, "paper": 4}


def bench(preset: str, bf16: bool, repeats: int) -> dict:
    tok = load_image_tokenizer(preset)
    r, b = tok.resolution, BATCH[preset]
    x = torch.rand(b, 3, r, r) * 2 - 1
    times, cpu = [], []
    for i in range(repeats + 1):
        t, c = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tok.encode(x)
        if i:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    med, med_cpu = statistics.median(times), statistics.median(cpu)
    # images per CPU-second is what a shared machine still measures fairly (wall time includes waiting)
    return {
        "preset": preset,
        "resolution": r,
        "tokens": tok.h * tok.w,
        "batch": b,
        "bf16": bf16,
        "seconds_per_batch": med,
        "images_per_s": b / med,
        "images_per_cpu_s": b / med_cpu,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the quantizer stays fp32)")
    p.add_argument("--presets", nargs="+", default=["shapes", "paper"])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = [bench(n, a.bf16, a.repeats) for n in a.presets]
    for row in rows:
        print(json.dumps(row))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
