"""(image, caption) pairs from the shapes world, for training the retriever CLIP.

Samples are rendered once in ``setup`` (the world is deterministic: ``world.sample(split, i)``)
and kept as arrays. ``parity`` keeps only even (0) or odd (1) train indices so two CLIPs (the
retriever and the evaluation CLIP) see disjoint parts of the world. Validation uses held-out
samples, each tagged with a group id of equal ``scene.attributes()`` for attribute-hit recall.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lit_cm3leon.retrieval.metrics import group_ids

CAPTIONS = ("short", "long", "both")


def make_world(world):
    """A world object (anything with ``sample(split, i)``), or keyword arguments of
    ``ShapesWorld`` (another class with the same API may be named by a ``_target_`` key)."""
    if hasattr(world, "sample"):
        return world
    if world is None or isinstance(world, Mapping):
        kwargs = dict(world or {})
        target = kwargs.pop("_target_", "lit_cm3leon.data.shapes.ShapesWorld")
        module, _, name = target.rpartition(".")
        return getattr(importlib.import_module(module), name)(**kwargs)
    raise TypeError(f"world must be a ShapesWorld, or a dict of its arguments; got {type(world)}")


class PairArrays(Dataset):
    """Rendered pairs: ``images`` uint8 [N,H,W,3], short and long captions, group ids."""

    def __init__(self, world, split: str, indices, caption: str, seed: int = 0) -> None:
        if caption not in CAPTIONS:
            raise ValueError(f"caption must be one of {CAPTIONS}; got {caption!r}")
        samples = [world.sample(split, int(i)) for i in indices]
        self.indices = np.asarray(list(indices), np.int64)
        self.images = np.stack([s.image for s in samples]).astype(np.uint8)
        self.short = [s.caption_short for s in samples]
        self.long = [s.caption_long for s in samples]
        self.groups = group_ids([s.scene.attributes() for s in samples])
        self.caption = caption
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def text(self, i: int) -> str:
        if self.caption == "short":
            return self.short[i]
        if self.caption == "long":
            return self.long[i]
        return self.short[i] if self.rng.random() < 0.5 else self.long[i]

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i],
            "text": self.text(i),
            "group": int(self.groups[i]),
            "index": int(self.indices[i]),
        }


def collate_pairs(items: list[dict]) -> dict:
    return {
        "image": torch.from_numpy(np.stack([it["image"] for it in items])),  # uint8 [B,H,W,3]
        "text": [it["text"] for it in items],
        "group": torch.tensor([it["group"] for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


class ShapesPairDataModule(L.LightningDataModule):
    """Shapes-world (image, caption) pairs.

    Args:
        world: a ``ShapesWorld`` or its keyword arguments.
        n_train: train indices 0..n_train-1 are candidates (halved by ``parity``).
        batch_size: pairs per step (also the number of negatives in the contrastive loss).
        parity: None for all train indices, 0 for even ones, 1 for odd ones.
        caption: "short", "long" or "both" (one of the two drawn per access) for training;
            validation uses long captions unless ``caption == "short"``.
        n_val: held-out pairs for recall.
        num_workers: DataLoader workers (0: in-process; the arrays are already rendered).
        seed: caption choice for "both".
    """

    def __init__(
        self,
        world=None,
        n_train: int = 8000,
        batch_size: int = 128,
        parity: int | None = None,
        caption: str = "both",
        n_val: int = 500,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if parity not in (None, 0, 1):
            raise ValueError(f"parity must be null, 0 or 1; got {parity!r}")
        if caption not in CAPTIONS:
            raise ValueError(f"caption must be one of {CAPTIONS}; got {caption!r}")
        self.world = make_world(world)
        self.n_train, self.batch_size, self.parity = n_train, batch_size, parity
        self.caption, self.n_val, self.num_workers, self.seed = caption, n_val, num_workers, seed
        self.train_set: PairArrays | None = None
        self.val_set: PairArrays | None = None

    def train_indices(self) -> np.ndarray:
        idx = np.arange(self.n_train)
        return idx if self.parity is None else idx[idx % 2 == self.parity]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = PairArrays(
                self.world, "train", self.train_indices(), self.caption, seed=self.seed
            )
        if self.val_set is None:
            val_caption = "short" if self.caption == "short" else "long"
            self.val_set = PairArrays(self.world, "heldout", range(self.n_val), val_caption)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=collate_pairs,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=256,
            shuffle=False,
            collate_fn=collate_pairs,
            num_workers=self.num_workers,
        )
