"""Learning-rate schedule: linear warmup, then cosine decay to ``min_ratio`` of the peak."""

from __future__ import annotations

import math

import torch


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """The multiplier of the peak learning rate at ``step``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, warmup, total, min_ratio))
