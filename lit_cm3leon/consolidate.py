"""``python -m lit_cm3leon.consolidate CKPT --out outputs/pretrain``: a training checkpoint to a
published decoder that ``generate`` and ``eval/`` load.

CKPT is a Lightning checkpoint file (``last.ckpt``) or the folder of a sharded FSDP checkpoint
(``trainer=fsdp`` saves ``state_dict_type: sharded``); the shards are gathered on the CPU with
torch.distributed.checkpoint (through Lightning's own reader), the ``net.`` weights extracted,
and written as ``model.pt`` (plain containers, ``weights_only=True``) beside ``vocab.json`` and a
``manifest.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def read_training_checkpoint(path: Path) -> dict:
    if path.is_dir():  # sharded FSDP checkpoint
        from lightning.fabric.utilities.load import _load_distributed_checkpoint
        from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

        return _format_checkpoint(_load_distributed_checkpoint(path))
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a .ckpt file or a sharded FSDP folder"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def consolidate(ckpt: str | Path, out: str | Path) -> Path:
    from lit_cm3leon.model import ModelConfig, build_model
    from lit_cm3leon.tokenizer.vocab import Vocab
    from lit_cm3leon.training.checkpoint import save_decoder
    from lit_cm3leon.utils.manifest import write_manifest

    record = read_training_checkpoint(Path(ckpt))
    hparams = record.get("hyper_parameters") or {}
    if "model" not in hparams or "vocab_path" not in hparams:
        raise ValueError(
            f"{ckpt} is not a CM3LeonModule checkpoint (its hyper_parameters lack model/vocab_path)"
        )
    vocab = Vocab.load(hparams["vocab_path"])
    config = ModelConfig.from_dict(hparams["model"]).for_vocab(vocab)
    state = {
        k.removeprefix("net."): v for k, v in record["state_dict"].items() if k.startswith("net.")
    }
    model = build_model(config)
    model.load_state_dict(state)
    out = Path(out)
    save_decoder(out, model, vocab, step=int(record.get("global_step", 0)))
    vocab.save(out / "vocab.json")
    write_manifest(
        out, stage=out.name, metrics={}, source=str(ckpt), step=int(record.get("global_step", 0))
    )
    return out / "model.pt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("ckpt", help="a Lightning .ckpt file or a sharded FSDP checkpoint folder")
    ap.add_argument(
        "--out", required=True, help="folder to publish the decoder in (e.g. outputs/pretrain)"
    )
    args = ap.parse_args(argv)
    print(consolidate(args.ckpt, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
