"""Hyperparameters of the CM3Leon decoder, with the paper's sizes as named presets.

Parameter counts below are for the transformer blocks alone (``12 * n_layer * d_model**2``:
attention 4 d^2 + MLP 8 d^2; there are no biases and no layer-norm parameters). The total adds
the token embedding and the untied output projection (``2 * vocab_size * d_model``) and the
learned positions (``max_seq_len * d_model``); with the paper's vocabulary
(``Vocab(n_text=56320, n_image=8192)``, 64,626 ids) the totals are given in the comments too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

# name -> (n_layer, n_head, d_model, max_seq_len)
PRESETS: dict[str, dict] = {
    # 2 x 64: unit tests, runs in seconds. Blocks 98,304.
    "debug": dict(n_layer=2, n_head=4, d_model=64, max_seq_len=256),
    # 6 x 256, 8 heads: the shapes world on CPU. Blocks 4,718,592.
    # With the cell embedding, 2 copy heads and box grounding through them (ModelConfig
    # .cell_embedding, .copy_heads, .ground_boxes), not in the paper.
    "shapes": dict(
        n_layer=6,
        n_head=8,
        d_model=256,
        max_seq_len=1024,
        cell_embedding=True,
        copy_heads=2,
        ground_boxes=True,
    ),
    # 12 x 768, 12 heads, 1,024 positions: the ~100M benchmark size (bench/train.py). Blocks
    # 84,934,656; total 100,051,968 with Vocab(n_text=8192, n_image=1024) (9,330 ids).
    "100m": dict(n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    # paper 350M: 24 x 1024, 16 heads. Blocks 301,989,888; total 438,538,240 (paper vocab).
    "350m": dict(n_layer=24, n_head=16, d_model=1024, max_seq_len=4096),
    # paper 760M: 24 x 1536, 24 heads (head dim 64). Blocks 679,477,248; total 884,299,776 (paper vocab).
    "760m": dict(n_layer=24, n_head=24, d_model=1536, max_seq_len=4096),
    # paper 7B: 32 x 4096, 32 heads. Blocks 6,442,450,944; total 6,988,644,352 (paper vocab).
    "7b": dict(n_layer=32, n_head=32, d_model=4096, max_seq_len=4096),
}


@dataclass
class ModelConfig:
    vocab_size: int = 0  # set by the caller from the Vocab (Vocab.size)
    n_layer: int = 6  # transformer blocks
    n_head: int = 8  # attention heads (d_model must divide evenly)
    d_model: int = 256  # residual width
    max_seq_len: int = 1024  # learned positions (paper: 4096)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    init_std: float = 0.006  # truncated-normal std of weights (cut at +-3 std)
    pos_init_std: float = 0.0002  # std of the learned positional embeddings
    ln_eps: float = 1e-5  # LayerNorm epsilon (no learnable parameters)
    activation_checkpointing: bool = False  # recompute each block in backward (saves memory)
    compile: bool = False  # torch.compile each block (applied by parallelize(), not the model)
    # Not in the paper: add a learned embedding per image-grid cell (row-major index within an
    # image) to every image token. ``cell_embedding`` switches it on; the other three fields are
    # set from the Vocab by ``for_vocab`` (image id range and h * w cells).
    cell_embedding: bool = False
    # Not in the paper: the first ``copy_heads`` heads of every layer add ``copy_bias`` to the
    # attention logit of each earlier image token sitting in the grid cell the query predicts
    # (CM3LeonTransformer._copy_mask), so copying from a retrieved image is there from step 0.
    copy_heads: int = 0
    copy_bias: float = 8.0
    # Not in the paper: a pointer to the token the copy heads point at. An image token in cell c
    # adds g(h) to the logit of the token in cell c + 1 of the latest earlier image (a retrieved
    # image, an edit's source), g a learned linear function of the final hidden state, zero at
    # initialisation (CM3LeonTransformer._copy_logits). Acts with copy_heads > 0 only.
    copy_logit: bool = False
    # Not in the paper: box grounding through the copy heads. A box in the text (four <loc:...>
    # tokens after what it holds, "a red circle <loc:9><loc:9><loc:34><loc:34>") gets the copy
    # bias from every image token whose predicted cell lies in the box, on the box's tokens and
    # the description before it (CM3LeonTransformer._copy_mask). Acts with copy_heads > 0 only.
    ground_boxes: bool = False
    image_id_start: int = 0
    n_image_ids: int = 0
    image_cells: int = 0
    image_w: int = 0  # image tokens per row (box grounding)
    loc_id_start: int = 0  # first <loc:...> id (box grounding)
    n_loc: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not 0 <= self.copy_heads <= self.n_head:
            raise ValueError(f"copy_heads={self.copy_heads} must be in [0, n_head={self.n_head}]")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named size (``debug shapes 100m 350m 760m 7b``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def for_vocab(self, vocab) -> ModelConfig:
        """This config sized for a ``Vocab``: its id count and, with ``cell_embedding``, its
        image id range and grid."""
        image = (
            dict(
                image_id_start=vocab.image_offset,
                n_image_ids=vocab.n_image,
                image_cells=vocab.image_tokens,
                image_w=vocab.image_w,
                loc_id_start=vocab.loc_offset,
                n_loc=vocab.n_loc,
            )
            if self.cell_embedding or self.copy_heads
            else dict(
                image_id_start=0, n_image_ids=0, image_cells=0, image_w=0, loc_id_start=0, n_loc=0
            )
        )
        return replace(self, vocab_size=vocab.size, **image)

    def block_params(self) -> int:
        """Parameters of all blocks: attention 4 d^2 + MLP 2 * mlp_ratio * d^2 per layer."""
        d = self.d_model
        return self.n_layer * (4 * d * d + 2 * self.mlp_ratio * d * d)

    def num_params(self) -> int:
        """All parameters: blocks + token embedding + lm head (untied) + positions (+ cells)."""
        return (
            self.block_params()
            + 2 * self.vocab_size * self.d_model
            + (self.max_seq_len + (self.image_cells if self.cell_embedding else 0)) * self.d_model
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
