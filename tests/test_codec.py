"""Document codec: exact round trip on random documents, layout, and errors on invalid ids."""

import random

import numpy as np
import pytest

from lit_cm3leon.tokenizer.codec import DocumentCodec
from lit_cm3leon.tokenizer.document import Document, Image, Text
from lit_cm3leon.tokenizer.text import TextTokenizer
from lit_cm3leon.tokenizer.vocab import Vocab

WORDS = [
    "red",
    "blue",
    "circle",
    "square",
    " ",
    "  ",
    "\n",
    "日本",
    "🎉",
    "e\u0301",
    "?",
    "<loc",
    ">",
]


@pytest.fixture(scope="module")
def codec() -> DocumentCodec:
    tok = TextTokenizer.train(["a red circle and a blue square"] * 20, vocab_size=270)
    vocab = Vocab(n_text=tok.vocab_size, n_image=16, image_h=3, image_w=4, n_loc=20)
    return DocumentCodec(tok, vocab)


def random_text(rng: random.Random, n_loc: int) -> str:
    parts = []
    for _ in range(rng.randint(1, 8)):
        if rng.random() < 0.25:
            parts.append(f"<loc:{rng.randrange(n_loc)}>")
        else:
            parts.append(rng.choice(WORDS))
    return "".join(parts)


def random_document(rng: random.Random, vocab: Vocab) -> Document:
    segs = []
    for _ in range(rng.randint(1, 5)):
        if rng.random() < 0.5:  # adjacent images happen often
            codes = np.array(
                [
                    [rng.randrange(vocab.n_image) for _ in range(vocab.image_w)]
                    for _ in range(vocab.image_h)
                ]
            )
            segs.append(Image(codes))
        else:
            segs.append(Text(random_text(rng, vocab.n_loc)))
    return Document(segs)


def test_round_trip_random_documents(codec):
    rng = random.Random(1)
    v = codec.vocab
    for _ in range(300):
        doc = random_document(rng, v)
        ids = codec.encode(doc)
        assert all(0 <= i < v.size for i in ids)
        assert ids.count(v.brk) == len(doc.segments) - 1
        assert codec.decode(ids) == doc
        assert codec.decode(np.asarray(ids)) == doc


def test_layout_exact(codec):
    v = codec.vocab
    codes = np.arange(12).reshape(3, 4) % v.n_image
    doc = Document([Text("a<loc:7>b"), Image(codes), Image(codes[::-1].copy()), Text("<loc:0>")])
    ids = codec.encode(doc)
    a, b = codec.text.encode("a"), codec.text.encode("b")
    img1 = (codes.reshape(-1) + v.image_offset).tolist()
    img2 = (codes[::-1].reshape(-1) + v.image_offset).tolist()
    assert ids == a + [v.loc(7)] + b + [v.brk] + img1 + [v.brk] + img2 + [v.brk, v.loc(0)]
    assert codec.encode_image(codes) == img1
    assert codec.encode_text("a<loc:7>b") == a + [v.loc(7)] + b


def test_non_canonical_loc_markup_stays_text(codec):
    v = codec.vocab
    for s in ["<loc:07>", "<loc:-1>", "<loc:>", "<loc: 3>", "<LOC:3>"]:
        ids = codec.encode_text(s)
        assert not any(v.is_loc(i) for i in ids)
        assert codec.decode(ids) == Document([Text(s)])
    with pytest.raises(ValueError, match="loc:19"):
        codec.encode_text("<loc:25>")


def test_empty_text_segments_round_trip(codec):
    codes = np.zeros((3, 4), dtype=np.int64)
    doc = Document([Text(""), Image(codes), Text("")])
    assert codec.decode(codec.encode(doc)) == doc
    assert codec.decode([]) == Document([])


def test_invalid_ids_raise(codec):
    v = codec.vocab
    img = [v.image_offset + 1] * v.image_tokens
    text = codec.text.encode("red")
    with pytest.raises(ValueError, match="expects 3x4=12"):
        codec.decode(img[:-1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        codec.decode(text + [v.size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        codec.decode([-1])
    with pytest.raises(ValueError, match="<eos>"):
        codec.decode(text + [v.eos])
    with pytest.raises(ValueError, match="mixes image and text"):
        codec.decode(text + img)
    with pytest.raises(ValueError, match="expects 3x4=12"):
        codec.encode(Document([Image(np.zeros((2, 2), dtype=np.int64))]))
    with pytest.raises(ValueError, match="outside"):
        codec.encode(Document([Image(np.full((3, 4), v.n_image))]))


def test_non_strict_recovers(codec):
    v = codec.vocab
    text = codec.text.encode("red")
    img = [v.image_offset + 5] * 7
    doc = codec.decode(text + [v.eos, v.size + 3] + img + [v.brk] + text, strict=False)
    assert [type(s) for s in doc.segments] == [Text, Image, Text]
    assert doc.segments[0] == Text("red") and doc.segments[2] == Text("red")
    assert doc.segments[1].codes.shape == (3, 4) and (doc.segments[1].codes == 5).all()


def test_mismatched_tokenizer_and_vocab(codec):
    with pytest.raises(ValueError, match="n_text"):
        DocumentCodec(codec.text, Vocab(n_text=codec.vocab.n_text + 1, n_image=16))


def test_load_from_prepared_folder(codec, tmp_path):
    codec.text.save(tmp_path)
    codec.vocab.save(tmp_path / "vocab.json")
    again = DocumentCodec.load(tmp_path)
    doc = Document([Text("red <loc:3> circle"), Image(np.ones((3, 4), dtype=np.int64))])
    assert again.vocab == codec.vocab
    assert again.encode(doc) == codec.encode(doc)
