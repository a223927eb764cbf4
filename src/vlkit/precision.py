"""Mixed precision: bf16 autocast where the hardware runs bf16 matmuls fast, fp32 elsewhere.

"auto" checks the device: CUDA with bf16 support, or a CPU whose oneDNN has native bf16
(AVX-512 BF16 / AMX). On an AVX2-only CPU bf16 matmuls run ~100× slower than fp32.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve(precision: str, device: torch.device | str) -> str:
    """``auto`` → "bf16" or "fp32" for this device; other values pass through (checked)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_fast(torch.device(device)) else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str):
    """A bf16 autocast context for "bf16" (after resolving "auto"), else a no-op."""
    device = torch.device(device)
    if resolve(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
