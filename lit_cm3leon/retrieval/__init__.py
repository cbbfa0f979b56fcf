"""Retrieval: CLIP bi-encoder (``encoder``), faiss memory bank (``index``), strategy rules
(``strategy``) and cross-modal recall metrics (``metrics``). No Lightning or Hydra here."""
