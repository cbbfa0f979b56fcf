"""lit_cm3leon: CM3Leon as a PyTorch Lightning + Hydra experiment suite."""

__version__ = "0.1.0"

_LAZY = {
    "load_image_tokenizer": "lit_cm3leon.tokenizer.image",
    "ImageTokenizer": "lit_cm3leon.tokenizer.image",
}


def __getattr__(name: str):
    """Heavy public names (torch-backed) are imported on first use, not at package import."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lit_cm3leon' has no attribute {name!r}")
