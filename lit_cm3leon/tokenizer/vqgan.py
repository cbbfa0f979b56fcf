"""VQGAN image tokenizer in the module layout of taming-transformers' ``VQModel``.

Parameter names match taming's checkpoints (``encoder.down.0.block.0.norm1.weight``,
``quantize.embedding.weight``, ``quant_conv``, ``post_quant_conv``, ``decoder.up.2.upsample.conv``
...), so a taming state dict loads with ``load_state_dict`` and no renaming; the encoder half
is also the layout of Chameleon's released image tokenizer.

Shapes: ``B`` batch, ``C`` channels, ``H x W`` pixels, ``h x w`` latent grid (``H / 2**(L-1)``
for ``L = len(ch_mult)``), ``D`` code dimension (``embed_dim``), ``K`` codebook size (``n_embed``).
Pixels are float in [-1, 1]. Only torch is imported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQGANConfig:
    resolution: int = 32  # input side in pixels (square images)
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 32  # base channel count
    ch_mult: tuple[int, ...] = (1, 2, 4)  # one level per entry; len-1 downsamplings by 2
    num_res_blocks: int = 1  # resnet blocks per level (decoder uses one more)
    attn_resolutions: tuple[int, ...] = ()  # resolutions (pixels) at which levels get attention
    z_channels: int = 64  # encoder output channels
    n_embed: int = 256  # codebook size K
    embed_dim: int = 32  # code dimension D
    dropout: float = 0.0
    double_z: bool = False  # taming VQ configs always use False
    # GroupNorm groups (taming: 32). With few channels, 32 groups is per-channel instance norm,
    # which erases each image's mean colour. 0 = no normalization, only GroupNorm's per-channel
    # scale and shift (same parameter names): a code then depends on its neighbourhood alone,
    # not on statistics of the whole image (the shapes preset; see PRESETS).
    norm_groups: int = 32
    mid_attn: bool = (
        True  # attention in the middle block (taming: always; Chameleon attn_type=None: no)
    )
    # Kernel of the encoder's convs other than the stride-2 downsamples (taming: 3). 1 makes each
    # code a function of its own pixel patch (7 x 7 px at the shapes preset's 4 px tokens)
    # instead of most of a 32 px image; the decoder keeps 3x3 kernels. Same parameter names,
    # 1x1 weight shapes. Measured on the reduced pipeline (3,000 tokenizer steps, 3x3 -> 1x1):
    # codes kept by pixels 8-12 px from an edit 0.35 -> 1.00 (eval/code_locality.py), code
    # perplexity 974 -> 37, held-out image perplexity 41.0 -> 4.2 (unigram 173 -> 15), but PSNR
    # 27.3 -> 26.5 dB, parser agreement 0.67 -> 0.625, and after SFT captioning CIDEr
    # 1.10 -> 0.52 and VQA 36.5 -> 32.0; edits stayed at 0 (greedy copies the source's
    # background and drops its shapes). So the presets keep 3.
    encoder_kernel: int = 3
    beta: float = 0.25  # commitment weight
    legacy: bool = (
        False  # taming's default puts beta on the codebook term (a known bug); False = VQ-VAE paper
    )
    has_decoder: bool = True  # False for encoder-only releases (Chameleon)

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.double_z:
            raise ValueError("double_z=True is a KL autoencoder layout, not a VQ model")
        if self.encoder_kernel not in (1, 3):
            raise ValueError(f"encoder_kernel must be 1 or 3, got {self.encoder_kernel}")
        if self.norm_groups < 0:
            raise ValueError(
                f"norm_groups must be >= 0 (0 = no normalization), got {self.norm_groups}"
            )
        for c in {self.ch * m for m in self.ch_mult}:
            if self.norm_groups and c % self.norm_groups:
                raise ValueError(
                    f"channel count {c} must be divisible by norm_groups={self.norm_groups}"
                )
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(
                f"resolution {self.resolution} not divisible by 2**{len(self.ch_mult) - 1}"
            )

    @property
    def latent_size(self) -> int:
        """Tokens per image side (h = w)."""
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VQGANConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(
                f"unknown VQGAN config keys {sorted(unknown)}; expected a subset of {sorted(names)}"
            )
        return cls(**d)


# Named presets. Parameter counts (encoder + quantizer + decoder) in the comments.
PRESETS: dict[str, VQGANConfig] = {
    # 32 px -> 8x8 tokens from 2,048 codes; narrow and attention-free so it trains on a CPU in
    # minutes. Sized by measurement: the shapes world has only ~1,400 distinct 4x4 patches (256
    # codes cover 93% of patch occurrences, which is not enough: the rare ones are shape edges).
    # Width at an equal CPU budget (batch 8, steps scaled by step time, 200 held-out images):
    # ch=8 x 4,500 steps 28.8 dB, scene-parser agreement 0.805; ch=16 x 3,340 steps 31.6 dB,
    # 0.935 (0.925 with seed 1); ch=24 and ch=32 diverged at lr 1e-3 (13 and 20 dB), and at lower
    # rates (5e-4 x 2,755 steps, 3e-4 x 2,196) reached 29.8 and 27.1 dB, 0.82 and 0.635. The full-
    # resolution layers are what draw a small square's corners, and at 8 channels they could not.
    # With the faster NHWC step (training/vqgan_module.py) ch=16 gets 4,200 steps: 35.0 dB, 0.97.
    # No normalization: with GroupNorm a flat background patch took 542 different codes across
    # images (codes of image-wide statistics), which the decoder then has to guess. Without it
    # (3,000 steps, 200 held-out images): 181 vs 507 per-position unigram perplexity of the
    # held-out codes, 27.3 vs 27.0 dB, scene-parser agreement 0.665 vs 0.625.
    "shapes": VQGANConfig(
        resolution=32,
        ch=16,
        ch_mult=(1, 2, 4),
        num_res_blocks=1,
        attn_resolutions=(),
        z_channels=64,
        n_embed=2048,
        embed_dim=32,
        mid_attn=False,
        norm_groups=0,  # no GroupNorm: codes of local content, not of image-wide statistics
    ),  # 0.78 M parameters
    # The paper's setting: 256 px -> 32x32 = 1024 tokens from 8,192 codes, taming's f8 layout.
    "paper": VQGANConfig(
        resolution=256,
        ch=128,
        ch_mult=(1, 1, 2, 4),
        num_res_blocks=2,
        attn_resolutions=(32,),
        z_channels=256,
        n_embed=8192,
        embed_dim=256,
        mid_attn=True,
    ),  # 66.9 M parameters
}


def preset(name: str) -> VQGANConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown VQGAN preset {name!r}; choose one of {sorted(PRESETS)}")
    return VQGANConfig(**PRESETS[name].to_dict())


class ChannelAffine(nn.Module):
    """GroupNorm's per-channel ``weight`` and ``bias`` without the normalization."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _norm(c: int, groups: int = 32) -> nn.Module:
    if groups == 0:
        return ChannelAffine(c)
    return nn.GroupNorm(num_groups=groups, num_channels=c, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, plus a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(
        self, c_in: int, c_out: int, dropout: float = 0.0, groups: int = 32, kernel: int = 3
    ):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel, padding=kernel // 2)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H, W]
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 convs for q, k, v and output."""

    def __init__(self, c: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W).transpose(1, 2)  # [B, HW, C]
        k = self.k(h).reshape(B, C, H * W)  # [B, C, HW]
        v = self.v(h).reshape(B, C, H * W)
        attn = torch.softmax(torch.bmm(q, k) * C**-0.5, dim=2)  # [B, HW(query), HW(key)]
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero column/row on the right/bottom only (taming)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int, cfg: VQGANConfig, kernel: int = 3) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(c, c, cfg.dropout, cfg.norm_groups, kernel)
    mid.attn_1 = AttnBlock(c, cfg.norm_groups) if cfg.mid_attn else nn.Identity()
    mid.block_2 = ResnetBlock(c, c, cfg.dropout, cfg.norm_groups, kernel)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.num_res_blocks = cfg.num_res_blocks
        k = cfg.encoder_kernel
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, k, padding=k // 2)
        in_mult = (1,) + cfg.ch_mult
        res = cfg.resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            c_in, c_out = cfg.ch * in_mult[level], cfg.ch * mult
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(c_in, c_out, cfg.dropout, cfg.norm_groups, k))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(c_in, cfg.norm_groups))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(c_in)
                res //= 2
            self.down.append(stage)
        self.mid = _mid(c_in, cfg, k)
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, z_channels, h, w]
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        res = cfg.latent_size
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c, cfg)
        up: list[nn.Module] = [nn.Module() for _ in range(n)]
        for level in reversed(range(n)):  # built coarse to fine, stored fine (0) to coarse
            stage = up[level]
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            c_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(c, c_out, cfg.dropout, cfg.norm_groups))
                c = c_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(c, cfg.norm_groups))
            if level != 0:
                stage.upsample = Upsample(c)
                res *= 2
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, z_channels, h, w] -> [B, 3, H, W]
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # [B, D, h, w], straight-through (gradients flow to the encoder)
    indices: torch.Tensor  # int64 [B, h, w]
    codebook_loss: torch.Tensor  # ||sg(z) - e||^2, moves codes toward encoder outputs
    commit_loss: torch.Tensor  # ||z - sg(e)||^2, keeps the encoder near its codes
    loss: torch.Tensor  # the weighted sum (beta on commitment, or taming's legacy placement)
    z: torch.Tensor = field(
        repr=False, default=None
    )  # [B, D, h, w] pre-quantization (for code restarts)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient (taming's ``VectorQuantizer2``)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = False):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """[N, D] -> int64 [N]: argmin_k ||z - e_k||^2, expanded as z^2 + e^2 - 2 z.e like the references."""
        e = self.embedding.weight
        d = (
            torch.sum(z**2, dim=1, keepdim=True)
            + torch.sum(e**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", z, e.t())
        )
        return torch.argmin(d, dim=1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:  # z: [B, D, h, w]
        with torch.autocast(
            z.device.type, enabled=False
        ):  # distances and argmin in fp32, even under bf16
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        B, D, h, w = z.shape
        z_bhwc = z.permute(0, 2, 3, 1).contiguous()
        idx = self.nearest(z_bhwc.view(-1, D))
        z_q = self.embedding(idx).view(z_bhwc.shape)
        codebook = torch.mean((z_q - z_bhwc.detach()) ** 2)
        commit = torch.mean((z_q.detach() - z_bhwc) ** 2)
        loss = commit + self.beta * codebook if self.legacy else codebook + self.beta * commit
        z_q = z_bhwc + (z_q - z_bhwc).detach()
        return QuantizerOutput(
            z_q=z_q.permute(0, 3, 1, 2).contiguous(),
            indices=idx.view(B, h, w),
            codebook_loss=codebook,
            commit_loss=commit,
            loss=loss,
            z=z,
        )

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:  # int [B, h, w] -> [B, D, h, w]
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()


class DecoderMissingError(RuntimeError):
    """The loaded tokenizer has no decoder (e.g. Chameleon's public release)."""


class VQGAN(nn.Module):
    """encoder -> quant_conv -> quantize -> post_quant_conv -> decoder."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config = cfg
        # registration order follows taming's VQModel (encoder, decoder, quantize, quant convs)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg) if cfg.has_decoder else None
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def quantize_images(self, x: torch.Tensor) -> QuantizerOutput:  # x: [B, 3, H, W] in [-1, 1]
        return self.quantize(self.quant_conv(self.encoder(x)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> int64 codes [B, h, w]."""
        return self.quantize_images(x).indices

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:  # [B, D, h, w] -> [B, 3, H, W]
        if self.decoder is None:
            raise DecoderMissingError(
                "this image tokenizer has no decoder (the Chameleon VQ-VAE release ships only the "
                "encoder and quantizer): it can encode images to tokens but cannot decode tokens to "
                "pixels; use a taming/lit_cm3leon checkpoint with decoder weights to decode"
            )
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """int codes [B, h, w] -> float pixels [B, 3, H, W] (about [-1, 1], not clamped)."""
        return self.decode_latent(self.quantize.lookup(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        q = self.quantize_images(x)
        return self.decode_latent(q.z_q), q
