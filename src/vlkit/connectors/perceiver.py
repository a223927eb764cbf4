"""Flamingo's Perceiver Resampler: M learned latents read the image (or video) tokens by cross
attention, so the LM sees M visual tokens whatever the resolution or the number of frames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from vlkit.config import NonNegativeInt, OneOf, PositiveFloat, PositiveInt, validate
from vlkit.connectors.base import Connector
from vlkit.errors import VlkitError
from vlkit.nn.attention import Attention
from vlkit.nn.mlp import ACTIVATIONS, MLP


@dataclass
class PerceiverConfig:
    """``num_latents``: M; ``depth``: resampler layers; ``head_dim``: each head's width (vision
    width / heads when None; Flamingo uses 64); ``ff_mult``: the feed-forward's hidden width in
    vision widths; ``max_frames``: learned time embeddings for up to this many frames (0: none)."""

    num_latents: PositiveInt = 64
    depth: PositiveInt = 6
    num_heads: PositiveInt = 8
    head_dim: PositiveInt | None = None
    ff_mult: PositiveFloat = 4.0
    act: Annotated[str, OneOf(tuple(ACTIVATIONS))] = "gelu"
    max_frames: NonNegativeInt = 0
    eps: PositiveFloat = 1e-5

    def __post_init__(self):
        validate(self)


class ResamplerLayer(nn.Module):
    """The latents attend to [image tokens; latents] (queries from the latents, keys and values
    from both, each layer-normed), then a pre-norm feed-forward; both residual."""

    def __init__(self, dim: int, config: PerceiverConfig):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim, eps=config.eps)
        self.norm_latents = nn.LayerNorm(dim, eps=config.eps)
        self.attn = Attention(dim, config.num_heads, bias=False, head_dim=config.head_dim, context_dim=dim)
        self.norm_ff = nn.LayerNorm(dim, eps=config.eps)
        self.ff = MLP(dim, round(dim * config.ff_mult), config.act, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        normed = self.norm_latents(latents)
        context = torch.cat([self.norm_media(media), normed], dim=1)
        latents = latents + self.attn(normed, context=context)
        return latents + self.ff(self.norm_ff(latents))


class PerceiverConnector(Connector):
    """Tokens ``[B, N, Dv]`` (one image) or ``[B, T, N, Dv]`` (T frames, each given its time
    embedding, then flattened to T·N tokens) → the latents after ``depth`` layers, a final
    layer norm and a projection to the LM width: ``[B, M, Dlm]`` with M = ``num_latents``."""

    kind = "perceiver"

    def __init__(self, vision_dim: int, lm_dim: int, config: PerceiverConfig | None = None):
        super().__init__(vision_dim, lm_dim)
        self.config = config = config or PerceiverConfig()
        if config.head_dim is None and vision_dim % config.num_heads:
            raise VlkitError(
                f"perceiver connector: vision width {vision_dim} is not divisible by "
                f"num_heads {config.num_heads}; set head_dim"
            )
        self.latents = nn.Parameter(torch.randn(config.num_latents, vision_dim))
        self.time = nn.Parameter(0.02 * torch.randn(config.max_frames, 1, vision_dim)) if config.max_frames else None
        self.layers = nn.ModuleList(ResamplerLayer(vision_dim, config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(vision_dim, eps=config.eps)
        self.proj = nn.Linear(vision_dim, lm_dim)

    def num_tokens(self, n: int) -> int:
        return self.config.num_latents

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_tokens(tokens, frames=True)
        frames = tokens if tokens.dim() == 4 else tokens.unsqueeze(1)
        b, t, n, d = frames.shape
        if self.time is not None:
            if t > self.config.max_frames:
                raise VlkitError(
                    f"perceiver connector: {t} frames, but time embeddings exist for max_frames = {self.config.max_frames}"
                )
            frames = frames + self.time[:t]
        media = frames.reshape(b, t * n, d)
        latents = self.latents.expand(b, -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.proj(self.norm(latents))
