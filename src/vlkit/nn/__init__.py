"""Parts shared by every model: the one attention, linear layers, MLPs, norms, rotary positions and transformer blocks."""

from vlkit.nn.attention import Attention
from vlkit.nn.linear import Linear, use_onednn
from vlkit.nn.mlp import MLP, ACTIVATIONS, GatedMLP
from vlkit.nn.norms import RMSNorm
from vlkit.nn.rope import RopeConfig, Rotary
from vlkit.nn.transformer import Block, Transformer

__all__ = ["Attention", "Linear", "use_onednn", "MLP", "ACTIVATIONS", "GatedMLP", "RMSNorm", "RopeConfig", "Rotary", "Block", "Transformer"]
