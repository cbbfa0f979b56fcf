"""The CPU training attention (``model.attention``) against SDPA, and the model's use of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_cm3leon.model.attention import block_causal_attention
from lit_cm3leon.objective.sequence import attention_mask_from_doc_ids
from lit_cm3leon.utils.malloc import keep_freed_memory

from .test_model import COPY, _model

torch.set_num_threads(1)


def _packed_doc_ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """Rows of sequences of random lengths, some ending in padding (-1)."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.full((B, T), -1)
    for b in range(B):
        at, n = 0, 0
        while at < T - 8:
            length = int(torch.randint(5, 40, (1,), generator=g))
            doc[b, at : at + length] = n
            at, n = at + length, n + 1
    return doc


def _masks(B: int, T: int) -> dict[str, torch.Tensor | None]:
    allowed = attention_mask_from_doc_ids(_packed_doc_ids(B, T))
    g = torch.Generator().manual_seed(1)
    bias = torch.where(torch.rand(B, 1, T, T, generator=g) < 0.05, 4.0, 0.0)
    return {
        "causal": None,
        "packed": allowed,
        "bias": bias.masked_fill(~allowed, float("-inf")),
    }


def _out_and_grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return [out, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("kind", ["causal", "packed", "bias"])
@pytest.mark.parametrize("block", [16, 64, 200])
def test_equals_sdpa_forward_and_backward(kind, block):
    """Output and gradients equal F.scaled_dot_product_attention's in float32, whatever the
    block size (T = 100 is no multiple of 16 or 64; 200 is one block)."""
    torch.manual_seed(0)
    B, H, T, D = 3, 4, 100, 16
    q, k, v, g = (torch.randn(B, H, T, D) for _ in range(4))
    mask = _masks(B, T)[kind]

    def ref(q, k, v):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    want = _out_and_grads(ref, q, k, v, g)
    got = _out_and_grads(lambda q, k, v: block_causal_attention(q, k, v, mask, block), q, k, v, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_bf16_error_matches_the_flash_kernel():
    """In bf16 the scores stay float32: the error against a float64 reference is within 1.3x
    of the flash kernel's (bf16 scores would double it)."""
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 256, 32
    q, k = (2 * torch.randn(B, H, T, D) for _ in range(2))
    v, g = (torch.randn(B, H, T, D) for _ in range(2))

    def err(fn):
        want = _out_and_grads(fn, *(t.double() for t in (q, k, v, g)))
        got = _out_and_grads(fn, *(t.bfloat16() for t in (q, k, v, g)))
        pairs = zip(got, want, strict=True)
        return [
            float((a.detach().double() - b.detach()).norm() / b.detach().norm()) for a, b in pairs
        ]

    flash = err(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    ours = err(block_causal_attention)
    for mine, theirs in zip(ours, flash, strict=True):
        assert mine < 1.3 * theirs


def test_a_mask_that_sees_later_keys_is_refused():
    T = 40
    mask = torch.ones(1, 1, T, T, dtype=torch.bool)  # bidirectional
    q = torch.randn(1, 2, T, 8)
    with pytest.raises(ValueError, match="see later keys"):
        block_causal_attention(q, q, q, mask, block=16)


def test_the_models_training_forward_uses_it_and_equals_inference():
    """With gradients (training) the model attends through the block attention; without them
    (evaluation) through SDPA: the same logits, packed rows and copy heads included; the
    gradients of a step equal those through SDPA alone."""
    model = _model(2, **COPY).double()
    B, T = 3, 48
    ids = torch.randint(0, 97, (B, T))
    doc = _packed_doc_ids(B, T, seed=3)
    positions = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for d in doc[b].unique():
            at = doc[b] == d
            positions[b, at] = torch.arange(int(at.sum()))
    mask = attention_mask_from_doc_ids(doc)
    calls = []
    import lit_cm3leon.model.transformer as tr

    real = tr.block_causal_attention

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    tr.block_causal_attention = counting
    try:
        train_logits = model(ids, positions=positions, attn_mask=mask)
        train_logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        assert len(calls) == 2 * model.config.n_layer  # copy heads and the rest, every layer
        tr.block_causal_attention = lambda q, k, v, m: F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=m if m is None or m.dtype == torch.bool else m.to(q.dtype),
            is_causal=m is None,
        )
        sdpa_logits = model(ids, positions=positions, attn_mask=mask)
        sdpa_logits.square().mean().backward()
    finally:
        tr.block_causal_attention = real
    with torch.no_grad():
        eval_logits = model(ids, positions=positions, attn_mask=mask)
    torch.testing.assert_close(train_logits, eval_logits)
    for p, want in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, want)


def test_keep_freed_memory_sets_glibc_malloc():
    """On Linux with glibc (this machine, CI) the settings are applied."""
    if "glibc" not in " ".join(__import__("platform").libc_ver()):
        pytest.skip("not glibc")
    assert keep_freed_memory() is True


@pytest.mark.parametrize("packed", [False, True])
def test_compiled_training_step_equals_eager(packed, monkeypatch):
    """Under torch.compile the training forward attends through the block attention too (its
    key starts then 0, the mask not read on the host): loss and gradients equal eager's."""
    import lit_cm3leon.model.transformer as tr

    torch.manual_seed(0)
    model = _model(2, **COPY)
    B, T = 2, 40
    ids = torch.randint(0, 97, (B, T))
    kw = {"attn_mask": attention_mask_from_doc_ids(_packed_doc_ids(B, T, seed=4))} if packed else {}

    def step(fn):
        model.zero_grad()
        loss = fn(ids, **kw).float().square().mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    torch.compiler.reset()
    want = step(model)
    calls = []  # appended to while dynamo traces the compiled forward
    monkeypatch.setattr(
        tr,
        "block_causal_attention",
        lambda *a, **k: (calls.append(1), block_causal_attention(*a, **k))[1],
    )
    got = step(torch.compile(model, fullgraph=True))
    assert len(calls) >= 2 * model.config.n_layer  # traced through it, not through SDPA
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
