"""The pipeline's scheduler: stages start once their needs are done, at most ``jobs`` at a time
with ``cores // jobs`` threads, exclusive ones alone with every core; a failure starts nothing
new and keeps what finished. Fake stages (a Python one-liner each) record when they ran."""

from __future__ import annotations

import json
import os
import sys

import pytest

from lit_cm3leon.pipeline import Stage, run_stages
from lit_cm3leon.report import busy_seconds

SCRIPT = (
    "import json, os, sys, time; t0 = time.time(); time.sleep(float(sys.argv[3])); "
    "code = int(sys.argv[4]); code and sys.exit(code); "
    "d = os.path.join(sys.argv[1], sys.argv[2]); os.makedirs(d, exist_ok=True); "
    "json.dump({'start': t0, 'end': time.time(), 'threads': os.environ['OMP_NUM_THREADS']}, "
    "open(os.path.join(d, 'ran.json'), 'w'))"
)


def fake(out, name, needs=(), exclusive=False, seconds=1.0, code=0) -> Stage:
    cmd = [sys.executable, "-c", SCRIPT, str(out), name, str(seconds), str(code)]
    needs = None if needs is None else tuple(needs)
    return Stage(name, cmd, marker="ran.json", needs=needs, exclusive=exclusive)


def ran(out, name) -> dict:
    return json.loads((out / name / "ran.json").read_text())


def overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def schedule(out, todo, timings=None, jobs=2):
    env = {**os.environ}
    return run_stages(
        todo,
        out,
        jobs=jobs,
        cores=2,
        budget="full",
        env=env,
        timings={} if timings is None else timings,
    )


def test_needs_jobs_and_exclusive_stages(tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    todo = [
        fake(out, "a"),
        fake(out, "b"),
        fake(out, "c", needs=["a"], exclusive=True),
        fake(out, "d", needs=["c"]),
        fake(out, "e", needs=["c"]),
        fake(out, "f", needs=["c"], seconds=0.2),
        fake(out, "g", needs=None, seconds=0.2),  # no needs given: every earlier stage
    ]
    timings: dict = {}
    assert schedule(out, todo, timings) == 0
    r = {s.name: ran(out, s.name) for s in todo}
    assert overlap(r["a"], r["b"]) and r["a"]["threads"] == r["b"]["threads"] == "1"
    assert r["c"]["threads"] == "2" and not any(overlap(r["c"], r[n]) for n in "abdefg")
    assert r["c"]["start"] >= max(r["a"]["end"], r["b"]["end"])
    assert overlap(r["d"], r["e"]) and min(r["d"]["start"], r["e"]["start"]) >= r["c"]["end"]
    assert r["f"]["start"] >= min(r["d"]["end"], r["e"]["end"])  # two at a time
    assert r["g"]["start"] >= max(r[n]["end"] for n in "abcdef")
    assert {k: v["threads"] for k, v in timings.items()} == dict(a=1, b=1, c=2, d=1, e=1, f=1, g=1)
    assert json.loads((out / "pipeline.json").read_text()) == timings
    # the run's wall time counts the overlaps once: well under the sum of the stages' times
    total = sum(t["seconds"] for t in timings.values())
    assert busy_seconds(timings.values()) < total - 1.0


def test_one_job_runs_in_order_with_every_core(tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    todo = [fake(out, "a", seconds=0.3), fake(out, "b", seconds=0.3)]
    assert schedule(out, todo, jobs=1) == 0
    a, b = ran(out, "a"), ran(out, "b")
    assert b["start"] >= a["end"] and a["threads"] == b["threads"] == "2"


def test_a_failure_starts_nothing_new_and_keeps_what_finished(tmp_path, capsys):
    out = tmp_path / "outputs"
    out.mkdir()
    todo = [
        fake(out, "a", seconds=0.2),
        fake(out, "b", seconds=0.5, code=3),
        fake(out, "slow", seconds=1.5),
        fake(out, "c", needs=["a"]),
    ]
    assert schedule(out, todo) == 3
    assert (out / "a" / "ran.json").is_file() and not (out / "b" / "ran.json").exists()
    assert (out / "slow" / "ran.json").is_file()  # running when b failed: allowed to finish
    assert not (out / "c").exists()  # ready after b failed: not started
    assert "b failed (exit 3)" in capsys.readouterr().err
    # the rerun skips what finished and runs the rest
    todo[1] = fake(out, "b", seconds=0.1)
    assert schedule(out, todo) == 0
    assert "a: done already" in capsys.readouterr().out and ran(out, "c")


def test_busy_seconds_counts_overlaps_once_and_gaps_not_at_all():
    t = [
        {"seconds": 10, "start": 0, "end": 10},
        {"seconds": 5, "start": 5, "end": 12},  # overlaps the first
        {"seconds": 3, "start": 100, "end": 103},  # after a gap (a killed run, then a rerun)
        {"seconds": 4},  # a record without times (older pipeline.json)
    ]
    assert busy_seconds(t) == 12 + 3 + 4


def test_stage_args_reach_one_stage_and_unknown_stages_are_named(tmp_path, capsys):
    from lit_cm3leon.pipeline import add_stage_args, run, stages

    every = stages(tmp_path / "outputs")
    before = {s.name: s.argv("reduced") for s in every}
    add_stage_args(every, ["sft:model.copy_logit=true", "eval/edit_sft:--top-k 1 --cfg-scale 1"])
    add_stage_args(every, ["image_tokenizer:trainer.max_steps=4200"])
    after = {s.name: s.argv("reduced") for s in every}
    assert after["sft"] == [*before["sft"], "model.copy_logit=true"]
    assert after["eval/edit_sft"] == [*before["eval/edit_sft"], "--top-k", "1", "--cfg-scale", "1"]
    # after the reduced budget's own arguments, so that the later override wins
    tok = after["image_tokenizer"]
    assert tok[-1] == "trainer.max_steps=4200" and "trainer.max_steps=2820" in tok[:-1]
    changed = ("sft", "eval/edit_sft", "image_tokenizer")
    assert {k: v for k, v in after.items() if k not in changed} == {
        k: v for k, v in before.items() if k not in changed
    }
    for bad in ("sfft:x=1", "sft", "sft: "):
        with pytest.raises(ValueError, match="STAGE:ARGS with STAGE one of .*'sft'"):
            add_stage_args(stages(tmp_path / "outputs"), [bad])
    with pytest.raises(SystemExit) as err:
        run(["--out", str(tmp_path / "outputs"), "--stage-args", "nope:x=1"])
    assert err.value.code == 2 and "'nope:x=1'" in capsys.readouterr().err


def test_a_finished_stage_with_other_arguments_stops_the_rerun(tmp_path, capsys):
    from lit_cm3leon.pipeline import changed_stages, run

    out = tmp_path / "outputs"
    out.mkdir()
    todo = [fake(out, "a", seconds=0.1), fake(out, "b", needs=["a"], seconds=0.1)]
    todo.append(fake(out, "c", needs=["b"], seconds=0.1))
    todo.append(fake(out, "d", needs=(), seconds=0.1))
    timings: dict = {}
    assert schedule(out, todo, timings) == 0
    # recorded without the interpreter, the outputs folder as {outputs}
    assert timings["a"]["args"][:2] == ["-c", todo[0].command[2]]
    assert timings["a"]["args"][2] == "{outputs}"
    assert changed_stages(todo, out, "full", timings) is None
    # the same recipe from a moved root is the same
    moved = tmp_path / "elsewhere" / "outputs"
    (tmp_path / "elsewhere").mkdir()
    out.rename(moved)
    again = [fake(moved, s.name, needs=s.needs, seconds=0.1) for s in todo]
    assert changed_stages(again, moved, "full", timings) is None
    # another argument for a finished stage: named with both recipes and its readers
    again[0].extra = ["model.copy_logit=true"]
    msg = changed_stages(again, moved, "full", timings)
    assert msg.startswith("outputs/a was made with other arguments than this run's")
    assert "this run:" in msg and msg.count("model.copy_logit=true") == 1
    assert "read by: b, c\n" in msg and "Nothing was run" in msg
    # the reduced budget's arguments count too; a stage not finished is not compared
    again[0].extra, again[2].reduced = [], ["--n", "8"]
    assert changed_stages(again, moved, "reduced", timings).startswith("outputs/c was made")
    assert changed_stages(again, moved, "full", timings) is None
    (moved / "c" / "ran.json").unlink()
    assert changed_stages(again, moved, "reduced", timings) is None
    # a stage recorded before arguments were: not compared
    del timings["b"]["args"]
    again[1].extra = ["x=1"]
    assert changed_stages(again, moved, "full", timings) is None
    # the CLI: exits 2 before running anything, with the recipes on stderr
    root = tmp_path / "cli"
    cli_out = root / "outputs"
    cli_out.mkdir(parents=True)
    (cli_out / "text_tokenizer").mkdir()
    (cli_out / "text_tokenizer" / "manifest.json").write_text("{}")
    from lit_cm3leon.pipeline import stages

    tok = next(s for s in stages(cli_out) if s.name == "text_tokenizer")
    made = timings["a"] | {"args": ["-m", "lit_cm3leon.prepare", "text-tokenizer", "--old"]}
    (cli_out / "pipeline.json").write_text(json.dumps({"text_tokenizer": made}))
    capsys.readouterr()
    code = run(["--out", str(cli_out), "--only", "text_tokenizer"])
    err = capsys.readouterr().err
    assert code == 2 and "outputs/text_tokenizer was made with other arguments" in err
    assert "--old" in err and "{outputs}/text_tokenizer" in err and tok.done(cli_out)


def test_sft_reads_its_images_from_a_stage_of_their_own(tmp_path):
    """The sft stage's budget is its steps: its images are tokenized before, by ``tokens/sft``
    (the SFT config with ``data_only=true``, in the same world), which needs only the two
    tokenizers and so runs beside the other tokenizing stages."""
    from lit_cm3leon.pipeline import stages

    by_name = {s.name: s for s in stages(tmp_path / "outputs", cell_align=4)}
    data, sft = by_name["tokens/sft"], by_name["sft"]
    assert {"experiment=sft", "data_only=true", "stage=tokens/sft"} <= set(data.command)
    assert data.needs == ("text_tokenizer", "image_tokenizer") and not data.exclusive
    assert "tokens/sft" in sft.needs
    assert "world.cell_align=4" in data.command and "world.cell_align=4" in sft.command
