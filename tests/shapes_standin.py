"""A small stand-in for ``lit_cm3leon.data.shapes.ShapesWorld`` with the same sampling API.

Used by the retrieval tests so they do not depend on the real world's rendering details:
``sample(split, index)`` is deterministic and returns ``image`` (uint8 [H,W,3]),
``caption_short``, ``caption_long`` and ``scene.attributes()``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 70, 230),
    "yellow": (230, 220, 40),
    "magenta": (210, 50, 210),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")


@dataclass(frozen=True)
class StandinScene:
    objects: tuple  # ((shape, color, row, col), ...)

    def attributes(self) -> tuple:
        return tuple(sorted(self.objects))


@dataclass
class StandinSample:
    scene: StandinScene
    image: np.ndarray
    caption_short: str
    caption_long: str


class StandinWorld:
    def __init__(
        self,
        image_size: int = 32,
        grid: int = 3,
        max_shapes: int = 3,
        heldout_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.image_size, self.grid, self.max_shapes, self.seed = image_size, grid, max_shapes, seed

    def sample(self, split: str, index: int) -> StandinSample:
        if split not in ("train", "heldout"):
            raise ValueError(split)
        rng = np.random.default_rng(zlib.crc32(f"{self.seed}/{split}/{index}".encode()))
        n = int(rng.integers(1, self.max_shapes + 1))
        cells = rng.choice(self.grid * self.grid, size=n, replace=False)
        objs = []
        for c in cells:
            objs.append(
                (
                    SHAPES[rng.integers(len(SHAPES))],
                    list(COLORS)[rng.integers(len(COLORS))],
                    int(c) // self.grid,
                    int(c) % self.grid,
                )
            )
        img = np.full((self.image_size, self.image_size, 3), 245, np.uint8)
        cs = self.image_size // self.grid
        yy, xx = np.mgrid[0:cs, 0:cs]
        for shape, color, r, c in objs:
            if shape == "circle":
                m = (yy - cs / 2 + 0.5) ** 2 + (xx - cs / 2 + 0.5) ** 2 <= (cs / 2 - 1) ** 2
            elif shape == "square":
                m = (yy >= 1) & (yy < cs - 1) & (xx >= 1) & (xx < cs - 1)
            else:
                m = (yy >= 1) & (np.abs(xx - cs / 2 + 0.5) <= (yy - 1) / 2 + 0.5)
            img[r * cs : (r + 1) * cs, c * cs : (c + 1) * cs][m] = COLORS[color]
        short = " and ".join(f"a {col} {sh}" for sh, col, _, _ in objs)
        long = ", ".join(f"a {col} {sh} at the {ROWS[r]} {COLS[c]}" for sh, col, r, c in objs)
        return StandinSample(StandinScene(tuple(objs)), img, short, long)
