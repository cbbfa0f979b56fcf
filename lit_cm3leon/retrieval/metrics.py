"""Cross-modal retrieval recall where a hit is any gallery item of the same group.

Groups are integer ids of equal scene attributes (``scene.attributes()`` equal), so a
retrieved image counts when it shows the same scene as the caption, not only when it is
the caption's own image. Chance is the expected recall of a random ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import numpy as np


def group_ids(keys: Sequence) -> np.ndarray:
    """Integer id per item; equal keys share an id (keys need only ``==``)."""
    reps: list = []
    out = np.empty(len(keys), np.int64)
    index: dict = {}
    for i, k in enumerate(keys):
        try:
            out[i] = index.setdefault(k, len(index))
            continue
        except TypeError:  # unhashable: linear scan with ==
            pass
        for j, r in enumerate(reps):
            if r == k:
                out[i] = -1 - j
                break
        else:
            reps.append(k)
            out[i] = -len(reps)
    return out


def recall_at_k(
    query: np.ndarray,
    gallery: np.ndarray,
    q_groups: np.ndarray,
    g_groups: np.ndarray,
    ks: Sequence[int] = (1, 5),
) -> dict[int, float]:
    """Fraction of queries with a same-group item among their top-k gallery items.

    ``query`` [Q, D], ``gallery`` [G, D] (normalized rows; scores are inner products).
    """
    scores = query @ gallery.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, : max(ks)]
    hits = g_groups[order] == q_groups[:, None]
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def chance_recall(
    q_groups: np.ndarray, g_groups: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Expected recall@k of a uniformly random ranking of the gallery."""
    g = len(g_groups)
    values, counts = np.unique(g_groups, return_counts=True)
    count = dict(zip(values.tolist(), counts.tolist(), strict=True))
    out = {}
    for k in ks:
        miss = [comb(g - count.get(int(q), 0), k) / comb(g, k) for q in q_groups]
        out[k] = float(1.0 - np.mean(miss))
    return out
