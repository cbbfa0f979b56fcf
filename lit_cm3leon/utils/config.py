"""Config validation that runs before any model loads or data is touched."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A contradictory or incomplete config; the message names the fix."""


def validate_fit_config(cfg: DictConfig) -> None:
    """Fail fast, naming the fix, when a fit config cannot work.

    Experiments declare the artifacts they need under ``requires`` as a list of
    ``{path: ..., made_by: <command>}``; each must exist before training starts.
    """
    if cfg.get("module") is None or cfg.get("data") is None:
        raise ConfigError(
            "no experiment chosen: run `python -m lit_cm3leon.fit experiment=<name>` "
            "(`python -m lit_cm3leon.fit --help` lists the experiments)"
        )
    for req in cfg.get("requires") or []:
        if not Path(req.path).exists():
            raise ConfigError(
                f"{cfg.get('task')} needs {req.path}, which does not exist. Make it with: {req.made_by}"
            )
    model = cfg.get("model")
    if model is not None and cfg.get("data") is not None:
        seq_len = cfg.data.get("seq_len")
        image_tokens = cfg.data.get("image_tokens")
        if seq_len and image_tokens and seq_len < image_tokens + 2:
            raise ConfigError(
                f"data.seq_len={seq_len} is shorter than one image ({image_tokens} tokens plus "
                f"<bos>/<eos>): raise data.seq_len or use a smaller image tokenizer"
            )
        if seq_len and model.get("max_seq_len") and seq_len > model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={seq_len} exceeds model.max_seq_len={model.max_seq_len}: "
                "lower data.seq_len or pick a model preset with a longer context"
            )
