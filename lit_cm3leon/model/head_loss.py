"""The training loss of the LM head without its logits: cross-entropy computed over chunks of rows.

A training step's logits are the largest activation of the step at a large vocabulary
(tokens x vocabulary; float32 for the softmax: 38 MB at 1,024 tokens and 9,330 ids, 1.06 GB at
the paper's 4,096 tokens and 64,626 ids), and the plain path writes and reads them several times:
the head's matmul, the float32 copy, log-softmax, its backward, the gradient's cast. :func:`head_loss`
computes, per chunk of rows, the logits (the head's matmul in the autocast dtype, as
``lm_head`` would), their float32 log-softmax and cross-entropy, and at once the gradient
of the weighted loss with respect to the logits (softmax minus one-hot, times the row's weight),
which it turns into the gradients of the hidden states and of the head's weight right away. Only
those are kept for the backward pass, which scales them by the incoming gradient. The same
function and the same dtypes as ``F.cross_entropy(lm_head(h).float())``, the logits never whole
(``tests/test_head_loss.py`` checks loss and gradients against that path). On 2 CPU cores the
step time is about the plain path's (README); what it saves is memory, which grows with tokens x
vocabulary.

The copy logit (``ModelConfig.copy_logit``) adds a gate value to one logit per row: ``copy_index``
(-1 for none) and ``copy_value``, whose gradient is that logit's.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 21  # logits per chunk: 8 MB in float32


def add_copy_logit(logits: Tensor, index: Tensor, value: Tensor) -> Tensor:
    """``logits`` [..., V] with ``value`` [...] added at column ``index`` [...] of each row
    (none where ``index`` is -1): the copy logit, at the token each position may copy."""
    value = value.to(logits.dtype) * (index >= 0)
    return logits.scatter_add(-1, index.clamp(min=0)[..., None], value[..., None])


@torch.compiler.disable  # its chunk loop depends on the row count: traced, every new count recompiles
def head_loss(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    row_weights: Tensor,
    copy_index: Tensor | None = None,
    copy_value: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy (float32 [N], no gradient) and ``sum(row_weights * ce)``.

    ``h`` [N, d] final hidden states, ``weight`` [V, d] the head's, ``targets`` [N] ids,
    ``row_weights`` [N] (0 drops a row; the caller normalises), ``copy_index`` / ``copy_value``
    [N] the copy logit's column and value per row (-1: none)."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with torch.autocast(device, enabled=False):  # the dtypes below are deliberate
        loss, ce = _HeadLoss.apply(h, weight, targets, row_weights, copy_index, copy_value, dtype)
    return ce, loss


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, row_weights, copy_index, copy_value, dtype):
        N, V = h.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_copy = copy_value is not None and ctx.needs_input_grad[5]
        hc, wc = h.to(dtype), weight.to(dtype)
        ce = torch.empty(N, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(hc) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_copy = torch.zeros(N, dtype=torch.float32, device=h.device) if need_copy else None
        rows = max(1, CHUNK_ELEMENTS // V)
        for s in range(0, N, rows):
            e = min(N, s + rows)
            z = torch.matmul(hc[s:e], wc.t()).float()  # [n, V]
            if copy_index is not None:
                z = add_copy_logit(z, copy_index[s:e], copy_value[s:e])
            logp = torch.log_softmax(z, -1)
            del z
            tgt = targets[s:e, None]
            ce[s:e] = -logp.gather(1, tgt).squeeze(1)
            if not (need_h or need_w or need_copy):
                continue
            g = logp.exp_()  # softmax
            g.scatter_add_(1, tgt, torch.full((e - s, 1), -1.0, device=g.device))  # minus one-hot
            g.mul_(row_weights[s:e, None].float())  # d loss / d logits
            if need_copy:
                index = copy_index[s:e]
                grad_copy[s:e] = g.gather(1, index.clamp(min=0)[:, None]).squeeze(1) * (index >= 0)
            g = g.to(dtype)
            if need_h:
                grad_h[s:e] = torch.matmul(g, wc)
            if need_w:
                grad_w += torch.matmul(g.t(), hc[s:e])
        ctx.save_for_backward(grad_h, grad_w, grad_copy)
        ctx.dtypes = h.dtype, copy_value.dtype if copy_value is not None else None
        ctx.mark_non_differentiable(ce)
        return (ce * row_weights.float()).sum(), ce

    @staticmethod
    def backward(ctx, d_loss, d_ce):
        grad_h, grad_w, grad_copy = ctx.saved_tensors
        h_dtype, copy_dtype = ctx.dtypes
        out_h = (grad_h * d_loss).to(h_dtype) if grad_h is not None else None
        out_w = grad_w * d_loss if grad_w is not None else None
        out_copy = (grad_copy * d_loss).to(copy_dtype) if grad_copy is not None else None
        return out_h, out_w, None, None, None, out_copy, None
