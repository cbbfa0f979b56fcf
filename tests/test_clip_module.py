"""Retriever CLIP: recall metrics, a 20-step training smoke test, export, config composition."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lit_cm3leon.data.pairs import ShapesPairDataModule
from lit_cm3leon.data.shapes import ShapesWorld
from lit_cm3leon.retrieval.encoder import ClipEncoder
from lit_cm3leon.retrieval.metrics import chance_recall, group_ids, recall_at_k
from lit_cm3leon.training.clip_module import CLIPModule

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_recall_counts_attribute_hits_and_chance():
    g = group_ids([("a",), ("b",), ("a",), ["c"], ["c"]])  # unhashable keys work too
    assert g[0] == g[2] and g[3] == g[4] and len(set(g.tolist())) == 3
    gallery = np.eye(4, dtype=np.float32)
    groups = np.array([0, 0, 1, 2])
    query = np.array([[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]], np.float32)
    # query 0 (group 0) retrieves item 1 (group 0): a hit although it is not item 0
    rec = recall_at_k(query, gallery, np.array([0, 1, 1]), groups, ks=(1, 4))
    assert rec[1] == pytest.approx(1 / 3) and rec[4] == 1.0
    ch = chance_recall(np.array([0, 2]), groups, ks=(1, 4))
    assert ch[1] == pytest.approx((2 / 4 + 1 / 4) / 2) and ch[4] == 1.0


def test_clip_training_smoke(tmp_path):
    L.seed_everything(0)
    dm = ShapesPairDataModule(
        ShapesWorld(), n_train=640, batch_size=32, parity=0, caption="both", n_val=64
    )
    dm.setup("fit")
    assert (dm.train_set.indices % 2 == 0).all() and len(dm.train_set) == 320
    module = CLIPModule(arch="shapes-clip-debug", max_steps=20, warmup_steps=5, lr=3e-3)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=20,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Record()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)  # plain containers only
    assert ckpt["hyper_parameters"]["arch"] == "shapes-clip-debug"
    assert len(losses) == 20 and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert {"t2i_r1", "t2i_r5", "i2t_r1", "t2i_r1_chance"} <= set(module.last_metrics)
    out = module.export(tmp_path / "retriever")
    assert out["val/t2i_r5"] >= out["val/t2i_r5_chance"] and out["dim"] == 64
    enc = ClipEncoder.load(tmp_path / "retriever")
    assert enc.hash == out["encoder_hash"]


MINIMAL_ROOT = """
defaults:
  - _self_
  - data: null
  - optional retrieval: default
  - experiment: null
stage: null
seed: 0
module: null
paths: {output_dir: outputs, data_dir: data}
trainer: {max_steps: 1000, val_check_interval: 500}
"""


def _compose(name, tmp_path, overrides=()):
    """Compose with the suite's fit.yaml, or with a minimal root while it is not there."""
    import shutil

    from hydra import compose, initialize_config_dir

    root = CONFIGS
    if not (CONFIGS / "fit.yaml").is_file():
        root = tmp_path / "configs"
        shutil.copytree(CONFIGS, root)
        (root / "fit.yaml").write_text(MINIMAL_ROOT)
    with initialize_config_dir(str(root), version_base="1.3"):
        return compose("fit", overrides=[f"experiment={name}", *overrides])


@pytest.mark.parametrize("name,parity,seed", [("retriever", 0, 0), ("eval_clip", 1, 1)])
def test_experiment_configs_compose_and_instantiate(name, parity, seed, tmp_path):
    from hydra.utils import instantiate

    cfg = _compose(name, tmp_path)
    assert cfg.stage == name and cfg.data.parity == parity and cfg.seed == seed
    assert cfg.data.seed == seed and cfg.retrieval.max_score == 0.98
    assert cfg.module.max_steps == cfg.trainer.max_steps
    cfg.data.world = {"_target_": "lit_cm3leon.data.shapes.ShapesWorld"}
    dm = instantiate(cfg.data)
    assert isinstance(dm, ShapesPairDataModule) and dm.parity == parity
    module = instantiate(cfg.module)
    assert isinstance(module, CLIPModule)
    assert type(module.hparams["betas"]) is list  # not a ListConfig: checkpoints stay plain


def test_retrieval_configs_compose():
    from hydra import compose, initialize_config_dir

    from lit_cm3leon.retrieval.strategy import RetrievalConfig

    with initialize_config_dir(str(CONFIGS / "retrieval"), version_base="1.3"):
        default = compose("default")
        vit = compose("vit_b32")
    rc = RetrievalConfig.from_mapping(default)
    assert rc.max_score == 0.98 and rc.query_dropout == 0.2 and rc.n_train_docs == 3
    assert rc.pair_max_score > rc.max_score  # document-vs-document scores sit closer to 1
    vit_rc = RetrievalConfig.from_mapping(vit)
    assert vit.encoder.path == "ViT-B-32" and vit_rc.max_score == 0.9 and vit_rc.n_train_docs == 3
    assert vit_rc.pair_max_score == 0.9
