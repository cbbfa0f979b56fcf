"""lit_cm3leon: CM3Leon as a PyTorch Lightning + Hydra experiment suite."""

__version__ = "0.1.0"
