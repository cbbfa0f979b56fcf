"""Benchmark (not a test): text-to-image decoding throughput with classifier-free guidance.

Image tokens per second at batch 1, 8, 16, 32 for the ``shapes`` model dims (6 x 256, 8 heads;
64 image tokens per image; bf16 autocast on CPU), three ways, with the same random weights:

* ``ours``          cond + uncond rows in one batch, KV cache (``lit_cm3leon.decode.generate``);
* ``ours_bf16w``    as ``ours`` with ``param_dtype=torch.bfloat16`` (one bf16 copy of the
                    weights per call; CPU autocast otherwise re-casts every weight every step);
* ``ours_nocache``  the same loop recomputing the whole sequence every step;
* ``hf``            ``transformers.OPTForCausalLM.generate`` with its own CFG
                    (``guidance_scale`` + ``negative_prompt_ids``: the unconditional stream runs
                    as a second forward with its own cache), top-p sampling.

Prints one JSON object and a markdown table with ratios. Variants run interleaved, best of\n``--repeats`` rounds (the machine may be shared; the best run is the least disturbed). Machines differ: compare the ratios
of one run, not absolute numbers.

    PYTHONPATH=. python bench/generate.py [--batches 1 8 16 32] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lit_cm3leon.decode import generate, make_uncond_prompt  # noqa: E402
from lit_cm3leon.model import ModelConfig, build_model  # noqa: E402
from lit_cm3leon.model.interop import opt_config_kwargs, to_opt_state_dict  # noqa: E402
from lit_cm3leon.tokenizer.vocab import Vocab  # noqa: E402

VOCAB = Vocab(n_text=1024, n_image=256, image_h=8, image_w=8)  # shapes-world layout
PROMPT_TEXT = 15  # text tokens per prompt
CFG_SCALE, TOP_P = 3.0, 0.9


def make_models(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig.preset("shapes", vocab_size=VOCAB.size, cell_embedding=False, copy_heads=0)
    ).eval()
    with torch.no_grad():  # random, non-zero head so that sampling is not uniform
        torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    import transformers

    hf = transformers.OPTForCausalLM(
        transformers.OPTConfig(**opt_config_kwargs(model.config, pad_token_id=VOCAB.pad))
    )
    hf.load_state_dict(to_opt_state_dict(model), strict=False)
    hf.eval()
    return model, hf


def make_prompts(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [
        [
            VOCAB.bos,
            *torch.randint(0, VOCAB.n_text, (PROMPT_TEXT,), generator=g).tolist(),
            VOCAB.brk,
        ]
        for _ in range(batch)
    ]
    uncond = [make_uncond_prompt(VOCAB, [VOCAB.bos], [VOCAB.brk]) for _ in range(batch)]
    return prompts, uncond


def run_ours(model, prompts, uncond, use_cache: bool, param_dtype=None) -> int:
    out = generate(
        model,
        prompts,
        VOCAB,
        VOCAB.image_tokens + 1,
        strategy="cfg_topp",
        cfg_scale=CFG_SCALE,
        top_p=TOP_P,
        uncond_prompts=uncond,
        mode="image",
        seed=0,
        use_cache=use_cache,
        param_dtype=param_dtype,
    )
    n = sum(sum(VOCAB.is_image(t) for t in o) for o in out)
    assert n == len(prompts) * VOCAB.image_tokens, n
    return n


def run_hf(hf, prompts, uncond) -> int:
    ids, neg = torch.tensor(prompts), torch.tensor(uncond)
    new = VOCAB.image_tokens + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            negative_prompt_ids=neg,
            negative_prompt_attention_mask=torch.ones_like(neg),
            guidance_scale=CFG_SCALE,
            do_sample=True,
            top_p=TOP_P,
            top_k=0,
            temperature=1.0,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=VOCAB.pad,
            eos_token_id=VOCAB.eos,
        )
    assert out.shape[1] - ids.shape[1] == new
    return len(prompts) * VOCAB.image_tokens  # image tokens of the same work


def timed_interleaved(variants: dict, repeats: int) -> dict[str, tuple[float, float, int]]:
    """Run every variant once to warm up, then ``repeats`` rounds, one run of each variant per
    round (so that load from other processes hits all variants alike). Returns per variant
    (best seconds, median seconds, image tokens)."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            counts[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {n: (min(t), statistics.median(t), counts[n]) for n, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-nocache", action="store_true", help="skip the (slow) no-cache variant")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, hf = make_models()
    rows = []
    with (
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):  # no_grad: autocast caches weight casts
        for b in args.batches:
            prompts, uncond = make_prompts(b)
            row = {"batch": b}
            p, u = prompts, uncond
            variants = {
                "ours": lambda p=p, u=u: run_ours(model, p, u, True),
                "ours_bf16w": lambda p=p, u=u: run_ours(model, p, u, True, torch.bfloat16),
                "hf": lambda p=p, u=u: run_hf(hf, p, u),
            }
            if not args.no_nocache:
                variants["ours_nocache"] = lambda p=p, u=u: run_ours(model, p, u, False)
            for name, (best, median, n) in timed_interleaved(variants, args.repeats).items():
                row[f"{name}_s"] = round(best, 4)
                row[f"{name}_median_s"] = round(median, 4)
                row[f"{name}_tok_s"] = round(n / best, 1)
            row["ours_vs_hf"] = round(row["ours_tok_s"] / row["hf_tok_s"], 2)
            row["ours_bf16w_vs_hf"] = round(row["ours_bf16w_tok_s"] / row["hf_tok_s"], 2)
            if "ours_nocache_tok_s" in row:
                row["ours_vs_nocache"] = round(row["ours_tok_s"] / row["ours_nocache_tok_s"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    import transformers

    result = {
        "bench": "text-to-image CFG decoding, image tokens/s",
        "model": "shapes (6 x 256, 8 heads)",
        "image_tokens": VOCAB.image_tokens,
        "prompt_tokens": PROMPT_TEXT + 2,
        "cfg_scale": CFG_SCALE,
        "top_p": TOP_P,
        "dtype": "bf16 autocast (CPU)",
        "threads": args.threads,
        "timing": f"best of {args.repeats} interleaved rounds after a warm-up (tok/s from the best)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    has_nc = not args.no_nocache
    print(
        "\n| batch | ours tok/s | ours, bf16 weight copy | ours no-cache | HF OPT generate | ours / HF | ours bf16w / HF | ours / no-cache |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        nc = r.get("ours_nocache_tok_s", "-") if has_nc else "-"
        print(
            f"| {r['batch']} | {r['ours_tok_s']} | {r['ours_bf16w_tok_s']} | {nc} | {r['hf_tok_s']} | "
            f"{r['ours_vs_hf']}x | {r['ours_bf16w_vs_hf']}x | {r.get('ours_vs_nocache', '-')}x |"
        )
    return result


if __name__ == "__main__":
    main()
