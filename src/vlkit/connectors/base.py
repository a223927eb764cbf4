"""What every connector shares: the widths it maps between and the check of its input tokens."""

from __future__ import annotations

import torch
from torch import nn

from vlkit.errors import VlkitError


class Connector(nn.Module):
    """Maps vision tokens ``[B, N, vision_dim]`` to ``[B, M, lm_dim]`` visual tokens for a
    language model; :meth:`num_tokens` says M for N, so a processor can expand ``<image>``
    placeholders before any image is encoded."""

    kind: str = ""

    def __init__(self, vision_dim: int, lm_dim: int):
        super().__init__()
        for name, value in (("vision_dim", vision_dim), ("lm_dim", lm_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VlkitError(f"{self.kind} connector: {name} must be a positive integer, got {value!r}")
        self.vision_dim, self.lm_dim = vision_dim, lm_dim

    def num_tokens(self, n: int) -> int:
        """M, the visual tokens this connector gives for ``n`` vision tokens."""
        raise NotImplementedError

    def check_tokens(self, tokens: torch.Tensor, frames: bool = False) -> None:
        """A :class:`VlkitError` unless ``tokens`` is ``[B, N, vision_dim]`` (or, with ``frames``,
        also ``[B, T, N, vision_dim]``)."""
        ranks = (3, 4) if frames else (3,)
        if tokens.dim() not in ranks or tokens.shape[-1] != self.vision_dim:
            layout = "[B, N, D] or [B, T, N, D]" if frames else "[B, N, D]"
            raise VlkitError(
                f"{self.kind} connector: expected vision tokens {layout} with D = {self.vision_dim}, "
                f"got shape {list(tokens.shape)}"
            )
