"""Multi-task instruction tuning data: task pools, the sampling mixture, the LightningDataModule.

A *pool* is the list of examples of one task (template keys of :mod:`lit_cm3leon.data.templates`,
images as VQ code grids). Pools come from the shapes world (exact ground truth, default) or from
the official dataset files (:mod:`lit_cm3leon.data.readers`). Images are tokenized once at setup,
in batches, and cached as ``.npz`` under ``cache_dir`` keyed by the image tokenizer's hash and
the sample range (or the list of files), so training never touches pixels.

Mixture. Each task has a natural share ``p_i = n_i / sum n`` (its pool size) and a configured
weight ``w_i`` (null = natural; a number in pool-size units; ``"<k>x"`` = ``k * n_i``, see
:func:`task_weights`). As in the paper, sampling rates are clipped to between
``min_ratio`` and ``max_ratio`` times the natural share and renormalized:
``r_i = clip(s * w_i, min_ratio * p_i, max_ratio * p_i)`` with the scalar ``s`` chosen so that
``sum r_i = 1`` (:func:`mixture_rates`).

Items are indexed by a global sample counter ``i`` as in pretraining: item ``i`` draws its task
and its example from ``default_rng([seed, i])``, so a run is the same for any number of workers
and resumes by starting the :class:`~lit_cm3leon.data.pretrain.ResumableSampler` at
``step * batch_size``. Validation is a fixed set of held-out examples per task (the shapes
world's held-out scenes, or the sources' validation split). Retrieval augmentation is not part
of SFT here (the documents are the task's inputs only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lit_cm3leon.data.collate import collate_fn, pad_item
from lit_cm3leon.data.pretrain import train_loader
from lit_cm3leon.data.templates import TASKS, get_template, render_ids
from lit_cm3leon.tokenizer.codec import DocumentCodec

log = logging.getLogger(__name__)

# Colours of the shapes world's segmentation maps, by kind (on black), and of edge maps.
SEG_COLORS: dict[str, tuple[int, int, int]] = {
    "circle": (220, 20, 20),
    "square": (20, 180, 40),
    "triangle": (30, 60, 235),
    "diamond": (255, 230, 0),
}
EDGE_COLOR = (255, 255, 255)
MAPS_VERSION = 1  # bump when the map rendering changes (it is part of the cache key)


# --- mixture -------------------------------------------------------------------------------
def mixture_rates(
    sizes: Sequence[float],
    weights: Sequence[float | None] | None = None,
    min_ratio: float = 0.3,
    max_ratio: float = 3.0,
) -> np.ndarray:
    """Sampling rate of each task: weights clipped to ``[min_ratio, max_ratio]`` x natural share.

    ``sizes`` are the pool sizes (natural shares ``p = sizes / sum``); ``weights`` the wanted
    relative rates (None or a None entry = that task's size). Returns ``r`` with ``sum r = 1`` and
    ``min_ratio * p <= r <= max_ratio * p``.
    """
    n = np.asarray(sizes, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or (n <= 0).any():
        raise ValueError(f"every task needs a non-empty pool, got sizes {n.tolist()}")
    if not 0 <= min_ratio <= 1 <= max_ratio:
        raise ValueError(f"need 0 <= min_ratio <= 1 <= max_ratio, got {min_ratio}, {max_ratio}")
    p = n / n.sum()
    w = (
        n.copy()
        if weights is None
        else np.array([n[i] if x is None else float(x) for i, x in enumerate(weights)])
    )
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"task weights must be >= 0 and not all 0, got {w.tolist()}")
    w = w / w.sum()
    lo, hi = min_ratio * p, max_ratio * p

    def total(s: float) -> float:
        return float(np.clip(s * w, lo, hi).sum())

    a, b = 0.0, 1.0
    while total(b) < 1.0 and b < 1e12:
        b *= 2.0
    for _ in range(200):  # bisection: total(s) is continuous and non-decreasing
        m = 0.5 * (a + b)
        a, b = (m, b) if total(m) < 1.0 else (a, m)
    r = np.clip(b * w, lo, hi)
    return r / r.sum()


def task_weights(tasks: Mapping[str, Any] | None, order: Sequence[str], sizes: Sequence[int]):
    """Each task's mixture weight in pool-size units from ``data.tasks``: null = its pool size
    (its natural share); a number = that many units; ``"<k>x"`` = ``k`` times its pool size, a
    multiple of its natural share that holds whatever the pool sizes are."""
    out = []
    for task, size in zip(order, sizes, strict=True):
        value = (tasks or {}).get(task)
        if isinstance(value, str):
            text = value.strip()
            try:
                k = float(text[:-1]) if text.endswith("x") else None
            except ValueError:
                k = None
            if k is None or not 0 <= k < float("inf"):
                raise ValueError(
                    f"data.tasks.{task}={value!r}: expected null (its natural share), a weight "
                    f"in pool-size units (e.g. 2500) or a multiple of its natural share (e.g. 2x)"
                )
            value = k * size
        out.append(value)
    return out


def own_scenes(shapes: dict, tasks: Sequence[str]) -> dict[str, dict[str, int]]:
    """``data.shapes.own_scenes`` checked: for each task of ``tasks`` that draws its own training
    scenes, the fields given of ``{n_train, max_shapes}`` (the others are the mixture's). Tasks
    whose entry is missing or all null use the mixture's scenes."""
    out = {}
    for task, spec in dict(shapes.get("own_scenes") or {}).items():
        get_template(task)
        spec = {k: int(v) for k, v in dict(spec or {}).items() if v is not None}
        unknown = set(spec) - {"n_train", "max_shapes"}
        if unknown:
            raise ValueError(
                f"data.shapes.own_scenes.{task} takes n_train and max_shapes (the task's own "
                f"training scenes), not {sorted(unknown)}"
            )
        if spec and task in tasks:
            out[task] = spec
    return out


def check_cfg_dropout(cfg_dropout: float) -> float:
    """``cfg_dropout`` if it is a share in [0, 1) (1 would leave no conditional example)."""
    if not 0.0 <= cfg_dropout < 1.0:
        raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout}")
    return cfg_dropout


# --- datasets ------------------------------------------------------------------------------
class SFTSequences(Dataset):
    """Map-style view over ``length`` instruction-tuning sequences.

    ``sample=True``: item ``i`` draws a task by ``rates`` and an example of it from
    ``default_rng([seed, i])``. ``sample=False``: item ``i`` is the ``i``-th of the pools'
    examples in task order (validation).

    ``cfg_dropout``: the share of sampled items of the image-output tasks rendered as the
    unconditional stream of classifier-free guidance (the prompt's text replaced by
    ``<mask:0>``, its images kept; :func:`~lit_cm3leon.data.templates.encode_example`), drawn
    from ``default_rng([seed, i, 1])`` so that the tasks and examples drawn do not change.
    """

    def __init__(
        self,
        pools: Mapping[str, Sequence[Mapping[str, Any]]],
        codec: DocumentCodec,
        seq_len: int,
        length: int | None = None,
        rates: Sequence[float] | None = None,
        seed: int = 0,
        loss_on: str = "target",
        sample: bool = True,
        cfg_dropout: float = 0.0,
    ) -> None:
        self.cfg_dropout = check_cfg_dropout(cfg_dropout) if sample else 0.0
        self.tasks = [t for t in pools if len(pools[t])]
        for t in self.tasks:
            get_template(t)  # unknown task names fail here
        self.pools = {t: list(pools[t]) for t in self.tasks}
        self.codec, self.seq_len, self.seed, self.loss_on, self.sample = (
            codec,
            seq_len,
            seed,
            loss_on,
            sample,
        )
        sizes = [len(self.pools[t]) for t in self.tasks]
        self.rates = np.asarray(
            rates if rates is not None else np.asarray(sizes) / sum(sizes), dtype=np.float64
        )
        if self.rates.size != len(self.tasks):
            raise ValueError(f"{self.rates.size} rates for {len(self.tasks)} tasks")
        self._cum = np.cumsum(self.rates / self.rates.sum())
        self._offsets = np.cumsum([0, *sizes])
        self.length = int(length) if length is not None else int(self._offsets[-1])
        self.skipped = 0  # examples that could not be rendered

    def __len__(self) -> int:
        return self.length

    def task_of(self, i: int, rng: np.random.Generator | None = None) -> tuple[str, int]:
        """``(task, example index)`` of item ``i``."""
        if not self.sample:
            k = int(np.searchsorted(self._offsets, i, side="right") - 1)
            return self.tasks[k], int(i - self._offsets[k])
        rng = rng if rng is not None else np.random.default_rng([self.seed, int(i)])
        k = min(int(np.searchsorted(self._cum, rng.random(), side="right")), len(self.tasks) - 1)
        return self.tasks[k], int(rng.integers(len(self.pools[self.tasks[k]])))

    def example(self, i: int) -> tuple[str, dict]:
        rng = np.random.default_rng([self.seed, int(i)])
        task, j = self.task_of(i, rng)
        ex = dict(self.pools[task][j])
        for many, one in (("captions", "caption"), ("answers", "answer")):  # several references
            if many in ex and ex[many] and self.sample:
                ex[one] = ex[many][int(rng.integers(len(ex[many])))]
        return task, ex

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        task, ex = self.example(i)
        uncond = (
            self.cfg_dropout > 0
            and get_template(task).target == "image"
            and np.random.default_rng([self.seed, int(i), 1]).random() < self.cfg_dropout
        )
        ids, weights = render_ids(
            self.codec, task, ex, self.loss_on, max_len=self.seq_len + 1, unconditional=uncond
        )
        item = pad_item(ids, weights, self.seq_len, self.codec.vocab.pad)
        item["task"] = torch.tensor(TASKS.index(task))  # names: templates.TASKS
        return item


# --- image tokenization with a cache ------------------------------------------------------
def _key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def encode_cached(
    tokenizer, images_fn, n: int, cache: Path | None, batch_size: int = 256
) -> np.ndarray:
    """int16 codes [n, h, w] of ``images_fn(start, stop) -> uint8 [k, H, W, 3]``, from ``cache``
    when present (else encoded in batches and written there)."""
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            codes = z["codes"]
        if codes.shape[0] == n:
            return codes
    out = np.zeros((n, tokenizer.h, tokenizer.w), dtype=np.int16)
    for a in range(0, n, batch_size):
        b = min(n, a + batch_size)
        out[a:b] = tokenizer.encode(images_fn(a, b), batch_size=batch_size).numpy().astype(np.int16)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(
            f"{cache.stem}.{os.getpid()}.tmp.npz"
        )  # ranks may race: replace is atomic
        np.savez(tmp, codes=out)
        tmp.replace(cache)
    return out


# --- the shapes world ----------------------------------------------------------------------
def segmentation_rgb(seg: np.ndarray, scene) -> np.ndarray:
    """uint8 [H, W, 3]: each shape's pixels in its kind's colour (SEG_COLORS), black elsewhere."""
    out = np.zeros((*seg.shape, 3), dtype=np.uint8)
    for i, shape in enumerate(scene.shapes):
        out[seg == i + 1] = SEG_COLORS[shape.kind]
    return out


def edges_rgb(edges: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: white edge pixels on black."""
    out = np.zeros((*edges.shape, 3), dtype=np.uint8)
    out[edges > 0] = EDGE_COLOR
    return out


def local_edit_codes(
    source_codes: np.ndarray,
    target_codes: np.ndarray,
    source_image: np.ndarray,
    target_image: np.ndarray,
    margin: int,
    threshold: int = 16,
) -> np.ndarray:
    """An edit's target as codes [h, w]: the target's own codes in the cells within ``margin``
    pixels of where the two images differ (any channel by more than ``threshold``), the
    source's codes everywhere else.

    An image tokenizer whose encoder sees beyond a code's own patch gives an unchanged region
    other codes once anything near it changes: a one-shape edit of the shapes world keeps 41%
    of the scene's codes (300 held-out edits). Trained on those targets, a decoder learns that
    copying the source's code is right less than half the time. This target keeps the source's
    codes where the image is unchanged; decoded, it still shows the target scene (the scene
    parser: 0.943 with ``margin`` 2 against 0.973 for the target's own codes, n = 300), while
    80% of its codes are the source's (41% of the target's own).
    """
    h, w = source_codes.shape
    size = source_image.shape[0]
    if source_image.shape != target_image.shape or size % h or source_image.shape[1] != size:
        raise ValueError(
            f"images {source_image.shape} and {target_image.shape} must be the same square, a "
            f"multiple of the {h}x{w} code grid"
        )
    diff = np.abs(source_image.astype(np.int16) - target_image.astype(np.int16)).max(-1)
    near = np.pad(diff > threshold, margin)
    if margin:
        near = np.lib.stride_tricks.sliding_window_view(near, (2 * margin + 1,) * 2).any((-1, -2))
    patch = size // h
    changed = near.reshape(h, patch, w, patch).any((1, 3))
    return np.where(changed, target_codes, source_codes)


def shapes_paragraph(world, scene) -> str:
    """A few sentences: the count and background, then one sentence per shape."""
    from lit_cm3leon.data.shapes import position_phrase

    n = len(scene.shapes)
    head = f"There {'is one shape' if n == 1 else f'are {n} shapes'} on {'an' if scene.background[0] in 'aeiou' else 'a'} {scene.background} background."
    body = [
        f"A {s.size} {s.color} {s.kind} is {position_phrase(world.where(s))}." for s in scene.shapes
    ]
    return " ".join([head, *body])


def spatial_objects(scene, boxes) -> list[dict]:
    """The ``spatial`` template's objects of a scene: ``[{label: "a red circle", box}]``."""
    return [
        {"label": f"a {sh.color} {sh.kind}", "box": list(b)}
        for sh, b in zip(scene.shapes, boxes, strict=True)
    ]


def shapes_pools(
    world,
    split: str,
    start: int,
    n: int,
    tokenizer,
    cache_dir: str | Path | None,
    tasks: Sequence[str] = TASKS,
    edit_margin: int | None = None,
) -> dict[str, list[dict]]:
    """Examples of every task from shapes samples ``start .. start+n-1`` of ``split``.

    Four images per sample are tokenized (once; cached): the scene, the edited scene, the
    segmentation map and the edge map (rendered by :func:`segmentation_rgb`/:func:`edges_rgb`).
    With ``edit_margin`` an edit's target is :func:`local_edit_codes` (else the edited scene's
    own codes).
    """
    samples = [world.sample(split, start + i) for i in range(n)]
    kinds = {
        "image": lambda s: s.image,
        "edited": lambda s: s.edit.after_image,
        "seg": lambda s: segmentation_rgb(s.segmentation, s.scene),
        "edges": lambda s: edges_rgb(s.edges),
    }
    need = {"image"} | ({"edited"} if "edit" in tasks else set())
    need |= {"seg"} if "seg2image" in tasks else set()
    need |= {"edges"} if "edge2image" in tasks else set()
    codes: dict[str, np.ndarray] = {}
    for kind in sorted(need):
        fn = kinds[kind]
        cache = None
        if cache_dir is not None:
            key = _key(tokenizer.hash, repr(world), split, start, n, kind, MAPS_VERSION)
            cache = Path(cache_dir) / f"sft-shapes-{split}-{start}-{n}-{kind}-{key}.npz"
        codes[kind] = encode_cached(
            tokenizer, lambda a, b, fn=fn: np.stack([fn(s) for s in samples[a:b]]), n, cache
        )
    size = [world.image_size, world.image_size]
    pools: dict[str, list[dict]] = {t: [] for t in tasks}
    for i, s in enumerate(samples):
        img = codes["image"][i]
        add = {t: pools[t].append for t in tasks}
        if "caption_short" in add:
            add["caption_short"]({"image": img, "caption": s.caption_short})
        if "caption_long" in add:
            add["caption_long"]({"image": img, "caption": s.caption_long})
        if "paragraph" in add:
            add["paragraph"]({"image": img, "paragraph": shapes_paragraph(world, s.scene)})
        for qa in s.vqa:
            task = "reasoning" if qa.qtype == "yesno" else "vqa"
            if task in add:
                add[task](
                    {"image": img, "question": qa.question, "answer": qa.answer, "qtype": qa.qtype}
                )
        if "edit" in add:
            target = codes["edited"][i]
            if edit_margin is not None:
                target = local_edit_codes(img, target, s.image, s.edit.after_image, edit_margin)
            add["edit"]({"image": img, "instruction": s.edit.instruction, "target": target})
        if "seg2image" in add:
            add["seg2image"](
                {"condition": codes["seg"][i], "caption": s.caption_short, "image": img}
            )
        if "edge2image" in add:
            add["edge2image"](
                {"condition": codes["edges"][i], "caption": s.caption_short, "image": img}
            )
        if "spatial" in add:
            objects = spatial_objects(s.scene, s.boxes)
            add["spatial"]({"objects": objects, "size": size, "image": img})
        if "text2image" in add:
            add["text2image"]({"caption": s.caption_long, "image": img})
    return pools


# --- files (official formats) --------------------------------------------------------------
IMAGE_KEYS = (
    "image",
    "target",
    "condition",
)  # example keys that hold image paths before tokenizing


def file_pools(
    sources: Sequence[Mapping[str, Any]],
    split_key: str,
    tokenizer,
    cache_dir: str | Path | None,
    max_bad_fraction: float = 0.5,
) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Examples per task from reader sources; returns ``(pools, skipped counts per source)``.

    Each source is ``{reader, root, <split_key>: split name, tasks: [...], max_examples}``
    (``split_key`` is ``split`` for training and ``val_split`` for validation). Images that
    cannot be read are skipped and counted with the reader's own skipped records; a source
    whose skipped fraction passes ``max_bad_fraction`` stops the run with the reasons.
    """
    from lit_cm3leon.data.readers import read_source
    from lit_cm3leon.tokenizer.image import open_image, resize_center_crop_pil

    pools: dict[str, list[dict]] = {}
    skipped: dict[str, int] = {}
    for src in sources:
        split = src.get(split_key)
        if split is None:
            continue
        name = f"{src['reader']}:{split}"
        records = read_source(
            src["reader"], src["root"], split, src.get("max_examples"), src.get("image_dir")
        )
        skipped[name] = read_skipped = records.skipped
        paths = sorted({str(r[k]) for r in records for k in IMAGE_KEYS if k in r})
        ok = np.ones(len(paths), dtype=bool)

        def load(a: int, b: int, paths=paths, ok=ok) -> np.ndarray:
            arrs = []
            for j in range(a, b):
                try:
                    im = resize_center_crop_pil(open_image(paths[j]), tokenizer.resolution)
                    arrs.append(np.asarray(im, dtype=np.uint8))
                except Exception as e:  # unreadable or truncated image: skip and count
                    log.warning("skipping unreadable image %s (%s)", paths[j], e)
                    ok[j] = False
                    arrs.append(np.zeros((tokenizer.resolution, tokenizer.resolution, 3), np.uint8))
            return np.stack(arrs)

        cache = bad_path = None
        if cache_dir is not None:
            key = _key(tokenizer.hash, *paths)
            cache = Path(cache_dir) / f"sft-{src['reader']}-{split}-{key}.npz"
            bad_path = cache.with_name(cache.name[:-4] + ".bad.json")
            if cache.is_file() and bad_path.is_file():
                ok[:] = True
                ok[json.loads(bad_path.read_text())] = False
        codes = encode_cached(tokenizer, load, len(paths), cache)
        if bad_path is not None and not bad_path.is_file():
            bad_path.write_text(json.dumps(np.flatnonzero(~ok).tolist()))
        row = {p: i for i, p in enumerate(paths)}
        for r in records:
            if any(k in r and not ok[row[str(r[k])]] for k in IMAGE_KEYS):
                skipped[name] += 1
                records.skip("unreadable image")
                continue
            ex = {k: (codes[row[str(v)]] if k in IMAGE_KEYS else v) for k, v in r.items()}
            for task in src["tasks"]:
                if task == "reasoning" and str(ex.get("answer", "")).lower() not in ("yes", "no"):
                    continue
                pools.setdefault(task, []).append(ex)
        total = len(records) + read_skipped
        if records.skipped:
            log.warning(
                "%s: skipped %d of %d records (%s)",
                name,
                records.skipped,
                total,
                dict(records.reasons),
            )
        if total and records.skipped / total > max_bad_fraction:
            raise ValueError(
                f"{name} under {src['root']}: {records.skipped} of {total} records are unusable "
                f"({dict(records.reasons)}), more than max_bad_fraction={max_bad_fraction}: check the "
                "dataset's files (or raise data.max_bad_fraction)"
            )
    return pools, skipped


# --- the datamodule ------------------------------------------------------------------------
class SFTDataModule(L.LightningDataModule):
    """The instruction-tuning mixture (shapes world or official files) for the decoder."""

    def __init__(
        self,
        text_tokenizer_dir: str,
        image_tokenizer_dir: str,
        cache_dir: str | None,
        source: str = "shapes",
        tasks: dict[str, float | None] | None = None,
        min_ratio: float = 0.3,
        max_ratio: float = 3.0,
        shapes: dict | None = None,
        sources: list[dict] | None = None,
        seq_len: int = 192,
        image_tokens: int = 64,
        batch_size: int = 8,
        num_workers: int = 0,
        packing: bool = True,
        max_steps: int = 1000,
        val_per_task: int = 16,
        loss_on: str = "target",
        max_bad_fraction: float = 0.5,
        edit_margin: int | None = None,
        cfg_dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_cfg_dropout(cfg_dropout)  # before setup tokenizes anything
        if source == "shapes":
            own_scenes(shapes or {}, list(tasks or TASKS))
        if source not in ("shapes", "files"):
            raise ValueError(f"source must be 'shapes' or 'files', got {source!r}")
        if loss_on not in ("target", "all"):
            raise ValueError(f"loss_on must be 'target' or 'all', got {loss_on!r}")
        if edit_margin is not None and (source != "shapes" or edit_margin < 0):
            raise ValueError(
                f"edit_margin={edit_margin}: a margin in pixels (>= 0) for the shapes world's edits "
                "(source=shapes); null keeps the edited images' own codes"
            )
        for t in tasks or {}:
            get_template(t)
        self.save_hyperparameters()
        self.train_ds: SFTSequences | None = None
        self.val_ds: SFTSequences | None = None
        self.image_tokenizer = None  # set up with the pools; also decodes SFTSamples' grids
        self.skipped: dict[str, int] = {}

    def _tokenizers(self):
        from lit_cm3leon.tokenizer.image import load_image_tokenizer

        codec = DocumentCodec.load(self.hparams.text_tokenizer_dir)
        tok = load_image_tokenizer(self.hparams.image_tokenizer_dir)
        v = codec.vocab
        if (tok.h, tok.w, tok.n_codes) != (v.image_h, v.image_w, v.n_image):
            raise ValueError(
                f"the image tokenizer at {self.hparams.image_tokenizer_dir} makes {tok.h}x{tok.w} codes from "
                f"{tok.n_codes}, but the vocabulary expects {v.image_h}x{v.image_w} from {v.n_image}: "
                "rebuild the text tokenizer's vocab.json with this image tokenizer's sizes"
            )
        return codec, tok

    def _pools(self, tok) -> tuple[dict, dict]:
        hp = self.hparams
        tasks = list(hp.tasks) if hp.tasks else list(TASKS)
        if hp.source == "shapes":
            from lit_cm3leon.data.shapes import ShapesWorld

            cfg = dict(hp.shapes or {})
            world = ShapesWorld(**cfg.get("world", {}))
            n_train, n_val = int(cfg.get("n_train", 2000)), int(cfg.get("n_val", 64))
            margin = hp.edit_margin
            own = own_scenes(cfg, tasks)  # tasks with their own training scenes
            rest = [t for t in tasks if t not in own]
            train = shapes_pools(world, "train", 0, n_train, tok, hp.cache_dir, rest, margin)
            for task, spec in own.items():
                shapes_cap = {k: v for k, v in spec.items() if k == "max_shapes"}
                w = ShapesWorld(**{**cfg.get("world", {}), **shapes_cap})
                n = spec.get("n_train", n_train)
                train |= shapes_pools(w, "train", 0, n, tok, hp.cache_dir, [task], margin)
            val = shapes_pools(world, "heldout", 0, n_val, tok, hp.cache_dir, tasks, margin)
        else:
            if not hp.sources:
                raise ValueError(
                    "data.source=files needs data.sources: [{reader, root, split, tasks}, ...]"
                )
            train, skipped = file_pools(hp.sources, "split", tok, hp.cache_dir, hp.max_bad_fraction)
            val, vskipped = file_pools(
                hp.sources, "val_split", tok, hp.cache_dir, hp.max_bad_fraction
            )
            self.skipped = {**skipped, **{f"{k} (val)": n for k, n in vskipped.items()}}
            train = {t: train[t] for t in tasks if t in train}
            val = {t: val[t] for t in tasks if t in val}
        empty = [t for t in tasks if not train.get(t)]
        if empty:
            log.warning(
                "no training examples for tasks %s: they are left out of the mixture", empty
            )
        train = {t: v for t, v in train.items() if v}
        if not train:
            raise ValueError(f"no SFT training examples for any of the tasks {tasks}")
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self.train_ds is not None:
            return
        hp = self.hparams
        codec, tok = self._tokenizers()
        self.image_tokenizer = tok
        train, val = self._pools(tok)
        order = list(train)
        sizes = [len(train[t]) for t in order]
        weights = task_weights(hp.tasks, order, sizes)
        rates = mixture_rates(sizes, weights, hp.min_ratio, hp.max_ratio)
        self.rates = dict(zip(order, rates.tolist(), strict=True))
        log.info(
            "SFT mixture: %s",
            ", ".join(f"{t} {len(train[t])} ex @ {r:.3f}" for t, r in self.rates.items()),
        )
        world = max(1, self.trainer.world_size if self.trainer else 1)
        length = hp.max_steps * hp.batch_size * world
        self.train_ds = SFTSequences(
            train, codec, hp.seq_len, length, rates, hp.seed, hp.loss_on, cfg_dropout=hp.cfg_dropout
        )
        # spread over each pool (consecutive examples often share a scene or an image)
        val = {
            t: v[:: max(1, len(v) // hp.val_per_task)][: hp.val_per_task]
            for t, v in val.items()
            if v
        }
        self.val_ds = (
            SFTSequences(val, codec, hp.seq_len, seed=hp.seed + 1, loss_on=hp.loss_on, sample=False)
            if val
            else None
        )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return train_loader(
            self.train_ds, self.trainer, hp.batch_size, hp.num_workers, self._collate()
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_ds is None:
            return []
        return DataLoader(
            self.val_ds, batch_size=self.hparams.batch_size, collate_fn=self._collate()
        )

    def _collate(self):
        return collate_fn(self.hparams.packing, self.train_ds.codec.vocab.pad)
