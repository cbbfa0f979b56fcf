"""Training throughput: tokens/s and MFU of a full step, ours vs transformers' OPTForCausalLM.

One step = forward, token-weighted cross-entropy (each side's own: ``make_step``), backward, AdamW
step, under bf16 autocast on CPU. The peer is Hugging Face ``OPTForCausalLM`` built with identical
dimensions (no biases, affine-free pre-LN, GELU, untied head, same vocabulary and sequence
length) and loaded with our weights, so both compute the same function; the first-step losses
are recorded as a check. Each configuration (preset x eager/compile) is timed ``--repeats`` times,
ours and the peer alternating, and reported as medians: the machine may be shared, so the ratio
of the two within a repeat is the number that matters.

``shapes-data`` runs the ``shapes`` dimensions on the pretraining pipeline's own batches
(``bench/data.py``: 0-3 retrieved documents, CM3, about 45% padding), packed as pretraining
trains them (``data.packing``): ours with the block-diagonal mask, OPT with the restarting
``position_ids`` from which transformers builds the same mask; and, for reference, OPT on the
same sequences padded. tokens/s counts the non-pad tokens; the first-step losses agree.

MFU = tokens/s * FLOPs/token / peak, FLOPs/token from ``CM3LeonModule.flops_per_token`` (6 N + 12 L d T)
and the peak = best bf16 2048^3 matmul rate measured in the same run.

    PYTHONPATH=. python bench/train.py            # ~11 minutes on the shared 2-core CPU, half compiling
    PYTHONPATH=. python bench/train.py --quick    # smoke run (debug-sized, seconds)

Writes ``bench/results/train.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from lit_cm3leon.model import ModelConfig, build_model  # noqa: E402
from lit_cm3leon.model.interop import opt_config_kwargs, to_opt_state_dict  # noqa: E402
from lit_cm3leon.tokenizer.vocab import Vocab  # noqa: E402
from lit_cm3leon.utils.malloc import keep_freed_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# name -> model preset, vocabulary, batch, sequence length, timed steps per repeat
CONFIGS = {
    # the shapes-world training run: configs/experiment/pretrain.yaml (seq 384, batch 8)
    "shapes": dict(preset="shapes", vocab=(1024, 256), batch=8, seq=384, steps=4),
    # ~100M parameters (100,051,968 with this 9,330-id vocabulary), context 1,024
    "100m": dict(preset="100m", vocab=(8192, 1024), batch=1, seq=1024, steps=2),
    # the shapes run's own batches (bench/data.py's pipeline: 0-3 retrieved documents, CM3),
    # packed for both (and padded for OPT, for reference); tokens/s counts the non-pad tokens
    "shapes-data": dict(preset="shapes", vocab=None, batch=8, seq=384, steps=4, data=True),
}
DEVICE = torch.device("cpu")  # set by --device
QUICK = {"debug": dict(preset="debug", vocab=(256, 16), batch=2, seq=64, steps=2)}


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------


def matmul_peak(
    n: int = 2048, tries: int = 10, dtype: torch.dtype = torch.bfloat16
) -> tuple[float, float]:
    """Best FLOP/s of an ``n^3`` matmul in ``dtype`` over ``tries`` runs (after one warm-up), by wall
    clock and by process CPU time (the peak per CPU-second of the threads in use)."""
    a, b = (
        torch.randn(n, n, dtype=dtype, device=DEVICE),
        torch.randn(n, n, dtype=dtype, device=DEVICE),
    )
    torch.mm(a, b)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(tries):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        sync()
        best, best_cpu = (
            min(best, time.perf_counter() - t0),
            min(best_cpu, time.process_time() - c0),
        )
    return 2 * n**3 / best, 2 * n**3 / best_cpu


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "device": str(DEVICE) if DEVICE.type != "cuda" else torch.cuda.get_device_name(DEVICE),
    }


# ---------------------------------------------------------------------------------------------
# models and the training step
# ---------------------------------------------------------------------------------------------


def make_models(cfg: dict, seed: int = 0) -> tuple[ModelConfig, torch.nn.Module, torch.nn.Module]:
    """Ours and transformers' OPT with identical dimensions and weights."""
    import transformers

    vocab = Vocab(n_text=cfg["vocab"][0], n_image=cfg["vocab"][1])
    # no cell embedding: OPT has none, and both must compute the same function
    mcfg = ModelConfig.preset(
        cfg["preset"], vocab_size=vocab.size, cell_embedding=False, copy_heads=0
    )
    torch.manual_seed(seed)
    ours = build_model(mcfg)
    # the paper zero-inits the head; give it weights so both models produce non-trivial logits
    torch.nn.init.normal_(ours.lm_head.weight, std=mcfg.init_std)
    hf_cfg = transformers.OPTConfig(**opt_config_kwargs(mcfg, pad_token_id=vocab.pad))
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.OPTForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(to_opt_state_dict(ours), strict=False)
    if unexpected or any("bias" not in k and "layer_norm" not in k for k in missing):
        raise RuntimeError(f"OPT layout mismatch: missing {missing}, unexpected {unexpected}")
    ours.to(DEVICE).train()
    hf.to(DEVICE).train()
    return mcfg, ours, hf


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    from lit_cm3leon.training.cm3leon_module import CM3LeonModule

    return CM3LeonModule.flops_per_token(SimpleNamespace(net=model), seq_len)


def make_step(model: torch.nn.Module, is_hf: bool, compiled: bool):
    """A closure running one training step on a batch dict (``ids`` [B, T+1], ``weights``
    [B, T]; packed rows also ``doc_ids`` and ``positions``, which only ours takes); returns the
    loss.

    Each side computes the loss as its own training loop does: ours with the training module's
    ``CM3LeonTransformer.loss`` (hidden states to loss, logits never whole), OPT from its logits
    with ``F.cross_entropy`` on their float32 upcast (transformers' ``ForCausalLMLoss``), both
    weighted per token and divided by the sum of the weights."""
    import torch.nn.functional as F

    from lit_cm3leon.objective.sequence import attention_mask_from_doc_ids

    net = model if is_hf else model.loss
    net = torch.compile(net) if compiled else net
    # fused: the training module's default (`fused_adamw`) and transformers' Trainer's
    # (`adamw_torch_fused`), so each side steps as its own training loop would
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )

    def loss_of(batch: dict) -> torch.Tensor:
        inputs, targets = batch["ids"][:, :-1], batch["ids"][:, 1:]
        weights = batch["weights"]
        if is_hf:
            if "doc_ids" in batch:  # restarting position ids: transformers masks each sequence
                positions = batch["positions"][:, :-1]
                logits = net(input_ids=inputs, position_ids=positions, use_cache=False).logits
            else:  # right padding needs no mask in a causal LM: the pads come after every target
                logits = net(input_ids=inputs, use_cache=False).logits
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            return (ce * weights.flatten()).sum() / weights.sum().clamp_min(1e-8)
        row_weights = weights / weights.sum().clamp_min(1e-8)
        if "doc_ids" in batch:
            mask = attention_mask_from_doc_ids(batch["doc_ids"][:, :-1])
            positions = batch["positions"][:, :-1]
            return net(inputs, targets, row_weights, positions=positions, attn_mask=mask)[1]
        return net(inputs, targets, row_weights)[1]

    def step(batch: dict) -> float:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = loss_of(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


BOUND = "ours, attention free (bound)"


def attention_free(step):
    """``step`` with ours' attention replaced by its values (``out = v``: no scores, no softmax,
    nothing kept for the backward pass): the same step otherwise, so its time bounds what any
    attention implementation could give ours."""
    from lit_cm3leon.model import transformer

    def free(q, k, v, mask=None, block=128):
        return v

    def bound_step(batch: dict) -> float:
        real, transformer.block_causal_attention = transformer.block_causal_attention, free
        try:
            return step(batch)
        finally:
            transformer.block_causal_attention = real

    return bound_step


def time_steps(step, batch, n: int) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per step, averaged over ``n`` steps.

    On a shared machine the CPU time (with one thread) is the cost of the work itself, whatever
    share of the cores the process got; the wall time is what a dedicated machine would show
    only when the process is alone.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        step(batch)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def data_batches(cfg: dict, root: Path) -> tuple[list[dict], list[dict], Vocab]:
    """``cfg["steps"]`` batches of ``cfg["batch"]`` pretraining sequences (``bench/data.py``'s
    pipeline at ``cfg["seq"]``), packed for ours and padded for OPT, and their vocabulary."""
    from data import build_dataset
    from torch.utils.data import default_collate

    from lit_cm3leon.data.collate import PackedCollate

    ds = build_dataset(root, 2000, cfg["seq"])
    B = cfg["batch"]
    items = [[ds[b * B + j] for j in range(B)] for b in range(cfg["steps"])]
    to = lambda b: {k: v.to(DEVICE) for k, v in b.items()}  # noqa: E731
    packed = [to(PackedCollate(ds.vocab.pad)(batch)) for batch in items]
    return packed, [to(default_collate(batch)) for batch in items], ds.vocab


def random_batch(cfg: dict, vocab_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (cfg["batch"], cfg["seq"] + 1), generator=g)
    return {"ids": ids.to(DEVICE), "weights": torch.ones(cfg["batch"], cfg["seq"], device=DEVICE)}


def op_profile(step, batches: list[dict], n: int, top: int = 12) -> dict:
    """Where ``n`` steps spend their time: the ``top`` operators by self time (wall milliseconds
    per step in the calling thread, torch.profiler, which itself adds some overhead) and the
    total over all operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in range(n):
            step(batches[s % len(batches)])
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {
        "total_ms": sum(e.self_cpu_time_total for e in events) / 1e3 / n,
        "ops_ms": {e.key: e.self_cpu_time_total / 1e3 / n for e in events[:top]},
    }


def profile_table(profiles: dict[str, dict]) -> str:
    """A markdown table of :func:`op_profile` results side by side (one column per impl)."""
    impls = list(profiles)
    ops = sorted(
        {op for p in profiles.values() for op in p["ops_ms"]},
        key=lambda op: -max(p["ops_ms"].get(op, 0.0) for p in profiles.values()),
    )
    out = ["| operator | " + " | ".join(f"{i} (ms/step)" for i in impls) + " |"]
    out.append("| --- |" + " ---: |" * len(impls))
    for op in ops:
        cells = [profiles[i]["ops_ms"].get(op) for i in impls]
        out.append(
            f"| `{op}` | " + " | ".join("" if c is None else f"{c:.1f}" for c in cells) + " |"
        )
    out.append(
        "| all operators | " + " | ".join(f"{profiles[i]['total_ms']:.1f}" for i in impls) + " |"
    )
    return "\n".join(out)


def bench_config(
    name: str,
    cfg: dict,
    modes: list[str],
    repeats: int,
    warmup: int,
    add_peak,
    log,
    on_rows=None,
    profile_steps: int = 0,
    bound: bool = False,
) -> list[dict]:
    """Rows (one per mode x impl) for one preset; ours and OPT alternate within each repeat.
    With ``profile_steps`` each impl is then profiled (:func:`op_profile`, in the rows); with
    ``bound`` (eager only) a copy of ours also steps without attention (:func:`attention_free`)."""
    rows = []
    for mode in modes:
        if cfg.get("data"):
            with tempfile.TemporaryDirectory() as tmp:
                packed, padded, vocab = data_batches(cfg, Path(tmp))
            cfg = {**cfg, "vocab": (vocab.n_text, vocab.n_image)}  # the shapes BPE's size
            batches = {
                "ours": packed,
                "transformers OPT": packed,
                "transformers OPT, padded": padded,
            }
            # non-pad input tokens, per step on average (step s trains batch s of the list)
            tokens = statistics.mean(int((b["ids"][:, :-1] != vocab.pad).sum()) for b in padded)
        mcfg, ours, hf = make_models(cfg)
        if not cfg.get("data"):
            batch = random_batch(cfg, mcfg.vocab_size)
            batches = {"ours": [batch], "transformers OPT": [batch]}
            tokens = cfg["batch"] * cfg["seq"]
        fpt = flops_per_token(ours, cfg["seq"])
        impls = {
            "ours": make_step(ours, False, mode == "compile"),
            "transformers OPT": make_step(hf, True, mode == "compile"),
        }
        if bound and mode == "eager":  # the same weights, another copy
            impls[BOUND] = attention_free(make_step(copy.deepcopy(ours), False, False))
            batches[BOUND] = batches["ours"]
        if "transformers OPT, padded" in batches:  # the same weights, another copy
            hf_padded = copy.deepcopy(hf)
            impls["transformers OPT, padded"] = make_step(hf_padded, True, mode == "compile")
        first_loss, warm_s = {}, {}
        for impl, step in impls.items():
            t0 = time.perf_counter()
            # identical weights and sequences: the losses must agree
            first_loss[impl] = step(batches[impl][0])
            for w in range(1, warmup):
                step(batches[impl][w % len(batches[impl])])
            warm_s[impl] = time.perf_counter() - t0
            log(
                f"  {name} {mode} {impl}: warm-up {warm_s[impl]:.1f}s, first loss {first_loss[impl]:.4f}"
            )
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        cpu: dict[str, list[float]] = {impl: [] for impl in impls}
        compiled_before = dict(torch._dynamo.utils.counters["stats"])
        for r in range(repeats):
            # steps interleaved one by one (ours, OPT, OPT, ours, ...) so that both see the same
            # load; a repeat's time is the median of its steps
            per_step: dict[str, list[tuple[float, float]]] = {impl: [] for impl in impls}
            for s in range(cfg["steps"]):
                order = list(impls) if (r + s) % 2 == 0 else list(impls)[::-1]
                for impl in order:
                    batch = batches[impl][s % len(batches[impl])]
                    per_step[impl].append(time_steps(impls[impl], batch, 1))
            for impl in impls:
                times[impl].append(statistics.median(w for w, _ in per_step[impl]))
                cpu[impl].append(statistics.median(c for _, c in per_step[impl]))
            add_peak()
            log(
                f"  {name} {mode} repeat {r}: "
                + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items())
                + " (CPU "
                + ", ".join(f"{v[-1] * 1e3:.0f}" for v in cpu.values())
                + " ms)"
            )
        if dict(torch._dynamo.utils.counters["stats"]) != compiled_before:
            log(
                f"  warning: {name} {mode} recompiled during timing: {dict(torch._dynamo.utils.counters['stats'])}"
            )
        profiles = {}
        if profile_steps:
            profiles = {i: op_profile(impls[i], batches[i], profile_steps) for i in impls}
            log(
                f"  {name} {mode} profile ({profile_steps} steps each):\n" + profile_table(profiles)
            )
        vs_opt = {  # OPT's step time over ours (and over the bound's), repeat by repeat
            i: [h / o for o, h in zip(times[i], times["transformers OPT"], strict=True)]
            for i in ("ours", BOUND)
            if i in times
        }
        cpu_vs_opt = {
            i: [h / o for o, h in zip(cpu[i], cpu["transformers OPT"], strict=True)] for i in vs_opt
        }
        for impl, ts in times.items():
            med = statistics.median(ts)
            rows.append(
                dict(
                    config=name,
                    preset=cfg["preset"],
                    mode=mode,
                    impl=impl,
                    batch=cfg["batch"],
                    seq=cfg["seq"],
                    rows=statistics.mean(int(b["ids"].shape[0]) for b in batches[impl]),
                    tokens_per_step=tokens,
                    params=sum(p.numel() for p in ours.parameters()),
                    vocab_size=mcfg.vocab_size,
                    flops_per_token=fpt,
                    steps_per_repeat=cfg["steps"],
                    step_s=ts,
                    step_s_median=med,
                    tokens_per_s=tokens / med,
                    tokens_per_s_all=[tokens / t for t in ts],
                    first_loss=first_loss[impl],
                    warmup_s=warm_s[impl],
                    speedup_vs_opt=statistics.median(vs_opt[impl]) if impl in vs_opt else None,
                    speedup_vs_opt_all=vs_opt.get(impl),
                    step_cpu_s=cpu[impl],
                    step_cpu_s_median=statistics.median(cpu[impl]),
                    tokens_per_cpu_s=tokens / statistics.median(cpu[impl]),
                    speedup_vs_opt_cpu=(
                        statistics.median(cpu_vs_opt[impl]) if impl in cpu_vs_opt else None
                    ),
                    speedup_vs_opt_cpu_all=cpu_vs_opt.get(impl),
                    profile=profiles.get(impl),
                )
            )
        del ours, hf, impls
        torch._dynamo.reset()
        if on_rows is not None:
            on_rows(rows)
    return rows


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def impl_label(r: dict) -> str:
    rows = r.get("rows", r["batch"])
    if rows == r["batch"]:
        return r["impl"]
    return f"{r['impl']} ({rows:.2f} packed rows)"


def table(rows: list[dict], peak: float, peak_cpu: float) -> str:
    out = [
        "| config | mode | impl | step ms (wall) | tokens/s (wall) | MFU (wall) | ours/OPT (wall) "
        "| step ms (CPU) | tokens/CPU-s | MFU (CPU) | ours/OPT (CPU) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        mfu = r["tokens_per_s"] * r["flops_per_token"] / peak
        mfu_cpu = r["tokens_per_cpu_s"] * r["flops_per_token"] / peak_cpu
        ratio = f"{r['speedup_vs_opt']:.2f}x" if r["speedup_vs_opt"] is not None else ""
        ratio_cpu = f"{r['speedup_vs_opt_cpu']:.2f}x" if r["speedup_vs_opt_cpu"] is not None else ""
        # the bound skips the attention's FLOPs, so it has no MFU
        mfu, mfu_cpu = ("", "") if r["impl"] == BOUND else (f"{mfu:.1%}", f"{mfu_cpu:.1%}")
        out.append(
            f"| {r['config']} (B{r['batch']} x T{r['seq']}, {r['params'] / 1e6:.1f}M) | {r['mode']} | {impl_label(r)} "
            f"| {r['step_s_median'] * 1e3:.0f} | {r['tokens_per_s']:,.0f} | {mfu} | {ratio} "
            f"| {r['step_cpu_s_median'] * 1e3:.0f} | {r['tokens_per_cpu_s']:,.0f} | {mfu_cpu} | {ratio_cpu} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: debug-sized model, 1 repeat")
    p.add_argument("--configs", nargs="+", default=None, help=f"subset of {sorted(CONFIGS)}")
    p.add_argument(
        "--modes",
        nargs="+",
        default=None,
        choices=["eager", "compile"],
        help="default: both (eager with --quick)",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed repeats per configuration (medians)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per repeat (default: per config)"
    )
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first (compilation, optimizer state)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch's default). 1 by default: on a shared machine two OpenMP threads "
        "stall at every barrier waiting for a core; on a dedicated machine use 0",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda (bf16 autocast on either; CPU times are then moot)",
    )
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc malloc's defaults (by default both models run with the freed-memory "
        "reuse the training command sets: lit_cm3leon.utils.malloc)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile N steps of each impl: the costliest operators side by side "
        "(printed, and in the JSON rows as `profile`)",
    )
    p.add_argument(
        "--attention-free",
        action="store_true",
        help="eager: also step a copy of ours whose attention returns its values (the bound any "
        "attention implementation could reach; its own row)",
    )
    p.add_argument("--out", default=str(RESULTS / "train.json"), help="JSON output path")
    p.add_argument(
        "--report",
        nargs="+",
        default=None,
        metavar="JSON",
        help="only print the table of earlier results",
    )
    args = p.parse_args(argv)
    if args.report:
        for path in args.report:
            res = json.loads(Path(path).read_text())
            print(
                f"{path}: `{res['command']}`; peak {res['peak_bf16_flops'] / 1e9:.0f} GFLOP/s wall, "
                f"{res['peak_bf16_flops_per_cpu_s'] / 1e9:.0f} GFLOP per CPU-s; wall {res['wall_s']:.0f} s; load avg "
                f"{res['machine']['loadavg_start'][0]:.1f} -> {res['machine']['loadavg_end'][0]:.1f}\n"
            )
            print(
                table(res["rows"], res["peak_bf16_flops"], res["peak_bf16_flops_per_cpu_s"]) + "\n"
            )
        return 0
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    malloc_tuned = not args.default_malloc and keep_freed_memory()
    configs = QUICK if args.quick else {k: CONFIGS[k] for k in (args.configs or CONFIGS)}
    repeats = 1 if args.quick else args.repeats
    if args.steps:
        configs = {k: {**v, "steps": args.steps} for k, v in configs.items()}
    modes = args.modes or (["eager"] if args.quick else ["eager", "compile"])

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    info = {**machine(), "malloc_keeps_freed_memory": malloc_tuned}
    peaks, peaks_cpu = [], []  # appended to by bench_config after every repeat

    def add_peak(tries: int = 5) -> None:
        wall, cpu = matmul_peak(tries=tries)
        peaks.append(wall)
        peaks_cpu.append(cpu)

    add_peak(10)
    log(
        f"bf16 matmul 2048^3: {peaks[0] / 1e9:.0f} GFLOP/s wall, {peaks_cpu[0] / 1e9:.0f} GFLOP per CPU-s"
    )
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "PYTHONPATH=. python bench/train.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )

    def write(
        new_rows: list[dict] = (),
    ) -> dict:  # after every configuration: partial results survive
        peak, peak_cpu = max(peaks), max(peaks_cpu)
        done = rows + [r for r in new_rows if r not in rows]
        for r in done:
            r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
            r["mfu_cpu"] = r["tokens_per_cpu_s"] * r["flops_per_token"] / peak_cpu
        info["loadavg_end"] = os.getloadavg()
        result = dict(
            benchmark="train",
            command=command.strip(),
            machine=info,
            peak_bf16_flops=peak,
            peak_bf16_flops_all=peaks,
            peak_bf16_flops_per_cpu_s=peak_cpu,
            peak_bf16_flops_per_cpu_s_all=peaks_cpu,
            repeats=repeats,
            warmup_steps=args.warmup,
            wall_s=time.perf_counter() - t_start,
            rows=done,
        )
        out.write_text(json.dumps(result, indent=1))
        return result

    for name, cfg in configs.items():
        rows += bench_config(
            name,
            cfg,
            modes,
            repeats,
            args.warmup,
            add_peak,
            log,
            write,
            args.profile,
            args.attention_free,
        )
    result = write()
    peak, peak_cpu = result["peak_bf16_flops"], result["peak_bf16_flops_per_cpu_s"]
    print(
        f"bf16 matmul peak (2048^3, best of {len(peaks) * 5 + 5}): {peak / 1e9:.0f} GFLOP/s wall, "
        f"{peak_cpu / 1e9:.0f} GFLOP per CPU-s; {torch.get_num_threads()} thread(s); "
        f"{repeats} repeats, medians; wall {result['wall_s']:.0f} s; load avg {info['loadavg_start'][0]:.1f} -> "
        f"{info['loadavg_end'][0]:.1f}\n"
    )
    print(table(rows, peak, peak_cpu))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
