"""VQGAN: taming key layout, Chameleon parity, safe loading of hostile checkpoints, round trips."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_cm3leon import load_image_tokenizer
from lit_cm3leon.tokenizer import checkpoints
from lit_cm3leon.tokenizer.vqgan import VQGAN, DecoderMissingError, VQGANConfig, preset

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = VQGANConfig(
    resolution=16,
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    z_channels=32,
    n_embed=16,
    embed_dim=8,
    mid_attn=True,
)


def taming_keys(cfg: VQGANConfig) -> set[str]:
    """Parameter names of taming's VQModel (without ``loss.*``), spelled out from its constructors."""

    def res(p, cin, cout):
        ks = [
            f"{p}.{n}.{w}" for n in ("norm1", "conv1", "norm2", "conv2") for w in ("weight", "bias")
        ]
        return ks + ([f"{p}.nin_shortcut.{w}" for w in ("weight", "bias")] if cin != cout else [])

    def attn(p):
        return [
            f"{p}.{n}.{w}" for n in ("norm", "q", "k", "v", "proj_out") for w in ("weight", "bias")
        ]

    def conv(p):
        return [f"{p}.weight", f"{p}.bias"]

    keys = conv("encoder.conv_in")
    r, mult, ch, L = cfg.resolution, (1,) + cfg.ch_mult, cfg.ch, len(cfg.ch_mult)
    for i in range(L):
        cin, cout = ch * mult[i], ch * mult[i + 1]
        for j in range(cfg.num_res_blocks):
            keys += res(f"encoder.down.{i}.block.{j}", cin, cout)
            cin = cout
            if r in cfg.attn_resolutions:
                keys += attn(f"encoder.down.{i}.attn.{j}")
        if i != L - 1:
            keys += conv(f"encoder.down.{i}.downsample.conv")
            r //= 2
    c = ch * cfg.ch_mult[-1]
    for part in ("encoder", "decoder"):
        keys += (
            res(f"{part}.mid.block_1", c, c)
            + attn(f"{part}.mid.attn_1")
            + res(f"{part}.mid.block_2", c, c)
        )
    keys += conv("encoder.norm_out") + conv("encoder.conv_out") + conv("decoder.conv_in")
    for i in reversed(range(L)):
        cout = ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            keys += res(f"decoder.up.{i}.block.{j}", c, cout)
            c = cout
            if r in cfg.attn_resolutions:
                keys += attn(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            keys += conv(f"decoder.up.{i}.upsample.conv")
            r *= 2
    keys += conv("decoder.norm_out") + conv("decoder.conv_out")
    keys += ["quantize.embedding.weight"] + conv("quant_conv") + conv("post_quant_conv")
    return set(keys)


def test_key_layout_matches_taming():
    for cfg in (TINY, preset("paper")):
        sd = VQGAN(cfg).state_dict()
        assert set(sd) == taming_keys(cfg)
    sd = VQGAN(TINY).state_dict()
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in sd  # 32 -> 32 channels
    assert "encoder.down.1.block.0.nin_shortcut.weight" in sd  # 32 -> 64 channels
    assert sd["encoder.down.0.downsample.conv.weight"].shape == (32, 32, 3, 3)
    assert sd["quantize.embedding.weight"].shape == (16, 8)
    # the f8 paper preset: 256 px -> 32x32 tokens from 8192 codes
    assert preset("paper").latent_size == 32 and preset("shapes").latent_size == 8


def test_no_normalization_keeps_the_layout_and_makes_codes_local():
    """norm_groups=0 (the shapes preset): same keys as GroupNorm, and a latent cell barely sees
    pixels at the far side of the image, where GroupNorm's image-wide statistics carry them."""
    from dataclasses import replace

    assert preset("shapes").norm_groups == 0
    local_cfg = replace(preset("shapes"), n_embed=16)
    group_cfg = replace(local_cfg, norm_groups=2)
    assert set(VQGAN(local_cfg).state_dict()) == set(VQGAN(group_cfg).state_dict())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    far = x.clone()
    far[..., 28:, 28:] = 1.0  # change the bottom-right 4 x 4 pixels only
    for cfg, local in ((local_cfg, True), (group_cfg, False)):
        torch.manual_seed(0)
        enc = VQGAN(cfg).eval().encoder
        with torch.no_grad():
            a, b = enc(x), enc(far)
        moved = (a - b).abs().amax(1)[0]  # [h, w]
        ratio = float(moved[0, 0] / moved[-1, -1])  # opposite corner vs the changed cell
        assert ratio < 1e-3 if local else ratio > 1e-2, ratio  # measured 5e-6 vs 0.035


def test_encoder_kernel_1_gives_each_code_its_own_patch():
    """encoder_kernel=1: a code depends on its 7 x 7 pixel patch only, so changing the
    bottom-right 4 x 4 pixels leaves every code outside the last two rows and columns
    bit-identical; with the preset's 3x3 kernels the change reaches the opposite corner."""
    from dataclasses import replace

    wide_cfg = replace(preset("shapes"), n_embed=16)
    local_cfg = replace(wide_cfg, encoder_kernel=1)
    assert set(VQGAN(local_cfg).state_dict()) == set(VQGAN(wide_cfg).state_dict())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    far = x.clone()
    far[..., 28:, 28:] = 1.0
    for cfg in (local_cfg, wide_cfg):
        torch.manual_seed(0)
        enc = VQGAN(cfg).eval().encoder
        with torch.no_grad():
            moved = (enc(x) - enc(far)).abs().amax(1)[0]  # [8, 8]
        assert moved[-1, -1] > 0
        if cfg.encoder_kernel == 1:
            assert moved[:6].max() == 0 and moved[:, :6].max() == 0  # token r sees px 4r..4r+6
        else:
            assert moved[0, 0] > 0
    with pytest.raises(ValueError, match="encoder_kernel"):
        replace(local_cfg, encoder_kernel=5)


def test_downsample_pads_right_and_bottom_only():
    from lit_cm3leon.tokenizer.vqgan import Downsample

    d = Downsample(1)
    with torch.no_grad():
        d.conv.weight.zero_()
        d.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left of each 3x3 window
        d.conv.bias.zero_()
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert d(x)[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]


def _chameleon(tmp_path: Path, attn_type: str = "vanilla"):
    transformers = pytest.importorskip("transformers")
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    cfg = transformers.ChameleonVQVAEConfig(
        embed_dim=16,
        num_embeddings=64,
        latent_channels=32,
        resolution=32,
        base_channels=32,
        channel_multiplier=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[16],
        attn_type=attn_type,
    )
    torch.manual_seed(0)
    hf = ChameleonVQVAE(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # random weights everywhere (post_init leaves norms at 1/0)
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("attn_type", ["vanilla", "none"])
def test_chameleon_parity(tmp_path, attn_type):
    hf = _chameleon(tmp_path, attn_type)
    tok = load_image_tokenizer(tmp_path)
    assert tok.info["source"] == "chameleon" and (tok.h, tok.w, tok.n_codes) == (16, 16, 64)
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        ref = hf.encode(pixels).image_tokens.view(3, 16, 16)
    ours = tok.encode(pixels)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, ref)
    assert len(ref.unique()) > 4  # the comparison is not between two constant grids
    with pytest.raises(
        DecoderMissingError, match="Chameleon VQ-VAE release ships only the encoder"
    ):
        tok.decode(ours)


class _Placeholder:  # replaced by a class from a fake module before pickling
    pass


def _fake_lightning_module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "/somewhere/best.ckpt"
            self.monitor = "val/rec_loss"

    ModelCheckpoint.__module__ = name
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    return mod


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_hostile_ckpt(path: Path, model: VQGAN, marker: Path) -> str:
    modname = "fake_lightning_for_test_model_checkpoint"
    mod = _fake_lightning_module(modname)
    sys.modules[modname] = mod
    try:
        from omegaconf import OmegaConf

        sd = dict(model.state_dict())
        sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
        sd["loss.logvar"] = torch.zeros(())
        ckpt = {
            "payload": _Evil(str(marker)),  # first, so a plain unpickler reaches it
            "epoch": 3,
            "global_step": 1234,
            "pytorch-lightning_version": "1.0.8",
            "state_dict": sd,
            "callbacks": {mod.ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
            "checkpoint_object": mod.ModelCheckpoint(),
            "optimizer_states": [
                {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}
            ],
            "hyper_parameters": OmegaConf.create({"n_embed": model.config.n_embed}),
        }
        torch.save(ckpt, path)
    finally:
        del sys.modules[modname]
    return modname


def test_hostile_taming_ckpt_loads_without_executing(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**{**TINY.to_dict(), "legacy": True}))
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "last.ckpt"
    modname = _write_hostile_ckpt(ckpt, model, marker)
    # the payload is live: an ordinary unpickler in another process runs it
    code = f"import torch; torch.load({str(ckpt)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=tmp_path)
    assert marker.exists(), "test payload should execute under a plain unpickler"
    marker.unlink()

    (tmp_path / "model.yaml").write_text(
        "model:\n  target: taming.models.vqgan.VQModel\n  params:\n    embed_dim: 8\n    n_embed: 16\n"
        "    ddconfig: {double_z: false, z_channels: 32, resolution: 16, in_channels: 3, out_ch: 3,"
        " ch: 32, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], dropout: 0.0}\n"
    )
    tok = load_image_tokenizer(ckpt)
    assert not marker.exists(), "the loader executed the pickled payload"
    assert modname not in sys.modules
    assert tok.info["source"] == "taming" and tok.info["config_from"] == "yaml"
    assert any(p.endswith("system") for p in tok.info["placeholders"])
    assert f"{modname}.ModelCheckpoint" in tok.info["placeholders"]
    ref = model.state_dict()
    got = tok.model.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(tok.encode(x), model.eval().encode(x))

    # without the yaml the architecture is inferred from weight shapes (resolution given)
    (tmp_path / "model.yaml").unlink()
    tok2 = load_image_tokenizer(ckpt, resolution=16)
    assert tok2.info["config_from"] == "inferred from weight shapes"
    assert tok2.config.attn_resolutions == (8,) and tok2.config.ch_mult == (1, 2)
    assert torch.equal(tok2.encode(x), tok.encode(x))
    assert not marker.exists()


def test_restricted_load_placeholders_are_inert(tmp_path):
    obj, names = checkpoints.restricted_load(
        _pickle_zip(tmp_path, {"x": _Evil(str(tmp_path / "m"))})
    )
    assert isinstance(obj["x"], checkpoints.Inert) and obj["x"].args == (f"touch {tmp_path / 'm'}",)
    assert not (tmp_path / "m").exists() and names


def _pickle_zip(tmp_path: Path, obj) -> Path:
    p = tmp_path / "obj.pt"
    torch.save(obj, p)
    return p


def test_legacy_and_garbage_checkpoints_refused(tmp_path):
    legacy = tmp_path / "legacy.ckpt"
    torch.save(
        {"state_dict": VQGAN(TINY).state_dict()}, legacy, _use_new_zipfile_serialization=False
    )
    with pytest.raises(checkpoints.CheckpointError, match="legacy pickle-stream"):
        load_image_tokenizer(legacy)
    junk = tmp_path / "empty_dir"
    junk.mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="Expected one of"):
        load_image_tokenizer(junk)
    with pytest.raises(FileNotFoundError, match="not a preset name"):
        load_image_tokenizer(tmp_path / "nope")
    nosd = tmp_path / "nosd.ckpt"
    torch.save({"weights": {}}, nosd)
    with pytest.raises(checkpoints.CheckpointError, match="no 'state_dict'"):
        load_image_tokenizer(nosd)


def test_state_dict_round_trip(tmp_path):
    tok = load_image_tokenizer("shapes")
    out = tok.save(tmp_path / "tok", {"metrics": {"psnr": 1.0}})
    assert {p.name for p in out.iterdir()} == {"model.pt", "config.json", "manifest.json"}
    raw = torch.load(out / "model.pt", weights_only=True)  # plain containers only
    assert raw["config"]["n_embed"] == 2048 and raw["format"] == checkpoints.FORMAT
    back = load_image_tokenizer(out)
    a, b = tok.model.state_dict(), back.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and back.hash == tok.hash
    assert back.info["preset"] == "shapes"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(tok.encode(x), back.encode(x))
    assert torch.equal(tok.decode(tok.encode(x)), back.decode(back.encode(x)))
    # presets are seeded: the same name gives the same weights
    assert load_image_tokenizer("shapes").hash == tok.hash


def test_training_module_steps_restart_and_export(tmp_path):
    import lightning as L

    from lit_cm3leon.data.images import ImageDataModule
    from lit_cm3leon.training.vqgan_module import VQGANModule

    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    dm = ImageDataModule(
        source="dataset", train_dataset=imgs, val_dataset=imgs[:16], batch_size=8, val_batch_size=16
    )
    from omegaconf import OmegaConf

    m = VQGANModule(
        preset="shapes",
        vqgan=OmegaConf.create({"n_embed": 256}),  # Hydra-style containers are stored as plain ones
        betas=OmegaConf.create([0.9, 0.99]),
        restart_every=2,
        restart_until=1.0,
        warmup_steps=1,
        gan=True,
        gan_start=1,
    )
    trainer = L.Trainer(
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    before = m.model.quantize.embedding.weight.detach().clone()
    trainer.fit(m, dm)
    # trained in NHWC (the module's default), and the export below still writes the plain layout
    assert m.model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not m.model.encoder.conv_in.weight.is_contiguous()
    after = m.model.quantize.embedding.weight.detach()
    assert (
        int(m.batches_seen) == 5
    )  # 1 generator-only batch, then G + D steps per batch (1 + 2 * 4 >= 8)
    assert (before - after).abs().sum(1).gt(
        1e-3
    ).float().mean() > 0.5  # most codes moved (restarts)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    torch.load(tmp_path / "last.ckpt", weights_only=True)  # resumable without trusting pickles
    metrics = m.export(tmp_path / "image_tokenizer")
    assert set(metrics) >= {
        "psnr", "codebook_usage", "perplexity", "parser_agreement", "edit_codes_kept"
    }  # fmt: skip
    assert metrics["edit_codes_kept"] is None  # an image dataset without a shapes world
    from lit_cm3leon.data.shapes import ShapesWorld

    kept = m.edit_codes_kept(ShapesWorld(), 8)  # what export records when the world is there
    assert 0 < kept < 1  # an edit moves some codes, and most of an image stays
    assert (
        0 < metrics["codebook_usage"] <= 1
        and metrics["perplexity"] >= 1
        and np.isfinite(metrics["psnr"])
    )
    tok = load_image_tokenizer(tmp_path / "image_tokenizer")
    assert tok.encode(imgs[:2]).shape == (2, 8, 8)
    saved = torch.load(tmp_path / "image_tokenizer" / "model.pt", weights_only=True)
    assert all(t.is_contiguous() for t in saved["state_dict"].values())


def test_compiled_training_forward_adds_no_weights():
    from lit_cm3leon.training.vqgan_module import VQGANModule

    plain, compiled = VQGANModule(preset="shapes"), VQGANModule(preset="shapes", compile=True)
    for m in (plain, compiled):
        m.on_fit_start()  # wraps the training forward (compilation itself happens on first call)
    assert isinstance(compiled.__dict__["_train_forward"], torch._dynamo.eval_frame.OptimizedModule)
    assert plain.__dict__["_train_forward"] is plain.model
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no "_orig_mod." copies


def test_periodic_checkpoints_resume_without_lightning_warning(tmp_path):
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_cm3leon.data.images import ImageDataModule
    from lit_cm3leon.training.vqgan_module import VQGANModule

    imgs = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), np.uint8))

    class CountBatches(L.Callback):
        n = 0

        def on_train_batch_end(self, *args):
            self.n += 1

    def fit(steps, ckpt_path=None):
        dm = ImageDataModule(
            source="dataset", train_dataset=imgs, val_dataset=imgs[:8], batch_size=4
        )
        m = VQGANModule(preset="shapes", vqgan={"n_embed": 64}, warmup_steps=1)
        cb, count = (
            ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2),
            CountBatches(),
        )
        trainer = L.Trainer(
            max_steps=steps, callbacks=[cb, count], logger=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        )  # fmt: skip
        trainer.fit(m, dm, ckpt_path=ckpt_path)
        return m, count.n

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(2)
    assert not [w for w in caught if "manual optimization" in str(w.message)]
    resumed, ran = fit(4, tmp_path / "last.ckpt")
    assert ran == 2 and int(resumed.batches_seen) == 4  # 2 restored from the checkpoint + 2 run
