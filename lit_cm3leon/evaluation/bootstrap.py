"""Percentile bootstrap intervals with a seeded generator.

Items (questions, images, prompts) are resampled with replacement; the statistic is recomputed
on each resample. A statistic may return several numbers at once (a dict), so every metric of
one evaluation shares the same resamples.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

Stat = Callable[[np.ndarray], dict[str, float]]


def bootstrap_ci(
    n: int,
    statistic: Stat,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile interval for each key of `statistic(idx)`, `idx` an int array of `n` item
    indices drawn with replacement. Returns `{key: [lo, hi]}`; empty when `n_resamples` is 0.
    Keys whose statistic is NaN on a resample (e.g. an answer type absent from it) ignore it."""
    if n_resamples <= 0 or n == 0:
        return {}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        for key, value in statistic(idx).items():
            draws.setdefault(key, []).append(float(value))
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    out = {}
    for key, values in draws.items():
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        out[key] = [float(v) for v in np.percentile(arr, q)] if arr.size else [float("nan")] * 2
    return out


def mean_statistic(values: dict[str, np.ndarray], scale: float = 1.0) -> Stat:
    """Statistic: the scaled mean of each per-item score array."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    return lambda idx: {k: scale * float(a[idx].mean()) for k, a in arrays.items()}


def differences(
    model: dict[str, np.ndarray],
    baseline: dict[str, np.ndarray],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    scale: float = 1.0,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Paired model-minus-baseline differences of the per-item scores both hold (the same items,
    in the same order): ``({"difference_<key>": mean}, {"difference_<key>": [lo, hi]})``. Each
    resample draws the same items for both, so the interval is that of the difference itself,
    narrower than two separate intervals when model and baseline vary together over items, and
    "beats the baseline clearly" reads as an interval above 0."""
    diffs = {}
    for key in model.keys() & baseline.keys():
        a, b = np.asarray(model[key], np.float64), np.asarray(baseline[key], np.float64)
        if a.shape != b.shape:
            raise ValueError(f"{key}: {a.shape[0]} model items against {b.shape[0]} baseline items")
        diffs[f"difference_{key}"] = a - b
    points = {k: scale * float(v.mean()) for k, v in sorted(diffs.items())}
    n = len(next(iter(diffs.values()))) if diffs else 0
    return points, bootstrap_ci(n, mean_statistic(diffs, scale), n_resamples, seed, level)


def info(n_resamples: int, seed: int, level: float = 0.95, unit: str = "item") -> dict:
    """The `bootstrap` block of metrics.json: how the intervals were made."""
    return {
        "resamples": n_resamples,
        "seed": seed,
        "level": level,
        "method": "percentile",
        "unit": unit,
    }


def versus(
    model_run: str | Path,
    other_run: str | Path,
    n_resamples: int = 1000,
    seed: int = 0,
    scale: float = 1.0,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Paired differences (:func:`differences`) of two runs' per-item scores (their
    ``item_scores.json``), e.g. the SFT model against the pretrained one on the same held-out
    images. Runs over other items, or in another order, are an ``InputError``."""
    from lit_cm3leon.evaluation.metrics_io import InputError, read_item_scores

    ids_a, a = read_item_scores(model_run)
    ids_b, b = read_item_scores(other_run)
    if ids_a != ids_b:
        raise InputError(
            f"{model_run} and {other_run} scored different items ({len(ids_a)} and {len(ids_b)}; "
            "the same evaluation with the same --n and --seed scores the same ones)"
        )
    return differences(
        {k: np.asarray(v) for k, v in a.items()},
        {k: np.asarray(v) for k, v in b.items()},
        n_resamples,
        seed,
        scale=scale,
    )
