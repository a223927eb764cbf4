"""Parts shared by every model: attention, MLPs and transformer blocks."""

from vlkit.nn.attention import Attention
from vlkit.nn.mlp import MLP, ACTIVATIONS
from vlkit.nn.transformer import Block, Transformer

__all__ = ["Attention", "MLP", "ACTIVATIONS", "Block", "Transformer"]
