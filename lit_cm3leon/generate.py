"""``python -m lit_cm3leon.generate``: prompts to PNGs (and a grid), images to captions/answers,
and the SFT image tasks (edit, seg2image, edge2image, spatial).

Writes into a folder named after the checkpoint and the decoding settings (never over a
finished one): one PNG per sample, ``grid.png`` (a row per prompt, re-ranked best first) and
``settings.json`` with every setting and the outputs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("lit_cm3leon.generate")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def default_ckpt(output_dir: Path) -> Path:
    for stage in ("sft", "pretrain"):
        if (output_dir / stage / "model.pt").is_file():
            return output_dir / stage
    raise FileNotFoundError(
        f"no checkpoint given and none published under {output_dir}/sft or {output_dir}/pretrain: "
        "pass ckpt=PATH or run `python -m lit_cm3leon.fit experiment=pretrain`"
    )


def run_folder(cfg: DictConfig, ckpt: Path) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    name = f"{ckpt.name}_{cfg.task}_{cfg.strategy}_cfg{cfg.cfg_scale:g}_n{cfg.num_samples}_k{cfg.retrieve_k}_seed{cfg.seed}"
    return Path(cfg.paths.output_dir) / "samples" / name


def save_grid(images: np.ndarray, path: Path, pad: int = 2) -> None:
    """images uint8 [R, C, H, W, 3] -> one PNG with R rows and C columns."""
    from PIL import Image

    R, C, H, W, _ = images.shape
    canvas = np.full((R * (H + pad) + pad, C * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for r in range(R):
        for c in range(C):
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            canvas[y : y + H, x : x + W] = images[r, c]
    Image.fromarray(canvas).save(path)


def text_to_image(cfg: DictConfig, engine, out: Path) -> dict:
    from PIL import Image

    from lit_cm3leon.engine import Decoding

    prompts = [cfg.prompt] if isinstance(cfg.prompt, str) else list(cfg.prompt or [])
    if not prompts:
        raise ValueError('task=text_to_image needs prompt="..." (or a list of prompts)')
    dec = Decoding.from_mapping(cfg)
    scorer = None
    if cfg.rerank and dec.num_samples > 1:
        from lit_cm3leon.engine import clip_scorer
        from lit_cm3leon.retrieval.encoder import ClipEncoder

        scorer = clip_scorer(ClipEncoder.load(Path(cfg.paths.output_dir) / "retriever"))
    images = engine.text_to_image(prompts, dec, seed=cfg.seed, scorer=scorer)  # best first
    for i in range(len(prompts)):
        for j in range(dec.num_samples):
            Image.fromarray(images[i, j]).save(out / f"prompt{i:03d}_rank{j:02d}.png")
    save_grid(images, out / "grid.png")
    return {"prompts": prompts, "reranked": scorer is not None}


def infill(cfg: DictConfig, engine, out: Path) -> dict:
    """task=infill_text: fill the <mask> of prompt= about image=; task=infill_image: redraw
    the token rows region=[r0,r1) of image= given the caption prompt=."""
    from PIL import Image

    from lit_cm3leon.engine import Decoding
    from lit_cm3leon.tokenizer.image import open_image

    if not cfg.image or not cfg.prompt:
        raise ValueError(f"task={cfg.task} needs image=PATH and prompt=...")
    dec = Decoding.from_mapping(cfg)
    codes = engine.image_tokenizer.encode(open_image(cfg.image)).numpy()[0]
    if cfg.task == "infill_text":
        text = engine.infill_text(codes, cfg.prompt, dec, seed=cfg.seed)
        print(text)
        return {"image": str(cfg.image), "prompt": cfg.prompt, "output": text}
    r0, r1 = cfg.region
    w = engine.vocab.image_w
    filled = engine.infill_image(cfg.prompt, codes, r0 * w, r1 * w, dec, seed=cfg.seed)
    pixels = engine.decode_images(np.stack([codes, filled]))
    Image.fromarray(pixels[1]).save(out / "infilled.png")
    save_grid(pixels[None], out / "grid.png")
    return {"image": str(cfg.image), "prompt": cfg.prompt, "region_rows": [r0, r1]}


IMAGE_TASKS = {  # task -> (what image= is, what prompt= is), the SFT templates' inputs
    "edit": ("image", "instruction"),
    "seg2image": ("condition", "caption"),
    "edge2image": ("condition", "caption"),
    "spatial": (None, None),  # objects=[{label, box}] and size=[W, H] instead
}


def sft_image_task(cfg: DictConfig, engine, out: Path) -> dict:
    """task=edit (image= the source, prompt= the instruction), seg2image / edge2image (image=
    the segmentation or edge map, prompt= the caption) or spatial (objects=[{label, box}] with
    boxes in pixels of an image of size=[W, H]): the SFT model's image for its task's prompt,
    ``num_samples`` of them, guided by the prompt against its text masked (as in training)."""
    from PIL import Image

    from lit_cm3leon.engine import Decoding
    from lit_cm3leon.tokenizer.image import open_image

    image_key, text_key = IMAGE_TASKS[cfg.task]
    inputs: dict = {}
    shown = []  # the input image, first in the grid's row
    if image_key is None:
        objects = OmegaConf.to_container(cfg.objects, resolve=True) if cfg.objects else None
        if not objects or not cfg.size:
            raise ValueError(
                "task=spatial needs objects=[{label: ..., box: [x0, y0, x1, y1]}, ...] and "
                "size=[W, H] (the image the boxes are in, in pixels)"
            )
        bad = [o for o in objects if not isinstance(o, dict) or {"label", "box"} - set(o)]
        if bad or any(len(o["box"]) != 4 for o in objects):
            raise ValueError(
                f"task=spatial: each object is {{label: str, box: [x0, y0, x1, y1]}}, got {objects}"
            )
        inputs = {"objects": objects, "size": list(cfg.size)}
    else:
        if not cfg.image or not cfg.prompt:
            raise ValueError(
                f"task={cfg.task} needs image=PATH (the {image_key}) and prompt=... (the {text_key})"
            )
        codes = engine.image_tokenizer.encode(open_image(cfg.image)).numpy()[0]
        inputs = {image_key: codes, text_key: str(cfg.prompt)}
        shown = [engine.decode_images(codes[None])[0]]
    dec = Decoding.from_mapping(cfg)
    samples = engine.decode_images(engine.task_image_codes(cfg.task, [inputs], dec, cfg.seed)[0])
    for j, image in enumerate(samples):
        Image.fromarray(image).save(out / f"sample{j:02d}.png")
    save_grid(np.stack([*shown, *samples])[None], out / "grid.png")
    return {"inputs": {k: v for k, v in inputs.items() if k != image_key}, "samples": len(samples)}


def image_to_text(cfg: DictConfig, engine) -> dict:
    from lit_cm3leon.data.templates import inference_prompt
    from lit_cm3leon.engine import Decoding
    from lit_cm3leon.tokenizer.image import open_image

    if not cfg.image:
        raise ValueError(f"task={cfg.task} needs image=PATH")
    if cfg.task == "vqa" and not cfg.question:
        raise ValueError('task=vqa needs question="..."')
    codes = engine.image_tokenizer.encode(open_image(cfg.image)).numpy()
    template = "caption_long" if cfg.task == "caption" else "vqa"
    prompt = inference_prompt(template, engine.codec, image=codes[0], question=cfg.question)
    text = engine.image_to_text(codes, Decoding.from_mapping(cfg), seed=cfg.seed, prompts=[prompt])[
        0
    ]
    print(text)
    return {"image": str(cfg.image), "question": cfg.question, "output": text}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lit_cm3leon.engine import Engine

    tasks = ("text_to_image", "caption", "vqa", "infill_text", "infill_image", *IMAGE_TASKS)
    if cfg.task not in tasks:
        raise ValueError(f"task={cfg.task!r}: choose one of {', '.join(tasks)}")
    output_dir = Path(cfg.paths.output_dir)
    ckpt = Path(cfg.ckpt) if cfg.ckpt else default_ckpt(output_dir)
    out = run_folder(cfg, ckpt)
    if (out / "settings.json").is_file():
        log.info("%s is a finished run; pass out_dir=... or another seed to make new samples", out)
        print(out)
        return
    engine = Engine.load(ckpt, output_dir, retrieval=cfg.retrieve_k > 0)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.task == "text_to_image":
        result = text_to_image(cfg, engine, out)
    elif cfg.task.startswith("infill"):
        result = infill(cfg, engine, out)
    elif cfg.task in IMAGE_TASKS:
        result = sft_image_task(cfg, engine, out)
    else:
        result = image_to_text(cfg, engine)
    settings = {"ckpt": str(ckpt), **OmegaConf.to_container(cfg, resolve=False), **result}
    settings.pop("hydra", None)
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    log.info("wrote %s", out)
    print(out)


if __name__ == "__main__":
    main()
