"""A callback that draws text-to-image samples into TensorBoard every N training steps, and the
logging helpers the sample callbacks share."""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` steps: one row per prompt, ``n_samples`` columns, at CFG
    ``cfg_scale`` (the decoding knobs of the config), logged as ``samples/text_to_image``."""

    def __init__(
        self,
        prompts: list[str],
        text_tokenizer_dir: str,
        image_tokenizer_dir: str,
        every_n_steps: int = 200,
        n_samples: int = 4,
        strategy: str = "cfg_topp",
        cfg_scale: float = 3.0,
        top_p: float = 0.9,
        seed: int = 0,
    ) -> None:
        self.prompts, self.every = list(prompts), every_n_steps
        self.dirs = (text_tokenizer_dir, image_tokenizer_dir)
        self.n_samples, self.strategy, self.cfg_scale, self.top_p, self.seed = (
            n_samples,
            strategy,
            cfg_scale,
            top_p,
            seed,
        )
        self._parts = None

    def _load(self):
        if self._parts is None:
            from lit_cm3leon.tokenizer.codec import DocumentCodec
            from lit_cm3leon.tokenizer.image import load_image_tokenizer

            self._parts = (DocumentCodec.load(self.dirs[0]), load_image_tokenizer(self.dirs[1]))
        return self._parts

    def grid(self, net: torch.nn.Module) -> np.ndarray:
        """uint8 [rows*H, cols*W, 3]."""
        from lit_cm3leon.engine import Decoding, Engine

        codec, image_tok = self._load()
        engine = Engine(net, codec, image_tok)
        dec = Decoding(
            strategy=self.strategy,
            cfg_scale=self.cfg_scale,
            top_p=self.top_p,
            num_samples=self.n_samples,
        )
        images = engine.text_to_image(self.prompts, dec, seed=self.seed)  # [R, C, H, W, 3]
        R, C, H, W, _ = images.shape
        return images.transpose(0, 2, 1, 3, 4).reshape(R * H, C * W, 3)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == 0 or step % self.every:
            return
        was_training = pl_module.net.training
        try:
            image = self.grid(pl_module.net)
        finally:
            pl_module.net.train(was_training)
        log_image(trainer, "samples/text_to_image", image, step)


def log_image(trainer: L.Trainer, tag: str, image: np.ndarray, step: int) -> None:
    """uint8 [H, W, 3] to every logger that takes images (TensorBoard)."""
    for lg in trainer.loggers:
        exp = getattr(lg, "experiment", None)
        if hasattr(exp, "add_image"):
            exp.add_image(tag, image, step, dataformats="HWC")


def log_text(trainer: L.Trainer, tag: str, text: str, step: int) -> None:
    """Markdown to every logger that takes text (TensorBoard)."""
    for lg in trainer.loggers:
        exp = getattr(lg, "experiment", None)
        if hasattr(exp, "add_text"):
            exp.add_text(tag, text, step)
