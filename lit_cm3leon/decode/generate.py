"""One generation loop for every decoding strategy of the paper.

Cond and uncond prompts (and, for editing, image-only prompts) are left-padded to one length
and run as one batch, stream-major: rows ``[cond 0..N-1; uncond 0..N-1; ...]``. The prompt is
read once (prefill into a :class:`KVCache`), then each step feeds the chosen token to every
stream of its sample and turns the model's logits into the next token through a chain of
processors (see ``processors.py``)::

    logits [S*N, V] -> ModalityMask -> guidance (CFG / CD-K / edit) -> temperature, top-k, top-p
                    -> sample [N]

Strategies (the names shared across the suite):

=============  ===================================================================
``temperature``  softmax at ``temperature`` (+ ``top_k`` if > 0); one stream
``topp``         as ``temperature`` then top-p; one stream
``cfg_topp``     CFG at ``cfg_scale`` then temperature, top-k, top-p; two streams
``cdk``          CD-K (``cdk_alpha``, ``cdk_k``) then temperature; two streams
``mixed``        first half of the rows ``cfg_topp``, second half ``cdk`` (see :func:`row_strategies`)
=============  ===================================================================

``temperature <= 0`` is greedy. A ``torch.Generator`` seeded with ``seed`` drives every draw,
so the same seed gives the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit_cm3leon.model.transformer import (
    KVCache,
    attention_mask,
    image_cells,
    positions_from_mask,
)
from lit_cm3leon.tokenizer.vocab import Vocab

from .processors import (
    Chain,
    ClassifierFreeGuidance,
    ContrastiveTopK,
    DecodeState,
    EditGuidance,
    ModalityMask,
    Temperature,
    TopK,
    TopP,
    sample,
)

STRATEGIES = ("temperature", "topp", "cfg_topp", "cdk", "mixed")
GUIDED = ("cfg_topp", "cdk", "mixed")


def make_uncond_prompt(
    vocab: Vocab, retrieved_ids: Sequence[int], trailing_ids: Sequence[int]
) -> list[int]:
    """The unconditional stream of a prompt: retrieved documents kept, the prompt's text
    replaced by a single ``<mask:0>``, then the prompt's trailing ids (e.g. ``[<break>]`` that
    opens the image to generate).

    For a prompt ``<bos> doc_1 <sep> caption <break>``: ``retrieved_ids = <bos> doc_1 <sep>``,
    ``trailing_ids = [<break>]`` -> ``<bos> doc_1 <sep> <mask:0> <break>``.
    """
    return [*retrieved_ids, vocab.mask(0), *trailing_ids]


def row_strategies(strategy: str, n: int) -> list[str]:
    """The strategy each of ``n`` rows uses: ``mixed`` gives rows ``< ceil(n/2)`` ``cfg_topp``
    and the rest ``cdk``; any other strategy applies to every row."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy != "mixed":
        return [strategy] * n
    half = (n + 1) // 2
    return ["cfg_topp"] * half + ["cdk"] * (n - half)


def build_chain(
    strategy: str,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    cdk_alpha: float = 0.5,
    cdk_k: int = 5,
    image_cfg_scale: float | None = None,
) -> Chain:
    """Processors after the modality mask for one (non-mixed) strategy. With
    ``image_cfg_scale`` set, ``cfg_topp`` uses three-stream edit guidance
    (``image_cfg_scale`` on the image, ``cfg_scale`` on the instruction)."""
    if strategy == "temperature":
        return Chain([TopK(top_k), Temperature(temperature)])
    if strategy == "topp":
        return Chain([TopK(top_k), Temperature(temperature), TopP(top_p)])
    if strategy == "cfg_topp":
        guide = (
            ClassifierFreeGuidance(cfg_scale)
            if image_cfg_scale is None
            else EditGuidance(image_cfg_scale, cfg_scale)
        )
        return Chain([guide, TopK(top_k), Temperature(temperature), TopP(top_p)])
    if strategy == "cdk":
        return Chain([ContrastiveTopK(cdk_alpha, cdk_k), Temperature(temperature)])
    raise ValueError(f"no single chain for strategy {strategy!r}; choose one of {STRATEGIES[:-1]}")


def _left_pad(rows: Sequence[Sequence[int]], pad: int, extra: int, device) -> tuple[Tensor, Tensor]:
    """ids [R, L + extra] (left-padded prompts, room for ``extra`` new tokens) and valid mask."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L + extra), pad, dtype=torch.long)
    valid = torch.zeros((len(rows), L + extra), dtype=torch.bool)
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError(
                f"prompt {i} is empty; every stream needs at least one token (e.g. <bos>)"
            )
        ids[i, L - len(r) : L] = torch.tensor(list(r), dtype=torch.long)
        valid[i, L - len(r) : L] = True
    return ids.to(device), valid.to(device)


def _shared_layout(flat: list[list[int]], N: int, is_image) -> tuple[list[int], list[int]] | None:
    """Which rows the prefill computes and how the others reuse them.

    Row ``r`` of stream > 0 belongs to prompt ``i = r % N`` and shares its first ``m`` tokens
    with cond row ``i`` (the retrieved documents of a CFG prompt; ``<bos>`` at least). Laid out
    with those ``m`` tokens in the cond row's columns and its own rest right-aligned (pads
    between), its keys there equal the cond row's, so only the rest needs computing. The shared
    part stops before an image the rest continues (pads would break the run of image cells).
    Cond rows repeating an earlier cond row (several samples of a prompt) reuse it whole.

    Returns ``(donor, rest)``: per row, the unique cond row it copies and how many of its last
    columns it computes itself (0: none); ``None`` when a row does not fit this layout."""
    first: dict[tuple[int, ...], int] = {}
    donor = [first.setdefault(tuple(r), i) for i, r in enumerate(flat[:N])]
    rest = [0] * N
    for r in range(N, len(flat)):
        c, row = flat[r % N], flat[r]
        m = 0
        while m < min(len(c), len(row)) and c[m] == row[m]:
            m += 1
        while 0 < m < len(row) and is_image(row[m - 1]) and is_image(row[m]):
            m -= 1
        n = len(row) - m
        if m == 0 or n == 0 or n > len(c) - m:
            return None
        donor.append(donor[r % N])
        rest.append(n)
    return donor, rest


def _prefill(forward, config, flat, N, ids, valid, L, pad, dtype):
    """The prompt's keys into a new :class:`KVCache` and the logits of its last position.

    Rows are computed once each where :func:`_shared_layout` allows (rows of stream > 0 are
    laid out anew in ``ids`` / ``valid``, in place); otherwise the whole batch is. Returns
    ``(cache, logits [R, 1, V], padded)``."""
    R, total = ids.shape
    device = ids.device

    def is_image(t):  # an id or a tensor of ids
        return (t >= config.image_id_start) & (t < config.image_id_start + config.n_image_ids)

    layout = _shared_layout(flat, N, is_image)
    if layout is None:
        cache = KVCache.allocate(config, R, total, device=device, dtype=dtype)
        padded = not bool(valid[:, :L].all())
        am = attention_mask(valid[:, :L], L) if padded else None
        pos = positions_from_mask(valid[:, :L]) if padded else None
        logits = forward(ids[:, :L], positions=pos, attn_mask=am, cache=cache, last_only=True)
        return cache, logits, padded
    donor, rest = layout
    uniq = sorted(set(donor))
    slot = {row: j for j, row in enumerate(uniq)}
    sub = torch.tensor(uniq, device=device)
    part = KVCache.allocate(config, len(uniq), total, device=device, dtype=dtype)
    v = valid[sub, :L]
    logits_u = forward(ids[sub, :L], positions=positions_from_mask(v),
                       attn_mask=attention_mask(v, L), cache=part, last_only=True)  # fmt: skip
    cache = part.index_select(torch.tensor([slot[d] for d in donor], device=device))
    logits = logits_u.index_select(
        0, torch.tensor([slot[donor[i]] for i in range(N)], device=device)
    )
    if R == N:
        return cache, logits, True
    # rows of the other streams: the cond row's shared columns, pads, then their own rest
    s = max(rest)
    for r in range(N, R):
        c, n, m = flat[r % N], rest[r], len(flat[r]) - rest[r]
        shared = slice(L - len(c), L - len(c) + m)
        ids[r, :L], valid[r, :L] = pad, False
        ids[r, shared], valid[r, shared] = ids[r % N, shared], True
        ids[r, L - n : L] = torch.tensor(flat[r][m:], dtype=torch.long)
        valid[r, L - n : L] = True
    own = KVCache([k[N:] for k in cache.k], [v[N:] for v in cache.v])  # views: writes land in cache
    own.length = L - s
    for name in ("cells", "ids", "boxes"):
        if getattr(cache, name) is not None:
            setattr(own, name, getattr(cache, name)[N:])
    if cache.image_run is not None:  # the image run ending just before the recomputed columns
        own.image_run = image_cells(is_image(ids[N:, : L - s]))[1]
    v = valid[N:, :L]
    logits_o = forward(ids[N:, L - s : L], positions=positions_from_mask(v)[:, L - s :],
                       attn_mask=attention_mask(v, s), cache=own, last_only=True)  # fmt: skip
    if cache.image_run is not None:
        cache.image_run = torch.cat([cache.image_run[:N], own.image_run])
    return cache, torch.cat([logits, logits_o]), True


@torch.no_grad()  # not inference_mode: autocast caches its weight casts only under no_grad
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    vocab: Vocab,
    max_new_tokens: int,
    strategy: str = "topp",
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    cdk_alpha: float = 0.5,
    cdk_k: int = 5,
    uncond_prompts: list[list[int]] | None = None,
    mode: str = "image",
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    *,
    image_only_prompts: list[list[int]] | None = None,
    image_cfg_scale: float = 1.0,
    use_cache: bool = True,
    param_dtype: torch.dtype | None = None,
) -> list[list[int]]:
    """Generate continuations of ``prompts``; returns the new tokens of each prompt.

    Args:
        model: a :class:`~lit_cm3leon.model.CM3LeonTransformer` (any module with its forward).
        prompts: token ids per sample (repeat a prompt to draw several samples of it).
        vocab: the id layout (for the modality mask and the stop tokens).
        max_new_tokens: hard limit of new tokens per sample.
        strategy: one of ``temperature topp cfg_topp cdk mixed``.
        uncond_prompts: the unconditional stream per sample (see :func:`make_uncond_prompt`);
            required by ``cfg_topp``, ``cdk`` and ``mixed``.
        mode: ``"image"`` (the output is one image: ``<break>`` if the prompt has not opened
            one, ``vocab.image_tokens`` codes, then the closing ``<break>``, where the sample
            stops) or ``"text"`` (text ids and specials, no image; stops at ``<eos>``) or
            ``"any"`` (text and images; stops at ``<eos>``).
        seed: seeds the ``torch.Generator`` of every draw.
        stop_ids: extra ids that end a sample (``<eos>`` always does).
        image_only_prompts: with ``cfg_topp``, the image-only conditional stream for editing;
            then guidance is ``uncond + image_cfg_scale (img - uncond) + cfg_scale (full - img)``.
        use_cache: False recomputes the whole sequence every step (for checks and benchmarks).
        param_dtype: run with a copy of the weights in this dtype, made once for the call (the
            model is not modified). Under CPU autocast this avoids re-casting every weight at
            every step; costs one extra copy of the weights in memory.

    Returns:
        one list of new token ids per prompt, ending with its stop token when it stopped.
    """
    rows_strategy = row_strategies(strategy, len(prompts))
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if image_only_prompts is not None and strategy != "cfg_topp":
        raise ValueError(
            f"image_only_prompts (edit guidance) need strategy 'cfg_topp', got {strategy!r}"
        )
    N = len(prompts)
    if N == 0:
        return []
    streams = [prompts]
    if strategy in GUIDED:
        if uncond_prompts is None or len(uncond_prompts) != N:
            raise ValueError(
                f"strategy {strategy!r} needs one uncond prompt per prompt (make_uncond_prompt)"
            )
        if image_only_prompts is not None:
            if strategy != "cfg_topp" or len(image_only_prompts) != N:
                raise ValueError(
                    "image_only_prompts (edit guidance) need strategy 'cfg_topp' and one per prompt"
                )
            streams.append(image_only_prompts)
        streams.append(uncond_prompts)
    n_streams = len(streams)
    knobs = dict(
        cfg_scale=cfg_scale,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        cdk_alpha=cdk_alpha,
        cdk_k=cdk_k,
    )
    if image_only_prompts is not None:
        knobs["image_cfg_scale"] = image_cfg_scale
    groups: list[tuple[Tensor, Chain]] = []
    for name in dict.fromkeys(rows_strategy):
        rows = torch.tensor([i for i, s in enumerate(rows_strategy) if s == name])
        groups.append((rows, build_chain(name, **knobs)))
    greedy = temperature <= 0

    device = next(model.parameters()).device
    config = model.config
    flat = [p for stream in streams for p in stream]
    ids, valid = _left_pad(flat, vocab.pad, max_new_tokens, device)
    R, total = ids.shape
    L = total - max_new_tokens
    if total > config.max_seq_len:
        raise ValueError(
            f"prompt ({L}) + max_new_tokens ({max_new_tokens}) exceed max_seq_len={config.max_seq_len}"
        )
    padded = not bool(valid[:, :L].all())

    mask = ModalityMask(vocab, mode)
    mask.reset(prompts, device)
    stops = {vocab.eos, *(stop_ids or ())}
    stop_t = torch.tensor(sorted(stops), device=device)
    generator = torch.Generator(device=device).manual_seed(seed)

    forward = model
    if param_dtype is not None:
        params = {n: p.to(param_dtype) for n, p in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def forward(*args, **kwargs):
            return torch.func.functional_call(model, {**params, **buffers}, args, kwargs)

    cache_dtype = None
    if use_cache:
        # float32 keys on the CPU: a decoding step's attention then runs as two float32 matmuls,
        # faster there than bf16 ones (transformer._attend_step); elsewhere the compute dtype
        if device.type == "cpu":
            cache_dtype = torch.float32
        elif torch.is_autocast_enabled(device.type):
            cache_dtype = torch.get_autocast_dtype(device.type)
        else:
            cache_dtype = param_dtype or next(model.parameters()).dtype
    cache = None

    was_training = model.training
    model.eval()  # restored before returning (generation may run inside a training loop)
    out = torch.full((N, max_new_tokens), vocab.pad, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    lengths = torch.full((N,), max_new_tokens, dtype=torch.long, device=device)
    row_index = [
        torch.cat([rows + s * N for s in range(n_streams)]).to(device) for rows, _ in groups
    ]

    S = L  # filled positions
    for step in range(max_new_tokens):
        # --- forward: logits of the next token for every stream row [R, V]
        if cache_dtype is not None and step == 0:
            cache, logits, padded = _prefill(
                forward, config, flat, N, ids, valid, L, vocab.pad, cache_dtype
            )
        elif cache is not None:
            pos = (valid[:, :S].sum(-1, keepdim=True) - 1) if padded else None
            am = valid[:, None, None, :S] if padded else None
            logits = forward(ids[:, S - 1 : S], positions=pos, attn_mask=am, cache=cache)
        else:
            am = attention_mask(valid[:, :S], S) if padded else None
            pos = positions_from_mask(valid[:, :S]) if padded else None
            logits = forward(ids[:, :S], positions=pos, attn_mask=am, last_only=True)
        logits = mask(logits[:, -1].float(), DecodeState(step))

        # --- choose one token per sample, group by group (mixed uses two chains)
        state = DecodeState(step)
        nxt = torch.empty(N, dtype=torch.long, device=device)
        for (rows, chain), index in zip(groups, row_index, strict=True):
            scores = chain(logits.index_select(0, index), state)
            nxt[rows.to(device)] = sample(scores, generator, greedy)
        nxt = torch.where(done, vocab.pad, nxt)

        # --- record, advance the state machine, check the stopping rules
        out[:, step] = nxt
        was_in_image = mask.in_image.clone()
        mask.update(nxt)
        finished = torch.isin(nxt, stop_t)
        if mode == "image":
            finished |= was_in_image & (nxt == vocab.brk)
        newly = finished & ~done
        lengths = torch.where(newly, step + 1, lengths)
        done |= finished
        if bool(done.all()):
            break
        ids[:, S] = nxt.repeat(n_streams)
        valid[:, S] = True
        S += 1

    model.train(was_training)
    return [out[i, : lengths[i]].tolist() for i in range(N)]
