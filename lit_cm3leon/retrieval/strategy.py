"""Which documents to retrieve: the paper's relevance, near-duplicate, modality and diversity rules.

The rules are pure functions over score arrays and vectors (testable on hand-made banks);
``Retriever`` ties them to a ``MemoryBank`` and a ``ClipEncoder``.

- relevance: the retriever score (inner product of normalized CLIP vectors);
- the query itself (same doc id) and near duplicates of the query are dropped: candidates
  scoring above ``max_score`` against a prompt's text vector (inference), or above
  ``pair_max_score`` against a training pair's document vector (the mean of its text and image
  embeddings). The two scores live on different scales (a document against a document scores
  much closer to 1 than a caption against a document), so each rule has its own threshold;
- only multimodal documents (text and image) are kept;
- no two retrieved documents are near-identical: greedily, a candidate whose score against an
  already chosen document is above ``diversity_threshold`` is skipped;
- training: candidates come from a search with the query's image and one with its text, where
  each word of the text is dropped with probability ``query_dropout``; ``n_train_docs`` documents
  are drawn at random among the top ``candidates`` admissible ones;
- inference: the ``retrieve_k`` most relevant admissible documents for the prompt text.

Not in the paper: with ``lexical_weight`` > 0 (and a bank that keeps ``lexical.npz``), a text
search takes the union of the dense and the lexical top ``search_k`` and ranks it by dense score
+ ``lexical_weight`` x TF-IDF cosine (``lexical.py``): exact words, such as a landmark's name,
that a small dense encoder does not learn. The rules above still use the dense scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np


@dataclass
class RetrievalConfig:
    retrieve_k: int = 2  # documents placed before a prompt at inference
    max_score: float = 0.9  # inference: candidates scoring above this against the prompt text
    pair_max_score: float = 0.9  # training: ... above this against the pair's document vector
    diversity_threshold: float = 0.95  # two retrieved docs scoring above this are near-identical
    query_dropout: float = 0.2  # fraction of the query text's words dropped (training)
    n_train_docs: int = 3  # documents drawn per training pair
    candidates: int = 16  # training: draw among this many top admissible candidates
    search_k: int = 64  # depth of each faiss search (before filtering)
    multimodal_only: bool = True  # keep only documents with both text and image
    lexical_weight: float = 0.0  # text searches add this x the TF-IDF score (0: dense only)

    @classmethod
    def from_mapping(cls, cfg: Mapping | RetrievalConfig | None) -> RetrievalConfig:
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        names = {f.name for f in fields(cls)}
        unknown = set(cfg) - names - {"encoder", "bank"}
        if unknown:
            raise ValueError(f"unknown retrieval keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: cfg[k] for k in names if k in cfg})


# ---------------------------------------------------------------------- pure rules
def drop_words(text: str, rate: float, rng: np.random.Generator) -> str:
    """Drop each whitespace-separated word with probability ``rate`` (at least one word stays)."""
    words = text.split()
    if not words or rate <= 0:
        return text
    keep = rng.random(len(words)) >= rate
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(w for w, k in zip(words, keep, strict=True) if k)


def merge_candidates(*results: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Union of several (scores [k], rows [k]) search results: each row once with its best
    score, sorted by score descending (ties by row). Rows < 0 (faiss padding) are dropped."""
    if not results:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    scores = np.concatenate([np.asarray(s, np.float64).ravel() for s, _ in results])
    rows = np.concatenate([np.asarray(r, np.int64).ravel() for _, r in results])
    keep = rows >= 0
    scores, rows = scores[keep], rows[keep]
    by_row = np.lexsort((-scores, rows))  # each row's best score first
    rows, first = np.unique(rows[by_row], return_index=True)
    scores = scores[by_row][first].astype(np.float32)
    order = np.lexsort((rows, -scores))
    return scores[order], rows[order]


def admissible(
    doc_ids: np.ndarray,
    query_scores: np.ndarray,
    multimodal: np.ndarray | None,
    query_doc_id: int | None,
    max_score: float,
) -> np.ndarray:
    """Bool mask over candidates: not the query itself, score against the query at most
    ``max_score``, and multimodal (when ``multimodal`` is given)."""
    ok = np.asarray(query_scores) <= max_score
    if query_doc_id is not None:
        ok &= np.asarray(doc_ids) != query_doc_id
    if multimodal is not None:
        ok &= np.asarray(multimodal, bool)
    return ok


def greedy_diverse(vectors: np.ndarray, threshold: float, k: int) -> list[int]:
    """Walk candidates in the given order; keep one unless it scores above ``threshold`` against
    one already kept. ``vectors`` [n, D] (normalized). Returns positions of at most k kept."""
    kept: list[int] = []
    for i in range(len(vectors)):
        if len(kept) == k:
            break
        if kept and float(np.max(vectors[kept] @ vectors[i])) > threshold:
            continue
        kept.append(i)
    return kept


def sample_then_rest(n: int, pool: int, rng: np.random.Generator) -> np.ndarray:
    """An order over n ranked candidates: the top ``pool`` shuffled, then the rest in rank
    order (so a draw falls back to lower ranks when the pool has too few diverse docs)."""
    head = rng.permutation(min(pool, n))
    return np.concatenate([head, np.arange(min(pool, n), n)]).astype(np.int64)


def choose(
    rel_rows: np.ndarray,
    cand_vectors: np.ndarray,
    query_vector: np.ndarray,
    doc_ids: np.ndarray,
    multimodal: np.ndarray | None,
    query_doc_id: int | None,
    cfg: RetrievalConfig,
    k: int,
    rng: np.random.Generator | None = None,
    max_score: float | None = None,
) -> list[int]:
    """Apply the rules to candidates already sorted by relevance.

    ``rel_rows`` [n] bank rows, ``cand_vectors`` [n, D] their vectors, ``query_vector`` [D],
    ``doc_ids``/``multimodal`` [n] of the candidates. With ``rng`` the k docs are drawn among the
    top ``cfg.candidates`` admissible ones (training); without, the top k are taken (inference).
    ``max_score`` overrides ``cfg.max_score`` (the near-duplicate threshold for this query's
    scale). Returns positions into the candidate arrays.
    """
    max_score = cfg.max_score if max_score is None else max_score
    q_scores = cand_vectors @ query_vector if len(rel_rows) else np.zeros(0, np.float32)
    mask = admissible(
        doc_ids, q_scores, multimodal if cfg.multimodal_only else None, query_doc_id, max_score
    )
    pos = np.flatnonzero(mask)
    if rng is not None:
        pos = pos[sample_then_rest(len(pos), cfg.candidates, rng)]
    kept = greedy_diverse(cand_vectors[pos], cfg.diversity_threshold, k)
    return [int(pos[i]) for i in kept]


# ---------------------------------------------------------------------- bank + encoder
class Retriever:
    """Retrieval for training pairs (``training_docs``) and prompts (``prompt_docs``).

    ``bank``: a ``MemoryBank``; ``encoder``: the ``ClipEncoder`` that built it; ``cfg``: a
    ``RetrievalConfig`` or a mapping of its keys (``configs/retrieval/default.yaml``).
    Results are document ids of the bank (``bank.meta`` tells where their tokens are).
    """

    def __init__(self, bank, encoder, cfg: Mapping | RetrievalConfig | None = None) -> None:
        if encoder.dim != bank.dim:
            raise ValueError(f"encoder dim {encoder.dim} != memory bank dim {bank.dim}")
        self.bank, self.encoder = bank, encoder
        self.cfg = RetrievalConfig.from_mapping(cfg)

    def _pick(
        self,
        results: list[tuple[np.ndarray, np.ndarray]],
        query_vector: np.ndarray,
        query_doc_id: int | None,
        k: int,
        rng,
        max_score: float,
    ) -> list[int]:
        _, rows = merge_candidates(*results)
        vecs = self.bank.vectors(rows)
        picked = choose(
            rows,
            vecs,
            query_vector,
            self.bank.doc_ids[rows],
            self.bank.multimodal[rows],
            query_doc_id,
            self.cfg,
            k,
            rng,
            max_score,
        )
        return [int(self.bank.doc_ids[rows[i]]) for i in picked]

    def training_docs(
        self,
        texts: Sequence[str],
        images,
        doc_ids: Sequence[int | None],
        rng: np.random.Generator | Sequence[np.random.Generator],
        embeddings: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> list[list[int]]:
        """``n_train_docs`` doc ids per (text, image) pair, from an image search and a search
        with the query-dropped text; the pair's own doc id is excluded. ``rng``: one generator
        for the batch, or one per pair (then a pair's documents do not depend on the others in
        its batch). ``embeddings``: the pairs' (text, image) vectors when already known (then
        ``images`` is not read)."""
        texts = list(texts)
        rngs = [rng] * len(texts) if isinstance(rng, np.random.Generator) else list(rng)
        if len(rngs) != len(texts):
            raise ValueError(f"{len(rngs)} generators for {len(texts)} pairs")
        dropped = [
            drop_words(t, self.cfg.query_dropout, g) for t, g in zip(texts, rngs, strict=True)
        ]
        if embeddings is None:
            t_full, i_emb = self.encoder.embed_text(texts), self.encoder.embed_image(images)
        else:
            t_full, i_emb = embeddings
        t_drop = self.encoder.embed_text(dropped)
        from lit_cm3leon.retrieval.encoder import mean_of_modalities

        q_doc = mean_of_modalities(t_full, i_emb)  # the query document, for the near-dup rule
        k = self.cfg.search_k
        by_text = self._text_search(dropped, t_drop, k)
        s_img, r_img = self.bank.search(i_emb, k)
        results = [[(s_img[j], r_img[j]), by_text[j]] for j in range(len(texts))]
        return [
            self._pick(
                results[j],
                q_doc[j],
                None if doc_ids[j] is None else int(doc_ids[j]),
                self.cfg.n_train_docs,
                rngs[j],
                self.cfg.pair_max_score,
            )
            for j in range(len(texts))
        ]

    def prompt_docs(
        self,
        texts: Sequence[str],
        k: int | None = None,
        exclude: Sequence[int | None] | None = None,
    ) -> list[list[int]]:
        """The ``k`` (default ``retrieve_k``) best admissible doc ids for each prompt text."""
        k = self.cfg.retrieve_k if k is None else k
        if k <= 0:
            return [[] for _ in texts]
        q = self.encoder.embed_text(list(texts))
        found = self._text_search(list(texts), q, self.cfg.search_k)
        ex = list(exclude) if exclude is not None else [None] * len(q)
        return [
            self._pick([found[j]], q[j], ex[j], k, None, self.cfg.max_score) for j in range(len(q))
        ]

    def _text_search(
        self, texts: Sequence[str], vectors: np.ndarray, k: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text, (scores, rows) of its search: dense, or with ``lexical_weight`` > 0 and a
        lexical index in the bank, the union of the dense and lexical top ``k`` scored as
        dense + lexical_weight x lexical."""
        s, r = self.bank.search(vectors, k)
        w, lexical = self.cfg.lexical_weight, self.bank.lexical
        if w <= 0 or lexical is None:
            return [(s[j], r[j]) for j in range(len(texts))]
        from lit_cm3leon.retrieval.lexical import top_k_rows

        lex_all = lexical.score_all(texts)  # [Q, N] dense array of TF-IDF cosines
        lex_rows = top_k_rows(lex_all, k)
        unions = [
            np.union1d(r[j][r[j] >= 0], lex_rows[j][lex_all[j, lex_rows[j]] > 0]).astype(np.int64)
            for j in range(len(texts))
        ]
        every = np.unique(np.concatenate(unions)) if unions else np.zeros(0, np.int64)
        vecs = self.bank.vectors(every)  # one reconstruction for the whole batch
        out = []
        for j, rows in enumerate(unions):
            dense = vecs[np.searchsorted(every, rows)] @ np.asarray(vectors[j], np.float32)
            out.append((dense + w * lex_all[j, rows], rows))
        return out
