"""What a language model's forward returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlkit.lm.cache import KVCache


@dataclass
class LMOutput:
    """``logits`` ``[B, n, V]`` (or the last ``logits_to_keep`` positions); ``cache`` is the cache the
    caller passed, updated in place, or ``None``."""

    logits: torch.Tensor
    cache: KVCache | None = None
