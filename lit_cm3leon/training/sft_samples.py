"""A callback that shows what the model being instruction-tuned answers, task by task.

Every ``every_n_steps`` steps it decodes the first ``per_task`` held-out examples of every SFT
task (the data module's validation pools) and logs them to TensorBoard under
``sft_samples/<task>``:

- a task with an image output as an image, one row per example: the prompt's images (an edit's
  source, a segmentation or edge map), the sample, the reference;
- a task with a text output as a markdown table of the prompt's text, the sample and the
  reference.

Images decode with ``image_strategy`` at ``cfg_scale`` (guidance's unconditional stream is the
prompt with its text replaced by ``<mask:0>``, as the evaluations decode it:
``Engine.task_image_codes``) and are enlarged ``scale`` times (nearest neighbour); text decodes
with ``text_temperature`` (0: greedy).
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch

from lit_cm3leon.training.sample_grid import PeriodicSamples, tile

log = logging.getLogger(__name__)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


class SFTSamples(PeriodicSamples):
    """Module doc. Needs an ``SFTDataModule`` (its ``val_ds``, held-out pools, and its
    ``image_tokenizer``); with another data module it logs a warning once and does nothing."""

    def __init__(
        self,
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
        from lit_cm3leon.engine import Decoding

        super().__init__(every_n_steps)
        if min(per_task, scale) < 1:
            raise ValueError(f"per_task and scale must be >= 1, got {per_task}, {scale}")
        self.per_task, self.scale, self.seed = per_task, scale, seed
        self.image_dec = Decoding(
            strategy=image_strategy, cfg_scale=cfg_scale, top_p=top_p, temperature=temperature
        )
        self.text_dec = Decoding(temperature=text_temperature, max_text_tokens=max_text_tokens)
        self._warned = False

    def samples(self, engine, val_ds) -> dict[str, np.ndarray | str]:
        """``{task: uint8 [rows*H, cols*W, 3] image | markdown str}`` for every task of
        ``val_ds`` (the first ``per_task`` examples of each pool), decoded by ``engine``."""
        from lit_cm3leon.data.templates import get_template, prompt_ids
        from lit_cm3leon.tokenizer.document import Image

        codec = engine.codec
        out: dict[str, np.ndarray | str] = {}
        for task in val_ds.tasks:
            template = get_template(task)
            examples = val_ds.pools[task][: self.per_task]
            docs = [template.render(ex, codec.vocab.n_loc) for ex in examples]
            if template.target == "image":
                new = engine.task_image_codes(task, examples, self.image_dec, self.seed)[:, 0]
                rows = [
                    [*(s.codes for s in p.segments if isinstance(s, Image)), n, t.segments[0].codes]
                    for (p, t), n in zip(docs, new, strict=True)
                ]  # a task's prompts hold the same number of images
                grid = tile(engine.decode_images(np.asarray(rows)))
                out[task] = grid.repeat(self.scale, 0).repeat(self.scale, 1)
            else:
                prompts = [prompt_ids(codec, p) for p, _ in docs]
                answers = engine.image_to_text(None, self.text_dec, self.seed, prompts=prompts)
                lines = ["| prompt | sample | reference |", "| --- | --- | --- |"]
                for (p, t), answer in zip(docs, answers, strict=True):
                    prompt = " ".join(
                        "[image]" if isinstance(s, Image) else s.text for s in p.segments
                    )
                    lines.append(f"| {_md(prompt)} | {_md(answer)} | {_md(t.segments[0].text)} |")
                out[task] = "\n".join(lines)
        return out

    def draw(self, trainer: L.Trainer, net: torch.nn.Module) -> dict[str, np.ndarray | str]:
        from lit_cm3leon.engine import Engine

        dm = trainer.datamodule
        val_ds, image_tok = getattr(dm, "val_ds", None), getattr(dm, "image_tokenizer", None)
        if val_ds is None or image_tok is None:
            if not self._warned:
                log.warning("SFTSamples: the data module has no held-out SFT examples (val_ds)")
                self._warned = True
            return {}
        shown = self.samples(Engine(net, val_ds.codec, image_tok, autocast=False), val_ds)
        return {f"sft_samples/{task}": what for task, what in shown.items()}
