"""Logits processors: small composable steps between the model's logits and the sampler.

Each processor is a callable ``proc(logits [R, V], state) -> logits [R', V]``. Most keep the
rows (``R' == R``); the guidance processors take a batch that stacks the streams of the same
samples *stream-major* (``[cond rows; uncond rows]``, or ``[full; image-only; uncond]``) and
return one row per sample. A :class:`Chain` applies processors in order.

Guidance works on log-probabilities (``log_softmax`` of each stream's logits), so that the two
streams are on one scale; a sampler's softmax of the result at guidance scale 1 is exactly the
conditional distribution, and at scale 0 the unconditional one. A token that the conditional
stream rules out (``-inf``, e.g. by :class:`ModalityMask`) stays ruled out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_cm3leon.tokenizer.vocab import Vocab

NEG_INF = float("-inf")
# floor for uncond log-probs so that ``cond - uncond`` never becomes inf - inf
_LOG_FLOOR = -1e4


@dataclass
class DecodeState:
    """What a processor may read besides the logits."""

    step: int = 0  # index of the token being chosen (0 = first new token)


class Chain:
    """Apply processors in order: ``Chain([a, b])(x, s) == b(a(x, s), s)``."""

    def __init__(self, processors: Iterable) -> None:
        self.processors = list(processors)

    def __call__(self, logits: Tensor, state: DecodeState) -> Tensor:
        for proc in self.processors:
            logits = proc(logits, state)
        return logits

    def __repr__(self) -> str:
        return f"Chain({self.processors})"


# ---------------------------------------------------------------------------------------------
# sampling knobs
# ---------------------------------------------------------------------------------------------


class Temperature:
    """Divide logits by ``temperature``; ``temperature <= 0`` means greedy (keep only the argmax)."""

    def __init__(self, temperature: float) -> None:
        self.temperature = float(temperature)

    def __call__(self, logits: Tensor, state: DecodeState) -> Tensor:
        if self.temperature <= 0:
            keep = torch.zeros_like(logits, dtype=torch.bool)
            keep.scatter_(-1, logits.argmax(-1, keepdim=True), True)
            return logits.masked_fill(~keep, NEG_INF)
        if self.temperature == 1.0:
            return logits
        return logits / self.temperature

    def __repr__(self) -> str:
        return f"Temperature({self.temperature})"


class TopK:
    """Keep the ``k`` largest logits per row (``k <= 0`` or ``k >= V``: no-op). Ties at the k-th value are kept."""

    def __init__(self, k: int) -> None:
        self.k = int(k)

    def __call__(self, logits: Tensor, state: DecodeState) -> Tensor:
        if self.k <= 0 or self.k >= logits.shape[-1]:
            return logits
        kth = logits.topk(self.k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, NEG_INF)

    def __repr__(self) -> str:
        return f"TopK({self.k})"


class TopP:
    """Nucleus filter: keep the smallest set of most likely tokens whose mass is >= ``p``.

    A token is kept when the mass of the tokens strictly more likely than it is still < p;
    ``p >= 1`` is a no-op. The most likely token is always kept.
    """

    def __init__(self, p: float) -> None:
        if not 0.0 < p:
            raise ValueError(f"top_p must be in (0, 1], got {p}")
        self.p = float(p)

    def __call__(self, logits: Tensor, state: DecodeState) -> Tensor:
        if self.p >= 1.0:
            return logits
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= self.p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        return logits.masked_fill(drop, NEG_INF)

    def __repr__(self) -> str:
        return f"TopP({self.p})"


# ---------------------------------------------------------------------------------------------
# guidance over streams
# ---------------------------------------------------------------------------------------------


def _split_streams(logits: Tensor, n: int) -> list[Tensor]:
    if logits.shape[0] % n:
        raise ValueError(f"{logits.shape[0]} rows cannot be split into {n} equal streams")
    return list(logits.float().log_softmax(-1).chunk(n, dim=0))


class ClassifierFreeGuidance:
    """``uncond + cfg_scale * (cond - uncond)`` on log-probs; rows ``[cond (B); uncond (B)]`` -> B.

    ``cfg_scale = 1`` gives the conditional distribution, ``0`` the unconditional one.
    """

    n_streams = 2

    def __init__(self, cfg_scale: float) -> None:
        self.cfg_scale = float(cfg_scale)

    def __call__(self, logits: Tensor, state: DecodeState) -> Tensor:
        cond, uncond = _split_streams(logits, 2)
        uncond = uncond.clamp(min=_LOG_FLOOR)
        guided = uncond + self.cfg_scale * (cond - uncond)
        return guided.masked_fill(torch.isinf(cond), NEG_INF)

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance({self.cfg_scale})"


class EditGuidance:
    """Two-scale guidance for image editing (as InstructPix2Pix), on log-probs.

    Rows ``[full cond (B); image-only cond (B); uncond (B)]`` -> B:
    ``uncond + image_scale * (img - uncond) + text_scale * (full - img)``. Both scales 1 give
    the full conditional; ``text_scale = 0, image_scale = 1`` the image-only stream.
    """

    n_streams = 3

    def __init__(self, image_scale: float, text_scale: float) -> None:
        self.image_scale, self.text_scale = float(image_scale), float(text_scale)

    def __call__(self, logits: Tensor, state: DecodeState) -> Tensor:
        full, img, uncond = _split_streams(logits, 3)
        img_f, uncond = img.clamp(min=_LOG_FLOOR), uncond.clamp(min=_LOG_FLOOR)
        guided = uncond + self.image_scale * (img_f - uncond) + self.text_scale * (full - img_f)
        return guided.masked_fill(torch.isinf(full), NEG_INF)

    def __repr__(self) -> str:
        return f"EditGuidance(image={self.image_scale}, text={self.text_scale})"


class ContrastiveTopK:
    """CD-K (CM3Leon, section 5): contrastive decoding with a top-k plausibility bound.

    With ``p_c`` the conditional and ``p_u`` the unconditional next-token distribution::

        V      = {t : p_c(t) >= alpha * kmax(k, p_c)}     kmax(k, .) = k-th largest value
        score  = log p_c(t) - log p_u(t)   for t in V,   -inf otherwise

    Rows ``[cond (B); uncond (B)]`` -> scores [B, V]; the sampler then draws from
    ``softmax(score / temperature)`` (or takes the argmax when greedy). ``k = 1`` recovers the
    original contrastive decoding bound ``alpha * max p_c``.
    """

    n_streams = 2

    def __init__(self, alpha: float, k: int) -> None:
        if k < 1:
            raise ValueError(f"cdk_k must be >= 1, got {k}")
        self.alpha, self.k = float(alpha), int(k)

    def __call__(self, logits: Tensor, state: DecodeState) -> Tensor:
        cond, uncond = _split_streams(logits, 2)
        p_cond = cond.exp()
        k = min(self.k, p_cond.shape[-1])
        kth = p_cond.topk(k, dim=-1).values[..., -1:]
        plausible = p_cond >= self.alpha * kth
        score = cond - uncond.clamp(min=_LOG_FLOOR)
        return score.masked_fill(~plausible | torch.isinf(cond), NEG_INF)

    def __repr__(self) -> str:
        return f"ContrastiveTopK(alpha={self.alpha}, k={self.k})"


# ---------------------------------------------------------------------------------------------
# allowed tokens per modality
# ---------------------------------------------------------------------------------------------


class ModalityMask:
    """Allowed-token mask driven by a per-row state machine over the multimodal vocabulary.

    Images are bracketed by ``<break>``: in text state a ``<break>`` opens an image; inside an
    image exactly ``vocab.image_tokens`` image-code ids are allowed, then only the closing
    ``<break>``, which returns the row to text state.

    ``mode`` sets what text state allows:

    * ``"any"``   text ids, location tokens, ``<break> <eos> <sep> <infill> <mask:i>``;
    * ``"text"``  text ids, location tokens and ``<eos>`` (answers and captions);
    * ``"image"`` only ``<break>`` (the next thing must be an image).

    ``<pad>`` and ``<bos>`` are never generated. Call :meth:`reset` with the prompts (the state
    after reading them), then :meth:`update` with each chosen token. The mask applies to any
    number of stacked streams of the same rows (stream-major).
    """

    MODES = ("any", "text", "image")

    def __init__(self, vocab: Vocab, mode: str = "any") -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.vocab, self.mode = vocab, mode
        V = vocab.size
        image = torch.zeros(V, dtype=torch.bool)
        image[vocab.image_offset : vocab.special_offset] = True
        brk = torch.zeros(V, dtype=torch.bool)
        brk[vocab.brk] = True
        text = torch.zeros(V, dtype=torch.bool)
        if mode == "image":
            text[vocab.brk] = True
        else:
            text[: vocab.n_text] = True
            text[vocab.loc_offset : vocab.size] = True
            text[vocab.eos] = True
            if mode == "any":  # document structure too; an answer or caption ("text") has none
                for t in (vocab.sep, vocab.infill, vocab.brk):
                    text[t] = True
                text[vocab.mask(0) : vocab.mask(vocab.n_masks - 1) + 1] = True
        # row of the table by state: 0 text, 1 inside an image, 2 image complete (needs <break>)
        self.table = torch.stack([text, image, brk])
        self.in_image = torch.zeros(0, dtype=torch.bool)
        self.count = torch.zeros(0, dtype=torch.long)
        self.images_done = torch.zeros(0, dtype=torch.long)

    def reset(self, prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> None:
        """Set each row's state to the one after reading its prompt."""
        n = len(prompts)
        self.in_image = torch.zeros(n, dtype=torch.bool)
        self.count = torch.zeros(n, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            in_image, count = False, 0
            for t in prompt:
                if t == self.vocab.brk:
                    in_image, count = (not in_image), 0
                elif self.vocab.is_image(t):
                    # an image right after <bos>/<sep> (a document that starts with an image, as
                    # the codec writes it) has no opening <break>: its first code opens it
                    in_image, count = True, count + 1 if in_image else 1
            if len(prompt) and int(prompt[-1]) == self.vocab.brk and self.mode != "any":
                # a trailing <break> separates the prompt from what comes next, which the mode
                # names: an image (image mode) or text (text mode), whatever came before it
                in_image, count = self.mode == "image", 0
            self.in_image[i], self.count[i] = in_image, count
        self.in_image, self.count = self.in_image.to(device), self.count.to(device)
        self.images_done = torch.zeros(n, dtype=torch.long, device=device)
        self.table = self.table.to(device)

    def states(self) -> Tensor:
        full = self.count >= self.vocab.image_tokens
        return torch.where(self.in_image, torch.where(full, 2, 1), 0)

    def allowed(self) -> Tensor:
        """Bool [B, V]: the tokens each row may produce next."""
        return self.table[self.states()]

    def update(self, tokens: Tensor) -> None:
        """Advance the state machine with the chosen tokens [B]."""
        is_brk = tokens == self.vocab.brk
        closing = is_brk & self.in_image
        self.images_done += closing.long()
        is_img = (tokens >= self.vocab.image_offset) & (tokens < self.vocab.special_offset)
        self.count = torch.where(is_brk, 0, self.count + (is_img & self.in_image).long())
        self.in_image = self.in_image ^ is_brk

    def __call__(self, logits: Tensor, state: DecodeState) -> Tensor:
        allowed = self.allowed()
        reps = logits.shape[0] // allowed.shape[0]
        if reps * allowed.shape[0] != logits.shape[0]:
            raise ValueError(
                f"{logits.shape[0]} rows are not a multiple of {allowed.shape[0]} masked rows"
            )
        if reps > 1:
            allowed = allowed.repeat(reps, 1)
        return logits.masked_fill(~allowed, NEG_INF)

    def __repr__(self) -> str:
        return f"ModalityMask(mode={self.mode!r})"


# ---------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------


def sample(
    logits: Tensor, generator: torch.Generator | None = None, greedy: bool = False
) -> Tensor:
    """One token per row [B] from processed logits [B, V]: argmax if greedy, else a softmax draw.

    The draw inverts the CDF with one uniform number per row (cheaper than ``multinomial``,
    which draws a number per vocabulary entry); tokens of probability 0 are never chosen.
    """
    if greedy:
        return logits.argmax(-1)
    cdf = logits.float().softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
