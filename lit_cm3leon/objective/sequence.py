"""Sequence builder: retrieved documents and a query document in one token sequence.

Layout (RA-CM3 / CM3Leon)::

    <bos> d_1 <sep> d_2 <sep> ... d_k <sep> q <eos>        (k = 0: <bos> q <eos>)

Each ``d_i`` and ``q`` is an encoded document (``DocumentCodec.encode``: segments joined by
``<break>``). Truncation to a context length never cuts inside an image: whole retrieved
documents are dropped first (from the end of the list, which is taken to be in order of
preference), then text of the query is trimmed from the end of its last text run backwards.

Packing: several short sequences share one row of ``context_len`` ids. Packed sequences are
independent examples, so each attends only to itself: the attention mask is block-diagonal
causal (:func:`attention_mask_from_doc_ids`) and positions restart at 0 for each sequence.
Padding has ``doc_id = -1`` and attends only to the padding before it (never an empty row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lit_cm3leon.tokenizer.document import Document, Image, Text
from lit_cm3leon.tokenizer.vocab import Vocab

if TYPE_CHECKING:
    import torch

    from lit_cm3leon.tokenizer.codec import DocumentCodec

IdsLike = Sequence[int] | np.ndarray


def _ids(x: IdsLike) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of ids, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


# --- documents -----------------------------------------------------------------------------
def pair_document(caption: str, codes: np.ndarray, image_first: bool = False) -> Document:
    """An image-text pair as one document: ``caption <break> image`` or ``image <break> caption``."""
    text, image = Text(caption), Image(np.asarray(codes, dtype=np.int64))
    return Document([image, text] if image_first else [text, image])


def pair_documents(caption: str, codes: np.ndarray) -> tuple[Document, Document]:
    """Both modality orders: ``(text then image, image then text)``."""
    return pair_document(caption, codes, False), pair_document(caption, codes, True)


def pair_ids(
    codec: DocumentCodec, caption: str, codes: np.ndarray, image_first: bool = False
) -> np.ndarray:
    """Encoded :func:`pair_document`."""
    return np.asarray(codec.encode(pair_document(caption, codes, image_first)), dtype=np.int64)


# --- sequences -----------------------------------------------------------------------------
def sequence_length(query_len: int, retrieved_lens: Sequence[int]) -> int:
    """Length of :func:`build_sequence`'s output: ``<bos>``, one ``<sep>`` per document, ``<eos>``."""
    return 2 + int(query_len) + sum(int(n) + 1 for n in retrieved_lens)


def trim_text(ids: IdsLike, vocab: Vocab, max_len: int) -> np.ndarray:
    """Shorten a document to ``max_len`` ids by removing text, never image ids.

    Text ids are cut from the end of the last text run, then the run before it, and so on; a
    run that empties is removed together with its ``<break>``. Raises ValueError when the
    document's images and breaks alone exceed ``max_len``.
    """
    x = _ids(ids)
    excess = x.size - max_len
    if excess <= 0:
        return x.copy()
    breaks = np.flatnonzero(x == vocab.brk)
    bounds = [-1, *breaks.tolist(), x.size]
    runs = [x[a + 1 : b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    is_image = [
        r.size > 0 and bool(((r >= vocab.image_offset) & (r < vocab.special_offset)).all())
        for r in runs
    ]
    for i in range(len(runs) - 1, -1, -1):
        if excess <= 0:
            break
        if is_image[i]:
            continue
        cut = min(excess, runs[i].size)
        runs[i] = runs[i][: runs[i].size - cut]
        excess -= cut
        if runs[i].size == 0 and sum(r is not None for r in runs) > 1:
            runs[i] = None  # type: ignore[call-overload]
            excess -= 1  # its <break> goes too
    kept = [r for r in runs if r is not None]
    out = []
    for j, r in enumerate(kept):
        if j:
            out.append(np.array([vocab.brk], np.int64))
        out.append(r)
    y = np.concatenate(out) if out else np.zeros(0, np.int64)
    if y.size > max_len:
        raise ValueError(
            f"the document needs {y.size} ids without any text (its images and breaks), more "
            f"than the {max_len} available: raise the context length or use fewer image tokens"
        )
    return y


def truncate(
    query_ids: IdsLike, retrieved: Sequence[IdsLike], vocab: Vocab, context_len: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Fit ``<bos> d_1 <sep> ... q <eos>`` into ``context_len`` without cutting an image.

    Keeps the longest prefix of ``retrieved`` that fits beside the whole query; if the query
    alone does not fit, every retrieved document goes and the query's text is trimmed
    (:func:`trim_text`).
    """
    q = _ids(query_ids)
    docs = [_ids(d) for d in retrieved]
    if sequence_length(q.size, []) > context_len:
        return trim_text(q, vocab, context_len - 2), []
    kept: list[np.ndarray] = []
    total = sequence_length(q.size, [])
    for d in docs:
        if total + d.size + 1 > context_len:
            break
        kept.append(d)
        total += d.size + 1
    return q, kept


def build_sequence(
    query_ids: IdsLike,
    retrieved: Sequence[IdsLike],
    vocab: Vocab,
    context_len: int | None = None,
) -> np.ndarray:
    """``<bos> d_1 <sep> ... d_k <sep> q <eos>`` as int64 ids, truncated when ``context_len`` is set."""
    q = _ids(query_ids)
    docs = [_ids(d) for d in retrieved]
    if context_len is not None:
        q, docs = truncate(q, docs, vocab, context_len)
    parts: list[np.ndarray] = [np.array([vocab.bos], np.int64)]
    sep = np.array([vocab.sep], np.int64)
    for d in docs:
        parts += [d, sep]
    parts += [q, np.array([vocab.eos], np.int64)]
    return np.concatenate(parts)


def split_sequence(ids: IdsLike, vocab: Vocab) -> tuple[list[np.ndarray], np.ndarray]:
    """Inverse of :func:`build_sequence`: ``(retrieved documents, query document)``.

    Expects ``<bos> ... <eos>`` without an infill section (apply ``uncm3`` first).
    """
    x = _ids(ids)
    if x.size < 2 or x[0] != vocab.bos or x[-1] != vocab.eos:
        raise ValueError("a sequence starts with <bos> and ends with <eos>")
    inner = x[1:-1]
    seps = np.flatnonzero(inner == vocab.sep)
    parts = np.split(inner, seps)
    docs = [parts[0], *[p[1:] for p in parts[1:]]]
    return docs[:-1], docs[-1]


# --- packing -------------------------------------------------------------------------------
def pack(
    sequences: Sequence[IdsLike], context_len: int, pad_id: int | float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack sequences into rows of ``context_len``: ``(ids, doc_ids, positions)``, each ``[N, L]``.

    First fit in input order: each sequence goes to the first row with room, else a new row.
    ``doc_ids`` numbers the sequences of a row ``0, 1, ...`` (``-1`` on padding) and
    ``positions`` restart at 0 for each sequence (0 on padding). The layout depends only on the
    lengths, so per-token values (e.g. loss weights) pack the same way:
    ``pack(weights, context_len, 0.0)[0]``. ``ids`` keeps the dtype of the inputs.
    A sequence longer than ``context_len`` is a ValueError (truncate it first).
    """
    seqs = [np.asarray(s) for s in sequences]
    rows: list[list[int]] = []  # sequence indices per row
    room: list[int] = []
    for i, s in enumerate(seqs):
        if s.ndim != 1:
            raise ValueError(f"sequence {i} has shape {s.shape}, expected 1-D")
        if s.size > context_len:
            raise ValueError(
                f"sequence {i} has {s.size} ids, more than context_len={context_len}: "
                "truncate it (build_sequence(..., context_len=...)) before packing"
            )
        for r, free in enumerate(room):
            if s.size <= free:
                rows[r].append(i)
                room[r] -= s.size
                break
        else:
            rows.append([i])
            room.append(context_len - s.size)
    dtype = np.result_type(*[s.dtype for s in seqs]) if seqs else np.int64
    dtype = np.result_type(dtype, pad_id)  # a Python scalar pad keeps the sequences' dtype
    ids = np.full((len(rows), context_len), pad_id, dtype=dtype)
    doc_ids = np.full((len(rows), context_len), -1, dtype=np.int64)
    positions = np.zeros((len(rows), context_len), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for d, i in enumerate(members):
            n = seqs[i].size
            ids[r, at : at + n] = seqs[i]
            doc_ids[r, at : at + n] = d
            positions[r, at : at + n] = np.arange(n)
            at += n
    return ids, doc_ids, positions


def attention_mask_from_doc_ids(doc_ids: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Block-diagonal causal mask ``bool [N, 1, L, L]``: True where query i may attend key j.

    ``j <= i`` and both in the same packed sequence (padding, ``-1``, attends to earlier
    padding). This is the boolean ``attn_mask`` of ``F.scaled_dot_product_attention``.
    """
    import torch

    d = torch.as_tensor(doc_ids)
    if d.ndim != 2:
        raise ValueError(f"doc_ids must be [N, L], got shape {tuple(d.shape)}")
    length = d.shape[1]
    same = d[:, :, None] == d[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=d.device).tril()
    return (same & causal)[:, None]
