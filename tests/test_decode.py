"""Decoding: processors against direct computations, the generation loop's invariants."""

from __future__ import annotations

import pytest
import torch

from lit_cm3leon.decode import (
    Chain,
    ClassifierFreeGuidance,
    ContrastiveTopK,
    DecodeState,
    EditGuidance,
    ModalityMask,
    Temperature,
    TopK,
    TopP,
    generate,
    make_uncond_prompt,
    rerank,
    row_strategies,
)
from lit_cm3leon.model import ModelConfig, build_model
from lit_cm3leon.tokenizer.vocab import Vocab

torch.set_num_threads(1)
S = DecodeState()
VOCAB = Vocab(n_text=40, n_image=24, image_h=2, image_w=3, n_loc=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig.preset("debug", vocab_size=VOCAB.size))
    with torch.no_grad():  # random, peaked logits instead of the zero-init head
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return m.eval()


def _prompts(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        text = torch.randint(0, VOCAB.n_text, (2 + i % 3,), generator=g).tolist()
        out.append([VOCAB.bos, *text, VOCAB.brk])
    unc = [make_uncond_prompt(VOCAB, [VOCAB.bos], [VOCAB.brk]) for _ in range(n)]
    return out, unc


# --- processors ------------------------------------------------------------------------------


def test_top_p_keeps_smallest_set_with_mass_at_least_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(TopP(p)(logits, S))  # noqa: E731
    assert kept(0.5)[0].tolist() == [True, False, False, False]  # 0.5 >= 0.5 already
    assert kept(0.6)[0].tolist() == [True, True, False, False]
    assert kept(0.8)[0].tolist() == [True, True, False, False]  # 0.8 reached exactly
    assert kept(0.81)[0].tolist() == [True, True, True, False]
    assert kept(0.81)[1].tolist() == [False, True, True, True]
    assert kept(0.01)[1].tolist() == [False, False, False, True]
    assert kept(1.0).all()
    # random check: kept mass >= p and dropping the least likely kept token falls below p
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 30, generator=g) * 2
    for p in (0.1, 0.5, 0.9):
        keep = torch.isfinite(TopP(p)(x, S))
        pr = x.softmax(-1)
        mass = (pr * keep).sum(-1)
        smallest = torch.where(keep, pr, torch.inf).min(-1).values
        assert (mass >= p - 1e-6).all() and (mass - smallest < p).all()


def test_top_k_and_temperature():
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isfinite(TopK(2)(x, S)).tolist() == [[False, True, True, False]]
    assert TopK(0)(x, S).equal(x)
    torch.testing.assert_close(Temperature(0.5)(x, S), x * 2)
    greedy = Temperature(0)(x, S)
    assert torch.isfinite(greedy).tolist() == [[False, True, False, False]]
    chain = Chain([TopK(3), Temperature(2.0)])
    torch.testing.assert_close(chain(x, S), torch.tensor([[0.5, 1.5, 1.0, float("-inf")]]))


def test_cfg_scale_one_is_cond_and_zero_is_uncond():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g)
    x = torch.cat([cond, uncond])
    torch.testing.assert_close(ClassifierFreeGuidance(1.0)(x, S).softmax(-1), cond.softmax(-1))
    torch.testing.assert_close(ClassifierFreeGuidance(0.0)(x, S).softmax(-1), uncond.softmax(-1))
    s = 3.0
    direct = uncond.log_softmax(-1) + s * (cond.log_softmax(-1) - uncond.log_softmax(-1))
    torch.testing.assert_close(ClassifierFreeGuidance(s)(x, S), direct)
    # a token masked in both streams stays masked, no NaN
    x[:, 4] = float("-inf")
    out = ClassifierFreeGuidance(s)(x, S)
    assert torch.isneginf(out[:, 4]).all() and not torch.isnan(out).any()


def test_edit_guidance_three_streams():
    g = torch.Generator().manual_seed(2)
    full, img, unc = (torch.randn(2, 9, generator=g) for _ in range(3))
    x = torch.cat([full, img, unc])
    lf, li, lu = (t.log_softmax(-1) for t in (full, img, unc))
    torch.testing.assert_close(EditGuidance(1.5, 7.0)(x, S), lu + 1.5 * (li - lu) + 7.0 * (lf - li))
    torch.testing.assert_close(EditGuidance(1.0, 1.0)(x, S).softmax(-1), full.softmax(-1))
    torch.testing.assert_close(EditGuidance(1.0, 0.0)(x, S).softmax(-1), img.softmax(-1))


def test_cdk_on_hand_made_distributions():
    p_cond = torch.tensor([[0.40, 0.25, 0.20, 0.10, 0.05]])
    p_unc = torch.tensor([[0.60, 0.05, 0.10, 0.05, 0.20]])
    x = torch.cat([p_cond.log(), p_unc.log()])
    # k = 2: 2nd largest p_cond = 0.25; alpha 0.5 -> threshold 0.125: tokens 0, 1, 2
    out = ContrastiveTopK(alpha=0.5, k=2)(x, S)
    expected = torch.tensor([[(0.4 / 0.6), (0.25 / 0.05), (0.20 / 0.10), 0, 0]]).log()
    expected[0, 3:] = float("-inf")
    torch.testing.assert_close(out, expected)
    # k = 4: 4th largest 0.10, alpha 1 -> tokens 0..3
    keep = torch.isfinite(ContrastiveTopK(alpha=1.0, k=4)(x, S))
    assert keep.tolist() == [[True, True, True, True, False]]
    # greedy CD-K picks the largest contrast inside the plausible set
    assert ContrastiveTopK(0.5, 2)(x, S).argmax(-1).item() == 1
    # random: equals the direct definition
    g = torch.Generator().manual_seed(3)
    c, u = torch.randn(4, 20, generator=g) * 2, torch.randn(4, 20, generator=g) * 2
    pc = c.softmax(-1)
    kth = pc.sort(-1, descending=True).values[:, 6:7]
    direct = torch.where(pc >= 0.3 * kth, c.log_softmax(-1) - u.log_softmax(-1), float("-inf"))
    torch.testing.assert_close(ContrastiveTopK(0.3, 7)(torch.cat([c, u]), S), direct)


def test_modality_mask_state_machine():
    v = VOCAB
    m = ModalityMask(v, "any")
    m.reset([[v.bos, 1, 2], [v.bos, 1, v.brk], [v.brk, *([v.image_offset] * 6)]])
    allowed = m.allowed()
    assert allowed[0, 5] and allowed[0, v.eos] and allowed[0, v.brk] and allowed[0, v.loc(0)]
    assert not allowed[0, v.image_offset] and not allowed[0, v.pad] and not allowed[0, v.bos]
    assert allowed[1, v.image_offset : v.special_offset].all() and allowed[1].sum() == v.n_image
    assert allowed[2].nonzero().flatten().tolist() == [v.brk]  # image full: only <break>
    assert ModalityMask(v, "image").table[0].nonzero().flatten().tolist() == [v.brk]
    assert not ModalityMask(v, "text").table[0, v.brk]


@pytest.mark.parametrize("mode", ["any", "image", "text"])
def test_modality_mask_never_violated_fuzz(mode):
    v = VOCAB
    g = torch.Generator().manual_seed(5)
    m = ModalityMask(v, mode)
    B = 16
    m.reset([[v.bos]] * B)
    seqs = [[] for _ in range(B)]
    for step in range(200):
        logits = torch.randn(2 * B, v.size, generator=g) * 5
        out = m(logits, DecodeState(step))
        allowed = m.allowed()
        assert torch.isneginf(out[~allowed.repeat(2, 1)]).all()
        tok = torch.multinomial(out[:B].softmax(-1), 1, generator=g).squeeze(-1)
        assert allowed[torch.arange(B), tok].all()
        m.update(tok)
        for i, t in enumerate(tok.tolist()):
            seqs[i].append(t)
    # every image in the output is exactly image_tokens codes between two <break>
    for s in seqs:
        assert v.pad not in s and v.bos not in s
        in_img, n = False, 0
        for t in s:
            if t == v.brk:
                assert not in_img or n == v.image_tokens
                in_img, n = not in_img, 0
            elif v.is_image(t):
                assert in_img
                n += 1
            else:
                assert not in_img and mode != "image"
        if mode == "text":
            assert all(v.is_text(t) or not (v.is_image(t) or t == v.brk) for t in s)


# --- generation loop -------------------------------------------------------------------------


def _check_image_output(tokens):
    v = VOCAB
    assert len(tokens) == v.image_tokens + 1 and tokens[-1] == v.brk
    assert all(v.is_image(t) for t in tokens[:-1])


@pytest.mark.parametrize("strategy", ["temperature", "topp", "cfg_topp", "cdk", "mixed"])
def test_generate_image_mode_and_same_seed_same_tokens(model, strategy):
    prompts, unc = _prompts(4)
    kw = dict(
        strategy=strategy,
        cfg_scale=3.0,
        top_p=0.9,
        temperature=1.0,
        cdk_alpha=0.1,
        cdk_k=3,
        uncond_prompts=unc,
    )
    a = generate(model, prompts, VOCAB, 20, seed=7, **kw)
    b = generate(model, prompts, VOCAB, 20, seed=7, **kw)
    c = generate(model, prompts, VOCAB, 20, seed=8, **kw)
    assert a == b
    assert a != c
    for toks in a:
        _check_image_output(toks)


def test_temperature_zero_is_deterministic_greedy(model):
    prompts, unc = _prompts(3)
    a = generate(model, prompts, VOCAB, 10, strategy="topp", temperature=0.0, seed=1)
    b = generate(model, prompts, VOCAB, 10, strategy="topp", temperature=0.0, seed=2)
    assert a == b
    # greedy equals argmax of a full forward on the prompt
    ids = torch.tensor([prompts[0]])
    logits = model(ids)[0, -1]
    allowed = ModalityMask(VOCAB, "image")
    allowed.reset([prompts[0]])
    assert a[0][0] == logits.masked_fill(~allowed.allowed()[0], float("-inf")).argmax().item()


def test_incremental_decoding_equals_full_recomputation_with_padding(model):
    prompts, unc = _prompts(5)  # different lengths: left padding
    assert len({len(p) for p in prompts}) > 1
    for strategy in ("topp", "cfg_topp", "cdk"):
        kw = dict(strategy=strategy, cfg_scale=2.0, temperature=0.0, uncond_prompts=unc, mode="any")
        cached = generate(model, prompts, VOCAB, 12, **kw)
        full = generate(model, prompts, VOCAB, 12, use_cache=False, **kw)
        assert cached == full
    # sampling too (same generator draws)
    kw = dict(strategy="cfg_topp", cfg_scale=2.0, top_p=0.95, uncond_prompts=unc, seed=3)
    assert generate(model, prompts, VOCAB, 12, **kw) == generate(
        model, prompts, VOCAB, 12, use_cache=False, **kw
    )


def test_padding_does_not_change_a_sample(model):
    prompts, unc = _prompts(4)
    alone = generate(
        model,
        prompts[:1],
        VOCAB,
        8,
        strategy="cfg_topp",
        temperature=0,
        cfg_scale=2.0,
        uncond_prompts=unc[:1],
    )
    batch = generate(
        model,
        prompts,
        VOCAB,
        8,
        strategy="cfg_topp",
        temperature=0,
        cfg_scale=2.0,
        uncond_prompts=unc,
    )
    assert alone[0] == batch[0]


def test_cfg_scale_one_equals_unguided_greedy(model):
    prompts, unc = _prompts(3)
    plain = generate(model, prompts, VOCAB, 8, strategy="topp", temperature=0)
    guided = generate(
        model,
        prompts,
        VOCAB,
        8,
        strategy="cfg_topp",
        temperature=0,
        cfg_scale=1.0,
        uncond_prompts=unc,
    )
    uncond_only = generate(model, unc, VOCAB, 8, strategy="topp", temperature=0)
    zero = generate(
        model,
        prompts,
        VOCAB,
        8,
        strategy="cfg_topp",
        temperature=0,
        cfg_scale=0.0,
        uncond_prompts=unc,
    )
    assert plain == guided
    assert zero == uncond_only


def test_mixed_strategy_splits_samples(model):
    prompts, unc = _prompts(5)
    assert row_strategies("mixed", 5) == ["cfg_topp"] * 3 + ["cdk"] * 2
    kw = dict(temperature=0, cfg_scale=3.0, cdk_alpha=0.1, cdk_k=3, uncond_prompts=unc)
    mixed = generate(model, prompts, VOCAB, 10, strategy="mixed", **kw)
    cfg = generate(model, prompts, VOCAB, 10, strategy="cfg_topp", **kw)
    cdk = generate(model, prompts, VOCAB, 10, strategy="cdk", **kw)
    assert mixed == cfg[:3] + cdk[3:]
    assert cfg[3:] != cdk[3:]  # the two halves really differ here


def test_text_mode_stops_at_eos_and_holds_no_image(model):
    v = VOCAB
    prompts = [[v.bos, 3, 4, v.sep], [v.bos, 5, v.sep]]
    out = generate(model, prompts, v, 30, strategy="temperature", mode="text", seed=0)
    for toks in out:
        assert all(not v.is_image(t) and t != v.brk for t in toks)
        assert v.eos not in toks[:-1]
    with_stop = generate(
        model, prompts, v, 30, strategy="temperature", mode="text", seed=0, stop_ids=[3]
    )
    for toks, full in zip(with_stop, out, strict=True):
        assert 3 not in toks[:-1] and len(toks) <= len(full)


def test_edit_guidance_generation(model):
    prompts, unc = _prompts(2)
    img_only = [[VOCAB.bos, VOCAB.mask(0), VOCAB.brk]] * 2
    kw = dict(strategy="cfg_topp", temperature=0, uncond_prompts=unc, image_only_prompts=img_only)
    out = generate(model, prompts, VOCAB, 10, cfg_scale=1.0, image_cfg_scale=1.0, **kw)
    assert out == generate(model, prompts, VOCAB, 10, strategy="topp", temperature=0)
    for toks in generate(model, prompts, VOCAB, 10, cfg_scale=4.0, image_cfg_scale=1.5, **kw):
        _check_image_output(toks)


def test_generate_errors(model):
    prompts, _ = _prompts(2)
    with pytest.raises(ValueError, match="uncond"):
        generate(model, prompts, VOCAB, 5, strategy="cfg_topp")
    with pytest.raises(ValueError, match="unknown strategy"):
        generate(model, prompts, VOCAB, 5, strategy="beam")
    with pytest.raises(ValueError, match="edit guidance"):
        generate(model, prompts, VOCAB, 5, strategy="topp", image_only_prompts=prompts)
    assert generate(model, [], VOCAB, 5, strategy="topp") == []
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompts, VOCAB, 1000, strategy="topp")


def test_make_uncond_prompt():
    v = VOCAB
    docs = [v.bos, 1, 2, v.brk, *([v.image_offset] * 6), v.brk, v.sep]
    assert make_uncond_prompt(v, docs, [v.brk]) == [*docs, v.mask(0), v.brk]


def test_rerank_orders_by_scorer():
    images = ["a", "b", "c", "d"]
    scores = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.9}
    calls = []

    def scorer(imgs, text):
        calls.append(text)
        return torch.tensor([scores[i] for i in imgs])

    assert rerank(images, "a red circle", scorer) == [1, 3, 2, 0]
    assert calls == ["a red circle"]
    with pytest.raises(ValueError, match="scores"):
        rerank(images, "x", lambda i, t: [1.0])


def test_param_dtype_copy_leaves_model_untouched(model):
    prompts, unc = _prompts(2)
    kw = dict(strategy="cfg_topp", temperature=0, cfg_scale=2.0, uncond_prompts=unc)
    base = generate(model, prompts, VOCAB, 8, **kw)
    assert generate(model, prompts, VOCAB, 8, param_dtype=torch.float32, **kw) == base
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, prompts, VOCAB, 8, param_dtype=torch.bfloat16, **kw)
    for toks in out:
        _check_image_output(toks)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.train()
    generate(model, prompts, VOCAB, 3, strategy="topp")
    assert model.training
    model.eval()


def test_sample_follows_the_distribution_and_skips_masked_tokens():
    from lit_cm3leon.decode import sample

    probs = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2])
    logits = probs.log().expand(20000, 5)
    g = torch.Generator().manual_seed(0)
    draws = sample(logits, g)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[1] == 0 and freq[3] == 0
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    assert sample(logits[:3], greedy=True).tolist() == [0, 0, 0]


def _retrieval_prompts(n=3, seed=0):
    """``<bos> doc <sep> caption <break>`` prompts whose documents hold an image (different
    lengths), each prompt twice (two samples), with their unconditional streams."""
    g = torch.Generator().manual_seed(seed)
    v = VOCAB
    cond, unc = [], []
    for i in range(n):
        words = torch.randint(0, v.n_text, (1 + i,), generator=g).tolist()
        codes = (
            v.image_offset + torch.randint(0, v.n_image, (v.image_tokens,), generator=g)
        ).tolist()
        prefix = [v.bos, *words, v.brk, *codes, v.brk, v.sep]
        caption = torch.randint(0, v.n_text, (2 + 2 * i,), generator=g).tolist()
        for _ in range(2):
            cond.append([*prefix, *caption, v.brk])
            unc.append(make_uncond_prompt(v, prefix, [v.brk]))
    return cond, unc


@pytest.mark.parametrize(
    "cells",
    [
        {},
        {"copy_heads": 1, "copy_bias": 4.0},
        {"copy_heads": 1, "copy_bias": 4.0, "copy_logit": True},
    ],
    ids=["paper", "copy", "copy_logit"],
)
def test_shared_prefill_equals_full_recomputation(cells):
    """The prefill computes each distinct cond row once and, for the uncond rows, only what
    follows the retrieved documents they share with it: the tokens equal those of recomputing
    every sequence in full at every step."""
    from lit_cm3leon.decode.generate import _shared_layout

    torch.manual_seed(1)
    config = ModelConfig.preset("debug", **cells)
    m = build_model(config.for_vocab(VOCAB))
    with torch.no_grad():
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.2)
    m.eval()
    cond, unc = _retrieval_prompts()
    flat = cond + unc
    donor, rest = _shared_layout(flat, len(cond), VOCAB.is_image)
    assert donor == [0, 0, 2, 2, 4, 4] * 2 and rest == [0] * 6 + [2] * 6
    # a stream sharing half of an image with its cond row (an edit's image-only stream, say):
    # the shared part stops before that image, whose cells run on into the rest
    v, img = VOCAB, [VOCAB.image_offset + t for t in (3, 1, 4, 1, 5, 9)]
    cond2 = [*cond, [v.bos, 7, v.brk, *img, v.brk, 8, 9, 10, v.brk]]
    other = [*unc, [v.bos, 7, v.brk, *img[:3], v.image_offset + 2, v.brk]]
    assert _shared_layout(cond2 + other, len(cond2), v.is_image)[1][-1] == 5
    for strategy in ("cfg_topp", "cdk", "mixed"):
        kw = dict(strategy=strategy, cfg_scale=2.5, cdk_alpha=0.1, cdk_k=3, uncond_prompts=other)
        for extra in (dict(temperature=0.0), dict(top_p=0.9, seed=5)):
            cached = generate(m, cond2, VOCAB, 10, mode="any", **kw, **extra)
            full = generate(m, cond2, VOCAB, 10, mode="any", use_cache=False, **kw, **extra)
            assert cached == full
    # a row that does not fit the layout (uncond longer than its cond) takes the plain prefill
    assert _shared_layout([[1, 2, 3], [1, 4, 5, 6]], 1, VOCAB.is_image) is None
    assert generate(m, [[VOCAB.bos, 5, VOCAB.brk]], VOCAB, 4, strategy="cfg_topp", temperature=0,
                    uncond_prompts=[[VOCAB.bos, 7, 8, 9, VOCAB.brk]]) == generate(
        m, [[VOCAB.bos, 5, VOCAB.brk]], VOCAB, 4, strategy="cfg_topp", temperature=0,
        uncond_prompts=[[VOCAB.bos, 7, 8, 9, VOCAB.brk]], use_cache=False)  # fmt: skip
