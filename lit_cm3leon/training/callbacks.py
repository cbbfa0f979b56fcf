"""Callbacks for long runs on shared or preemptible machines."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1: finish the current step on every rank, write
    ``<dirpath>/last.ckpt`` and exit 0, so ``ckpt_path=auto`` resumes from the interrupted step.

    The signal handler only sets a flag; at the end of each training batch the ranks agree on
    it with one all-reduce (any rank signalled -> all stop), then Lightning's own stop path is
    taken at the same step everywhere (``SIGTERMException``, a ``SystemExit`` with code 0).
    Lightning's default SIGTERM handler runs a collective inside the handler, which can pair
    with another collective on the other ranks and hang a DDP job; this one replaces it for
    the training loop. A signal already handled by someone else (SLURM ``auto_requeue``'s
    SIGUSR1: HPC checkpoint and requeue) is left alone.
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = "last",
        signals: tuple[str, ...] | list[str] = ("SIGUSR1",),
    ) -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        extra = [
            getattr(signal, name) if isinstance(name, str) else signal.Signals(name)
            for name in signals
        ]
        self.signals = [signal.SIGTERM, *[s for s in extra if s != signal.SIGTERM]]
        self._installed: list[signal.Signals] = []
        self._received: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its handlers before this hook and restores all of them at teardown
        if threading.current_thread() is not threading.main_thread():
            return
        self._received = None
        for signum in self.signals:
            if signum != signal.SIGTERM and signal.getsignal(signum) not in (None, signal.SIG_DFL):
                continue
            signal.signal(signum, self._on_signal)
            self._installed.append(signum)

    def _on_signal(self, signum, frame) -> None:
        self._received = signum  # no logging or collectives inside a signal handler

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        stop = self._received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and not trainer._signal_connector.received_sigterm:
            log.warning(
                "rank %d: preemption signal: stopping after step %d",
                trainer.global_rank,
                trainer.global_step,
            )
            trainer._signal_connector.received_sigterm = True  # Lightning stops after this batch

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.is_global_zero and self.path.is_symlink():
            self.path.unlink()  # write a file, not through a link into a periodic checkpoint
        trainer.save_checkpoint(self.path, weights_only=False)  # the full resume state
        if trainer.is_global_zero:
            log.warning(
                "preempted at step %d: saved %s; run the same command again to resume (ckpt_path=auto)",
                trainer.global_step,
                self.path,
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self._installed:
                signal.signal(signum, signal.SIG_DFL)
        self._installed = []
