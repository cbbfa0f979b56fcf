"""The CM3 causal-masked objective: move a few spans to the end of the sequence.

Format (after CM3, arXiv 2201.07520, with CM3Leon's ``<infill>`` marker)::

    x            = <bos> d1 <sep> q_a q_b q_c q_d q_e <eos>
    cm3(x)       = <bos> d1 <sep> q_a <mask:0> q_d <mask:1> <infill> <mask:0> q_b q_c <mask:1> q_e <eos>

- ``n ~ Poisson(poisson_rate)``, clipped to ``[0, max_spans]`` (``max_spans <= vocab.n_masks``);
  ``n = 0`` leaves the sequence untouched (plain causal language modelling, no ``<infill>``).
- A span is a contiguous run of one *segment*: a maximal run of text/location ids or of image
  ids. Spans therefore never cross ``<break> <sep> <bos> <eos>``, never hold a special id, and
  an image span is a row-major run of that image's codes. ``modality`` restricts the segments
  to text, image or either. Span length is uniform in ``[1, max(1, floor(max_span_frac * len))]``
  (also capped by ``max_span_len``), its segment is drawn with probability proportional to its
  length and its start uniformly. Spans neither overlap nor touch (at least one token between
  two spans), so no two masks are adjacent; a span that cannot be placed after a few tries is
  skipped, so very short sequences may get fewer than ``n`` spans.
- Each span is replaced in place by ``<mask:i>``, masks numbered ``0..n-1`` left to right.
- The infill section ``<infill> <mask:0> span_0 <mask:1> span_1 ...`` goes right before the
  last ``<eos>`` (appended at the end when there is none; only ids before that point are
  eligible). A span ends where the next ``<mask:i>`` or the first non-mask special begins.
- The model sees plain next-token prediction over the whole result; the CM3 sequence is
  ``1 + 2 n`` ids longer than its source (:attr:`CM3Transform.max_extra_tokens` bounds it).

:func:`uncm3` inverts the transform exactly, and also turns a generated infill back into a
complete sequence at inference.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Literal

import numpy as np

from lit_cm3leon.tokenizer.vocab import Vocab

Modality = Literal["any", "text", "image"]
_KIND_TEXT, _KIND_IMAGE = 1, 2


def _as_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of ids, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def token_kinds(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Per id: 1 text or location, 2 image, 0 anything else (specials, masks, out of range)."""
    kinds = np.zeros(ids.shape, dtype=np.int8)
    kinds[(ids >= 0) & (ids < vocab.n_text)] = _KIND_TEXT
    kinds[(ids >= vocab.loc_offset) & (ids < vocab.size)] = _KIND_TEXT
    kinds[(ids >= vocab.image_offset) & (ids < vocab.special_offset)] = _KIND_IMAGE
    return kinds


def segment_runs(
    ids: Sequence[int] | np.ndarray, vocab: Vocab, modality: Modality = "any"
) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` of the maximal same-modality runs of non-special ids."""
    kinds = token_kinds(_as_ids(ids), vocab)
    if modality == "text":
        keep = (_KIND_TEXT,)
    elif modality == "image":
        keep = (_KIND_IMAGE,)
    elif modality == "any":
        keep = (_KIND_TEXT, _KIND_IMAGE)
    else:
        raise ValueError(f"modality must be 'any', 'text' or 'image', got {modality!r}")
    padded = np.concatenate([[0], kinds, [0]])
    change = np.flatnonzero(padded[1:] != padded[:-1])  # run boundaries in kinds
    starts, ends = change[:-1], change[1:]
    run_kind = kinds[starts] if starts.size else np.zeros(0, np.int8)
    sel = np.isin(run_kind, keep)
    return starts[sel], (ends - starts)[sel]


def _infill_point(ids: np.ndarray, vocab: Vocab) -> int:
    eos = np.flatnonzero(ids == vocab.eos)
    return int(eos[-1]) if eos.size else int(ids.size)


def cm3(
    ids: Sequence[int] | np.ndarray,
    vocab: Vocab,
    rng: np.random.Generator,
    *,
    max_spans: int | None = None,
    poisson_rate: float = 1.0,
    max_span_frac: float = 0.5,
    max_span_len: int | None = None,
    modality: Modality = "any",
    tries: int = 10,
) -> np.ndarray:
    """Apply the CM3 transform once (see the module docstring for the exact format)."""
    x = _as_ids(ids)
    if np.any(x == vocab.infill):
        raise ValueError("the sequence already holds <infill>: CM3 is applied once, to clean ids")
    max_spans = vocab.n_masks if max_spans is None else max_spans
    if not 0 <= max_spans <= vocab.n_masks:
        raise ValueError(f"max_spans={max_spans} outside 0..{vocab.n_masks} (vocab.n_masks)")
    n = min(int(rng.poisson(poisson_rate)), max_spans)
    if n == 0:
        return x.copy()
    point = _infill_point(x, vocab)
    starts, lengths = segment_runs(x[:point], vocab, modality)
    if starts.size == 0:
        return x.copy()
    p = lengths / lengths.sum()
    spans: list[tuple[int, int]] = []  # [start, end)
    for _ in range(n):
        for _ in range(tries):
            r = int(rng.choice(starts.size, p=p)) if starts.size > 1 else 0
            seg_len = int(lengths[r])
            hi = max(1, int(max_span_frac * seg_len))
            if max_span_len is not None:
                hi = min(hi, max_span_len)
            length = int(rng.integers(1, hi + 1))
            s = int(starts[r]) + int(rng.integers(0, seg_len - length + 1))
            e = s + length
            if all(e < a or s > b for a, b in spans):  # no overlap, no touching
                spans.append((s, e))
                break
    if not spans:
        return x.copy()
    spans.sort()
    body: list[np.ndarray] = []
    tail: list[np.ndarray] = [np.array([vocab.infill], np.int64)]
    prev = 0
    for i, (s, e) in enumerate(spans):
        m = np.array([vocab.mask(i)], np.int64)
        body += [x[prev:s], m]
        tail += [m, x[s:e]]
        prev = e
    body.append(x[prev:point])
    return np.concatenate(body + tail + [x[point:]])


def uncm3(ids: Sequence[int] | np.ndarray, vocab: Vocab) -> np.ndarray:
    """Put the infilled spans back in place of their masks; the inverse of :func:`cm3`.

    A sequence without ``<infill>`` is returned as is. Raises ValueError when a mask of the
    body has no span in the infill section (or a span has no mask), e.g. an unfinished sample.
    """
    x = _as_ids(ids)
    where = np.flatnonzero(x == vocab.infill)
    if where.size == 0:
        return x.copy()
    k = int(where[0])
    body, rest = x[:k], x[k + 1 :]
    is_mask = (rest >= vocab.mask(0)) & (rest <= vocab.mask(vocab.n_masks - 1))
    other_special = (rest >= vocab.special_offset) & (rest < vocab.loc_offset) & ~is_mask
    stop = np.flatnonzero(other_special)
    end = int(stop[0]) if stop.size else int(rest.size)
    section, after = rest[:end], rest[end:]
    mpos = np.flatnonzero(is_mask[:end])
    if section.size and (mpos.size == 0 or mpos[0] != 0):
        raise ValueError("the infill section must start with <mask:i> right after <infill>")
    spans: dict[int, np.ndarray] = {}
    for j, a in enumerate(mpos):
        b = mpos[j + 1] if j + 1 < mpos.size else end
        i = int(section[a]) - vocab.mask(0)
        if i in spans:
            raise ValueError(f"<mask:{i}> appears twice in the infill section")
        spans[i] = section[a + 1 : b]
    body_masks = np.flatnonzero((body >= vocab.mask(0)) & (body <= vocab.mask(vocab.n_masks - 1)))
    found = [int(body[p]) - vocab.mask(0) for p in body_masks]
    if sorted(found) != sorted(spans):
        raise ValueError(
            f"masks in the body {found} do not match the infill section's {sorted(spans)}"
        )
    out: list[np.ndarray] = []
    prev = 0
    for p, i in zip(body_masks, found, strict=True):
        out += [body[prev:p], spans[i]]
        prev = int(p) + 1
    out += [body[prev:], after]
    return np.concatenate(out).astype(np.int64, copy=False)


class CM3Transform:
    """Seeded, picklable CM3 transform for data loaders: ``CM3Transform(vocab, ...)(ids)``.

    Each call draws from the transform's own generator; pass ``rng=`` for per-sample control
    (e.g. ``np.random.default_rng([seed, epoch, index])``). In a new process (a DataLoader
    worker) the generator is re-derived on first use from ``seed`` and the worker's torch seed
    (``get_worker_info().seed``, which differs per worker and per epoch and follows
    ``torch.manual_seed``/``seed_everything``), so workers never repeat each other's masks.
    """

    def __init__(
        self,
        vocab: Vocab,
        max_spans: int | None = None,
        poisson_rate: float = 1.0,
        max_span_frac: float = 0.5,
        max_span_len: int | None = None,
        modality: Modality = "any",
        seed: int = 0,
    ) -> None:
        self.vocab = vocab
        self.max_spans = vocab.n_masks if max_spans is None else int(max_spans)
        if not 0 <= self.max_spans <= vocab.n_masks:
            raise ValueError(f"max_spans={max_spans} outside 0..{vocab.n_masks} (vocab.n_masks)")
        if poisson_rate < 0:
            raise ValueError(f"poisson_rate must be >= 0, got {poisson_rate}")
        if not 0 < max_span_frac <= 1:
            raise ValueError(f"max_span_frac must be in (0, 1], got {max_span_frac}")
        if modality not in ("any", "text", "image"):
            raise ValueError(f"modality must be 'any', 'text' or 'image', got {modality!r}")
        if max_span_len is not None and max_span_len < 1:
            raise ValueError(f"max_span_len must be >= 1 or None, got {max_span_len}")
        self.poisson_rate = float(poisson_rate)
        self.max_span_frac = float(max_span_frac)
        self.max_span_len = max_span_len
        self.modality = modality
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._pid = os.getpid()

    @property
    def max_extra_tokens(self) -> int:
        """Upper bound on the growth of a sequence: ``<infill>`` plus two masks per span."""
        return 1 + 2 * self.max_spans

    def reseed(self, *key: int) -> None:
        """Restart the generator from ``[seed, *key]`` (non-negative ints)."""
        self.rng = np.random.default_rng([self.seed, *key])
        self._pid = os.getpid()

    def _check_process(self) -> None:
        if os.getpid() == self._pid:
            return
        torch = sys.modules.get("torch")  # only consult torch when the caller already uses it
        info = torch.utils.data.get_worker_info() if torch is not None else None
        self.reseed(int(info.seed) if info is not None else os.getpid())

    def __call__(
        self, ids: Sequence[int] | np.ndarray, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        if rng is None:
            self._check_process()
            rng = self.rng
        return cm3(
            ids,
            self.vocab,
            rng,
            max_spans=self.max_spans,
            poisson_rate=self.poisson_rate,
            max_span_frac=self.max_span_frac,
            max_span_len=self.max_span_len,
            modality=self.modality,
        )


def loss_weights(
    ids: Sequence[int] | np.ndarray,
    vocab: Vocab,
    query_weight: float = 1.0,
    retrieved_weight: float = 1.0,
    pad_weight: float = 0.0,
) -> np.ndarray:
    """Per-position weight of the loss on predicting ``ids[t]`` (float32, same length as ids).

    Default: 1.0 everywhere except ``<pad>`` (``pad_weight``), CM3Leon's uniform loss. RA-CM3's
    query up-weighting is ``query_weight > retrieved_weight``: the query document is everything
    after the last ``<sep>`` of the body; the retrieved documents, their ``<sep>``s and
    ``<bos>`` take ``retrieved_weight``. In a CM3 sequence each infilled span (with its mask)
    keeps the weight of the document it was cut from; ``<infill>`` and ``<eos>`` count as query.
    """
    x = _as_ids(ids)
    w = np.full(x.shape, query_weight, dtype=np.float32)
    infill = np.flatnonzero(x == vocab.infill)
    k = int(infill[0]) if infill.size else int(x.size)
    seps = np.flatnonzero(x[:k] == vocab.sep)
    if seps.size and query_weight != retrieved_weight:
        last_sep = int(seps[-1])
        w[: last_sep + 1] = retrieved_weight
        if infill.size:
            is_mask = (x >= vocab.mask(0)) & (x <= vocab.mask(vocab.n_masks - 1))
            origin = {int(x[p]): p < last_sep for p in np.flatnonzero(is_mask[:k])}
            current = query_weight
            for p in range(k + 1, x.size):
                t = int(x[p])
                if is_mask[p]:
                    current = retrieved_weight if origin.get(t, False) else query_weight
                elif vocab.special_offset <= t < vocab.loc_offset:
                    break  # end of the infill section
                w[p] = current
    w[x == vocab.pad] = pad_weight
    return w
