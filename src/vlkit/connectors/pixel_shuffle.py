"""The pixel-shuffle connector (nanoVLM, Idefics3, SmolVLM): each r×r block of the square token
grid becomes one token r² times as wide (space to depth), then a linear projection to the LM.
It cuts the visual tokens by r² while keeping every feature."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vlkit.config import PositiveInt, validate
from vlkit.connectors.base import Connector
from vlkit.errors import VlkitError


@dataclass
class PixelShuffleConfig:
    """``factor``: r, the side of the blocks merged into one token; ``bias``: the projection's
    bias (Idefics3 and nanoVLM have none)."""

    factor: PositiveInt = 2
    bias: bool = False

    def __post_init__(self):
        validate(self)


def grid_side(n: int, factor: int) -> int:
    """The side of the square grid of ``n`` tokens; a :class:`VlkitError` naming N and r unless
    the grid is square and its side divisible by r."""
    side = math.isqrt(n) if n >= 0 else 0
    if n < 1 or side * side != n:
        raise VlkitError(
            f"pixel_shuffle connector: N = {n} tokens is not a square grid (drop any class token first); r = {factor}"
        )
    if side % factor:
        raise VlkitError(
            f"pixel_shuffle connector: the {side}×{side} grid of N = {n} tokens is not divisible by r = {factor}"
        )
    return side


def space_to_depth(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, N, D]`` on a row-major √N×√N grid → ``[B, N/r², D·r²]``: the output token at block
    (i, j) holds the block's tokens row by row, each D wide (Idefics3's channel order)."""
    b, n, d = tokens.shape
    side = grid_side(n, factor)
    s = side // factor
    blocks = tokens.reshape(b, s, factor, s, factor, d).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(b, s * s, factor * factor * d)


class PixelShuffleConnector(Connector):
    """``proj(space_to_depth(tokens, r))``; M = N / r²."""

    kind = "pixel_shuffle"

    def __init__(self, vision_dim: int, lm_dim: int, config: PixelShuffleConfig | None = None):
        super().__init__(vision_dim, lm_dim)
        self.config = config = config or PixelShuffleConfig()
        self.proj = nn.Linear(vision_dim * config.factor**2, lm_dim, bias=config.bias)

    def num_tokens(self, n: int) -> int:
        grid_side(n, self.config.factor)
        return n // self.config.factor**2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_tokens(tokens)
        return self.proj(space_to_depth(tokens, self.config.factor))
