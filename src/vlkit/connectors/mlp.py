"""LLaVA-1.5's connector: linear → activation → linear, a token each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from vlkit.config import OneOf, PositiveInt, validate
from vlkit.connectors.base import Connector
from vlkit.nn.mlp import ACTIVATIONS, activation


@dataclass
class MLPConfig:
    """``act``: the activation between the layers (transformers' ``projector_hidden_act``);
    ``bias``: both layers' bias (transformers' ``multimodal_projector_bias``); ``hidden``: the
    width between the layers, the LM's width when None (as in LLaVA-1.5)."""

    act: Annotated[str, OneOf(tuple(ACTIVATIONS))] = "gelu"
    bias: bool = True
    hidden: PositiveInt | None = None

    def __post_init__(self):
        validate(self)


class MLPConnector(Connector):
    """``linear_2(act(linear_1(tokens)))``; M = N. Parameters are named as in transformers'
    ``LlavaMultiModalProjector``, so a checkpoint's ``multi_modal_projector.*`` maps by prefix."""

    kind = "mlp"

    def __init__(self, vision_dim: int, lm_dim: int, config: MLPConfig | None = None):
        super().__init__(vision_dim, lm_dim)
        self.config = config = config or MLPConfig()
        hidden = config.hidden or lm_dim
        self.linear_1 = nn.Linear(vision_dim, hidden, bias=config.bias)
        self.act = activation(config.act)
        self.linear_2 = nn.Linear(hidden, lm_dim, bias=config.bias)

    def num_tokens(self, n: int) -> int:
        return n

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_tokens(tokens)
        return self.linear_2(self.act(self.linear_1(tokens)))
