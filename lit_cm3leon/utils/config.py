"""Config validation that runs before any model loads or data is touched."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A contradictory or incomplete config; the message names the fix."""


def validate_fit_config(cfg: DictConfig) -> None:
    """Fail fast, naming the fix, when a fit config cannot work.

    Experiments declare the artifacts they need under ``requires`` as a list of
    ``{path: ..., made_by: <command>, data: bool}``; each must exist before training starts
    (with ``data_only``, those marked ``data: true``: what the data module reads).
    """
    if cfg.get("module") is None or cfg.get("data") is None:
        raise ConfigError(
            "no experiment chosen: run `python -m lit_cm3leon.fit experiment=<name>` "
            "(`python -m lit_cm3leon.fit --help` lists the experiments)"
        )
    data_only = bool(cfg.get("data_only"))
    for req in cfg.get("requires") or []:
        if data_only and not req.get("data", False):
            continue  # the model's inputs: not read when only the data is built
        if not Path(req.path).exists():
            raise ConfigError(
                f"{cfg.get('task')} needs {req.path}, which does not exist. Make it with: {req.made_by}"
            )
    model = cfg.get("model")
    seq_len, image_tokens = cfg.data.get("seq_len"), cfg.data.get("image_tokens")
    if seq_len:
        if image_tokens and seq_len < image_tokens + 2:
            raise ConfigError(
                f"data.seq_len={seq_len} is shorter than one image ({image_tokens} tokens plus "
                f"<bos>/<eos>): raise data.seq_len or use a smaller image tokenizer"
            )
        if model is not None and model.get("max_seq_len") and seq_len > model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={seq_len} exceeds model.max_seq_len={model.max_seq_len}: "
                "lower data.seq_len or pick a model preset with a longer context"
            )
    index_dir = cfg.data.get("index_dir")
    wants_retrieval = any(
        (cfg.data.get(k) or 0) > 0 for k in ("n_retrieved", "val_retrieve_k", "retrieve_k")
    )
    if wants_retrieval and index_dir and not (Path(index_dir) / "manifest.json").is_file():
        raise ConfigError(
            f"retrieval is on (data.n_retrieved/val_retrieve_k > 0) but there is no memory bank at "
            f"{index_dir}: build it with `python -m lit_cm3leon.prepare index`, or train without "
            "retrieval (data.index_dir=null)"
        )
    if wants_retrieval and not index_dir:
        raise ConfigError(
            "retrieval is on (data.n_retrieved/val_retrieve_k > 0) but data.index_dir is null: set "
            "data.n_retrieved=0 data.val_retrieve_k=0, or point data.index_dir at a memory bank"
        )
    _check_vocab_image_tokens(cfg)
    _check_training_budget(cfg)
    _check_checkpoints(cfg)
    _check_callbacks(cfg)


def _check_vocab_image_tokens(cfg: DictConfig) -> None:
    """data.image_tokens must be the image grid of the tokenizers the run uses."""
    image_tokens, tok_dir = cfg.data.get("image_tokens"), cfg.data.get("text_tokenizer_dir")
    vocab_file = Path(tok_dir) / "vocab.json" if tok_dir else None
    if not image_tokens or vocab_file is None or not vocab_file.is_file():
        return
    try:
        record = json.loads(vocab_file.read_text())
        h, w = int(record["image_h"]), int(record["image_w"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{vocab_file} is not a vocabulary record: remake it with `python -m lit_cm3leon.prepare text-tokenizer`"
        ) from None
    if h * w != image_tokens:
        raise ConfigError(
            f"data.image_tokens={image_tokens} but the tokenizers in {tok_dir} make {h}x{w}={h * w} tokens "
            f"per image: set data.image_tokens={h * w}"
        )


def _check_training_budget(cfg: DictConfig) -> None:
    trainer = cfg.get("trainer") or {}
    max_steps = trainer.get("max_steps")
    if not max_steps or max_steps < 0:
        return
    data_steps = cfg.data.get("max_steps")
    if data_steps is not None and data_steps < max_steps:
        raise ConfigError(
            f"data.max_steps={data_steps} is less than trainer.max_steps={max_steps}: the sample stream "
            "would run out mid-run. Leave data.max_steps at ${trainer.max_steps}"
        )
    fraction = cfg.data.get("max_bad_fraction")
    if fraction is not None and not 0 <= fraction < 1:
        raise ConfigError(f"data.max_bad_fraction={fraction} must be in [0, 1)")


def _check_checkpoints(cfg: DictConfig) -> None:
    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "", "null", "auto") and not Path(ckpt).is_file():
        raise ConfigError(
            f"ckpt_path={ckpt} does not exist: give a Lightning checkpoint (logs/<task>/checkpoints/"
            "last.ckpt), ckpt_path=auto to resume when one exists, or ckpt_path=null to start fresh"
        )
    init_from = (cfg.get("module") or {}).get("init_from")
    if init_from and not cfg.get("data_only"):  # data_only builds no model
        path = Path(init_from)
        if not (path.is_file() or (path / "model.pt").is_file()):
            raise ConfigError(
                f"module.init_from={init_from} holds no model.pt: publish a decoder first "
                "(`python -m lit_cm3leon.fit experiment=pretrain` writes outputs/pretrain/model.pt)"
            )


def _check_callbacks(cfg: DictConfig) -> None:
    callbacks = cfg.get("callbacks") or {}
    loggers = [
        v
        for v in (cfg.get("logger") or {}).values()
        if isinstance(v, DictConfig) and "_target_" in v
    ]
    monitor = callbacks.get("lr_monitor")
    if isinstance(monitor, DictConfig) and "_target_" in monitor and not loggers:
        raise ConfigError(
            "callbacks.lr_monitor needs a logger but logger is none: pick logger=csv or "
            "logger=tensorboard, or drop the monitor with ~callbacks.lr_monitor"
        )
