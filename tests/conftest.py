"""Shared fixtures: the config directory, a Hydra compose helper, quiet threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"


@pytest.fixture
def compose(tmp_path):
    """compose(overrides) -> DictConfig of configs/fit.yaml with paths under tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(
                "fit",
                overrides=[
                    f"paths.root_dir={tmp_path}",
                    f"paths.run_dir={tmp_path}/run",
                    *(overrides or []),
                ],
                return_hydra_config=True,
            )
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
