"""Exact resume and preemption: runs of `python -m lit_cm3leon.fit` killed, signalled and resumed
in subprocesses, compared bit for bit with an uninterrupted run on the CPU."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.fixtures import make_text_tokenizer, make_token_shards, tiny_pretrain_overrides

N = 6  # checkpoint period; runs end at 2N
CB = "tests.reliability_callbacks"


def make_root(root: Path) -> Path:
    out = root / "outputs"
    make_text_tokenizer(out / "text_tokenizer")
    make_token_shards(out / "tokens" / "shapes-train", 60)
    make_token_shards(out / "tokens" / "shapes-heldout", 10, seed=1)
    return root


def fit_args(root: Path, steps: int = 2 * N) -> list[str]:
    return tiny_pretrain_overrides(
        steps,
        f"paths.root_dir={root}",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=1",
        "module.warmup_steps=3",
        "module.lr=3e-3",
        f"callbacks.model_checkpoint.every_n_train_steps={N}",
        batch_size=4,
    )


def run_fit(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m lit_cm3leon.fit args` in its own process group; on timeout the whole group
    (DDP ranks included) is killed and TimeoutExpired raised."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lit_cm3leon.fit", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        try:  # no rank outlives the job
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def published_state(root: Path) -> dict[str, torch.Tensor]:
    record = torch.load(root / "outputs" / "pretrain" / "model.pt", weights_only=True)
    assert record["step"] == 2 * N
    return record["state_dict"]


def logged_losses(root: Path) -> dict[int, str]:
    """step -> train/loss as written by the CSV logger (exact text) by the root's latest run."""
    losses: dict[int, str] = {}
    paths = sorted(
        (root / "logs" / "pretrain" / "runs").glob("*/csv/version_*/metrics.csv"),
        key=lambda p: p.stat().st_mtime,
    )
    for path in paths[-1:]:
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = row["train/loss"]
    return losses


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run to step 2N."""
    root = make_root(tmp_path_factory.mktemp("reference"))
    out = run_fit(fit_args(root))
    assert out.returncode == 0, out.stderr[-3000:]
    return published_state(root), logged_losses(root)


def assert_same_as_reference(root: Path, reference, resumed_at: int) -> None:
    ref_state, ref_losses = reference
    state = published_state(root)
    assert state.keys() == ref_state.keys()
    for k in state:
        assert torch.equal(state[k], ref_state[k]), f"{k} differs after resume"
    losses = logged_losses(root)
    assert set(losses) >= set(range(resumed_at, 2 * N)), sorted(losses)
    assert len(set(losses.values())) >= 2 * N - resumed_at  # the loss moves: a real comparison
    for step in range(
        resumed_at, 2 * N
    ):  # CSV rows are 0-based steps of the batch that was trained
        assert losses[step] == ref_losses[step], (
            f"train/loss at step {step}: {losses[step]} vs {ref_losses[step]}"
        )


def test_sigkill_then_resume_is_bit_exact(tmp_path, reference):
    """SIGKILL two steps after the checkpoint at N (data of step N+2 already fetched); the
    resumed run replays N..2N and ends with the same weights and the same logged losses."""
    root = make_root(tmp_path)
    kill = [
        f"+callbacks.kill._target_={CB}.SignalAt",
        f"+callbacks.kill.step={N + 2}",
        f"+callbacks.kill.signum={int(signal.SIGKILL)}",
        "+callbacks.kill.when=start",
    ]
    out = run_fit(fit_args(root) + kill)
    assert out.returncode == -signal.SIGKILL, (out.returncode, out.stderr[-3000:])
    last = root / "logs" / "pretrain" / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == N
    assert not (root / "outputs" / "pretrain" / "model.pt").exists()
    out = run_fit(fit_args(root))  # ckpt_path=auto
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stderr + out.stdout
    assert_same_as_reference(root, reference, resumed_at=N)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_exits_cleanly(tmp_path, reference, signum):
    """SIGTERM / SIGUSR1 during step N+1 (between periodic checkpoints): the step finishes,
    last.ckpt is written at N+1, the process exits 0 without publishing, resuming is bit-exact."""
    root = make_root(tmp_path)
    sig = [
        f"+callbacks.sig._target_={CB}.SignalAt",
        f"+callbacks.sig.step={N}",
        f"+callbacks.sig.signum={int(signum)}",
        "+callbacks.sig.when=start",
    ]
    out = run_fit(fit_args(root) + sig)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    assert "preempted at step" in out.stdout + out.stderr
    last = root / "logs" / "pretrain" / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == N + 1
    assert not (root / "outputs" / "pretrain" / "model.pt").exists()
    out = run_fit(fit_args(root))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_as_reference(root, reference, resumed_at=N + 1)
