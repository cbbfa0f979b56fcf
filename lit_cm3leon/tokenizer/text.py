"""Text tokenizer: byte-level BPE trained with the ``tokenizers`` library.

Byte-level means every string is first turned into its UTF-8 bytes, so any Unicode text (emoji,
CJK, combining marks, control characters, runs of whitespace) encodes and decodes back exactly:
``decode(encode(s)) == s``. No normalizer, no prefix space, no special tokens: the BPE only
covers text ids ``[0, vocab_size)``. The special tokens (``<bos> <break> <mask:i>`` ...) and the
location tokens live in :class:`~lit_cm3leon.tokenizer.vocab.Vocab`, after the image codes.

Build one with::

    python -m lit_cm3leon.prepare text-tokenizer --out outputs/text_tokenizer --vocab-size 1024

which writes ``tokenizer.json`` (the BPE), ``vocab.json`` (the multimodal :class:`Vocab`) and
``manifest.json`` (what made them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lit_cm3leon.tokenizer.vocab import Vocab

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MANIFEST_FILE = "manifest.json"
BUILD_COMMAND = "python -m lit_cm3leon.prepare text-tokenizer --out {out} --vocab-size 1024"


class TextTokenizer:
    """Byte-level BPE over text ids ``[0, vocab_size)``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        if tokenizer.get_added_tokens_decoder():
            raise ValueError(
                "the text BPE must carry no added/special tokens (they belong to Vocab); "
                f"found {sorted(t.content for t in tokenizer.get_added_tokens_decoder().values())}"
            )
        self._tok = tokenizer
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=False)
        ids = tokenizer.get_vocab(with_added_tokens=False).values()
        if sorted(ids) != list(range(self._vocab_size)):
            raise ValueError("the text BPE ids are not the dense range [0, vocab_size)")

    # --- construction --------------------------------------------------------------------
    @staticmethod
    def _empty() -> Tokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        return tok

    @classmethod
    def train(cls, corpus: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
        """Learn merges on ``corpus`` (one string per item) up to ``vocab_size`` entries.

        The 256 byte symbols are always in the vocabulary, so ``vocab_size`` must be at least
        256; a small corpus may stop short of ``vocab_size`` (read ``.vocab_size`` after).
        """
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
        tok = cls._empty()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer=trainer)
        return cls(tok)

    # --- use -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of :meth:`encode`; ids that do not form valid UTF-8 decode to U+FFFD."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"text id {i} outside [0, {self._vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    # --- persistence ---------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self._tok.save(str(path))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> TextTokenizer:
        directory = Path(directory)
        path = directory / TOKENIZER_FILE if directory.suffix != ".json" else directory
        if not path.is_file():
            raise FileNotFoundError(
                f"no text tokenizer at {path}: expected the {TOKENIZER_FILE} written by "
                f"`{BUILD_COMMAND.format(out=path.parent)}`"
            )
        return cls(Tokenizer.from_file(str(path)))

    @property
    def hash(self) -> str:
        """Content hash of the BPE (merges and vocabulary), for manifests."""
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]


# --- corpora -------------------------------------------------------------------------------
def read_corpus(path: str | Path) -> Iterator[str]:
    """Non-empty lines of a ``.txt`` file, or of every ``*.txt`` under a directory (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no *.txt files under corpus directory {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"corpus {path} is neither a .txt file nor a directory of them")
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.rstrip("\n")
                if line.strip():
                    yield line


def shapes_corpus(num_samples: int = 2000, seed: int = 0, **world_kwargs) -> Iterator[str]:
    """Captions, questions, answers and edit instructions of the shapes world's train split."""
    try:
        from lit_cm3leon.data.shapes import ShapesWorld
    except ImportError as e:  # the shapes world ships in lit_cm3leon.data.shapes
        raise ImportError(
            "the default text-tokenizer corpus is the shapes world (lit_cm3leon.data.shapes), "
            f"which could not be imported ({e}); pass --corpus FILE_OR_DIR_OF_TXT instead"
        ) from e
    world = ShapesWorld(seed=seed, **world_kwargs)
    for i in range(num_samples):
        s = world.sample("train", i)
        yield s.caption_short
        yield s.caption_long
        for qa in s.vqa:
            yield qa.question
            yield qa.answer
        edit = getattr(s, "edit", None)
        instruction = getattr(edit, "instruction", None)
        if instruction:
            yield instruction


# --- CLI -----------------------------------------------------------------------------------
def cli(argv: list[str] | None = None) -> int:
    """``prepare text-tokenizer``: train the BPE, write tokenizer.json, vocab.json, manifest.json."""
    p = argparse.ArgumentParser(
        prog="python -m lit_cm3leon.prepare text-tokenizer",
        description="Train the byte-level BPE and write the multimodal vocabulary.",
    )
    p.add_argument("--out", default="outputs/text_tokenizer", help="output directory")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE entries (>= 256)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count to merge")
    p.add_argument(
        "--corpus",
        default=None,
        help="a .txt file or a directory of .txt files (default: the shapes world's texts)",
    )
    p.add_argument(
        "--shapes-samples", type=int, default=2000, help="shapes samples for the default corpus"
    )
    p.add_argument("--seed", type=int, default=0, help="shapes world seed for the default corpus")
    p.add_argument(
        "--shapes-grid", type=int, default=None, help="shapes world grid (default: its own)"
    )
    p.add_argument(
        "--shapes-max-shapes", type=int, default=None, help="shapes per scene (default: its own)"
    )
    p.add_argument(
        "--image-codes",
        type=int,
        default=2048,
        help="VQ codebook size (n_image); 2048 = the shapes VQGAN preset's n_embed",
    )
    p.add_argument(
        "--image-hw",
        type=int,
        nargs=2,
        default=(8, 8),
        metavar=("H", "W"),
        help="tokens per image side",
    )
    args = p.parse_args(argv)

    if args.vocab_size < 256:
        p.error(f"--vocab-size must be >= 256 (the byte alphabet), got {args.vocab_size}")
    if args.corpus is not None and not Path(args.corpus).exists():
        p.error(f"--corpus {args.corpus} does not exist (a .txt file or a directory of .txt files)")

    if args.corpus is None:
        world_kwargs = {
            k: v
            for k, v in (("grid", args.shapes_grid), ("max_shapes", args.shapes_max_shapes))
            if v is not None
        }
        lines = list(shapes_corpus(args.shapes_samples, args.seed, **world_kwargs))
        source = {
            "kind": "shapes",
            "samples": args.shapes_samples,
            "seed": args.seed,
            **world_kwargs,
        }
    else:
        lines = list(read_corpus(args.corpus))
        source = {"kind": "files", "path": str(args.corpus)}
    if not lines:
        print(f"error: the corpus ({source}) has no non-empty lines", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    tok = TextTokenizer.train(lines, args.vocab_size, args.min_frequency)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    tok.save(out)
    vocab = Vocab(
        n_text=tok.vocab_size,
        n_image=args.image_codes,
        image_h=args.image_hw[0],
        image_w=args.image_hw[1],
    )
    vocab.save(out / VOCAB_FILE)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(lines))
    n_chars = sum(len(s) for s in lines)
    manifest = {
        "stage": "text_tokenizer",
        "command": "python -m lit_cm3leon.prepare text-tokenizer " + " ".join(argv or sys.argv[1:]),
        "corpus": source,
        "lines": len(lines),
        "chars": n_chars,
        "tokens": n_tokens,
        "chars_per_token": round(n_chars / max(n_tokens, 1), 4),
        "requested_vocab_size": args.vocab_size,
        "vocab_size": tok.vocab_size,
        "min_frequency": args.min_frequency,
        "train_seconds": round(seconds, 3),
        "tokenizer_hash": tok.hash,
        "vocab": vocab.to_dict(),
        "vocab_hash": vocab.hash,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    print(
        f"text tokenizer: {tok.vocab_size} entries from {len(lines)} lines in {seconds:.2f}s "
        f"({manifest['chars_per_token']} chars/token) -> {out}; {vocab.describe()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
