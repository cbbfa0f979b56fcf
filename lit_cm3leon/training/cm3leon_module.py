"""One LightningModule for CM3Leon pretraining and SFT.

The network is the plain :class:`CM3LeonTransformer`; this module owns the loss (token-weighted
next-token cross-entropy), the optimizer and schedule, the per-modality metrics and the export.
The experiment config decides the data, the loss weights and the checkpoint to start from.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from lit_cm3leon.data.templates import TASKS
from lit_cm3leon.model import ModelConfig, build_model
from lit_cm3leon.model.parallelize import parallelize
from lit_cm3leon.objective.sequence import attention_mask_from_doc_ids
from lit_cm3leon.tokenizer.vocab import Vocab
from lit_cm3leon.training.checkpoint import CheckpointError, load_decoder, save_decoder


def modality_masks(targets: torch.Tensor, vocab: Vocab) -> dict[str, torch.Tensor]:
    """Bool masks [B, T] of target positions holding text and image-code ids."""
    text = targets < vocab.n_text
    image = (targets >= vocab.image_offset) & (targets < vocab.special_offset)
    return {"text": text, "image": image}


class CM3LeonModule(L.LightningModule):
    def __init__(
        self,
        model: dict,
        vocab_path: str,
        lr: float = 1e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        decay: str = "cosine",
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        fused_adamw: bool = True,
        init_from: str | None = None,
        peak_flops: float | None = None,
        max_bad_steps: int = 5,
    ) -> None:
        super().__init__()
        if not isinstance(model, dict):  # a DictConfig from Hydra: keep hparams plain
            model = OmegaConf.to_container(model, resolve=True)
        model = {k: v for k, v in model.items() if k != "_target_"}
        betas = tuple(float(b) for b in betas)
        self.save_hyperparameters()
        self.vocab = Vocab.load(vocab_path)
        cfg = ModelConfig.from_dict(model).for_vocab(self.vocab)
        if init_from:
            self.net, _, _ = load_decoder(init_from, vocab=self.vocab, expect_config=cfg)
            self.net.train()
        else:
            self.net = build_model(cfg)
        parallelize(self.net, model)  # activation checkpointing / compile, as configured
        self._t_last: float | None = None
        self._bad_steps = 0
        self._task_sums: torch.Tensor | None = None  # SFT validation: per-task CE sum, count

    # --- forward and loss ----------------------------------------------------------------
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V]."""
        return self.net(ids)

    def batch_loss(
        self, batch: dict[str, torch.Tensor], normalizer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cross-entropy [N, T] of a batch's targets ``ids[:, 1:]`` and the loss
        ``sum(weights * ce) / normalizer``, padded or packed, without whole logits
        (``CM3LeonTransformer.loss``).

        A packed batch (``doc_ids``, ``positions``: :class:`lit_cm3leon.data.collate.PackedCollate`)
        runs with the block-diagonal causal mask and per-sequence positions, so each packed
        sequence sees only itself, as in a padded row of its own."""
        inputs, targets = batch["ids"][:, :-1], batch["ids"][:, 1:]
        row_weights = batch["weights"] / normalizer.clamp_min(1e-8)
        if "doc_ids" not in batch:
            return self.net.loss(inputs, targets, row_weights)
        mask = attention_mask_from_doc_ids(batch["doc_ids"][:, :-1])
        return self.net.loss(
            inputs, targets, row_weights, positions=batch["positions"][:, :-1], attn_mask=mask
        )

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        ids, weights = batch["ids"], batch["weights"]  # [N, T+1], [N, T]
        targets = ids[:, 1:]
        normalizer = weights.sum()
        if stage == "train" and self.trainer.world_size > 1:
            # normalize by the global batch's loss tokens, so the gradient DDP averages over ranks
            # is that of one process holding the whole batch (per-rank token counts differ)
            normalizer = self.trainer.strategy.reduce(normalizer.detach(), reduce_op="mean")
        ce, loss = self.batch_loss(batch, normalizer)
        bsz = int(batch["length"].numel()) if "length" in batch else ids.shape[0]  # sequences
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bsz, sync_dist=stage != "train")
        with torch.no_grad():
            for name, mask in modality_masks(targets, self.vocab).items():
                m = mask & (weights > 0)
                if m.any():
                    mean = ce[m].mean()
                    self.log(
                        f"{stage}/loss_{name}", mean, batch_size=bsz, sync_dist=stage != "train"
                    )
                    self.log(
                        f"{stage}/ppl_{name}",
                        mean.exp(),
                        batch_size=bsz,
                        sync_dist=stage != "train",
                    )
            if stage == "val":
                self._log_task_losses(batch, ce, weights)
        return loss

    def _log_task_losses(
        self, batch: dict[str, torch.Tensor], ce: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """Add a validation batch's SFT items (those with a ``task``: its index in
        ``lit_cm3leon.data.templates.TASKS``) to each task's cross-entropy sum and loss-token
        count; ``on_validation_epoch_end`` logs ``val/loss_<task>``."""
        if "token_task" in batch:  # packed: per token, as the ids; [:, 1:] are the targets'
            tasks = batch["token_task"][:, 1:]
        elif "task" in batch:
            tasks = batch["task"][:, None].expand_as(weights)
        else:
            return
        m = (tasks >= 0) & (weights > 0)
        k = tasks[m]
        sums = torch.zeros(2, len(TASKS), dtype=torch.float64, device=ce.device)
        sums[0].index_add_(0, k, ce[m].double())
        sums[1].index_add_(0, k, torch.ones_like(k, dtype=torch.float64))
        self._task_sums = sums if self._task_sums is None else self._task_sums + sums

    def on_validation_epoch_start(self) -> None:
        self._task_sums = None

    def on_validation_epoch_end(self) -> None:
        """``val/loss_<task>``: the mean cross-entropy of each SFT task's loss tokens over the
        validation set (summed over ranks: every rank reduces the same tensor)."""
        sums = self._task_sums
        if self.trainer.world_size > 1:
            local = sums if sums is not None else torch.zeros(2, len(TASKS), dtype=torch.float64)
            sums = self.trainer.strategy.reduce(local.to(self.device), reduce_op="sum")
        if sums is None:
            return
        for k, task in enumerate(TASKS):
            if sums[1, k] > 0:
                self.log(f"val/loss_{task}", float(sums[0, k] / sums[1, k]), rank_zero_only=True)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss = self._shared_step(batch, "train")
        finite = bool(torch.isfinite(loss))
        distributed = self.trainer.world_size > 1
        if distributed:  # every rank must take the same branch, or the gradient all-reduce hangs
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            self._bad_steps += 1
            self.log("train/skipped_nonfinite", float(self._bad_steps))
            if self._bad_steps >= self.hparams.max_bad_steps:
                raise FloatingPointError(
                    f"loss was NaN/inf for {self._bad_steps} steps in a row (step {self.global_step}): "
                    "lower the learning rate or check the data"
                )
            if not distributed:
                return None  # Lightning skips backward and the parameters keep their values
            # DDP needs a backward on every rank: a zero loss over all parameters, whose gradients
            # are then dropped in on_before_optimizer_step so the optimizer leaves them untouched
            self._drop_grads = True
            return sum(p.sum() for p in self.net.parameters() if p.requires_grad) * 0.0
        self._bad_steps = 0
        self._log_throughput(batch["ids"][:, :-1])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if getattr(self, "_drop_grads", False):
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient
            self._drop_grads = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a resume checkpoint of another model size or vocabulary, naming what differs."""
        theirs = (checkpoint.get("hyper_parameters") or {}).get("model") or {}
        ours = self.hparams.model
        diff = [
            f"{k}: checkpoint {theirs[k]} vs config {ours.get(k)}"
            for k in ("n_layer", "n_head", "d_model", "max_seq_len", "mlp_ratio")
            if k in theirs and theirs[k] != ours.get(k)
        ]
        emb = checkpoint.get("state_dict", {}).get("net.tok_emb.weight")
        if emb is not None and emb.shape[0] != self.vocab.size:
            diff.append(
                f"vocabulary size: checkpoint {emb.shape[0]} vs tokenizers {self.vocab.size}"
            )
        if diff:
            raise CheckpointError(
                f"the checkpoint to resume from was trained with another model ({'; '.join(diff)}): "
                "resume with the same model preset and tokenizers, or start fresh with ckpt_path=null"
            )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    # --- throughput --------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N (weights) + 12 L d T (attention scores and values)."""
        c = self.net.config
        n = c.block_params() + c.vocab_size * c.d_model  # the lm head; embeddings are lookups
        return 6 * n + 12 * c.n_layer * c.d_model * seq_len

    def _log_throughput(self, inputs: torch.Tensor) -> None:
        """``train/tokens_per_s``: input tokens that are not padding (padded or packed rows)."""
        now = time.perf_counter()
        if self._t_last is not None:
            dt = now - self._t_last
            tokens = int((inputs != self.vocab.pad).sum()) * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / dt)
            if self.hparams.peak_flops:
                mfu = tokens * self.flops_per_token(inputs.shape[1]) / dt / self.hparams.peak_flops
                self.log("train/mfu", mfu)
        self._t_last = now

    # --- optimization --------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            (no_decay if p.ndim < 2 or "emb" in name else decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
            # fp16's GradScaler unscales before clipping, which a fused step cannot follow
            fused=hp.fused_adamw and self._grad_scaler() is None,
        )
        total = max(int(self.trainer.max_steps), hp.warmup_steps + 1)

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            t = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            shape = 0.5 * (1 + math.cos(math.pi * t)) if hp.decay == "cosine" else 1 - t
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * shape

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _grad_scaler(self) -> Any:
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip here, not in Lightning's precision plugin, which refuses a fused optimizer under
        mixed precision even in bf16 (no gradient is scaled there) and norm clipping under FSDP
        (whose root module computes the norm of the sharded gradients)."""
        if not gradient_clip_val:
            return
        if self._grad_scaler() is not None:  # fp16: Lightning unscales, then clips
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        elif hasattr(root := self.trainer.strategy.model, "clip_grad_norm_"):  # FSDP
            root.clip_grad_norm_(gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    # --- publishing ----------------------------------------------------------------------
    def export(self, out_dir: Path) -> dict[str, float]:
        save_decoder(out_dir, self.net, self.vocab, step=self.global_step)
        self.vocab.save(Path(out_dir) / "vocab.json")
        return {"params": float(self.net.num_params())}
