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
    """Finish the current step, write ``<dirpath>/last.ckpt`` and exit 0 on a preemption signal.

    Lightning already turns SIGTERM into a stop at the next step boundary (it forwards the
    signal to the other local ranks and broadcasts it to all of them, then raises
    ``SIGTERMException``, a ``SystemExit``); this callback saves the resume point there, so
    ``ckpt_path=auto`` continues from the interrupted step instead of the last periodic
    checkpoint. The extra ``signals`` (default SIGUSR1, what schedulers send some time before
    the end of an allocation) take the same path, unless someone else already handles them:
    under SLURM with ``auto_requeue`` Lightning's own SIGUSR1 handler (HPC checkpoint and
    requeue) is left alone.
    """

    def __init__(self, dirpath: str, filename: str = "last", signals: tuple[str, ...] | list[str] = ("SIGUSR1",)) -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.signals = [getattr(signal, name) if isinstance(name, str) else signal.Signals(name) for name in signals]
        self._installed: list[signal.Signals] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its handlers before this hook and restores all of them at teardown
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            if signal.getsignal(signum) in (None, signal.SIG_DFL):
                signal.signal(signum, self._notifier(trainer))
                self._installed.append(signum)

    @staticmethod
    def _notifier(trainer: L.Trainer):
        def handler(signum, frame) -> None:
            connector = trainer._signal_connector
            log.warning("received signal %d: stopping after the current step", signum)
            if not connector.received_sigterm and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)  # the other local ranks, as for SIGTERM
            connector.received_sigterm = True  # rank 0's flag is broadcast to all ranks each step

        return handler

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.is_global_zero and self.path.is_symlink():
            self.path.unlink()  # write a file, not through a link into a periodic checkpoint
        trainer.save_checkpoint(self.path, weights_only=False)  # the full resume state
        if trainer.is_global_zero:
            log.warning(
                "preempted at step %d: saved %s; run the same command again to resume (ckpt_path=auto)",
                trainer.global_step, self.path,
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self._installed:
                signal.signal(signum, signal.SIG_DFL)
        self._installed = []
