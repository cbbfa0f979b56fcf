"""Held-out image-token perplexity with 0, 1, 2 retrieved documents vs a unigram baseline.

    python eval/perplexity.py --ckpt outputs/pretrain --out outputs/eval/perplexity/metrics.json

Reads the held-out pairs from ``outputs/tokens/shapes-heldout`` (captions + image codes), the
training shards for the baseline, the tokenizers and the memory bank under ``--outputs``.
Writes ``ppl_image_k0``, ``ppl_image_k1``, ... and ``ppl_image_unigram`` (exp of the mean NLL
per image token) with bootstrap 95% intervals over images, and ``ppl_image_own``: the image's
own document as the one retrieved document, the most retrieval could give (a decoder that reads
its retrieved images copies it; one that ignores them scores as at k0).

Landmarks (``--landmarks``, default ``outputs/tokens/landmarks-heldout`` when it exists): held-out
views of the world's named scenes, whose captions name a landmark without describing it. The same
numbers for them are ``ppl_landmark_k0`` ... ``ppl_landmark_unigram``: knowledge the decoder
either memorised or finds in a retrieved document that shows the landmark.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/perplexity.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from lit_cm3leon.evaluation import bootstrap
from lit_cm3leon.evaluation.metrics_io import (
    add_run_args,
    ckpt_run_out,
    header_from_args,
    print_metrics,
    write_metrics,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--outputs", default="outputs", help="the pipeline's outputs/ folder")
    p.add_argument(
        "--heldout", default=None, help="held-out shards (default <outputs>/tokens/shapes-heldout)"
    )
    p.add_argument(
        "--train", default=None, help="training shards (default <outputs>/tokens/shapes-train)"
    )
    p.add_argument(
        "--landmarks",
        default=None,
        help="held-out landmark views (default <outputs>/tokens/landmarks-heldout, if present; "
        "'none' to skip)",
    )
    p.add_argument(
        "--k", type=int, nargs="+", default=[0, 1, 2], help="retrieved documents to compare"
    )
    p.add_argument("--n", type=int, default=500, help="held-out pairs to score")
    add_run_args(p, protocol="shapes-ppl")
    args = p.parse_args(argv)
    out = ckpt_run_out(p, args, "a published decoder, e.g. outputs/pretrain")
    if out is None:
        return 2
    import torch

    from lit_cm3leon.data.shards import TokenShards
    from lit_cm3leon.engine import Engine
    from lit_cm3leon.evaluation.perplexity import perplexity_table

    torch.manual_seed(args.seed)
    outputs = Path(args.outputs)
    heldout = TokenShards(args.heldout or outputs / "tokens" / "shapes-heldout")
    train = TokenShards(args.train or outputs / "tokens" / "shapes-train")
    n = min(args.n, len(heldout))
    engine = Engine.load(args.ckpt, outputs, retrieval=max(args.k) > 0)
    sets = {"ppl_image": heldout}
    landmarks = Path(args.landmarks or outputs / "tokens" / "landmarks-heldout")
    if args.landmarks not in (None, "none") or (landmarks / "manifest.json").is_file():
        sets["ppl_landmark"] = TokenShards(landmarks)  # an explicit path must exist
    metrics, ci95 = {}, {}
    for prefix, shards in sets.items():
        m = min(args.n, len(shards))
        captions = [shards.text(i) for i in range(m)]
        nll = perplexity_table(engine, captions, shards.codes[:m], train.codes, args.k)

        def stat(idx: np.ndarray, nll=nll, prefix=prefix) -> dict[str, float]:
            return {k.replace("nll", prefix): float(np.exp(v[idx].mean())) for k, v in nll.items()}

        metrics.update(stat(np.arange(m)))
        ci95.update(bootstrap.bootstrap_ci(m, stat, args.bootstrap, args.seed))
    header = header_from_args(args, n)
    record = write_metrics(
        out, header, metrics, ci95, bootstrap.info(args.bootstrap, args.seed, unit="image")
    )
    print_metrics(record, record["ci95"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
