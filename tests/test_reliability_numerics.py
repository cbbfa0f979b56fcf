"""NaN/inf losses: the step is skipped (parameters untouched), logged, and K in a row stop the run."""

from __future__ import annotations

import pytest
import torch

from lit_cm3leon.fit import train
from tests.fixtures import make_text_tokenizer, make_token_shards, tiny_pretrain_overrides
from tests.reliability_callbacks import PoisonAt


@pytest.fixture
def artifacts(tmp_path):
    out = tmp_path / "outputs"
    make_text_tokenizer(out / "text_tokenizer")
    make_token_shards(out / "tokens" / "shapes-train", 40)
    make_token_shards(out / "tokens" / "shapes-heldout", 8, seed=1)
    PoisonAt.instances.clear()
    return out


def overrides(
    steps: int, poison: list[int], precision: str = "32-true", value: str = "nan"
) -> list[str]:
    return tiny_pretrain_overrides(
        steps,
        f"trainer.precision={precision}",
        "trainer.gradient_clip_val=1.0",
        "trainer.log_every_n_steps=1",
        "module.warmup_steps=1",
        "module.max_bad_steps=3",
        "+callbacks.poison._target_=tests.reliability_callbacks.PoisonAt",
        f"+callbacks.poison.steps={poison}",
        f"+callbacks.poison.value={value}",
    )


@pytest.mark.parametrize(("precision", "value"), [("32-true", "nan"), ("bf16-mixed", "inf")])
def test_nonfinite_step_is_skipped_and_run_continues(compose, artifacts, precision, value):
    """With gradient clipping on, a None from training_step leaves every parameter as it was;
    the steps around it train normally and the run reaches max_steps."""
    metrics = train(compose(overrides(6, [2, 4], precision, value)))
    (cb,) = PoisonAt.instances
    assert sorted(cb.changed) == list(range(6))
    assert not cb.changed[2] and not cb.changed[4], "a non-finite step changed the parameters"
    assert all(cb.changed[s] for s in (0, 1, 3, 5)), cb.changed
    assert cb.bad_logged[2] == 1.0 and cb.bad_logged[4] == 1.0  # counter resets after a good step
    record = torch.load(artifacts / "pretrain" / "model.pt", weights_only=True)
    assert record["step"] == 6
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_k_nonfinite_steps_in_a_row_stop_the_run(compose, artifacts):
    with pytest.raises(
        FloatingPointError, match=r"NaN/inf for 3 steps in a row \(step 4\).*learning rate"
    ):
        train(compose(overrides(8, [2, 3, 4])))
    (cb,) = PoisonAt.instances
    assert not cb.changed[2] and not cb.changed[3]
    assert not (artifacts / "pretrain" / "model.pt").exists()  # nothing published


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_fused_optimizer_steps_with_clipped_gradients(compose, artifacts, precision):
    """The training module's fused AdamW (Lightning's precision plugin refuses to clip for it
    under mixed precision) steps with gradients clipped to ``trainer.gradient_clip_val``."""
    from tests.reliability_callbacks import GradNormProbe

    GradNormProbe.instances.clear()
    cfg = tiny_pretrain_overrides(
        3,
        f"trainer.precision={precision}",
        "trainer.gradient_clip_val=0.001",
        "+callbacks.probe._target_=tests.reliability_callbacks.GradNormProbe",
    )
    train(compose(cfg))
    (probe,) = GradNormProbe.instances
    assert probe.fused
    assert len(probe.norms) == 3
    assert all(n <= 0.001 * 1.01 for n in probe.norms), probe.norms
