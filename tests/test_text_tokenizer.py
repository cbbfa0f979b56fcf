"""Byte-level BPE: exact round trip on arbitrary Unicode, persistence, the prepare CLI."""

import json
import random

import pytest

from lit_cm3leon.tokenizer.text import TextTokenizer, cli
from lit_cm3leon.tokenizer.vocab import Vocab

CORPUS = [
    "a red circle above a blue square",
    "what color is the triangle? green",
    "make the square yellow",
    "two shapes: a small green triangle and a large red circle",
] * 50

# code point ranges: ASCII, Latin-1, combining marks, Greek/Cyrillic, CJK, Hangul, emoji,
# variation selectors/ZWJ, supplementary planes
RANGES = [
    (0x00, 0x7F),
    (0x80, 0xFF),
    (0x300, 0x36F),
    (0x370, 0x4FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0x1F300, 0x1FAFF),
    (0xFE00, 0xFE0F),
    (0x200B, 0x200D),
    (0x10000, 0x10FFFF),
]
WHITESPACE = [" ", "  ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", "   \t "]


def random_unicode(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        if rng.random() < 0.2:
            out.append(rng.choice(WHITESPACE))
            continue
        lo, hi = rng.choice(RANGES)
        cp = rng.randint(lo, hi)
        if 0xD800 <= cp <= 0xDFFF:  # lone surrogates are not Unicode scalar values
            cp = 0x41
        out.append(chr(cp))
    return "".join(out)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CORPUS, vocab_size=300)


def test_trained_vocab_covers_bytes_and_merges(tok):
    assert 256 < tok.vocab_size <= 300
    # frequent words become few tokens: merges were learned
    assert len(tok.encode(" circle")) < len(b" circle")


def test_round_trip_arbitrary_unicode(tok):
    rng = random.Random(0)
    fixed = [
        "",
        " ",
        "  leading and trailing  ",
        "e\u0301\u0302",
        "日本語の文",
        "👩‍👩‍👧 🏳️‍🌈 👍🏽",
        "\x00\x01\x7f",
        "a\r\nb",
        "<loc:3> not special in the BPE",
        "\ufeffbom",
    ]
    for s in fixed + [random_unicode(rng, rng.randint(0, 60)) for _ in range(300)]:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s


def test_no_special_tokens_inside_bpe(tok):
    # markup is plain text to the BPE: several byte tokens, no dedicated id
    assert len(tok.encode("<break>")) > 1
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])


def test_save_load_same_ids(tok, tmp_path):
    tok.save(tmp_path)
    again = TextTokenizer.load(tmp_path)
    s = "a large red circle 🎉"
    assert again.encode(s) == tok.encode(s)
    assert again.hash == tok.hash and again.vocab_size == tok.vocab_size


def test_load_missing_names_path_and_command(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        TextTokenizer.load(tmp_path / "nope")
    msg = str(e.value)
    assert str(tmp_path / "nope" / "tokenizer.json") in msg
    assert "prepare text-tokenizer" in msg


def test_train_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="256"):
        TextTokenizer.train(CORPUS, vocab_size=100)


def test_cli_with_corpus_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n\n")
    out = tmp_path / "tt"
    rc = cli(
        [
            "--out",
            str(out),
            "--vocab-size",
            "280",
            "--corpus",
            str(corpus),
            "--image-codes",
            "64",
            "--image-hw",
            "4",
            "4",
        ]
    )
    assert rc == 0
    tok = TextTokenizer.load(out)
    vocab = Vocab.load(out / "vocab.json")
    assert vocab.n_text == tok.vocab_size and vocab.n_image == 64
    assert (vocab.image_h, vocab.image_w) == (4, 4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab_hash"] == vocab.hash
    assert manifest["lines"] == len(CORPUS)
    assert manifest["tokenizer_hash"] == tok.hash


def test_cli_directory_corpus_and_missing_corpus(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    (d / "a.txt").write_text("\n".join(CORPUS[:100]))
    (d / "b.txt").write_text("\n".join(CORPUS[100:]))
    assert cli(["--out", str(tmp_path / "o"), "--vocab-size", "260", "--corpus", str(d)]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["lines"] == len(CORPUS)
    with pytest.raises(SystemExit):
        cli(["--out", str(tmp_path / "o2"), "--corpus", str(tmp_path / "missing.txt")])


def test_default_corpus_reads_shapes_world_fields(monkeypatch, tmp_path):
    import sys
    import types
    from dataclasses import dataclass

    @dataclass
    class QA:
        question: str
        answer: str
        qtype: str

    class FakeWorld:
        def __init__(self, seed=0, **kw):
            self.seed, self.kw = seed, kw
            assert set(kw) <= {"grid", "max_shapes"}

        def sample(self, split, i):
            assert split == "train"
            return types.SimpleNamespace(
                caption_short=f"short {i}",
                caption_long=f"a long caption {i}",
                vqa=[QA(f"question {i}?", "red", "color")],
                edit=types.SimpleNamespace(instruction=f"make shape {i} blue"),
            )

    fake = types.ModuleType("lit_cm3leon.data.shapes")
    fake.ShapesWorld = FakeWorld
    monkeypatch.setitem(sys.modules, "lit_cm3leon.data.shapes", fake)
    from lit_cm3leon.tokenizer.text import shapes_corpus

    lines = list(shapes_corpus(num_samples=3))
    assert lines[:5] == ["short 0", "a long caption 0", "question 0?", "red", "make shape 0 blue"]
    assert len(lines) == 15
    argv = ["--out", str(tmp_path), "--vocab-size", "260", "--shapes-samples", "50"]
    assert cli(argv + ["--shapes-grid", "4"]) == 0
    corpus = json.loads((tmp_path / "manifest.json").read_text())["corpus"]
    assert corpus == {"kind": "shapes", "samples": 50, "seed": 0, "grid": 4}


def test_default_corpus_without_shapes_world_says_what_to_do(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "lit_cm3leon.data.shapes", None)  # import fails
    with pytest.raises(ImportError, match="--corpus"):
        cli(["--out", str(tmp_path)])


def test_default_vocabulary_matches_the_shapes_image_tokenizer(tmp_path):
    # The main command builds the vocabulary before the image tokenizer exists; its defaults
    # must describe the shapes preset's code grid, or every later stage refuses the pair.
    from lit_cm3leon.tokenizer.text import cli
    from lit_cm3leon.tokenizer.vocab import Vocab
    from lit_cm3leon.tokenizer.vqgan import PRESETS

    assert cli(["--out", str(tmp_path / "tt"), "--shapes-samples", "200"]) == 0
    v, shapes = Vocab.load(tmp_path / "tt" / "vocab.json"), PRESETS["shapes"]
    assert (v.n_image, v.image_h, v.image_w) == (shapes.n_embed, *(2 * [shapes.latent_size]))
