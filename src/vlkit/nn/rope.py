"""Rotary position embeddings (RoPE) with the scalings Llama-family checkpoints use: default,
linear, dynamic NTK and Llama-3 wavelength bands. The inverse frequencies follow transformers'
arithmetic step for step, so cos/sin tables are bit-identical in fp32."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class RopeConfig:
    """transformers' ``rope_parameters`` (``rope_type`` is ``type``, ``rope_theta`` is ``theta``).

    ``factor`` scales positions (linear), the base (dynamic, beyond ``max_position_embeddings``) or
    the long wavelengths (llama3, with ``low_freq_factor``/``high_freq_factor`` around
    ``original_max_position_embeddings``)."""

    type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.type!r} is not supported; expected one of {list(ROPE_TYPES)}")
        if self.type == "llama3" and self.original_max_position_embeddings is None:
            raise ValueError("llama3 rope scaling needs original_max_position_embeddings")


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def inverse_frequencies(cfg: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: int) -> torch.Tensor:
    """``[head_dim / 2]`` float32 inverse frequencies; ``seq_len`` (the longest position + 1) only
    matters for dynamic scaling, which raises the base once it passes ``max_position_embeddings``."""
    if cfg.type == "dynamic":
        length = torch.tensor(max(seq_len, max_position_embeddings))
        scale = (cfg.factor * length / max_position_embeddings) - (cfg.factor - 1)
        base = cfg.theta * scale ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** _exponents(head_dim))
    inv_freq = 1.0 / (cfg.theta ** _exponents(head_dim))
    if cfg.type == "linear":
        return inv_freq / cfg.factor
    if cfg.type == "llama3":
        return _llama3(cfg, inv_freq)
    return inv_freq


def _llama3(cfg: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """Long wavelengths divided by ``factor``, short ones kept, the band between interpolated."""
    old = cfg.original_max_position_embeddings
    low_wavelen, high_wavelen = old / cfg.low_freq_factor, old / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.factor, inv_freq)
    smooth = (old / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary:
    """cos/sin tables for every layer to share, looked up by position: built once per device and
    dtype for the positions seen so far (grown by doubling), so a decode step only gathers rows.
    Dynamic scaling depends on the sequence length, so past ``max_position_embeddings`` its tables
    are computed per call. Not a module: it has no weights."""

    def __init__(self, cfg: RopeConfig, head_dim: int, max_position_embeddings: int):
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
        self.cfg, self.head_dim, self.max_position_embeddings = cfg, head_dim, max_position_embeddings
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def tables(self, positions: torch.Tensor, dtype: torch.dtype, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[B, n, 1, head_dim]`` for integer ``positions`` ``[B, n]``, with the sign of
        rotate-half folded into ``sin`` (see :func:`apply_rotary`). ``max_position``, an upper bound
        of the positions, saves reading it from them (dynamic scaling reads the exact maximum)."""
        if max_position is None or self.cfg.type == "dynamic":
            max_position = int(positions.max())
        if self.cfg.type == "dynamic" and max_position >= self.max_position_embeddings:
            inv_freq = inverse_frequencies(self.cfg, self.head_dim, self.max_position_embeddings, max_position + 1)
            cos, sin = _cos_sin(positions, inv_freq, dtype)
        else:
            cos_table, sin_table = self._lookup(positions.device, dtype, max_position + 1)
            cos, sin = F.embedding(positions, cos_table), F.embedding(positions, sin_table)
        return cos.unsqueeze(2), sin.unsqueeze(2)

    def _lookup(self, device, dtype, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._table
        if table is None or table[0].device != device or table[0].dtype != dtype or table[0].shape[0] < need:
            size = 64 if table is None else table[0].shape[0]
            while size < need:
                size *= 2
            inv_freq = inverse_frequencies(self.cfg, self.head_dim, self.max_position_embeddings, 0)
            table = self._table = _cos_sin(torch.arange(size, device=device), inv_freq, dtype)
        return table


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin ``[..., head_dim]`` at ``positions``, in float32 like transformers, then ``dtype``."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, n, heads, head_dim]`` (rotate-half layout, as in transformers'
    checkpoints): ``x·cos + rotate_half(x)·sin``, where ``rotate_half(x) = (-x2, x1)`` equals
    ``roll(x, d/2)`` with the sign carried by ``sin``."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
