"""A callback that shows what the model being instruction-tuned answers, task by task.

Every ``every_n_steps`` steps it decodes the first ``per_task`` held-out examples of every SFT
task (the data module's validation pools) and logs them to TensorBoard under
``sft_samples/<task>``:

- a task with an image output as an image, one row per example: the prompt's images (an edit's
  source, a segmentation or edge map), the sample, the reference;
- a task with a text output as a markdown table of the prompt's text, the sample and the
  reference.

Images decode with ``image_strategy`` at ``cfg_scale`` (guidance's unconditional stream is the
prompt with its text replaced by ``<mask:0>``, as the evaluations decode it) and are enlarged
``scale`` times (nearest neighbour); text decodes with ``text_temperature`` (0: greedy).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import numpy as np
import torch

from lit_cm3leon.training.sample_grid import log_image, log_text

log = logging.getLogger(__name__)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


class SFTSamples(L.Callback):
    """Module doc. Needs a data module with ``val_ds`` (an ``SFTSequences`` over held-out
    pools); without one it logs a warning once and does nothing."""

    def __init__(
        self,
        image_tokenizer_dir: str,
        every_n_steps: int = 300,
        per_task: int = 2,
        image_strategy: str = "cfg_topp",
        cfg_scale: float = 3.0,
        top_p: float = 0.9,
        temperature: float = 1.0,
        text_temperature: float = 0.0,
        max_text_tokens: int = 48,
        scale: int = 4,
        seed: int = 0,
    ) -> None:
        if min(every_n_steps, per_task, scale) < 1:
            raise ValueError(
                f"every_n_steps, per_task and scale must be >= 1, got {every_n_steps}, "
                f"{per_task}, {scale}"
            )
        self.image_tokenizer_dir = image_tokenizer_dir
        self.every, self.per_task, self.scale, self.seed = every_n_steps, per_task, scale, seed
        self.image_knobs = dict(
            strategy=image_strategy, cfg_scale=cfg_scale, top_p=top_p, temperature=temperature
        )
        self.text_temperature, self.max_text_tokens = text_temperature, max_text_tokens
        self._image_tok = None
        self._warned = False

    def _image_tokenizer(self):
        if self._image_tok is None:
            from lit_cm3leon.tokenizer.image import load_image_tokenizer

            self._image_tok = load_image_tokenizer(self.image_tokenizer_dir)
        return self._image_tok

    def samples(self, net: torch.nn.Module, val_ds) -> dict[str, Any]:
        """``{task: uint8 [rows*H, cols*W, 3] image | markdown str}`` for every task of
        ``val_ds`` (the first ``per_task`` examples of each pool)."""
        from lit_cm3leon.data.templates import (
            decode_target,
            get_template,
            inference_uncond_prompt,
            prompt_ids,
        )
        from lit_cm3leon.decode.generate import GUIDED, generate
        from lit_cm3leon.tokenizer.document import Image

        codec = val_ds.codec
        v = codec.vocab
        out: dict[str, Any] = {}
        for task in val_ds.tasks:
            template = get_template(task)
            examples = val_ds.pools[task][: self.per_task]
            docs = [template.render(ex, v.n_loc) for ex in examples]
            prompts = [prompt_ids(codec, p) for p, _ in docs]
            if template.target == "image":
                guided = self.image_knobs["strategy"] in GUIDED
                uncond = [inference_uncond_prompt(task, codec, **ex) for ex in examples]
                new = generate(
                    net,
                    prompts,
                    v,
                    v.image_tokens + 2,
                    **self.image_knobs,
                    uncond_prompts=uncond if guided else None,
                    mode="image",
                    seed=self.seed,
                )
                rows = []
                for (p, t), ids in zip(docs, new, strict=True):
                    inputs = [s.codes for s in p.segments if isinstance(s, Image)]
                    codes = [*inputs, decode_target(task, codec, ids), t.segments[0].codes]
                    rows.append(np.stack(codes))
                grid = np.stack(rows)  # [R, C, h, w]: a task's prompts hold the same images
                flat = torch.as_tensor(grid.reshape(-1, *grid.shape[2:]))
                pixels = self._image_tokenizer().decode(flat).cpu().numpy()
                R, C, H, W = *grid.shape[:2], *pixels.shape[1:3]
                pixels = pixels.reshape(R, C, H, W, 3)
                grid = pixels.transpose(0, 2, 1, 3, 4).reshape(R * H, C * W, 3)
                out[task] = grid.repeat(self.scale, 0).repeat(self.scale, 1)
            else:
                new = generate(
                    net,
                    prompts,
                    v,
                    self.max_text_tokens,
                    strategy="temperature",
                    temperature=self.text_temperature,
                    mode="text",
                    seed=self.seed,
                )
                lines = ["| prompt | sample | reference |", "| --- | --- | --- |"]
                for (p, t), ids in zip(docs, new, strict=True):
                    prompt = " ".join(
                        "[image]" if isinstance(s, Image) else s.text for s in p.segments
                    )
                    answer = decode_target(task, codec, ids)
                    lines.append(f"| {_md(prompt)} | {_md(answer)} | {_md(t.segments[0].text)} |")
                out[task] = "\n".join(lines)
        return out

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == 0 or step % self.every:
            return
        val_ds = getattr(trainer.datamodule, "val_ds", None) if trainer.datamodule else None
        if val_ds is None:
            if not self._warned:
                log.warning("SFTSamples: the data module has no held-out examples (val_ds)")
                self._warned = True
            return
        net = pl_module.net
        was_training = net.training
        net.eval()
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                shown = self.samples(net, val_ds)
        finally:
            net.train(was_training)
        log.info(
            "SFT samples of %d tasks at step %d: %.1f s", len(shown), step, time.perf_counter() - t0
        )
        for task, what in shown.items():
            if isinstance(what, str):
                log_text(trainer, f"sft_samples/{task}", what, step)
            else:
                log_image(trainer, f"sft_samples/{task}", what, step)
