"""The decoder-only language model skeleton that Llama and OPT share: input checks, positions
from the attention mask, one causal mask over the cache for every layer, the layer loop, the
head. A family supplies its embeddings, layers and head."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlkit.errors import VlkitError
from vlkit.lm.cache import KVCache
from vlkit.lm.output import LMOutput


class DecoderLayer(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; with ``post_norm`` the norms follow the
    residual sums instead (OPT-350m)."""

    def __init__(self, norm1: nn.Module, attn: nn.Module, norm2: nn.Module, mlp: nn.Module, post_norm: bool = False):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.post_norm = post_norm

    def forward(self, x, mask=None, causal=False, rope=None, cache=None) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attn(x, mask, causal, rope=rope, cache=cache))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), mask, causal, rope=rope, cache=cache)
        return x + self.mlp(self.norm2(x))


def positions_from_mask(attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` positions of the last ``n`` tokens: each row counts only its real tokens, so a
    left-padded row gets the positions it would have alone (padding clamped to 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)[:, -n:]


def causal_mask(attention_mask: torch.Tensor | None, start: int, n: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """``(mask, causal)`` for SDPA: queries at positions ``[start, start + n)`` of the cache see the
    keys before them that the attention mask keeps. An additive ``[B, 1, n, start + n]`` mask (built
    once, shared by every layer), or ``None`` where SDPA's own causal flag (or no mask) is exact.
    A padding query always sees itself, so no row is fully masked (which would give NaNs).
    On the CPU a mask without padding is dropped (checking costs less than masking in every layer;
    on a GPU the check would stall the queue)."""
    if attention_mask is not None and device.type == "cpu" and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None and start == 0:
        return None, True
    if attention_mask is None and n == 1:
        return None, False
    total = start + n
    keys = torch.arange(total, device=device)
    queries = keys[start:, None]
    allowed = keys <= queries
    if attention_mask is not None:
        allowed = (allowed & attention_mask.bool()[:, None, :]) | (keys == queries)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias.view(-1, 1, n, total), False


class DecoderLM(nn.Module):
    """The contract every vlkit language model keeps (and generation relies on):
    ``forward(input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
    cache=None, logits_to_keep=0) -> LMOutput``, ``embed(input_ids)``, ``new_cache(...)``, ``config``.

    Subclasses set ``embed_tokens`` and ``layers`` and implement ``max_length`` (positions the
    model accepts), ``_kv_shape`` ``(kv_heads, head_dim)``, :meth:`_prepare` (position embeddings
    or rotary tables) and :meth:`_head` (final norm and output projection)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False

    @property
    def config(self):
        """The model's dataclass config (``.vocab_size``, ``.max_position_embeddings``, ...)."""
        return self.cfg

    @property
    def max_length(self) -> int:
        """The longest sequence (cached + new positions) the model accepts."""
        raise NotImplementedError

    def _kv_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _prepare(self, x: torch.Tensor, positions: torch.Tensor, max_position: int | None) -> tuple[torch.Tensor, object]:
        """The first layer's input and the ``rope`` argument every layer takes; ``max_position``
        bounds ``positions`` (``None`` for caller-given position ids)."""
        raise NotImplementedError

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_length(self, total: int, start: int, n: int) -> None:
        limit = self.max_length
        if total > limit:
            held = f" ({start} cached + {n} new)" if start else ""
            raise VlkitError(
                f"a sequence of {total} tokens{held} is longer than the {limit} positions this model accepts "
                f"(max_position_embeddings={self.cfg.max_position_embeddings})"
            )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, n, D]``, what ``inputs_embeds`` takes (a VLM splices image features in)."""
        if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() != 2:
            raise VlkitError(f"input_ids must be an integer tensor [batch, length], got {input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size):
            raise VlkitError(
                f"input_ids range over [{int(input_ids.min())}, {int(input_ids.max())}]; the model's vocabulary has "
                f"{self.cfg.vocab_size} ids (0..{self.cfg.vocab_size - 1})"
            )
        return self.embed_tokens(input_ids)

    def new_cache(self, batch: int, max_length: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """A static cache for ``max_length`` positions (prompt + new tokens), allocated once; dtype and
        device default to the model's."""
        if max_length > self.max_length:
            raise VlkitError(f"a cache of {max_length} positions is longer than the {self.max_length} positions this model accepts")
        weight = self.embed_tokens.weight
        kv_heads, head_dim = self._kv_shape()
        return KVCache(len(self.layers), batch, kv_heads, max_length, head_dim,
                       dtype=dtype or weight.dtype, device=device or weight.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> LMOutput:
        """Logits for the ``n`` new tokens (the last ``logits_to_keep``, or those at its indices when it
        is a tensor). ``attention_mask`` ``[B, cache.length + n]`` (1 = token, 0 = padding) covers the
        cached past and the new tokens; without ``position_ids`` positions follow it. ``cache`` is
        written at ``[length, length + n)`` and advanced by ``n`` (a cache whose slots attend for
        their tokens, as :class:`vlkit.lm.batching.DecodingBatch`'s packed rows do, masks itself)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise VlkitError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if x.dim() != 3 or x.shape[-1] != self.embed_tokens.embedding_dim:
            raise VlkitError(f"inputs_embeds must be [batch, length, {self.embed_tokens.embedding_dim}], got {tuple(x.shape)}")
        b, n = x.shape[:2]
        start = 0 if cache is None else cache.length
        total = start + n
        self._check_length(total, start, n)
        if attention_mask is not None and tuple(attention_mask.shape) != (b, total):
            raise VlkitError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected [{b}, {total}] "
                f"(batch, {start} cached + {n} new positions)"
            )
        positions = self._positions(position_ids, attention_mask, b, start, n, x.device)
        if cache is not None:
            if cache.batch != b:
                raise VlkitError(f"the KV cache holds {cache.batch} rows; this batch has {b}")
            cache.reserve(n)
        mask, causal = causal_mask(attention_mask, start, n, x.dtype, x.device)
        x, rope = self._prepare(x, positions, total - 1 if position_ids is None else None)
        slots = cache.layers if cache is not None else [None] * len(self.layers)
        run = self._checkpointed if self.gradient_checkpointing and self.training else self._call
        for layer, slot in zip(self.layers, slots):
            x = run(layer, x, mask, causal, rope, slot)
        if cache is not None:
            cache.commit()
        if isinstance(logits_to_keep, torch.Tensor):
            x = x[:, logits_to_keep]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        return LMOutput(self._head(x), cache)

    def _positions(self, position_ids, attention_mask, b: int, start: int, n: int, device) -> torch.Tensor:
        if position_ids is not None:
            if tuple(position_ids.shape) not in ((b, n), (1, n)):
                raise VlkitError(f"position_ids has shape {tuple(position_ids.shape)}; expected [{b}, {n}]")
            return position_ids
        if attention_mask is not None:
            return positions_from_mask(attention_mask, n)
        return torch.arange(start, start + n, device=device).expand(b, n)

    @staticmethod
    def _call(layer, *args):
        return layer(*args)

    @staticmethod
    def _checkpointed(layer, *args):
        return checkpoint(layer, *args, use_reentrant=False)
