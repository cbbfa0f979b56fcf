"""Sequence builder: exact layout, truncation that never cuts an image, packing boundaries."""

import numpy as np
import pytest
import torch

from lit_cm3leon.objective.sequence import (
    attention_mask_from_doc_ids,
    build_sequence,
    pack,
    pair_document,
    pair_documents,
    pair_ids,
    sequence_length,
    split_sequence,
    trim_text,
    truncate,
)
from lit_cm3leon.tokenizer.codec import DocumentCodec
from lit_cm3leon.tokenizer.document import Document, Image, Text
from lit_cm3leon.tokenizer.text import TextTokenizer
from lit_cm3leon.tokenizer.vocab import Vocab

V = Vocab(n_text=50, n_image=32, image_h=4, image_w=4, n_loc=10)
IMG = V.image_offset + np.arange(16)  # one image: 16 ids


def is_image(t: int) -> bool:
    return V.is_image(int(t))


def image_runs_intact(x: np.ndarray) -> bool:
    """Every maximal run of image ids is a whole image (16 ids)."""
    flags = np.array([is_image(t) for t in x] + [False])
    runs, n = [], 0
    for f in flags:
        if f:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return all(r == V.image_tokens for r in runs)


def test_layout_exact():
    d1, d2, d3, q = [1, 2], [3, V.brk, *IMG], [4], [5, 6, V.brk, *IMG]
    x = build_sequence(q, [d1, d2, d3], V)
    expect = [V.bos, 1, 2, V.sep, 3, V.brk, *IMG, V.sep, 4, V.sep, 5, 6, V.brk, *IMG, V.eos]
    assert x.tolist() == [int(t) for t in expect]
    assert x.dtype == np.int64
    assert x.size == sequence_length(len(q), [len(d1), len(d2), len(d3)])
    assert build_sequence(q, [], V).tolist() == [V.bos, 5, 6, V.brk, *IMG.tolist(), V.eos]
    docs, query = split_sequence(x, V)
    assert [d.tolist() for d in docs] == [d1, [3, V.brk, *IMG.tolist()], d3]
    assert query.tolist() == [5, 6, V.brk, *IMG.tolist()]


def test_pair_documents_both_orders():
    codes = np.arange(16).reshape(4, 4)
    text_first, image_first = pair_documents("a red circle", codes)
    assert text_first == Document([Text("a red circle"), Image(codes)])
    assert image_first == Document([Image(codes), Text("a red circle")])
    assert pair_document("a red circle", codes, image_first=True) == image_first
    tok = TextTokenizer.train(["a red circle"] * 10, vocab_size=260)
    codec = DocumentCodec(tok, Vocab(n_text=tok.vocab_size, n_image=32, image_h=4, image_w=4))
    ids = pair_ids(codec, "a red circle", codes, image_first=True)
    v = codec.vocab
    assert ids.tolist() == [
        *(v.image_offset + codes.reshape(-1)).tolist(),
        v.brk,
        *tok.encode("a red circle"),
    ]


def test_truncation_drops_retrieved_then_trims_text_never_cuts_images():
    q = np.array([7] * 10 + [V.brk, *IMG])  # 27 ids
    d = [np.array([1] * 5 + [V.brk, *IMG]), np.array([2] * 3), np.array([*IMG, V.brk, 3, 3])]
    full = build_sequence(q, d, V)
    assert full.size == 2 + 27 + 23 + 4 + 20
    # room for q and the first retrieved doc only: later ones are dropped whole
    x = build_sequence(q, d, V, context_len=2 + 27 + 23 + 3)
    assert x.tolist() == build_sequence(q, d[:1], V).tolist()
    # room for q alone: no retrieved doc, query intact
    x = build_sequence(q, d, V, context_len=30)
    assert x.tolist() == build_sequence(q, [], V).tolist()
    # less room: the query's text is trimmed from its end, the image stays whole
    x = build_sequence(q, d, V, context_len=25)
    assert x.tolist() == [V.bos, *[7] * 6, V.brk, *IMG.tolist(), V.eos]
    # text run removed entirely along with its <break>
    x = build_sequence(q, d, V, context_len=18)
    assert x.tolist() == [V.bos, *IMG.tolist(), V.eos]
    with pytest.raises(ValueError, match="without any text"):
        build_sequence(q, d, V, context_len=17)


def test_truncation_random_never_cuts_an_image():
    rng = np.random.default_rng(0)
    for _ in range(300):

        def doc():
            parts = []
            for k in range(int(rng.integers(1, 4))):
                if k:
                    parts.append([V.brk])
                parts.append(
                    IMG if rng.random() < 0.5 else rng.integers(0, V.n_text, rng.integers(1, 20))
                )
            return np.concatenate(parts).astype(np.int64)

        q, docs = doc(), [doc() for _ in range(int(rng.integers(0, 4)))]
        ctx = int(rng.integers(20, 120))
        try:
            x = build_sequence(q, docs, V, context_len=ctx)
        except ValueError:
            n_img = int(sum(is_image(t) for t in q))
            assert n_img + 2 + (n_img // 16 - 1) > ctx  # images + <bos>/<eos> + breaks between them
            continue
        assert x.size <= ctx
        assert image_runs_intact(x)
        kept, query = split_sequence(x, V)
        assert [k.tolist() for k in kept] == [d.tolist() for d in docs[: len(kept)]]
        q_img = [t for t in q if is_image(t)]
        assert [t for t in query if is_image(t)] == q_img  # the query keeps all its images
        if len(kept) < len(docs) or query.size < q.size:
            assert sequence_length(q.size, [d.size for d in docs[: len(kept) + 1]]) > ctx


def test_trim_text_keeps_order_and_images():
    x = np.array([1, 2, 3, V.brk, *IMG, V.brk, 4, 5])
    assert x.size == 23
    assert trim_text(x, V, 23).tolist() == x.tolist()
    assert trim_text(x, V, 22).tolist() == [1, 2, 3, V.brk, *IMG.tolist(), V.brk, 4]
    assert trim_text(x, V, 21).tolist() == [1, 2, 3, V.brk, *IMG.tolist()]  # run and break go
    assert trim_text(x, V, 20).tolist() == [1, 2, 3, V.brk, *IMG.tolist()]
    assert trim_text(x, V, 19).tolist() == [1, 2, V.brk, *IMG.tolist()]
    q, kept = truncate(x, [x], V, 100)
    assert len(kept) == 1 and np.array_equal(q, x)


def test_pack_keeps_document_boundaries():
    seqs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 28), np.arange(30, 32)]
    ids, doc_ids, pos = pack(seqs, 10, pad_id=-7)
    assert ids.shape == doc_ids.shape == pos.shape == (2, 10)
    # first fit: row 0 = seq0 (5) + seq1 (3) + seq3 (2), row 1 = seq2 (8) + padding
    assert ids[0].tolist() == [1, 2, 3, 4, 5, 10, 11, 12, 30, 31]
    assert doc_ids[0].tolist() == [0] * 5 + [1] * 3 + [2] * 2
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert ids[1].tolist() == list(range(20, 28)) + [-7, -7]
    assert doc_ids[1].tolist() == [0] * 8 + [-1, -1]
    assert pos[1].tolist() == list(range(8)) + [0, 0]
    # every sequence is recovered from its doc id span
    recovered = sorted(
        tuple(ids[r][doc_ids[r] == d])
        for r in range(2)
        for d in range(3)
        if (doc_ids[r] == d).any()
    )
    assert recovered == sorted(tuple(s) for s in seqs)
    # per-token values pack the same way
    w, _, _ = pack([np.full(s.size, 0.5, np.float32) for s in seqs], 10, 0.0)
    assert w.dtype == np.float32 and np.array_equal(w > 0, doc_ids >= 0)
    with pytest.raises(ValueError, match="context_len=4"):
        pack(seqs, 4, 0)


def test_attention_mask_block_diagonal_causal():
    doc_ids = np.array([[0, 0, 1, 1, 1, -1]])
    m = attention_mask_from_doc_ids(doc_ids)
    assert m.shape == (1, 1, 6, 6) and m.dtype == torch.bool
    expect = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m[0, 0], expect)
    # packed attention equals attention on each sequence alone
    torch.manual_seed(0)
    q = torch.randn(1, 1, 6, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=m)
    alone = torch.nn.functional.scaled_dot_product_attention(
        q[..., 2:5, :], q[..., 2:5, :], q[..., 2:5, :], is_causal=True
    )
    assert torch.allclose(out[..., 2:5, :], alone, atol=1e-6)
    assert torch.isfinite(out).all()
