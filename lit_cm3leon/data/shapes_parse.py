"""Reading the shapes world back: image -> scene, caption -> claims, and scene accuracy.

The parser knows the world's palette and geometry, so it needs no training. For each grid cell
it takes the pixels that are close to one shape colour, estimates the shape's coverage (alpha)
of every pixel of the cell by projecting it onto the observed background -> shape colour line,
and picks the (kind, size) whose stencil, sharp or blurred by one pixel and shifted by at most
one pixel, is closest in squared error (or "no shape" when the empty cell is closer). Working
on soft coverage rather than a thresholded mask is what keeps small squares from turning into
circles when a reconstruction blurs their corners.
"""

from __future__ import annotations

import argparse
import itertools
import re
import time

import numpy as np

from lit_cm3leon.data.shapes import (
    BACKGROUND_PALETTE,
    BACKGROUNDS,
    COLORS,
    KINDS,
    PALETTE,
    POSITION_NAMES,
    SIZES,
    Scene,
    Shape,
    ShapesWorld,
)

# ---------------------------------------------------------------------------------------------
# Image -> scene
# ---------------------------------------------------------------------------------------------

_PAL_NAMES = COLORS + BACKGROUNDS
_PAL = np.array(
    [PALETTE[c] for c in COLORS] + [BACKGROUND_PALETTE[b] for b in BACKGROUNDS], np.float32
)
_N_SHAPE_COLORS = len(COLORS)
_MIN_PAL_DIST = min(
    float(np.linalg.norm(_PAL[i] - _PAL[j]))
    for i in range(len(_PAL))
    for j in range(i + 1, len(_PAL))
)
# A pixel votes for a shape colour only when it is this close to it (VQ colour shifts of 20-30
# per channel are ~35-52 in RGB distance; the closest two palette entries are ~100 apart).
COLOR_TOLERANCE = 0.6 * _MIN_PAL_DIST
_SHIFT_PENALTY = 0.05  # squared-error units per pixel of shift: prefer the exact grid position
MIN_GAIN = 0.5  # a cell holds a shape only if its best template fits with at least half contrast
MIN_CONTRAST = 0.25  # cells whose pixels all stay this close to the background are empty
_TABLES: dict[tuple[int, int, int], tuple] = {}


def _gauss(sigma: float, radius: int) -> tuple[float, ...]:
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return tuple(float(v) for v in k / k.sum())


# Blurs the parser expects (templates are made at each) and `degrade` can apply.
BLUR_KERNELS: dict[str, tuple[float, ...]] = {
    "binomial": (0.25, 0.5, 0.25),  # the mildest 1 px blur
    "box": (1 / 3, 1 / 3, 1 / 3),
    "gauss1.0": _gauss(1.0, 2),
    "gauss1.4": _gauss(1.4, 2),
}
_BLUR_RADIUS = 2


def _blur(a: np.ndarray, kernel: tuple[float, ...], mode: str = "constant") -> np.ndarray:
    """Separable blur over the first two axes (zero outside, or `mode='edge'`)."""
    r = len(kernel) // 2
    pad = ((r, r), (r, r)) + ((0, 0),) * (a.ndim - 2)
    p = np.pad(a, pad, mode=mode)
    h, w = a.shape[:2]
    rows = sum(k * p[i : i + h] for i, k in enumerate(kernel))
    return sum(k * rows[:, i : i + w] for i, k in enumerate(kernel))


def _tables(world: ShapesWorld):
    """Templates [K, cs*cs] of every (kind, size, shift, blur) in a cell, with labels."""
    key = (world.image_size, world.grid, world.cell_size)
    if key in _TABLES:
        return _TABLES[key]
    cs = world.cell_size
    b = 1 + _BLUR_RADIUS  # canvas border: room for a 1 px shift and the blur
    templates, labels, penalty = [], [], []
    for kind in KINDS:
        for size in SIZES:
            stencil = world.stencils[(kind, size)].astype(np.float32)
            side = stencil.shape[0]
            off = (cs - side) // 2
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                canvas = np.zeros((cs + 2 * b, cs + 2 * b), np.float32)
                y, x = off + dy + b, off + dx + b
                canvas[y : y + side, x : x + side] = stencil
                for blur in (None, *BLUR_KERNELS.values()):
                    t = canvas if blur is None else _blur(canvas, blur)
                    templates.append(t[b:-b, b:-b].ravel())
                    labels.append((kind, size))
                    penalty.append(_SHIFT_PENALTY * (abs(dy) + abs(dx)))
    t = np.stack(templates)
    out = (t, (t**2).sum(1), np.array(penalty, np.float32), labels)
    _TABLES[key] = out
    return out


def _as_hwc_float(image, size: int, value_range: tuple[float, float]) -> np.ndarray:
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().float().cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.shape != (size, size, 3):
        raise ValueError(
            f"expected an image [{size},{size},3] (or [3,{size},{size}]), got {a.shape}"
        )
    a = a.astype(np.float32)
    lo, hi = value_range
    if (lo, hi) != (0.0, 255.0):
        a = (a - lo) * (255.0 / (hi - lo))
    return a


def parse_scene(
    image, world: ShapesWorld, value_range: tuple[float, float] = (0.0, 255.0)
) -> Scene:
    """Scene read from an image, [H,W,3] or [3,H,W], numpy or torch, whose values span
    `value_range` (uint8 0-255 by default; pass (-1, 1) for decoder outputs)."""
    img = _as_hwc_float(image, world.image_size, value_range)
    templates, t_sq, penalty, labels = _tables(world)
    d2 = ((img[:, :, None, :] - _PAL[None, None]) ** 2).sum(-1)  # [H, W, P]
    lab = d2.argmin(-1)
    close = d2.min(-1) < COLOR_TOLERANCE**2
    # Background: the majority of background-coloured pixels; its observed colour is their mean.
    is_bg = lab >= _N_SHAPE_COLORS
    if is_bg.any():
        bg_idx = int(np.bincount(lab[is_bg] - _N_SHAPE_COLORS, minlength=len(BACKGROUNDS)).argmax())
        bg_obs = img[lab == bg_idx + _N_SHAPE_COLORS].mean(0)
    else:  # no pixel near any background colour: take the nearest to the median pixel
        med = np.median(img.reshape(-1, 3), 0)
        bg_idx = int(((_PAL[_N_SHAPE_COLORS:] - med) ** 2).sum(1).argmin())
        bg_obs = med
    # A global colour cast shows on the background: remove it before naming shape colours.
    cast = bg_obs - _PAL[_N_SHAPE_COLORS + bg_idx]
    if float(np.abs(cast).max()) > 2.0:
        d2 = ((img[:, :, None, :] - cast - _PAL[None, None]) ** 2).sum(-1)
        lab = d2.argmin(-1)
        close = d2.min(-1) < COLOR_TOLERANCE**2
    # Shape colours as they should look under that cast, and their contrast with the background.
    shape_rgb = _PAL[:_N_SHAPE_COLORS] + cast
    contrast = shape_rgb - bg_obs  # [C, 3]
    dev = np.linalg.norm(img - bg_obs, axis=-1)
    min_dev = MIN_CONTRAST * float(np.linalg.norm(contrast, axis=1).min())
    shapes = []
    for r in range(world.grid):
        for c in range(world.grid):
            x0, y0, x1, y1 = world.cell_box(r, c)
            cell_dev = dev[y0:y1, x0:x1].ravel()
            if cell_dev.max() < min_dev:
                continue
            cell = img[y0:y1, x0:x1].reshape(-1, 3)
            cl = lab[y0:y1, x0:x1].ravel()
            ok = close[y0:y1, x0:x1].ravel() & (cl < _N_SHAPE_COLORS)
            if ok.any():  # pure pixels: a majority vote among them
                color = int(np.bincount(cl[ok], minlength=_N_SHAPE_COLORS).argmax())
                c_obs = cell[ok & (cl == color)].mean(0)
            else:  # all mixed with the background (blur): the colour whose bg->colour line
                # best explains the most contrasted pixels
                core = cell[cell_dev >= 0.6 * cell_dev.max()] - bg_obs  # [N, 3]
                a = np.clip(core @ contrast.T / (contrast**2).sum(1), 0.0, 1.0)  # [N, C]
                resid = ((core[:, None, :] - a[..., None] * contrast[None]) ** 2).sum((0, 2))
                color = int(resid.argmin())
                c_obs = shape_rgb[color]
            direction = c_obs - bg_obs
            alpha = (cell - bg_obs) @ direction / max(float(direction @ direction), 1e-6)
            # Squared error after the best gain g = t.a / t.t per template (so a mis-estimated
            # colour contrast scales alpha without changing the shape): |a|^2 - (t.a)^2 / t.t.
            dot = templates @ alpha
            gain = dot / t_sq
            score = np.where(gain > MIN_GAIN, dot * gain, -np.inf) - penalty
            best = int(score.argmax())
            if not np.isfinite(score[best]):  # nothing that looks like a shape: empty cell
                continue
            kind, size = labels[best]
            shapes.append(Shape(kind, COLORS[color], size, r, c))
    return Scene(BACKGROUNDS[bg_idx], tuple(shapes))


def degrade(
    image: np.ndarray,
    rng: np.random.Generator,
    noise_std: float = 0.0,
    blur: str | None = None,
    color_shift: float = 0.0,
) -> np.ndarray:
    """Mimic a lossy reconstruction: a blur (a name of BLUR_KERNELS), a random per-channel
    colour shift in [-color_shift, color_shift], and Gaussian noise. Returns uint8."""
    a = image.astype(np.float32)
    if blur is not None:
        a = _blur(a, BLUR_KERNELS[blur], mode="edge")
    if color_shift:
        a = a + rng.uniform(-color_shift, color_shift, size=3).astype(np.float32)
    if noise_std:
        a = a + rng.normal(0.0, noise_std, size=a.shape).astype(np.float32)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Caption -> claims
# ---------------------------------------------------------------------------------------------

_POS_ALT = "|".join(sorted(POSITION_NAMES, key=len, reverse=True)) + r"|row \d+ column \d+"
_CLAIM_RE = re.compile(
    rf"\b(?:(?:{'|'.join(SIZES)}) )?({'|'.join(COLORS)}) ({'|'.join(KINDS)})s?\b"
    rf"(?: (?:at|on|in) the ({_POS_ALT})\b)?"
)


def claims_from_caption(text: str) -> set[tuple[str, ...]]:
    """{(color, kind)} or {(color, kind, position)} for each '<color> <kind> [at the <pos>]'
    phrase of a caption written in the world's grammar ('a large red circle at the top left')."""
    norm = " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())
    out = set()
    for m in _CLAIM_RE.finditer(norm):
        color, kind, pos = m.groups()
        out.add((color, kind, pos) if pos else (color, kind))
    return out


# ---------------------------------------------------------------------------------------------
# Scene accuracy
# ---------------------------------------------------------------------------------------------

_SHAPE_FIELDS = ("color", "kind", "size", "position")


def _agree(p: Shape, t: Shape) -> tuple[int, int, int, int]:
    return (p.color == t.color, p.kind == t.kind, p.size == t.size, p.cell == t.cell)


def scene_accuracy(pred: Scene, target: Scene) -> dict[str, float]:
    """Per-scene scores in [0, 1]. `exact`: same attributes; `background`; `count`: same
    number of shapes; `color`/`kind`/`size`/`position`: fraction of target shapes whose
    matched predicted shape has that attribute right (the matching maximizes agreement,
    unmatched target shapes count as wrong); `attributes`: mean of those four; `precision`:
    fraction of predicted shapes that equal a target shape; `attributes_strict`: `attributes`
    with every predicted shape beyond the target's count counted as a wrong one (the sum of the
    matched shapes' field agreements over max(target, predicted) shapes), so an image crowded
    with shape-like blobs no longer scores well."""
    n_t = len(target.shapes)
    slots = list(range(len(pred.shapes))) + [None] * n_t
    best, best_score = None, -1
    for assign in itertools.permutations(slots, n_t):
        score = sum(
            sum(_agree(pred.shapes[j], t))
            for j, t in zip(assign, target.shapes, strict=True)
            if j is not None
        )
        if score > best_score:
            best, best_score = assign, score
    per_field = np.zeros(4)
    for j, t in zip(best, target.shapes, strict=True):
        if j is not None:
            per_field += _agree(pred.shapes[j], t)
    strict = float(per_field.mean() / max(n_t, len(pred.shapes), 1))
    per_field = per_field / max(n_t, 1)
    target_set = {s.cell + (s.kind, s.color, s.size) for s in target.shapes}
    hits = sum(s.cell + (s.kind, s.color, s.size) in target_set for s in pred.shapes)
    out = {
        "exact": float(pred.attributes() == target.attributes()),
        "background": float(pred.background == target.background),
        "count": float(len(pred.shapes) == n_t),
    }
    out.update({f: float(v) for f, v in zip(_SHAPE_FIELDS, per_field, strict=True)})
    out["attributes"] = float(per_field.mean())
    out["attributes_strict"] = strict
    out["precision"] = hits / len(pred.shapes) if pred.shapes else float(n_t == 0)
    return out


def mean_accuracy(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


# ---------------------------------------------------------------------------------------------
# Benchmark: python -m lit_cm3leon.data.shapes
# ---------------------------------------------------------------------------------------------


def parser_accuracy(
    world: ShapesWorld, n: int = 1000, seed: int = 0, **degradation
) -> dict[str, float]:
    """Mean scene_accuracy of parse_scene on the first n held-out samples, optionally degraded."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        scene = world.scene("heldout", i)
        img = world.render(scene)
        if degradation:
            img = degrade(img, rng, **degradation)
        rows.append(scene_accuracy(parse_scene(img, world), scene))
    return mean_accuracy(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Shapes-world throughput and parser accuracy.")
    ap.add_argument("--n", type=int, default=5000, help="samples for the throughput runs")
    ap.add_argument("--n-parse", type=int, default=1000, help="held-out images per parser test")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    world = ShapesWorld(seed=args.seed)
    print(world)

    def rate(fn, n):
        """Items per second of this process's CPU time (one core; fair on a busy machine)."""
        t = time.process_time()
        for i in range(n):
            fn(i)
        return n / (time.process_time() - t)

    def full(split):
        def f(i):
            s = world.sample(split, i)
            return s.vqa, s.boxes, s.segmentation, s.edges, s.edit

        return f

    print(
        f"train   image+captions: {rate(lambda i: world.sample('train', i), args.n):8.0f} samples/s (CPU time)"
    )
    print(
        f"heldout image+captions: {rate(lambda i: world.sample('heldout', i), args.n):8.0f} samples/s (CPU time)"
    )
    print(f"train   all fields    : {rate(full('train'), args.n // 5):8.0f} samples/s (CPU time)")
    print(
        f"parse_scene           : {rate(lambda i: parse_scene(world.sample('heldout', i).image, world), args.n_parse):8.0f} images/s (CPU time)"
    )
    keys = {world.scene("heldout", i).key() for i in range(args.n)}
    print(f"distinct held-out scenes in the first {args.n}: {len(keys)}")
    settings = {
        "clean": {},
        "noise std 10": {"noise_std": 10.0},
        "blur 1px (binomial)": {"blur": "binomial"},
        "blur 1px (box)": {"blur": "box"},
        "blur gauss sigma 1.4": {"blur": "gauss1.4"},
        "noise 10 + blur": {"noise_std": 10.0, "blur": "binomial"},
        "noise 10 + gauss 1.0": {"noise_std": 10.0, "blur": "gauss1.0"},
        "shift 25 + noise 10 + blur": {"noise_std": 10.0, "blur": "binomial", "color_shift": 25.0},
    }
    print(f"parser accuracy on {args.n_parse} held-out images:")
    for name, deg in settings.items():
        acc = parser_accuracy(world, args.n_parse, seed=args.seed, **deg)
        print(f"  {name:28s} " + " ".join(f"{k}={v:.4f}" for k, v in acc.items()))
    return 0
