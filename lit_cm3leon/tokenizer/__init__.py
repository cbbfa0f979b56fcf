"""Tokenizers: text BPE, image VQ, the shared vocabulary and the document codec."""
