"""CM3 transform: format, segment boundaries, invertibility, span statistics, loss weights."""

import numpy as np
import pytest

from lit_cm3leon.objective.cm3 import CM3Transform, cm3, loss_weights, segment_runs, uncm3
from lit_cm3leon.objective.sequence import build_sequence
from lit_cm3leon.tokenizer.vocab import Vocab

VOCAB = Vocab(n_text=50, n_image=32, image_h=4, image_w=4, n_loc=10)


def random_doc_ids(
    rng: np.random.Generator, vocab: Vocab = VOCAB, max_segments: int = 4
) -> np.ndarray:
    parts = []
    for k in range(int(rng.integers(1, max_segments + 1))):
        if k:
            parts.append(np.array([vocab.brk]))
        if rng.random() < 0.5:
            parts.append(vocab.image_offset + rng.integers(0, vocab.n_image, vocab.image_tokens))
        else:
            text = rng.integers(0, vocab.n_text, int(rng.integers(1, 30)))
            locs = rng.random(text.size) < 0.1
            text[locs] = vocab.loc_offset + rng.integers(0, vocab.n_loc, int(locs.sum()))
            parts.append(text)
    return np.concatenate(parts).astype(np.int64)


V = VOCAB
BOUNDARIES = (V.brk, V.sep, V.bos, V.eos)


def random_sequence(rng):
    k = int(rng.integers(0, 4))
    return build_sequence(random_doc_ids(rng), [random_doc_ids(rng) for _ in range(k)], V)


def mask_ids(x):
    return [int(t) for t in x if V.is_mask(int(t))]


def test_exact_format_on_crafted_example():
    x = np.array([V.bos, 1, 2, 3, 4, 5, V.eos])

    class Scripted:  # n = 2 spans; integers() returns: length, offset, length, offset
        def __init__(self):
            self.calls = iter([2, 1, 1, 4])  # span [2, 3] at offset 1, span [5] at offset 4

        def poisson(self, rate):
            return 2

        def integers(self, lo, hi):
            return next(self.calls)

        def choice(self, n, p=None):
            return 0

    y = cm3(x, V, Scripted(), max_span_frac=0.5)
    m0, m1 = V.mask(0), V.mask(1)
    assert y.tolist() == [V.bos, 1, m0, 4, m1, V.infill, m0, 2, 3, m1, 5, V.eos]
    assert uncm3(y, V).tolist() == x.tolist()


def test_spans_stay_inside_segments_and_invert():
    rng = np.random.default_rng(0)
    t = CM3Transform(V, poisson_rate=2.0, seed=1)
    changed = 0
    for _ in range(500):
        x = random_sequence(rng)
        y = t(x)
        assert np.array_equal(uncm3(y, V), x)
        if y.size == x.size:
            assert np.array_equal(y, x)
            continue
        changed += 1
        k = int(np.flatnonzero(y == V.infill)[0])
        n = len(mask_ids(y[:k]))
        assert y.size == x.size + 1 + 2 * n <= x.size + t.max_extra_tokens
        assert mask_ids(y[:k]) == [V.mask(i) for i in range(n)]  # numbered left to right
        assert y[-1] == V.eos and x[-1] == V.eos
        # boundaries survive in the body in the same order: no span crossed one
        body_bounds = [int(v) for v in y[:k] if int(v) in BOUNDARIES]
        assert body_bounds == [int(v) for v in x[:-1] if int(v) in BOUNDARIES]
        # each span holds no special id and a single modality
        section = y[k + 1 : -1]
        cuts = np.flatnonzero([V.is_mask(int(v)) for v in section])
        for a, b in zip(cuts, [*cuts[1:], section.size], strict=True):
            span = section[a + 1 : b]
            assert span.size >= 1
            kinds = {"img" if V.is_image(int(v)) else "txt" for v in span}
            assert len(kinds) == 1
            assert all(V.is_text(int(v)) or V.is_loc(int(v)) or V.is_image(int(v)) for v in span)
    assert changed > 300


def test_modality_restriction():
    rng = np.random.default_rng(1)
    for modality, ok in (("text", lambda t: not V.is_image(t)), ("image", V.is_image)):
        t = CM3Transform(V, poisson_rate=3.0, modality=modality, seed=2)
        for _ in range(200):
            x = random_sequence(rng)
            y = t(x)
            if V.infill in y:
                k = int(np.flatnonzero(y == V.infill)[0])
                span_ids = [int(v) for v in y[k + 1 : -1] if not V.is_mask(int(v))]
                assert span_ids and all(ok(v) for v in span_ids)


def test_span_count_follows_poisson():
    rng = np.random.default_rng(3)
    long_doc = build_sequence(
        np.concatenate([rng.integers(0, V.n_text, 400), [V.brk], V.image_offset + np.arange(16)]),
        [],
        V,
    )
    for rate in (1.0, 2.5):
        t = CM3Transform(V, poisson_rate=rate, max_span_frac=0.05, seed=4)
        counts = np.array([len(mask_ids(t(long_doc))) // 2 for _ in range(3000)])
        assert abs(counts.mean() - rate) < 0.1, (rate, counts.mean())
        assert abs(counts.var() - rate) < 0.25 * rate
        assert (counts == 0).mean() == pytest.approx(np.exp(-rate), abs=0.03)
        assert counts.max() <= V.n_masks


def test_zero_spans_and_clipping():
    x = build_sequence(np.arange(20), [], V)
    assert np.array_equal(CM3Transform(V, poisson_rate=0.0)(x), x)
    assert np.array_equal(CM3Transform(V, max_spans=0, poisson_rate=5.0)(x), x)
    t = CM3Transform(V, max_spans=2, poisson_rate=50.0, max_span_frac=0.1)
    assert all(len(mask_ids(t(x))) == 4 for _ in range(20))
    with pytest.raises(ValueError, match="max_spans"):
        CM3Transform(V, max_spans=V.n_masks + 1)
    only_specials = np.array([V.bos, V.brk, V.eos])
    assert np.array_equal(CM3Transform(V, poisson_rate=5.0)(only_specials), only_specials)


def test_seeded_and_rng_argument_reproducible():
    x = build_sequence(np.arange(40), [np.arange(10)], V)
    t1, t2 = CM3Transform(V, seed=7, poisson_rate=2), CM3Transform(V, seed=7, poisson_rate=2)
    a, b = [t1(x) for _ in range(20)], [t2(x) for _ in range(20)]
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert len({tuple(u) for u in a}) > 5  # successive calls differ
    t = CM3Transform(V, poisson_rate=2)
    r1 = t(x, rng=np.random.default_rng([1, 2]))
    r2 = t(x, rng=np.random.default_rng([1, 2]))
    assert np.array_equal(r1, r2)


def test_no_eos_appends_at_end_and_uncm3_errors():
    x = np.arange(30)
    y = CM3Transform(V, poisson_rate=50.0, max_spans=3, seed=0)(x)
    assert V.infill in y and np.array_equal(uncm3(y, V), x)
    with pytest.raises(ValueError, match="already holds <infill>"):
        cm3(y, V, np.random.default_rng(0))
    bad = np.array([1, V.mask(0), 2, V.infill, V.mask(1), 5, V.eos])
    with pytest.raises(ValueError, match="do not match"):
        uncm3(bad, V)


def test_segment_runs():
    x = np.array(
        [V.bos, 1, V.loc(2), 3, V.brk, V.image_offset, V.image_offset + 1, V.sep, 4, V.eos]
    )
    s, n = segment_runs(x, V)
    assert s.tolist() == [1, 5, 8] and n.tolist() == [3, 2, 1]
    s, n = segment_runs(x, V, "image")
    assert s.tolist() == [5] and n.tolist() == [2]


def test_loss_weights_default_ones_and_query_upweighting():
    rng = np.random.default_rng(5)
    t = CM3Transform(V, poisson_rate=3.0, seed=0)
    for _ in range(50):
        x = t(random_sequence(rng))
        assert np.array_equal(loss_weights(x, V), np.ones(x.size, np.float32))
    d, q = [10, 11, V.brk, 12], [20, 21, 22, 23]
    x = build_sequence(q, [d], V)  # <bos> d <sep> q <eos>
    w = loss_weights(x, V, query_weight=2.0, retrieved_weight=0.5)
    assert w.tolist() == [0.5] * 6 + [2.0] * 5
    # a span cut from d keeps d's weight in the infill section; one from q keeps q's
    y = np.array(
        [
            V.bos,
            10,
            V.mask(0),
            V.brk,
            12,
            V.sep,
            20,
            V.mask(1),
            23,
            V.infill,
            V.mask(0),
            11,
            V.mask(1),
            21,
            22,
            V.eos,
            V.pad,
        ]
    )
    assert np.array_equal(uncm3(y[:-1], V), x)
    w = loss_weights(y, V, query_weight=2.0, retrieved_weight=0.5)
    assert w.tolist() == [0.5] * 6 + [2.0] * 4 + [0.5, 0.5] + [2.0] * 4 + [0.0]


def test_dataloader_workers_draw_different_masks():
    import torch
    from torch.utils.data import DataLoader, Dataset

    x = build_sequence(np.arange(40), [], V)
    t = CM3Transform(V, poisson_rate=3.0, seed=0)

    class Repeat(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.from_numpy(t(x)[:48].copy())

    def run():
        torch.manual_seed(123)
        loader = DataLoader(Repeat(), batch_size=None, num_workers=2, collate_fn=None)
        return [tuple(b.tolist()) for b in loader]

    a = run()
    # worker 0 serves items 0,2,4,6 and worker 1 items 1,3,5,7: their streams differ
    assert a[0::2] != a[1::2]
    assert run() == a  # and follow torch's seed
