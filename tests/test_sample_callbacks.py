"""The training sample callbacks: when they draw, what they log, and the decoder's mode after."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.fixtures import make_tiny_outputs


class Recorder:
    def __init__(self) -> None:
        self.images, self.texts = [], []

    def add_image(self, tag, image, step, dataformats):
        self.images.append((tag, image, step, dataformats))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))


def fake_trainer(step: int, recorder: Recorder, rank_zero: bool = True):
    return SimpleNamespace(
        global_step=step,
        is_global_zero=rank_zero,
        precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext),
        loggers=[SimpleNamespace(experiment=recorder), SimpleNamespace(experiment=None)],
        datamodule=None,
    )


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return make_tiny_outputs(tmp_path_factory.mktemp("callbacks") / "outputs")


def test_sample_grid_draws_every_n_steps_on_rank_zero_and_restores_training_mode(outputs):
    from lit_cm3leon.engine import Engine
    from lit_cm3leon.training.checkpoint import load_decoder
    from lit_cm3leon.training.sample_grid import SampleGrid, tile

    net, _, _ = load_decoder(outputs / "pretrain")
    net.train()
    prompts = ["a red circle", "a blue square"]
    cb = SampleGrid(prompts, str(outputs / "text_tokenizer"), str(outputs / "image_tokenizer"),
                    every_n_steps=5, n_samples=3, seed=4)  # fmt: skip
    rec = Recorder()
    module = SimpleNamespace(net=net)
    for step, rank_zero in ((0, True), (4, True), (5, False), (10, True)):
        cb.on_train_batch_end(fake_trainer(step, rec, rank_zero), module, None, None, 0)
    assert [(tag, step, fmt) for tag, _, step, fmt in rec.images] == [
        ("samples/text_to_image", 10, "HWC")
    ]
    assert net.training and not rec.texts
    image = rec.images[0][1]
    assert image.shape == (2 * 32, 3 * 32, 3) and image.dtype == np.uint8
    engine = Engine(net, *cb._load(), autocast=False)
    expected = tile(engine.text_to_image(prompts, cb.dec, seed=4))
    assert np.array_equal(image, expected)  # row per prompt, a column per sample


def test_sft_samples_without_held_out_examples_warn_once_and_log_nothing(outputs, caplog):
    from lit_cm3leon.training.checkpoint import load_decoder
    from lit_cm3leon.training.sft_samples import SFTSamples

    net, _, _ = load_decoder(outputs / "pretrain")
    cb, rec = SFTSamples(every_n_steps=1), Recorder()
    for step in (1, 2):
        cb.on_train_batch_end(fake_trainer(step, rec), SimpleNamespace(net=net), None, None, 0)
    assert not rec.images and not rec.texts
    assert caplog.text.count("no held-out SFT examples") == 1
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        SFTSamples(every_n_steps=0)


def test_periodic_samples_draw_in_eval_mode_without_gradients():
    """The base puts the decoder in eval mode for ``draw`` itself, not through what a subclass
    builds, and restores training mode after."""
    from lit_cm3leon.training.sample_grid import PeriodicSamples

    seen = []

    class Probe(PeriodicSamples):
        def draw(self, trainer, net):
            seen.append((net.training, torch.is_grad_enabled()))
            return {}

    net = torch.nn.Linear(2, 2).train()
    Probe(every_n_steps=1).on_train_batch_end(
        fake_trainer(1, Recorder(), True), SimpleNamespace(net=net), None, None, 0
    )
    assert seen == [(False, False)] and net.training
