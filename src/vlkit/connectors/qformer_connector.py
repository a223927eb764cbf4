"""BLIP-2's Q-Former as a connector any VLM can choose: the learned queries read the vision
tokens, then a linear map takes them to the LM width (BLIP-2's ``language_projection``)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vlkit.connectors.base import Connector
from vlkit.connectors.qformer import QFormer, QFormerConfig


class QFormerConnector(Connector):
    """``language_projection(qformer(tokens))``; M = ``num_queries`` whatever N. The Q-Former's
    ``context_dim`` is the vision width this connector is built for, whatever the config says."""

    kind = "qformer"

    def __init__(self, vision_dim: int, lm_dim: int, config: QFormerConfig | None = None):
        super().__init__(vision_dim, lm_dim)
        self.config = config = dataclasses.replace(config or QFormerConfig(), context_dim=vision_dim)
        self.qformer = QFormer(config)
        self.language_projection = nn.Linear(config.width, lm_dim)

    def num_tokens(self, n: int) -> int:
        return self.qformer.num_tokens(n)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_tokens(tokens)
        return self.language_projection(self.qformer(tokens))
