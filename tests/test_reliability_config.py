"""Contradictory or missing settings fail in `fit` before anything is instantiated, naming the fix."""

from __future__ import annotations

import pytest

from lit_cm3leon.fit import train
from lit_cm3leon.utils.config import ConfigError
from tests.fixtures import make_text_tokenizer, make_token_shards

BASE = [
    "experiment=pretrain",
    "model=debug",
    "data.index_dir=null",
    "data.n_retrieved=0",
    "data.val_retrieve_k=0",
    "data.seq_len=48",
    "data.image_tokens=16",
    "trainer.max_steps=2",
    "logger=csv",
]


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    out = tmp_path / "outputs"
    make_text_tokenizer(out / "text_tokenizer")
    make_token_shards(out / "tokens" / "shapes-train", 20)
    make_token_shards(out / "tokens" / "shapes-heldout", 8, seed=1)
    from lit_cm3leon.tokenizer.image import load_image_tokenizer

    load_image_tokenizer("shapes").save(
        out / "image_tokenizer"
    )  # a fresh tokenizer meets `requires`

    def refuse(*args, **kwargs):
        raise AssertionError("something was instantiated before the config was validated")

    monkeypatch.setattr("hydra.utils.instantiate", refuse)
    return out


CASES = {
    "context shorter than an image": (
        ["data.seq_len=12"],
        r"data.seq_len=12 is shorter than one image.*raise data.seq_len",
    ),
    "context longer than the model": (
        ["data.seq_len=300"],
        r"exceeds model.max_seq_len=256.*lower data.seq_len",
    ),
    "image tokens of another tokenizer": (
        ["data.image_tokens=64", "data.seq_len=100"],
        r"data.image_tokens=64 but .* make 4x4=16 .*set data.image_tokens=16",
    ),
    "retrieval on, index null": (
        ["data.n_retrieved=3"],
        r"retrieval is on .* data.index_dir is null: set data.n_retrieved=0",
    ),
    "retrieval on, no index built": (
        ["data.val_retrieve_k=2", "data.index_dir=${paths.output_dir}/index"],
        r"no memory bank at .*index: build it with `python -m lit_cm3leon.prepare index`",
    ),
    "sample stream shorter than the run": (
        ["data.max_steps=1"],
        r"data.max_steps=1 is less than trainer.max_steps=2",
    ),
    "missing resume checkpoint": (
        ["ckpt_path=/nonexistent/last.ckpt"],
        r"ckpt_path=/nonexistent/last.ckpt does not exist.*ckpt_path=null",
    ),
    "missing init_from decoder": (
        ["module.init_from=/nonexistent/pretrain"],
        r"module.init_from=.* holds no model.pt.*experiment=pretrain",
    ),
    "lr monitor without a logger": (
        ["logger=none"],
        r"callbacks.lr_monitor needs a logger.*~callbacks.lr_monitor",
    ),
    "bad fraction out of range": (
        ["data.max_bad_fraction=1.5"],
        r"data.max_bad_fraction=1.5 must be in \[0, 1\)",
    ),
    "missing shards": (
        ["data.tokens_dir=${paths.output_dir}/tokens/none"],
        r"needs .*tokens/none/manifest.json.*prepare tokenize --source shapes --split train",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_fails_before_anything_is_built(compose, artifacts, case):
    extra, match = CASES[case]
    with pytest.raises(ConfigError, match=match):
        train(compose([*BASE, *extra]))


def test_valid_config_passes_validation(compose, artifacts):
    with pytest.raises(
        AssertionError, match="instantiated"
    ):  # validation passed, then building began
        train(compose(BASE))


def test_auto_resume_takes_the_newest_complete_checkpoint(compose, tmp_path):
    """ckpt_path=auto picks the newest of last.ckpt, SLURM's hpc_ckpt_N.ckpt and the periodic
    checkpoints, passing over a file cut short by a kill during its write."""
    import os

    import torch

    from lit_cm3leon.fit import _resolve_ckpt_path

    cfg = compose(["experiment=pretrain"])
    ckpt_dir = tmp_path / "logs" / "pretrain" / "checkpoints"
    assert _resolve_ckpt_path(cfg) is None  # nothing yet: start fresh
    ckpt_dir.mkdir(parents=True)
    for t, name in enumerate(["step000010.ckpt", "last.ckpt", "hpc_ckpt_1.ckpt"]):
        torch.save({"global_step": 10 + t}, ckpt_dir / name)
        os.utime(ckpt_dir / name, (1_000 + t, 1_000 + t))
    assert _resolve_ckpt_path(cfg) == str(ckpt_dir / "hpc_ckpt_1.ckpt")
    (ckpt_dir / "hpc_ckpt_1.ckpt").unlink()
    assert _resolve_ckpt_path(cfg) == str(ckpt_dir / "last.ckpt")
    last = ckpt_dir / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # killed mid-write
    os.utime(last, (2_000, 2_000))
    assert _resolve_ckpt_path(cfg) == str(ckpt_dir / "step000010.ckpt")
    assert compose(["trainer=slurm"]).trainer.default_root_dir == str(
        ckpt_dir.parent.parent / "fit" / "checkpoints"
    )


def test_auto_resume_refuses_a_checkpoint_of_another_config(compose):
    """ckpt_path=auto must not silently continue a run trained with other settings: a changed
    model/optimiser/data key stops with the keys named and both remedies; the same run, or one
    differing only in callbacks, resumes; an explicit ckpt_path is taken as meant."""
    from lit_cm3leon.fit import RUN_CONFIG, check_resume_config

    first = compose(["experiment=pretrain"])
    check_resume_config(first, None, auto=True)  # fresh start: records the run's config
    saved = first.paths.ckpt_dir + "/" + RUN_CONFIG
    assert "lr: 0.001" in open(saved).read()
    ckpt = first.paths.ckpt_dir + "/last.ckpt"
    check_resume_config(compose(["experiment=pretrain"]), ckpt, auto=True)
    check_resume_config(compose(["experiment=pretrain", "~callbacks.sample_grid"]), ckpt, auto=True)
    longer = compose(["experiment=pretrain", "trainer.max_steps=2000"])  # a longer budget
    check_resume_config(longer, ckpt, auto=True)
    changed = compose(["experiment=pretrain", "module.lr=0.002", "retrieval.lexical_weight=0.5"])
    with pytest.raises(ValueError) as err:
        check_resume_config(changed, ckpt, auto=True)
    msg = str(err.value)
    assert "module.lr: 0.001 -> 0.002" in msg and "data.retrieval.lexical_weight: 1.0 -> 0.5" in msg
    assert "ckpt_path=null" in msg and f"ckpt_path={ckpt}" in msg
    check_resume_config(changed, ckpt, auto=False)  # explicit path: resumed as asked
    assert "lr: 0.002" in open(saved).read()  # and now the record is of this run
