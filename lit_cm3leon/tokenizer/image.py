"""``ImageTokenizer``: pixels <-> VQ code grids, around a :class:`~lit_cm3leon.tokenizer.vqgan.VQGAN`.

``encode`` accepts, batched or single:

* uint8 arrays / tensors ``[B, H, W, 3]`` or ``[H, W, 3]`` (RGB);
* PIL images (any mode: converted to RGB, transparency composited on white);
* float tensors ``[B, 3, H, W]`` / ``[3, H, W]`` already in [-1, 1] (used as is, e.g. ``decode``'s
  float output or a dataset's tensors).

Images whose size differs from the tokenizer's resolution are resized (shorter side) and
center-cropped. ``decode`` returns uint8 ``[B, H, W, 3]``; ``encode(decode(ids))`` works.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lit_cm3leon.tokenizer import checkpoints
from lit_cm3leon.tokenizer.vqgan import PRESETS, VQGAN, preset

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS default (about 0.25 GB of RGB)


class ImageInputError(ValueError):
    """An image the tokenizer refuses (too small, too large, wrong layout)."""


def check_size(width: int, height: int, max_pixels: int | None, what: str = "image") -> None:
    if width < 2 or height < 2:
        raise ImageInputError(f"{what} is {width}x{height} pixels; images must be at least 2x2")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageInputError(
            f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(decompression-bomb guard); raise max_image_pixels if the image is trusted"
        )


def open_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file as RGB, checking its header size before decoding any pixels."""
    with Image.open(path) as im:
        check_size(*im.size, max_pixels, what=str(path))
        return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; alpha (RGBA, LA, PA, transparent palettes) is composited on white."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits first
        arr = np.asarray(im, dtype=np.float64)
        hi = max(float(arr.max()), 1.0)
        im = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8))
    return im.convert("RGB")


def resize_center_crop_pil(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    if (w, h) == (size, size):
        return im
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """float [B, 3, H, W] -> [B, 3, size, size] (shorter side to ``size``, then center crop)."""
    H, W = x.shape[-2:]
    if (H, W) == (size, size):
        return x
    s = size / min(H, W)
    nh, nw = max(size, round(H * s)), max(size, round(W * s))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(
        -1, 1
    )
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size]


class ImageTokenizer:
    """Batched, gradient-free encode/decode with a VQGAN; see the module docstring for inputs."""

    def __init__(
        self,
        model: VQGAN,
        info: dict | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.model = model.eval()
        self.info = dict(info or {})
        self.max_image_pixels = max_image_pixels

    # --- facts ---------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def h(self) -> int:
        return self.config.latent_size

    @property
    def w(self) -> int:
        return self.config.latent_size

    @property
    def n_codes(self) -> int:
        return self.config.n_embed

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hash(self) -> str:
        return checkpoints.state_hash(self.model)

    def to(self, device: str | torch.device) -> ImageTokenizer:
        self.model.to(device)
        return self

    # --- input normalisation -------------------------------------------------------------
    def _pil_to_tensor(self, im: Image.Image) -> torch.Tensor:
        check_size(*im.size, self.max_image_pixels)
        im = resize_center_crop_pil(to_rgb(im), self.resolution)
        arr = np.asarray(im, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0

    def _uint8_to_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ImageInputError(
                f"uint8 images must be [B, H, W, 3] or [H, W, 3] RGB, got shape {tuple(x.shape)}"
            )
        check_size(x.shape[2], x.shape[1], self.max_image_pixels)
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return resize_center_crop(x, self.resolution)

    def _float_to_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ImageInputError(
                f"float images must be [B, 3, H, W] or [3, H, W] in [-1, 1], got shape {tuple(x.shape)} "
                "(uint8 [B, H, W, 3] is also accepted)"
            )
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.01 or hi > 1.01:
            raise ImageInputError(
                f"float images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]"
            )
        check_size(x.shape[3], x.shape[2], self.max_image_pixels)
        return resize_center_crop(x.float(), self.resolution)

    def to_pixels(self, images: Any) -> torch.Tensor:
        """Any accepted input -> float [B, 3, R, R] in [-1, 1] at the tokenizer's resolution."""
        if isinstance(images, Image.Image):
            return self._pil_to_tensor(images)[None]
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(
                np.array(images, copy=not images.flags.writeable or not images.flags.c_contiguous)
            )
        if isinstance(images, torch.Tensor):
            if images.dtype == torch.uint8:
                return self._uint8_to_tensor(images)
            if images.is_floating_point():
                return self._float_to_tensor(images)
            raise ImageInputError(f"images must be uint8 or float, got dtype {images.dtype}")
        if (
            isinstance(images, Sequence)
            and not isinstance(images, (str, bytes))
            and len(images) > 0
        ):
            return torch.cat([self.to_pixels(im) for im in images])
        raise ImageInputError(
            f"cannot encode {type(images).__name__}: pass PIL images, uint8 [B,H,W,3]/[H,W,3] arrays or "
            "tensors, float [B,3,H,W] tensors in [-1,1], or a non-empty list of those"
        )

    # --- the two directions --------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Any, batch_size: int = 256, bf16: bool = False) -> torch.Tensor:
        """Images -> int64 codes [B, h, w] (on CPU).

        ``bf16=True`` runs the encoder under bf16 autocast (about 2.8x faster on AMX CPUs; the
        nearest-code search stays fp32, but codes near a tie may differ from the fp32 result).
        """
        x = self.to_pixels(images)
        out = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            for i in range(0, len(x), batch_size):
                out.append(self.model.encode(x[i : i + batch_size].to(self.device)).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, ids: Any, batch_size: int = 256) -> torch.Tensor:
        """int codes [B, h, w] or [h, w] -> uint8 [B, H, W, 3] (on CPU)."""
        ids = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).long()
        if ids.ndim == 2:
            ids = ids[None]
        if ids.ndim != 3:
            raise ImageInputError(
                f"codes must be [B, h, w] or [h, w], got shape {tuple(ids.shape)}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_codes):
            raise ImageInputError(
                f"codes must be in [0, {self.n_codes}), got [{int(ids.min())}, {int(ids.max())}]"
            )
        out = []
        for i in range(0, len(ids), batch_size):
            x = self.model.decode(ids[i : i + batch_size].to(self.device)).float().cpu()
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
        return torch.cat(out)

    def save(self, out_dir: str | Path, manifest: dict | None = None) -> Path:
        """Write our checkpoint folder (model.pt, config.json, manifest.json)."""
        extra = {k: v for k, v in self.info.items() if k in ("preset",)}
        return checkpoints.save_folder(self.model, out_dir, {**extra, **(manifest or {})})


def load_image_tokenizer(
    path_or_preset: str | Path,
    *,
    device: str | torch.device = "cpu",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    resolution: int | None = None,
    seed: int = 0,
) -> ImageTokenizer:
    """A trained tokenizer from a path, or a preset's architecture freshly initialised (seeded).

    Paths: our folder (``model.pt`` + ``config.json`` + ``manifest.json``), a taming-transformers
    ``.ckpt``, or a Hugging Face Chameleon VQ-VAE folder. ``resolution`` overrides the input size
    when it cannot be known from the file (taming checkpoints without their yaml).
    """
    p = Path(path_or_preset)
    if str(path_or_preset) in PRESETS and not p.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VQGAN(preset(str(path_or_preset)))
        info = {"source": "preset", "preset": str(path_or_preset)}
    else:
        if not p.exists():
            raise FileNotFoundError(
                f"{p} does not exist and is not a preset name (presets: {sorted(PRESETS)}); expected a "
                "lit_cm3leon tokenizer folder, a taming .ckpt or a Chameleon VQ-VAE folder"
            )
        model, info = checkpoints.load_any(p, resolution=resolution)
    return ImageTokenizer(model.to(device), info, max_image_pixels)
