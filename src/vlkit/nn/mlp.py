"""The transformer feed-forward block and the activations the reference models use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.nn.linear import Linear


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """In-place quick GELU, ``silu(1.702·x) / 1.702``: no new [tokens, 4·width] buffers, whose
    page faults cost more than the arithmetic in a CPU forward pass."""
    return F.silu(x.mul_(1.702), inplace=True).div_(1.702)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


INPLACE = {"quick_gelu": quick_gelu_, "relu": F.relu_, "silu": lambda x: F.silu(x, inplace=True)}
"""In-place versions, used when no gradient is recorded (the input is a temporary)."""


def check_activation(name: str, field: str) -> None:
    """Refuse an activation :func:`activation` does not know, naming the config ``field`` that asks for it."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{field}: unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """Linear → activation → linear."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", out_dim: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=bias)
        self.fc2 = Linear(hidden, out_dim or dim, bias=bias)
        self.act = activation(act)
        self.act_ = INPLACE.get(act, self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(self.act(h) if torch.is_grad_enabled() else self.act_(h))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) · up(x))`` (SwiGLU with SiLU), gate and up fused in one matmul: one
    weight read and one kernel launch instead of two, which is what a decode step is made of."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.hidden = hidden
        self.gate_up = Linear(dim, 2 * hidden, bias=bias)
        self.down = Linear(hidden, dim, bias=bias)
        self.act = activation(act)
        self.act_ = INPLACE.get(act, self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        if torch.is_grad_enabled():
            return self.down(self.act(gate) * up)
        return self.down(self.act_(gate).mul_(up))
