"""Editing and spatially grounded generation on the shapes world: the scene-parser scores on
known images (copy, oracle, shuffled), the exact chance of a random placement, and the
``eval/image_tasks.py --ckpt`` run on fixture artifacts, with its pipeline stage and report row."""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_cm3leon.data.shapes import COLORS, KINDS, SIZES, Scene, ShapesWorld
from lit_cm3leon.evaluation import shapes_edit as se
from lit_cm3leon.evaluation import shapes_spatial as ss
from tests.fixtures import make_tiny_outputs

ROOT = Path(__file__).resolve().parent.parent
N = 60


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()


@pytest.fixture(scope="module")
def edits(world):
    return se.edit_items(N, world)


@pytest.fixture(scope="module")
def items(world):
    return ss.spatial_items(N, world)


# --- edits ---------------------------------------------------------------------------------
def test_copy_keeps_everything_and_never_changes(world, edits):
    assert {e.attribute for e in edits} == set(se.EDIT_ATTRIBUTES)  # every kind of edit is tested
    scores = se.edit_scores(np.stack([e.before_image for e in edits]), edits, world)
    assert scores["success"].sum() == 0 and scores["changed"].sum() == 0
    assert scores["kept"].min() == 1.0


def test_oracle_target_scores_one(world, edits):
    scores = se.edit_scores(np.stack([e.after_image for e in edits]), edits, world)
    for k in se.OUTCOMES:
        assert scores[k].min() == 1.0, k
    assert se.by_attribute(scores["success"], edits) == {a: 1.0 for a in se.EDIT_ATTRIBUTES}


def _perturb(scene: Scene, rng: random.Random) -> Scene:
    """The scene with one random change: an attribute, the background, a shape dropped or added."""
    shapes = list(scene.shapes)
    what = rng.choice(["color", "kind", "size", "move", "drop", "add", "background"])
    i = rng.randrange(len(shapes))
    free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in {s.cell for s in shapes}]
    if what in ("color", "kind", "size"):
        pool = {"color": COLORS, "kind": KINDS, "size": SIZES}[what]
        shapes[i] = replace(shapes[i], **{what: rng.choice(pool)})
    elif what == "move" and free:
        shapes[i] = replace(shapes[i], row=free[0][0], col=free[0][1])
    elif what == "drop":
        shapes.pop(i)
    elif what == "add" and free:
        shapes.append(replace(shapes[i], row=free[-1][0], col=free[-1][1]))
    else:
        return Scene(rng.choice(["black", "white", "gray"]), scene.shapes)
    return Scene(scene.background, tuple(shapes))


def test_success_is_changed_and_kept_is_the_exact_target(edits):
    """On perturbed sources and targets: success == changed and kept == (output == target)."""
    rng = random.Random(0)
    seen = set()
    for e in edits:
        for base in (e.before, e.after):
            for _ in range(5):
                out = _perturb(base, rng)
                r = se.edit_outcome(out, e)
                assert r["success"] == float(r["changed"] and r["kept"])
                assert r["success"] == float(out.attributes() == e.after.attributes())
                seen.add((r["changed"], r["kept"]))
    assert seen == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}  # both parts vary apart


def test_edit_parts_on_hand_made_outputs(edits):
    colour = next(e for e in edits if e.attribute == "color")
    new = colour.after.shapes[colour.shape_index]
    other = next(c for c in COLORS if c != new.color)
    wrong_kind = next(k for k in KINDS if k != new.kind)
    # the colour changed, but the shape's kind changed too: changed, not kept
    out = list(colour.after.shapes)
    out[colour.shape_index] = replace(new, kind=wrong_kind)
    assert se.edit_outcome(Scene(colour.after.background, tuple(out)), colour) == {
        "success": 0.0, "changed": 1.0, "kept": 0.0,
    }  # fmt: skip
    # the wrong new colour, the rest kept
    out[colour.shape_index] = replace(new, color=other)
    r = se.edit_outcome(Scene(colour.after.background, tuple(out)), colour)
    assert r["changed"] == 0.0 and r["kept"] == 1.0
    # a move that leaves a copy behind: the old cell is not empty, and there is an extra shape
    move = next(e for e in edits if e.attribute == "position")
    both = Scene(move.after.background, (*move.after.shapes, move.before.shapes[move.shape_index]))
    assert se.edit_outcome(both, move) == {"success": 0.0, "changed": 0.0, "kept": 0.0}


# --- spatial -------------------------------------------------------------------------------
def test_box_cells_are_the_shapes_cells(world, items):
    for it in items:
        assert [cell for _, _, cell in it.requests] == [s.cell for s in it.scene.shapes]
        assert [o["label"] for o in it.objects] == [
            f"a {s.color} {s.kind}" for s in it.scene.shapes
        ]


def test_true_images_score_one_and_shuffled_ones_do_not(world, items):
    truth = np.stack([world.render(it.scene) for it in items])
    scores = ss.spatial_scores(truth, items, world)
    for k in ss.OUTCOMES:
        assert scores[k].min() == 1.0, k
    shuffled = ss.spatial_scores(np.roll(truth, 1, axis=0), items, world)
    assert shuffled["placed"].mean() < 0.3 and shuffled["exact"].mean() < 0.1


def test_crowding_fills_the_boxes_but_not_in_box(items):
    from lit_cm3leon.data.shapes import Shape

    every_cell = Scene(
        "white", tuple(Shape("circle", "red", "small", r, c) for r in range(3) for c in range(3))
    )
    for it in items[:10]:
        out = ss.spatial_outcome(every_cell, it)
        assert out["occupied"] == 1.0 and out["exact"] == 0.0
        assert out["in_box"] == pytest.approx(len({r[2] for r in it.requests}) / 9)
    assert ss.spatial_outcome(Scene("white", ()), items[0])["in_box"] == 0.0


def _enumerated_chance(it: ss.SpatialItem, n_cells: int = 9) -> dict[str, float]:
    """Average spatial_outcome over every placement of the requested shapes in distinct cells."""
    from lit_cm3leon.data.shapes import Shape

    rows = []
    for cells in itertools.permutations(range(n_cells), len(it.requests)):
        shapes = tuple(
            Shape(kind, color, "small", *divmod(c, 3))
            for (color, kind, _), c in zip(it.requests, cells, strict=True)
        )
        rows.append(ss.spatial_outcome(Scene("white", shapes), it))
    return {k: float(np.mean([r[k] for r in rows])) for k in ss.OUTCOMES}


def test_chance_is_exact(world, items):
    # repeated labels (two yellow circles) are where the closed form can go wrong: include some
    repeated = [it for it in items if len({r[:2] for r in it.requests}) < len(it.requests)]
    assert repeated
    for it in items[:15] + repeated[:5]:
        closed = ss.chance_outcome(it, 9)
        enumerated = _enumerated_chance(it)
        for k in ss.OUTCOMES:
            assert closed[k] == pytest.approx(enumerated[k], abs=1e-12), (k, it.requests)
    chance = ss.chance_scores(items, world)
    assert 0.0 < chance["placed"].mean() < 0.2 and chance["exact"].mean() < 0.1


# --- the CLI on fixture artifacts, its pipeline stage and report row -------------------------
def _cli():
    spec = importlib.util.spec_from_file_location(
        "eval_image_tasks", ROOT / "eval" / "image_tasks.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_tiny_outputs(tmp_path_factory.mktemp("image_tasks") / "outputs")
    torch.set_num_threads(before)


def test_paired_difference_sees_a_win_that_separate_intervals_hide():
    """Items vary together for model and baseline (easy and hard scenes): the paired interval
    of the difference is that of the gain alone, where the two separate intervals overlap."""
    from lit_cm3leon.evaluation import bootstrap

    rng = np.random.default_rng(0)
    difficulty = rng.random(300)
    base = {"placed": difficulty, "only_model": difficulty}
    model = {"placed": difficulty + 0.05 + 0.02 * rng.standard_normal(300)}
    points, ci = bootstrap.differences(model, base, n_resamples=500, seed=0)
    assert set(points) == set(ci) == {"difference_placed"}  # keys both hold
    assert points["difference_placed"] == pytest.approx(model["placed"].mean() - difficulty.mean())
    lo, hi = ci["difference_placed"]
    assert 0.04 < lo < points["difference_placed"] < hi < 0.06
    apart = {k: bootstrap.bootstrap_ci(300, bootstrap.mean_statistic({"x": v}), 500, 0)["x"]
             for k, v in (("model", model["placed"]), ("base", difficulty))}  # fmt: skip
    assert apart["model"][0] < apart["base"][1]  # separately, the intervals overlap
    scaled, _ = bootstrap.differences(model, base, n_resamples=0, scale=100.0)
    assert scaled["difference_placed"] == pytest.approx(100 * points["difference_placed"])
    with pytest.raises(ValueError, match="placed: 299 model items against 300 baseline items"):
        bootstrap.differences({"placed": difficulty[:-1]}, base)


@pytest.mark.parametrize("task", ["edit", "spatial"])
def test_cli_writes_metrics_with_baselines(outputs, task, capsys):
    cli = _cli()
    run = outputs / "eval" / f"{task}_x" / "run"
    out = outputs / "eval" / f"{task}_x" / "metrics.json"
    argv = ["--task", task, "--ckpt", str(outputs / "pretrain"), "--outputs", str(outputs),
            "--n", "6", "--batch-size", "4", "--bootstrap", "20", "--run-dir", str(run),
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    rec = json.loads(out.read_text())
    assert rec["protocol"] == f"shapes-{task}" and rec["n"] == 6 and rec["strategy"] == "cfg_topp"
    assert len(list((run / "samples").glob("*.png"))) == 6
    assert len(json.loads((run / "items.json").read_text())) == 6
    if task == "edit":
        keys = [f"{p}edit_{k}" for p in ("", "baseline_", "copy_recon_", "ceiling_")
                for k in se.OUTCOMES]  # fmt: skip
        assert rec["baseline_edit_kept"] == 1.0 and rec["baseline_edit_changed"] == 0.0
        assert set(rec["edit_success_by_attribute"]) == set(se.EDIT_ATTRIBUTES)
    else:
        keys = [f"{p}spatial_{k}" for p in ("", "baseline_", "ceiling_") for k in ss.OUTCOMES]
    for k in keys:
        assert 0.0 <= rec[k] <= 1.0 and k in rec["ci95"], k
    # SFT minus baseline, paired: its point is the difference of the two scores; none for the
    # ceiling or the copy through the tokenizer
    outcomes = se.OUTCOMES if task == "edit" else ss.OUTCOMES
    assert {k for k in rec if k.startswith("difference_")} == {
        f"difference_{task}_{k}" for k in outcomes
    }
    for k in outcomes:
        d, key = rec[f"difference_{task}_{k}"], f"{task}_{k}"
        assert d == pytest.approx(rec[key] - rec[f"baseline_{key}"])
        lo, hi = rec["ci95"][f"difference_{key}"]
        assert lo <= d <= hi
    # a finished run is not redone
    (run / "samples" / "00000.png").unlink()
    assert cli.main(argv) == 0 and "exists" in capsys.readouterr().out
    assert not (run / "samples" / "00000.png").exists()


def test_spatial_prompt_variants(outputs, world):
    """loc: the boxes as <loc:N> tokens; words: no location token, every shape's cell named;
    none: neither. Every variant names each requested colour and kind."""
    from types import SimpleNamespace

    from lit_cm3leon.data.shapes import position_phrase
    from lit_cm3leon.tokenizer.codec import DocumentCodec

    codec = DocumentCodec.load(outputs / "text_tokenizer")
    engine = SimpleNamespace(codec=codec, vocab=codec.vocab)
    items = ss.spatial_items(5, world)
    texts = {}
    for kind in ss.PROMPTS:
        cond, uncond = ss.spatial_prompts(engine, items, kind, world)
        assert len(cond) == len(uncond) == 5
        n_loc = [sum(codec.vocab.is_loc(t) for t in c) for c in cond]
        assert n_loc == ([4 * len(it.requests) for it in items] if kind == "loc" else [0] * 5)
        texts[kind] = [codec.decode_text([t for t in c if codec.vocab.is_text(t)]) for c in cond]
    for i, it in enumerate(items):
        for sh in it.scene.shapes:
            for kind in ss.PROMPTS:
                assert f"{sh.color} {sh.kind}" in texts[kind][i], (kind, texts[kind][i])
            where = position_phrase(world.where(sh))
            assert where in texts["words"][i] and where not in texts["none"][i]
    with pytest.raises(ValueError, match="prompt must be one of"):
        ss.spatial_prompts(engine, items, "boxes", world)


def test_pipeline_stages_and_report_rows(tmp_path):
    from lit_cm3leon.pipeline import stages
    from lit_cm3leon.report import Report

    out = tmp_path / "outputs"
    by_name = {s.name: s for s in stages(out)}
    for task, n in (("edit", "1000"), ("spatial", "300")):
        st = by_name[f"eval/{task}_sft"]
        assert st.command[st.command.index("--task") + 1] == task
        assert f"{out}/eval/{task}_sft/run" in st.command
        assert st.command[st.command.index("--n") + 1] == n
        assert st.reduced == []  # both budgets: the gates' intervals need all n items
    rec = {"n": 100, "edit_success": 0.25, "baseline_edit_success": 0.0,
           "ceiling_edit_success": 0.5, "difference_edit_success": 0.25,
           "ci95": {"edit_success": [0.2, 0.3], "difference_edit_success": [0.2, 0.3]}}  # fmt: skip
    (out / "eval" / "edit_sft").mkdir(parents=True)
    (out / "eval" / "edit_sft" / "metrics.json").write_text(json.dumps(rec))
    text = Report(out).build()
    assert (
        "| edit | success | 0.250 | [0.200, 0.300] | 0.000 (copy) | 0.250 [0.200, 0.300] | 0.500 | 100 |"
        in text
    )
    assert "| edit | changed | – | – | – (copy) | – | – | 100 |" in text
    assert "| spatial | placed | not run |" in text


def _manifest(path: Path, record: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps(record))
    return path


def _shards_source(cell_align: int | None) -> dict:
    source = {"source": "shapes", "image_size": 32, "world_seed": 0, "split": "heldout"}
    return {"source": source if cell_align is None else {**source, "cell_align": cell_align}}


def test_the_evaluation_world_is_the_one_the_stages_were_made_in(tmp_path):
    """Each stage's manifest records its world; the evaluation takes theirs, and refuses a
    folder whose stages disagree, naming each manifest."""
    from lit_cm3leon.evaluation.metrics_io import InputError
    from lit_cm3leon.evaluation.world import outputs_world, tokenizer_world

    out = tmp_path / "outputs"
    assert outputs_world(out).cell_align == 1  # nothing recorded: the default world
    tok = _manifest(out / "image_tokenizer", {"config": {"data": {
        "source": "shapes", "size": 32, "world": {"seed": 3, "cell_align": 4}}}})  # fmt: skip
    _manifest(out / "tokens" / "shapes-heldout", _shards_source(4))
    sft = _manifest(out / "sft", {"config": {"data": {
        "source": "shapes", "shapes": {"world": {"cell_align": 4}}}}})  # fmt: skip
    world = outputs_world(out, sft)
    assert (world.cell_align, world.cell_size, world.margin, world.seed) == (4, 8, 4, 0)
    assert tokenizer_world(tok).cell_align == 4
    # held-out edits are drawn in that world, not the default one
    aligned = se.edit_items(3, world)[0].before_image
    assert not np.array_equal(aligned, se.edit_items(3)[0].before_image)
    # shards made before --cell-align existed were made with 1: they disagree with the rest
    _manifest(out / "tokens" / "landmarks-heldout", _shards_source(None))
    with pytest.raises(InputError, match="different shapes worlds") as err:
        outputs_world(out, sft)
    for name in ("image_tokenizer", "shapes-heldout", "landmarks-heldout", "sft"):
        assert name in str(err.value)
    _manifest(out / "tokens" / "landmarks-heldout", _shards_source(4))
    other_sft = _manifest(out / "sft_other", {"config": {"data": {
        "source": "shapes", "shapes": {"world": {}}}}})  # fmt: skip
    with pytest.raises(InputError, match="sft_other"):
        outputs_world(out, other_sft)


def test_cli_scores_in_the_outputs_world(outputs, tmp_path, capsys):
    """The edit CLI draws, renders and parses in the world of the stages under --outputs, and
    says so in its record; a folder of mixed worlds is refused before anything is generated."""
    import shutil

    out = tmp_path / "outputs"
    shutil.copytree(outputs / "text_tokenizer", out / "text_tokenizer")
    shutil.copytree(outputs / "image_tokenizer", out / "image_tokenizer")
    _manifest(out / "tokens" / "shapes-heldout", _shards_source(4))
    cli = _cli()
    argv = ["--task", "edit", "--ckpt", str(outputs / "pretrain"), "--outputs", str(out),
            "--n", "4", "--batch-size", "4", "--bootstrap", "10"]  # fmt: skip
    assert cli.main(argv) == 0
    rec = json.loads(next((out / "eval" / "edit").glob("*/metrics.json")).read_text())
    assert rec["world"] == {"image_size": 32, "grid": 3, "cell_align": 4}
    # the source images, drawn and parsed in that world, keep every shape
    assert rec["baseline_edit_kept"] == 1.0
    _manifest(out / "tokens" / "landmarks-heldout", _shards_source(1))
    assert cli.main([*argv, "--force"]) == 2
    assert "different shapes worlds" in capsys.readouterr().err
    for name in ("captioning", "vqa"):  # the image-to-text scripts refuse it the same way
        spec = importlib.util.spec_from_file_location(f"eval_{name}", ROOT / "eval" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert (
            mod.main(["--ckpt", str(outputs / "pretrain"), "--outputs", str(out), "--n", "2"]) == 2
        )
        assert "different shapes worlds" in capsys.readouterr().err, name


def test_report_shows_the_sft_edits_and_spatial_samples(outputs, world):
    """The report's figures put each edit's output between its source and target (the world's
    renders of the evaluation's items) and each spatial output beside its true scene."""
    from PIL import Image

    from lit_cm3leon.report import Report

    cli = _cli()
    for task in ("edit", "spatial"):
        folder = outputs / "eval" / f"{task}_sft"
        argv = ["--task", task, "--ckpt", str(outputs / "pretrain"), "--outputs", str(outputs),
                "--n", "9", "--batch-size", "4", "--bootstrap", "0", "--run-dir",
                str(folder / "run"), "--out", str(folder / "metrics.json")]  # fmt: skip
        assert cli.main(argv) == 0
    text = Report(outputs).build()
    edits, items = se.edit_items(8, world), ss.spatial_items(8, world)
    assert "![Edits (sft): source, output, target](figures/edit_sft.png)" in text
    assert f"1. `{edits[0].instruction}`: success " in text and "8. `" in text
    assert "9. `" not in text  # eight items: two rows of four
    size = edits[0].before_image.shape[0]
    cell, pad = 3 * size, 2
    for name, per_item in (("edit_sft", 3), ("spatial_sft", 2)):
        grid = np.asarray(Image.open(outputs / "figures" / f"{name}.png").convert("RGB"))
        assert grid.shape == (pad + 2 * (cell + pad), pad + 4 * per_item * (cell + pad), 3)

    def at(grid, row, col):
        y, x = pad + row * (cell + pad), pad + col * (cell + pad)
        return grid[y : y + cell : 3, x : x + cell : 3]

    grid = np.asarray(Image.open(outputs / "figures" / "edit_sft.png").convert("RGB"))
    sample = np.asarray(Image.open(outputs / "eval" / "edit_sft" / "run" / "samples" / "00005.png"))
    assert np.array_equal(at(grid, 1, 3), edits[5].before_image)  # row 2, item 2: source
    assert np.array_equal(at(grid, 1, 4), sample[..., :3])
    assert np.array_equal(at(grid, 1, 5), edits[5].after_image)
    grid = np.asarray(Image.open(outputs / "figures" / "spatial_sft.png").convert("RGB"))
    assert np.array_equal(at(grid, 0, 7), world.render(items[3].scene))
