"""``manifest.json`` beside every published artifact: what made it, its config hash, metrics."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def config_hash(container: Any) -> str:
    blob = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(
    out_dir: str | Path, stage: str, cfg: Any = None, metrics: dict | None = None, **extra: Any
) -> dict:
    """Write ``out_dir/manifest.json``; ``cfg`` may be a DictConfig or a plain dict."""
    config = cfg
    if cfg is not None and not isinstance(cfg, dict):
        from omegaconf import OmegaConf

        body = OmegaConf.masked_copy(
            cfg, [k for k in cfg if k != "hydra"]
        )  # Hydra's own node is not ours
        config = OmegaConf.to_container(body, resolve=True)
    record = {
        "stage": stage,
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": socket.gethostname(),
        "git_commit": _git_commit(),
        "config_hash": config_hash(config) if config is not None else None,
        "metrics": metrics or {},
        **extra,
        "config": config,
    }
    out = Path(out_dir) / MANIFEST
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(out)  # atomic: a killed run never leaves a half manifest
    return record


def read_manifest(out_dir: str | Path) -> dict | None:
    """The manifest of a finished artifact, or None when absent, unreadable or marked incomplete."""
    path = Path(out_dir) / MANIFEST
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("complete", True) else None
