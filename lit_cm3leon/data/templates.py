"""Instruction-tuning task templates: an example -> (prompt Document, target Document) -> ids.

Every task is one :class:`Template`. A rendered example is a prompt document (the inputs: images
first, then the instruction text) and a target document (the answer: one text or one image).
Training sequence and inference prompt share one layout::

    training   <bos> P_1 <break> ... <break> P_k <break> T <eos>
    inference  <bos> P_1 <break> ... <break> P_k <break>            -> the decoder continues with T

``P_i`` are the prompt's segments and ``T`` the target's, each encoded by
:class:`~lit_cm3leon.tokenizer.codec.DocumentCodec` (so the whole sequence is the codec's
encoding of the document ``prompt + target`` wrapped in ``<bos> ... <eos>``). Generation starts
right after the ``<break>`` that ends the prompt: it opens the target image (decode with
``mode="image"``) or the answer text (``mode="text"``, stops at ``<eos>``).

The loss covers the target only (``loss_on="target"``: ``T`` and ``<eos>``), or every
non-padding id (``loss_on="all"``).

Unconditional examples (``unconditional=True``, SFT's ``cfg_dropout``) replace the prompt's text
by one ``<mask:0>`` and keep its images: ``<bos> P_img <break> <mask:0> <break> T <eos>``, the
unconditional stream that classifier-free guidance decodes beside the prompt at inference
(:func:`lit_cm3leon.decode.generate.make_uncond_prompt`), so that stream is one the model was
trained on.

Formats, ``IMG`` = the 8x8 (shapes) or h x w code grid of one image, ``"..."`` = text::

    task          prompt                                                          target
    caption_short IMG <break> "Describe the image in a few words."          <break> "a red circle" <eos>
    caption_long  IMG <break> "Describe the image in detail."               <break> "a large red ..." <eos>
    paragraph     IMG <break> "Describe the image in a paragraph."          <break> "There are two ..." <eos>
    vqa           IMG <break> "Question: what color is the circle? Answer:" <break> "red" <eos>
    reasoning     IMG <break> "Answer yes or no. is there a red circle?"    <break> "yes" <eos>
    edit          IMG_src <break> "Edit the image: make the circle green"   <break> IMG_tgt <eos>
    seg2image     IMG_seg <break> "Generate an image from the segmentation map: a red circle"
                                                                            <break> IMG <eos>
    edge2image    IMG_edge <break> "Generate an image from the edge map: a red circle"
                                                                            <break> IMG <eos>
    spatial       "Generate an image with a red circle <loc:9><loc:9><loc:34><loc:34>"
                                                                            <break> IMG <eos>
    text2image    "a red circle"                                            <break> IMG <eos>

Why these: pretraining saw ``<bos> caption <break> IMG <eos>`` and ``<bos> IMG <break> caption
<eos>``. Text-to-image keeps the first exactly (so the pretrained model and the FID protocol use
the same prompt); image-to-text tasks keep "image, then text" with the instruction between; the
image-generation tasks end their prompt with text right before the image, as in pretraining.
Location tokens ``<loc:N>`` are single ids (``Vocab.loc``); a box ``(x0, y0, x1, y1)`` in pixels
becomes ``<loc:q(x0)><loc:q(y0)><loc:q(x1)><loc:q(y1)>`` with ``q(c) = min(n_loc - 1,
floor(c / size * n_loc))`` (:func:`quantize_box`).

Example dicts (readers and the shapes world make them; codes are ``int[h, w]`` arrays):

    caption_short, caption_long  {image, caption}
    paragraph                    {image, paragraph}
    vqa, reasoning               {image, question, answer}
    edit                         {image (source), instruction, target (edited image)}
    seg2image, edge2image        {condition (map image), caption, image}
    spatial                      {objects: [{label, box: [x0, y0, x1, y1]}], size: [W, H], image}
    text2image                   {caption, image}

:func:`inference_prompt` builds the prompt ids of a task from the same keys (no target).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lit_cm3leon.objective.sequence import trim_text
from lit_cm3leon.tokenizer.codec import DocumentCodec
from lit_cm3leon.tokenizer.document import Document, Image, Text

LossOn = Literal["target", "all"]

INSTRUCTIONS: dict[str, str] = {
    "caption_short": "Describe the image in a few words.",
    "caption_long": "Describe the image in detail.",
    "paragraph": "Describe the image in a paragraph.",
    "vqa": "Question: {question} Answer:",
    "reasoning": "Answer yes or no. {question}",
    "edit": "Edit the image: {instruction}",
    "seg2image": "Generate an image from the segmentation map: {caption}",
    "edge2image": "Generate an image from the edge map: {caption}",
    "spatial": "Generate an image with {objects}",
    "text2image": "{caption}",
}


def quantize_coord(c: float, size: float, n_loc: int = 100) -> int:
    """A pixel coordinate in ``[0, size]`` -> a location bin in ``0..n_loc-1``."""
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    return int(min(n_loc - 1, max(0, np.floor(float(c) / float(size) * n_loc))))


def quantize_box(
    box: Sequence[float], width: float, height: float, n_loc: int = 100
) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` in pixels -> four location bins (x by width, y by height)."""
    x0, y0, x1, y1 = box
    return (
        quantize_coord(x0, width, n_loc), quantize_coord(y0, height, n_loc),
        quantize_coord(x1, width, n_loc), quantize_coord(y1, height, n_loc),
    )  # fmt: skip


def box_text(box: Sequence[float], width: float, height: float, n_loc: int = 100) -> str:
    return "".join(f"<loc:{q}>" for q in quantize_box(box, width, height, n_loc))


def _codes(x: Any, key: str) -> Image:
    if x is None:
        raise KeyError(f"the example has no {key!r} (an image code grid)")
    return Image(np.asarray(x, dtype=np.int64))


def _text(ex: Mapping[str, Any], key: str) -> str:
    value = ex.get(key)
    if not isinstance(value, str) or not value.strip():
        raise KeyError(f"the example has no non-empty text {key!r}")
    return value.strip()


@dataclass(frozen=True)
class Template:
    """One task: which inputs go in the prompt, in what words, and what the target is."""

    task: str
    target: Literal["text", "image"]  # modality of the target (decode mode at inference)
    prompt_fn: Callable[[Mapping[str, Any], int], Document]  # (inputs, n_loc) -> prompt document
    target_key: str  # the example key holding the target

    def prompt(self, inputs: Mapping[str, Any], n_loc: int = 100) -> Document:
        """The prompt document from the task's inputs (no target needed)."""
        return self.prompt_fn(inputs, n_loc)

    def target_doc(self, example: Mapping[str, Any]) -> Document:
        if self.target == "text":
            return Document([Text(_text(example, self.target_key))])
        return Document([_codes(example.get(self.target_key), self.target_key)])

    def render(self, example: Mapping[str, Any], n_loc: int = 100) -> tuple[Document, Document]:
        """``(prompt, target)`` documents of one example."""
        return self.prompt(example, n_loc), self.target_doc(example)


def _image_then(task: str, image_key: str = "image"):
    def fn(ex: Mapping[str, Any], n_loc: int) -> Document:
        fields = {
            k: _text(ex, k)
            for k in ("question", "instruction", "caption")
            if f"{{{k}}}" in INSTRUCTIONS[task]
        }
        return Document(
            [_codes(ex.get(image_key), image_key), Text(INSTRUCTIONS[task].format(**fields))]
        )

    return fn


def _spatial_prompt(ex: Mapping[str, Any], n_loc: int) -> Document:
    objects = ex.get("objects")
    size = ex.get("size")
    if not objects or size is None:
        raise KeyError("spatial examples need 'objects' [{label, box}] and 'size' [W, H]")
    width, height = size
    parts = [f"{o['label'].strip()} {box_text(o['box'], width, height, n_loc)}" for o in objects]
    joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return Document([Text(INSTRUCTIONS["spatial"].format(objects=joined))])


def _text2image_prompt(ex: Mapping[str, Any], n_loc: int) -> Document:
    return Document([Text(_text(ex, "caption"))])


TEMPLATES: dict[str, Template] = {
    "caption_short": Template("caption_short", "text", _image_then("caption_short"), "caption"),
    "caption_long": Template("caption_long", "text", _image_then("caption_long"), "caption"),
    "paragraph": Template("paragraph", "text", _image_then("paragraph"), "paragraph"),
    "vqa": Template("vqa", "text", _image_then("vqa"), "answer"),
    "reasoning": Template("reasoning", "text", _image_then("reasoning"), "answer"),
    "edit": Template("edit", "image", _image_then("edit"), "target"),
    "seg2image": Template("seg2image", "image", _image_then("seg2image", "condition"), "image"),
    "edge2image": Template("edge2image", "image", _image_then("edge2image", "condition"), "image"),
    "spatial": Template("spatial", "image", _spatial_prompt, "image"),
    "text2image": Template("text2image", "image", _text2image_prompt, "image"),
}
TASKS: tuple[str, ...] = tuple(TEMPLATES)


def get_template(task: str) -> Template:
    if task not in TEMPLATES:
        raise KeyError(f"unknown SFT task {task!r}; tasks: {', '.join(TASKS)}")
    return TEMPLATES[task]


# --- ids -----------------------------------------------------------------------------------
def prompt_ids(codec: DocumentCodec, prompt: Document) -> list[int]:
    """``<bos> encode(prompt) <break>``: what the decode loop is given."""
    v = codec.vocab
    return [v.bos, *codec.encode(prompt), v.brk]


def encode_example(
    codec: DocumentCodec,
    prompt: Document,
    target: Document,
    loss_on: LossOn = "target",
    max_len: int | None = None,
    unconditional: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, weights)`` of ``<bos> prompt <break> target <eos>``; ``weights[t]`` is the loss
    weight of predicting ``ids[t]`` (1 on the target and ``<eos>`` only, or on all but
    ``<bos>`` with ``loss_on="all"``). ``unconditional``: the prompt's text is one ``<mask:0>``
    (module doc).

    With ``max_len`` the prompt's text is trimmed (never an image, never the target) so the
    sequence fits; a ValueError says so when even that is not enough.
    """
    if loss_on not in ("target", "all"):
        raise ValueError(f"loss_on must be 'target' or 'all', got {loss_on!r}")
    v = codec.vocab
    if unconditional:
        p = np.asarray(unconditional_ids(codec, prompt), dtype=np.int64)
    else:
        p = np.asarray(codec.encode(prompt), dtype=np.int64)
    t = np.asarray(codec.encode(target), dtype=np.int64)
    if max_len is not None:
        room = max_len - t.size - 3  # <bos>, the <break> before the target, <eos>
        if room < 0:
            raise ValueError(
                f"the target alone needs {t.size + 3} ids, more than max_len={max_len}"
            )
        if p.size > room:
            p = trim_text(p, v, room)
    ids = np.concatenate([[v.bos], p, [v.brk], t, [v.eos]]).astype(np.int64)
    weights = np.zeros(ids.size, dtype=np.float32)
    start = 0 if loss_on == "all" else p.size + 2
    weights[max(1, start) :] = 1.0
    return ids, weights


def render_ids(
    codec: DocumentCodec,
    task: str,
    example: Mapping[str, Any],
    loss_on: LossOn = "target",
    max_len: int | None = None,
    unconditional: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one example of ``task`` and encode it (:func:`encode_example`)."""
    prompt, target = get_template(task).render(example, codec.vocab.n_loc)
    return encode_example(codec, prompt, target, loss_on, max_len, unconditional)


def unconditional_ids(codec: DocumentCodec, prompt: Document) -> list[int]:
    """The prompt of the unconditional stream, without ``<bos>`` and the closing ``<break>``:
    the prompt's images kept (then ``<break>``), its text one ``<mask:0>`` (module doc)."""
    v = codec.vocab
    images = [seg for seg in prompt.segments if isinstance(seg, Image)]
    head = [*codec.encode(Document(images)), v.brk] if images else []
    return [*head, v.mask(0)]


def inference_uncond_prompt(task: str, codec: DocumentCodec, **inputs: Any) -> list[int]:
    """The unconditional stream that guidance decodes beside :func:`inference_prompt` with the
    same inputs, e.g. ``<bos> IMG_src <break> <mask:0> <break>`` for an edit: what
    ``data.cfg_dropout`` trains and the evaluations decode."""
    v = codec.vocab
    prompt = get_template(task).prompt(inputs, v.n_loc)
    return [v.bos, *unconditional_ids(codec, prompt), v.brk]


def inference_prompt(task: str, codec: DocumentCodec, **inputs: Any) -> list[int]:
    """Prompt ids for generation, e.g. ``inference_prompt("vqa", codec, image=codes,
    question="what color is the circle?")`` or ``inference_prompt("text2image", codec,
    caption="a red circle")``. Decode with ``mode=TEMPLATES[task].target`` from there."""
    return prompt_ids(codec, get_template(task).prompt(inputs, codec.vocab.n_loc))


def decode_target(task: str, codec: DocumentCodec, new_ids: Sequence[int]) -> str | np.ndarray:
    """What the decode loop produced after :func:`inference_prompt`, as the task's answer: the
    text (stripped; up to ``<eos>``/``<break>``) or the image code grid ``int64[h, w]``."""
    v = codec.vocab
    ids = [int(t) for t in new_ids]
    if get_template(task).target == "image":
        codes = [t for t in ids if v.is_image(t)][: v.image_tokens]
        return codec.decode_image(codes, strict=False)
    stop = next((k for k, t in enumerate(ids) if t in (v.eos, v.brk)), len(ids))
    return codec.decode_text([t for t in ids[:stop] if v.is_text(t) or v.is_loc(t)]).strip()


def split_target(ids: Sequence[int], codec: DocumentCodec) -> tuple[list[int], list[int]]:
    """Inverse of the layout: ``(prompt ids incl. <bos> ... <break>, target ids without <eos>)``."""
    v = codec.vocab
    x = [int(i) for i in ids]
    while x and x[-1] == v.pad:
        x.pop()
    if len(x) < 3 or x[0] != v.bos or x[-1] != v.eos:
        raise ValueError("an SFT sequence starts with <bos> and ends with <eos>")
    body = x[1:-1]
    last = max(i for i, t in enumerate(body) if t == v.brk)
    return [v.bos, *body[: last + 1]], body[last + 1 :]
