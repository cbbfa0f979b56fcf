"""One attention layer of a training step: the block attention against SDPA's flash kernel.

Forward + backward (and forward alone) of causal self-attention on bf16 [B, H, T, Dh] inputs,
``lit_cm3leon.model.attention.block_causal_attention`` (at each ``--blocks`` size) against
``F.scaled_dot_product_attention(is_causal=True)``, interleaved round by round so that both see
the same machine; medians in milliseconds. The training command's malloc setting is on, as in
``bench/train.py``.

    PYTHONPATH=. python bench/attention.py                      # the 100m preset's layer
    PYTHONPATH=. python bench/attention.py --shape 8 8 384 32   # the shapes preset's layer (B=8)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lit_cm3leon.model.attention import block_causal_attention
from lit_cm3leon.utils.malloc import keep_freed_memory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shape", type=int, nargs=4, default=[1, 12, 1024, 64], metavar=("B", "H", "T", "DH")
    )
    p.add_argument("--blocks", type=int, nargs="+", default=[128, 256], help="query block sizes")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (medians)")
    args = p.parse_args(argv)
    keep_freed_memory()
    torch.manual_seed(0)
    q, k, v = (torch.randn(*args.shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(*args.shape, dtype=torch.bfloat16)
    impls = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for b in args.blocks:
        impls[f"block {b}"] = lambda q, k, v, b=b: block_causal_attention(q, k, v, block=b)

    def fwd_bwd(f):
        out = f(q, k, v)
        out.backward(grad_out)
        q.grad = k.grad = v.grad = None

    def fwd(f):
        with torch.no_grad():
            f(q, k, v)

    runs = {
        (n, kind): (run, f)
        for n, f in impls.items()
        for kind, run in (("fwd+bwd", fwd_bwd), ("fwd", fwd))
    }
    for run, f in runs.values():  # warm-up
        run(f)
    times: dict = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, (run, f) in runs.items():
            t0 = time.perf_counter()
            run(f)
            times[key].append(time.perf_counter() - t0)
    print(
        f"shape {args.shape}, {torch.get_num_threads()} threads, medians of {args.rounds} rounds (ms)\n"
    )
    print("| impl | fwd + bwd | fwd |\n| --- | ---: | ---: |")
    for n in impls:
        cells = [statistics.median(times[(n, kind)]) * 1e3 for kind in ("fwd+bwd", "fwd")]
        print(f"| {n} | {cells[0]:.1f} | {cells[1]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
