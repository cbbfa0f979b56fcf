"""Small artifacts in the suite's real formats, written by the tests themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = ["red", "green", "blue", "circle", "square", "triangle", "a", "and", "small", "large"]


def make_token_shards(
    root: Path, n: int, hw: int = 4, n_codes: int = 16, seed: int = 0, per_shard: int = 50
) -> Path:
    """A pre-tokenized shard folder (the `prepare tokenize` layout) with learnable structure:
    the first word of each caption decides the image's codes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n, per_shard)):
        rows = range(start, min(n, start + per_shard))
        codes, records = [], []
        for i in rows:
            color = int(rng.integers(0, 3))
            codes.append(
                np.full((hw, hw), color * 5, dtype=np.int16)
                + rng.integers(0, 2, (hw, hw)).astype(np.int16)
            )
            text = f"a {WORDS[color]} {WORDS[3 + int(rng.integers(0, 3))]}"
            records.append({"doc_id": i, "text": text, "source": "fixture"})
        name = f"shard-{s:05d}"
        np.savez(
            root / f"{name}.npz", codes=np.stack(codes), doc_id=np.array(list(rows), dtype=np.int64)
        )
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "manifest.json").write_text(
        json.dumps({"h": hw, "w": hw, "n_codes": n_codes, "count": n})
    )
    return root


def make_text_tokenizer(root: Path, n_codes: int = 16, hw: int = 4, vocab_size: int = 300) -> Path:
    """tokenizer.json + vocab.json for the fixture's captions."""
    from lit_cm3leon.tokenizer.text import TextTokenizer
    from lit_cm3leon.tokenizer.vocab import Vocab

    corpus = [" ".join(WORDS)] * 10 + [f"a {c} {k}" for c in WORDS[:3] for k in WORDS[3:6]] * 5
    tok = TextTokenizer.train(corpus, vocab_size=vocab_size, min_frequency=1)
    tok.save(root)
    Vocab(n_text=tok.vocab_size, n_image=n_codes, image_h=hw, image_w=hw).save(root / "vocab.json")
    return root


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_outputs(out: Path) -> Path:
    """An outputs/ folder of fresh, tiny artifacts in the published formats: text tokenizer,
    shapes image tokenizer, a debug decoder under pretrain/, and two tiny CLIPs."""
    import torch

    from lit_cm3leon.model import ModelConfig, build_model
    from lit_cm3leon.retrieval.encoder import ClipEncoder
    from lit_cm3leon.tokenizer.codec import DocumentCodec
    from lit_cm3leon.tokenizer.image import load_image_tokenizer
    from lit_cm3leon.tokenizer.text import cli as text_cli
    from lit_cm3leon.training.checkpoint import save_decoder

    assert (
        text_cli(
            ["--out", str(out / "text_tokenizer"), "--vocab-size", "300", "--shapes-samples", "100"]
        )
        == 0
    )
    load_image_tokenizer("shapes").save(out / "image_tokenizer")
    codec = DocumentCodec.load(out / "text_tokenizer")
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("debug", vocab_size=codec.vocab.size, max_seq_len=512))
    torch.nn.init.normal_(
        model.lm_head.weight, std=2.0
    )  # a fresh head is zero: make prompts matter
    save_decoder(out / "pretrain", model, codec.vocab)
    arch = out.parent / "tiny-clip.json"
    arch.write_text(json.dumps(TINY_CLIP))
    for seed, name in ((0, "retriever"), (1, "eval_clip")):
        torch.manual_seed(seed)
        ClipEncoder.from_arch(str(arch)).save(out / name)
    return out


def tiny_pretrain_overrides(
    steps: int, *extra: str, seq_len: int = 48, batch_size: int = 2
) -> list[str]:
    """`fit experiment=pretrain` at the debug size on fixture shards: no retrieval, no image
    tokenizer (so no sample grid and no artifact requirements), fp32, CSV logs."""
    return [
        "experiment=pretrain",
        "model=debug",
        "data.index_dir=null",
        "data.n_retrieved=0",
        "data.val_retrieve_k=0",
        f"data.seq_len={seq_len}",
        "data.image_tokens=16",
        f"data.batch_size={batch_size}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=1",
        "trainer.precision=32-true",
        "trainer.enable_model_summary=false",
        "logger=csv",
        "~callbacks.progress_bar",
        "~callbacks.sample_grid",
        "requires=[]",
        *extra,
    ]
