"""Memory bank: save/load gives identical results, shard merge, manifest checks, the CLI."""

import json

import numpy as np
import pytest
import torch

from lit_cm3leon.retrieval.index import BankMismatchError, MemoryBank, build_index, cli

torch.set_num_threads(1)


def rand_unit(n, d, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class FakeEnc:
    def __init__(self, name="enc", hash="abc", dim=16):
        self.name, self.hash, self.dim = name, hash, dim


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_save_open_identical_results(kind, tmp_path):
    vecs, q = rand_unit(3000, 16), rand_unit(50, 16, seed=1)
    bank = MemoryBank.build(
        vecs,
        np.arange(3000) * 7,
        has_image=np.arange(3000) % 3 > 0,
        encoder_name="enc",
        encoder_hash="abc",
        kind=kind,
        params={"pq_m": 4} if kind == "ivfpq" else None,
    )
    s1, r1 = bank.search(q, 8)
    bank.save(tmp_path / "bank")
    back = MemoryBank.open(tmp_path / "bank", FakeEnc())
    s2, r2 = back.search(q, 8)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(back.doc_ids, np.arange(3000) * 7)
    np.testing.assert_array_equal(back.multimodal, np.arange(3000) % 3 > 0)
    assert back.row_of(21) == 3 and back.row_of(5) == -1
    if kind != "ivfpq":  # stored vectors come back exactly (ivfpq: approximately)
        np.testing.assert_allclose(back.vectors([0, 5]), vecs[[0, 5]], atol=1e-6)
    assert back.manifest["count"] == 3000 and back.manifest["kind"] == kind


def test_flat_is_exact_and_ivf_shards_merge_like_one():
    vecs, q = rand_unit(4000, 16), rand_unit(20, 16, seed=2)
    flat = MemoryBank.build(vecs, np.arange(4000))
    s, r = flat.search(q, 5)
    want = np.argsort(-(q @ vecs.T), axis=1)[:, :5]
    np.testing.assert_array_equal(r, want)
    one = build_index([vecs], "ivf", {"nlist": 32, "nprobe": 4})
    three = build_index(
        [vecs[:1000], vecs[1000:2500], vecs[2500:]], "ivf", {"nlist": 32, "nprobe": 4}
    )
    np.testing.assert_array_equal(one.search(q, 5)[1], three.search(q, 5)[1])


def test_open_with_other_encoder_is_a_clear_error(tmp_path):
    MemoryBank.build(
        rand_unit(100, 16), np.arange(100), encoder_name="enc", encoder_hash="abc"
    ).save(tmp_path / "b")
    with pytest.raises(
        BankMismatchError, match=r"'enc' \(hash abc, dim 16\).*'other' \(hash zzz, dim 16\)"
    ):
        MemoryBank.open(tmp_path / "b", FakeEnc("other", "zzz"))
    with pytest.raises(BankMismatchError, match="dim 32"):
        MemoryBank.open(tmp_path / "b", FakeEnc("enc", "abc", 32))
    with pytest.raises(FileNotFoundError, match="prepare index"):
        MemoryBank.open(tmp_path / "nothing")
    with open(tmp_path / "b" / "meta.npz", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="checksum"):
        MemoryBank.open(tmp_path / "b")


def test_duplicate_doc_ids_rejected():
    with pytest.raises(ValueError, match="unique"):
        MemoryBank.build(rand_unit(4, 8), [1, 1, 2, 3])


@pytest.fixture(scope="module")
def saved_encoder(tmp_path_factory):
    from lit_cm3leon.retrieval.encoder import ClipEncoder

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("enc")
    enc = ClipEncoder.from_arch("shapes-clip")
    enc.save(d)
    return d, enc


STANDIN = json.dumps({"_target_": "lit_cm3leon.data.shapes.ShapesWorld", "seed": 0})


def test_cli_shapes_source(saved_encoder, tmp_path, capsys):
    d, enc = saved_encoder
    assert (
        cli(
            [
                "--encoder",
                str(d),
                "--source",
                "shapes",
                "--n",
                "40",
                "--world",
                STANDIN,
                "--out",
                str(tmp_path / "idx"),
                "--shard-size",
                "16",
            ]
        )
        == 0
    )
    bank = MemoryBank.open(tmp_path / "idx", enc)
    assert len(bank) == 40 and bank.multimodal.all()
    from lit_cm3leon.data.shapes import ShapesWorld

    s = ShapesWorld(seed=0).sample("train", 7)
    v = enc.embed_document(s.caption_long, s.image)
    scores, rows = bank.search(v[None], 1)
    assert bank.doc_ids[rows[0, 0]] == 7 and scores[0, 0] > 0.999


def test_cli_token_shards_with_files_and_bad_records(saved_encoder, tmp_path):
    from PIL import Image

    d, enc = saved_encoder
    tok = tmp_path / "tokens"
    tok.mkdir()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tok / "a.png")
    recs = [
        {"doc_id": 10, "text": "a grey picture", "image_path": "a.png"},
        {"doc_id": 11, "text": "text only"},
        {"doc_id": 12, "text": "broken", "image_path": "missing.png"},
    ]
    lines = [json.dumps(r) for r in recs] + ["{not json"]
    (tok / "shard-00003.jsonl").write_text("\n".join(lines) + "\n")
    assert cli(["--encoder", str(d), "--tokens", str(tok), "--out", str(tmp_path / "idx")]) == 0
    bank = MemoryBank.open(tmp_path / "idx", enc)
    assert bank.doc_ids.tolist() == [10, 11]
    assert bank.multimodal.tolist() == [True, False]
    assert bank.meta["shard"].tolist() == [3, 3] and bank.meta["row"].tolist() == [0, 1]
    assert bank.manifest["skipped"] == {"unreadable_image": 1, "bad_record": 1}
    with pytest.raises(FileNotFoundError, match="shard-"):
        cli(["--encoder", str(d), "--tokens", str(tmp_path), "--out", str(tmp_path / "x")])


def write_shapes_records(tok, indices, caption: str):
    """``tok/shard-00000.jsonl``: shapes-world records (re-rendered by index) with one caption."""
    from lit_cm3leon.data.shapes import ShapesWorld

    world = ShapesWorld(seed=0)
    tok.mkdir()
    recs = [
        {
            "doc_id": i,
            "text": getattr(world.sample("train", i), caption),
            "source": "shapes",
            "split": "train",
            "index": i,
        }
        for i in indices
    ]
    (tok / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return world


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_cli_shapes_token_shards_rerender_by_index(saved_encoder, tmp_path, precision):
    d, enc = saved_encoder
    tok = tmp_path / "tokens"
    world = write_shapes_records(tok, (5, 9, 2), "caption_short")
    argv = ["--encoder", str(d), "--tokens", str(tok), "--world", STANDIN]
    assert cli([*argv, "--out", str(tmp_path / "idx"), "--precision", precision]) == 0
    bank = MemoryBank.open(tmp_path / "idx", enc)
    assert bank.doc_ids.tolist() == [5, 9, 2] and bank.multimodal.all()
    assert bank.manifest["precision"] == precision
    s = world.sample("train", 9)
    got, want = bank.vectors([1])[0], enc.embed_document(s.caption_short, s.image)
    if precision == "32":
        np.testing.assert_allclose(got, want, atol=1e-5)
    else:  # bf16 autocast (the default): close to the float32 vector, not equal to it
        assert 0.99 < float(got @ want) < 1 - 1e-6


def test_modality_vectors_are_kept_checked_and_optional(saved_encoder, tmp_path):
    d, enc = saved_encoder
    tok = tmp_path / "tokens"
    tok.mkdir()
    recs = [{"doc_id": 3, "text": "a red circle"}, {"doc_id": 4, "text": "text only"}]
    (tok / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    argv = ["--encoder", str(d), "--tokens", str(tok), "--out", str(tmp_path / "idx")]
    assert cli([*argv, "--precision", "32"]) == 0
    bank = MemoryBank.open(tmp_path / "idx", enc)
    text, image = bank.modality_vectors([4, 3])
    np.testing.assert_allclose(text, enc.embed_text(["text only", "a red circle"]), atol=2e-3)
    assert not image.any()  # text-only documents: zero image vectors
    assert bank.modality_vectors([3, 99]) is None  # a document the bank does not hold
    (tmp_path / "idx" / "modalities.npz").write_bytes(b"not the vectors")
    with pytest.raises(ValueError, match="checksum"):
        MemoryBank.open(tmp_path / "idx", enc)
    assert cli([*argv, "--no-modality-vectors"]) == 0
    bank = MemoryBank.open(tmp_path / "idx", enc)
    assert bank.modalities is None and bank.modality_vectors([3]) is None
    assert not (tmp_path / "idx" / "modalities.npz").exists()


def bank_of_shapes_pairs(encoder_dir, tmp_path, n: int):
    """``n`` shapes pairs in ``tmp_path/tokens`` and a memory bank of them in ``tmp_path/idx``;
    returns their shards."""
    from lit_cm3leon.data.shards import TokenShards

    tok = tmp_path / "tokens"
    write_shapes_records(tok, range(n), "caption_long")
    np.savez(
        tok / "shard-00000.npz",
        codes=np.zeros((n, 4, 4), np.int16),
        doc_id=np.arange(n, dtype=np.int64),
    )
    (tok / "manifest.json").write_text(json.dumps({"h": 4, "w": 4, "n_codes": 16, "count": n}))
    # float32 vectors: the tests compare the bank's stored vectors with embedding again
    argv = ["--encoder", str(encoder_dir), "--tokens", str(tok), "--out", str(tmp_path / "idx")]
    assert cli([*argv, "--precision", "32"]) == 0
    return TokenShards(tok)


def test_a_pairs_training_candidates_do_not_depend_on_the_pairs_searched_with_it(
    saved_encoder, tmp_path
):
    """Searching some rows finds for them what searching every row finds (each pair draws its
    query dropout from its own generator); the rows not searched are marked, not empty."""
    import lit_cm3leon.retrieval.bank_docs as bank_docs

    d, enc = saved_encoder
    shards, n = bank_of_shapes_pairs(d, tmp_path, 40), 40
    retriever = bank_docs.open_retriever(tmp_path / "idx", d, {"query_dropout": 0.5})
    every = bank_docs.training_candidates(retriever, shards, pool=4, progress=False, batch=16)
    rows = np.array([3, 17, 18, 31])
    some = bank_docs.training_candidates(retriever, shards, pool=4, progress=False, rows=rows)
    assert (every >= 0).sum() > 2 * n
    assert np.array_equal(some[rows], every[rows])
    rest = np.setdiff1d(np.arange(n), rows)
    assert (some[rest] == bank_docs.UNSEARCHED).all()
    # filling in the rest later gives the whole search
    bank_docs.training_candidates(retriever, shards, pool=4, progress=False, rows=rest, out=some)
    assert np.array_equal(some, every)


def test_training_candidates_reuse_the_banks_vectors(saved_encoder, tmp_path, monkeypatch):
    """Candidate search with the bank's stored text and image vectors finds what embedding
    every pair again finds, without rendering a single image."""
    import lit_cm3leon.retrieval.bank_docs as bank_docs

    d, enc = saved_encoder
    shards, n = bank_of_shapes_pairs(d, tmp_path, 60), 60
    retriever = bank_docs.open_retriever(tmp_path / "idx", d)
    embedded = bank_docs.training_candidates(
        retriever, shards, pool=4, progress=False, reuse_bank_vectors=False
    )

    def no_rendering(*a, **k):
        raise AssertionError("images were rendered although the bank keeps their vectors")

    monkeypatch.setattr(bank_docs, "shard_images", no_rendering)
    stored = bank_docs.training_candidates(retriever, shards, pool=4, progress=False)
    assert (embedded >= 0).sum() > 2 * n and (embedded[:, 0] != np.arange(n)).all()
    # float16 storage may reorder near-ties, nothing more
    assert (embedded == stored).all(1).mean() >= 0.9
