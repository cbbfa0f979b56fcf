"""The CM3Leon decoder: sizes, initialisation, KV cache and padding parity, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_cm3leon.model import (
    PRESETS,
    CM3LeonTransformer,
    KVCache,
    ModelConfig,
    attention_mask,
    build_model,
    positions_from_mask,
)
from lit_cm3leon.model.parallelize import fsdp_auto_wrap_policy, fsdp_strategy_kwargs, parallelize
from lit_cm3leon.model.transformer import text_boxes

torch.set_num_threads(1)

PAPER_VOCAB = 64626  # Vocab(n_text=56320, n_image=8192).size

# blocks = 12 * n_layer * d^2; total adds 2 * V * d (embedding, untied head) + max_seq_len * d
EXPECTED = {
    "debug": (98_304, None),
    "shapes": (4_718_592, None),
    "100m": (84_934_656, None),  # total 100,051,968 with a 9,330-id vocabulary
    "350m": (301_989_888, 438_538_240),
    "760m": (679_477_248, 884_299_776),
    "7b": (6_442_450_944, 6_988_644_352),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name):
    cfg = ModelConfig.preset(name, vocab_size=PAPER_VOCAB, cell_embedding=False, copy_heads=0)
    model = build_model(cfg, "meta")
    blocks = sum(p.numel() for p in model.blocks.parameters())
    assert blocks == EXPECTED[name][0] == cfg.block_params()
    assert model.num_params() == cfg.num_params()
    if EXPECTED[name][1] is not None:
        assert model.num_params() == EXPECTED[name][1]
    assert cfg.max_seq_len == (4096 if name in ("350m", "760m", "7b") else cfg.max_seq_len)


def test_preset_shapes_and_errors():
    assert ModelConfig.preset("shapes").n_layer == 6 and ModelConfig.preset("shapes").d_model == 256
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("13b")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(n_head=3, d_model=64)
    with pytest.raises(ValueError, match="vocab_size"):
        CM3LeonTransformer(ModelConfig.preset("debug"))
    cfg = ModelConfig.preset("debug", vocab_size=10)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_init_statistics():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, n_layer=2, n_head=4, d_model=256, max_seq_len=1024)
    model = build_model(cfg)
    names = dict(model.named_parameters())
    # no biases, no layer-norm parameters: only embeddings and linear weights
    assert not any("bias" in n or n.startswith("ln") or ".ln_" in n for n in names)
    assert all(p.dim() == 2 for p in names.values())
    assert torch.count_nonzero(model.lm_head.weight) == 0
    pos = model.pos_emb.weight
    assert abs(pos.std().item() - 0.0002) < 0.00001
    # truncated N(0, 0.006) at 3 std: std of the truncated law is 0.006 * 0.9866
    for n, p in names.items():
        if n in ("pos_emb.weight", "lm_head.weight"):
            continue
        assert p.abs().max().item() <= 3 * 0.006 + 1e-7, n
        assert abs(p.std().item() - 0.006 * 0.9866) < 0.0002, n
        assert abs(p.mean().item()) < 0.0002, n
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())


def _model(seed=0, vocab=97, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("debug", vocab_size=vocab, **kw)
    model = build_model(cfg)
    with torch.no_grad():  # a zero lm head makes every logit 0: give it weights for the checks
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
        for b in model.blocks:
            b.attn.qkv.weight.mul_(30)
        model.pos_emb.weight.mul_(100)
        if model.copy_gate is not None:  # zero at init: make the pointer count in the checks
            torch.nn.init.normal_(model.copy_gate.weight, std=0.5)
            model.copy_gate.bias.fill_(3.0)
    return model.eval()


def test_positions_and_mask_for_left_padding():
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    assert positions_from_mask(valid).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    m = attention_mask(valid, 5)
    assert m.shape == (2, 1, 5, 5)
    assert m[0, 0, 4].tolist() == [False, False, True, True, True]
    assert m[0, 0, 0].tolist() == [True, False, False, False, False]  # pad sees only itself
    assert m[1, 0].equal(torch.ones(5, 5, dtype=torch.bool).tril())


def test_left_padding_matches_unpadded_rows():
    model = _model()
    a = torch.randint(0, 97, (1, 7))
    b = torch.randint(0, 97, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False
    out = model(batch, positions_from_mask(valid), attention_mask(valid, 7))
    torch.testing.assert_close(out[0], model(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 3:], model(b)[0], atol=1e-5, rtol=1e-5)


CELLS = dict(
    cell_embedding=True, image_id_start=40, n_image_ids=40, image_cells=6
)  # ids 40..79 are image tokens
COPY = dict(CELLS, copy_heads=2, copy_bias=4.0)
POINTER = dict(COPY, copy_logit=True)


@pytest.mark.parametrize(
    "cells", [{}, CELLS, COPY, POINTER], ids=["paper", "cell_embedding", "copy_heads", "copy_logit"]
)
def test_kv_cache_prefill_and_steps_equal_full_forward_with_padding(cells):
    model = _model(1, **cells)
    B, L, extra = 3, 6, 5
    ids = torch.randint(0, 97, (B, L + extra))
    valid = torch.ones(B, L + extra, dtype=torch.bool)
    valid[1, :2] = False
    valid[2, :4] = False
    T = L + extra
    full = model(ids, positions_from_mask(valid), attention_mask(valid, T))

    cache = KVCache.allocate(model.config, B, T + 4)  # positions left unfilled: masked
    pre = model(
        ids[:, :L], positions_from_mask(valid[:, :L]), attention_mask(valid[:, :L], L), cache=cache
    )
    steps = [pre]
    for t in range(L, T):
        pos = valid[:, : t + 1].sum(-1, keepdim=True) - 1
        steps.append(model(ids[:, t : t + 1], pos, valid[:, None, None, : t + 1], cache=cache))
    assert cache.length == T and cache.max_len == T + 4
    inc = torch.cat(steps, 1)
    torch.testing.assert_close(inc[valid], full[valid], atol=1e-5, rtol=1e-5)
    assert (full.abs() > 0.1).any()  # not trivially zero


@pytest.mark.parametrize(
    "cells", [{}, CELLS, COPY, POINTER], ids=["paper", "cell_embedding", "copy_heads", "copy_logit"]
)
def test_kv_cache_without_padding_and_reorder(cells):
    model = _model(2, **cells)
    ids = torch.randint(0, 97, (2, 9))
    full = model(ids)
    cache = KVCache.allocate(model.config, 2, 9)
    out = [model(ids[:, :5], cache=cache)]
    out += [model(ids[:, t : t + 1], cache=cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)

    # prefill in two chunks (the second chunk is causal with an offset)
    cache = KVCache.allocate(model.config, 2, 9)
    out = [
        model(ids[:, :3], cache=cache),
        model(ids[:, 3:7], cache=cache),
        model(ids[:, 7:], cache=cache),
    ]
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)

    # batch selection: keep row 1 twice, then continue decoding
    cache = KVCache.allocate(model.config, 2, 9)
    model(ids[:, :5], cache=cache)
    picked = cache.index_select(torch.tensor([1, 1]))
    step = model(ids[[1, 1], 5:6], cache=picked)
    torch.testing.assert_close(step[0], full[1, 5:6], atol=1e-5, rtol=1e-5)
    cache.reorder_(torch.tensor([1, 0]))
    step = model(ids[[1, 0], 5:6], cache=cache)
    torch.testing.assert_close(step[:, 0], full[[1, 0], 5], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        model(ids[:, :5], cache=cache)


def test_image_cells_count_within_runs_and_carry_over_chunks():
    from lit_cm3leon.model.transformer import image_cells

    is_image = torch.tensor([[0, 1, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1, 1]], dtype=torch.bool)
    cells, run = image_cells(is_image)
    assert cells.tolist() == [[0, 0, 1, 2, 0, 0, 1], [0, 1, 0, 0, 0, 1, 2]]
    assert run.tolist() == [2, 3]
    # the same rows split into two chunks: the run continues across the cut
    a, run_a = image_cells(is_image[:, :3])
    b, _ = image_cells(is_image[:, 3:], run_a)
    torch.testing.assert_close(torch.cat([a, b], 1), cells)


def test_cell_embedding_is_shared_by_images_and_absent_from_text():
    from lit_cm3leon.tokenizer.vocab import Vocab

    vocab = Vocab(n_text=30, n_image=16, image_h=2, image_w=2)
    cfg = ModelConfig.preset("debug", cell_embedding=True).for_vocab(vocab)
    assert (cfg.vocab_size, cfg.image_id_start, cfg.n_image_ids, cfg.image_cells) == (
        vocab.size,
        30,
        16,
        4,
    )
    assert ModelConfig.preset("debug").for_vocab(vocab).image_cells == 0
    with pytest.raises(ValueError, match="for_vocab"):  # never silently without its cells
        build_model(ModelConfig.preset("debug", vocab_size=vocab.size, cell_embedding=True))
    model = build_model(cfg)
    text, img = 5, 30 + 7
    ids = torch.tensor([[text, img, img, img, img, img, text, img]])
    is_image, cells = model._image_cells(ids, None)
    assert is_image[0].tolist() == [False, True, True, True, True, True, False, True]
    assert cells[0, 1:6].tolist() == [0, 1, 2, 3, 0]  # row-major cells, modulo h * w
    assert cells[0, 7] == 0  # a new image starts at cell 0
    with torch.no_grad():
        model.lm_head.weight.normal_()  # zero at init: make the output see the embeddings
        text_only = torch.tensor([[text, 6, 7, 8]])
        out, out_text = model(ids), model(text_only)
        model.cell_emb.weight.normal_()
        assert not torch.allclose(model(ids), out)  # the embedding reaches the output...
        torch.testing.assert_close(model(text_only), out_text)  # ...never through text tokens


def test_copy_heads_bias_the_same_cell_of_earlier_images():
    """Image tokens in cell c favour every earlier image's cell c + 1, which they predict."""
    model = _model(0, **COPY)  # 6 cells per image
    img = [40, 41, 42, 43, 44, 45]
    ids = torch.tensor([[1] + img + [2] + img[:4]])  # text, image A, text, 4 cells of image B
    is_image, cells = model._image_cells(ids, None)
    bias = model._copy_mask(ids, is_image, cells, None, None)[0][0, 0]  # [T, S]
    T = ids.shape[1]
    assert torch.isinf(bias.triu(1)[bias.triu(1) != 0]).all()  # causal: the future is -inf
    a, b = 1, 8  # first positions of images A and B
    expect = torch.zeros(T, T)
    for q in range(T):
        if is_image[0, q] and cells[0, q] < 5:
            for k in range(q + 1):
                if is_image[0, k] and cells[0, k] == cells[0, q] + 1:
                    expect[q, k] = 4.0
    assert expect[b + 2, a + 3] == 4.0  # B's cell 2 predicts cell 3: A's cell 3
    assert expect[a + 1, a + 2] == 0.0  # A's next cell is A's own future, not a copy source
    assert expect[a + 5].sum() == 0  # the last cell predicts no cell
    finite = torch.isfinite(bias)
    torch.testing.assert_close(bias[finite], expect[finite])
    with pytest.raises(ValueError, match="copy_heads=5 must be in"):
        ModelConfig.preset("debug", copy_heads=5)  # 4 heads


# 2 x 3 image cells; ids 87..96 are <loc:0..9>
GROUND = dict(COPY, ground_boxes=True, image_w=3, loc_id_start=87, n_loc=10)
# <bos> "a b" [box x 0-4, y 0-9] "c" [box x 7-9, y 5-9] <break> the image's six cells
GROUND_IDS = [80, 5, 6, 87, 87, 91, 96, 7, 94, 92, 96, 96, 83] + [40, 41, 42, 43, 44, 45]


def test_text_boxes_cover_the_cells_their_locations_overlap():
    model = _model(0, **GROUND)
    boxes = text_boxes(torch.tensor([GROUND_IDS]), model.config)[0].tolist()
    left = 0 | 0 << 8 | 1 << 16 | 1 << 24  # x 0-4 of 10 bins: columns 0-1 of 3; y: both rows
    right = 2 | 1 << 8 | 2 << 16 | 1 << 24  # x 7-9: column 2; y 5-9: row 1
    assert boxes == [-1] + [left] * 6 + [right] * 5 + [-1] * 7


def test_box_grounding_biases_the_box_text_for_cells_inside_and_decodes_as_the_full_forward():
    model = _model(3, **GROUND)
    ids = torch.tensor([GROUND_IDS])
    is_image, cells = model._image_cells(ids, None)
    bias = model._copy_mask(ids, is_image, cells, None, None)[0][0, 0]
    first = 13  # the image's cell 0, which predicts cell 1 (row 0, column 1: the left box)
    assert bias[first, 1:7].eq(4.0).all() and bias[first, 7:13].eq(0).all()
    assert bias[first + 4, 7:12].eq(4.0).all()  # cell 4 predicts cell 5: row 1, column 2,
    assert bias[first + 4, 1:7].eq(0).all()  # which only the right box holds
    assert bias[first + 2, 1:7].eq(4.0).all()  # cell 2 predicts cell 3 (row 1, column 0)
    assert bias[first + 2, 7:12].eq(0).all()
    assert bias[:first, :first][torch.isfinite(bias[:first, :first])].eq(0).all()  # text: none
    plain = _model(3, **COPY)
    assert not torch.allclose(model(ids)[0, first:], plain(ids)[0, first:])

    full = model(ids)
    cache = KVCache.allocate(model.config, 1, ids.shape[1])
    out = [model(ids[:, :first], cache=cache)]
    out += [model(ids[:, t : t + 1], cache=cache) for t in range(first, ids.shape[1])]
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)


def _repeat_loss(copy_heads: int, steps: int, copy_logit: bool = False) -> float:
    """Train the debug preset on a random 3 x 3 image (16 codes) followed by the same image
    again; the loss on cells 1.. of the repeat after ``steps`` steps."""
    from lit_cm3leon.tokenizer.vocab import Vocab

    vocab = Vocab(n_text=30, n_image=16, image_h=3, image_w=3)
    n, B = vocab.image_tokens, 16
    torch.manual_seed(0)
    cfg = ModelConfig.preset(
        "debug", copy_heads=copy_heads, copy_bias=8.0, copy_logit=copy_logit
    ).for_vocab(vocab)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    for _ in range(steps):
        codes = torch.randint(0, 16, (B, n)) + vocab.image_offset
        x = torch.cat(
            [torch.full((B, 1), vocab.bos), codes, torch.full((B, 1), vocab.sep), codes], 1
        )
        nll = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
        opt.zero_grad()
        nll.mean().backward()
        opt.step()
    return float(nll[:, -(n - 1) :].detach().mean())


def test_copy_heads_learn_to_copy_where_the_plain_decoder_does_not():
    """An image of random codes, then the same image: with copy heads the repeat is copied
    within 300 steps; without, its loss stays at chance, log(16) = 2.77 (seeds 0-3: 2.56-2.78
    plain, 0.008-0.06 with copy heads)."""
    assert _repeat_loss(copy_heads=0, steps=300) > 2.0
    assert _repeat_loss(copy_heads=2, steps=300) < 0.5


def test_copy_logit_learns_to_copy_in_a_tenth_of_the_steps():
    """The repeat task above at 30 steps: copy heads alone are still at chance (2.81-2.85 over
    seeds 0-2), with the copy logit 0.13-0.14."""
    assert _repeat_loss(copy_heads=2, steps=30) > 2.0
    assert _repeat_loss(copy_heads=2, steps=30, copy_logit=True) < 0.5


def test_copy_logit_adds_the_gate_at_the_token_of_the_aligned_cell():
    """An image token in cell c gets g(h) on the logit of the token in cell c + 1 of the latest
    earlier image, nothing where no earlier image has that cell; zero-initialised."""
    model = _model(0, **POINTER)  # 6 cells per image
    assert not build_model(model.config).copy_gate.weight.any()  # no pull at initialisation
    with torch.no_grad():
        model.copy_gate.weight.zero_()
        model.copy_gate.bias.fill_(5.0)
    a = [40, 41, 42, 43, 44, 45]
    b = [50, 51, 52, 53, 54, 55]
    ids = torch.tensor([[1] + a + [2] + b + [3] + a[:3]])  # images A, B, then 3 cells of A again
    with torch.no_grad():
        with_gate = model(ids)
        gate, model.copy_gate = model.copy_gate, None
        without = model(ids)
        model.copy_gate = gate
    diff = (with_gate - without)[0]  # [T, V]
    expect = torch.zeros_like(diff)
    b0, c0 = 8, 15  # first positions of B and of the third image
    for cell in range(5):
        expect[b0 + cell, a[cell + 1]] = 5.0  # B copies from A
        if cell < 3:
            expect[c0 + cell, b[cell + 1]] = 5.0  # the third image from B, the latest
    torch.testing.assert_close(diff, expect, atol=1e-5, rtol=0)


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("debug", vocab_size=64))
    model.train()
    x = torch.randint(0, 64, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    loss0 = None
    for _ in range(120):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1))
        loss0 = loss.item() if loss0 is None else loss0
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(loss0 - torch.log(torch.tensor(64.0)).item()) < 1e-4  # zero head: uniform at init
    assert loss.item() < 0.1, loss.item()


def test_activation_checkpointing_same_gradients():
    model = _model(3)
    model.train()
    x = torch.randint(0, 97, (2, 12))
    model(x).square().mean().backward()
    g_plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parallelize(model, activation_checkpointing=True)
    assert model.activation_checkpointing
    model(x).square().mean().backward()
    for a, p in zip(g_plain, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_fsdp_policy_wraps_blocks():
    from lit_cm3leon.model.transformer import Block

    assert fsdp_auto_wrap_policy() == {Block}
    kw = fsdp_strategy_kwargs(ModelConfig.preset("debug", activation_checkpointing=True))
    assert kw == {"auto_wrap_policy": {Block}, "activation_checkpointing_policy": {Block}}
    assert "activation_checkpointing_policy" not in fsdp_strategy_kwargs(
        {"activation_checkpointing": False}
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_yaml_matches_preset(name):
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "configs" / "model" / f"{name}.yaml"
    text = path.read_text()
    for line in text.splitlines():  # every key is commented
        if line and not line.startswith(("#", "_target_")):
            assert "#" in line, line
    cfg = instantiate(OmegaConf.create(text))
    expected = ModelConfig.preset(name, activation_checkpointing=cfg.activation_checkpointing)
    assert cfg == expected


def test_parity_with_transformers_opt():
    """Same weights in Hugging Face's OPT give the same logits, with left padding."""
    transformers = pytest.importorskip("transformers")
    from lit_cm3leon.model.interop import opt_config_kwargs, to_opt_state_dict

    model = _model(4)
    hf = transformers.OPTForCausalLM(
        transformers.OPTConfig(**opt_config_kwargs(model.config, pad_token_id=0))
    )
    missing, unexpected = hf.load_state_dict(to_opt_state_dict(model), strict=False)
    assert not unexpected and not [k for k in missing if "layer_norm" not in k]
    hf.eval()
    ids = torch.randint(1, 97, (2, 10))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False
    ids[1, :3] = 0
    ours = model(ids, positions_from_mask(valid), attention_mask(valid, 10))
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=valid.long()).logits
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)


def test_cell_embedding_follows_its_flag():
    """The image layout alone does not add the cell embedding: only cell_embedding=True does,
    and the parameter count says the same as the model."""
    layout = {k: v for k, v in CELLS.items() if k != "cell_embedding"}
    for flag in (False, True):
        model = _model(0, cell_embedding=flag, **layout)
        assert (model.cell_emb is not None) == flag
        assert sum(p.numel() for p in model.parameters()) == model.config.num_params()
