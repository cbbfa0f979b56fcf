"""Inference on a published checkpoint: text to image, image to text, image perplexity.

``Engine`` bundles what a prompt needs: the decoder, the document codec, the image tokenizer
(pixels <-> codes) and, when ``retrieve_k > 0``, a retriever that turns prompt texts into
documents of the memory bank. ``generate``, the eval scripts, the sample-grid callback and the
notebook all go through it, so every consumer formats prompts the same way.

Prompt layouts (ids; ``d_i`` are retrieved documents, each ``caption <break> image``)::

    text -> image   cond:   <bos> d_1 <sep> ... d_k <sep> caption <break>   (+ 64 image codes)
                    uncond: <bos> d_1 <sep> ... d_k <sep> <mask:0> <break>
    image -> text   <bos> d_1 <sep> ... <sep> image <break>                 (+ text until <eos>)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lit_cm3leon.decode.generate import generate, make_uncond_prompt
from lit_cm3leon.model import CM3LeonTransformer
from lit_cm3leon.objective.sequence import pair_document
from lit_cm3leon.tokenizer.codec import DocumentCodec
from lit_cm3leon.tokenizer.document import Document, Image, Text
from lit_cm3leon.training.checkpoint import load_decoder

# A retriever for the engine: prompt texts, k -> per prompt, k documents as (caption, codes).
RetrieveFn = Callable[[Sequence[str], int], list[list[tuple[str, np.ndarray]]]]


def clip_scorer(encoder) -> Callable[[Sequence[np.ndarray], str], np.ndarray]:
    """(images, text) -> cosine similarity per image, from a CLIP encoder (for re-ranking)."""

    def score(images: Sequence[np.ndarray], text: str) -> np.ndarray:
        return encoder.embed_image(np.stack(list(images))) @ encoder.embed_text([text])[0]

    return score


# (prompt, sample) rows per image-generation batch: on 2 CPU cores 64 rows gave 1.3-1.5x the
# prompts/s of 16 at k = 0 (per-step overheads amortised), the same at k = 2, and 128 rows
# 1.07-1.23x the images/s of 64 for 16 samples of 16 prompts (four runs)
IMAGE_BATCH = 128


@dataclass
class Decoding:
    """The decoding knobs (names shared across the suite)."""

    strategy: str = "cfg_topp"
    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    cdk_alpha: float = 0.5
    cdk_k: int = 5
    num_samples: int = 1
    retrieve_k: int = 0
    max_text_tokens: int = 32

    @classmethod
    def from_mapping(cls, d) -> Decoding:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class Engine:
    def __init__(
        self,
        model: CM3LeonTransformer,
        codec: DocumentCodec,
        image_tokenizer=None,
        retrieve: RetrieveFn | None = None,
        autocast: bool = True,
    ) -> None:
        self.model, self.codec, self.vocab = model.eval(), codec, codec.vocab
        self.image_tokenizer = image_tokenizer
        self.retrieve_fn = retrieve
        self.autocast = autocast

    # --- construction ------------------------------------------------------------------
    @classmethod
    def load(
        cls, ckpt: str | Path, outputs: str | Path = "outputs", retrieval: bool = True
    ) -> Engine:
        """The decoder at ``ckpt`` with the tokenizers (and memory bank) published under ``outputs``."""
        from lit_cm3leon.tokenizer.image import load_image_tokenizer

        outputs = Path(outputs)
        codec = DocumentCodec.load(outputs / "text_tokenizer")
        model, _, _ = load_decoder(ckpt, vocab=codec.vocab)
        image_tok = load_image_tokenizer(outputs / "image_tokenizer")
        retrieve = None
        if retrieval and (outputs / "index" / "manifest.json").is_file():
            from lit_cm3leon.retrieval.bank_docs import bank_retrieve_fn, trained_strategy

            retrieve = bank_retrieve_fn(outputs, trained_strategy(ckpt))
        return cls(model, codec, image_tok, retrieve)

    def _amp(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16)

    # --- prompts -------------------------------------------------------------------------
    def retrieved_prefix(self, texts: Sequence[str], k: int) -> list[list[int]]:
        """``<bos> d_1 <sep> ... d_k <sep>`` per prompt (just ``<bos>`` when k = 0)."""
        if k > 0 and self.retrieve_fn is None:
            raise ValueError(
                f"retrieve_k={k} needs a memory bank: build it with `python -m lit_cm3leon.prepare index` "
                "or use retrieve_k=0"
            )
        docs = self.retrieve_fn(texts, k) if k > 0 else [[] for _ in texts]
        prefixes = []
        for per_prompt in docs:
            ids = [self.vocab.bos]
            for caption, codes in per_prompt:
                ids += self.codec.encode(pair_document(caption, codes)) + [self.vocab.sep]
            prefixes.append(ids)
        return prefixes

    def text_to_image_prompts(
        self, captions: Sequence[str], retrieve_k: int = 0
    ) -> tuple[list[list[int]], list[list[int]]]:
        prefixes = self.retrieved_prefix(captions, retrieve_k)
        cond = [
            p + self.codec.encode(Document([Text(c)])) + [self.vocab.brk]
            for p, c in zip(prefixes, captions, strict=True)
        ]
        uncond = [make_uncond_prompt(self.vocab, p, [self.vocab.brk]) for p in prefixes]
        return cond, uncond

    # --- text -> image -------------------------------------------------------------------
    def text_to_image_codes(
        self, captions: Sequence[str], dec: Decoding, seed: int = 0, batch_size: int = IMAGE_BATCH
    ) -> np.ndarray:
        """Image codes int64 [len(captions), num_samples, h, w]."""
        cond, uncond = self.text_to_image_prompts(captions, dec.retrieve_k)
        return self.prompt_to_image_codes(cond, uncond, dec, seed, batch_size)

    def prompt_to_image_codes(
        self,
        cond: Sequence[list[int]],
        uncond: Sequence[list[int]],
        dec: Decoding,
        seed: int = 0,
        batch_size: int = IMAGE_BATCH,
    ) -> np.ndarray:
        """Image codes int64 [len(cond), num_samples, h, w] that continue prompts ending with
        the ``<break>`` that opens the image (any task's: text to image, edit, spatial, ...).
        ``uncond`` is each prompt's unconditional stream for the guided strategies."""
        n = dec.num_samples
        rows = [(i, j) for i in range(len(cond)) for j in range(n)]
        out = np.zeros((len(cond), n, self.vocab.image_h, self.vocab.image_w), dtype=np.int64)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            # ``mixed`` is per prompt: its first ceil(n/2) samples use cfg_topp, the rest cdk
            # (the decode loop's own ``mixed`` splits the rows of a batch, not of a prompt).
            strategies = [self.sample_strategy(dec.strategy, j, n) for _, j in chunk]
            for name in dict.fromkeys(strategies):
                part = [r for r, s in zip(chunk, strategies, strict=True) if s == name]
                with self._amp():
                    new = generate(
                        self.model,
                        [cond[i] for i, _ in part],
                        self.vocab,
                        self.vocab.image_tokens + 2,
                        strategy=name,
                        cfg_scale=dec.cfg_scale,
                        temperature=dec.temperature,
                        top_p=dec.top_p,
                        top_k=dec.top_k,
                        cdk_alpha=dec.cdk_alpha,
                        cdk_k=dec.cdk_k,
                        uncond_prompts=[uncond[i] for i, _ in part],
                        mode="image",
                        seed=seed + start,
                    )
                for (i, j), toks in zip(part, new, strict=True):
                    out[i, j] = self.image_codes_from(toks)
        return out

    def task_image_codes(
        self,
        task: str,
        inputs: Sequence[dict],
        dec: Decoding,
        seed: int = 0,
        batch_size: int = IMAGE_BATCH,
    ) -> np.ndarray:
        """Image codes int64 [len(inputs), num_samples, h, w] of an SFT image task (``edit``,
        ``seg2image``, ``edge2image``, ``spatial``, ``text2image``) for each ``inputs`` dict (its
        template's keys, images as code grids), guided against the prompt with its text masked
        (``lit_cm3leon.data.templates.inference_uncond_prompt``)."""
        from lit_cm3leon.data.templates import inference_prompt, inference_uncond_prompt

        cond = [inference_prompt(task, self.codec, **x) for x in inputs]
        uncond = [inference_uncond_prompt(task, self.codec, **x) for x in inputs]
        return self.prompt_to_image_codes(cond, uncond, dec, seed, batch_size)

    @staticmethod
    def sample_strategy(strategy: str, j: int, n: int) -> str:
        """The strategy of sample ``j`` of ``n`` of one prompt (``mixed``: cfg_topp, then cdk)."""
        if strategy != "mixed":
            return strategy
        return "cfg_topp" if j < (n + 1) // 2 else "cdk"

    def image_codes_from(self, tokens: Sequence[int]) -> np.ndarray:
        codes = [t - self.vocab.image_offset for t in tokens if self.vocab.is_image(t)]
        codes = (codes + [0] * self.vocab.image_tokens)[: self.vocab.image_tokens]
        return np.asarray(codes, dtype=np.int64).reshape(self.vocab.image_h, self.vocab.image_w)

    def decode_images(self, codes: np.ndarray) -> np.ndarray:
        """codes int [..., h, w] -> uint8 [..., H, W, 3]."""
        if self.image_tokenizer is None:
            raise ValueError("no image tokenizer loaded: Engine.load(...) or pass image_tokenizer=")
        lead = codes.shape[:-2]
        flat = torch.as_tensor(codes.reshape(-1, *codes.shape[-2:]))
        pixels = self.image_tokenizer.decode(flat).cpu().numpy()
        return pixels.reshape(*lead, *pixels.shape[1:])

    def text_to_image(
        self,
        captions: Sequence[str],
        dec: Decoding,
        seed: int = 0,
        scorer: Callable[[Sequence[np.ndarray], str], np.ndarray] | None = None,
    ) -> np.ndarray:
        """Images uint8 [N, num_samples, H, W, 3], best first: with ``scorer`` (the retriever
        CLIP) and ``num_samples > 1`` the candidates are re-ranked by its score."""
        images = self.decode_images(self.text_to_image_codes(captions, dec, seed))
        if scorer is not None and dec.num_samples > 1:
            from lit_cm3leon.decode.rerank import rerank

            images = np.stack(
                [images[i, rerank(list(images[i]), c, scorer)] for i, c in enumerate(captions)]
            )
        return images

    # --- image -> text -------------------------------------------------------------------
    def image_to_text(
        self,
        codes: np.ndarray | None,
        dec: Decoding,
        seed: int = 0,
        prompts: list[list[int]] | None = None,
    ) -> list[str]:
        """Greedy/sampled text after ``<bos> image <break>`` for each code grid of ``codes``, or
        after the given prompt ids (then ``codes`` is not read)."""
        if prompts is None:
            prompts = [
                [self.vocab.bos] + self.codec.encode(Document([Image(c)])) + [self.vocab.brk]
                for c in codes
            ]
        with self._amp():
            new = generate(
                self.model,
                prompts,
                self.vocab,
                dec.max_text_tokens,
                strategy="temperature",
                temperature=dec.temperature,
                top_k=dec.top_k,
                mode="text",
                seed=seed,
            )
        return [
            self.codec.decode_text(
                [t for t in toks if self.vocab.is_text(t) or self.vocab.is_loc(t)]
            ).strip()
            for toks in new
        ]

    # --- infilling (CM3: the hole becomes <mask:0>, the model writes the span after <infill> <mask:0>)
    def infill_text(
        self, codes: np.ndarray, text: str, dec: Decoding, seed: int = 0, hole: str = "<mask>"
    ) -> str:
        """Fill ``hole`` in ``text`` describing the image ``codes``:
        ``<bos> IMG <break> before <mask:0> after <infill> <mask:0>`` -> the span, up to ``<eos>``."""
        if text.count(hole) != 1:
            raise ValueError(f"text infilling needs exactly one {hole!r} in the text, got {text!r}")
        before, after = text.split(hole)
        v = self.vocab
        prompt = (
            [v.bos]
            + self.codec.encode(Document([Image(codes)]))
            + [v.brk]
            + self.codec.encode_text(before)
            + [v.mask(0)]
            + self.codec.encode_text(after)
            + [v.infill, v.mask(0)]
        )
        with self._amp():
            new = generate(
                self.model,
                [prompt],
                v,
                dec.max_text_tokens,
                strategy="temperature",
                temperature=dec.temperature,
                top_k=dec.top_k,
                mode="text",
                seed=seed,
                stop_ids=[v.mask(1)],
            )[0]
        return self.codec.decode_text([t for t in new if v.is_text(t)])

    def infill_image(
        self, caption: str, codes: np.ndarray, start: int, stop: int, dec: Decoding, seed: int = 0
    ) -> np.ndarray:
        """Regenerate image tokens ``[start, stop)`` (row-major) given the caption and the rest:
        ``<bos> caption <break> IMG[:start] <mask:0> IMG[stop:] <infill> <mask:0>`` -> stop - start codes."""
        v = self.vocab
        flat = np.asarray(codes).reshape(-1)
        if not 0 <= start < stop <= flat.size:
            raise ValueError(
                f"infill region [{start}, {stop}) outside the image's {flat.size} tokens"
            )
        img = [v.image_offset + int(c) for c in flat]
        prompt = (
            [v.bos]
            + self.codec.encode_text(caption)
            + [v.brk]
            + img[:start]
            + [v.mask(0)]
            + img[stop:]
            + [v.infill, v.mask(0)]
        )
        with self._amp():
            new = generate(
                self.model,
                [prompt],
                v,
                stop - start + 1,
                strategy="temperature",
                temperature=dec.temperature,
                top_k=dec.top_k,
                mode="any",
                seed=seed,
            )[0]
        span = [t - v.image_offset for t in new if v.is_image(t)][: stop - start]
        out = flat.copy()
        out[start : start + len(span)] = span
        return out.reshape(np.asarray(codes).shape)

    # --- scoring -------------------------------------------------------------------------
    @torch.no_grad()
    def image_nll(
        self, captions: Sequence[str], codes: np.ndarray, retrieve_k: int = 0, batch_size: int = 16
    ) -> np.ndarray:
        """Mean negative log-likelihood (nats) of each image's codes given its caption [N]."""
        cond, _ = self.text_to_image_prompts(captions, retrieve_k)
        off = self.vocab.image_offset
        rows = [
            p + [off + int(c) for c in np.asarray(img).reshape(-1)]
            for p, img in zip(cond, codes, strict=True)
        ]
        out = np.zeros(len(rows))
        n_img = self.vocab.image_tokens
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # batches of like lengths
        for s in range(0, len(rows), batch_size):
            chunk = order[s : s + batch_size]
            L = max(len(rows[j]) for j in chunk)
            ids = torch.full((len(chunk), L), self.vocab.pad, dtype=torch.long)
            for i, j in enumerate(chunk):  # right-pad: image codes end each row at its length
                ids[i, : len(rows[j])] = torch.tensor(rows[j])
            with self._amp():
                logits = self.model(ids[:, :-1]).float()
            logp = F.log_softmax(logits, -1)
            for i, j in enumerate(chunk):
                t = torch.arange(len(rows[j]) - n_img, len(rows[j]))
                out[j] = -logp[i, t - 1, ids[i, t]].mean().item()
        return out
