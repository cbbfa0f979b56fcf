"""One text-to-image evaluation run of a checkpoint: a named folder, resumable, scored once.

A run folder lives under ``outputs/eval/t2i/`` and is named after what made its samples::

    <ckpt>_<protocol>_n<n>_<strategy>_cfg<cfg_scale>_s<num_samples>_k<retrieve_k>_seed<seed>[_<knobs>]

(``<knobs>``: the other decoding settings where they differ from the defaults, e.g. ``t0.8``).
It holds ``run.json`` (checkpoint path and file digest, every decoding setting), ``prompts.json``,
``samples/00000.png ...`` (the re-ranked best sample per prompt, written chunk by chunk) and,
once every sample exists, ``metrics.json``. A folder with ``metrics.json`` is a finished run and
is never regenerated; one without it resumes (finished chunks are skipped). A folder made by
another checkpoint file or other settings is refused rather than mixed.

Scores: FID on the evaluation CLIP's features (``FID-CLIP``, the shapes protocol) or clean-fid's
Inception, the CLIP score of each sample against its prompt (evaluation CLIP), and on the shapes
world the scene parser's attribute accuracy (``attr_acc``), exact-scene rate (``exact``) and
shape-count accuracy (``count_acc``) against the prompt's scene; bootstrap 95% intervals over
prompts (FID: both sets resampled).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lit_cm3leon.evaluation import bootstrap
from lit_cm3leon.evaluation import fid as fidlib
from lit_cm3leon.evaluation.metrics_io import InputError, run_header, write_metrics
from lit_cm3leon.evaluation.t2i import CHUNK, attribute_scores, sample_path

# Short names of the decoding knobs that are not part of the folder name (only when not default).
KNOB_ABBREV = {"temperature": "t", "top_p": "p", "top_k": "topk", "cdk_alpha": "a", "cdk_k": "ck"}


def ckpt_file(ckpt: str | Path) -> Path:
    p = Path(ckpt)
    return p / "model.pt" if p.is_dir() or p.suffix != ".pt" else p


def ckpt_label(ckpt: str | Path) -> str:
    """``outputs/pretrain`` (or ``.../pretrain/model.pt``) -> ``pretrain``; ``x/step100.pt`` -> ``step100``."""
    f = ckpt_file(ckpt)
    return f.parent.name if f.name == "model.pt" else f.stem


def file_digest(path: str | Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:n]


def run_name(ckpt: str | Path, protocol: str, n: int, dec, seed: int, suffix: str = "") -> str:
    """The folder name of a run (see the module docstring)."""
    from lit_cm3leon.engine import Decoding

    default = Decoding()
    knobs = [
        f"{abbr}{getattr(dec, k):g}"
        for k, abbr in KNOB_ABBREV.items()
        if getattr(dec, k) != getattr(default, k)
    ]
    name = (
        f"{ckpt_label(ckpt)}_{protocol}_n{n}_{dec.strategy}_cfg{dec.cfg_scale:g}_s{dec.num_samples}"
        f"_k{dec.retrieve_k}_seed{seed}"
    )
    return name + "".join("_" + k for k in knobs) + suffix


@dataclass
class RunSpec:
    """Everything that determines a run's samples (written to ``run.json``)."""

    ckpt: str
    ckpt_digest: str
    protocol: str
    n: int
    seed: int
    chunk: int
    decoding: dict
    extra: dict = field(default_factory=dict)  # e.g. how prefix cells pick their candidate

    def check_against(self, folder: Path) -> None:
        """Write run.json in a new folder; refuse a folder made by another checkpoint/settings."""
        path = folder / "run.json"
        mine = asdict(self)
        if path.is_file():
            theirs = json.loads(path.read_text())
            keys = [f.name for f in fields(self) if f.name != "ckpt"]  # same file may move
            diff = {k: (theirs.get(k), mine[k]) for k in keys if theirs.get(k) != mine[k]}
            if diff:
                detail = "; ".join(f"{k}: folder {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                raise InputError(
                    f"{folder} holds samples of another run ({detail}); remove the folder or pass --run-dir"
                )
            return
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(mine, indent=2))
        os.replace(tmp, path)


def is_finished(folder: str | Path) -> bool:
    return (Path(folder) / "metrics.json").is_file()


def missing_samples(folder: str | Path, n: int) -> list[int]:
    return [i for i in range(n) if not sample_path(Path(folder), i).is_file()]


def clean_partial(folder: str | Path) -> None:
    """Drop half-written files a killed run may leave (``*.tmp.png``); they are never samples."""
    for p in (Path(folder) / "samples").glob("*.tmp.png"):
        p.unlink(missing_ok=True)


def write_images(folder: str | Path, images: np.ndarray, start: int = 0) -> Path:
    """``folder/{start + i:05d}.png`` for each image (skips existing files); atomic per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        path = folder / f"{start + i:05d}.png"
        if path.is_file():
            continue
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(tmp)
        os.replace(tmp, path)
    return folder


def shapes_reference(outputs: str | Path, images: np.ndarray) -> Path:
    """The rendered held-out scenes as PNGs, shared by every run with the same images: the
    folder is named after n and a digest of the pixels, so scenes drawn in another world (or
    by another version of the renderer) never reuse the PNGs of earlier ones."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    digest = hashlib.sha256(repr(images.shape).encode() + images.tobytes()).hexdigest()[:12]
    name = f"shapes-heldout-n{len(images)}-{digest}"
    return write_images(Path(outputs) / "eval" / "t2i" / "reference" / name, images)


def coco_prompts(path: str | Path, n: int) -> tuple[list[str], list[Any]]:
    """First caption of each of the first ``n`` images of a COCO captions file (images order)."""
    from lit_cm3leon.evaluation.captioning import load_coco_captions

    refs = load_coco_captions(path)
    ids = list(refs)[:n]
    if len(ids) < n:
        raise InputError(f"--captions {path} has {len(ids)} images, fewer than --n {n}")
    return [refs[i][0] for i in ids], ids


# ----------------------------------------------------------------------------- scoring
@dataclass
class Scorers:
    """The feature space of the FID and the CLIP that scores samples against prompts."""

    features: str = "clip"  # clip | inception
    eval_clip: Any = None  # ClipEncoder (evaluation CLIP) or None
    inception_weights: str | None = None
    batch_size: int = 32

    def extractor(self):
        if self.features == "clip":
            if self.eval_clip is None:
                raise InputError(
                    "FID-CLIP needs the evaluation CLIP (outputs/eval_clip or --eval-clip)"
                )
            return fidlib.clip_extractor(self.eval_clip)
        return fidlib.inception_extractor(self.inception_weights), None


def score_run(
    folder: str | Path,
    prompts: Sequence[str],
    reference: str | Path,
    header: dict,
    scorers: Scorers,
    scenes: Sequence | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    extra: dict | None = None,
    world: Any = None,
) -> dict:
    """Score a run folder whose samples all exist; writes and returns its metrics.json
    (``world``: the ShapesWorld that parses the samples against ``scenes``)."""
    folder = Path(folder)
    n = len(prompts)
    clean_partial(folder)
    missing = missing_samples(folder, n)
    if missing:
        raise InputError(
            f"{folder}: {len(missing)} of {n} samples missing (first {missing[0]:05d}.png)"
        )
    extractor, fn_resize = scorers.extractor()
    res = fidlib.score_fid(
        folder / "samples", reference, extractor, fn_resize, n_bootstrap, seed, scorers.batch_size
    )
    metrics: dict[str, Any] = dict(fidlib.summary(res, scorers.features))
    ci95: dict[str, list[float]] = {"fid": [round(v, 4) for v in res.ci95]} if res.ci95 else {}
    per: dict[str, np.ndarray] = {}
    files = [str(sample_path(folder, i)) for i in range(n)]
    if scorers.eval_clip is not None:
        per["clip_score"] = fidlib.score_clip(files, list(prompts), scorers.eval_clip)
        metrics["clip_score_definition"] = (
            "100 * max(cos(image, text), 0), mean over samples (evaluation CLIP)"
        )
    if scenes is not None:
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        att = attribute_scores(images, scenes, world)
        per["attr_acc"], per["attr_acc_strict"], per["exact"], per["count_acc"] = (
            att["attributes"],
            att["attributes_strict"],
            att["exact"],
            att["count"],
        )
        metrics["attr_acc_definition"] = (
            "scene parser on each sample vs the prompt's scene: mean of colour/kind/size/position "
            "accuracy of matched shapes (exact: the whole scene right; count_acc: as many shapes "
            "as the prompt). Matching favours images with many shapes, so read attr_acc with "
            "count_acc and exact; attr_acc_strict counts each parsed shape beyond the prompt's "
            "count as a wrong one"
        )
    for k, v in per.items():
        metrics[k] = float(v.mean())
    if per:
        ci = bootstrap.bootstrap_ci(n, bootstrap.mean_statistic(per), n_bootstrap, seed)
        ci95.update({k: [round(a, 4) for a in pair] for k, pair in ci.items()})
    return write_metrics(
        folder / "metrics.json",
        header,
        metrics,
        ci95,
        bootstrap.info(n_bootstrap, seed, unit="prompt (FID: both image sets resampled)"),
        extra=extra,
    )


def header_for(spec: RunSpec, dec) -> dict:
    return run_header(
        protocol=spec.protocol, seed=spec.seed, n=spec.n, ckpt=spec.ckpt, strategy=dec.strategy,
        cfg_scale=dec.cfg_scale, num_samples=dec.num_samples, retrieve_k=dec.retrieve_k,
    )  # fmt: skip


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else the launcher's RANK / WORLD_SIZE, else a single process."""
    r = int(rank if rank is not None else os.environ.get("RANK", 0))
    w = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", 1))
    if w < 1 or not 0 <= r < w:
        raise InputError(f"rank {r} / world size {w}: need 0 <= rank < world_size")
    return r, w


# ----------------------------------------------------------------------------- candidates
def candidate_path(folder: Path, c: int) -> Path:
    return folder / "candidates" / f"chunk-{c:05d}.npz"


def generate_candidates(
    engine,
    prompts: Sequence[str],
    dec,
    folder: str | Path,
    scorer: Callable[[Sequence[np.ndarray], str], np.ndarray],
    seed: int = 0,
    chunk: int = CHUNK,
    rank: int = 0,
    world_size: int = 1,
) -> Path:
    """``dec.num_samples`` candidates per prompt, kept as codes with their re-ranking scores
    (``candidates/chunk-XXXXX.npz``: ``codes`` int16 [m, K, h, w], ``scores`` float32 [m, K]).
    Chunk c is seeded ``seed + c`` and belongs to rank ``c % world_size``; finished chunks are
    skipped, so a killed sweep resumes."""
    folder = Path(folder)
    (folder / "candidates").mkdir(parents=True, exist_ok=True)
    for c, s in enumerate(range(0, len(prompts), chunk)):
        path = candidate_path(folder, c)
        if c % world_size != rank or path.is_file():
            continue
        texts = list(prompts[s : s + chunk])
        codes = engine.text_to_image_codes(texts, dec, seed=seed + c)
        images = engine.decode_images(codes)
        scores = np.stack(
            [np.asarray(scorer(list(images[i]), t), dtype=np.float32) for i, t in enumerate(texts)]
        )
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, codes=codes.astype(np.int16), scores=scores)
        os.replace(tmp, path)
    return folder


def load_candidates(folder: str | Path, n: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes [n, K, h, w], scores [n, K]) of a finished candidates folder."""
    folder = Path(folder)
    parts = []
    for c in range((n + chunk - 1) // chunk):
        path = candidate_path(folder, c)
        if not path.is_file():
            raise InputError(
                f"{folder}: candidates chunk {c} missing ({path.name}); generation unfinished"
            )
        with np.load(path) as z:
            parts.append((z["codes"].astype(np.int64), z["scores"]))
    return np.concatenate([p[0] for p in parts])[:n], np.concatenate([p[1] for p in parts])[:n]


def interleave(*sets: np.ndarray) -> np.ndarray:
    """Candidates of several strategies [n, K, ...] each -> [n, len(sets) * K, ...], alternating
    (a0 b0 a1 b1 ...): every prefix of length k holds ceil(k/2) of the first and floor(k/2) of
    the second, the split of the ``mixed`` strategy."""
    return np.stack(sets, axis=2).reshape(sets[0].shape[0], -1, *sets[0].shape[2:])


def best_of_prefix(scores: np.ndarray, k: int) -> np.ndarray:
    """Index of the best of the first k candidates per prompt (ties: the earlier one)."""
    return np.argmax(scores[:, :k], axis=1)


# ----------------------------------------------------------------------------- a whole run
@dataclass
class PromptSet:
    protocol: str
    prompts: list[str]
    reference: Path  # folder of reference images
    scenes: list | None = None  # shapes world: the prompts' scenes (for attr_acc)
    world: Any = None  # shapes world: the ShapesWorld the scenes are drawn and parsed in


def prompt_set(
    n: int,
    outputs: str | Path,
    captions: str | Path | None = None,
    reference: str | Path | None = None,
) -> PromptSet:
    """The shapes protocol (first n held-out scenes) or the first captions of a COCO file."""
    if captions is None:
        from lit_cm3leon.evaluation.t2i import shapes_protocol
        from lit_cm3leon.evaluation.world import outputs_world

        world = outputs_world(outputs)
        prompts, scenes, images = shapes_protocol(n, world)
        reference = shapes_reference(outputs, images)
        return PromptSet("shapes-heldout", prompts, reference, scenes, world)
    if reference is None:
        raise InputError("--captions needs --reference DIR (the images the captions describe)")
    fidlib.list_images(reference)
    prompts, _ = coco_prompts(captions, n)
    return PromptSet(f"coco-{Path(captions).stem}", prompts, Path(reference))


class Resources:
    """Loaded once, shared by every run of a process (the ablation runs many)."""

    def __init__(
        self,
        outputs: str | Path,
        eval_clip: str | Path | None = None,
        retriever: str | Path | None = None,
    ):
        self.outputs = Path(outputs)
        self.eval_clip_dir = Path(eval_clip) if eval_clip else self.outputs / "eval_clip"
        self.retriever_dir = Path(retriever) if retriever else self.outputs / "retriever"
        self._engines: dict[tuple[str, bool], Any] = {}
        self._clips: dict[Path, Any] = {}

    def engine(self, ckpt: str | Path, retrieval: bool):
        from lit_cm3leon.engine import Engine

        key = (str(ckpt), retrieval)
        if key not in self._engines:
            self._engines[key] = Engine.load(ckpt, self.outputs, retrieval=retrieval)
        return self._engines[key]

    def clip(self, folder: Path, what: str):
        if folder not in self._clips:
            if not folder.is_dir():
                raise InputError(
                    f"{what}: no CLIP folder at {folder} (written by ClipEncoder.save / `fit experiment=...`)"
                )
            self._clips[folder] = fidlib.load_clip_encoder(folder)
        return self._clips[folder]

    def rerank_scorer(self):
        from lit_cm3leon.engine import clip_scorer

        return clip_scorer(
            self.clip(self.retriever_dir, "re-ranking (num_samples > 1) needs the retriever CLIP")
        )

    def eval_clip(self, required: bool):
        if not required and not self.eval_clip_dir.is_dir():
            return None
        return self.clip(self.eval_clip_dir, "the evaluation CLIP (FID-CLIP, CLIP score)")


def evaluate_ckpt(
    ckpt: str | Path,
    dec,
    res: Resources,
    pset: PromptSet,
    seed: int = 0,
    features: str = "clip",
    inception_weights: str | None = None,
    chunk: int = CHUNK,
    rank: int = 0,
    world_size: int = 1,
    n_bootstrap: int = 1000,
    run_dir: str | Path | None = None,
    rescore: bool = False,
    progress: bool = True,
) -> tuple[Path, dict | None]:
    """Generate (resuming) and score one run; returns (folder, metrics record or None when
    other ranks still have samples to make)."""
    from lit_cm3leon.evaluation.t2i import generate_samples, write_prompts

    n = len(pset.prompts)
    folder = (
        Path(run_dir)
        if run_dir
        else res.outputs / "eval" / "t2i" / run_name(ckpt, pset.protocol, n, dec, seed)
    )
    if is_finished(folder) and not rescore:
        return folder, json.loads((folder / "metrics.json").read_text())
    f = ckpt_file(ckpt)
    if not f.is_file():
        raise InputError(
            f"--ckpt {ckpt}: no checkpoint file {f} (publish one with `python -m lit_cm3leon.fit experiment=pretrain`)"
        )
    if dec.retrieve_k > 0 and not (res.outputs / "index" / "manifest.json").is_file():
        raise InputError(
            f"retrieve_k={dec.retrieve_k} needs the memory bank at {res.outputs / 'index'} "
            "(`python -m lit_cm3leon.prepare index`); or use --retrieve-k 0"
        )
    spec = RunSpec(str(ckpt), file_digest(f), pset.protocol, n, seed, chunk, asdict(dec))
    spec.check_against(folder)
    scorers = Scorers(features, res.eval_clip(required=features == "clip"), inception_weights)
    if features == "inception":
        scorers.extractor()  # fail on missing Inception weights before generating anything
    write_prompts(folder, pset.prompts)
    clean_partial(folder)
    if missing_samples(folder, n):
        scorer = res.rerank_scorer() if dec.num_samples > 1 else None
        engine = res.engine(ckpt, retrieval=dec.retrieve_k > 0)
        generate_samples(
            engine, pset.prompts, dec, folder, seed, chunk, scorer, rank, world_size, progress
        )
    if missing_samples(folder, n):
        return folder, None
    record = score_run(folder, pset.prompts, pset.reference, header_for(spec, dec), scorers, pset.scenes, n_bootstrap, seed,
                       extra={"run_dir": str(folder), "ckpt_digest": spec.ckpt_digest}, world=pset.world)  # fmt: skip
    return folder, record
