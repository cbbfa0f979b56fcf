"""Parallelism and speed-ups applied after construction, kept out of the model file.

``parallelize(model, cfg)`` switches on per-block activation checkpointing and compiles each
block with ``torch.compile``; sharding itself is left to Lightning's ``FSDPStrategy``, which
receives the block class as its auto-wrap policy (one FSDP unit per transformer block)::

    strategy = FSDPStrategy(**fsdp_strategy_kwargs(cfg))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .transformer import Block, CM3LeonTransformer


def _get(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def parallelize(
    model: CM3LeonTransformer,
    cfg: Any = None,
    *,
    activation_checkpointing: bool | None = None,
    compile: bool | None = None,
) -> CM3LeonTransformer:
    """Apply activation checkpointing and ``torch.compile`` per block, in place; returns model.

    ``cfg`` is a :class:`ModelConfig`, a mapping or any object with ``activation_checkpointing``
    and ``compile`` fields (defaults: the model's config); keyword arguments override it.
    """
    cfg = model.config if cfg is None else cfg
    if activation_checkpointing is None:
        activation_checkpointing = bool(_get(cfg, "activation_checkpointing", False))
    if compile is None:
        compile = bool(_get(cfg, "compile", False))
    model.activation_checkpointing = activation_checkpointing
    if compile:
        for block in model.blocks:
            block.compile()
    return model


def fsdp_auto_wrap_policy() -> set[type[nn.Module]]:
    """Module classes that become one FSDP unit each (Lightning's ``auto_wrap_policy``)."""
    return {Block}


def fsdp_strategy_kwargs(cfg: Any = None) -> dict:
    """Keyword arguments for ``lightning.pytorch.strategies.FSDPStrategy``: wrap per block and,
    when the config asks, let FSDP checkpoint activations per block (then leave the model's own
    flag off to avoid recomputing twice)."""
    kwargs: dict = {"auto_wrap_policy": fsdp_auto_wrap_policy()}
    if _get(cfg, "activation_checkpointing", False):
        kwargs["activation_checkpointing_policy"] = fsdp_auto_wrap_policy()
    return kwargs
