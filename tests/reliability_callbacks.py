"""Test-only callbacks that inject faults into a real fit (added with ``+callbacks.<name>=...``)."""

from __future__ import annotations

import json
import math
import os
import zlib

import lightning as L
import torch


class SignalAt(L.Callback):
    """Send ``signum`` to this process when ``global_step`` reaches ``step`` (optionally on one rank).

    ``when="start"`` signals at the start of the next batch (after its data was fetched), so the
    steps after the last checkpoint are lost and must be replayed on resume.
    """

    def __init__(self, step: int, signum: int, rank: int | None = None, when: str = "end") -> None:
        self.step, self.signum, self.rank, self.when = step, int(signum), rank, when
        self._sent = False

    def _maybe_send(self, trainer: L.Trainer) -> None:
        if self._sent or trainer.global_step != self.step:
            return
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        self._sent = True
        os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.when == "start":
            self._maybe_send(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.when == "end":
            self._maybe_send(trainer)


class RaiseAt(L.Callback):
    """Raise a RuntimeError on ``rank`` when ``global_step`` reaches ``step``."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")


class PoisonAt(L.Callback):
    """Make the loss of the batches at the given steps NaN (or inf) and record whether each
    training step changed the parameters. Instances are kept in ``PoisonAt.instances``."""

    instances: list[PoisonAt] = []

    def __init__(
        self, steps: list[int], value: str = "nan", rank: int | None = None, out: str | None = None
    ) -> None:
        self.steps, self.value, self.rank, self.out = set(steps), value, rank, out
        self.changed: dict[int, bool] = {}
        self.bad_logged: dict[int, float] = {}
        self._before: list[torch.Tensor] | None = None
        self._step = -1
        PoisonAt.instances.append(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step
        self._before = [p.detach().clone() for p in pl_module.parameters()]
        if self._step in self.steps and (self.rank is None or trainer.global_rank == self.rank):
            batch["weights"].fill_(math.nan if self.value == "nan" else math.inf)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = list(pl_module.parameters())
        self.changed[self._step] = any(
            not torch.equal(a, b.detach()) for a, b in zip(self._before, after, strict=True)
        )
        bad = trainer.callback_metrics.get("train/skipped_nonfinite")
        if bad is not None:
            self.bad_logged[self._step] = float(bad)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.out:  # for runs in a subprocess: one file per rank
            with open(f"{self.out}.rank{trainer.global_rank}.json", "w") as f:
                json.dump({str(k): v for k, v in self.changed.items()}, f)


def sequences(batch) -> list:
    """The batch's sequences without padding, packed (``doc_ids``) or one per padded row."""
    ids = batch["ids"].cpu()
    if "doc_ids" not in batch:
        return [row[: int(n)] for row, n in zip(ids, batch["length"].cpu(), strict=True)]
    docs = batch["doc_ids"].cpu()
    return [ids[r][docs[r] == d] for r in range(len(ids)) for d in docs[r].unique() if d >= 0]


class RecordBatches(L.Callback):
    """Append ``global_step rank batch_idx lr sum(ids) loss crc32,crc32,...`` (one crc per
    sequence, padding dropped) per trained batch to a text file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        loss = (
            outputs["loss"].item()
            if isinstance(outputs, dict) and outputs.get("loss") is not None
            else float("nan")
        )
        with open(self.path, "a") as f:
            crcs = ",".join(str(zlib.crc32(seq.numpy().tobytes())) for seq in sequences(batch))
            f.write(
                f"{trainer.global_step} {trainer.global_rank} {batch_idx} {lr!r} {int(batch['ids'].sum())} {loss!r} {crcs}\n"
            )


class GradNormProbe(L.Callback):
    """Record the global gradient norm the optimizer steps with (after any clipping) and whether
    the optimizer is fused."""

    instances: list[GradNormProbe] = []

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.fused: bool | None = None
        GradNormProbe.instances.append(self)

    def on_train_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        self.fused = bool(opt.defaults.get("fused"))
        step = opt.step

        def probed_step(closure=None, **kwargs):
            def probed_closure():  # Lightning backpropagates and clips inside the closure
                out = closure()
                grads = [
                    p.grad.norm()
                    for g in opt.param_groups
                    for p in g["params"]
                    if p.grad is not None
                ]
                self.norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))
                return out

            return step(probed_closure, **kwargs)

        opt.step = probed_step
