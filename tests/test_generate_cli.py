"""``python -m lit_cm3leon.generate`` for the SFT image tasks, on fixture artifacts: the files it
writes, the prompt it decodes, and the errors that name what a task needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.fixtures import make_tiny_outputs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    make_tiny_outputs(root / "outputs")
    from lit_cm3leon.data.shapes import ShapesWorld

    Image.fromarray(ShapesWorld().sample("heldout", 0).image).save(root / "scene.png")
    return root


def generate(root, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lit_cm3leon.generate", f"paths.root_dir={root}",
         f"ckpt={root / 'outputs' / 'pretrain'}", *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_edit_writes_samples_and_a_grid_led_by_the_source(root):
    out = root / "edit_run"
    proc = generate(root, "task=edit", f"image={root / 'scene.png'}",
                    "prompt=make the circle blue", "num_samples=2", f"out_dir={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [np.asarray(Image.open(out / f"sample{j:02d}.png")) for j in range(2)]
    assert all(s.shape == (32, 32, 3) for s in samples)
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    assert grid.shape == (2 + 32 + 2, 2 + 3 * (32 + 2), 3)  # source, then the two samples
    assert np.array_equal(grid[2:34, 36:68], samples[0])
    settings = json.loads((out / "settings.json").read_text())
    assert (
        settings["inputs"] == {"instruction": "make the circle blue"} and settings["samples"] == 2
    )
    # a finished run is not redone
    again = generate(root, "task=edit", f"image={root / 'scene.png'}", "prompt=x", f"out_dir={out}")
    assert again.returncode == 0 and "finished run" in again.stderr + again.stdout


def test_spatial_takes_objects_with_boxes(root):
    out = root / "spatial_run"
    proc = generate(root, "task=spatial", "objects=[{label: a red circle, box: [1, 1, 11, 11]}]",
                    "size=[32,32]", "strategy=temperature", "temperature=0", f"out_dir={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["inputs"]["objects"] == [{"label": "a red circle", "box": [1, 1, 11, 11]}]
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    assert grid.shape == (36, 36, 3)  # no input image: the one sample


@pytest.mark.parametrize(
    "args, message",
    [
        (["task=edit", "prompt=make it blue"], "task=edit needs image=PATH (the image)"),
        (["task=seg2image", "image=scene.png"], "and prompt=... (the caption)"),
        (["task=spatial", "size=[32,32]"], "task=spatial needs objects="),
        (["task=spatial", "objects=[{label: a}]", "size=[32,32]"], "each object is {label"),
        (["task=recolour"], "choose one of text_to_image, caption, vqa"),
    ],
)
def test_what_a_task_needs_is_named(root, args, message):
    proc = generate(root, *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_the_cli_decodes_an_edit_as_the_evaluation_does(root):
    """``Engine.task_image_codes`` (generate's image tasks, the SFT samples, the notebook) and
    the edit evaluation's prompts give the same samples for the same edits and seed."""
    from lit_cm3leon.data.shapes import ShapesWorld
    from lit_cm3leon.engine import Decoding, Engine
    from lit_cm3leon.evaluation.shapes_edit import edit_prompts

    engine = Engine.load(root / "outputs" / "pretrain", root / "outputs", retrieval=False)
    world = ShapesWorld()
    edits = [world.sample("heldout", i).edit for i in range(3)]
    codes = engine.image_tokenizer.encode(np.stack([e.before_image for e in edits])).numpy()
    dec = Decoding(strategy="cfg_topp", cfg_scale=3.0, num_samples=2)
    ours = engine.task_image_codes(
        "edit",
        [{"image": c, "instruction": e.instruction} for c, e in zip(codes, edits, strict=True)],
        dec,
        5,
    )
    theirs = engine.prompt_to_image_codes(*edit_prompts(engine, codes, edits), dec, 5)
    assert ours.shape == (3, 2, 8, 8) and np.array_equal(ours, theirs)
    assert len({c.tobytes() for c in ours.reshape(6, -1)}) > 1  # the samples are not all alike
