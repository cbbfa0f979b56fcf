"""The CM3Leon decoder-only transformer (plain torch, no Lightning) and its KV cache."""

from .config import PRESETS, ModelConfig
from .transformer import (
    CM3LeonTransformer,
    KVCache,
    attention_mask,
    build_model,
    positions_from_mask,
)

__all__ = [
    "PRESETS",
    "CM3LeonTransformer",
    "KVCache",
    "ModelConfig",
    "attention_mask",
    "build_model",
    "positions_from_mask",
]
