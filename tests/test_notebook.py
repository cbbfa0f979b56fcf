"""The quickstart notebook runs top to bottom on a tiny published outputs/ folder."""

from __future__ import annotations

import os
import subprocess
import sys

import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT
from tests.fixtures import make_tiny_outputs


def test_quickstart_notebook_executes(tmp_path):
    out = make_tiny_outputs(tmp_path / "outputs")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    prep = [sys.executable, "-m", "lit_cm3leon.prepare"]
    subprocess.run(
        [
            *prep,
            "tokenize",
            "--source",
            "shapes",
            "--n",
            "40",
            "--caption",
            "long",
            "--tokenizer",
            str(out / "image_tokenizer"),
            "--out",
            str(out / "tokens" / "shapes-train"),
        ],
        check=True,
        env=env,
    )
    subprocess.run(
        [
            *prep,
            "index",
            "--encoder",
            str(out / "retriever"),
            "--tokens",
            str(out / "tokens" / "shapes-train"),
            "--out",
            str(out / "index"),
        ],
        check=True,
        env=env,
    )
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    saved = dict(os.environ)
    os.environ.update(
        LIT_CM3LEON_OUTPUTS=str(out), MPLBACKEND="Agg", PYTHONPATH=str(ROOT)
    )  # the kernel inherits these
    try:
        NotebookClient(
            nb,
            timeout=300,
            kernel_name="python3",
            resources={"metadata": {"path": str(ROOT / "notebooks")}},
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "memory bank: True" in text and "caption:" in text and "->" in text and "edit:" in text
