"""Decoding: logits processors (temperature, top-k, top-p, modality masks, CFG, CD-K, edit
guidance), the generation loop with a KV cache, and CLIP re-ranking."""

from .generate import STRATEGIES, build_chain, generate, make_uncond_prompt, row_strategies
from .processors import (
    Chain,
    ClassifierFreeGuidance,
    ContrastiveTopK,
    DecodeState,
    EditGuidance,
    ModalityMask,
    Temperature,
    TopK,
    TopP,
    sample,
)
from .rerank import rerank

__all__ = [
    "STRATEGIES",
    "Chain",
    "ClassifierFreeGuidance",
    "ContrastiveTopK",
    "DecodeState",
    "EditGuidance",
    "ModalityMask",
    "Temperature",
    "TopK",
    "TopP",
    "build_chain",
    "generate",
    "make_uncond_prompt",
    "rerank",
    "row_strategies",
    "sample",
]
