"""The Vision Transformer and its variants (CLIP, SigLIP, DINOv2), chosen by config switches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import NonNegativeInt, PositiveFloat, PositiveInt, validate
from vlkit.nn.mlp import check_activation
from vlkit.nn.transformer import Transformer
from vlkit.vision.pooling import AttentionPool


@dataclass
class ViTConfig:
    """Defaults are CLIP ViT-B/32.

    ``final_norm``: "pooled" normalises only the pooled token (CLIP), "all" every token
    (SigLIP, DINOv2). ``pool``: "cls", "mean" (over patch tokens) or "map" (attention pool).
    ``pos_antialias``: interpolate position embeddings with the antialiased bicubic kernel
    (DINOv2 with registers does; its a=-0.5 kernel differs from plain bicubic's a=-0.75).
    ``stem_channels``: an early-convolution stem (3×3, stride 2, GELU per entry) before the
    patch embedding, which then covers the remaining ``patch_size / 2^len`` pixels; it
    gives small models the locality prior that lets them learn shapes from few samples.
    ``stem_norm``: normalise each stem convolution's output over its channels and pixels
    (GroupNorm with one group); without it the stem learns shape several times slower.
    """

    image_size: PositiveInt = 224
    patch_size: PositiveInt = 32
    width: PositiveInt = 768
    depth: PositiveInt = 12
    num_heads: PositiveInt = 12
    mlp_ratio: PositiveFloat = 4.0
    act: str = "quick_gelu"
    eps: PositiveFloat = 1e-5
    class_token: bool = True
    num_registers: NonNegativeInt = 0
    patch_bias: bool = False
    pre_norm: bool = True
    final_norm: str = "pooled"
    pool: str = "cls"
    layer_scale: float | None = None
    pos_antialias: bool = False
    stem_channels: tuple[PositiveInt, ...] = ()
    stem_norm: bool = False

    def __post_init__(self):
        validate(self)
        check_activation(self.act, "ViTConfig.act")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size {self.patch_size} is larger than image_size {self.image_size}")
        if self.patch_size % 2 ** len(self.stem_channels):
            raise ValueError(f"patch_size {self.patch_size} is not divisible by the conv stem's stride {2 ** len(self.stem_channels)}")
        if self.pool not in ("cls", "mean", "map"):
            raise ValueError(f"ViTConfig.pool must be 'cls', 'mean' or 'map', got {self.pool!r}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("ViTConfig.pool='cls' needs class_token=True")
        if self.final_norm not in ("pooled", "all"):
            raise ValueError(f"ViTConfig.final_norm must be 'pooled' or 'all', got {self.final_norm!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_prefix(self) -> int:
        """Tokens before the patch tokens: the class token and the registers."""
        return int(self.class_token) + self.num_registers


@dataclass
class ViTOutput:
    tokens: torch.Tensor
    """``[B, N, D]`` last-layer tokens (after the final norm where the config puts it on all)."""
    pooled: torch.Tensor
    """``[B, D]`` pooled embedding (before any projection)."""
    hidden_states: list[torch.Tensor] | None = None
    """Every layer's output, the embeddings first (as transformers' ``hidden_states``)."""


def conv_stem(channels: tuple[int, ...], norm: bool = False) -> nn.Module:
    """3×3 stride-2 convolutions, each optionally group-normalised, with GELU; the identity
    when ``channels`` is empty."""
    layers: list[nn.Module] = []
    in_ch = 3
    for ch in channels:
        layers += [nn.Conv2d(in_ch, ch, 3, 2, 1), *([nn.GroupNorm(1, ch)] if norm else []), nn.GELU()]
        in_ch = ch
    return nn.Sequential(*layers)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.stem = conv_stem(cfg.stem_channels, cfg.stem_norm)
        patch = cfg.patch_size // 2 ** len(cfg.stem_channels)
        in_ch = cfg.stem_channels[-1] if cfg.stem_channels else 3
        self.patch_embed = nn.Conv2d(in_ch, d, patch, patch, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02) if cfg.class_token else None
        self.registers = nn.Parameter(torch.zeros(1, cfg.num_registers, d)) if cfg.num_registers else None
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid**2 + int(cfg.class_token), d) * 0.02)
        self.norm_pre = nn.LayerNorm(d, eps=cfg.eps) if cfg.pre_norm else nn.Identity()
        self.transformer = Transformer(
            d, cfg.depth, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, eps=cfg.eps, layer_scale=cfg.layer_scale
        )
        self.norm = nn.LayerNorm(d, eps=cfg.eps)
        self.head = AttentionPool(d, cfg.num_heads, cfg.mlp_ratio, cfg.act, cfg.eps) if cfg.pool == "map" else None

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Learned positions, bicubically interpolated when the patch grid differs from training."""
        pos = self.pos_embed
        n_cls = int(self.cfg.class_token)
        g = self.cfg.grid
        if (grid_h, grid_w) == (g, g):
            return pos
        patch_pos = pos[:, n_cls:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False,
                                  antialias=self.cfg.pos_antialias)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([pos[:, :n_cls], patch_pos], dim=1)

    def patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``patch_embed`` (a p×p, stride-p convolution) as one matmul over flattened patches: the
        same arithmetic, and in bf16 on CPUs without native bf16 only matmuls have a fast kernel
        (6× faster than the convolution at ViT-B/32's shape). Returns ``[B, gh·gw, D]``, gh, gw."""
        conv = self.patch_embed
        p = conv.kernel_size[0]
        b, c, h, w = x.shape
        gh, gw = h // p, w // p
        patches = x[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        tokens = F.linear(patches.reshape(b, gh * gw, c * p * p), conv.weight.reshape(conv.out_channels, -1), conv.bias)
        return tokens, gh, gw

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x, gh, gw = self.patch_tokens(self.stem(pixel_values.to(self.patch_embed.weight.dtype)))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embedding(gh, gw)
        if self.registers is not None:
            x = torch.cat([x[:, :1], self.registers.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return self.norm_pre(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        if self.cfg.pool == "mean":
            return tokens[:, self.cfg.num_prefix :].mean(dim=1)
        return self.head(tokens)

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``forward(...).pooled`` alone, ``[B, D]``. With class-token pooling the last block
        computes only that token's row, as nothing reads the others (~1/depth of the work)."""
        if self.cfg.pool != "cls":
            return self.forward(pixel_values).pooled
        x = self.embed(pixel_values)
        rows = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.norm(self.transformer.forward_rows(x, rows))

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> ViTOutput:
        """``pixel_values`` ``[B, 3, H, W]`` (H, W multiples of the patch size) → :class:`ViTOutput`."""
        x = self.embed(pixel_values)
        x, states = self.transformer(x, return_all=output_hidden_states)
        if self.cfg.final_norm == "all":
            x = self.norm(x)
            pooled = self.pool(x)
        else:
            pooled = self.norm(self.pool(x))
        return ViTOutput(tokens=x, pooled=pooled, hidden_states=states)
