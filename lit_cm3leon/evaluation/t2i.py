"""Text-to-image evaluation: generate samples for prompts into a resumable folder, then score.

Samples are cached on disk as ``<folder>/samples/{i:05d}.png`` (the re-ranked best of
``num_samples`` candidates for prompt ``i``) plus ``codes.npz`` per chunk, so a killed run
resumes where it stopped and never regenerates a finished sample. With several ranks, rank r
generates prompts ``r, r + world, ...`` into the same folder.

The shapes-world protocol: ``n`` held-out scenes, their long captions as prompts, their
rendered images as references; the scene parser reads every generated image back, and
``attr_acc`` is the mean per-shape attribute accuracy against the prompt's scene.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lit_cm3leon.data.shapes import Scene, ShapesWorld, parse_scene, scene_accuracy

# prompts per generation chunk, the unit of seeding, resuming and sharding (its prompt x sample
# rows are generated lit_cm3leon.engine.IMAGE_BATCH at a time)
CHUNK = 64


def shapes_protocol(
    n: int, world: ShapesWorld | None = None
) -> tuple[list[str], list[Scene], np.ndarray]:
    """(prompts, scenes, reference images uint8 [n, H, W, 3]) of the first n held-out scenes."""
    world = world or ShapesWorld()
    samples = [world.sample("heldout", i) for i in range(n)]
    return (
        [s.caption_long for s in samples],
        [s.scene for s in samples],
        np.stack([s.image for s in samples]),
    )


def sample_path(folder: Path, i: int) -> Path:
    return folder / "samples" / f"{i:05d}.png"


def generate_samples(
    engine,
    prompts: Sequence[str],
    dec,
    folder: str | Path,
    seed: int = 0,
    chunk: int = CHUNK,
    scorer: Callable | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> Path:
    """Write the missing samples of this rank. Prompts are cut into fixed chunks of ``chunk``;
    chunk c is generated as one batch seeded with ``seed + c`` and belongs to rank
    ``c % world_size``, so the samples do not depend on resuming or on the number of ranks."""
    folder = Path(folder)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    chunks = [list(range(s, min(s + chunk, len(prompts)))) for s in range(0, len(prompts), chunk)]
    todo = [
        (c, idx)
        for c, idx in enumerate(chunks)
        if c % world_size == rank and not all(sample_path(folder, i).is_file() for i in idx)
    ]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(len(idx) for _, idx in todo), desc=f"generating {folder.name}", unit="prompt"
        )
    for c, idx in todo:
        images = engine.text_to_image([prompts[i] for i in idx], dec, seed=seed + c, scorer=scorer)
        for i, img in zip(idx, images[:, 0], strict=True):
            tmp = sample_path(folder, i).with_suffix(".tmp.png")
            Image.fromarray(img).save(tmp)
            os.replace(tmp, sample_path(folder, i))  # atomic: a kill never leaves half a PNG
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return folder


def attribute_scores(
    images: np.ndarray, scenes: Sequence[Scene], world: ShapesWorld | None = None
) -> dict[str, np.ndarray]:
    """Per-image scene-parser scores against the prompt scenes: attributes, exact, count."""
    world = world or ShapesWorld()
    rows = [
        scene_accuracy(parse_scene(img, world), sc) for img, sc in zip(images, scenes, strict=True)
    ]
    keys = ("attributes", "attributes_strict", "exact", "count")
    return {k: np.array([r[k] for r in rows]) for k in keys}


def write_prompts(folder: str | Path, prompts: Sequence[str]) -> Path:
    """``prompts.json``: {sample file: prompt}, the layout eval/coco_fid.py --prompts reads."""
    path = Path(folder) / "prompts.json"
    path.write_text(json.dumps({f"{i:05d}.png": p for i, p in enumerate(prompts)}, indent=1))
    return path
