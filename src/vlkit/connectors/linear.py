"""LLaVA v1's connector: one linear map from the vision width to the LM width, a token each."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlkit.config import validate
from vlkit.connectors.base import Connector


@dataclass
class LinearConfig:
    """``bias``: the projection's bias."""

    bias: bool = True

    def __post_init__(self):
        validate(self)


class LinearConnector(Connector):
    """``linear_1(tokens)``; M = N. The parameter is named as transformers names the first layer
    of ``multi_modal_projector``."""

    kind = "linear"

    def __init__(self, vision_dim: int, lm_dim: int, config: LinearConfig | None = None):
        super().__init__(vision_dim, lm_dim)
        self.config = config or LinearConfig()
        self.linear_1 = nn.Linear(vision_dim, lm_dim, bias=self.config.bias)

    def num_tokens(self, n: int) -> int:
        return n

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_tokens(tokens)
        return self.linear_1(tokens)
