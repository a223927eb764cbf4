"""A static key/value cache: every layer's keys and values for the whole generation, allocated
once (prompt + new tokens), written in place, so a decode step allocates nothing for them."""

from __future__ import annotations

import torch

from vlkit.errors import VlkitError
from vlkit.nn.attention import sdpa


class CacheFull(VlkitError):
    """More positions were written than the cache was allocated for."""


class KVCache:
    """Per-layer buffers ``[B, kv_heads, max_length, head_dim]`` (one tensor for keys, one for values,
    layer first). ``length`` positions are filled, the same for every row (left padding keeps rows
    aligned). ``layers[i]`` is the slot layer ``i``'s attention writes through."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        if max_length < 1 or batch < 1:
            raise VlkitError(f"a KV cache needs batch >= 1 and max_length >= 1, got batch={batch}, max_length={max_length}")
        shape = (num_layers, batch, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0
        self._end = 0
        self.layers = [CacheLayer(self, i) for i in range(num_layers)]

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    def reserve(self, n: int) -> None:
        """Claim positions ``[length, length + n)`` for the forward that is about to write them."""
        if self.length + n > self.max_length:
            raise CacheFull(
                f"the KV cache holds {self.max_length} positions; {self.length} are filled and {n} more do not fit "
                "(allocate it for the prompt plus every new token)"
            )
        self._end = self.length + n

    def commit(self) -> None:
        """Every layer has written the reserved positions: advance ``length`` over them."""
        self.length = self._end

    @classmethod
    def joined(cls, parts: list[tuple["KVCache", int]], max_length: int) -> "KVCache":
        """One cache holding every row of ``parts`` (``(cache, first)``: its filled positions from
        ``first`` on), right-aligned at the longest so that each row's last token shares a column
        (the shorter ones padded on the left, as a left-padded batch is), with room for
        ``max_length`` positions: how rows join a running batch and drop columns no row uses."""
        kept = [cache.length - first for cache, first in parts]
        length = max(kept)
        if length > max_length:
            raise VlkitError(f"joined caches need {length} positions; max_length={max_length}")
        ref = parts[0][0].keys
        layers, _, heads, _, dim = ref.shape
        out = cls(layers, sum(c.batch for c, _ in parts), heads, max_length, dim, dtype=ref.dtype, device=ref.device)
        row = 0
        for (cache, first), n in zip(parts, kept):
            rows = slice(row, row + cache.batch)
            out.keys[:, rows, :, length - n : length] = cache.keys[:, :, :, first : cache.length]
            out.values[:, rows, :, length - n : length] = cache.values[:, :, :, first : cache.length]
            row += cache.batch
        out.length = out._end = length
        return out

    def reorder(self, index: torch.Tensor) -> None:
        """Keep and reorder batch rows: row ``i`` becomes old row ``index[i]`` (beam search). The
        buffers keep their storage when the batch size stays the same."""
        index = index.to(self.keys.device)
        filled = slice(0, self.length)
        if index.numel() == self.batch:
            for buf in (self.keys, self.values):
                part = buf[:, :, :, filled]
                part.copy_(part.index_select(1, index))
        else:
            self.keys = self.keys.index_select(1, index)
            self.values = self.values.index_select(1, index)


class CacheLayer:
    """One layer's view of a :class:`KVCache` (the :class:`vlkit.nn.attention.CacheSlot` protocol)."""

    __slots__ = ("cache", "index")

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
               gqa: bool) -> torch.Tensor:  # fmt: skip
        k, v = self.update(k, v)
        return sdpa(q, k, v, mask, causal, gqa)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        start, end = c.length, c._end
        keys, values = c.keys[self.index], c.values[self.index]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]
