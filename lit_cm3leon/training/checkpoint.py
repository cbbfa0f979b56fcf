"""Our decoder checkpoints: plain containers, loaded with ``weights_only=True``.

``outputs/<stage>/model.pt`` holds ``{"format", "model_config", "vocab", "state_dict", "step"}``;
loading it under another vocabulary or model size names what differs.
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import torch

from lit_cm3leon.model import CM3LeonTransformer, ModelConfig, build_model
from lit_cm3leon.tokenizer.vocab import Vocab

FORMAT = "lit_cm3leon.decoder/1"
FILENAME = "model.pt"


# ModelConfig fields that fix the shapes of a decoder's weights: a checkpoint of another value
# is "another model size" (load_decoder names each difference).
SIZE_FIELDS = (
    "n_layer",
    "n_head",
    "d_model",
    "max_seq_len",
    "mlp_ratio",
    "vocab_size",
    "image_cells",
)
# Fields that change what the same weights compute: a checkpoint of another value is "another
# architecture" (the run's config would otherwise silently differ from the loaded model).
ARCH_FIELDS = ("cell_embedding", "copy_heads", "copy_bias", "copy_logit")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message says why and what differs."""


def save_decoder(path: str | Path, model: CM3LeonTransformer, vocab: Vocab, step: int = 0) -> Path:
    path = Path(path)
    if path.suffix != ".pt":
        path = path / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    record = {
        "format": FORMAT,
        "model_config": model.config.to_dict(),
        "vocab": {**vocab.to_dict(), "hash": vocab.hash},
        "state_dict": state,
        "step": int(step),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(record, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file with ``weights_only=True``; a pickle payload is refused unrun."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected outputs/<stage>/{FILENAME} written by "
            "`python -m lit_cm3leon.fit experiment=pretrain` (or sft)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds pickled objects that a safe load refuses (nothing in it was run): {err}"
        ) from None


def load_decoder(
    path: str | Path,
    vocab: Vocab | None = None,
    expect_config: ModelConfig | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CM3LeonTransformer, Vocab, dict]:
    """Rebuild the model from the file alone; check vocabulary and size when given.

    ``expect_config`` (a run's ``module.init_from``): the checkpoint must have its size and
    architecture, except that a config with ``copy_logit`` may add the copy logit's gate, at
    zero, to a checkpoint with copy heads and without it."""
    record = read_checkpoint(path)
    if record.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a lit_cm3leon decoder checkpoint (format={record.get('format')!r})"
        )
    ckpt_vocab = Vocab.from_dict(record["vocab"])
    if vocab is not None:
        vocab.check_same(ckpt_vocab, what=f"checkpoint {path}")
    config = ModelConfig.from_dict(record["model_config"])
    if config.cell_embedding or config.copy_heads:  # the vocabulary's layout fields, also for
        config = config.for_vocab(ckpt_vocab)  # checkpoints written before a field existed
    new_gate = False
    if expect_config is not None:
        # box grounding has no weights: the run decides it (an SFT run may switch it on)
        config = replace(config, ground_boxes=expect_config.ground_boxes)
        # the copy logit's gate starts at zero, where it changes nothing: an SFT run may add it
        # to a decoder pretrained without it (the same copy heads)
        new_gate = expect_config.copy_logit and not config.copy_logit and config.copy_heads > 0
        if new_gate:
            config = replace(config, copy_logit=True)
        if config.copy_heads == 0:  # without copy heads the copy logit does nothing: the run's word
            config = replace(config, copy_logit=expect_config.copy_logit)
        diff = {
            k: (getattr(config, k), getattr(expect_config, k))
            for k in SIZE_FIELDS + ARCH_FIELDS
            if getattr(config, k) != getattr(expect_config, k)
        }
        if diff:
            kind = "model size" if set(diff) & set(SIZE_FIELDS) else "architecture"
            detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {path} is another {kind} ({detail})")
    model = build_model(config)
    if new_gate:  # every weight but the new gate's (zero: build_model's initialisation)
        state = {**model.copy_gate.state_dict(prefix="copy_gate."), **record["state_dict"]}
        model.load_state_dict(state)
    else:
        model.load_state_dict(record["state_dict"])
    return model.to(device).eval(), ckpt_vocab, record
