"""The multimodal vocabulary: one id space for text, image codes and special tokens.

Layout (contiguous, in this order)::

    [0, n_text)                      text BPE ids
    [n_text, n_text + n_image)       image code ids (VQ code c -> image_offset + c)
    then the specials                <pad> <bos> <eos> <break> <sep> <infill> <mask:0..7>
    then the location tokens         <loc:0..n_loc-1> (box coordinates, spatially grounded tasks)

A checkpoint records the vocabulary and its hash; loading one with another vocabulary is an
error that names both, so a model never silently reads ids it was not trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIALS = ("<pad>", "<bos>", "<eos>", "<break>", "<sep>", "<infill>")
N_MASKS = 8


class VocabMismatchError(ValueError):
    """Two artifacts disagree about the id space."""


@dataclass(frozen=True)
class Vocab:
    n_text: int  # entries of the text BPE
    n_image: int  # VQ codebook size
    image_h: int = 8  # tokens per image side (an image is image_h * image_w tokens)
    image_w: int = 8
    n_loc: int = 100  # location tokens <loc:0..n_loc-1>
    n_masks: int = N_MASKS

    def __post_init__(self) -> None:
        for name in ("n_text", "n_image", "image_h", "image_w"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Vocab.{name} must be positive, got {getattr(self, name)}")

    # --- offsets -------------------------------------------------------------------------
    @property
    def image_offset(self) -> int:
        return self.n_text

    @property
    def special_offset(self) -> int:
        return self.n_text + self.n_image

    @property
    def loc_offset(self) -> int:
        return self.special_offset + len(SPECIALS) + self.n_masks

    @property
    def size(self) -> int:
        return self.loc_offset + self.n_loc

    @property
    def image_tokens(self) -> int:
        return self.image_h * self.image_w

    # --- named ids -----------------------------------------------------------------------
    def special(self, name: str) -> int:
        return self.special_offset + SPECIALS.index(name)

    @property
    def pad(self) -> int:
        return self.special("<pad>")

    @property
    def bos(self) -> int:
        return self.special("<bos>")

    @property
    def eos(self) -> int:
        return self.special("<eos>")

    @property
    def brk(self) -> int:
        return self.special("<break>")

    @property
    def sep(self) -> int:
        return self.special("<sep>")

    @property
    def infill(self) -> int:
        return self.special("<infill>")

    def mask(self, i: int) -> int:
        if not 0 <= i < self.n_masks:
            raise ValueError(f"mask index {i} outside 0..{self.n_masks - 1}")
        return self.special_offset + len(SPECIALS) + i

    def loc(self, i: int) -> int:
        if not 0 <= i < self.n_loc:
            raise ValueError(f"location {i} outside 0..{self.n_loc - 1}")
        return self.loc_offset + i

    # --- classification ------------------------------------------------------------------
    def is_text(self, t: int) -> bool:
        return 0 <= t < self.n_text

    def is_image(self, t: int) -> bool:
        return self.image_offset <= t < self.special_offset

    def is_loc(self, t: int) -> bool:
        return self.loc_offset <= t < self.size

    def is_mask(self, t: int) -> bool:
        return self.mask(0) <= t <= self.mask(self.n_masks - 1)

    def token_name(self, t: int) -> str:
        """Readable name of a non-text id (for debugging and error messages)."""
        if self.is_image(t):
            return f"<img:{t - self.image_offset}>"
        if self.is_loc(t):
            return f"<loc:{t - self.loc_offset}>"
        if self.is_mask(t):
            return f"<mask:{t - self.mask(0)}>"
        if self.special_offset <= t < self.mask(0):
            return SPECIALS[t - self.special_offset]
        return f"<text:{t}>"

    # --- identity and persistence ------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def hash(self) -> str:
        blob = json.dumps({"specials": SPECIALS, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (
            f"Vocab(hash={self.hash}, size={self.size}, text={self.n_text}, image={self.n_image} "
            f"codes at {self.image_h}x{self.image_w}, loc={self.n_loc})"
        )

    def check_same(self, other: Vocab, what: str = "checkpoint") -> None:
        """Raise a VocabMismatchError naming both vocabularies when they differ."""
        if self != other:
            raise VocabMismatchError(
                f"The {what} was made with {other.describe()}, but this run uses "
                f"{self.describe()}. Rebuild the {what} with these tokenizers, or point the "
                f"run at the tokenizers it was made with."
            )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.to_dict(), "hash": self.hash}, indent=2))

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        vocab = cls(**fields)
        if "hash" in d and d["hash"] != vocab.hash:
            raise VocabMismatchError(
                f"vocabulary record says hash {d['hash']} but its fields give {vocab.hash}: "
                "the file was edited or comes from another version of lit_cm3leon"
            )
        return vocab

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no vocabulary at {path}: expected a vocab.json written by "
                "`python -m lit_cm3leon.prepare text-tokenizer` (outputs/text_tokenizer/vocab.json)"
            )
        return cls.from_dict(json.loads(path.read_text()))
