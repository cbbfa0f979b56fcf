"""The head's chunked loss equals cross-entropy on the whole logits, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_cm3leon.model import ModelConfig, build_model
from lit_cm3leon.model import head_loss as head_loss_module
from lit_cm3leon.model.head_loss import head_loss
from lit_cm3leon.tokenizer.vocab import Vocab


def reference(h, weight, targets, row_weights, copy_index=None, copy_value=None):
    logits = (h @ weight.t()).float()
    if copy_index is not None:
        value = copy_value.float() * (copy_index >= 0)
        logits = logits.scatter_add(1, copy_index.clamp(min=0)[:, None], value[:, None])
    ce = F.cross_entropy(logits, targets, reduction="none")
    return ce, (ce * row_weights).sum()


def inputs(n=50, d=16, v=37, seed=0, copy=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    row_weights = torch.rand(n, generator=g) * (torch.rand(n, generator=g) > 0.3)
    extra = ()
    if copy:
        index = torch.randint(-1, v, (n,), generator=g)
        value = torch.randn(n, generator=g).requires_grad_()
        extra = (index, value)
    return (h, w, targets, row_weights, *extra)


def grads(fn, args):
    ce, loss = fn(*args)
    (2.5 * loss).backward()  # an incoming gradient other than 1
    out = [a.grad.clone() for a in args if isinstance(a, torch.Tensor) and a.grad is not None]
    for a in args:
        if isinstance(a, torch.Tensor):
            a.grad = None
    return ce.detach(), loss.detach(), out


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("chunk", [1 << 21, 37 * 7])  # one chunk; chunks of 7 rows
def test_head_loss_matches_cross_entropy_of_the_logits(monkeypatch, copy, chunk):
    monkeypatch.setattr(head_loss_module, "CHUNK_ELEMENTS", chunk)
    args = inputs(copy=copy)
    ce, loss, g = grads(head_loss, args)
    ce_ref, loss_ref, g_ref = grads(reference, args)
    torch.testing.assert_close(ce, ce_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    assert len(g) == len(g_ref) == (3 if copy else 2)
    for a, b in zip(g, g_ref, strict=True):
        assert float(b.abs().max()) > 1e-3  # a real gradient to compare
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_head_loss_under_bf16_autocast_keeps_the_heads_dtypes():
    """Under autocast the logits come from a bf16 matmul, as ``lm_head`` would make them, and
    the loss is float32; the reference is the same computation on whole logits."""
    h, w, targets, row_weights = inputs(n=40, d=32, v=53, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, loss = head_loss(h, w, targets, row_weights)
        logits = F.linear(h, w)
    assert logits.dtype == torch.bfloat16 and ce.dtype == torch.float32
    ce_ref = F.cross_entropy(logits.float(), targets, reduction="none")
    torch.testing.assert_close(ce, ce_ref, atol=1e-6, rtol=1e-6)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(h, w)
    (F.cross_entropy(logits.float(), targets, reduction="none") * row_weights).sum().backward()
    assert gh.dtype == h.grad.dtype == torch.float32
    torch.testing.assert_close(gh, h.grad, atol=2e-3, rtol=2e-2)  # bf16 rounding of the chunks
    torch.testing.assert_close(gw, w.grad, atol=2e-3, rtol=2e-2)


def test_head_loss_without_gradients_keeps_none():
    h, w, targets, row_weights = inputs()
    with torch.no_grad():
        ce, loss = head_loss(h, w, targets, row_weights)
    ce_ref, loss_ref = reference(h.detach(), w.detach(), targets, row_weights)
    torch.testing.assert_close(loss, loss_ref)
    assert not loss.requires_grad


def test_head_loss_backward_twice_accumulates_twice():
    """The kept gradients are scaled, not overwritten: a retained graph's second backward adds
    the same gradient again."""
    h, w, targets, row_weights = inputs()
    _, loss = head_loss(h, w, targets, row_weights)
    loss.backward(retain_graph=True)
    once = h.grad.clone(), w.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * once[0])
    torch.testing.assert_close(w.grad, 2 * once[1])


@pytest.mark.parametrize("copy_logit", [False, True])
def test_model_loss_equals_the_cross_entropy_of_its_logits(copy_logit):
    """``CM3LeonTransformer.loss`` (the training path) against ``forward``'s logits, with a cell
    embedding and copy heads (as the shapes preset has them), and the copy logit on or off."""
    vocab = Vocab(n_text=60, n_image=16, image_h=3, image_w=3)
    cfg = ModelConfig.preset(
        "debug", copy_heads=2, copy_logit=copy_logit, cell_embedding=True
    ).for_vocab(vocab)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab.size, (3, 41), generator=g)
    image = torch.randint(0, 16, (3, 9), generator=g) + vocab.image_offset
    ids[:, 5:14], ids[:, 20:29] = image, image  # an image and its repeat: copy targets
    inputs_, targets = ids[:, :-1], ids[:, 1:]
    weights = (torch.rand(3, 40, generator=g) > 0.2).float()
    ce, loss = model.loss(inputs_, targets, weights / weights.sum())
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(inputs_)
    ce_ref = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    loss_ref = (ce_ref * weights.flatten()).sum() / weights.sum()
    loss_ref.backward()
    torch.testing.assert_close(ce, ce_ref.view_as(targets).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    if copy_logit:
        assert float(model.copy_gate.weight.grad.abs().max()) > 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
