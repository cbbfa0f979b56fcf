"""Hydra entry point: ``python -m lit_cm3leon.fit experiment=<name> [overrides]``.

Builds the datamodule, LightningModule, callbacks, loggers and trainer from the config tree,
trains (resuming from the stage's ``last.ckpt`` when ``ckpt_path=auto``), then publishes the
module's artifact under ``outputs/<stage>/`` with a ``manifest.json``.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lit_cm3leon.utils.config import validate_fit_config
from lit_cm3leon.utils.malloc import keep_freed_memory
from lit_cm3leon.utils.manifest import write_manifest

log = logging.getLogger("lit_cm3leon.fit")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def _instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group that has a ``_target_``."""
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def _build(node: DictConfig) -> Any:
    """instantiate(node), surfacing our own clear errors (bad checkpoint, vocabulary, missing
    file) instead of Hydra's wrapper around them."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ValueError | FileNotFoundError):
            raise cause from None
        raise


def _resolve_ckpt_path(cfg: DictConfig) -> str | None:
    if cfg.ckpt_path in (None, "null", ""):
        return None
    if cfg.ckpt_path == "auto":
        # the newest complete resume point: last.ckpt (periodic or on preemption), a SLURM
        # requeue's hpc_ckpt_N.ckpt (trainer=slurm writes them here too) or a periodic checkpoint.
        # A file cut short by a kill during its write (no zip directory) is passed over.
        found = sorted(
            (p for p in Path(cfg.paths.ckpt_dir).glob("*.ckpt") if p.is_file()),
            key=lambda p: p.stat().st_mtime_ns,
            reverse=True,
        )
        for path in found:
            if zipfile.is_zipfile(path):
                return str(path)
            log.warning("skipping %s: incomplete or not a checkpoint (killed while writing?)", path)
        return None
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={cfg.ckpt_path} does not exist (use ckpt_path=null to start fresh)"
        )
    return str(path)


RUN_CONFIG = "run_config.yaml"  # beside the checkpoints: the config they were trained with
# What a checkpoint's run is: the model and optimisation, the data (with retrieval, and the
# sample stream's length, which follows trainer.max_steps) and the seed. Callbacks, loggers and
# the trainer's devices may change across a resume.
RUN_IDENTITY = ("module", "data", "seed")
# Keys of the identity that may differ on a resume: a longer budget continues the run (the
# sample stream follows trainer.max_steps); runtime switches; and the weight shapes, which the
# checkpoint's own check reports as "another model size".
RESUME_MAY_CHANGE = {
    "data.max_steps",
    "module.peak_flops",
    "module.model.activation_checkpointing",
    "module.model.compile",
}


def _identity(cfg: DictConfig) -> dict[str, Any]:
    """The ``RUN_IDENTITY`` part of the config, interpolations resolved where they can be."""
    out = {}
    for key in RUN_IDENTITY:
        node = cfg.get(key)
        if isinstance(node, DictConfig):
            try:
                node = OmegaConf.to_container(node, resolve=True)
            except Exception:  # e.g. a ${hydra:...} value outside a Hydra run
                node = OmegaConf.to_container(node, resolve=False)
        out[key] = node
    return out


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf}."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_resume_config(cfg: DictConfig, ckpt_path: str | None, auto: bool) -> None:
    """Guard ``ckpt_path=auto``: resuming is only right for the run that wrote the checkpoint.

    The config of a run is saved as ``run_config.yaml`` in its checkpoint directory. When
    ``auto`` found a checkpoint and that file holds another config (a changed override, a new
    preset), stop and name the keys that differ rather than silently continue the old run. An
    explicit ``ckpt_path=<file>`` is taken as meant and not checked. Rank zero (re)writes the
    file for the current run."""
    saved_path = Path(cfg.paths.ckpt_dir) / RUN_CONFIG
    identity = _identity(cfg)
    current = _flat(identity)
    if auto and ckpt_path and saved_path.is_file():
        saved = _flat(OmegaConf.to_container(OmegaConf.load(saved_path)))
        from lit_cm3leon.training.checkpoint import SIZE_FIELDS

        free = RESUME_MAY_CHANGE | {f"module.model.{k}" for k in SIZE_FIELDS}
        diff = sorted(
            k for k in (set(saved) | set(current)) - free if saved.get(k) != current.get(k)
        )
        if diff:
            shown = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:8])
            more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
            raise ValueError(
                f"ckpt_path=auto found {ckpt_path}, but that run had another config: {shown}{more}. "
                "Start fresh with ckpt_path=null (or another task=<name>, which checkpoints "
                f"elsewhere), or resume it anyway with ckpt_path={ckpt_path}"
            )
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        saved_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved_path.with_suffix(".yaml.tmp")  # other ranks may be reading the old one
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(identity)))
        tmp.replace(saved_path)


def _close_loggers(loggers: list[Any], status: str) -> None:
    for lg in loggers:
        try:
            lg.finalize(status)
            experiment = getattr(lg, "experiment", None)
            if hasattr(experiment, "close"):
                experiment.close()
        except Exception:  # a broken logger must not hide the original error
            log.exception("closing logger %s failed", type(lg).__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit one experiment and publish its artifact; returns the final logged metrics."""
    import lightning as L
    from hydra.utils import instantiate

    from lit_cm3leon.training.checkpoint import CheckpointError

    validate_fit_config(cfg)
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    L.seed_everything(cfg.seed, workers=True)

    log.info("datamodule <%s>", cfg.data._target_)
    datamodule = _build(cfg.data)
    if cfg.get("data_only"):
        return build_data(cfg, datamodule)
    log.info("module <%s>", cfg.module._target_)
    module = _build(cfg.module)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    ckpt_path = _resolve_ckpt_path(cfg)
    check_resume_config(cfg, ckpt_path, auto=cfg.ckpt_path == "auto")
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except pickle.UnpicklingError as err:
            if not ckpt_path:
                raise
            raise CheckpointError(
                f"ckpt_path={ckpt_path} holds pickled objects that a safe load refuses (nothing in it "
                "was run). Resume only from checkpoints written by lit_cm3leon, or start fresh with "
                f"ckpt_path=null. Detail: {str(err).splitlines()[0]}"
            ) from None
        if cfg.get("test_after_fit"):
            trainer.test(module, datamodule=datamodule)
    except BaseException:
        _close_loggers(loggers, "failed")
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    if cfg.publish and cfg.stage and trainer.is_global_zero and hasattr(module, "export"):
        out_dir = Path(cfg.paths.output_dir) / cfg.stage
        out_dir.mkdir(parents=True, exist_ok=True)
        exported = module.export(out_dir) or {}
        metrics.update({k: float(v) for k, v in exported.items() if isinstance(v, int | float)})
        write_manifest(out_dir, stage=cfg.stage, cfg=cfg, metrics=metrics, step=trainer.global_step)
        log.info("published %s", out_dir)
    _close_loggers(loggers, "success")
    return metrics


def build_data(cfg: DictConfig, datamodule: Any) -> dict[str, float]:
    """``data_only=true``: the data module's ``setup("fit")`` alone (for SFT on the shapes
    world: its images tokenized into ``data.cache_dir``, which the training run then reads),
    and a manifest under ``outputs/<stage>/`` with the mixture's rates when it has one."""
    datamodule.setup("fit")
    metrics = {f"rate_{k}": float(v) for k, v in (getattr(datamodule, "rates", None) or {}).items()}
    if cfg.publish and cfg.stage:
        out_dir = Path(cfg.paths.output_dir) / cfg.stage
        out_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(out_dir, stage=cfg.stage, cfg=cfg, metrics=metrics, step=0)
        log.info("published %s (data only)", out_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="fit")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub tag fails at once, offline
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
