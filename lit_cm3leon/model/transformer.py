"""The CM3Leon decoder: a decoder-only transformer after the paper (OPT-style).

Choices taken from the paper (arXiv 2309.02591, section 3):

* no bias terms, no dropout, layer norms without learnable parameters;
* learned absolute positional embeddings, initialised with std 0.0002;
* every other weight truncated-normal with std 0.006, cut at 3 std;
* the output projection (untied from the token embedding) initialised to zero;
* pre-LN blocks with a GELU MLP of width 4 d.

Optional and not in the paper (``ModelConfig.cell_embedding``, on for the shapes presets): a
learned embedding per image-grid cell added to each image token, the cell being the token's
index in its run of image tokens (:func:`image_cells`). On the shapes world it cut held-out
image perplexity from 205 to 74 (850 vs 1,200 steps): with absolute positions alone the model
did not learn where in the grid a token sits, nor to look up the same cell in another image.

Optional and not in the paper (``ModelConfig.copy_heads``, 2 in the ``shapes`` preset): in the first
``copy_heads`` heads of each layer, an image token's attention logit to every earlier image token
in the cell it predicts gets ``+copy_bias`` (:meth:`CM3LeonTransformer._copy_mask`), so copying
from a retrieved image or an edit's source is one head away from the first step. On the copy
task (``eval/copy_task.py``) nothing is copied in 1,200 steps without them; with 2 heads biased
by 8 the repeat's loss leaves chance at step 200.

Optional and not in the paper (``ModelConfig.copy_logit``, off): an image token adds a learned
gate to the logit of the token the copy heads align it to (:meth:`CM3LeonTransformer._copy_logits`),
a pointer: on the tests' repeat task its loss is 0.13 after 30 steps, where the copy heads
alone are still at chance.

Optional and not in the paper (``ModelConfig.ground_boxes``, on in the ``shapes`` preset): box
grounding through the copy heads. An image token whose predicted cell lies in a box written as
four ``<loc:...>`` tokens gets ``+copy_bias`` on that box's text (its location tokens and the
description before them, :func:`text_boxes`), so "what goes in this cell" is one head away. It
has no weights; pretraining sees no boxes, so it acts from the first spatial SFT example.

Attention runs through ``F.scaled_dot_product_attention``, except for a training step on the
CPU (gradients; eager or compiled), which runs :func:`attention.block_causal_attention` (the
same function, faster there; its module doc). Decoding uses a preallocated
:class:`KVCache`. Rows may be left-padded: :func:`positions_from_mask` gives each row positions
0, 1, ... for its real tokens, and :func:`attention_mask` hides the pads.

Shape letters: ``B`` batch, ``T`` new (query) positions, ``S`` key positions (cache + new),
``C`` = ``d_model``, ``H`` heads, ``Dh`` head dim, ``V`` vocabulary.

Only torch and the config are imported; parallelism (FSDP, compile) lives in ``parallelize.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import block_causal_attention
from .config import ModelConfig
from .head_loss import add_copy_logit, head_loss

# ---------------------------------------------------------------------------------------------
# masks and positions for left-padded batches
# ---------------------------------------------------------------------------------------------


def positions_from_mask(key_mask: Tensor) -> Tensor:
    """Positions [B, S] from a validity mask [B, S] (True = real token, False = pad).

    A left-padded row ``[pad pad a b c]`` gets ``[0 0 0 1 2]``: its real tokens start at 0,
    exactly as they would without padding. Pads get 0 (they are never attended to).
    """
    return (key_mask.long().cumsum(-1) - 1).clamp_(min=0)


def attention_mask(key_mask: Tensor, n_query: int) -> Tensor:
    """Bool mask [B, 1, T, S] (True = may attend) for the last ``T = n_query`` of ``S`` keys.

    Causal over the key axis and hiding pads. A pad query is allowed to see itself so that no
    row of the softmax is empty (its output is never used).
    """
    B, S = key_mask.shape
    q_pos = torch.arange(S - n_query, S, device=key_mask.device)
    k_pos = torch.arange(S, device=key_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    mask = causal[None] & key_mask[:, None, :]  # [B, T, S]
    mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
    return mask[:, None]


def image_cells(is_image: Tensor, run0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Index of each image token within its run of consecutive image tokens [B, T].

    ``is_image`` [B, T] marks image tokens; ``run0`` [B] is how many image tokens ended the
    cached prefix (a run that continues into this chunk). Returns ``(cells, run_after)``: the
    0-based index of each image token in its run (0 elsewhere) and the length of the run
    ending the chunk, to carry into the next one.
    """
    B, T = is_image.shape
    t = torch.arange(T, device=is_image.device).expand(B, T)
    last_break = torch.where(is_image, -1, t).cummax(-1).values  # last non-image position
    start = torch.zeros(B, 1, dtype=torch.long, device=is_image.device)
    if run0 is not None:
        start = run0[:, None].long()
    run = torch.where(last_break < 0, t + start, t - last_break - 1)
    cells = torch.where(is_image, run, 0)
    run_after = torch.where(is_image[:, -1], run[:, -1] + 1, 0)
    return cells, run_after


def text_boxes(idx: Tensor, c: ModelConfig) -> Tensor:
    """The image box each text token describes [B, T], packed as ``col0 | row0 << 8 | col1 << 16
    | row1 << 24`` (image cells, inclusive), -1 on other tokens.

    A box is a run of four ``<loc:...>`` tokens ``x0 y0 x1 y1`` (bins of ``n_loc`` over the
    image's width and height, as ``data.templates.quantize_box`` writes them) and covers every
    cell it overlaps. It is described by its own four tokens and the text before them, back to
    the previous box or to the last token that is neither text nor a location. Computed per
    forward call: with a KV cache, a box and its text arrive in one chunk (the prompt's prefill)."""
    B, T = idx.shape
    w, n = c.image_w, c.n_loc
    h = c.image_cells // w
    is_loc = (idx >= c.loc_id_start) & (idx < c.loc_id_start + n)
    run, _ = image_cells(is_loc)
    end = is_loc & (run % 4 == 3)
    b = (idx - c.loc_id_start).clamp(0, n - 1)
    x0, y0, x1 = (F.pad(b, (k, 0))[:, :T] for k in (3, 2, 1))  # the box's earlier tokens
    col0, row0 = x0 * w // n, y0 * h // n
    col1 = torch.maximum(col0, (x1 * w + n - 1) // n - 1)
    row1 = torch.maximum(row0, (b * h + n - 1) // n - 1)
    packed = col0 | row0 << 8 | col1 << 16 | row1 << 24
    t = torch.arange(T, device=idx.device).expand(B, T)
    nxt = torch.where(end, t, T).flip(-1).cummin(-1).values.flip(-1)  # next box end, T if none
    at = nxt.clamp(max=T - 1)
    boundary = ~(is_loc | (idx < c.image_id_start))
    crossed = boundary.long().cumsum(-1)
    valid = (nxt < T) & ~boundary & (crossed.gather(1, at) == crossed)
    return torch.where(valid, packed.gather(1, at), -1)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values, one ``[B, H, T_max, Dh]`` pair per layer.

    ``length`` positions are filled (the same for every row; rows are left-padded instead of
    ragged). ``model(idx, cache=cache)`` writes the new keys at ``[length, length + T)`` and
    then advances ``length``: a prefill with the whole prompt, then one-token steps.
    """

    ROWS = ("image_run", "cells", "ids", "boxes")  # per-row state besides keys and values

    def __init__(self, k: list[Tensor], v: list[Tensor]) -> None:
        self.k, self.v = k, v
        self.length = 0
        self.image_run: Tensor | None = None  # [B] image tokens ending the filled part
        self.cells: Tensor | None = None  # [B, max_len] grid cell of each position (copy heads)
        self.ids: Tensor | None = None  # [B, max_len] token of each position (copy logit)
        self.boxes: Tensor | None = None  # [B, max_len] box of each position (box grounding)

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        if max_len > config.max_seq_len:
            raise ValueError(
                f"cache of {max_len} positions exceeds max_seq_len={config.max_seq_len}"
            )
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        # zeros: a CPU decoding step reads the unfilled part too, masked (forward's note)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        return cls(k, v)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H, T, Dh] after the filled part; return all keys/values [B, H, S, Dh]."""
        start, end = self._span(k.shape[2])
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def _span(self, n: int) -> tuple[int, int]:
        """Where ``n`` new positions go: ``[length, length + n)``, if they fit."""
        start, end = self.length, self.length + n
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        return start, end

    def update_cells(self, cells: Tensor) -> Tensor:
        """Write the grid cells [B, T] of the new positions; return all cells so far [B, S]."""
        return self._update_row("cells", cells)

    def update_ids(self, ids: Tensor) -> Tensor:
        """Write the tokens [B, T] of the new positions; return all tokens so far [B, S]."""
        return self._update_row("ids", ids)

    def update_boxes(self, boxes: Tensor) -> Tensor:
        """Write the boxes [B, T] of the new positions; return all boxes so far [B, S]."""
        return self._update_row("boxes", boxes)

    def _update_row(self, name: str, values: Tensor) -> Tensor:
        """Write ``values`` [B, T] into the per-position buffer ``name`` ([B, max_len], -1 where
        unfilled) after the filled part; return the buffer so far [B, S]."""
        start, end = self._span(values.shape[1])
        if getattr(self, name) is None:
            setattr(self, name, values.new_full((self.batch_size, self.max_len), -1))
        buf = getattr(self, name)
        buf[:, start:end] = values
        return buf[:, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def index_select(self, index: Tensor) -> KVCache:
        """A cache holding rows ``index`` (a 1-D LongTensor of batch rows; repeats allowed)."""
        out = KVCache(
            [k.index_select(0, index) for k in self.k], [v.index_select(0, index) for v in self.v]
        )
        out.length = self.length
        for name in self.ROWS:
            if getattr(self, name) is not None:
                setattr(out, name, getattr(self, name).index_select(0, index))
        return out

    def reorder_(self, index: Tensor) -> None:
        """In place: row ``i`` becomes old row ``index[i]`` (beam search, batch selection)."""
        for i in range(len(self.k)):
            self.k[i] = self.k[i].index_select(0, index)
            self.v[i] = self.v[i].index_select(0, index)
        for name in self.ROWS:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, index))


# ---------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.layer = config.n_head, layer
        self.copy_heads = config.copy_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        cache: KVCache | None,
        copy_mask: Tensor | None = None,
    ) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:  # keys/values of all positions so far: [B, H, S, Dh]
            k, v = cache.update(self.layer, k, v)
            if T == 1 and x.device.type == "cpu":  # every allocated position (forward's note)
                k, v = cache.k[self.layer], cache.v[self.layer]
                y = _attend_step(q, k, v, attn_mask, copy_mask, self.copy_heads)
                return self.proj(y.transpose(1, 2).reshape(B, T, C))
            k, v = k.to(q.dtype), v.to(q.dtype)
        if copy_mask is None:
            y = _attend(q, k, v, attn_mask)
        else:  # copy heads with their additive bias [B, 1, T, S], the other heads as usual
            h = self.copy_heads
            y_copy = _attend(q[:, :h], k[:, :h], v[:, :h], copy_mask)
            y = torch.cat([y_copy, _attend(q[:, h:], k[:, h:], v[:, h:], attn_mask)], 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def _attend_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor,
    copy_mask: Tensor | None,
    copy_heads: int,
) -> Tensor:
    """One decoding step on the CPU: a single query per row against the cache, in the cache's
    dtype (float32 on the CPU, see ``decode.generate``) with a float32 softmax.

    Two small matmuls for all heads at once: on 2 CPU cores, 256 rows x 6 heads x 150 keys took
    1.8 ms against 7.4 ms with ``F.scaled_dot_product_attention``'s flash kernel in bf16.
    ``k``, ``v`` are the whole cache [B, H, max_len, Dh]; ``attn_mask`` bool [B, 1, 1, max_len]
    hides pads and unfilled positions; ``copy_mask`` is the copy heads' additive bias
    [B, 1, 1, max_len] (``-inf`` where masked) for the first ``copy_heads`` heads."""
    with torch.autocast(q.device.type, enabled=False):
        s = torch.matmul(q.to(k.dtype), k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        if copy_mask is not None:  # the copy heads' mask already hides what attn_mask hides
            s = torch.cat([s[:, :copy_heads] + copy_mask, s[:, copy_heads:]], 1)
        s = s.masked_fill(~attn_mask, float("-inf"))
        return torch.matmul(s.softmax(-1).to(v.dtype), v).to(q.dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
    """``attn_mask``: None (causal), bool (True = attend) or an additive float bias."""
    training = q.requires_grad and k.shape[2] == q.shape[2] > 1
    if training and q.device.type == "cpu":
        return block_causal_attention(q, k, v, attn_mask)  # its module doc: the flash backward
    if attn_mask is None:  # plain causal (no padding); a single query sees every key
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
    if attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=False)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(
            config.d_model, eps=config.ln_eps, elementwise_affine=False, bias=False
        )
        self.attn = Attention(config, layer)
        self.ln_2 = nn.LayerNorm(
            config.d_model, eps=config.ln_eps, elementwise_affine=False, bias=False
        )
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        copy_mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache, copy_mask)
        return x + self.mlp(self.ln_2(x))


class CM3LeonTransformer(nn.Module):
    """Decoder-only transformer. ``forward(idx) -> logits``; see :meth:`forward` for shapes."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError(
                "ModelConfig.vocab_size must be set (use Vocab.size) before building the model"
            )
        layout = config.image_cells > 0 and (config.image_w > 0 or not config.ground_boxes)
        if (config.cell_embedding or config.copy_heads) and not layout:
            raise ValueError(
                "cell_embedding and copy_heads need the vocabulary's image layout: build the "
                "config with ModelConfig.for_vocab(vocab) (or set cell_embedding=False, "
                "copy_heads=0)"
            )
        self.config = config
        self.activation_checkpointing = config.activation_checkpointing
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        # optional (not in the paper): a learned embedding per image-grid cell, shared by every
        # image in the sequence, so "the same cell in another image" is one dot product away
        self.cell_emb = (
            nn.Embedding(config.image_cells, config.d_model) if config.cell_embedding else None
        )
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(
            config.d_model, eps=config.ln_eps, elementwise_affine=False, bias=False
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        pointer = config.copy_logit and config.copy_heads > 0  # it points where they look
        self.copy_gate = nn.Linear(config.d_model, 1) if pointer else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's init: positions N(0, 0.0002), lm head 0, the rest truncated N(0, 0.006)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        nn.init.normal_(self.pos_emb.weight, mean=0.0, std=self.config.pos_init_std)
        nn.init.zeros_(self.lm_head.weight)
        if self.copy_gate is not None:  # no pull towards copying until training finds one
            nn.init.zeros_(self.copy_gate.weight)
            nn.init.zeros_(self.copy_gate.bias)

    def forward(
        self,
        idx: Tensor,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Next-token logits.

        Args:
            idx: token ids [B, T].
            positions: position ids [B, T]; default ``cache.length + arange(T)`` (no padding).
                With left padding pass :func:`positions_from_mask` of the validity mask.
            attn_mask: bool [B, 1, T, S] (True = attend), S = keys in cache + T; default causal.
                With left padding pass :func:`attention_mask`.
            cache: a :class:`KVCache`; new keys/values are written at ``cache.length`` and
                ``cache.length`` advances by T.
            last_only: project only the last position (prefill during decoding).

        Returns:
            logits [B, T, V] (float32 unless under autocast), or [B, 1, V] with ``last_only``.
        """
        h, source = self._hidden(idx, positions, attn_mask, cache, last_only)
        logits = self.lm_head(h)  # [B, T, V]
        if self.copy_gate is not None:
            logits = self._copy_logits(logits, h, source)
        return logits

    def loss(
        self,
        idx: Tensor,
        targets: Tensor,
        row_weights: Tensor,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The training loss without the logits (:func:`head_loss`): per-token cross-entropy
        [B, T] (float32, no gradient) and ``sum(row_weights * ce)``; ``targets`` and
        ``row_weights`` [B, T], the other arguments as in :meth:`forward`."""
        h, source = self._hidden(idx, positions, attn_mask)
        copy_index = copy_value = None
        if self.copy_gate is not None:
            copy_index, copy_value = source.flatten(), self.copy_gate(h).flatten()
        ce, loss = head_loss(
            h.flatten(0, 1),
            self.lm_head.weight,
            targets.flatten(),
            row_weights.flatten(),
            copy_index,
            copy_value,
        )
        return ce.view_as(targets), loss

    def _hidden(
        self,
        idx: Tensor,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Final hidden states [B, T, C] (after ``ln_f``) and, with the copy logit, each
        position's copy source token [B, T] (-1: none); arguments as in :meth:`forward`."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=idx.device).expand(B, T)
        if past + T > self.config.max_seq_len and cache is None:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds max_seq_len={self.config.max_seq_len}"
            )
        if attn_mask is None and past > 0 and T > 1:  # chunk after a cached prefix: offset causal
            attn_mask = attention_mask(
                torch.ones(B, past + T, dtype=torch.bool, device=idx.device), T
            )
        x = self.tok_emb(idx) + self.pos_emb(positions)  # [B, T, C]
        copy = source = None
        if self.cell_emb is not None or self.config.copy_heads:
            is_image, cells = self._image_cells(idx, cache)
            if self.cell_emb is not None:
                x = x + self.cell_emb(cells) * is_image[..., None].to(x.dtype)
            if self.config.copy_heads:
                copy, source = self._copy_mask(idx, is_image, cells, attn_mask, cache)
                if self.copy_gate is not None:  # the token each position's copy target holds
                    keys = idx if cache is None else cache.update_ids(idx)
                    source = torch.where(source >= 0, keys.gather(1, source.clamp(min=0)), -1)
        if cache is not None and T == 1 and idx.device.type == "cpu":
            # A decoding step on the CPU attends over the whole allocated cache, its unfilled
            # positions masked: batched matmuls over a slice [:, :, :S] of the buffer ran 1.6-2.4x
            # slower than over the whole of it (1,024 rows, 60 of 97 positions: 1.32 vs 0.55 ms).
            if attn_mask is None:
                attn_mask = torch.ones(B, 1, 1, past + T, dtype=torch.bool, device=idx.device)
            pad = (0, cache.max_len - past - T)
            attn_mask = F.pad(attn_mask, pad, value=False)
            copy = F.pad(copy, pad, value=float("-inf")) if copy is not None else None
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing and cache is None:
                x = checkpoint(block, x, attn_mask, None, copy, use_reentrant=False)
            else:
                x = block(x, attn_mask, cache, copy)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
            source = source[:, -1:] if source is not None else None
        return self.ln_f(x), source

    def _copy_logits(self, logits: Tensor, h: Tensor, source: Tensor) -> Tensor:
        """``logits`` with the gate ``g(h)`` added at each position's copy source token
        (``source`` [B, T], -1 where there is none)."""
        return add_copy_logit(logits, source, self.copy_gate(h).squeeze(-1))

    def _image_cells(self, idx: Tensor, cache: KVCache | None) -> tuple[Tensor, Tensor]:
        """Which tokens of ``idx`` are image tokens [B, T] and their grid cells [B, T].

        A token's cell is its index within its run of image tokens, modulo ``image_cells``
        (h * w): row-major grid position for a whole image (0 on other tokens). With a cache
        the run carries over from the previous chunk (``cache.image_run``)."""
        c = self.config
        is_image = (idx >= c.image_id_start) & (idx < c.image_id_start + c.n_image_ids)
        run0 = cache.image_run if cache is not None else None
        cells, run_after = image_cells(is_image, run0)
        if cache is not None:
            cache.image_run = run_after
        return is_image, cells % c.image_cells

    def _copy_mask(
        self,
        idx: Tensor,
        is_image: Tensor,
        cells: Tensor,
        attn_mask: Tensor | None,
        cache: KVCache | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Additive attention bias [B, 1, T, S] of the copy heads (``-inf`` where masked), and
        with ``copy_logit`` the key position [B, T] of each query's latest aligned visible key
        (-1 where there is none).

        An image token in cell ``c`` predicts cell ``c + 1`` of its image; every earlier image
        token in cell ``c + 1`` (the same place in another image: a retrieved one, or the source
        of an edit) gets ``copy_bias``. Keys of the current image in that cell lie in the future
        and stay masked. With ``ground_boxes``, the text of every box (:func:`text_boxes`) that
        holds that cell gets ``copy_bias`` too. With a cache, each position's cell and box are
        kept in ``cache.cells`` and ``cache.boxes``."""
        c, T = self.config, is_image.shape[1]
        cell = torch.where(is_image, cells, -1)
        key_cell = cell if cache is None else cache.update_cells(cell)
        target = torch.where(is_image & (cells < c.image_cells - 1), cells + 1, -2)
        aligned = target[:, :, None] == key_cell[:, None, :]  # [B, T, S]
        if attn_mask is None:  # plain causal
            attn_mask = attention_mask(torch.ones_like(key_cell, dtype=torch.bool), T)
        allowed = attn_mask[:, 0]
        biased = aligned
        if c.ground_boxes:
            boxes = text_boxes(idx, c)
            key_box = (boxes if cache is None else cache.update_boxes(boxes))[:, None, :]
            row, col = (target // c.image_w)[..., None], (target % c.image_w)[..., None]
            biased = aligned | (
                (key_box >= 0)
                & (target >= 0)[..., None]
                & (col >= key_box & 255)
                & (row >= key_box >> 8 & 255)
                & (col <= key_box >> 16 & 255)
                & (row <= key_box >> 24 & 255)
            )
        bias = torch.where(biased, c.copy_bias, 0.0).masked_fill_(~allowed, float("-inf"))
        if self.copy_gate is None:
            return bias[:, None], None
        keys = torch.arange(aligned.shape[-1], device=aligned.device)
        latest = torch.where(aligned & allowed, keys, -1).amax(-1)  # [B, T]
        return bias[:, None], latest

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(
    config: ModelConfig, device: torch.device | str | None = None
) -> CM3LeonTransformer:
    """Construct on ``device`` (``"meta"`` builds without memory, e.g. to count parameters)."""
    if device is None:
        return CM3LeonTransformer(config)
    with torch.device(device):
        return CM3LeonTransformer(config)
