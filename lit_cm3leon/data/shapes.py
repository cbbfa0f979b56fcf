"""The shapes world: procedurally generated images of coloured shapes with exact ground truth.

A scene is a background colour plus one to `max_shapes` shapes, each with a kind, a colour, a
size and a grid cell (at most one shape per cell, so shapes never overlap). Everything is made
from a seed, nothing is read from disk, and every label is exact: short and long captions, VQA
pairs, bounding boxes, segmentation and edge maps, and before/after edit pairs.

The held-out split is a property of the scene, not of the index: `is_heldout(scene, fraction)`
hashes the scene's canonical key, the train generator rejects held-out scenes and the held-out
generator yields only those. So the split is the same for every seed and no scene ever appears
on both sides.

The reverse direction (image -> scene, caption -> claims, scene accuracy) lives in
`shapes_parse.py` and is re-exported here.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import Dataset

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Shape colours, far apart in RGB (min pairwise distance ~100) and far from every background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 180, 40),
    "blue": (30, 60, 235),
    "yellow": (255, 230, 0),
    "purple": (150, 30, 210),
    "orange": (255, 128, 0),
}
BACKGROUND_PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_PALETTE)
SIZES: tuple[str, ...] = ("small", "large")
# Side of a shape as a fraction of the grid cell (small >= 5 px and large >= small + 2, below
# which a small circle and a small diamond become the same stencil).
SIZE_FRACTION: dict[str, float] = {"small": 0.5, "large": 0.8}
MIN_CELL = 7
# Names of the cells of the default 3x3 grid, row-major.
POSITION_NAMES: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
QTYPES: tuple[str, ...] = ("color", "shape", "count", "position", "yesno")
# Landmark names are three of these syllables (16^3 = 4,096 names; see ShapesWorld.landmark).
LANDMARK_SYLLABLES: tuple[str, ...] = (
    "ba", "ko", "ri", "zu", "mel", "tan", "vo", "shi",
    "dor", "pa", "lu", "gre", "fen", "kax", "ol", "nim",
)  # fmt: skip
SPLITS: tuple[str, ...] = ("train", "heldout")


def position_name(row: int, col: int, grid: int = 3) -> str:
    """Name of a grid cell: "top left" ... on the 3x3 grid, "row 1 column 2" on other grids."""
    if grid == 3:
        return POSITION_NAMES[row * 3 + col]
    return f"row {row + 1} column {col + 1}"


def position_phrase(name: str) -> str:
    """Preposition + cell name, as used in long captions and questions."""
    if name == "center":
        return "in the center"
    if name in ("left", "right"):
        return f"on the {name}"
    return f"at the {name}"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def answer_vocabulary(grid: int = 3, max_shapes: int = 3) -> tuple[str, ...]:
    """The closed set of VQA answers."""
    positions = tuple(position_name(r, c, grid) for r in range(grid) for c in range(grid))
    counts = tuple(str(i) for i in range(max_shapes + 1))
    return COLORS + KINDS + SIZES + positions + counts + ("yes", "no")


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    row: int
    col: int

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def attributes(self) -> tuple:
        """Hashable canonical description; equal for scenes that render to the same image."""
        return (
            self.background,
            tuple(sorted((s.row, s.col, s.kind, s.color, s.size) for s in self.shapes)),
        )

    def key(self) -> str:
        """Canonical string, e.g. 'white|0,0,large,red,circle;1,1,small,blue,square'."""
        bg, shapes = self.attributes()
        return (
            bg
            + "|"
            + ";".join(f"{r},{c},{size},{color},{kind}" for r, c, kind, color, size in shapes)
        )

    @classmethod
    def from_key(cls, key: str) -> Scene:
        """Inverse of `key()` (shapes in row-major order), e.g. for scenes kept in metadata."""
        try:
            background, body = key.split("|")
            shapes = []
            for part in body.split(";") if body else []:
                r, c, size, color, kind = part.split(",")
                shapes.append(Shape(kind, color, size, int(r), int(c)))
        except ValueError as e:
            raise ValueError(
                f"not a scene key: {key!r} (expected 'bg|row,col,size,color,kind;...')"
            ) from e
        return cls(background, tuple(shapes))

    def claims(self, grid: int = 3, positions: bool = False) -> set[tuple[str, ...]]:
        """The (color, kind[, position]) set a correct caption of this scene would claim."""
        if positions:
            return {(s.color, s.kind, position_name(s.row, s.col, grid)) for s in self.shapes}
        return {(s.color, s.kind) for s in self.shapes}


def is_heldout(scene: Scene, fraction: float) -> bool:
    """Deterministic hash split on the scene's canonical key (independent of any seed)."""
    digest = hashlib.blake2b(scene.key().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


# ---------------------------------------------------------------------------------------------
# Ground truth records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str  # one of QTYPES


@dataclass(frozen=True, eq=False)
class Edit:
    """One attribute of one shape changed; `shape_index` indexes both scenes' `shapes`."""

    instruction: str
    before: Scene
    after: Scene
    before_image: np.ndarray
    after_image: np.ndarray
    shape_index: int = 0
    attribute: str = ""  # "color" | "kind" | "size" | "position"


class ShapesSample:
    """One sample. The scene, image and captions are made eagerly (they are what training
    reads most); VQA, boxes, segmentation, edges and the edit are computed on first access."""

    def __init__(
        self,
        world: ShapesWorld,
        split: str,
        index: int,
        scene: Scene,
        image: np.ndarray,
        captions: tuple[str, str] | None = None,
    ):
        self.world, self.split, self.index = world, split, index
        self.scene = scene
        self.image = image
        if captions is None:
            captions = world.caption_short(scene), world.caption_long(scene)
        self.caption_short, self.caption_long = captions

    def __repr__(self) -> str:
        return f"ShapesSample({self.split}[{self.index}]: {self.caption_long!r})"

    @cached_property
    def vqa(self) -> list[QA]:
        return self.world.vqa(self.scene, self.world._rng(self.split, self.index, "vqa"))

    @cached_property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """Per shape (x0, y0, x1, y1) in pixels, x1/y1 exclusive: seg[y0:y1, x0:x1] is tight."""
        return self.world.boxes(self.scene)

    @cached_property
    def segmentation(self) -> np.ndarray:
        return self.world.segmentation(self.scene)

    @cached_property
    def edges(self) -> np.ndarray:
        return edges_from_segmentation(self.segmentation)

    @cached_property
    def edit(self) -> Edit:
        rng = self.world._rng(self.split, self.index, "edit")
        return self.world.edit(self.scene, rng, before_image=self.image, split=self.split)


def edges_from_segmentation(seg: np.ndarray) -> np.ndarray:
    """uint8 [H,W] 0/1: shape pixels with a 4-neighbour of another label (or the image border)."""
    padded = np.pad(seg, 1, mode="constant", constant_values=255)
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    return (differs & (seg > 0)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def make_stencil(kind: str, side: int) -> np.ndarray:
    """Boolean [side, side] mask of a shape, measured at pixel centres."""
    c = (side - 1) / 2
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    dx, dy = np.abs(x - c), np.abs(y - c)
    if kind == "circle":
        return dx**2 + dy**2 <= (side / 2) ** 2
    if kind == "square":
        return np.ones((side, side), dtype=bool)
    if kind == "diamond":
        return dx + dy <= side / 2
    if kind == "triangle":  # apex up, base on the bottom row
        return dx <= (y + 1) / 2
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------


class ShapesWorld:
    """Generator of shapes-world samples, deterministic in (seed, split, index)."""

    def __init__(
        self,
        image_size: int = 32,
        grid: int = 3,
        max_shapes: int = 3,
        heldout_fraction: float = 0.1,
        seed: int = 0,
        cell_align: int = 1,
    ):
        if cell_align < 1:
            raise ValueError(f"cell_align must be >= 1 px, got {cell_align}")
        if grid < 1:
            raise ValueError(f"grid must be >= 1 cell per side, got {grid}")
        # Cells are a multiple of cell_align px and start on one. With cell_align equal to the
        # image tokenizer's patch (4: 8 px cells on a 4 px margin at 32 px) a shape covers the
        # same patches in the same way in every cell, and with 1x1 encoder convolutions it is the
        # same codes wherever it is (docs/experiments.md: Cells on the tokenizer's patches, with
        # the warm-up). 1: the largest cells that fit (10 px on a 1 px margin at 32 px).
        cell = (image_size // grid) // cell_align * cell_align
        if cell < MIN_CELL:
            raise ValueError(
                f"image_size={image_size} too small for grid={grid} with cells aligned to "
                f"{cell_align} px: cells need >= {MIN_CELL} px so that every kind and size stays "
                f"distinct (use a larger image_size or a smaller cell_align)"
            )
        if not 1 <= max_shapes <= grid * grid:
            raise ValueError(f"max_shapes must be in 1..{grid * grid}, got {max_shapes}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.image_size, self.grid, self.max_shapes = image_size, grid, max_shapes
        self.heldout_fraction, self.seed, self.cell_align = heldout_fraction, seed, cell_align
        self.cell_size = cell
        self.margin = (image_size - cell * grid) // 2 // cell_align * cell_align
        self.positions = tuple(position_name(r, c, grid) for r in range(grid) for c in range(grid))
        small = max(5, round(SIZE_FRACTION["small"] * self.cell_size))
        large = min(self.cell_size, max(small + 2, round(SIZE_FRACTION["large"] * self.cell_size)))
        self.side = {"small": small, "large": large}
        self.stencils = {(k, s): make_stencil(k, self.side[s]) for k in KINDS for s in SIZES}
        # Tight box of each stencil inside its side x side square: (x0, y0, x1, y1).
        self._stencil_box = {}
        for ks, m in self.stencils.items():
            ys, xs = np.nonzero(m)
            self._stencil_box[ks] = (
                int(xs.min()),
                int(ys.min()),
                int(xs.max()) + 1,
                int(ys.max()) + 1,
            )
        self._rgb = {
            n: np.array(v, dtype=np.uint8) for n, v in {**PALETTE, **BACKGROUND_PALETTE}.items()
        }
        self._cells = [(r, c) for r in range(grid) for c in range(grid)]

    def __repr__(self) -> str:
        return (
            f"ShapesWorld(image_size={self.image_size}, grid={self.grid}, max_shapes={self.max_shapes}, "
            f"heldout_fraction={self.heldout_fraction}, seed={self.seed}, cell_align={self.cell_align})"
        )

    # -- geometry ---------------------------------------------------------------------------
    def shape_origin(self, shape: Shape) -> tuple[int, int]:
        """(x, y) of the top-left corner of the shape's side x side square."""
        side = self.side[shape.size]
        off = (self.cell_size - side) // 2
        return (
            self.margin + shape.col * self.cell_size + off,
            self.margin + shape.row * self.cell_size + off,
        )

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        x0 = self.margin + col * self.cell_size
        y0 = self.margin + row * self.cell_size
        return (x0, y0, x0 + self.cell_size, y0 + self.cell_size)

    # -- sampling ---------------------------------------------------------------------------
    def _rng(self, split: str, index: int, purpose: str = "scene") -> random.Random:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return random.Random(f"shapes/{self.seed}/{split}/{index}/{purpose}")

    def random_scene(self, rng: random.Random) -> Scene:
        """A scene from the full distribution (no split filtering), shapes in row-major order."""
        n = rng.randint(1, self.max_shapes)
        cells = sorted(rng.sample(range(self.grid * self.grid), n))
        shapes = tuple(
            Shape(rng.choice(KINDS), rng.choice(COLORS), rng.choice(SIZES), *divmod(i, self.grid))
            for i in cells
        )
        return Scene(rng.choice(BACKGROUNDS), shapes)

    def in_split(self, scene: Scene, split: str) -> bool:
        return is_heldout(scene, self.heldout_fraction) == (split == "heldout")

    def scene(self, split: str, index: int) -> Scene:
        """Rejection sampling: draw scenes until one falls on the requested side of the split."""
        rng = self._rng(split, index)
        while True:
            scene = self.random_scene(rng)
            if self.in_split(scene, split):
                return scene

    def sample(self, split: str, index: int) -> ShapesSample:
        """The index-th sample of a split ("train" or "heldout"); same (seed, split, index),
        same sample."""
        scene = self.scene(split, index)
        return ShapesSample(self, split, index, scene, self.render(scene))

    # -- landmarks: named scenes, the world's knowledge -----------------------------------
    @cached_property
    def _landmark_order(self) -> list[int]:
        return random.Random(f"shapes/{self.seed}/landmark-names").sample(range(4096), 4096)

    def landmark(self, k: int) -> tuple[str, Scene]:
        """The k-th landmark (k < 4,096): a made-up name and a fixed scene (a background and two
        shapes). Its captions give the name and nothing of what it looks like, so drawing it
        takes knowing it (memorised in the weights) or retrieving a document that shows it."""
        if not 0 <= k < len(LANDMARK_SYLLABLES) ** 3:
            raise ValueError(f"landmark index must be in [0, 4096), got {k}")
        a, rest = divmod(self._landmark_order[k], 256)
        name = "".join(LANDMARK_SYLLABLES[i] for i in (a, *divmod(rest, 16)))
        rng = random.Random(f"shapes/{self.seed}/landmark/{k}")
        cells = sorted(rng.sample(range(self.grid * self.grid), min(2, self.grid * self.grid)))
        shapes = tuple(
            Shape(rng.choice(KINDS), rng.choice(COLORS), rng.choice(SIZES), *divmod(i, self.grid))
            for i in cells
        )
        return name, Scene(rng.choice(BACKGROUNDS), shapes)

    def landmark_sample(self, split: str, index: int, n_landmarks: int) -> ShapesSample:
        """A view of one of the first ``n_landmarks`` landmarks with one extra shape in a free
        cell: "the <name> with a small red circle at the top left" (short caption: "the
        <name>"). The split is decided by the whole scene, as for ordinary samples, so a
        held-out view is of a known landmark but never a scene seen in training."""
        if self.grid * self.grid < 3:
            raise ValueError("landmarks need a grid of at least 3 cells")
        rng = self._rng(split, index, "landmark")
        while True:
            name, base = self.landmark(rng.randrange(n_landmarks))
            taken = {s.cell for s in base.shapes}
            free = [divmod(i, self.grid) for i in range(self.grid * self.grid)]
            row, col = rng.choice([c for c in free if c not in taken])
            extra = Shape(rng.choice(KINDS), rng.choice(COLORS), rng.choice(SIZES), row, col)
            scene = Scene(
                base.background, tuple(sorted((*base.shapes, extra), key=lambda s: s.cell))
            )
            if self.in_split(scene, split):
                break
        where = position_phrase(self.where(extra))
        captions = (
            f"the {name}",
            f"the {name} with a {extra.size} {extra.color} {extra.kind} {where}",
        )
        return ShapesSample(self, split, index, scene, self.render(scene), captions)

    # -- rendering --------------------------------------------------------------------------
    def render(self, scene: Scene) -> np.ndarray:
        """uint8 [H, W, 3]."""
        n = self.image_size
        img = np.empty((n, n, 3), dtype=np.uint8)
        img[:] = self._rgb[scene.background]
        for shape in scene.shapes:
            side = self.side[shape.size]
            x, y = self.shape_origin(shape)
            mask = self.stencils[(shape.kind, shape.size)]
            img[y : y + side, x : x + side][mask] = self._rgb[shape.color]
        return img

    def segmentation(self, scene: Scene) -> np.ndarray:
        """uint8 [H, W]: 0 background, i + 1 for scene.shapes[i]."""
        seg = np.zeros((self.image_size, self.image_size), dtype=np.uint8)
        for i, shape in enumerate(scene.shapes):
            side = self.side[shape.size]
            x, y = self.shape_origin(shape)
            seg[y : y + side, x : x + side][self.stencils[(shape.kind, shape.size)]] = i + 1
        return seg

    def boxes(self, scene: Scene) -> list[tuple[int, int, int, int]]:
        out = []
        for shape in scene.shapes:
            x, y = self.shape_origin(shape)
            bx0, by0, bx1, by1 = self._stencil_box[(shape.kind, shape.size)]
            out.append((x + bx0, y + by0, x + bx1, y + by1))
        return out

    # -- language ---------------------------------------------------------------------------
    def where(self, shape: Shape) -> str:
        return position_name(shape.row, shape.col, self.grid)

    @staticmethod
    def _join(items: list[str]) -> str:
        if len(items) == 1:
            return items[0]
        return ", ".join(items[:-1]) + " and " + items[-1]

    def caption_short(self, scene: Scene) -> str:
        """e.g. 'a red circle and an orange square'."""
        return self._join([f"{article(s.color)} {s.color} {s.kind}" for s in scene.shapes])

    def caption_long(self, scene: Scene) -> str:
        """e.g. 'a large red circle at the top left and a small blue square in the center, on a
        white background'."""
        items = [
            f"a {s.size} {s.color} {s.kind} {position_phrase(self.where(s))}" for s in scene.shapes
        ]
        return f"{self._join(items)}, on {article(scene.background)} {scene.background} background"

    def caption_boxes(self, scene: Scene, n_loc: int = 100) -> str:
        """The long caption with each shape's box as four ``<loc:N>`` tokens in place of its
        position words, as the ``spatial`` template writes boxes, e.g. 'a large red circle
        <loc:3><loc:3><loc:28><loc:28> and ..., on a white background'."""
        from lit_cm3leon.data.templates import box_text

        size = self.image_size
        items = [
            f"a {s.size} {s.color} {s.kind} {box_text(b, size, size, n_loc)}"
            for s, b in zip(scene.shapes, self.boxes(scene), strict=True)
        ]
        return f"{self._join(items)}, on {article(scene.background)} {scene.background} background"

    # Fields a referring expression may use, tried from shortest to longest.
    _REF_FIELDS = (("kind",), ("color", "kind"), ("size", "color", "kind"), ("kind", "position"),
                   ("color", "kind", "position"), ("color",), ("size", "color"), ("position",))  # fmt: skip

    def refer(self, scene: Scene, i: int, exclude: tuple[str, ...] = ()) -> str | None:
        """Shortest unambiguous noun phrase for scene.shapes[i] ('the red circle', 'the shape
        at the top'), not using the attributes in `exclude`; None if there is none."""
        target = scene.shapes[i]

        def value(s: Shape, f: str):
            return s.cell if f == "position" else getattr(s, f)

        for fields in self._REF_FIELDS:
            if any(f in exclude for f in fields):
                continue
            if all(
                any(value(s, f) != value(target, f) for f in fields)
                for j, s in enumerate(scene.shapes)
                if j != i
            ):
                words = [getattr(target, f) for f in ("size", "color") if f in fields]
                words.append(target.kind if "kind" in fields else "shape")
                phrase = "the " + " ".join(words)
                if "position" in fields:
                    phrase += " " + position_phrase(self.where(target))
                return phrase
        return None

    def vqa(self, scene: Scene, rng: random.Random) -> list[QA]:
        """One question each of color, shape, count and position (skipped when every shape
        looks alike, so none can be named without its position), then a yes and a no."""
        shapes = scene.shapes
        qa: list[QA] = []
        # color
        i = rng.randrange(len(shapes))
        qa.append(
            QA(f"what color is {self.refer(scene, i, ('color',))}?", shapes[i].color, "color")
        )
        # shape
        i = rng.randrange(len(shapes))
        qa.append(
            QA(f"what shape is {position_phrase(self.where(shapes[i]))}?", shapes[i].kind, "shape")
        )
        # count
        variant = rng.randrange(3)
        if variant == 0:
            qa.append(QA("how many shapes are there?", str(len(shapes)), "count"))
        elif variant == 1:
            color = rng.choice(COLORS)
            n = sum(s.color == color for s in shapes)
            qa.append(QA(f"how many {color} shapes are there?", str(n), "count"))
        else:
            kind = rng.choice(KINDS)
            n = sum(s.kind == kind for s in shapes)
            qa.append(QA(f"how many {kind}s are there?", str(n), "count"))
        # position: a shape that can be named without its position
        order = list(range(len(shapes)))
        rng.shuffle(order)
        for i in order:
            ref = self.refer(scene, i, ("position",))
            if ref is not None:
                qa.append(QA(f"where is {ref}?", self.where(shapes[i]), "position"))
                break
        # yes/no: one true and one false statement
        for truth in (True, False):
            qa.append(self._yesno(scene, rng, truth))
        return qa

    def _yesno(self, scene: Scene, rng: random.Random, truth: bool) -> QA:
        shapes = scene.shapes
        variant = rng.randrange(3)
        answer = "yes" if truth else "no"
        if variant == 0:  # is there a <color> <kind>?
            present = {(s.color, s.kind) for s in shapes}
            if truth:
                color, kind = rng.choice(sorted(present))
            else:
                absent = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
                color, kind = rng.choice(absent)
            return QA(f"is there {article(color)} {color} {kind}?", answer, "yesno")
        occupied = {s.cell for s in shapes}
        cells = [c for c in self._cells if (c in occupied) == truth]
        if variant == 1 and cells:  # is there a shape <position>? (needs a free cell for "no")
            r, c = rng.choice(cells)
            return QA(
                f"is there a shape {position_phrase(position_name(r, c, self.grid))}?",
                answer,
                "yesno",
            )
        # is the <ref> <color>?
        i = rng.randrange(len(shapes))
        color = (
            shapes[i].color if truth else rng.choice([c for c in COLORS if c != shapes[i].color])
        )
        return QA(f"is {self.refer(scene, i, ('color',))} {color}?", answer, "yesno")

    # -- edits ------------------------------------------------------------------------------
    def edit(
        self,
        scene: Scene,
        rng: random.Random,
        before_image: np.ndarray | None = None,
        split: str | None = None,
    ) -> Edit:
        """Change exactly one attribute of one shape. With `split`, the edited scene stays on
        the same side of the held-out split as long as any such edit exists."""
        shapes = scene.shapes
        occupied = {s.cell for s in shapes}
        free = [c for c in self._cells if c not in occupied]
        candidates = []
        for i, s in enumerate(shapes):
            candidates += [(i, "color", c) for c in COLORS if c != s.color]
            candidates += [(i, "kind", k) for k in KINDS if k != s.kind]
            candidates += [(i, "size", z) for z in SIZES if z != s.size]
            candidates += [(i, "position", cell) for cell in free]
        rng.shuffle(candidates)
        # The four attributes are equally likely: draw one, try its candidates first.
        first_attr = rng.choice(sorted({t[1] for t in candidates}))
        candidates.sort(key=lambda t: t[1] != first_attr)  # stable: keeps the shuffle within groups
        chosen = None
        for i, attr, value in candidates:
            s = shapes[i]
            if attr == "position":
                new = Shape(s.kind, s.color, s.size, *value)
            else:
                new = Shape(**{**s.__dict__, attr: value})
            after = Scene(scene.background, shapes[:i] + (new,) + shapes[i + 1 :])
            if chosen is None:
                chosen = (i, attr, value, after)
            if split is None or self.in_split(after, split):
                chosen = (i, attr, value, after)
                break
        i, attr, value, after = chosen
        ref = self.refer(scene, i)
        if attr == "color":
            instruction = f"make {ref} {value}"
        elif attr == "kind":
            instruction = f"turn {ref} into {article(value)} {value}"
        elif attr == "size":
            instruction = f"make {ref} {value}"
        else:
            instruction = f"move {ref} to the {position_name(*value, self.grid)}"
        if before_image is None:
            before_image = self.render(scene)
        return Edit(instruction, scene, after, before_image, self.render(after), i, attr)


# ---------------------------------------------------------------------------------------------
# Torch dataset for the image tokenizer
# ---------------------------------------------------------------------------------------------


class ShapesImageDataset(Dataset):
    """Map-style dataset of float images [3, H, W] in [-1, 1] (scene + render only: fast)."""

    def __init__(self, world: ShapesWorld, split: str = "train", size: int = 10_000):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.world, self.split, self.size = world, split, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.size:
            raise IndexError(index)
        img = self.world.render(self.world.scene(self.split, index))
        return torch.from_numpy(img).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# Image / caption -> scene (implemented in shapes_parse.py)
# ---------------------------------------------------------------------------------------------


def parse_scene(
    image, world: ShapesWorld, value_range: tuple[float, float] = (0.0, 255.0)
) -> Scene:
    """Read the scene back out of an image ([H,W,3] or [3,H,W], numpy or torch, values in
    `value_range`: uint8 0-255 by default, (-1, 1) for decoder outputs)."""
    from lit_cm3leon.data.shapes_parse import parse_scene as _parse

    return _parse(image, world, value_range)


def claims_from_caption(text: str) -> set[tuple[str, ...]]:
    """(color, kind) or (color, kind, position) claims of a caption in the world's grammar."""
    from lit_cm3leon.data.shapes_parse import claims_from_caption as _claims

    return _claims(text)


def scene_accuracy(pred: Scene, target: Scene) -> dict[str, float]:
    """Exact match plus colour / kind / size / position accuracy of matched shapes."""
    from lit_cm3leon.data.shapes_parse import scene_accuracy as _acc

    return _acc(pred, target)


if __name__ == "__main__":
    from lit_cm3leon.data.shapes_parse import main

    main()
