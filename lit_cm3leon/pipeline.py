"""The main job: the whole suite on the shapes world, stage by stage.

``python -m lit_cm3leon.pipeline [--budget full|reduced] [--only STAGE ...]``

Each stage is one command of the suite (``prepare``, ``fit``, ``eval/...``) run as a child
process; a stage whose published artifact (``outputs/<stage>/manifest.json``) exists is skipped,
so a rerun resumes where a killed run stopped (training stages resume from their
``last.ckpt``). Wall time per stage goes to ``outputs/pipeline.json`` and into the report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lit_cm3leon.utils.manifest import read_manifest

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stage:
    name: str  # also the folder under outputs/ whose manifest marks it done
    command: list[str]
    reduced: list[str] = field(default_factory=list)  # extra args for --budget reduced
    budget_min: float = 0.0  # minutes on 2 cores at the full budget
    marker: str = "manifest.json"  # the file whose presence marks the stage finished

    def done(self, out: Path) -> bool:
        if self.marker == "manifest.json":
            return read_manifest(out / self.name) is not None
        return (out / self.name / self.marker).is_file()


def fit(experiment: str, *overrides: str) -> list[str]:
    return [PY, "-m", "lit_cm3leon.fit", f"experiment={experiment}", *overrides]


def prepare(*args: str) -> list[str]:
    return [PY, "-m", "lit_cm3leon.prepare", *args]


def evaluate(script: str, name: str, *args: str) -> list[str]:
    with_run = ("coco_fid", "captioning", "vqa", "image_tasks")
    run = ["--run-dir", f"{{o}}/{name}/run"] if script in with_run else []
    return [
        PY,
        str(ROOT / "eval" / f"{script}.py"),
        "--outputs",
        "{o}",
        "--out",
        f"{{o}}/{name}/metrics.json",
        *run,
        *args,
    ]


def stages(out: Path) -> list[Stage]:
    o = str(out)

    def ev(script: str, name: str, *args: str, reduced=(), budget_min: float = 0.5) -> Stage:
        cmd = [c.replace("{o}", o) for c in evaluate(script, name, *args)]
        return Stage(name, cmd, list(reduced), budget_min, marker="metrics.json")

    def tokenize(split: str, name: str, n: int, landmark_views: int = 0) -> list[str]:
        views = ["--landmark-views", str(landmark_views)] if landmark_views else []
        return prepare(
            "tokenize",
            *("--source", "shapes", "--split", split, "--n", str(n), *views),
            *("--caption", "long", "--tokenizer", f"{o}/image_tokenizer"),
            *("--out", f"{o}/tokens/{name}"),
        )

    t2i = ("--strategy", "cfg_topp", "--cfg-scale", "3", "--num-samples", "1", "--seed", "0")
    return [
        Stage(
            "text_tokenizer",
            prepare("text-tokenizer", "--out", f"{o}/text_tokenizer"),
            budget_min=0.5,
        ),
        Stage(
            "image_tokenizer",
            fit("tokenizer"),
            ["trainer.max_steps=2820", "trainer.val_check_interval=1410"],
            budget_min=3.5,
        ),
        Stage(
            "tokens/shapes-train",
            tokenize("train", "shapes-train", 20000, landmark_views=12000),
            ["--n", "8000", "--landmark-views", "8000"],
            budget_min=1.0,
        ),
        Stage(
            "tokens/shapes-heldout",
            tokenize("heldout", "shapes-heldout", 1000),
            ["--n", "500"],
            budget_min=0.2,
        ),
        Stage(
            "tokens/landmarks-heldout",
            tokenize("heldout", "landmarks-heldout", 0, landmark_views=500),
            budget_min=0.1,
        ),
        Stage("retriever", fit("retriever"), ["trainer.max_steps=80"], budget_min=1.0),
        Stage("eval_clip", fit("eval_clip"), ["trainer.max_steps=80"], budget_min=1.0),
        Stage(
            "index",
            prepare(
                "index",
                "--encoder",
                f"{o}/retriever",
                "--tokens",
                f"{o}/tokens/shapes-train",
                "--out",
                f"{o}/index",
            ),
            budget_min=1.0,
        ),
        Stage(
            "pretrain",
            # The reduced run keeps the full budget's steps: copying from retrieved views is
            # learned late (README: Retrieval, landmarks and copy heads).
            fit("pretrain"),
            budget_min=7.0,
        ),
        Stage(
            "pretrain_small",
            fit(
                "pretrain",
                "model=shapes_small",
                "task=pretrain_small",
                "stage=pretrain_small",
                "~callbacks.sample_grid",
                "trainer.max_steps=600",
            ),
            ["trainer.max_steps=300", "trainer.val_check_interval=300"],
            budget_min=2.0,
        ),
        Stage(
            "untrained",
            fit(
                "pretrain",
                "trainer.max_steps=0",
                "task=untrained",
                "stage=untrained",
                "~callbacks.sample_grid",
            ),
            budget_min=0.2,
        ),
        Stage(
            "sft",
            fit("sft"),  # the reduced run keeps the full 900 steps: fewer lose to the VQA prior
            budget_min=4.0,
        ),
        ev(
            "perplexity",
            "eval/perplexity",
            "--ckpt",
            f"{o}/pretrain",
            "--n",
            "500",
        ),
        *[
            ev(
                "coco_fid",
                f"eval/t2i_k{k}",
                "--ckpt",
                f"{o}/pretrain",
                "--retrieve-k",
                str(k),
                *t2i,
                "--n",
                "1000",
                reduced=("--n", "200"),
            )
            for k in (0, 1, 2)
        ],
        ev(
            "coco_fid",
            "eval/t2i_untrained",
            "--ckpt",
            f"{o}/untrained",
            "--retrieve-k",
            "0",
            *t2i,
            "--n",
            "1000",
            reduced=("--n", "200"),
        ),
        ev(
            "coco_fid",
            "eval/t2i_cfg1",
            "--ckpt",
            f"{o}/pretrain",
            "--retrieve-k",
            "0",
            "--strategy",
            "cfg_topp",
            "--cfg-scale",
            "1",
            "--num-samples",
            "1",
            "--seed",
            "0",
            "--n",
            "1000",
            reduced=("--n", "200"),
        ),
        *[
            ev(
                "captioning",
                f"eval/captioning_{m}",
                "--ckpt",
                f"{o}/{m}",
                "--n",
                "500",
                reduced=("--n", "200"),
            )
            for m in ("pretrain", "sft")
        ],
        *[
            ev("vqa", f"eval/vqa_{m}", "--ckpt", f"{o}/{m}", "--n", "1000", reduced=("--n", "400"))
            for m in ("pretrain", "sft")
        ],
        *[
            ev(
                "image_tasks",
                f"eval/{task}_sft",
                "--task",
                task,
                "--ckpt",
                f"{o}/sft",
                "--n",
                "300",
                reduced=("--n", "100"),
            )
            for task in ("edit", "spatial")
        ],
        Stage(
            "eval/ablation/shapes",
            [
                PY,
                str(ROOT / "eval" / "ablate_decoding.py"),
                "--ablation",
                "shapes",
                "--outputs",
                o,
                "--ckpts",
                f"shapes={o}/pretrain",
                f"shapes_small={o}/pretrain_small",
            ],
            ["--n", "40", "--samples", "1", "2", "4", "8"],
            budget_min=5.0,
            marker="figure4.csv",
        ),
    ]


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lit_cm3leon.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--budget",
        choices=["full", "reduced"],
        default="full",
        help="full: the README's numbers; reduced: the CI run (minutes, weaker gates)",
    )
    ap.add_argument(
        "--out", default="outputs", help="where every stage publishes (default: outputs/)"
    )
    ap.add_argument("--only", nargs="*", help="run only these stages (by name)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIT_CM3LEON_ROOT": str(out.parent)}
    if out.name != "outputs":
        raise SystemExit("--out must be a folder named outputs/ (the stages' configs point there)")
    timing_path = out / "pipeline.json"
    timings = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    todo = [s for s in stages(out) if not args.only or s.name in args.only]
    if all(s.done(out) for s in todo) and (out / "report.md").is_file():
        print(f"Everything is done. The report is at {out / 'report.md'}")
        return 0
    for i, stage in enumerate(todo, 1):
        head = f"[{i}/{len(todo)}] {stage.name}"
        if stage.done(out):
            print(f"{head}: done already (outputs/{stage.name}/manifest.json), skipped", flush=True)
            continue
        cmd = stage.command + (stage.reduced if args.budget == "reduced" else [])
        print(f"{head}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, cwd=out.parent)
        if proc.returncode != 0:
            print(
                f"{head} failed (exit {proc.returncode}); fix it and rerun: finished stages are kept",
                file=sys.stderr,
            )
            return proc.returncode
        timings[stage.name] = {
            "seconds": round(time.time() - t0, 1),
            "budget": args.budget,
            "budget_min": stage.budget_min,
        }
        timing_path.write_text(json.dumps(timings, indent=2))
        print(f"{head}: finished in {timings[stage.name]['seconds']:.0f} s", flush=True)
    from lit_cm3leon.report import main as report

    t0 = time.time()
    report(["--outputs", str(out)])
    timings["report"] = {
        "seconds": round(time.time() - t0, 1),
        "budget": args.budget,
        "budget_min": 0.5,
    }
    timing_path.write_text(json.dumps(timings, indent=2))
    print("\nWhat the pipeline wrote:")
    for stage in todo:
        m = read_manifest(out / stage.name)
        metrics = ", ".join(
            f"{k}={v:.4g}"
            for k, v in (m or {}).get("metrics", {}).items()
            if isinstance(v, int | float)
        )
        print(f"  outputs/{stage.name}/  {metrics}")
    print(f"\nThe report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
