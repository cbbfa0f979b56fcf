"""The shapes world an outputs folder's stages were made in, for the evaluations that draw scenes.

Held-out scenes, their renders and the scene parser all depend on the world's geometry (image
size, grid, ``cell_align``), so a run made with ``cell_align=4`` has to be scored in that world.
Each stage records the world it used:

* the image tokenizer, in ``image_tokenizer/manifest.json`` (``config.data.size`` and
  ``config.data.world``);
* pre-tokenized shards, in ``tokens/<name>/manifest.json`` (``source``, what ``prepare
  tokenize`` was given);
* an SFT checkpoint, in its ``manifest.json`` (``config.data.shapes.world``).

:func:`outputs_world` reads them all and returns their world; records that disagree raise an
``InputError`` naming each file and its geometry, since such a run's numbers would mix worlds.
The evaluation's held-out set is always that of world seed 0 (the world's default), whatever
seed a stage trained with. Without any record it is the default world.
"""

from __future__ import annotations

from pathlib import Path

from lit_cm3leon.data.shapes import ShapesWorld
from lit_cm3leon.data.shards import shapes_world_kwargs
from lit_cm3leon.evaluation.metrics_io import InputError
from lit_cm3leon.utils.manifest import MANIFEST, read_manifest

# ShapesWorld arguments that decide where and how shapes are drawn, with their defaults.
GEOMETRY: dict[str, int] = {"image_size": 32, "grid": 3, "cell_align": 1}


def geometry(kwargs: dict) -> dict[str, int]:
    """The geometry part of ShapesWorld arguments, defaults filled in."""
    return {k: int(kwargs.get(k, default)) for k, default in GEOMETRY.items()}


def _data_config(folder: Path) -> dict:
    return ((read_manifest(folder) or {}).get("config") or {}).get("data") or {}


def _tokenizer_geometry(folder: Path) -> dict | None:
    data = _data_config(folder)
    if data.get("source") != "shapes":
        return None
    return geometry({"image_size": data.get("size", 32), **(data.get("world") or {})})


def tokenizer_world(tokenizer_dir: str | Path) -> ShapesWorld:
    """The ``ShapesWorld`` an image tokenizer folder was trained on (the default world when its
    manifest records another source or none)."""
    return ShapesWorld(**(_tokenizer_geometry(Path(tokenizer_dir)) or {}))


def recorded_geometries(outputs: str | Path, ckpt: str | Path | None = None) -> dict[str, dict]:
    """manifest path -> the world geometry it records, over the stages under ``outputs`` (and
    the checkpoint folder ``ckpt``) that were made in the shapes world."""
    outputs = Path(outputs)
    found: dict[str, dict] = {}
    tokenizer = outputs / "image_tokenizer"
    if (recorded := _tokenizer_geometry(tokenizer)) is not None:
        found[str(tokenizer / MANIFEST)] = recorded
    for shards in sorted(m.parent for m in (outputs / "tokens").glob(f"*/{MANIFEST}")):
        source = (read_manifest(shards) or {}).get("source") or {}
        if source.get("source") == "shapes":
            found[str(shards / MANIFEST)] = geometry(shapes_world_kwargs(source))
    if ckpt is not None:
        data = _data_config(Path(ckpt))
        if data.get("source") == "shapes" and isinstance(data.get("shapes"), dict):
            found[str(Path(ckpt) / MANIFEST)] = geometry(data["shapes"].get("world") or {})
    return found


def outputs_world(outputs: str | Path, ckpt: str | Path | None = None) -> ShapesWorld:
    """The ``ShapesWorld`` the stages under ``outputs`` (and ``ckpt``) were made in (module doc)."""
    found = recorded_geometries(outputs, ckpt)
    if len({tuple(g.items()) for g in found.values()}) > 1:
        listing = "; ".join(f"{path}: {g}" for path, g in found.items())
        raise InputError(
            f"the stages under {outputs} were made in different shapes worlds ({listing}); make "
            "them in one world (python -m lit_cm3leon.pipeline --cell-align N; by hand, "
            "prepare tokenize --cell-align N and world.cell_align=N for every fit run) before "
            "evaluating"
        )
    return ShapesWorld(**next(iter(found.values()), {}))
