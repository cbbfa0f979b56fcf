"""Safe loading through `fit`: pickle payloads are refused unrun, checkpoints of another model
size or vocabulary are refused naming what differs."""

from __future__ import annotations

import os
import pickle
from dataclasses import replace

import pytest
import torch

from lit_cm3leon.fit import train
from lit_cm3leon.model import ModelConfig, build_model
from lit_cm3leon.tokenizer.vocab import Vocab
from lit_cm3leon.training.checkpoint import CheckpointError, load_decoder, save_decoder
from tests.fixtures import make_text_tokenizer, make_token_shards, tiny_pretrain_overrides


@pytest.fixture
def artifacts(tmp_path):
    out = tmp_path / "outputs"
    make_text_tokenizer(out / "text_tokenizer")
    make_token_shards(out / "tokens" / "shapes-train", 40)
    make_token_shards(out / "tokens" / "shapes-heldout", 8, seed=1)
    return out


def overrides(steps: int = 2) -> list[str]:
    return tiny_pretrain_overrides(steps)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_fit_refuses_pickle_payload_checkpoint_unrun(compose, artifacts, tmp_path, writer):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.ckpt"
    record = {"state_dict": {}, "global_step": 3, "payload": Payload(marker)}
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(record, f)
    else:
        torch.save(record, path)
    with pytest.raises(
        CheckpointError, match=r"ckpt_path=.*evil.ckpt.*safe load refuses.*ckpt_path=null"
    ):
        train(compose([*overrides(), f"ckpt_path={path}"]))
    assert not marker.exists(), "the payload ran"


def test_resume_checkpoint_of_another_size_names_the_difference(compose, artifacts, tmp_path):
    train(compose(overrides()))  # writes last.ckpt with the debug preset (2 layers, d 64)
    last = tmp_path / "logs" / "pretrain" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    cfg = compose([*overrides(4), "model.n_layer=3", "model.d_model=32"])
    with pytest.raises(
        CheckpointError,
        match=r"n_layer: checkpoint 2 vs config 3; d_model: checkpoint 64 vs config 32",
    ):
        train(cfg)


def test_init_from_decoder_of_another_size_or_vocab_is_refused(compose, artifacts, tmp_path):
    vocab = Vocab.load(artifacts / "text_tokenizer" / "vocab.json")
    base = {"n_layer": 2, "n_head": 4, "d_model": 64, "max_seq_len": 256}
    other_size = build_model(
        ModelConfig.from_dict({**base, "n_layer": 1, "mlp_ratio": 2, "vocab_size": vocab.size})
    )
    save_decoder(tmp_path / "small" / "model.pt", other_size, vocab)
    with pytest.raises(
        CheckpointError,
        match=r"another model size \(n_layer: checkpoint 1 vs config 2, "
        r"mlp_ratio: checkpoint 2 vs config 4\)",
    ):
        train(compose([*overrides(), f"module.init_from={tmp_path / 'small'}"]))

    copying = build_model(ModelConfig.from_dict({**base, "copy_heads": 2}).for_vocab(vocab))
    save_decoder(tmp_path / "copy" / "model.pt", copying, vocab)
    with pytest.raises(CheckpointError, match=r"copy_heads: checkpoint 2 vs config 0"):
        train(compose([*overrides(), f"module.init_from={tmp_path / 'copy'}"]))

    other_vocab = Vocab(n_text=vocab.n_text, n_image=32, image_h=4, image_w=4)
    wrong = build_model(ModelConfig.from_dict({**base, "vocab_size": other_vocab.size}))
    save_decoder(tmp_path / "vocab" / "model.pt", wrong, other_vocab)
    with pytest.raises(ValueError, match=r"checkpoint .*made with .*but this run uses"):
        train(compose([*overrides(), f"module.init_from={tmp_path / 'vocab'}"]))


def test_decoder_of_another_architecture_is_named(tmp_path):
    """Same weight shapes, different computation (copy heads): refused, not silently loaded."""
    vocab = Vocab(n_text=30, n_image=16, image_h=2, image_w=2)
    cfg = ModelConfig.preset("debug", copy_heads=2).for_vocab(vocab)
    save_decoder(tmp_path / "model.pt", build_model(cfg), vocab)
    load_decoder(tmp_path / "model.pt", vocab, expect_config=cfg)  # the same: loads
    with pytest.raises(
        CheckpointError, match=r"another architecture \(copy_heads: checkpoint 2 vs config 0\)"
    ):
        load_decoder(tmp_path / "model.pt", vocab, expect_config=replace(cfg, copy_heads=0))


def test_sft_may_add_the_copy_logit_to_a_decoder_pretrained_without_it(tmp_path):
    """``model.copy_logit=true`` over a checkpoint without the gate: the gate is added at zero
    (the loaded decoder computes what the checkpoint's did); the other way round is refused.
    Without copy heads the setting does nothing and is taken from the run."""
    vocab = Vocab(n_text=30, n_image=16, image_h=2, image_w=2)
    cfg = ModelConfig.preset("debug", copy_heads=2).for_vocab(vocab)
    torch.manual_seed(0)
    pretrained = build_model(cfg).eval()
    save_decoder(tmp_path / "model.pt", pretrained, vocab)
    gated, _, _ = load_decoder(tmp_path / "model.pt", vocab, replace(cfg, copy_logit=True))
    assert gated.config.copy_logit and gated.copy_gate is not None
    assert not gated.copy_gate.weight.any() and not gated.copy_gate.bias.any()
    for k, v in pretrained.state_dict().items():
        assert torch.equal(gated.state_dict()[k], v), k
    ids = torch.randint(0, vocab.size, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 2:6] = torch.randint(vocab.image_offset, vocab.image_offset + 16, (2, 4))
    ids[:, 7:11] = ids[:, 2:6]
    with torch.no_grad():
        torch.testing.assert_close(gated(ids), pretrained(ids))

    # no copy heads: no aligned token for a gate to point at, so the setting is inert and the
    # SFT default (copy_logit on) loads a decoder pretrained without copy heads unchanged
    plain = replace(cfg, copy_heads=0)
    torch.manual_seed(0)
    plain_model = build_model(plain).eval()
    save_decoder(tmp_path / "plain" / "model.pt", plain_model, vocab)
    same, _, _ = load_decoder(
        tmp_path / "plain" / "model.pt", vocab, replace(plain, copy_logit=True)
    )
    assert same.copy_gate is None
    with torch.no_grad():
        torch.testing.assert_close(same(ids), plain_model(ids))
    save_decoder(tmp_path / "gated" / "model.pt", gated, vocab)
    with pytest.raises(CheckpointError, match=r"copy_logit: checkpoint True vs config False"):
        load_decoder(tmp_path / "gated" / "model.pt", vocab, expect_config=cfg)
