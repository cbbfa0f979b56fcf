"""Callbacks that draw the decoder's samples into TensorBoard every N training steps:
:class:`PeriodicSamples` (what they share) and :class:`SampleGrid` (text to image)."""

from __future__ import annotations

import logging
import time

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


def tile(images: np.ndarray) -> np.ndarray:
    """uint8 [R, C, H, W, 3] -> one image [R*H, C*W, 3], rows and columns kept."""
    R, C, H, W, _ = images.shape
    return images.transpose(0, 2, 1, 3, 4).reshape(R * H, C * W, 3)


class PeriodicSamples(L.Callback):
    """Every ``every_n_steps`` training steps, on rank 0: :meth:`draw` with the decoder in eval
    mode (its mode restored after), without gradients, in the trainer's precision; each
    ``{tag: uint8 [H, W, 3] image | markdown str}`` it returns goes to every logger that takes
    images or text (TensorBoard)."""

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every = every_n_steps

    def draw(self, trainer: L.Trainer, net: torch.nn.Module) -> dict[str, np.ndarray | str]:
        raise NotImplementedError

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == 0 or step % self.every:
            return
        net = pl_module.net
        was_training = net.training
        net.eval()
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                shown = self.draw(trainer, net)
        finally:
            net.train(was_training)
        log.info("%s at step %d: %.1f s", type(self).__name__, step, time.perf_counter() - t0)
        for tag, what in shown.items():
            for lg in trainer.loggers:
                exp = getattr(lg, "experiment", None)
                if isinstance(what, str) and hasattr(exp, "add_text"):
                    exp.add_text(tag, what, step)
                elif not isinstance(what, str) and hasattr(exp, "add_image"):
                    exp.add_image(tag, what, step, dataformats="HWC")


class SampleGrid(PeriodicSamples):
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
        from lit_cm3leon.engine import Decoding

        super().__init__(every_n_steps)
        self.prompts, self.seed = list(prompts), seed
        self.dirs = (text_tokenizer_dir, image_tokenizer_dir)
        self.dec = Decoding(
            strategy=strategy, cfg_scale=cfg_scale, top_p=top_p, num_samples=n_samples
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
        from lit_cm3leon.engine import Engine

        engine = Engine(net, *self._load(), autocast=False)
        return tile(engine.text_to_image(self.prompts, self.dec, seed=self.seed))

    def draw(self, trainer: L.Trainer, net: torch.nn.Module) -> dict[str, np.ndarray]:
        return {"samples/text_to_image": self.grid(net)}
