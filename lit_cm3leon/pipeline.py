"""The main job: the whole suite on the shapes world, stage by stage.

``python -m lit_cm3leon.pipeline [--budget full|reduced] [--jobs N] [--only STAGE ...]
[--cell-align PX] [--stage-args STAGE:ARGS ...]``

Each stage is one command of the suite (``prepare``, ``fit``, ``eval/...``) run as a child
process; a stage whose published artifact (``outputs/<stage>/manifest.json``) exists is skipped,
so a rerun resumes where a killed run stopped (training stages resume from their
``last.ckpt``). Wall time per stage goes to ``outputs/pipeline.json`` and into the report, with
the arguments the stage ran with: a rerun whose arguments for a finished stage differ (another
``--budget``, ``--cell-align`` or ``--stage-args``) stops before running anything and names the
folders to delete, instead of skipping the stage and reporting it as this run's.

Stages run as soon as the stages they read (``Stage.needs``) are done, up to ``--jobs`` at a
time, each child with ``cores // jobs`` threads (``OMP_NUM_THREADS``); an ``exclusive`` stage
(training whose step scales with threads: the image tokenizer, pretraining, SFT) runs alone with
every core. On 2 cores a text-to-image evaluation of 500 prompts took 30 s with 2 threads, and
two of them side by side with 1 thread each 38 s: 1.6x the throughput. With more than one job,
each stage's output goes to ``outputs/logs/<stage>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
    needs: tuple[str, ...] | None = None  # stages whose outputs it reads (None: all earlier ones)
    exclusive: bool = False  # runs alone with every core (its step scales with threads)
    extra: list[str] = field(default_factory=list)  # --stage-args: after the budget's, so they win

    def argv(self, budget: str) -> list[str]:
        return [*self.command, *(self.reduced if budget == "reduced" else []), *self.extra]

    def done(self, out: Path) -> bool:
        if self.marker == "manifest.json":
            return read_manifest(out / self.name) is not None
        return (out / self.name / self.marker).is_file()


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


def stages(out: Path, cell_align: int | None = None) -> list[Stage]:
    """The stages writing under ``out``; ``cell_align`` (None: the configs' default world) is
    the shapes world of every stage, given to each ``prepare tokenize`` as ``--cell-align`` and
    to each training run as ``world.cell_align``."""
    o = str(out)
    world = [] if cell_align is None else [f"world.cell_align={cell_align}"]

    def fit(experiment: str, *overrides: str) -> list[str]:
        return [PY, "-m", "lit_cm3leon.fit", f"experiment={experiment}", *overrides, *world]

    # what the stages after the memory bank read: tokenizers, pre-tokenized pairs, the bank
    base = (
        "text_tokenizer", "image_tokenizer", "tokens/shapes-train", "tokens/shapes-heldout",
        "tokens/landmarks-heldout", "retriever", "index",
    )  # fmt: skip

    def ev(
        script: str, name: str, *args: str, reduced=(), budget_min: float = 0.5, ckpts=()
    ) -> Stage:
        cmd = [c.replace("{o}", o) for c in evaluate(script, name, *args)]
        needs = (*base, "eval_clip", *ckpts)
        return Stage(name, cmd, list(reduced), budget_min, marker="metrics.json", needs=needs)

    def tokenize(split: str, name: str, n: int, landmark_views: int = 0) -> list[str]:
        views = ["--landmark-views", str(landmark_views)] if landmark_views else []
        views += [] if cell_align is None else ["--cell-align", str(cell_align)]
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
            needs=(),
        ),
        Stage(
            "image_tokenizer",
            fit("tokenizer"),
            ["trainer.max_steps=2820", "trainer.val_check_interval=1410"],
            budget_min=3.5,
            needs=(),
            exclusive=True,
        ),
        Stage(
            "tokens/shapes-train",
            tokenize("train", "shapes-train", 20000, landmark_views=12000),
            ["--n", "8000", "--landmark-views", "8000"],
            budget_min=1.0,
            needs=base[:2],
        ),
        Stage("retriever", fit("retriever"), ["trainer.max_steps=80"], budget_min=1.0, needs=()),
        Stage(
            "tokens/shapes-heldout",
            tokenize("heldout", "shapes-heldout", 1000),
            ["--n", "500"],
            budget_min=0.2,
            needs=base[:2],
        ),
        Stage(
            "tokens/landmarks-heldout",
            tokenize("heldout", "landmarks-heldout", 0, landmark_views=500),
            budget_min=0.1,
            needs=base[:2],
        ),
        Stage(
            "tokens/sft",
            # SFT's images (every task's pool and the held-out ones) tokenized once into
            # outputs/cache/, which the sft stage reads: its budget is the 900 steps
            fit("sft", "task=sft_data", "stage=tokens/sft", "data_only=true"),
            budget_min=0.5,
            needs=base[:2],
        ),
        Stage("eval_clip", fit("eval_clip"), ["trainer.max_steps=80"], budget_min=1.0, needs=()),
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
            needs=("retriever", "tokens/shapes-train"),
        ),
        Stage(
            "pretrain_warmup",
            # single-shape scenes, caption first, no retrieval: the colour and kind words
            # (docs/experiments.md: A single-shape warm-up); both budgets keep its steps
            fit("pretrain_warmup"),
            budget_min=6.0,
            needs=base[:5],
            exclusive=True,
        ),
        Stage(
            "pretrain",
            # The reduced run keeps the full budget's steps: copying from retrieved views is
            # learned late (README: Retrieval, landmarks and copy heads).
            fit("pretrain", f"module.init_from={o}/pretrain_warmup"),
            budget_min=7.0,
            needs=(*base, "pretrain_warmup"),
            exclusive=True,
        ),
        Stage(
            "sft",
            fit("sft"),  # the reduced run keeps the full 900 steps: fewer lose to the VQA prior
            budget_min=4.0,
            needs=(*base, "tokens/sft", "pretrain"),
            exclusive=True,
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
            needs=base,
        ),
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
            needs=(*base, "eval_clip", "pretrain", "pretrain_small"),
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
            needs=base,
        ),
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
            ckpts=("untrained",),
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
                ckpts=("pretrain",),
            )
            for k in (2, 1, 0)
        ],
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
            ckpts=("pretrain",),
        ),
        ev(
            "perplexity",
            "eval/perplexity",
            "--ckpt",
            f"{o}/pretrain",
            "--n",
            "500",
            ckpts=("pretrain",),
        ),
        *[
            ev(
                "captioning",
                f"eval/captioning_{m}",
                "--ckpt",
                f"{o}/{m}",
                "--n",
                "500",  # both budgets: the SFT gates ask for a paired interval above 0
                ckpts=(m,),
            )
            for m in ("pretrain", "sft")
        ],
        *[
            ev(
                "image_tasks",
                f"eval/{task}_sft",
                *("--task", task, "--ckpt", f"{o}/sft", "--n", n),
                budget_min=minutes,
                ckpts=("sft",),
            )
            # both budgets: the gates need narrow intervals (edit success is rare: 1-2%)
            for task, n, minutes in (("edit", "1000", 1.5), ("spatial", "300", 0.5))
        ],
        *[
            ev(
                "vqa",
                f"eval/vqa_{m}",
                *("--ckpt", f"{o}/{m}", "--n", "1000"),  # both budgets: the SFT gate's interval
                ckpts=(m,),
            )
            for m in ("pretrain", "sft")
        ],
        *[
            ev(
                "caption_probe",
                f"eval/caption_probe_{m}",
                *("--ckpt", f"{o}/{m}", "--n", "300"),
                ckpts=(m,),
            )
            for m in ("pretrain", "sft")
        ],
    ]


def add_stage_args(todo: list[Stage], specs: list[str]) -> None:
    """Append ``STAGE:ARGS`` (ARGS split as a shell would) to that stage's command, e.g.
    ``sft:model.copy_logit=true`` or ``'eval/edit_sft:--strategy temperature --top-k 1'``."""
    by_name = {s.name: s for s in todo}
    for spec in specs:
        name, sep, args = spec.partition(":")
        if not sep or name not in by_name or not args.strip():
            raise ValueError(
                f"--stage-args {spec!r}: expected STAGE:ARGS with STAGE one of {sorted(by_name)}"
            )
        by_name[name].extra += shlex.split(args)


def default_jobs(cores: int) -> int:
    """Two jobs from 2 cores up: decoding-bound evaluations gain more from a second process
    than from a second thread (module doc)."""
    return 2 if cores >= 2 else 1


def timing(budget: str, budget_min: float, threads: int, t0: float, end: float, args=None) -> dict:
    """A stage's record in ``outputs/pipeline.json`` (the report reads it); ``args``: its
    ``recipe``."""
    record = {
        "seconds": round(end - t0, 1),
        "budget": budget,
        "budget_min": budget_min,
        "threads": threads,
        "start": round(t0, 1),
        "end": round(end, 1),
    }
    return record if args is None else {**record, "args": args}


def recipe(cmd: list[str], out: Path) -> list[str]:
    """A stage's command as ``pipeline.json`` records it: without the interpreter, the outputs
    folder written ``{outputs}`` and the repository ``{repo}``, so that a moved root or another
    virtual environment reads as the same recipe."""
    return [a.replace(str(out), "{outputs}").replace(str(ROOT), "{repo}") for a in cmd[1:]]


def changed_stages(todo: list[Stage], out: Path, budget: str, timings: dict) -> str | None:
    """None, or why this run must not go on: the finished stages of ``todo`` whose recorded
    arguments differ from this run's, each with the stages that read it (transitively).
    Stages finished before arguments were recorded are not compared."""
    names = [s.name for s in todo]
    readers = {n: set() for n in names}
    for i, s in enumerate(todo):
        for need in s.needs if s.needs is not None else names[:i]:
            if need in readers:
                readers[need].add(s.name)
    lines = []
    for s in todo:
        made = timings.get(s.name, {}).get("args")
        now = recipe(s.argv(budget), out)
        if made is None or made == now or not s.done(out):
            continue
        after, frontier = set(), [s.name]
        while frontier:
            new = readers[frontier.pop()] - after
            after |= new
            frontier += new
        lines += [
            f"outputs/{s.name} was made with other arguments than this run's:",
            f"  made with: {shlex.join(made)}",
            f"  this run:  {shlex.join(now)}",
        ]
        if after:
            lines.append(f"  read by: {', '.join(n for n in names if n in after)}")
    if not lines:
        return None
    return "\n".join(
        [
            *lines,
            "Nothing was run. To redo a stage with this run's arguments, delete its folder under "
            f"{out} and the folders of the stages that read it; to resume, rerun with the "
            "arguments it was made with.",
        ]
    )


@dataclass
class _Running:
    stage: Stage
    proc: subprocess.Popen
    t0: float
    threads: int
    log: Path | None


def run_stages(
    todo: list[Stage],
    out: Path,
    *,
    jobs: int,
    cores: int,
    budget: str,
    env: dict[str, str],
    timings: dict,
) -> int:
    """Run the stages of ``todo`` that are not done, each once its ``needs`` are (module doc).

    Returns 0, or the exit code of the first stage that failed: no stage starts after a failure,
    the running ones finish, and every finished stage is kept (a rerun resumes)."""
    names = [s.name for s in todo]

    def head(name: str) -> str:
        return f"[{names.index(name) + 1}/{len(todo)}] {name}"

    # a need outside ``todo`` (``--only``) counts as met: the stage names a missing input itself
    needs = {
        s.name: set(s.needs if s.needs is not None else names[:i]) & set(names)
        for i, s in enumerate(todo)
    }
    finished = set()
    for s in todo:
        if s.done(out):
            finished.add(s.name)
            print(f"{head(s.name)}: done already, skipped", flush=True)
    pending = [s for s in todo if s.name not in finished]
    running: dict[str, _Running] = {}
    failed = 0
    timing_path = out / "pipeline.json"

    def start(stage: Stage, threads: int) -> None:
        cmd = stage.argv(budget)
        child_env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        log = None
        if jobs > 1:
            log = out / "logs" / (stage.name.replace("/", "_") + ".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as f:
                proc = subprocess.Popen(cmd, env=child_env, cwd=out.parent, stdout=f, stderr=f)
            where = f" (log: {log})"
        else:
            proc = subprocess.Popen(cmd, env=child_env, cwd=out.parent)
            where = ""
        print(f"{head(stage.name)}, {threads} thread(s){where}: {' '.join(cmd[1:])}", flush=True)
        running[stage.name] = _Running(stage, proc, time.time(), threads, log)

    while pending or running:
        while not failed and pending:
            ready = [s for s in pending if needs[s.name] <= finished]
            if not ready:
                break
            stage = ready[0]  # list order is the priority
            if stage.exclusive:
                if running:
                    break  # it starts, alone, when the running ones end
                start(stage, cores)
            elif len(running) < jobs and not any(r.stage.exclusive for r in running.values()):
                start(stage, max(1, cores // jobs))
            else:
                break
            pending.remove(stage)
        if not running:
            if pending and not failed:
                missing = {s.name: sorted(needs[s.name] - finished) for s in pending}
                raise RuntimeError(f"no stage can start; waiting on {missing}")
            break
        time.sleep(0.2)
        for name, r in list(running.items()):
            code = r.proc.poll()
            if code is None:
                continue
            del running[name]
            if code != 0:
                failed = failed or code
                tail = r.log.read_text().splitlines()[-20:] if r.log else []
                print(
                    "\n".join(tail)
                    + f"\n{head(name)} failed (exit {code})"
                    + (f"; its log: {r.log}" if r.log else "")
                    + "; fix it and rerun: finished stages are kept",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            finished.add(name)
            args = recipe(r.stage.argv(budget), out)
            timings[name] = timing(budget, r.stage.budget_min, r.threads, r.t0, time.time(), args)
            timing_path.write_text(json.dumps(timings, indent=2))
            print(f"{head(name)}: finished in {timings[name]['seconds']:.0f} s", flush=True)
    return failed


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
    ap.add_argument(
        "--cell-align",
        type=int,
        default=None,
        help="the shapes world of every stage: cells span and start on multiples of this many "
        "px (4: whole tokenizer patches; default: the configs' world.cell_align, 1)",
    )
    ap.add_argument(
        "--stage-args",
        action="append",
        default=[],
        metavar="STAGE:ARGS",
        help="extra arguments for one stage's command (repeatable), e.g. "
        "'sft:model.copy_logit=true' or 'image_tokenizer:module.vqgan={encoder_kernel:1}'; a "
        "stage already done with other arguments stops the run (delete its folder under "
        "outputs/ to redo it)",
    )
    cores = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    ap.add_argument(
        "--jobs",
        type=int,
        default=default_jobs(cores),
        help=f"stages at a time, each with cores // jobs threads (default here: "
        f"{default_jobs(cores)} for {cores} cores, from OMP_NUM_THREADS or the CPU count)",
    )
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    if args.cell_align is not None and args.cell_align < 1:
        ap.error("--cell-align must be >= 1 px")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIT_CM3LEON_ROOT": str(out.parent)}
    if out.name != "outputs":
        raise SystemExit("--out must be a folder named outputs/ (the stages' configs point there)")
    timing_path = out / "pipeline.json"
    timings = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    every = stages(out, args.cell_align)
    try:
        add_stage_args(every, args.stage_args)
    except ValueError as e:
        ap.error(str(e))
    todo = [s for s in every if not args.only or s.name in args.only]
    changed = changed_stages(todo, out, args.budget, timings)
    if changed:
        print(changed, file=sys.stderr)
        return 2
    if all(s.done(out) for s in todo) and (out / "report.md").is_file():
        print(f"Everything is done. The report is at {out / 'report.md'}")
        return 0
    code = run_stages(
        todo, out, jobs=args.jobs, cores=cores, budget=args.budget, env=env, timings=timings
    )
    if code:
        return code
    from lit_cm3leon.report import main as report

    t0 = time.time()
    report(["--outputs", str(out)])
    timings["report"] = timing(args.budget, 0.5, cores, t0, time.time())
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
