"""Key mapping to the Hugging Face ``OPTForCausalLM`` layout (same architecture family).

Used to check our decoder against a reference implementation and to benchmark against
``transformers``' generation at identical weights; it imports nothing from ``transformers``::

    hf = OPTForCausalLM(OPTConfig(**opt_config_kwargs(model.config)))
    hf.load_state_dict(to_opt_state_dict(model))
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .transformer import CM3LeonTransformer

OPT_POSITION_OFFSET = 2  # OPT's learned positions are shifted by 2


def opt_config_kwargs(config: ModelConfig, pad_token_id: int = 1) -> dict:
    """``OPTConfig`` fields describing ``config``: no biases, affine-free pre-LN, GELU, untied head."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        ffn_dim=config.mlp_ratio * config.d_model,
        max_position_embeddings=config.max_seq_len,
        word_embed_proj_dim=config.d_model,
        do_layer_norm_before=True,
        enable_bias=False,
        layer_norm_elementwise_affine=False,
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
    )


@torch.no_grad()
def to_opt_state_dict(model: CM3LeonTransformer) -> dict[str, torch.Tensor]:
    """Our weights under ``OPTForCausalLM`` keys (the fused qkv split into q, k, v)."""
    if model.cell_emb is not None:
        raise ValueError("OPT has no image cell embedding: build with cell_embedding=False")
    if model.config.copy_heads:
        raise ValueError("OPT has no copy heads: build with copy_heads=0")
    d = model.config.d_model
    pos = model.pos_emb.weight
    sd = {
        "model.decoder.embed_tokens.weight": model.tok_emb.weight.clone(),
        "model.decoder.embed_positions.weight": torch.cat(
            [pos.new_zeros(OPT_POSITION_OFFSET, d), pos]
        ),
        "lm_head.weight": model.lm_head.weight.clone(),
    }
    for i, block in enumerate(model.blocks):
        p = f"model.decoder.layers.{i}."
        q, k, v = block.attn.qkv.weight.split(d, dim=0)
        sd[p + "self_attn.q_proj.weight"] = q.clone()
        sd[p + "self_attn.k_proj.weight"] = k.clone()
        sd[p + "self_attn.v_proj.weight"] = v.clone()
        sd[p + "self_attn.out_proj.weight"] = block.attn.proj.weight.clone()
        sd[p + "fc1.weight"] = block.mlp.fc.weight.clone()
        sd[p + "fc2.weight"] = block.mlp.proj.weight.clone()
    return sd
