"""Every config composes; what can be built on this machine is built."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, ROOT

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml") if p.stem != "default")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_resolves(compose, experiment):
    cfg = compose([f"experiment={experiment}"])
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(body, resolve=True)  # every interpolation resolves
    assert cfg.module._target_ and cfg.data._target_
    assert cfg.task and cfg.task != "fit"


@pytest.mark.parametrize("debug", ["fdr", "overfit", "limit"])
def test_debug_configs_compose(compose, debug):
    cfg = compose([f"experiment={EXPERIMENTS[0]}", f"debug={debug}"])
    assert cfg.publish is False and cfg.ckpt_path is None


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_strategy_builds(compose, trainer):
    """GPU/FSDP/SLURM trainers are checked by building their strategy objects, not starting them."""
    cfg = compose([f"trainer={trainer}"])
    if "strategy" in cfg.trainer and not isinstance(cfg.trainer.strategy, str):
        strategy = instantiate(cfg.trainer.strategy)
        assert type(strategy).__name__.endswith("Strategy")
    for plugin in cfg.trainer.get("plugins") or []:
        assert instantiate(plugin) is not None
    if cfg.trainer.accelerator == "cpu":
        trainer_obj = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer_obj.max_steps == cfg.trainer.max_steps


def test_callbacks_and_loggers_instantiate(compose):
    cfg = compose(["logger=tensorboard"])
    for group in ("callbacks", "logger"):
        for item in cfg[group].values():
            assert instantiate(item) is not None


def test_help_lists_groups():
    out = subprocess.run(
        [sys.executable, "-m", "lit_cm3leon.fit", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for group in (
        "data",
        "model",
        "trainer",
        "callbacks",
        "logger",
        "paths",
        "experiment",
        "debug",
        "hparams_search",
        "decoding",
        "retrieval",
    ):
        assert f"{group}:" in out.stdout, f"--help does not list the {group} group"


def test_unknown_experiment_lists_available(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lit_cm3leon.fit",
            "experiment=no_such_thing",
            f"paths.root_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode != 0
    assert "Available options in 'experiment'" in out.stderr
    for name in EXPERIMENTS:
        assert name in out.stderr


def test_no_experiment_names_the_fix(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lit_cm3leon.fit", f"paths.root_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode != 0 and "experiment=<name>" in out.stderr


def test_missing_requirement_names_command(compose):
    from lit_cm3leon.utils.config import ConfigError, validate_fit_config

    cfg = compose(["experiment=pretrain"])
    with pytest.raises(ConfigError, match="prepare text-tokenizer"):
        validate_fit_config(cfg)


def test_context_shorter_than_an_image_is_refused(compose):
    from lit_cm3leon.utils.config import ConfigError, validate_fit_config

    cfg = compose(["experiment=pretrain", "data.seq_len=40", "requires=[]"])
    with pytest.raises(ConfigError, match="shorter than one image"):
        validate_fit_config(cfg)


def test_sft_task_overrides_merge_unless_the_mixture_is_replaced(compose):
    """`data.tasks={...}` merges into the mixture (every task stays); `~data.tasks` then
    `+data.tasks={...}` replaces it (the README's one-task SFT)."""
    merged = compose(["experiment=sft", "data.tasks={edit: 2.0}"]).data.tasks
    assert len(merged) == 10 and merged.edit == 2.0 and merged.caption_short is None
    assert compose(["experiment=sft", "data.tasks.edit=1.5x"]).data.tasks.edit == "1.5x"
    only = compose(["experiment=sft", "~data.tasks", "+data.tasks={edit: null}"]).data.tasks
    assert list(only) == ["edit"]


def test_inference_retrieval_uses_the_training_strategy(compose):
    """Outside Hydra (generate, eval) the retriever reads the same thresholds as training."""
    from lit_cm3leon.retrieval.bank_docs import default_strategy

    cfg = compose(["experiment=pretrain"])
    strategy = default_strategy()
    assert strategy and all(cfg.retrieval[k] == v for k, v in strategy.items())


def test_submitit_slurm_launcher_composes(compose):
    cfg = compose(["experiment=pretrain", "trainer=slurm", "hydra/launcher=slurm"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.nodes == cfg.trainer.num_nodes


def test_one_world_knob_reaches_every_stage_that_draws_scenes(compose, tmp_path):
    """`world.cell_align` sets the tokenizer's images, the retrievers' pairs and SFT's scenes;
    the pipeline's --cell-align passes it to every training run and every `prepare tokenize`."""
    from lit_cm3leon.pipeline import stages

    paths = {"tokenizer": "data.world", "retriever": "data.world", "eval_clip": "data.world",
             "sft": "data.shapes.world"}  # fmt: skip
    for experiment, node in paths.items():
        for align in (None, 4):
            over = [] if align is None else [f"world.cell_align={align}"]
            cfg = compose([f"experiment={experiment}", *over])
            got = OmegaConf.select(cfg, node)
            assert OmegaConf.to_container(got, resolve=True)["cell_align"] == (align or 1)
    for align in (None, 4):
        for stage in stages(tmp_path / "outputs", align):
            cmd = stage.command
            if "lit_cm3leon.fit" in cmd:
                assert (f"world.cell_align={align}" in cmd) == (align is not None), stage.name
            if "tokenize" in cmd:
                flag = cmd[cmd.index("--cell-align") + 1] if "--cell-align" in cmd else None
                assert flag == (None if align is None else str(align)), stage.name
    assert sum("tokenize" in s.command for s in stages(tmp_path / "outputs", 4)) == 3
