"""The demo's up-front time estimates: a part times its own training step on this machine."""

from __future__ import annotations

import time
from typing import Callable

import torch

from vlkit.precision import autocast


def step_seconds(loss_of: Callable[[], torch.Tensor], precision: str) -> float:
    """Mean of two timed forward-and-backward steps after a warm-up (the first pays for allocation)."""
    times = []
    for _ in range(3):
        t = time.perf_counter()
        with autocast(precision, "cpu"):
            loss = loss_of()
        loss.backward()
        times.append(time.perf_counter() - t)
    return sum(times[1:]) / 2
