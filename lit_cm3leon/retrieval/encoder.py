"""CLIP bi-encoder on open_clip: text, image and document vectors for the memory bank.

A document's vector is the mean of its L2-normalized text and image embeddings (either alone
when one is missing), L2-normalized again, so every score in the suite is a cosine in [-1, 1].

Any open_clip architecture works with a *local* pretrained file (``pretrained=/path/file.pt``);
hub tags are tried with ``HF_HUB_OFFLINE=1`` so they resolve from a local cache or fail at once.
The shapes world uses a small CLIP whose architecture ships in ``retrieval/arch/``.

Saved folder (``save``/``load``)::

    open_clip_config.json   {"model_cfg": ..., "preprocess_cfg": ...}  (open_clip's local-dir layout)
    model.pt                plain state dict, loadable with torch.load(weights_only=True)
    encoder.json            name, dim, hash, image size, context length
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ARCH_DIR = Path(__file__).parent / "arch"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "model.pt"
MANIFEST_FILE = "encoder.json"

_registered = False


def _open_clip():
    """Import open_clip with hub downloads switched off and our architectures registered."""
    global _registered
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    if not _registered:
        open_clip.add_model_config(ARCH_DIR)
        _registered = True
    return open_clip


def list_archs() -> list[str]:
    """Architectures shipped with lit_cm3leon (``retrieval/arch/*.json``)."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def state_dict_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and bytes of a state dict (keys sorted); 16 hex chars."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class ClipEncoder:
    """Frozen-at-use CLIP: ``embed_text``, ``embed_image``, ``embed_document(s)`` -> float32 numpy.

    ``model`` is an open_clip ``CLIP`` (an ``nn.Module``; the retriever LightningModule trains it
    in place). ``name`` is the architecture name recorded in saved folders and index manifests.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        model_cfg: dict,
        name: str,
        preprocess_cfg: dict | None = None,
        batch_size: int = 256,
    ) -> None:
        oc = _open_clip()
        self.model = model.eval()
        self.model_cfg = model_cfg
        self.name = name
        pre = dict(preprocess_cfg or oc.get_model_preprocess_cfg(model) or {})
        self.image_size = int(_as_int(model_cfg["vision_cfg"].get("image_size", 224)))
        self.mean = tuple(pre.get("mean", oc.OPENAI_DATASET_MEAN))
        self.std = tuple(pre.get("std", oc.OPENAI_DATASET_STD))
        self.preprocess_cfg = {
            "size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        text_cfg = model_cfg["text_cfg"]
        self.context_length = int(text_cfg.get("context_length", 77))
        if "hf_tokenizer_name" in text_cfg:
            self.tokenizer = oc.get_tokenizer(name, context_length=self.context_length)
        else:
            self.tokenizer = oc.SimpleTokenizer(context_length=self.context_length)
        self.batch_size = batch_size
        self._hash: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arch(
        cls, arch: str = "shapes-clip", pretrained: str | None = None, device: str = "cpu"
    ) -> ClipEncoder:
        """Build an open_clip architecture (a registered name or a JSON file of its model config),
        with weights from a local file ``pretrained`` or randomly initialized when it is None."""
        oc = _open_clip()
        if str(arch).endswith(".json"):
            path = Path(arch)
            if not path.is_file():
                raise FileNotFoundError(f"architecture file {path} not found")
            oc.add_model_config(path)
            arch = path.stem
        model_cfg = oc.get_model_config(arch)
        if model_cfg is None:
            raise ValueError(
                f"unknown open_clip architecture {arch!r}; shipped here: {list_archs()}, "
                f"or any of open_clip.list_models(), or a path to a model-config JSON file"
            )
        try:
            model = oc.create_model(arch, pretrained=pretrained, device=device)
        except Exception as e:  # hub tags fail at once offline; say how to use a local file
            if pretrained is not None and not os.path.isfile(str(pretrained)):
                raise RuntimeError(
                    f"could not load pretrained={pretrained!r} for {arch!r}: {e}\n"
                    f"Downloads are off (HF_HUB_OFFLINE=1). Pass the path of a local open_clip "
                    f"checkpoint instead, e.g. retrieval.encoder.pretrained=/path/to/{arch}.pt "
                    f"(a state dict saved with torch.save(model.state_dict(), path))."
                ) from e
            raise
        return cls(model, model_cfg, name=arch)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> ClipEncoder:
        """Load a folder written by ``save``."""
        d = Path(directory)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise FileNotFoundError(
                f"{d} is not a saved encoder: expected {CONFIG_FILE} and {WEIGHTS_FILE} "
                f"(written by ClipEncoder.save or `fit experiment=retriever`)"
            )
        oc = _open_clip()
        cfg = json.loads(cfg_path.read_text())
        manifest = (
            json.loads((d / MANIFEST_FILE).read_text()) if (d / MANIFEST_FILE).is_file() else {}
        )
        with _quiet_about_missing_weights():  # ours are loaded on the next line
            model = oc.create_model(f"local-dir:{d}", load_weights=False, device=device)
        state = torch.load(w_path, map_location=device, weights_only=True)
        model.load_state_dict(state)
        enc = cls(
            model,
            cfg["model_cfg"],
            name=manifest.get("name", d.name),
            preprocess_cfg=cfg.get("preprocess_cfg"),
        )
        return enc

    def save(self, directory: str | Path, extra: dict | None = None) -> dict:
        """Write the folder ``load`` reads; returns the manifest written to ``encoder.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}
        (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        torch.save(state, d / WEIGHTS_FILE)
        self._hash = None
        manifest = {
            "name": self.name,
            "dim": self.dim,
            "hash": self.hash,
            "image_size": self.image_size,
            "context_length": self.context_length,
            **(extra or {}),
        }
        (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        return manifest

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def hash(self) -> str:
        """Content hash of the weights; the index manifest records it (cached; reset by save)."""
        if self._hash is None:
            self._hash = state_dict_hash(self.model.state_dict())
        return self._hash

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ tensors (for training)
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """[N] strings -> [N, context_length] int64 token ids (truncated)."""
        return self.tokenizer(list(texts)).to(self.device)

    def pixels(self, images) -> torch.Tensor:
        """uint8 [N,H,W,3] (0-255) or float [N,H,W,3] (0-1), numpy or torch -> normalized
        float [N,3,S,S] at the model's image size."""
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be [N,H,W,3] (or [H,W,3]); got shape {tuple(x.shape)}")
        x = x.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = x.permute(0, 3, 1, 2)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                align_corners=False,
                antialias=x.shape[-1] > self.image_size,
            )
            x = x.clamp(0, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text features [N, D] of token ids [N, context_length], with gradients when enabled.

        Equal to open_clip's ``encode_text`` but run only up to the last pooled position of
        the batch: the text tower is causal and pools one position per row (the end-of-text
        token), so the padding after it cannot change the features. Short captions in a
        48-token context then cost what their length costs. Other towers (no causal mask, or
        a pooling that reads every position) run open_clip's ``encode_text`` unchanged."""
        m = self.model
        pool = getattr(m, "text_pool_type", None)
        mask = getattr(m, "attn_mask", None)
        if pool not in ("argmax", "eos") or mask is None or not hasattr(m, "positional_embedding"):
            return m.encode_text(tokens, normalize=normalize)
        eos = getattr(m, "text_eos_id", None)
        last = tokens.argmax(-1) if pool == "argmax" else (tokens == eos).int().argmax(-1)
        n = int(last.max()) + 1 if len(tokens) else 1
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens[:, :n]).to(cast) + m.positional_embedding[:n].to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=mask[:n, :n]))
        x = x[torch.arange(len(x), device=x.device), last]
        proj = m.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        return F.normalize(x, dim=-1) if normalize else x

    # ------------------------------------------------------------------ numpy embeddings
    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """[N] strings -> float32 [N, D], L2-normalized."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        was_training = self.model.training
        self.model.eval()
        for s in range(0, len(texts), self.batch_size):
            tok = self.tokenize(texts[s : s + self.batch_size])
            out[s : s + len(tok)] = self.encode_text(tok, normalize=True).float().cpu().numpy()
        self.model.train(was_training)
        return out

    @torch.inference_mode()
    def embed_image(self, images) -> np.ndarray:
        """uint8 [N,H,W,3] or float [N,H,W,3] in [0,1] -> float32 [N, D], L2-normalized."""
        n = len(images)
        out = np.zeros((n, self.dim), np.float32)
        was_training = self.model.training
        self.model.eval()
        for s in range(0, n, self.batch_size):
            x = self.pixels(images[s : s + self.batch_size])
            out[s : s + len(x)] = self.model.encode_image(x, normalize=True).float().cpu().numpy()
        self.model.train(was_training)
        return out

    def embed_document(self, text: str | None = None, image=None) -> np.ndarray:
        """One document -> float32 [D]: normalized mean of the present modalities."""
        return self.embed_documents([text], [image])[0]

    def embed_documents(self, texts: Sequence[str | None], images: Sequence) -> np.ndarray:
        """N documents (text or None, image or None each) -> float32 [N, D]."""
        return mean_of_modalities(*self.embed_modalities(texts, images))

    def embed_modalities(
        self, texts: Sequence[str | None], images: Sequence
    ) -> tuple[np.ndarray, np.ndarray]:
        """N documents -> (text [N, D], image [N, D]) float32, zero rows where one is absent."""
        texts, images = list(texts), list(images)
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        n = len(texts)
        t_idx = [i for i, t in enumerate(texts) if t is not None]
        i_idx = [i for i, im in enumerate(images) if im is not None]
        missing = sorted(set(range(n)) - set(t_idx) - set(i_idx))
        if missing:
            raise ValueError(f"documents {missing[:5]} have neither text nor image")
        t_emb = np.zeros((n, self.dim), np.float32)
        i_emb = np.zeros((n, self.dim), np.float32)
        if t_idx:
            t_emb[t_idx] = self.embed_text([texts[i] for i in t_idx])
        # group images by shape so mixed sizes still batch
        by_shape: dict[tuple, list[int]] = {}
        for i in i_idx:
            by_shape.setdefault(tuple(np.asarray(images[i]).shape), []).append(i)
        for idx in by_shape.values():
            i_emb[idx] = self.embed_image(np.stack([np.asarray(images[i]) for i in idx]))
        return t_emb, i_emb


def mean_of_modalities(text_emb: np.ndarray, image_emb: np.ndarray) -> np.ndarray:
    """Normalized mean of L2-normalized rows; an all-zero row counts as a missing modality.

    ``text_emb``, ``image_emb``: [N, D] (rows already normalized, or zero when absent).
    """
    t = _normalize(np.asarray(text_emb, np.float32))
    i = _normalize(np.asarray(image_emb, np.float32))
    return _normalize(t + i)


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(n > 0, x / np.maximum(n, 1e-12), 0.0).astype(np.float32)


def _as_int(v) -> int:
    return v[0] if isinstance(v, (list, tuple)) else v


class _MissingWeightsFilter(logging.Filter):
    """Drops open_clip's warnings that a local-dir model has no weights file of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not msg.startswith(
            ("Local config loaded, but no CLIP weights", "No pretrained weights")
        )


@contextlib.contextmanager
def _quiet_about_missing_weights():
    root, f = logging.getLogger(), _MissingWeightsFilter()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def load_encoder(path: str, pretrained: str | None = None, device: str = "cpu") -> ClipEncoder:
    """Hydra-friendly constructor: a saved encoder folder, else an architecture name/JSON file
    with an optional local ``pretrained`` file."""
    p = Path(str(path))
    if p.is_dir():
        return ClipEncoder.load(p, device=device)
    if p.suffix != ".json" and (p.is_absolute() or os.sep in str(path)):
        raise FileNotFoundError(
            f"encoder folder {p} not found: train it with "
            f"`python -m lit_cm3leon.fit experiment=retriever` (publishes outputs/retriever/), "
            f"or give an open_clip architecture name with a local pretrained file"
        )
    return ClipEncoder.from_arch(str(path), pretrained=pretrained, device=device)
