"""The decoding ablation in the layout of the paper's Figure 4: FID against CFG scale per model
size (left) and FID against samples per prompt per strategy (right).

Every cell is a text-to-image run folder under ``outputs/eval/t2i/`` (``t2i_run``), reused when
finished, so a killed sweep resumes and cells shared with ``eval/coco_fid.py --ckpt`` are made
once.

Left panel: one ordinary run per (checkpoint, CFG scale) at one sample per prompt.

Right panel, without regenerating per k: for each base strategy, ``K = max(samples)``
candidates per prompt are generated once (folder ``..._s<K>_..._candidates``: codes and their
retriever-CLIP scores); the cell with k samples keeps, per prompt, the best-scored of the first
k candidates (folder ``..._s<k>_..._prefix<K>``). That is exactly CLIP re-ranking of k samples,
with the k samples being the first k of the K drawn. ``mixed`` needs no generation of its own:
its candidates alternate the ``cfg_topp`` and ``cdk`` ones (a0 b0 a1 b1 ...), so k of them hold
ceil(k/2) ``cfg_topp`` and floor(k/2) ``cdk`` samples, the split of the mixed strategy.
Unguided strategies (``temperature``, ``topp``) run at CFG scale 1.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lit_cm3leon.evaluation import t2i_run as tr
from lit_cm3leon.evaluation.metrics_io import InputError

UNGUIDED = ("temperature", "topp")
PRESETS = {
    "shapes": dict(
        n=250, cfg_scales=[1, 2, 3, 5, 7], samples=[1, 2, 4, 8, 16], samples_cfg_scale=3.0,
        strategies=["cfg_topp", "cdk", "mixed"], bootstrap=200,
    ),
    "paper": dict(
        n=1000, cfg_scales=[1, 2, 3, 4, 5, 6, 7], samples=[1, 2, 4, 8, 16, 32], samples_cfg_scale=3.0,
        strategies=["topp", "cfg_topp", "cdk", "mixed"], bootstrap=200,
    ),
}  # fmt: skip
PAPER_FIGURE4 = (
    "The paper's Figure 4 (CM3Leon 350M / 760M / 7B, zero-shot MS-COCO FID) shows (left) that "
    "the best CFG scale is about the same for every model size and (right) that with more "
    "samples per prompt, re-ranked by CLIP, the mixed top-p + CD-K strategy keeps improving "
    "where either alone flattens. Its values are only given as curves, so they are not "
    "reproduced here as numbers; the findings below compare ours with those two statements."
)


@dataclass
class Ablation:
    ckpts: dict[str, str]  # model size label -> checkpoint
    n: int = 250
    cfg_scales: list[float] = field(default_factory=lambda: [1, 2, 3, 5, 7])
    cfg_strategy: str = "cfg_topp"
    samples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    samples_cfg_scale: float = 3.0
    strategies: list[str] = field(default_factory=lambda: ["cfg_topp", "cdk", "mixed"])
    samples_ckpts: str = "first"  # first | all: which checkpoints get the samples panel
    seed: int = 0
    chunk: int = tr.CHUNK
    bootstrap: int = 200
    features: str = "clip"
    name: str = "shapes"


@dataclass
class Cell:
    panel: str  # cfg | samples
    size: str
    ckpt: str
    strategy: str
    cfg_scale: float
    num_samples: int
    folder: Path | None = None
    record: dict | None = None


def parse_ckpts(items: Sequence[str]) -> dict[str, str]:
    """``["small=outputs/pretrain_small", "outputs/pretrain"]`` -> {size label: path}."""
    out: dict[str, str] = {}
    for item in items:
        size, _, path = item.partition("=") if "=" in item else (tr.ckpt_label(item), "", item)
        if size in out:
            raise InputError(f"two checkpoints named {size!r}; name them: size=path")
        out[size] = path
    return out


def base_strategies(strategies: Sequence[str]) -> list[str]:
    """The strategies whose candidates must be generated (mixed reuses cfg_topp and cdk)."""
    need: list[str] = []
    for s in strategies:
        for b in ("cfg_topp", "cdk") if s == "mixed" else (s,):
            if b not in need:
                need.append(b)
    return need


def _dec(strategy: str, cfg_scale: float, num_samples: int):
    from lit_cm3leon.engine import Decoding

    return Decoding(
        strategy=strategy,
        cfg_scale=1.0 if strategy in UNGUIDED else float(cfg_scale),
        num_samples=num_samples,
    )


def run(
    cfg: Ablation,
    res: tr.Resources,
    pset: tr.PromptSet,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    log=print,
) -> list[Cell]:
    """Generate (this rank's chunks) and score every cell that is complete; returns all cells
    (``record`` None for cells still waiting on other ranks)."""
    cells: list[Cell] = []
    for size, ckpt in cfg.ckpts.items():
        for s in cfg.cfg_scales:
            dec = _dec(cfg.cfg_strategy, s, 1)
            log(f"[cfg] {size} {cfg.cfg_strategy} cfg={s:g}")
            folder, rec = tr.evaluate_ckpt(ckpt, dec, res, pset, cfg.seed, cfg.features, None, cfg.chunk, rank,
                                           world_size, cfg.bootstrap, progress=progress)  # fmt: skip
            cells.append(Cell("cfg", size, ckpt, cfg.cfg_strategy, dec.cfg_scale, 1, folder, rec))
    sizes = list(cfg.ckpts) if cfg.samples_ckpts == "all" else list(cfg.ckpts)[:1]
    K = max(cfg.samples)
    for size in sizes:
        ckpt = cfg.ckpts[size]
        cand = {
            b: candidates(ckpt, b, cfg, res, pset, K, rank, world_size, log)
            for b in base_strategies(cfg.strategies)
        }
        for strategy in cfg.strategies:
            for k in cfg.samples:
                log(f"[samples] {size} {strategy} k={k}")
                folder, rec = prefix_cell(ckpt, strategy, k, K, cand, cfg, res, pset)
                cells.append(
                    Cell(
                        "samples",
                        size,
                        ckpt,
                        strategy,
                        _dec(strategy, cfg.samples_cfg_scale, k).cfg_scale,
                        k,
                        folder,
                        rec,
                    )
                )
    return cells


def candidates(ckpt, strategy, cfg: Ablation, res, pset, K, rank, world_size, log) -> Path:
    """The candidates folder of one base strategy (generated where missing)."""
    dec = _dec(strategy, cfg.samples_cfg_scale, K)
    n = len(pset.prompts)
    folder = (
        res.outputs
        / "eval"
        / "t2i"
        / tr.run_name(ckpt, pset.protocol, n, dec, cfg.seed, "_candidates")
    )
    spec = tr.RunSpec(str(ckpt), tr.file_digest(tr.ckpt_file(ckpt)), pset.protocol, n, cfg.seed, cfg.chunk,
                      asdict(dec), {"kind": "candidates"})  # fmt: skip
    spec.check_against(folder)
    n_chunks = math.ceil(n / cfg.chunk)
    if not all(tr.candidate_path(folder, c).is_file() for c in range(n_chunks)):
        log(f"[candidates] {tr.ckpt_label(ckpt)} {strategy}: {K} per prompt")
        engine = res.engine(ckpt, retrieval=dec.retrieve_k > 0)
        tr.generate_candidates(
            engine,
            pset.prompts,
            dec,
            folder,
            res.rerank_scorer(),
            cfg.seed,
            cfg.chunk,
            rank,
            world_size,
        )
    return folder


def prefix_cell(
    ckpt, strategy: str, k: int, K: int, cand: dict[str, Path], cfg: Ablation, res, pset
) -> tuple[Path, dict | None]:
    n = len(pset.prompts)
    dec = _dec(strategy, cfg.samples_cfg_scale, k)
    folder = (
        res.outputs
        / "eval"
        / "t2i"
        / tr.run_name(ckpt, pset.protocol, n, dec, cfg.seed, f"_prefix{K}")
    )
    if tr.is_finished(folder):
        import json

        return folder, json.loads((folder / "metrics.json").read_text())
    parts = ("cfg_topp", "cdk") if strategy == "mixed" else (strategy,)
    try:
        loaded = [tr.load_candidates(cand[b], n, cfg.chunk) for b in parts]
    except InputError:
        return folder, None  # other ranks still generating
    codes = tr.interleave(*[c for c, _ in loaded]) if len(loaded) > 1 else loaded[0][0]
    scores = tr.interleave(*[s for _, s in loaded]) if len(loaded) > 1 else loaded[0][1]
    selection = f"best (retriever CLIP) of the first {k} of {K} candidates" + (
        " alternating cfg_topp and cdk" if strategy == "mixed" else ""
    )
    spec = tr.RunSpec(str(ckpt), tr.file_digest(tr.ckpt_file(ckpt)), pset.protocol, n, cfg.seed, cfg.chunk,
                      asdict(dec), {"selection": selection, "candidates": [str(cand[b]) for b in parts]})  # fmt: skip
    spec.check_against(folder)
    if tr.missing_samples(folder, n):
        best = tr.best_of_prefix(scores, k)
        engine = res.engine(ckpt, retrieval=False)
        chosen = codes[np.arange(n), best]
        tr.write_images(folder / "samples", engine.decode_images(chosen))
    from lit_cm3leon.evaluation.t2i import write_prompts

    write_prompts(folder, pset.prompts)
    scorers = tr.Scorers(cfg.features, res.eval_clip(required=cfg.features == "clip"))
    rec = tr.score_run(folder, pset.prompts, pset.reference, tr.header_for(spec, dec), scorers, pset.scenes,
                       cfg.bootstrap, cfg.seed, extra={"run_dir": str(folder), "selection": selection},
                       world=pset.world)  # fmt: skip
    return folder, rec


# ----------------------------------------------------------------------------- outputs
COLUMNS = ("panel", "size", "strategy", "cfg_scale", "num_samples", "n", "metric", "fid", "fid_lo", "fid_hi",
           "clip_score", "attr_acc", "exact", "count_acc", "ckpt", "run_dir")  # fmt: skip


def rows(cells: Sequence[Cell]) -> list[dict]:
    out = []
    for c in cells:
        r = c.record or {}
        ci = r.get("ci95", {}).get("fid", [None, None])
        out.append({
            "panel": c.panel, "size": c.size, "strategy": c.strategy, "cfg_scale": c.cfg_scale,
            "num_samples": c.num_samples, "n": r.get("n"), "metric": r.get("metric"), "fid": r.get("fid"),
            "fid_lo": ci[0], "fid_hi": ci[1], "clip_score": r.get("clip_score"), "attr_acc": r.get("attr_acc"),
            "exact": r.get("exact"), "count_acc": r.get("count_acc"), "ckpt": c.ckpt, "run_dir": str(c.folder),
        })  # fmt: skip
    return out


def to_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r in table:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


def _cell(r: dict | None) -> str:
    if r is None or r["fid"] is None:
        return "–"
    ci = f" [{r['fid_lo']:.3f}, {r['fid_hi']:.3f}]" if r["fid_lo"] is not None else ""
    return f"{r['fid']:.3f}{ci}"


def _pivot(table: list[dict], panel: str, row_key: str, col_key: str) -> tuple[list, list, dict]:
    sel = [r for r in table if r["panel"] == panel]
    rows_ = sorted({r[row_key] for r in sel})
    cols = list(dict.fromkeys(r[col_key] for r in sel))
    return rows_, cols, {(r[row_key], r[col_key]): r for r in sel}


def findings(table: list[dict]) -> list[str]:
    out = []
    rws, cols, at = _pivot(table, "cfg", "cfg_scale", "size")
    best = {}
    for size in cols:
        vals = [
            (at[(s, size)]["fid"], s)
            for s in rws
            if (s, size) in at and at[(s, size)]["fid"] is not None
        ]
        if vals:
            best[size] = min(vals)[1]
    if best:
        same = len(set(best.values())) == 1
        out.append("Best CFG scale per size: " + ", ".join(f"{k}: {v:g}" for k, v in best.items())
                   + (" (the same for every size, as in the paper)." if same and len(best) > 1 else
                      "." if len(best) == 1 else " (differs across sizes, unlike the paper)."))  # fmt: skip
    rws, cols, at = _pivot(table, "samples", "num_samples", "strategy")
    for strategy in cols:
        vals = [
            (k, at[(k, strategy)]["fid"])
            for k in rws
            if (k, strategy) in at and at[(k, strategy)]["fid"] is not None
        ]
        if len(vals) >= 2:
            (k0, f0), (k1, f1), (kl, fl) = vals[0], vals[-2], vals[-1]
            out.append(f"{strategy}: FID {f0:.3f} at {k0} sample(s) -> {fl:.3f} at {kl}; last step {k1}->{kl}: "
                       f"{'improves' if fl < f1 else 'does not improve'} ({fl - f1:+.3f}).")  # fmt: skip
    return out


def to_markdown(table: list[dict], title: str) -> str:
    metric = next((r["metric"] for r in table if r["metric"]), "FID")
    lines = [
        f"# Figure 4 ({title}): {metric} of text-to-image samples, lower is better",
        "",
        PAPER_FIGURE4,
        "",
    ]
    rws, cols, at = _pivot(table, "cfg", "cfg_scale", "size")
    if cols:
        strategy = next(r["strategy"] for r in table if r["panel"] == "cfg")
        lines += [f"## {metric} against CFG scale per model size ({strategy}, 1 sample; 95% CI)", "",
                  "| CFG scale | " + " | ".join(map(str, cols)) + " |", "| --- |" + " --- |" * len(cols)]  # fmt: skip
        lines += [
            f"| {s:g} | " + " | ".join(_cell(at.get((s, c))) for c in cols) + " |" for s in rws
        ]
        lines.append("")
    rws, cols, at = _pivot(table, "samples", "num_samples", "strategy")
    if cols:
        size = next(r["size"] for r in table if r["panel"] == "samples")
        lines += [f"## {metric} against samples per prompt per strategy ({size}; CLIP re-ranked; 95% CI)", "",
                  "| samples | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]  # fmt: skip
        lines += [f"| {k} | " + " | ".join(_cell(at.get((k, c))) for c in cols) + " |" for k in rws]
        lines += ["", "Samples k are the first k of max(k) candidates generated once per prompt (see "
                  "lit_cm3leon/evaluation/ablation.py); mixed alternates cfg_topp and cdk candidates.", ""]  # fmt: skip
    lines += ["## Findings", ""] + [f"- {f}" for f in findings(table)]
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next((r["metric"] for r in table if r["metric"]), "FID")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, panel, xkey, group in (
        (axes[0], "cfg", "cfg_scale", "size"),
        (axes[1], "samples", "num_samples", "strategy"),
    ):
        sel = [r for r in table if r["panel"] == panel and r["fid"] is not None]
        for g in dict.fromkeys(r[group] for r in sel):
            pts = sorted(
                (r[xkey], r["fid"], r["fid_lo"], r["fid_hi"]) for r in sel if r[group] == g
            )
            x, y = [p[0] for p in pts], [p[1] for p in pts]
            err = None
            if all(p[2] is not None for p in pts):
                err = np.array(
                    [[max(0.0, p[1] - p[2]) for p in pts], [max(0.0, p[3] - p[1]) for p in pts]]
                )
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=str(g))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if sel:
            ax.legend(title=group)
    axes[0].set_xlabel("CFG scale")
    axes[0].set_title(f"{metric} vs CFG scale per model size")
    axes[1].set_xlabel("samples per prompt (CLIP re-ranked)")
    axes[1].set_xscale("log", base=2)
    ks = sorted({r["num_samples"] for r in table if r["panel"] == "samples"})
    if ks:
        axes[1].set_xticks(ks, [str(k) for k in ks])
    axes[1].set_title(f"{metric} vs samples per strategy")
    fig.suptitle(f"Figure 4 layout ({title})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(cells: Sequence[Cell], out_dir: str | Path, title: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = rows(cells)
    paths = {
        "csv": out_dir / "figure4.csv",
        "md": out_dir / "figure4.md",
        "png": out_dir / "figure4.png",
    }
    paths["csv"].write_text(to_csv(table))
    paths["md"].write_text(to_markdown(table, title))
    plot(table, paths["png"], title)
    return paths


def config(preset: str, **overrides) -> Ablation:
    if preset not in PRESETS:
        raise InputError(f"ablation={preset!r}: choose one of {sorted(PRESETS)}")
    base = {k: v for k, v in PRESETS[preset].items()}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return replace(Ablation(ckpts=base.pop("ckpts")), name=preset, **base)
