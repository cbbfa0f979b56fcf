"""Document codec: a :class:`Document` to ids in the shared :class:`Vocab` space, and back.

Layout of one encoded document (no ``<bos>``/``<eos>``: the sequence builder adds those)::

    seg_0 <break> seg_1 <break> ... <break> seg_n

- a text segment is its BPE ids; inline ``<loc:N>`` markup (canonical decimal N, no leading
  zeros, ``0 <= N < vocab.n_loc``) becomes the single id ``vocab.loc(N)``;
- an image segment is ``vocab.image_offset + codes`` in row-major order, exactly
  ``vocab.image_tokens`` ids.

Every pair of consecutive segments is separated by ``<break>``, whatever their modalities (two
adjacent images, or two adjacent texts, stay two segments). A run between breaks is an image
when its ids are image ids, text otherwise. Decoding inverts encoding exactly for any document
whose segments are valid (one ambiguity: the document ``[Text("")]`` and the empty document
both encode to ``[]``, which decodes to the empty document).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lit_cm3leon.tokenizer.document import Document, Image, Text
from lit_cm3leon.tokenizer.text import VOCAB_FILE, TextTokenizer
from lit_cm3leon.tokenizer.vocab import Vocab

LOC_RE = re.compile(r"<loc:(0|[1-9][0-9]*)>")


class DocumentCodec:
    """Encode/decode documents with a text BPE and a multimodal vocabulary."""

    def __init__(self, text_tokenizer: TextTokenizer, vocab: Vocab) -> None:
        if text_tokenizer.vocab_size != vocab.n_text:
            raise ValueError(
                f"the text tokenizer has {text_tokenizer.vocab_size} entries but the vocabulary "
                f"expects n_text={vocab.n_text}: load the vocab.json written beside its tokenizer.json"
            )
        self.text = text_tokenizer
        self.vocab = vocab

    @classmethod
    def load(cls, directory: str | Path) -> DocumentCodec:
        """The codec of a ``prepare text-tokenizer`` folder (``tokenizer.json`` + ``vocab.json``)."""
        directory = Path(directory)
        return cls(TextTokenizer.load(directory), Vocab.load(directory / VOCAB_FILE))

    # --- encoding ------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """BPE ids of ``text`` with each ``<loc:N>`` marker replaced by ``vocab.loc(N)``."""
        ids: list[int] = []
        pos = 0
        for m in LOC_RE.finditer(text):
            n = int(m.group(1))
            if n >= self.vocab.n_loc:
                raise ValueError(
                    f"location marker {m.group(0)} outside <loc:0>..<loc:{self.vocab.n_loc - 1}>"
                )
            if m.start() > pos:
                ids.extend(self.text.encode(text[pos : m.start()]))
            ids.append(self.vocab.loc(n))
            pos = m.end()
        if pos < len(text):
            ids.extend(self.text.encode(text[pos:]))
        return ids

    def encode_image(self, codes: np.ndarray | Sequence[int]) -> list[int]:
        """Offset ids of a VQ code grid (row-major); must hold exactly ``vocab.image_tokens`` codes."""
        codes = np.asarray(codes)
        if codes.size != self.vocab.image_tokens:
            raise ValueError(
                f"an image has {codes.size} codes (shape {codes.shape}) but the vocabulary expects "
                f"{self.vocab.image_h}x{self.vocab.image_w}={self.vocab.image_tokens}"
            )
        flat = codes.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab.n_image):
            raise ValueError(
                f"image codes span [{flat.min()}, {flat.max()}] outside [0, {self.vocab.n_image})"
            )
        return (flat + self.vocab.image_offset).tolist()

    def encode(self, doc: Document) -> list[int]:
        ids: list[int] = []
        for k, seg in enumerate(doc.segments):
            if k:
                ids.append(self.vocab.brk)
            if isinstance(seg, Text):
                ids.extend(self.encode_text(seg.text))
            elif isinstance(seg, Image):
                ids.extend(self.encode_image(seg.codes))
            else:
                raise TypeError(f"segment {k} is a {type(seg).__name__}, expected Text or Image")
        return ids

    # --- decoding ------------------------------------------------------------------------
    def decode_text(self, ids: Iterable[int]) -> str:
        """Text ids (BPE and location ids) to a string with ``<loc:N>`` markup."""
        v = self.vocab
        out: list[str] = []
        run: list[int] = []
        for t in ids:
            t = int(t)
            if v.is_loc(t):
                if run:
                    out.append(self.text.decode(run))
                    run = []
                out.append(f"<loc:{t - v.loc_offset}>")
            elif v.is_text(t):
                run.append(t)
            else:
                raise ValueError(f"id {t} ({v.token_name(t)}) is not a text or location id")
        if run:
            out.append(self.text.decode(run))
        return "".join(out)

    def decode_image(self, ids: Sequence[int], strict: bool = True) -> np.ndarray:
        """Image ids to an ``int64[h, w]`` code grid.

        ``strict=False`` cuts a too-long run and pads a too-short one by repeating its last code
        (code 0 for an empty run), for model samples that stopped early.
        """
        v = self.vocab
        codes = np.asarray(ids, dtype=np.int64) - v.image_offset
        if codes.size != v.image_tokens:
            if strict:
                raise ValueError(
                    f"an image run has {codes.size} ids but the vocabulary expects "
                    f"{v.image_h}x{v.image_w}={v.image_tokens}"
                )
            fill = codes[-1] if codes.size else 0
            codes = np.concatenate([codes, np.full(v.image_tokens, fill, np.int64)])[
                : v.image_tokens
            ]
        return codes.reshape(v.image_h, v.image_w)

    def decode(self, ids: Iterable[int], strict: bool = True) -> Document:
        """Exact inverse of :meth:`encode`.

        With ``strict=True`` (default) any id that cannot come from :meth:`encode` raises a
        ValueError: out-of-range ids, specials other than ``<break>``, a run mixing image and
        text ids, or an image run of the wrong length. With ``strict=False`` those ids are
        dropped, mixed runs are split by modality and image runs are cut or padded, so the
        output of a model always yields some document.
        """
        v = self.vocab
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if arr.size == 0:
            return Document([])
        bad = (arr < 0) | (arr >= v.size)
        is_special = (arr >= v.special_offset) & (arr < v.loc_offset) & (arr != v.brk)
        if strict and (bad.any() or is_special.any()):
            i = int(np.flatnonzero(bad | is_special)[0])
            t = int(arr[i])
            what = "outside the vocabulary" if bad[i] else f"the special {v.token_name(t)}"
            raise ValueError(
                f"id {t} at position {i} is {what} (size {v.size}); a document holds text, "
                "location and image ids separated by <break>"
            )
        segments: list[Text | Image] = []
        breaks = np.flatnonzero(arr == v.brk)
        bounds = [-1, *breaks.tolist(), arr.size]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            run = arr[a + 1 : b]
            if not strict:
                run = run[~(bad[a + 1 : b] | is_special[a + 1 : b])]
            img = (run >= v.image_offset) & (run < v.special_offset)
            if run.size and img.all():
                segments.append(Image(self.decode_image(run, strict)))
            elif not img.any():
                segments.append(Text(self.decode_text(run)))
            elif strict:
                i = int(a + 1 + np.flatnonzero(img)[0])
                raise ValueError(
                    f"a segment mixes image and text ids (first image id at position {i}); "
                    "modalities must be separated by <break>"
                )
            else:  # split the mixed run into same-modality pieces
                cuts = np.flatnonzero(np.diff(img.astype(np.int8))) + 1
                for piece, piece_img in zip(np.split(run, cuts), np.split(img, cuts), strict=True):
                    if piece_img[0]:
                        segments.append(Image(self.decode_image(piece, strict=False)))
                    else:
                        segments.append(Text(self.decode_text(piece)))
        return Document(segments)
