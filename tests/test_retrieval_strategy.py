"""Retrieval rules on hand-made banks: near duplicates, self, modality, diversity, searches."""

import numpy as np
import pytest

from lit_cm3leon.retrieval.index import MemoryBank
from lit_cm3leon.retrieval.strategy import (
    RetrievalConfig,
    Retriever,
    admissible,
    choose,
    drop_words,
    greedy_diverse,
    merge_candidates,
)


def unit(*v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


E = np.eye(6, dtype=np.float32)
# query document = e0; each row is a crafted candidate
ROWS = {
    100: (E[0], True),  # the query itself
    101: (unit(1, 0.1, 0, 0, 0, 0), True),  # near duplicate of the query (score 0.995)
    102: (unit(1, 0.8, 0, 0, 0, 0), False),  # relevant but text-only
    103: (unit(1, 0, 0.9, 0, 0, 0), True),  # relevant (0.74)
    104: (unit(1, 0, 0.93, 0.05, 0, 0), True),  # near-identical to 103, a bit less relevant
    105: (unit(1, 0, 0, 1.2, 0, 0), True),  # relevant (0.64), different from 103
    106: (E[1], True),  # irrelevant
}


def crafted_bank():
    ids = list(ROWS)
    vecs = np.stack([ROWS[i][0] for i in ids])
    mm = np.array([ROWS[i][1] for i in ids])
    return MemoryBank.build(
        vecs,
        ids,
        has_text=np.ones(len(ids), bool),
        has_image=mm,
        encoder_name="fake",
        encoder_hash="fake",
    )


def test_admissible_rules():
    ids = np.array([1, 2, 3, 4])
    scores = np.array([1.0, 0.95, 0.9, 0.5])
    mm = np.array([True, True, True, False])
    np.testing.assert_array_equal(admissible(ids, scores, mm, 1, 0.9), [False, False, True, False])
    np.testing.assert_array_equal(admissible(ids, scores, None, None, 1.0), [True] * 4)
    np.testing.assert_array_equal(
        admissible(ids, scores, None, 3, 0.99), [False, True, False, True]
    )


def test_greedy_diverse_skips_near_identical():
    v = np.stack([unit(1, 0, 0), unit(1, 0.01, 0), unit(0, 1, 0), unit(0, 0, 1)])
    assert greedy_diverse(v, 0.95, 3) == [0, 2, 3]
    assert greedy_diverse(v, 1.0, 3) == [0, 1, 2]  # threshold 1: nothing is too close
    assert greedy_diverse(v, 0.95, 1) == [0]


def test_merge_candidates_keeps_best_score_per_row():
    s, r = merge_candidates(
        (np.array([0.9, 0.5]), np.array([3, 1])), (np.array([0.7, 0.6, 0.1]), np.array([1, 2, -1]))
    )
    np.testing.assert_array_equal(r, [3, 1, 2])
    np.testing.assert_allclose(s, [0.9, 0.7, 0.6])


def test_choose_on_crafted_bank_inference():
    bank = crafted_bank()
    cfg = RetrievalConfig(max_score=0.9, diversity_threshold=0.95)
    s, r = bank.search(E[0][None], 7)
    vecs = bank.vectors(r[0])
    pos = choose(r[0], vecs, E[0], bank.doc_ids[r[0]], bank.multimodal[r[0]], 100, cfg, 2)
    assert [int(bank.doc_ids[r[0][p]]) for p in pos] == [103, 105]
    # every rule matters: lift each one and the excluded document comes back
    loose = RetrievalConfig(max_score=1.01, diversity_threshold=1.01, multimodal_only=False)
    pos = choose(r[0], vecs, E[0], bank.doc_ids[r[0]], bank.multimodal[r[0]], None, loose, 7)
    assert [int(bank.doc_ids[r[0][p]]) for p in pos] == [100, 101, 102, 103, 104, 105, 106]
    only_div = RetrievalConfig(max_score=0.9, diversity_threshold=1.01)
    pos = choose(r[0], vecs, E[0], bank.doc_ids[r[0]], bank.multimodal[r[0]], 100, only_div, 3)
    assert [int(bank.doc_ids[r[0][p]]) for p in pos] == [103, 104, 105]


class FakeEncoder:
    """Texts and images map to fixed vectors; records the texts it embedded."""

    name, hash, dim = "fake", "fake", 6

    def __init__(self, text_vecs, image_vec):
        self.text_vecs, self.image_vec, self.seen = text_vecs, image_vec, []

    def embed_text(self, texts):
        self.seen.extend(texts)
        return np.stack([self.text_vecs.get(t, self.text_vecs["*"]) for t in texts])

    def embed_image(self, images):
        return np.stack([self.image_vec for _ in images])


def test_prompt_docs_on_crafted_bank():
    r = Retriever(
        crafted_bank(),
        FakeEncoder({"*": E[0]}, E[0]),
        {"retrieve_k": 2, "max_score": 0.9, "diversity_threshold": 0.95},
    )
    assert r.prompt_docs(["anything"]) == [[103, 105]]
    assert r.prompt_docs(["anything"], k=0) == [[]]


def test_training_uses_image_search_and_text_search():
    # docs 0-2 near the image direction e2, docs 3-5 near the text direction e3, others far
    vecs = [unit(0.2, 0, 1, 0.1 * i, 0, 0) for i in range(3)]
    vecs += [unit(0.2, 0, 0, 1, 0.1 * i, 0) for i in range(3)]
    vecs += [unit(0, 1, 0, 0, 0, 0.1 * i) for i in range(10)]
    bank = MemoryBank.build(np.stack(vecs), np.arange(16), encoder_name="fake", encoder_hash="f")
    enc = FakeEncoder({"*": E[3]}, E[2])
    cfg = {
        "search_k": 3,
        "n_train_docs": 6,
        "candidates": 6,
        "pair_max_score": 0.999,
        "diversity_threshold": 1.0,
        "query_dropout": 0.2,
    }
    got = Retriever(bank, enc, cfg).training_docs(
        ["w"] * 2, np.zeros((2, 4, 4, 3)), [None, 4], np.random.default_rng(0)
    )
    assert sorted(got[0]) == [0, 1, 2, 3, 4, 5]  # 3 from the image search + 3 from the text one
    assert sorted(got[1]) == [0, 1, 2, 3, 5]  # the pair's own doc id (4) is excluded


def test_training_draws_among_top_candidates_and_drops_words():
    vecs = np.stack([unit(1, 0.3 + 0.1 * i, 0, 0, 0, 0.02 * i) for i in range(40)])
    vecs = np.concatenate([vecs, np.stack([unit(0, 0, 0, 0, 1, 0.01 * i) for i in range(10)])])
    bank = MemoryBank.build(vecs, np.arange(50), encoder_name="fake", encoder_hash="f")
    text = " ".join(f"w{i}" for i in range(50))
    enc = FakeEncoder({"*": E[0]}, E[0])
    cfg = RetrievalConfig(
        search_k=40,
        n_train_docs=3,
        candidates=8,
        pair_max_score=0.999,
        diversity_threshold=1.0,
        query_dropout=0.2,
    )
    r = Retriever(bank, enc, cfg)
    rng = np.random.default_rng(0)
    drawn = [
        d
        for _ in range(30)
        for d in r.training_docs([text], np.zeros((1, 4, 4, 3)), [None], rng)[0]
    ]
    top8 = set(range(8))  # most relevant: smallest second component
    assert set(drawn) <= top8 and len(set(drawn)) >= 6  # random draws, all within the top 8
    dropped = [t for t in enc.seen if t != text]
    assert dropped and all(len(t.split()) < 50 for t in dropped)  # the search text is dropped


def test_near_duplicate_threshold_follows_the_query_kind():
    """A prompt is a caption vector, a training pair a document vector: their scores against a
    bank document live on different scales, so each has its own near-duplicate threshold."""
    vecs = np.stack([unit(1, 0.1, 0, 0, 0, 0), unit(1, 0.5, 0, 0, 0, 0), E[5]])
    bank = MemoryBank.build(vecs, np.array([0, 1, 2]), encoder_name="fake", encoder_hash="f")
    # the caption and the pair's document (mean of caption and image) are both e0
    enc = FakeEncoder({"*": E[0]}, E[0])
    cfg = {
        "max_score": 0.9,  # doc 0 (0.995) and doc 1 (0.89) against the caption: drops doc 0
        "pair_max_score": 0.999,  # against the pair's document: nothing is a near duplicate
        "diversity_threshold": 1.0,
        "search_k": 3,
        "n_train_docs": 3,
        "candidates": 3,
    }
    r = Retriever(bank, enc, cfg)
    assert r.prompt_docs(["a red circle"], k=3) == [[1, 2]]
    got = r.training_docs(
        ["a red circle"], np.zeros((1, 4, 4, 3)), [None], np.random.default_rng(0)
    )
    assert sorted(got[0]) == [0, 1, 2]
    tight = Retriever(bank, enc, {**cfg, "max_score": 1.0, "pair_max_score": 0.9})
    got = tight.training_docs(
        ["a red circle"], np.zeros((1, 4, 4, 3)), [None], np.random.default_rng(0)
    )
    assert sorted(got[0]) == [1, 2]  # now the training rule drops doc 0; prompts keep it
    assert tight.prompt_docs(["a red circle"], k=3) == [[0, 1, 2]]


def test_query_dropout_rate():
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in range(20))
    kept = [len(drop_words(text, 0.2, rng).split()) for _ in range(2000)]
    rate = 1 - np.mean(kept) / 20
    assert abs(rate - 0.2) < 0.01
    assert drop_words("single", 0.99, rng) == "single"  # at least one word stays
    assert drop_words(text, 0.0, rng) == text


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown retrieval keys"):
        RetrievalConfig.from_mapping({"max_scor": 0.9})


def lexical_bank(texts):
    """Docs 0..n-1: dense vectors that all favour doc 0 for the query (e0), texts as given."""
    vecs = [unit(1, 0.1 * i + 0.01, 0, 0, 0, 0) for i in range(len(texts))]
    return MemoryBank.build(
        np.stack(vecs), np.arange(len(texts)), encoder_name="fake", encoder_hash="f", texts=texts
    )


TEXTS = [
    "the batannim with a large purple diamond at the top left",
    "a small red circle on the left, on a white background",
    "the fenoldor with a small blue square at the top",
    "the fenoldor with a large red circle in the center",
    None,  # an image-only document: never matched lexically
]


def test_lexical_index_scores_exact_words():
    from lit_cm3leon.retrieval.lexical import LexicalIndex, terms

    assert terms("The ribafen, with a circle") == {
        "the", "ribafen", "with", "a", "circle", "the ribafen", "ribafen with", "with a", "a circle"
    }  # fmt: skip
    lex = LexicalIndex.build(TEXTS)
    scores, rows = lex.search(["the fenoldor with a small purple circle", "zzz unknown"], 3)
    assert set(rows[0, :2]) == {2, 3} and scores[0, 0] > scores[0, 2]  # the name decides
    assert (rows[1] == -1).all() and (scores[1] == 0).all()  # nothing shared: no match
    full = lex.score_all(["the fenoldor"])
    assert full.shape == (1, 5) and full[0, 4] == 0 and 0 < full[0, 2] <= 1


def test_hybrid_search_finds_the_named_document_dense_misses(tmp_path):
    """Dense alone ranks doc 0 first for every prompt; lexical_weight adds the exact name."""
    bank = lexical_bank(TEXTS)
    enc = FakeEncoder({"*": E[0]}, E[0])
    cfg = {"retrieve_k": 2, "max_score": 1.0, "diversity_threshold": 1.0, "search_k": 2}
    prompt = ["the fenoldor with a large green triangle"]
    assert Retriever(bank, enc, {**cfg, "lexical_weight": 0.0}).prompt_docs(prompt) == [[0, 1]]
    assert sorted(Retriever(bank, enc, {**cfg, "lexical_weight": 1.0}).prompt_docs(prompt)[0]) == [
        2,
        3,
    ]
    # the bank keeps its lexical rows across save / open, under the manifest's checksum
    bank.save(tmp_path / "bank")
    back = MemoryBank.open(tmp_path / "bank")
    assert back.manifest["lexical"] and len(back.lexical) == 5
    np.testing.assert_allclose(back.lexical.score_all(prompt), bank.lexical.score_all(prompt))
    (tmp_path / "bank" / "lexical.npz").unlink()
    with pytest.raises(FileNotFoundError, match="lexical.npz.*rebuild"):
        MemoryBank.open(tmp_path / "bank")


def test_inference_retrieves_with_the_strategy_the_decoder_was_trained_with(tmp_path):
    import json

    from lit_cm3leon.retrieval.bank_docs import default_strategy, trained_strategy

    assert trained_strategy(tmp_path) == default_strategy()  # no manifest: the defaults
    trained = {"lexical_weight": 1.0, "max_score": 0.5, "not_a_strategy_key": 3}
    manifest = {"stage": "pretrain", "config": {"data": {"retrieval": trained}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    got = trained_strategy(tmp_path)
    assert got["lexical_weight"] == 1.0 and got["max_score"] == 0.5
    assert "not_a_strategy_key" not in got and got["search_k"] == default_strategy()["search_k"]
