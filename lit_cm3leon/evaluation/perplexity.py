"""Held-out image-token perplexity of a decoder, with 0..k retrieved documents, beside a
per-position unigram baseline (the code frequencies at each of the h*w positions in the
training shards, add-one smoothed: it already captures backgrounds and layout priors)."""

from __future__ import annotations

import numpy as np


def unigram_nll(train_codes: np.ndarray, test_codes: np.ndarray, n_codes: int) -> np.ndarray:
    """Per-image mean NLL (nats) of ``test_codes`` [N, h, w] under per-position frequencies."""
    flat_train = train_codes.reshape(len(train_codes), -1)
    flat_test = test_codes.reshape(len(test_codes), -1)
    positions = flat_train.shape[1]
    counts = np.ones((positions, n_codes))  # add-one smoothing
    for p in range(positions):
        counts[p] += np.bincount(flat_train[:, p], minlength=n_codes)[:n_codes]
    logp = np.log(counts / counts.sum(1, keepdims=True))
    return -logp[np.arange(positions)[None, :], flat_test].mean(1)


def own_document_nll(engine, captions: list[str], codes: np.ndarray) -> np.ndarray:
    """Per-image NLL with the image's own document (its caption and codes) as the one retrieved
    document: the best a retrieved document could do. A decoder that reads its retrieved images
    copies the codes and nears perplexity 1; one that ignores them stays at its k0 value."""
    own = {c: codes[i] for i, c in enumerate(captions)}
    saved = engine.retrieve_fn
    engine.retrieve_fn = lambda texts, k: [[(t, own[t])] for t in texts]
    try:
        return engine.image_nll(captions, codes, retrieve_k=1)
    finally:
        engine.retrieve_fn = saved


def perplexity_table(
    engine, captions: list[str], codes: np.ndarray, train_codes: np.ndarray, retrieve_ks=(0, 1, 2)
) -> dict[str, np.ndarray]:
    """Per-image NLL arrays: ``nll_k{k}`` for each k, ``nll_own`` (:func:`own_document_nll`)
    and ``nll_unigram``."""
    out = {f"nll_k{k}": engine.image_nll(captions, codes, retrieve_k=k) for k in retrieve_ks}
    out["nll_own"] = own_document_nll(engine, captions, codes)
    out["nll_unigram"] = unigram_nll(train_codes, codes, engine.vocab.n_image)
    return out
