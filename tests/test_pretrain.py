"""Pretraining through the Hydra entry point on fixture shards: trains, resumes, publishes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_cm3leon.data.pretrain import PairSequences
from lit_cm3leon.data.shards import TokenShards
from lit_cm3leon.fit import train
from lit_cm3leon.objective.cm3 import CM3Transform
from lit_cm3leon.tokenizer.codec import DocumentCodec
from lit_cm3leon.tokenizer.text import TextTokenizer
from lit_cm3leon.tokenizer.vocab import Vocab
from lit_cm3leon.training.checkpoint import CheckpointError, load_decoder
from tests.fixtures import make_text_tokenizer, make_token_shards, tiny_pretrain_overrides


@pytest.fixture
def artifacts(tmp_path):
    out = tmp_path / "outputs"
    make_text_tokenizer(out / "text_tokenizer")
    make_token_shards(out / "tokens" / "shapes-train", 120)
    make_token_shards(out / "tokens" / "shapes-heldout", 20, seed=1)
    return out


def overrides(steps: int) -> list[str]:
    return tiny_pretrain_overrides(
        steps,
        "trainer.val_check_interval=10",
        "trainer.limit_val_batches=2",
        "module.warmup_steps=5",
        "module.lr=3e-3",
        "callbacks.model_checkpoint.every_n_train_steps=10",
        seq_len=64,
        batch_size=4,
    )


def test_sequences_are_deterministic_and_padded(artifacts):
    root = artifacts / "text_tokenizer"
    codec = DocumentCodec(TextTokenizer.load(root), Vocab.load(root / "vocab.json"))
    shards = TokenShards(artifacts / "tokens" / "shapes-train")
    cands = np.tile(np.arange(5), (len(shards), 1))
    ds = PairSequences(shards, codec, cands, seq_len=96, length=500, cm3=CM3Transform(codec.vocab))
    a, b = ds[17], ds[17]
    assert torch.equal(a["ids"], b["ids"]) and a["ids"].shape == (97,)
    assert not torch.equal(ds[17]["ids"], ds[18]["ids"])
    vocab = codec.vocab
    for i in range(30):
        item = ds[i]
        ids = item["ids"].tolist()
        n_sep = ids.count(vocab.sep)
        assert ids[0] == vocab.bos and n_sep <= 3
        pad_from = ids.index(vocab.pad) if vocab.pad in ids else len(ids)
        assert item["weights"][pad_from:].sum() == 0  # no loss on padding


def test_pretrain_fit_publishes_and_resumes(compose, artifacts, tmp_path):
    cfg = compose(overrides(20))
    metrics = train(cfg)
    assert metrics["train/loss"] < 6.0
    out = artifacts / "pretrain"
    model, vocab, record = load_decoder(
        out, vocab=Vocab.load(artifacts / "text_tokenizer" / "vocab.json")
    )
    assert record["step"] == 20 and (out / "manifest.json").is_file()
    last = tmp_path / "logs" / "pretrain" / "checkpoints" / "last.ckpt"
    torch.load(last, weights_only=True)  # plain containers only
    # a second run with a larger budget resumes from last.ckpt instead of starting over
    cfg = compose(overrides(30))
    train(cfg)
    assert load_decoder(out)[2]["step"] == 30


def test_checkpoint_of_other_vocab_is_refused(compose, artifacts):
    train(compose(overrides(2)))
    other = Vocab(n_text=10, n_image=16, image_h=4, image_w=4)
    with pytest.raises(ValueError, match="checkpoint"):
        load_decoder(artifacts / "pretrain", vocab=other)


def test_pickle_payload_checkpoint_is_refused(tmp_path):
    import os
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(CheckpointError, match="refuses"):
        load_decoder(path)
    assert not marker.exists()


def test_training_checkpoint_consolidates_to_a_published_decoder(compose, artifacts, tmp_path):
    from lit_cm3leon.consolidate import consolidate

    train(compose(overrides(10)))
    last = tmp_path / "logs" / "pretrain" / "checkpoints" / "last.ckpt"
    out = consolidate(last, tmp_path / "consolidated")
    a, _, _ = load_decoder(out)
    b, _, _ = load_decoder(artifacts / "pretrain")
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def shapes_datamodule(artifacts, tmp_path, **kw):
    """A PretrainDataModule over the shared artifacts' shards, with a bank, retriever and cache
    under ``tmp_path`` (the tests replace the retrieval itself)."""
    from lit_cm3leon.data.pretrain import PretrainDataModule

    return PretrainDataModule(
        tokens_dir=str(artifacts / "tokens" / "shapes-train"),
        heldout_tokens_dir=str(artifacts / "tokens" / "shapes-heldout"),
        text_tokenizer_dir=str(artifacts / "text_tokenizer"),
        index_dir=str(tmp_path / "index"),
        retriever_dir=str(tmp_path / "retriever"),
        cache_dir=str(tmp_path / "cache"),
        candidate_pool=4,
        **kw,
    )


def recording_search(calls: list, fill):
    """A stand-in for ``bank_docs.training_candidates`` that appends each call's (retriever,
    rows) to ``calls`` and gives those rows ``fill(rows, len(calls))``."""
    from lit_cm3leon.retrieval.bank_docs import UNSEARCHED

    def search(retriever, shards, pool, seed=0, rows=None, out=None, **kw):
        calls.append((retriever, np.asarray(rows)))
        if out is None:
            out = np.full((len(shards), pool), UNSEARCHED, dtype=np.int64)
        out[rows] = fill(np.asarray(rows), len(calls))
        return out

    return search


def test_candidate_cache_follows_the_bank_and_encoder_not_just_their_folders(
    artifacts, tmp_path, monkeypatch
):
    """Rebuilding the memory bank or retraining the retriever in place must not reuse
    candidates that were searched with the old ones (the folders' paths stay the same)."""
    from types import SimpleNamespace

    import lit_cm3leon.retrieval.bank_docs as bank_docs

    searches = []
    monkeypatch.setattr(
        bank_docs, "training_candidates", recording_search(searches, lambda rows, n: n)
    )
    dm = shapes_datamodule(artifacts, tmp_path, retrieval={"max_score": 0.98})
    shards = TokenShards(artifacts / "tokens" / "shapes-train")
    every = np.arange(len(shards))

    def retriever(checksum, encoder_hash):
        return SimpleNamespace(
            bank=SimpleNamespace(manifest={"checksum": checksum}),
            encoder=SimpleNamespace(hash=encoder_hash),
        )

    first = dm._train_candidates(shards, retriever("bank-a", "enc-a"), every)
    again = dm._train_candidates(shards, retriever("bank-a", "enc-a"), every)
    assert len(searches) == 1 and np.array_equal(first, again)  # same bank: cached
    rebuilt = dm._train_candidates(shards, retriever("bank-b", "enc-a"), every)
    assert len(searches) == 2 and rebuilt[0, 0] == 2  # rebuilt bank: searched again
    dm._train_candidates(shards, retriever("bank-b", "enc-b"), every)
    assert len(searches) == 3  # retrained encoder: searched again


def test_candidates_are_searched_only_for_the_pairs_a_run_reads(artifacts, tmp_path, monkeypatch):
    """A run of few steps searches only the pairs its sample stream reads; a longer run on the
    same cache searches only the pairs it adds, and every pair it reads has candidates."""
    from types import SimpleNamespace

    import lit_cm3leon.retrieval.bank_docs as bank_docs
    from lit_cm3leon.data.pretrain import PretrainDataModule

    calls = []  # each call's pairs get themselves as candidates
    monkeypatch.setattr(
        bank_docs, "training_candidates", recording_search(calls, lambda rows, n: rows[:, None])
    )
    monkeypatch.setattr(
        PretrainDataModule,
        "_retriever",
        lambda self: SimpleNamespace(
            bank=SimpleNamespace(manifest={"checksum": "bank"}),
            encoder=SimpleNamespace(hash="enc"),
        ),
    )
    monkeypatch.setattr(
        bank_docs, "prompt_rows", lambda r, bank, texts, k: np.zeros((len(texts), k), np.int64)
    )
    n = len(TokenShards(artifacts / "tokens" / "shapes-train"))

    def setup(max_steps):
        dm = shapes_datamodule(artifacts, tmp_path, batch_size=2, max_steps=max_steps, cm3=None)
        dm.setup("fit")
        return dm.train_ds, [rows for _, rows in calls]

    short, searched = setup(3)  # 6 items
    assert n > 6 and len(searched) == 1
    assert np.array_equal(searched[0], np.sort([short._row(i) for i in range(6)]))
    assert all(len(short[i]["ids"]) for i in range(6))  # every read pair has candidates
    unread = np.setdiff1d(np.arange(n), searched[0])
    assert (short.candidates[unread] == bank_docs.UNSEARCHED).all()
    short.candidates[short._row(0)] = bank_docs.UNSEARCHED
    with pytest.raises(RuntimeError, match="never searched"):
        short[0]
    longer, searched = setup(5)  # 10 items: only the 4 new pairs are searched
    assert len(searched) == 2 and len(searched[1]) == 4
    assert not np.isin(searched[1], searched[0]).any()
    read = {longer._row(i) for i in range(10)}
    assert set(np.concatenate(searched).tolist()) == read
    _, searched = setup(4)  # a shorter run on the same cache searches nothing
    assert len(searched) == 2


def test_prepare_data_searches_once_and_every_rank_reads_the_cache(
    artifacts, tmp_path, monkeypatch
):
    """Lightning runs ``prepare_data`` in one process per node, then ``setup`` on every rank:
    the search happens there, and a rank's ``setup`` (a fresh module) only reads the cache."""
    from types import SimpleNamespace

    import lit_cm3leon.retrieval.bank_docs as bank_docs
    from lit_cm3leon.data.pretrain import PretrainDataModule

    calls = []
    monkeypatch.setattr(
        bank_docs, "training_candidates", recording_search(calls, lambda rows, n: rows[:, None])
    )
    opened = []

    def retriever(self):
        opened.append(self)
        return SimpleNamespace(
            bank=SimpleNamespace(manifest={"checksum": "bank"}), encoder=SimpleNamespace(hash="enc")
        )

    monkeypatch.setattr(PretrainDataModule, "_retriever", retriever)
    monkeypatch.setattr(
        bank_docs, "prompt_rows", lambda r, bank, texts, k: np.zeros((len(texts), k), np.int64)
    )
    kw = dict(batch_size=2, max_steps=3, cm3=None)
    first = shapes_datamodule(artifacts, tmp_path, **kw)
    first.prepare_data()
    assert len(calls) == 1 and len(calls[0][1]) == 6
    first.setup("fit")  # the same process: nothing searched or opened again
    assert len(calls) == 1 and opened == [first]
    rank1 = shapes_datamodule(artifacts, tmp_path, **kw)
    rank1.setup("fit")
    assert len(calls) == 1  # read from the cache
    assert np.array_equal(rank1.train_ds.candidates, first.train_ds.candidates)
    assert all(len(rank1.train_ds[i]["ids"]) for i in range(6))


def _shapes_shards(root, indices, landmarks: int = 0):
    """A shapes-world shard folder (the layout `prepare tokenize --source shapes` writes) with
    random codes: enough for what the data reads from the records."""
    import json

    root.mkdir(parents=True)
    recs = [
        {"doc_id": i, "text": f"scene {i}", "source": "shapes", "split": "train", "index": i}
        | ({"landmarks": landmarks} if landmarks else {})
        for i in indices
    ]
    codes = np.random.default_rng(0).integers(0, 16, (len(recs), 4, 4)).astype(np.int16)
    np.savez(root / "shard-00000.npz", codes=codes, doc_id=np.array(indices, dtype=np.int64))
    (root / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    source = {"source": "shapes", "image_size": 32, "world_seed": 0}
    manifest = {"h": 4, "w": 4, "n_codes": 16, "count": len(recs), "source": source}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return TokenShards(root)


def test_box_captions_give_each_shape_its_box(artifacts, tmp_path):
    from lit_cm3leon.data.shapes import ShapesWorld
    from lit_cm3leon.data.templates import quantize_box

    root = artifacts / "text_tokenizer"
    codec = DocumentCodec(TextTokenizer.load(root), Vocab.load(root / "vocab.json"))
    vocab, world = codec.vocab, ShapesWorld(image_size=32, seed=0)
    shards = _shapes_shards(tmp_path / "scenes", list(range(12)))
    plain = PairSequences(shards, codec, None, seq_len=96, length=12, shuffle=False, cm3=None)
    boxed = PairSequences(
        shards, codec, None, seq_len=96, length=12, shuffle=False, cm3=None, box_caption_prob=1.0
    )
    for i in range(12):
        scene = world.scene("train", i)
        ids = boxed[i]["ids"].tolist()
        locs = [t - vocab.loc_offset for t in ids if vocab.loc_offset <= t < vocab.size]
        want = [q for b in world.boxes(scene) for q in quantize_box(b, 32, 32)]
        assert locs == want  # every shape's box, in the caption's order
        text = codec.decode_text([t for t in ids if vocab.is_text(t)])
        assert text.startswith("a ") and "on the" not in text and "at the" not in text
        assert not any(vocab.loc_offset <= t < vocab.size for t in plain[i]["ids"].tolist())
    with pytest.raises(ValueError, match="box_caption_prob"):
        PairSequences(shards, codec, None, seq_len=96, length=1, box_caption_prob=1.5)
    # landmark views (named scenes) and other sources keep their captions
    views = _shapes_shards(tmp_path / "views", [0, 1], landmarks=5)
    fixture = TokenShards(artifacts / "tokens" / "shapes-train")
    for s in (views, fixture):
        ds = PairSequences(
            s, codec, None, seq_len=96, length=2, shuffle=False, box_caption_prob=1.0
        )
        ref = PairSequences(s, codec, None, seq_len=96, length=2, shuffle=False)
        assert torch.equal(ds[0]["ids"], ref[0]["ids"])


def test_max_shapes_streams_only_the_small_scenes(artifacts, tmp_path):
    from lit_cm3leon.data.pretrain import scene_rows
    from lit_cm3leon.data.shapes import ShapesWorld

    root = artifacts / "text_tokenizer"
    codec = DocumentCodec(TextTokenizer.load(root), Vocab.load(root / "vocab.json"))
    world = ShapesWorld(image_size=32, seed=0)
    shards = _shapes_shards(tmp_path / "scenes", list(range(40)))
    counts = [len(world.scene("train", i).shapes) for i in range(40)]
    rows = scene_rows(shards, 1)
    assert rows.tolist() == [i for i, c in enumerate(counts) if c == 1] and 0 < len(rows) < 40
    ds = PairSequences(shards, codec, None, seq_len=96, length=3 * len(rows), rows=rows)
    read = [ds._row(i) for i in range(len(ds))]
    assert sorted(set(read)) == rows.tolist()  # every small scene, and only those, each epoch
    assert sorted(read[: len(rows)]) == rows.tolist()
    assert ds.rows_visited().tolist() == rows.tolist()
    short = PairSequences(shards, codec, None, seq_len=96, length=2, rows=rows)
    assert set(short.rows_visited().tolist()) <= set(rows.tolist())
    assert len(short.rows_visited()) == 2
    views = _shapes_shards(tmp_path / "views", [0, 1], landmarks=5)
    with pytest.raises(ValueError, match="no scene"):  # landmark views are not scenes
        scene_rows(views, 3)
    with pytest.raises(ValueError, match="shapes-world"):
        scene_rows(TokenShards(artifacts / "tokens" / "shapes-train"), 1)
