"""Training the VQGAN image tokenizer.

Loss: ``l1 * |x - x'| + l2 * (x - x')^2 + codebook_weight * (||sg(z) - e||^2 + beta ||z - sg(e)||^2)``,
plus, when ``gan=True``, a hinge patch-GAN term after ``gan_start`` steps.

Codebook health: dead-code restart. Every ``restart_every`` steps, codes not chosen in that
window are moved onto random encoder outputs of the current batch (plus a little noise). It
needs no extra state beyond a usage counter, works with the plain straight-through quantizer
(so checkpoints stay in taming's layout, no EMA buffers), and revives codes far faster than EMA
updates alone on short CPU budgets. Restarts stop at ``restart_until`` (a fraction of
``max_steps``) so the last steps fine-tune a fixed codebook. Measured on the shapes world after
150 steps: 6% of codes in use and 14.3 dB without restarts, 61-78% and 18 dB with them.

Calibration (shapes preset, batch 8, lr 1e-3, bf16, 2 idle CPU cores): the step runs in
channels_last (NHWC, oneDNN's fast convolution layout) with a fused Adam, 43.6 ms instead of
55.5 ms (contiguous layout, per-tensor Adam) in a bare loop; in the trainer, with validation and
export, the default 4,200 steps take 218 s end to end. They give 35.0 dB held-out PSNR with
99.6% of the 2,048 codes in use, and the scene parser reads the same scene from 97% of the
reconstructions as from the originals (200 images; 96.5% with seed 1). Steps matter most: at the
same width, 3,340 steps (the old step's time budget) gave 31.6 dB and 93.5%, and 5,300 steps
37.7 dB and 99%. ``compile=True`` (Inductor) makes a step 1.45x faster again but pays about 45 s
of cold compilation, which eats most of the gain at this budget (end to end: 4,400 eager steps
228 s; compiled, 4,400 steps 179 s and 5,000 steps 203 s with a warm compile cache, 5,000 steps
248 s cold). The preset's previous width, 8 channels, got 28.8 dB and 80.5% from 4,500 steps: it
drew small squares as circles. At equal compute, batch 32 x 1,100 steps of a 4x wider network
with GroupNorm reached 24-27 dB and 19-54% agreement.

The patch-GAN is off for the shapes preset: its images are flat colours and sharp edges that
L1 + L2 reconstruct to high PSNR on their own; a discriminator would roughly double the step
cost, add adversarial instability, and trade PSNR for texture that the world does not have.
Turn it on for natural images (``gan=True``), after a warm-up, as taming does.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lit_cm3leon.tokenizer.image import ImageTokenizer
from lit_cm3leon.tokenizer.vqgan import VQGAN, VQGANConfig
from lit_cm3leon.tokenizer.vqgan import preset as get_preset

# the exported tokenizer's headline numbers (manifest, report)
SUMMARY_KEYS = ("psnr", "codebook_usage", "perplexity", "parser_agreement", "edit_codes_kept")


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming ``NLayerDiscriminator``): one real/fake logit per patch."""

    def __init__(self, in_ch: int = 3, ch: int = 64, n_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ch
        for i in range(1, n_layers + 1):
            c_out = ch * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(c, c_out, 4, stride, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, True),
            ]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, 1, h', w']
        return self.net(x)


def _plain(x: Any) -> Any:
    """Mappings/sequences (e.g. omegaconf containers) -> dicts/lists, recursively."""
    if x is None or isinstance(x, str | int | float | bool):
        return x
    if hasattr(x, "items"):
        return {str(k): _plain(v) for k, v in x.items()}
    return [_plain(v) for v in x]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (measured on the [0, 1] scale, peak 1)."""
    mse = (((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


class VQGANModule(L.LightningModule):
    def __init__(
        self,
        preset: str = "shapes",
        vqgan: dict | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.05,
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        codebook_weight: float = 1.0,
        restart_dead_codes: bool = True,
        restart_every: int = 25,
        restart_until: float = 0.8,
        gan: bool = False,
        gan_start: int = 2000,
        gan_weight: float = 0.1,
        disc_lr: float | None = None,
        grad_clip: float | None = 1.0,
        bf16: bool = True,
        channels_last: bool = True,
        fused_adam: bool = True,
        compile: bool = False,
        grid_images: int = 16,
        parser_images: int = 200,
    ):
        super().__init__()
        # hyperparameters are saved as plain containers (Hydra may pass ListConfig/DictConfig)
        betas = tuple(float(b) for b in betas)
        vqgan = _plain(vqgan)
        self.save_hyperparameters()
        cfg = get_preset(preset).to_dict()
        cfg.update(vqgan or {})
        self.vq_config = VQGANConfig.from_dict(cfg)
        self.model = VQGAN(self.vq_config)
        # the training forward (on_fit_start compiles it when asked); kept out of nn.Module's
        # registry so that the state dict has no second copy of the weights under "_orig_mod."
        self.__dict__["_train_forward"] = self.model
        self.disc = PatchDiscriminator() if gan else None
        self.automatic_optimization = False
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("usage", torch.zeros(self.vq_config.n_embed), persistent=False)
        self.val_metrics: dict[str, float] = {}
        self._val: dict[str, Any] = {}

    # --- helpers --------------------------------------------------------------------------
    @staticmethod
    def _images(batch: Any) -> torch.Tensor:
        return batch["image"] if isinstance(batch, dict) else batch

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.hparams.bf16)

    def _max_steps(self) -> int:
        ms = getattr(self.trainer, "max_steps", -1) if self._trainer is not None else -1
        return ms if ms and ms > 0 else 10_000

    def _lr_factor(self, step: int) -> float:
        w, total = self.hparams.warmup_steps, self._max_steps()
        if step < w:
            return (step + 1) / w
        t = min(1.0, (step - w) / max(1, total - w))
        m = self.hparams.min_lr_ratio
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * t))

    def on_fit_start(self) -> None:
        # Lightning warns that a periodic checkpoint under manual optimization holds the weights
        # after that step's update. That is the state to resume from: it pairs with
        # batches_seen and the optimizer state of the same step.
        warnings.filterwarnings(
            "ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning
        )
        if self.hparams.channels_last:  # NHWC convs: oneDNN's fast layout on CPU
            self.model.to(memory_format=torch.channels_last)
            if self.disc is not None:
                self.disc.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            self.__dict__["_train_forward"] = torch.compile(self.model)

    def _grad_scaler(self):
        """The precision plugin's loss scaler (16-mixed), or None (bf16-mixed, 32-true)."""
        plugin = self.trainer.precision_plugin if self._trainer is not None else None
        return getattr(plugin, "scaler", None)

    def _clip(self, opt: torch.optim.Optimizer, max_norm: float) -> None:
        """Clip the generator's gradient norm. Without a loss scaler the gradients are the
        true ones and are clipped directly (Lightning's hook refuses fused optimizers under
        any mixed precision); with one, Lightning unscales them first."""
        if self._grad_scaler() is None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        else:
            self.clip_gradients(opt, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(
            self.model.parameters(),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            fused=(self.hparams.fused_adam and self._grad_scaler() is None) or None,
        )
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, self._lr_factor)
        if self.disc is None:
            return [opt_g], [sched_g]
        opt_d = torch.optim.Adam(
            self.disc.parameters(),
            lr=self.hparams.disc_lr or self.hparams.lr,
            betas=tuple(self.hparams.betas),
        )
        return [opt_g, opt_d], [sched_g]

    # --- training ------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self._images(batch)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if isinstance(batch, dict) and batch.get("n_bad"):
            self.log(
                "train/bad_records",
                float(batch["n_bad"]),
                reduce_fx="sum",
                on_step=False,
                on_epoch=True,
            )
        opts = self.optimizers()
        opt_g = opts[0] if isinstance(opts, list) else opts
        step = int(
            self.batches_seen
        )  # global_step counts both optimizers' steps once the GAN is on
        self.batches_seen += 1
        with self._autocast():
            xrec, q = self.__dict__["_train_forward"](x)
        xrec = xrec.float()
        l1 = (xrec - x).abs().mean()
        l2 = ((xrec - x) ** 2).mean()
        loss = (
            self.hparams.l1_weight * l1
            + self.hparams.l2_weight * l2
            + self.hparams.codebook_weight * q.loss
        )
        use_gan = self.disc is not None and step >= self.hparams.gan_start
        if use_gan:
            with self._autocast():
                g_loss = -self.disc(xrec).float().mean()
            loss = loss + self.hparams.gan_weight * g_loss
            self.log("train/g_loss", g_loss)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.grad_clip:
            self._clip(opt_g, self.hparams.grad_clip)
        opt_g.step()
        sch = self.lr_schedulers()
        (sch[0] if isinstance(sch, list) else sch).step()

        if use_gan:
            opt_d = opts[1]
            with self._autocast():
                d_real, d_fake = self.disc(x).float(), self.disc(xrec.detach()).float()
            d_loss = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            self.log("train/d_loss", d_loss)

        with torch.no_grad():
            self.usage += torch.bincount(
                q.indices.flatten(), minlength=self.vq_config.n_embed
            ).float()
            if self.hparams.restart_dead_codes and (step + 1) % self.hparams.restart_every == 0:
                if step < self.hparams.restart_until * self._max_steps():
                    n = self._restart_dead_codes(q.z)
                    self.log("train/codes_restarted", float(n))
                self.log("train/window_usage", (self.usage > 0).float().mean())
                self.usage.zero_()

        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(
            {
                "train/l1": l1,
                "train/l2": l2,
                "train/codebook_loss": q.codebook_loss,
                "train/commit_loss": q.commit_loss,
                "lr": opt_g.param_groups[0]["lr"],
            }
        )
        return loss

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor) -> int:
        """Move codes unused in the last window onto random encoder outputs ``z`` [B, D, h, w]."""
        dead = (self.usage == 0).nonzero().flatten()
        if len(dead) == 0:
            return 0
        flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        pick = flat[torch.randint(len(flat), (len(dead),), device=flat.device)]
        noise = 0.01 * pick.std() * torch.randn_like(pick)
        w = self.model.quantize.embedding.weight
        w.data[dead] = (pick + noise).to(w.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(w.data, src=0)  # every rank keeps the same codebook
        return len(dead)

    # --- validation ----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {
            "psnr": [],
            "counts": torch.zeros(self.vq_config.n_embed, device=self.device),
            "grid": None,
        }

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = self._images(batch)
        if len(x) == 0:
            return
        with self._autocast():
            xrec, q = self.model(x)
        xrec = xrec.float()
        self._val["psnr"].append(psnr(xrec, x))
        self._val["counts"] += torch.bincount(
            q.indices.flatten(), minlength=self.vq_config.n_embed
        ).float()
        self.log("val/rec_loss", (xrec - x).abs().mean(), on_epoch=True, batch_size=len(x))
        if self._val["grid"] is None:
            k = self.hparams.grid_images
            self._val["grid"] = torch.cat([x[:k], xrec[:k].clamp(-1, 1)])

    def on_validation_epoch_end(self) -> None:
        if not self._val.get("psnr"):
            return
        m = self.summarize(torch.cat(self._val["psnr"]), self._val["counts"])
        self.val_metrics = m
        for k, v in m.items():
            self.log(f"val/{k}", v, prog_bar=k == "psnr")
        grid = self._val["grid"]
        exp = getattr(self.logger, "experiment", None)
        if grid is not None and hasattr(exp, "add_image"):
            import torchvision

            n = len(grid) // 2
            img = torchvision.utils.make_grid((grid.cpu() + 1) / 2, nrow=max(1, n))
            exp.add_image(
                "val/reconstructions", img, self.global_step
            )  # top: input, bottom: reconstruction

    @staticmethod
    def summarize(psnrs: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
        p = counts / counts.sum().clamp_min(1)
        ent = -(p[p > 0] * p[p > 0].log()).sum()
        return {
            "psnr": float(psnrs.mean()),
            "codebook_usage": float((counts > 0).float().mean()),
            "perplexity": float(ent.exp()),
        }

    # --- export --------------------------------------------------------------------------
    def tokenizer(self) -> ImageTokenizer:
        return ImageTokenizer(self.model.eval(), {"preset": self.hparams.preset})

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        """Full-precision metrics over a loader (what ``export`` reports)."""
        self.model.eval()
        ps, counts = [], torch.zeros(self.vq_config.n_embed)
        for batch in loader:
            x = self._images(batch).to(self.device)
            if len(x) == 0:
                continue
            xrec, q = self.model(x)
            ps.append(psnr(xrec.float(), x).cpu())
            counts += torch.bincount(
                q.indices.flatten().cpu(), minlength=self.vq_config.n_embed
            ).float()
        if not ps:
            return {}
        return self.summarize(torch.cat(ps), counts)

    @torch.no_grad()
    def parser_agreement(self, world: Any, n: int) -> float | None:
        """Fraction of held-out shapes images whose reconstruction parses to the same scene."""
        try:
            from lit_cm3leon.data.shapes import parse_scene
        except ImportError:
            return None
        tok = self.tokenizer()
        imgs = [world.sample("heldout", i).image for i in range(n)]
        rec = tok.decode(tok.encode(torch.from_numpy(np.stack(imgs))))
        same = [
            parse_scene(a, world).attributes() == parse_scene(b.numpy(), world).attributes()
            for a, b in zip(imgs, rec, strict=True)
        ]
        return sum(same) / max(1, len(same))

    @torch.no_grad()
    def edit_codes_kept(self, world: Any, n: int) -> float:
        """Fraction of codes a one-shape edit leaves unchanged (held-out edits; how local the
        codes are: `lit_cm3leon.evaluation.code_locality`)."""
        from lit_cm3leon.evaluation.code_locality import edit_code_locality

        return edit_code_locality(self.tokenizer(), world, n)["edit_codes_kept"]

    def export(self, out_dir: str | Path) -> dict:
        """Write our tokenizer folder to ``out_dir`` and return its metrics."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        metrics: dict[str, Any] = dict(self.val_metrics)
        if dm is not None:
            metrics.update(self.evaluate(dm.val_dataloader()))
        world = getattr(dm, "world", None)
        metrics["parser_agreement"] = (
            self.parser_agreement(world, self.hparams.parser_images) if world is not None else None
        )
        metrics["edit_codes_kept"] = (
            self.edit_codes_kept(world, self.hparams.parser_images) if world is not None else None
        )
        metrics["steps"] = int(self.global_step)
        out = self.tokenizer().save(out_dir, {"metrics": metrics, "preset": self.hparams.preset})
        return {k: metrics.get(k) for k in SUMMARY_KEYS} | {
            "steps": metrics["steps"],
            "path": str(out),
        }
