"""Image sources for tokenizer training: the shapes world, an image folder, webdataset shards.

Every item is a float tensor ``[3, S, S]`` in [-1, 1]. Unreadable files are skipped and counted
(``bad`` counters; batches carry ``n_bad`` so the LightningModule can log them), never crash a run.
The webdataset reader follows the img2dataset layout: tar members ``{key}.jpg`` (or png/webp),
``{key}.txt`` (caption), ``{key}.json`` (metadata), grouped by key.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lit_cm3leon.tokenizer.image import (
    DEFAULT_MAX_IMAGE_PIXELS,
    check_size,
    open_image,
    resize_center_crop_pil,
    to_rgb,
)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def pil_to_tensor(im: Image.Image, size: int) -> torch.Tensor:
    arr = np.asarray(resize_center_crop_pil(to_rgb(im), size), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def list_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist (expected a folder of {', '.join(IMAGE_EXTS)} files)"
        )
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def split_of(name: str, val_fraction: float) -> str:
    """Deterministic train/val split by a hash of the file name."""
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


class FolderImages(Dataset):
    """Images under a folder (recursive); item = tensor or ``None`` when the file is unreadable."""

    def __init__(
        self, paths: list[Path], size: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    ):
        self.paths, self.size, self.max_pixels = paths, size, max_pixels
        self.bad = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        try:
            return pil_to_tensor(open_image(self.paths[i], self.max_pixels), self.size)
        except Exception:  # unreadable / truncated / too large: skipped and counted
            self.bad += 1
            return None


def iter_wds_samples(
    shards: list[str | Path], counts: dict[str, int] | None = None
) -> Iterator[tuple[str, dict[str, bytes], str]]:
    """Yield ``(key, {ext: bytes}, shard_name)`` from img2dataset tars; truncated tars stop early and count."""
    counts = counts if counts is not None else {}
    for shard in shards:
        group: dict[str, bytes] = {}
        key = None
        try:
            with tarfile.open(shard, "r") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = Path(m.name).name
                    k, _, ext = base.partition(".")
                    if k != key and group:
                        yield key, group, str(shard)
                        group = {}
                    key = k
                    f = tf.extractfile(m)
                    group[ext.lower()] = f.read() if f is not None else b""
        except (tarfile.TarError, OSError, EOFError):
            counts["truncated_shards"] = counts.get("truncated_shards", 0) + 1
            group = {}  # the sample being read when the tar broke is incomplete: dropped
        if group:
            yield key, group, str(shard)


def decode_wds_image(group: dict[str, bytes], max_pixels: int | None) -> Image.Image:
    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in group:
            with Image.open(io.BytesIO(group[ext])) as im:
                check_size(*im.size, max_pixels)
                return to_rgb(im)
    raise ValueError("no image member (jpg/jpeg/png/webp) in the sample")


def wds_caption(group: dict[str, bytes]) -> tuple[str, dict]:
    text = group.get("txt", b"").decode("utf-8", errors="replace").strip()
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except ValueError:
            meta = {}
    return text, meta


class WdsImages(IterableDataset):
    """Images from webdataset shards; unreadable samples yield ``None`` (counted by the collate)."""

    def __init__(
        self, shards: list[str], size: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    ):
        self.shards, self.size, self.max_pixels = shards, size, max_pixels

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        shards = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for _key, group, _shard in iter_wds_samples(shards):
            try:
                yield pil_to_tensor(decode_wds_image(group, self.max_pixels), self.size)
            except Exception:
                yield None


class _Take(Dataset):
    """The first ``n`` items of an indexable dataset (the shapes world is unbounded)."""

    def __init__(self, ds: Any, n: int):
        self.ds = ds
        self.n = min(n, len(ds)) if hasattr(ds, "__len__") else n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.ds[i]
        if isinstance(x, dict):
            x = x["image"]
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if x.dtype == torch.uint8:  # [H, W, 3] uint8 -> [3, H, W] in [-1, 1]
            x = x.permute(2, 0, 1).float() / 127.5 - 1.0
        return x


def collate_images(items: list[torch.Tensor | None]) -> dict[str, Any]:
    good = [x for x in items if x is not None]
    image = torch.stack(good) if good else torch.empty(0, 3, 0, 0)
    return {"image": image, "n_bad": len(items) - len(good)}


class ImageDataModule(L.LightningDataModule):
    """Images for the tokenizer. ``source``: ``shapes`` | ``folder`` | ``wds`` | ``dataset``.

    ``dataset`` takes ready objects (``train_dataset`` / ``val_dataset``), used by tests and
    notebooks; the others build their datasets from ``root`` / ``shards`` / the world settings.
    """

    def __init__(
        self,
        source: str = "shapes",
        size: int = 32,
        batch_size: int = 32,
        val_batch_size: int = 128,
        num_workers: int = 0,
        train_count: int = 20000,
        val_count: int = 512,
        world: dict | None = None,
        root: str | None = None,
        shards: list[str] | str | None = None,
        val_shards: list[str] | str | None = None,
        val_fraction: float = 0.05,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        train_dataset: Any = None,
        val_dataset: Any = None,
    ):
        super().__init__()
        if source not in ("shapes", "folder", "wds", "dataset"):
            raise ValueError(
                f"ImageDataModule source must be shapes|folder|wds|dataset, got {source!r}"
            )
        self.source, self.size = source, size
        self.batch_size, self.val_batch_size, self.num_workers = (
            batch_size,
            val_batch_size,
            num_workers,
        )
        self.train_count, self.val_count = train_count, val_count
        self.world_kwargs = dict(world or {})
        self.root, self.val_fraction, self.max_pixels = root, val_fraction, max_image_pixels
        self.shards = [shards] if isinstance(shards, str) else list(shards or [])
        self.val_shards = [val_shards] if isinstance(val_shards, str) else list(val_shards or [])
        self.train_ds, self.val_ds = train_dataset, val_dataset
        self.world = None
        if source == "folder" and root is None:
            raise ValueError("ImageDataModule(source='folder') needs root=<folder of images>")
        if source == "wds" and not self.shards:
            raise ValueError(
                "ImageDataModule(source='wds') needs shards=[...] (img2dataset tar files)"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.source == "dataset":
            if self.train_ds is None:
                raise ValueError("source='dataset' needs train_dataset")
            self.train_ds = _Take(self.train_ds, self.train_count)
            self.val_ds = _Take(
                self.val_ds if self.val_ds is not None else self.train_ds, self.val_count
            )
        elif self.source == "shapes" and self.world is None:
            from lit_cm3leon.data.shapes import ShapesImageDataset, ShapesWorld

            self.world = ShapesWorld(**{"image_size": self.size, **self.world_kwargs})
            self.train_ds = ShapesImageDataset(self.world, "train", self.train_count)
            self.val_ds = ShapesImageDataset(self.world, "heldout", self.val_count)
        elif self.source == "folder" and self.train_ds is None:
            paths = list_images(self.root)
            if not paths:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {self.root}")
            train = [p for p in paths if split_of(p.name, self.val_fraction) == "train"]
            val = [p for p in paths if split_of(p.name, self.val_fraction) == "val"] or paths[
                : max(1, len(paths) // 20)
            ]
            self.train_ds = FolderImages(train, self.size, self.max_pixels)
            self.val_ds = FolderImages(val[: self.val_count], self.size, self.max_pixels)
        elif self.source == "wds" and self.train_ds is None:
            self.train_ds = WdsImages(self.shards, self.size, self.max_pixels)
            self.val_ds = WdsImages(self.val_shards or self.shards[-1:], self.size, self.max_pixels)

    def train_dataloader(self) -> DataLoader:
        shuffle = not isinstance(self.train_ds, IterableDataset)
        return DataLoader(
            self.train_ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_images,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_ds,
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_images,
        )
