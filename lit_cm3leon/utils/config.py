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
    wants_retrieval = any((cfg.data.get(k) or 0) > 0 for k in ("n_retrieved", "val_retrieve_k", "retrieve_k"))
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
