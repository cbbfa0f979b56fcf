"""Retriever CLIP as a LightningModule: open_clip's model trained with open_clip's ``ClipLoss``.

Validation logs cross-modal recall on held-out pairs where a hit is a retrieved item showing the
same scene attributes: ``val/t2i_r1``, ``val/t2i_r5``, ``val/i2t_r1``, ``val/i2t_r5`` and the
chance level of each (``val/t2i_r1_chance`` ...). ``export(out_dir)`` publishes the encoder folder
read by ``ClipEncoder.load`` and the memory bank.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch

from lit_cm3leon.retrieval.encoder import ClipEncoder
from lit_cm3leon.retrieval.metrics import chance_recall, recall_at_k


class CLIPModule(L.LightningModule):
    """Args:
    arch: open_clip architecture (a name, e.g. the shipped "shapes-clip", or a JSON file).
    pretrained: optional local checkpoint to start from.
    lr, weight_decay, betas: AdamW (no decay on gains, biases, embeddings, logit scale).
    warmup_steps: linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``.
    max_steps: length of the schedule (keep equal to ``trainer.max_steps``).
    recall_ks: k values of recall@k.
    """

    def __init__(
        self,
        arch: str = "shapes-clip",
        pretrained: str | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.1,
        betas: tuple = (0.9, 0.98),
        warmup_steps: int = 30,
        max_steps: int = 600,
        min_lr_ratio: float = 0.05,
        recall_ks: tuple = (1, 5),
    ) -> None:
        super().__init__()
        # plain containers only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "arch": str(arch),
                "pretrained": None if pretrained is None else str(pretrained),
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "betas": [float(b) for b in betas],
                "warmup_steps": int(warmup_steps),
                "max_steps": int(max_steps),
                "min_lr_ratio": float(min_lr_ratio),
                "recall_ks": [int(k) for k in recall_ks],
            }
        )
        import open_clip

        self.encoder = ClipEncoder.from_arch(arch, pretrained=pretrained)
        self.model = self.encoder.model.train()
        self.loss_fn = open_clip.ClipLoss()
        self.recall_ks = tuple(int(k) for k in recall_ks)
        self._val: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ steps
    def forward(self, images: torch.Tensor, texts: list[str]):
        """images uint8 [B,H,W,3], texts [B] -> (image feats [B,D], text feats [B,D], scale)."""
        image = self.model.encode_image(self.encoder.pixels(images), normalize=True)
        text = self.encoder.encode_text(self.encoder.tokenize(texts), normalize=True)
        return image, text, self.model.logit_scale.exp()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        img_f, txt_f, scale = self(batch["image"], batch["text"])
        loss = self.loss_fn(img_f, txt_f, scale)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["text"]))
        self.log("train/logit_scale", scale.detach(), batch_size=len(batch["text"]))
        return loss

    def on_train_batch_end(self, *args) -> None:
        with torch.no_grad():  # open_clip's clamp of the temperature (scale <= 100)
            self.model.logit_scale.clamp_(0, math.log(100))

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        img_f, txt_f, _ = self(batch["image"], batch["text"])
        self._val.append(
            (img_f.float().cpu().numpy(), txt_f.float().cpu().numpy(), batch["group"].cpu().numpy())
        )

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        img = np.concatenate([v[0] for v in self._val])
        txt = np.concatenate([v[1] for v in self._val])
        grp = np.concatenate([v[2] for v in self._val])
        self.last_metrics = cross_modal_recall(txt, img, grp, self.recall_ks)
        for k, v in self.last_metrics.items():
            self.log(f"val/{k}", v, prog_bar=k == "t2i_r1")
        self._val = []

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            flat = p.ndim < 2 or "embedding" in name or "logit_scale" in name or "token" in name
            (no_decay if flat else decay).append(p)
        hp = self.hparams
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / max(1, hp.warmup_steps)
            t = min(1.0, (step - hp.warmup_steps) / max(1, hp.max_steps - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ publishing
    def evaluate(self, pairs) -> dict[str, float]:
        """Recall on a ``PairArrays`` set (images, long/short captions, groups)."""
        texts = [pairs.text(i) for i in range(len(pairs))]
        img = self.encoder.embed_image(pairs.images)
        txt = self.encoder.embed_text(texts)
        return cross_modal_recall(txt, img, pairs.groups, self.recall_ks)

    def export(self, out_dir: Path) -> dict:
        """Save the encoder folder into ``out_dir``; returns held-out recall and chance."""
        out_dir = Path(out_dir)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        metrics = dict(self.last_metrics)
        if dm is not None and getattr(dm, "val_set", None) is not None:
            metrics = {f"val/{k}": v for k, v in self.evaluate(dm.val_set).items()}
        else:
            metrics = {f"val/{k}": v for k, v in metrics.items()}
        n_params = sum(p.numel() for p in self.model.parameters())
        manifest = self.encoder.save(out_dir, extra={"metrics": metrics, "n_params": n_params})
        return {
            **metrics,
            "encoder_hash": manifest["hash"],
            "dim": manifest["dim"],
            "arch": self.encoder.name,
            "n_params": n_params,
        }


def cross_modal_recall(
    text_emb: np.ndarray, image_emb: np.ndarray, groups: np.ndarray, ks=(1, 5)
) -> dict[str, float]:
    """t2i and i2t recall@k (attribute hits) and chance, keyed ``t2i_r1``, ``t2i_r1_chance``."""
    out: dict[str, float] = {}
    chance = chance_recall(groups, groups, ks)
    for name, q, g in (("t2i", text_emb, image_emb), ("i2t", image_emb, text_emb)):
        rec = recall_at_k(q, g, groups, groups, ks)
        for k in ks:
            out[f"{name}_r{k}"] = rec[k]
            out[f"{name}_r{k}_chance"] = chance[k]
    return out
