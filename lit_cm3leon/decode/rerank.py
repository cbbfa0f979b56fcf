"""CLIP re-ranking of sampled images: draw N candidates, keep the one the retriever's CLIP
scores highest against the prompt text (the paper's ``num_samples`` > 1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Scorer = Callable[[Sequence[Any], str], Any]  # (images, text) -> scores [N] (higher = better)


def rerank(candidate_images: Sequence[Any], prompt_text: str, scorer: Scorer) -> list[int]:
    """Order of the candidates, best first (``rerank(...)[0]`` is the one to keep).

    ``scorer(images, text)`` returns one score per image (a tensor, array or list), e.g. the
    cosine similarity of the retriever CLIP's image and text embeddings. Ties keep sample order.
    """
    if len(candidate_images) == 0:
        raise ValueError("rerank needs at least one candidate image")
    scores = torch.as_tensor(scorer(candidate_images, prompt_text), dtype=torch.float64).flatten()
    if scores.numel() != len(candidate_images):
        raise ValueError(
            f"scorer returned {scores.numel()} scores for {len(candidate_images)} images"
        )
    if torch.isnan(scores).any():
        raise ValueError("scorer returned NaN scores")
    return torch.sort(-scores, stable=True).indices.tolist()
