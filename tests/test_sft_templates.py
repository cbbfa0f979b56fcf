"""SFT task templates: rendering, codec round trip, loss mask, inference prompts."""

from __future__ import annotations

import numpy as np
import pytest

from lit_cm3leon.data.templates import (
    TASKS,
    TEMPLATES,
    decode_target,
    encode_example,
    get_template,
    inference_prompt,
    inference_uncond_prompt,
    quantize_box,
    render_ids,
    split_target,
)
from lit_cm3leon.tokenizer.codec import DocumentCodec
from lit_cm3leon.tokenizer.document import Document, Image, Text
from tests.fixtures import make_text_tokenizer


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    root = make_text_tokenizer(tmp_path_factory.mktemp("tok"), n_codes=16, hw=4)
    return DocumentCodec.load(root)


def example(task: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def img():
        return rng.integers(0, 16, (4, 4))

    common = {
        "image": img(),
        "caption": "a red circle and a blue square",
        "question": "what color is the circle?",
        "answer": "red",
        "paragraph": "There are two shapes. A red circle is on the left.",
        "instruction": "make the circle green",
        "target": img(),
        "condition": img(),
        "objects": [
            {"label": "a red circle", "box": [2, 3, 10, 12]},
            {"label": "a blue square", "box": [20, 20, 32, 32]},
        ],
        "size": [32, 32],
    }
    if task == "reasoning":
        common.update(question="is there a red circle?", answer="yes")
    return common


@pytest.mark.parametrize("task", TASKS)
def test_render_round_trips_and_masks_the_prompt(codec, task):
    v = codec.vocab
    prompt, target = get_template(task).render(example(task))
    full = Document(prompt.segments + target.segments)
    assert codec.decode(codec.encode(full)) == full
    ids, w = render_ids(codec, task, example(task))
    assert ids[0] == v.bos and ids[-1] == v.eos
    assert (
        codec.decode(ids[1:-1]) == full
    )  # the sequence is the codec's encoding of prompt + target
    p_ids, t_ids = split_target(ids, codec)
    assert p_ids == inference_prompt(task, codec, **example(task))  # what generation starts from
    assert p_ids[-1] == v.brk
    n_p = len(p_ids)
    assert w[:n_p].sum() == 0 and (w[n_p:] == 1).all()  # loss on the target and <eos> only
    assert codec.decode(t_ids) == target
    if TEMPLATES[task].target == "image":
        assert len(t_ids) == v.image_tokens and all(v.is_image(t) for t in t_ids)
    else:
        assert all(v.is_text(t) for t in t_ids)
    out = decode_target(
        task, codec, [*t_ids, v.eos, v.pad]
    )  # what generation returns -> the answer
    if TEMPLATES[task].target == "image":
        assert np.array_equal(out, target.segments[0].codes)
    else:
        assert out == target.segments[0].text
    _, w_all = render_ids(codec, task, example(task), loss_on="all")
    assert w_all[0] == 0 and (w_all[1:] == 1).all()
    # guidance's unconditional stream at inference is the prompt cfg_dropout trains
    u_ids, _ = render_ids(codec, task, example(task), unconditional=True)
    uncond = inference_uncond_prompt(task, codec, **example(task))
    assert split_target(u_ids, codec)[0] == uncond and v.mask(0) in uncond
    images = [s for s in prompt.segments if isinstance(s, Image)]
    assert uncond == [v.bos, *codec.encode(Document(images)), *([v.brk] if images else []),
                      v.mask(0), v.brk]  # fmt: skip


def test_formats_are_as_documented(codec):
    v = codec.vocab
    ex = example("vqa")
    ids = inference_prompt("vqa", codec, image=ex["image"], question="what color is the circle?")
    img = (ex["image"].reshape(-1) + v.image_offset).tolist()
    assert ids == [
        v.bos,
        *img,
        v.brk,
        *codec.encode_text("Question: what color is the circle? Answer:"),
        v.brk,
    ]
    t2i = inference_prompt("text2image", codec, caption="a red circle")
    assert t2i == [v.bos, *codec.encode_text("a red circle"), v.brk]  # the pretraining pair format
    cap = inference_prompt("caption_short", codec, image=ex["image"])
    assert cap == [
        v.bos,
        *img,
        v.brk,
        *codec.encode_text("Describe the image in a few words."),
        v.brk,
    ]


def test_spatial_boxes_become_location_tokens(codec):
    v = codec.vocab
    assert quantize_box([0, 0, 32, 32], 32, 32) == (0, 0, 99, 99)
    assert quantize_box([16, 8, 24, 31.9], 32, 32) == (50, 25, 75, 99)
    assert quantize_box([10, 10, 20, 20], 40, 20) == (25, 50, 50, 99)
    prompt, _ = get_template("spatial").render(example("spatial"))
    text = prompt.segments[0].text
    assert (
        "a red circle <loc:6><loc:9><loc:31><loc:37>" in text
        and "<loc:62><loc:62><loc:99><loc:99>" in text
    )
    ids = codec.encode(prompt)
    locs = [t - v.loc_offset for t in ids if v.is_loc(t)]
    assert locs == [6, 9, 31, 37, 62, 62, 99, 99]


def test_long_prompt_text_is_trimmed_never_images_or_target(codec):
    v = codec.vocab
    ex = {**example("edit"), "instruction": "make the circle green " * 40}
    prompt, target = get_template("edit").render(ex)
    ids, w = encode_example(codec, prompt, target, max_len=50)
    assert len(ids) <= 50
    assert sum(v.is_image(t) for t in ids) == 2 * v.image_tokens  # both images kept whole
    _, t_ids = split_target(ids, codec)
    assert codec.decode(t_ids) == target and w.sum() == v.image_tokens + 1
    with pytest.raises(ValueError, match="target alone"):
        encode_example(codec, prompt, target, max_len=10)


def test_missing_inputs_name_the_key(codec):
    with pytest.raises(KeyError, match="question"):
        inference_prompt("vqa", codec, image=np.zeros((4, 4), int))
    with pytest.raises(KeyError, match="unknown SFT task"):
        get_template("poetry")
    with pytest.raises(KeyError, match="answer"):
        render_ids(codec, "vqa", {**example("vqa"), "answer": "  "})


@pytest.mark.parametrize("task", TASKS)
def test_decode_state_after_prompt_matches_target(codec, task):
    """The generation loop's modality mask reads each prompt as opening the target's modality."""
    import torch

    from lit_cm3leon.decode.processors import ModalityMask

    mode = TEMPLATES[task].target
    mask = ModalityMask(codec.vocab, mode)
    mask.reset([inference_prompt(task, codec, **example(task))])
    allowed = mask.allowed()[0]
    v = codec.vocab
    if mode == "image":
        assert allowed[v.image_offset : v.special_offset].all() and not allowed[v.brk]
    else:
        assert allowed[: v.n_text].all() and not allowed[v.image_offset : v.special_offset].any()
    assert isinstance(allowed, torch.Tensor)


def test_image_segments_compare_by_codes():
    a = Document([Image(np.arange(16).reshape(4, 4)), Text("x")])
    b = Document([Image(np.arange(16).reshape(4, 4)), Text("x")])
    assert a == b


@pytest.mark.parametrize("task", ["edit", "vqa", "text2image", "caption_short"])
def test_generation_from_an_inference_prompt(codec, task):
    """The decode loop continues an inference prompt with exactly one target of the right modality."""
    import torch

    from lit_cm3leon.decode.generate import generate
    from lit_cm3leon.model import ModelConfig, build_model

    torch.manual_seed(0)
    v = codec.vocab
    model = build_model(
        ModelConfig(vocab_size=v.size, n_layer=1, n_head=2, d_model=32, max_seq_len=128)
    ).eval()
    mode = TEMPLATES[task].target
    prompt = inference_prompt(task, codec, **example(task))
    (new,) = generate(
        model,
        [prompt],
        v,
        max_new_tokens=v.image_tokens + 1 if mode == "image" else 12,
        strategy="temperature",
        mode=mode,
        seed=1,
    )
    if mode == "image":
        assert all(v.is_image(t) for t in new[: v.image_tokens]) and new[v.image_tokens :] == [
            v.brk
        ]
        assert decode_target(task, codec, new).shape == (v.image_h, v.image_w)
    else:
        body = new[:-1] if new[-1] == v.eos else new
        assert all(v.is_text(t) or v.is_loc(t) for t in body)
        assert isinstance(decode_target(task, codec, new), str)
