"""SFT mixture: thresholds, deterministic sampling, shapes-world pools, and a fit through the entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lit_cm3leon.data.sft import (
    SFTSequences,
    local_edit_codes,
    mixture_rates,
    shapes_pools,
    task_weights,
)
from lit_cm3leon.data.templates import TASKS, split_target
from lit_cm3leon.fit import train
from lit_cm3leon.tokenizer.codec import DocumentCodec
from lit_cm3leon.tokenizer.vocab import Vocab
from lit_cm3leon.tokenizer.vqgan import PRESETS
from tests.fixtures import make_text_tokenizer


# --- mixture -------------------------------------------------------------------------------
def test_rates_are_clipped_to_the_thresholds_and_sum_to_one():
    sizes = [1000, 100, 10, 500]
    natural = np.asarray(sizes) / sum(sizes)
    r = mixture_rates(sizes, None)
    assert np.allclose(r, natural)  # no weights: the natural shares
    r = mixture_rates(sizes, [1, 1, 1, 1], 0.3, 3.0)  # uniform wish: small tasks up, big down
    assert r.sum() == pytest.approx(1.0)
    assert (r >= 0.3 * natural - 1e-12).all() and (r <= 3.0 * natural + 1e-12).all()
    assert r[2] == pytest.approx(3.0 * natural[2])  # the smallest task hits the 3x ceiling
    r = mixture_rates([100, 100], [1000, 1], 0.3, 3.0)  # a huge down-weight stops at 0.3x
    assert r[1] == pytest.approx(0.3 * 0.5) and r[0] == pytest.approx(0.85)
    r = mixture_rates(
        [10, 10, 10], [2, 1, None], 0.0, 100.0
    )  # no clipping: the weights (None = size)
    assert np.allclose(r, np.array([2, 1, 10]) / 13)
    with pytest.raises(ValueError, match="non-empty pool"):
        mixture_rates([10, 0], None)


def test_multiples_of_the_natural_share_hold_when_the_pools_grow():
    """A weight in pool-size units is a smaller share of a mixture whose pools grow; "<k>x" is k
    times the task's natural share at any pool sizes, as null is 1x."""
    order = ["caption", "vqa", "edit"]
    spec = {"caption": None, "vqa": 2500, "edit": "0.5x"}
    assert task_weights(spec, order, [1000, 4000, 1000]) == [None, 2500, 500.0]
    for scale in (1, 8):
        sizes = [1000 * scale, 4000 * scale, 1000 * scale]
        r = mixture_rates(sizes, task_weights({"edit": "0.5x", "vqa": " 2x "}, order, sizes), 0, 9)
        assert np.allclose(r, np.array([1, 8, 0.5]) / 9.5)  # the same shares at both scales
    units = [mixture_rates(s, task_weights(spec, order, s), 0, 9)[1] for s in ([1000, 4000, 1000],
             [8000, 32000, 8000])]  # fmt: skip
    # 2500 units beside 1000 + 500 (caption, edit at 0.5x), then beside 8000 + 4000
    assert units == pytest.approx([2500 / 4000, 2500 / 14500])
    assert task_weights({"edit": "3x"}, ["edit"], [10]) == [30.0]
    for bad in ("x", "2", "-1x", "nanx", "infx", "twice"):
        with pytest.raises(ValueError, match=f"data.tasks.edit={bad!r}: expected null"):
            task_weights({"edit": bad}, ["edit"], [10])


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    return DocumentCodec.load(make_text_tokenizer(tmp_path_factory.mktemp("tok"), n_codes=16, hw=4))


def fake_pools(n: dict[str, int]) -> dict[str, list[dict]]:
    rng = np.random.default_rng(0)
    return {
        "caption_short": [
            {
                "image": rng.integers(0, 16, (4, 4)),
                "caption": f"a red circle {i}",
                "captions": ["a", "b"],
            }
            for i in range(n["caption_short"])
        ],
        "vqa": [
            {"image": rng.integers(0, 16, (4, 4)), "question": "what color?", "answer": "red"}
            for _ in range(n["vqa"])
        ],
        "text2image": [
            {"image": rng.integers(0, 16, (4, 4)), "caption": "a blue square"}
            for _ in range(n["text2image"])
        ],
    }


def test_sampling_follows_the_rates_and_is_deterministic(codec):
    pools = fake_pools({"caption_short": 500, "vqa": 50, "text2image": 20})
    rates = mixture_rates([500, 50, 20], [1, 1, 1], 0.3, 3.0)
    ds = SFTSequences(pools, codec, seq_len=48, length=20000, rates=rates, seed=3)
    counts = np.zeros(3)
    for i in range(len(ds)):
        counts[ds.tasks.index(ds.task_of(i)[0])] += 1
    empirical = counts / counts.sum()
    assert np.abs(empirical - rates).max() < 0.015, (empirical, rates)
    a, b = ds[123], ds[123]
    assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["weights"], b["weights"])
    other = SFTSequences(pools, codec, seq_len=48, length=20000, rates=rates, seed=4)
    assert [ds.task_of(i) for i in range(50)] != [other.task_of(i) for i in range(50)]


def test_items_put_the_loss_on_targets_only(codec):
    v = codec.vocab
    ds = SFTSequences(
        fake_pools({"caption_short": 5, "vqa": 5, "text2image": 5}), codec, seq_len=48, length=60
    )
    for i in range(60):
        item = ds[i]
        ids, w = item["ids"].tolist(), item["weights"]
        n = ids.index(v.eos) + 1
        prompt, target = split_target(ids[:n], codec)
        # weights[t] is the loss of predicting ids[t + 1]: zero up to the prompt's <break>
        assert w[: len(prompt) - 1].sum() == 0
        assert (w[len(prompt) - 1 : n - 1] == 1).all() and w[n - 1 :].sum() == 0
        assert len(target) + 1 == int(w.sum())
    val = SFTSequences(
        fake_pools({"caption_short": 3, "vqa": 2, "text2image": 1}), codec, seq_len=48, sample=False
    )
    assert len(val) == 6 and [val.task_of(i)[0] for i in range(6)] == ["caption_short"] * 3 + [
        "vqa"
    ] * 2 + ["text2image"]


def test_cfg_dropout_trains_the_unconditional_stream_that_guidance_decodes(codec):
    """With cfg_dropout, that share of the image-output examples is the unconditional stream of
    classifier-free guidance, token for token as inference builds it (the prompt's text one
    <mask:0>, its images kept), with the same target and loss; text tasks, validation and the
    tasks and examples drawn do not change."""
    from collections import Counter

    from lit_cm3leon.decode.generate import make_uncond_prompt
    from lit_cm3leon.tokenizer.document import Document, Image

    v, rng = codec.vocab, np.random.default_rng(1)
    pools = fake_pools({"caption_short": 40, "vqa": 40, "text2image": 40})
    pools["edit"] = [
        {"image": rng.integers(0, 16, (4, 4)), "instruction": "make the circle red",
         "target": rng.integers(0, 16, (4, 4))}
        for _ in range(40)
    ]  # fmt: skip
    plain = SFTSequences(pools, codec, seq_len=64, length=3000, seed=2)
    ds = SFTSequences(pools, codec, seq_len=64, length=3000, seed=2, cfg_dropout=0.25)
    masked, total = Counter(), Counter()
    for i in range(len(ds)):
        task, ex = ds.example(i)
        assert plain.example(i)[0] == task
        item, base = ds[i], plain[i]
        ids = item["ids"].tolist()
        prompt, target = split_target(ids[: ids.index(v.eos) + 1], codec)
        base_ids = base["ids"].tolist()
        base_prompt, base_target = split_target(base_ids[: base_ids.index(v.eos) + 1], codec)
        assert target == base_target and item["weights"].sum() == base["weights"].sum()
        total[task] += 1
        if prompt == base_prompt:
            continue
        masked[task] += 1
        images = [v.bos, *codec.encode(Document([Image(ex["image"])])), v.brk]
        head = images if task == "edit" else [v.bos]
        assert prompt == make_uncond_prompt(v, head, [v.brk]), task
    assert masked["caption_short"] == masked["vqa"] == 0
    for task in ("edit", "text2image"):
        assert abs(masked[task] / total[task] - 0.25) < 0.05, (task, masked, total)
    val = SFTSequences(pools, codec, seq_len=64, sample=False, cfg_dropout=0.25)
    assert all(v.mask(0) not in val[i]["ids"].tolist() for i in range(len(val)))
    with pytest.raises(ValueError, match="cfg_dropout"):
        SFTSequences(pools, codec, seq_len=64, cfg_dropout=1.0)


# --- shapes world --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_tokenizer():
    from lit_cm3leon.tokenizer.image import load_image_tokenizer

    return load_image_tokenizer("shapes")


def test_shapes_pools_cover_every_task_and_cache_codes(image_tokenizer, tmp_path):
    from lit_cm3leon.data.shapes import ShapesWorld

    world = ShapesWorld()
    pools = shapes_pools(world, "train", 0, 12, image_tokenizer, tmp_path)
    assert set(pools) == set(TASKS) and all(pools[t] for t in TASKS)
    assert (
        len(pools["caption_short"]) == 12
        and len(pools["vqa"]) >= 12 * 3
        and len(pools["reasoning"]) == 24
    )
    assert {ex["answer"] for ex in pools["reasoning"]} == {"yes", "no"}
    s = world.sample("train", 3)
    assert pools["caption_long"][3]["caption"] == s.caption_long
    assert pools["edit"][3]["instruction"] == s.edit.instruction
    expected = image_tokenizer.encode(s.edit.after_image[None])[0].numpy()
    assert np.array_equal(pools["edit"][3]["target"], expected)
    caches = sorted(p.name for p in tmp_path.glob("sft-shapes-*.npz"))
    assert len(caches) == 4  # scene, edited scene, segmentation map, edge map
    # a second build reads the cache (same codes, no encoding)
    calls = []
    real = image_tokenizer.encode
    image_tokenizer.encode = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        again = shapes_pools(world, "train", 0, 12, image_tokenizer, tmp_path)
    finally:
        image_tokenizer.encode = real
    assert not calls and np.array_equal(
        again["seg2image"][5]["condition"], pools["seg2image"][5]["condition"]
    )


def test_local_edit_codes_keep_the_source_away_from_the_change():
    """32 px images, a 4 x 4 code grid (8 px cells): pixels 12-13 x 17 differ (cell row 1, col 2)."""
    src = np.zeros((32, 32, 3), np.uint8)
    tgt = src.copy()
    tgt[12:14, 17, 0] = 200
    sc, tc = np.zeros((4, 4), np.int64), np.ones((4, 4), np.int64)
    changed = lambda m: local_edit_codes(sc, tc, src, tgt, m).astype(bool)  # noqa: E731
    want = np.zeros((4, 4), bool)
    want[1, 2] = True
    assert np.array_equal(changed(0), want)
    assert np.array_equal(changed(1), want)  # rows 11-14, columns 16-18: the same cell
    want[1, 1] = True  # 2 px reach column 15: cell column 1 too
    assert np.array_equal(changed(2), want)
    want[:3, 1:4] = True  # 7 px reach rows 5-20 and columns 10-24
    assert np.array_equal(changed(7), want)
    assert not local_edit_codes(sc, tc, src, src, 3).any()  # nothing changed: the source
    faint = src.copy()
    faint[0, 0] = 16  # at most `threshold` apart counts as unchanged
    assert not local_edit_codes(sc, tc, src, faint, 0).any()
    with pytest.raises(ValueError, match="same square"):
        local_edit_codes(sc, tc, src, tgt[:30], 0)


def test_shapes_pools_with_an_edit_margin_take_the_source_codes_where_nothing_changed(
    image_tokenizer, tmp_path
):
    from lit_cm3leon.data.shapes import ShapesWorld

    world = ShapesWorld()
    plain = shapes_pools(world, "train", 0, 6, image_tokenizer, tmp_path, ["edit"])
    local = shapes_pools(world, "train", 0, 6, image_tokenizer, tmp_path, ["edit"], 2)
    for i, (a, b) in enumerate(zip(plain["edit"], local["edit"], strict=True)):
        s = world.sample("train", i)
        want = local_edit_codes(a["image"], a["target"], s.image, s.edit.after_image, 2)
        assert np.array_equal(b["target"], want)
    kept = np.mean([np.mean(ex["target"] == ex["image"]) for ex in local["edit"]])
    assert kept > np.mean([np.mean(ex["target"] == ex["image"]) for ex in plain["edit"]])


def test_edit_margin_is_for_the_shapes_world():
    from lit_cm3leon.data.sft import SFTDataModule

    with pytest.raises(ValueError, match="edit_margin"):
        SFTDataModule("t", "i", None, source="files", edit_margin=2)
    with pytest.raises(ValueError, match="edit_margin"):
        SFTDataModule("t", "i", None, edit_margin=-1)


def test_a_task_can_train_on_its_own_scenes(image_tokenizer, tmp_path):
    from lit_cm3leon.data.sft import SFTDataModule
    from lit_cm3leon.data.shapes import ShapesWorld

    own = {"edit": {"n_train": 10, "max_shapes": 1}, "spatial": {"n_train": 8, "max_shapes": None}}
    shapes = {"n_train": 6, "n_val": 2, "own_scenes": own}
    dm = SFTDataModule("t", "i", str(tmp_path), shapes=shapes, edit_margin=2)
    train, val = dm._pools(image_tokenizer)
    assert len(train["edit"]) == 10 and len(train["spatial"]) == 8
    assert len(train["caption_short"]) == 6
    spatial = shapes_pools(ShapesWorld(), "train", 0, 8, image_tokenizer, tmp_path, ["spatial"])
    assert [ex["objects"] for ex in train["spatial"]] == [
        ex["objects"] for ex in spatial["spatial"]
    ]
    one = ShapesWorld(max_shapes=1)
    assert all(len(one.scene("train", i).shapes) == 1 for i in range(10))
    want = shapes_pools(one, "train", 0, 10, image_tokenizer, tmp_path, ["edit"], 2)["edit"]
    for a, b in zip(train["edit"], want, strict=True):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["target"], b["target"])
        assert a["instruction"] == b["instruction"]
    # validation keeps the held-out scenes of the mixture's world (one to three shapes)
    held = [ShapesWorld().sample("heldout", i).edit.instruction for i in range(2)]
    assert [ex["instruction"] for ex in val["edit"]] == held
    with pytest.raises(ValueError, match="n_train and max_shapes"):
        SFTDataModule("t", "i", None, shapes={"own_scenes": {"edit": {"grid": 2}}})
    with pytest.raises(KeyError):
        SFTDataModule("t", "i", None, shapes={"own_scenes": {"draw": {"n_train": 2}}})


# --- fit through the entry point -----------------------------------------------------------
@pytest.fixture
def artifacts(tmp_path, image_tokenizer):
    from lit_cm3leon.model import ModelConfig, build_model
    from lit_cm3leon.training.checkpoint import save_decoder

    out = tmp_path / "outputs"
    root = make_text_tokenizer(out / "text_tokenizer", n_codes=PRESETS["shapes"].n_embed, hw=8)
    image_tokenizer.save(out / "image_tokenizer")
    vocab = Vocab.load(root / "vocab.json")
    cfg = ModelConfig(vocab_size=vocab.size, n_layer=2, n_head=4, d_model=64, max_seq_len=256)
    model = build_model(cfg)
    with torch.no_grad():
        model.pos_emb.weight.fill_(0.25)  # a mark no fresh initialisation has (std 0.0002)
    save_decoder(out / "pretrain", model, vocab, step=7)
    return out


def overrides(steps: int) -> list[str]:
    return [
        "experiment=sft",
        "model=debug",
        "data.shapes.n_train=16",
        "data.shapes.own_scenes.spatial.n_train=24",
        "data.shapes.n_val=4",
        "data.val_per_task=2",
        "data.batch_size=4",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.precision=32-true",
        "logger=csv",
        "module.warmup_steps=2",
        "module.lr=3e-3",
    ]


def test_sft_fit_starts_from_pretrain_and_publishes(compose, artifacts):
    from lit_cm3leon.training.checkpoint import load_decoder

    before, _, _ = load_decoder(artifacts / "pretrain")
    metrics = train(compose(overrides(6)))
    assert np.isfinite(metrics["train/loss"]) and "val/loss" in metrics
    # each validated task's own loss: 2 batches of 4 of the held-out examples, 2 per task in
    # task order, reach the first four tasks
    seen = {k.removeprefix("val/loss_") for k in metrics} & set(TASKS)
    assert seen == set(TASKS[:4]) and all(np.isfinite(metrics[f"val/loss_{t}"]) for t in seen)
    model, vocab, record = load_decoder(
        artifacts / "sft", vocab=Vocab.load(artifacts / "text_tokenizer" / "vocab.json")
    )
    assert record["step"] == 6 and (artifacts / "sft" / "manifest.json").is_file()
    # training started from the pretrained weights (their mark is still there) and moved them
    pos = record["state_dict"]["pos_emb.weight"]
    assert (pos - 0.25).abs().max() < 0.1
    name = "blocks.0.attn.qkv.weight"
    assert not torch.equal(before.state_dict()[name], record["state_dict"][name])


def test_data_only_tokenizes_the_images_the_sft_run_then_reads(compose, artifacts, monkeypatch):
    """``data_only=true`` (the pipeline's ``tokens/sft`` stage) needs no pretrained decoder: it
    writes every pool's image codes to the cache and a manifest with the mixture's rates; the
    SFT run's data module after it finds every one of them cached."""
    from hydra.utils import instantiate

    import lit_cm3leon.data.sft as sft

    (artifacts / "pretrain" / "model.pt").unlink()  # the data does not read it
    metrics = train(compose([*overrides(2), "stage=tokens/sft", "data_only=true"]))
    assert set(metrics) == {f"rate_{t}" for t in TASKS}
    assert sum(metrics.values()) == pytest.approx(1.0)
    record = json.loads((artifacts / "tokens" / "sft" / "manifest.json").read_text())
    assert record["complete"] and record["metrics"] == metrics
    # train and held-out scenes: image, edited, seg, edges; and the spatial task's own images
    assert len(list((artifacts / "cache").glob("sft-shapes-*.npz"))) == 9
    assert not (artifacts / "sft").exists()  # no model was built or published

    found, real = [], sft.encode_cached
    monkeypatch.setattr(
        sft,
        "encode_cached",
        lambda tok, fn, n, cache: found.append(cache.is_file()) or real(tok, fn, n, cache),
    )
    dm = instantiate(compose(overrides(2)).data)
    dm.setup("fit")
    assert found == [True] * 9 and dm.rates == {
        k.removeprefix("rate_"): v for k, v in metrics.items()
    }


def test_missing_pretrain_checkpoint_names_the_command(compose, artifacts):
    from lit_cm3leon.utils.config import ConfigError

    (artifacts / "pretrain" / "model.pt").unlink()
    with pytest.raises(ConfigError, match="experiment=pretrain"):
        train(compose(overrides(2)))


def test_one_task_override_builds_a_one_task_mixture(compose, artifacts):
    """The README's one-task SFT (`~data.tasks '+data.tasks={edit: null}'`) trains on edits
    alone, and the merging override keeps every task in the mixture."""
    from hydra.utils import instantiate

    def built(extra: list[str]):
        dm = instantiate(compose([*overrides(4), *extra]).data)
        dm.setup("fit")
        return dm

    only = built(["~data.tasks", "+data.tasks={edit: null}"])
    assert only.rates == {"edit": 1.0}
    assert {only.train_ds[i]["task"].item() for i in range(8)} == {TASKS.index("edit")}
    merged = built(["data.tasks={edit: 2.0}"])
    assert set(merged.rates) == set(TASKS)
    assert len({merged.train_ds[i]["task"].item() for i in range(32)}) > 1


def test_sft_samples_show_every_task_in_tensorboard(compose, artifacts, image_tokenizer):
    """The SFT run's TensorBoard holds, for each of the ten tasks, its held-out examples with the
    model's sample: images as rows [prompt images, sample, reference], text as a table."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_cm3leon.data.templates import get_template, inference_prompt
    from lit_cm3leon.engine import Decoding, Engine
    from lit_cm3leon.tokenizer.image import load_image_tokenizer
    from lit_cm3leon.training.sft_samples import SFTSamples

    cfg = compose(
        [
            *overrides(3),
            "logger=tensorboard",
            "callbacks.sft_samples.every_n_steps=3",
            "callbacks.sft_samples.per_task=2",
            "callbacks.sft_samples.scale=1",
        ]
    )
    train(cfg)
    events = EventAccumulator(f"{cfg.paths.run_dir}/tensorboard", size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    image_tasks = [t for t in TASKS if get_template(t).target == "image"]
    assert sorted(tags["images"]) == sorted(f"sft_samples/{t}" for t in image_tasks)
    (edit,) = events.Images("sft_samples/edit")
    assert edit.step == 3 and (edit.width, edit.height) == (3 * 32, 2 * 32)  # source, sample, ref
    (spatial,) = events.Images("sft_samples/spatial")
    assert (spatial.width, spatial.height) == (2 * 32, 2 * 32)  # no prompt image
    text_tags = {t.split("/")[1] for t in tags["tensors"] if t.startswith("sft_samples/")}
    assert text_tags == {t for t in TASKS if get_template(t).target == "text"}

    # the table and the grid: the references are the pools' targets, each sample the model's
    from lit_cm3leon.training.checkpoint import load_decoder

    vocab = Vocab.load(artifacts / "text_tokenizer" / "vocab.json")
    net, _, _ = load_decoder(artifacts / "sft", vocab=vocab)
    pools = {
        "vqa": [{"image": np.zeros((8, 8), np.int64), "question": "what color?", "answer": "red"}],
        "edit": [
            {
                "image": np.full((8, 8), 3, np.int64),
                "instruction": "make it blue",
                "target": np.full((8, 8), 5, np.int64),
            }
        ],
    }
    codec = DocumentCodec.load(artifacts / "text_tokenizer")
    ds = SFTSequences(pools, codec, seq_len=192, sample=False)
    tok = load_image_tokenizer(artifacts / "image_tokenizer")
    engine = Engine(net, codec, tok, autocast=False)
    callback = SFTSamples(image_strategy="temperature", temperature=0.0, scale=2)
    shown = callback.samples(engine, ds)
    greedy = Decoding(temperature=0.0)
    vqa_prompt = [inference_prompt("vqa", codec, **pools["vqa"][0])]
    (answer,) = engine.image_to_text(None, greedy, prompts=vqa_prompt)
    assert (
        shown["vqa"].splitlines()[2]
        == f"| [image] Question: what color? Answer: | {answer} | red |"
    )
    grid = shown["edit"]
    assert grid.shape == (64, 3 * 64, 3)
    grid = grid[::2, ::2]
    ref = tok.decode(torch.as_tensor(pools["edit"][0]["target"][None])).numpy()[0]
    src = tok.decode(torch.as_tensor(pools["edit"][0]["image"][None])).numpy()[0]
    assert np.array_equal(grid[:, 64:], ref) and np.array_equal(grid[:, :32], src)
    sample = engine.decode_images(
        engine.task_image_codes("edit", pools["edit"], callback.image_dec)[0, 0]
    )
    assert np.array_equal(grid[:, 32:64], sample)  # the model's greedy edit
