"""Two CPU processes (trainer=ddp_sim, gloo) against one process at the same global batch, and a
rank that raises brings the whole job down without a hang."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import pytest
import torch

from tests.fixtures import tiny_pretrain_overrides
from tests.test_reliability_resume import CB, make_root, run_fit

STEPS = 6


def args(root, trainer: str, batch: int) -> list[str]:
    return tiny_pretrain_overrides(
        STEPS,
        f"paths.root_dir={root}",
        f"trainer={trainer}",
        "trainer.log_every_n_steps=1",
        "module.warmup_steps=2",
        "module.lr=3e-3",
        f"+callbacks.rec._target_={CB}.RecordBatches",
        f"+callbacks.rec.path={root}/batches.txt",
        batch_size=batch,
    )


def global_batches(path) -> dict[int, list[int]]:
    """global step -> sorted crc32 of every sequence any rank trained at that step."""
    rows: dict[int, list[int]] = defaultdict(list)
    for line in path.read_text().splitlines():
        step, _rank, _idx, _lr, _ids_sum, _loss, crcs = line.split()
        rows[int(step)].extend(int(c) for c in crcs.split(","))
    return {step: sorted(v) for step, v in rows.items()}


def test_ddp_two_processes_match_one_process(tmp_path):
    """2 procs x batch 2 == 1 proc x batch 4: identical global batches (the sampler interleaves
    ranks) and the same weights after 6 AdamW steps up to fp32 reduction-order noise (5e-5)."""
    one, two = make_root(tmp_path / "one"), make_root(tmp_path / "two")
    out = run_fit(args(one, "cpu", 4))
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_fit(args(two, "ddp_sim", 2), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    batches = global_batches(one / "batches.txt")
    assert batches == global_batches(two / "batches.txt")  # the same 4 sequences at every step
    assert len(batches) == STEPS and all(len(v) == 4 for v in batches.values())
    a = torch.load(one / "outputs" / "pretrain" / "model.pt", weights_only=True)
    b = torch.load(two / "outputs" / "pretrain" / "model.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    worst = max(
        float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"]
    )
    print(f"max |w_1proc - w_2proc| = {worst:.3g}")
    # measured 6.4e-6; 1.5e-2 when each rank normalizes its loss by its own token count
    assert worst < 5e-5, worst


def test_failing_rank_brings_the_job_down(tmp_path):
    root = make_root(tmp_path)
    fail = [
        f"+callbacks.fail._target_={CB}.RaiseAt",
        "+callbacks.fail.step=2",
        "+callbacks.fail.rank=1",
    ]
    t0 = time.monotonic()
    out = run_fit(args(root, "ddp_sim", 2) + fail, timeout=180)
    elapsed = time.monotonic() - t0
    assert out.returncode != 0
    assert "injected failure on rank 1 at step 2" in out.stdout + out.stderr
    assert not (root / "outputs" / "pretrain" / "model.pt").exists()
    print(f"job down after {elapsed:.0f} s, exit code {out.returncode}")
    assert elapsed < 150


def test_nonfinite_loss_on_one_rank_skips_the_step_on_all(tmp_path):
    """NaN on rank 1 only: the ranks agree to skip (no hang, no divergence) and the run ends."""
    root = make_root(tmp_path)
    poison = [
        f"+callbacks.poison._target_={CB}.PoisonAt",
        "+callbacks.poison.steps=[2]",
        "+callbacks.poison.rank=1",
        f"+callbacks.poison.out={root}/changed",
    ]
    out = run_fit(args(root, "ddp_sim", 2) + poison, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        changed = json.loads((root / f"changed.rank{rank}.json").read_text())
        assert changed == {str(s): s != 2 for s in range(STEPS)}, (rank, changed)
    assert (
        torch.load(root / "outputs" / "pretrain" / "model.pt", weights_only=True)["step"] == STEPS
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_sigterm_to_one_rank_checkpoints_and_stops_all_ranks(tmp_path, rank):
    """SIGTERM to one rank during step 3: the ranks agree to stop after it, last.ckpt holds
    step 3, the job exits 0 without a hang (Lightning's own handler ran a collective inside the
    signal handler and hung this job)."""
    import signal

    root = make_root(tmp_path)
    sig = [
        f"+callbacks.sig._target_={CB}.SignalAt",
        "+callbacks.sig.step=2",
        f"+callbacks.sig.rank={rank}",
        f"+callbacks.sig.signum={int(signal.SIGTERM)}",
        "+callbacks.sig.when=start",
    ]
    out = run_fit(args(root, "ddp_sim", 2) + sig, timeout=180)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    assert "preempted at step 3" in out.stdout + out.stderr
    last = root / "logs" / "pretrain" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert not (root / "outputs" / "pretrain" / "model.pt").exists()
