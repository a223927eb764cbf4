"""A decoding batch whose rows join and leave between steps (continuous batching): what a server
drives to answer requests that arrive at different times with one forward per step for all.

API::

    batch = DecodingBatch(lm, tokenizer)
    cfg = resolve_config(lm, generation_config, max_new_tokens=32, ...)      # each row's own options
    if batch.fits(prompt_width, cfg.max_new_tokens):
        batch.add(keys, configs, input_ids, attention_mask, inputs_embeds=None, generators=None)
    for key, token, finish in batch.step():    # one new token for every row; finish: None, "stop", "length"
        ...                                    # a finished row has left the batch
    batch.drop(keys)                           # rows nobody waits for any more (a closed connection)

Each row chooses its tokens as :func:`vlkit.lm.generate.generate` would for it alone (the same
processors, :func:`~vlkit.lm.generate.pick_tokens`, EOS ids and stop strings, its own generator),
so only float rounding of the batched forward separates the two. Every row's keys and values live
in one buffer the batch keeps (rows first, then columns), so joining and leaving copy no running
row's cache: a group that joins is prefilled (left-padded) straight into free rows, right-aligned
with the running rows (every row's newest token shares a column, each row keeps its own positions,
and the attention mask hides the columns a row does not use); a row that leaves takes the last
row's place. Leading columns no row uses any more are dropped when a group joins, once they are a
quarter of the used width (or room is short); the buffer grows only when rows or columns run out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

from vlkit.errors import VlkitError
from vlkit.lm.cache import CacheLayer, KVCache
from vlkit.lm.generate import GenerationConfig, _device, _new_tokens, _prompt, pick_tokens
from vlkit.lm.logits import processors
from vlkit.lm.stopping import StopStrings


@dataclass
class _Row:
    """One sequence being generated: its options, what it generated, and its token history (the
    prompt's ids then the new tokens) for its processors (None when it has none: nothing reads it)."""

    key: Hashable
    cfg: GenerationConfig
    new: int
    process: list
    generator: torch.Generator | None
    stopper: StopStrings | None
    history: torch.Tensor | None  # [1, P + new]
    prompt_len: int
    generated: list[int] = field(default_factory=list)

    @property
    def simple(self) -> bool:
        """Greedy with no processor: the batch's argmax is this row's choice."""
        return not self.process and not self.cfg.do_sample

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        step = len(self.generated)
        seen = None if self.history is None else self.history[:, : self.prompt_len + step]
        return pick_tokens(logits, seen, self.process, self.cfg.do_sample, self.generator, step)

    def finish(self, token: int) -> str | None:
        """Record ``token``; why the row ends with it ("stop": an EOS id or a stop string, "length":
        its last allowed token), else None."""
        ended = token in self.cfg.eos_ids or (self.stopper is not None and self.stopper.hit(self.generated, token))
        if self.history is not None:
            self.history[0, self.prompt_len + len(self.generated)] = token
        self.generated.append(token)
        if ended:
            return "stop"
        return "length" if len(self.generated) >= self.new else None


class _CacheView(KVCache):
    """A :class:`KVCache` over a block of the batch's buffers (a view: nothing allocated), so the
    model reads and writes the rows in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        self.keys, self.values = keys, values
        self.max_length, self.length, self._end = keys.shape[3], length, length
        self.layers = [CacheLayer(self, i) for i in range(keys.shape[0])]


def _shift(buffers: tuple[torch.Tensor, ...], rows: int, start: int, end: int, by: int) -> None:
    """Move columns ``[start, end)`` of the first ``rows`` rows by ``by`` columns, in place, in
    blocks no wider than the move (so no block overwrites columns still to be read)."""
    if by == 0 or start == end:
        return
    step = abs(by)
    blocks = range(start, end, step)[:: 1 if by < 0 else -1]  # a right move starts at the right end
    for buf in buffers:
        for a in blocks:
            b = min(a + step, end)
            buf[:, :rows, :, a + by : b + by] = buf[:, :rows, :, a:b]


class DecodingBatch:
    """Rows of a language model's generations, decoded together one token per step. ``tokenizer``
    decodes stop strings (rows whose config has them)."""

    def __init__(self, lm, tokenizer=None):
        self.lm, self.tokenizer = lm, tokenizer
        self.device = _device(lm)
        self.rows: list[_Row] = []
        self.keys_buffer: torch.Tensor | None = None  # [layers, row capacity, kv heads, column capacity, head dim]
        self.values_buffer: torch.Tensor | None = None
        self.cache: KVCache | None = None  # the running rows' view of the buffers
        self.mask: torch.Tensor | None = None  # [rows, cache length]: 1 where the row has a token
        self.position: torch.Tensor | None = None  # [rows]: each row's next position id
        self.logits: torch.Tensor | None = None  # [rows, V]: the scores of each row's next token

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def keys(self) -> list[Hashable]:
        return [r.key for r in self.rows]

    def _first_used(self) -> int:
        """The first cache column a running row uses (columns before it can go)."""
        used = self.mask.any(0)
        return int(used.int().argmax()) if bool(used.any()) else self.mask.shape[1]

    def _room(self) -> int:
        return max((r.new - len(r.generated) for r in self.rows), default=0)

    def _width(self) -> int:
        return 0 if not self.rows else self.mask.shape[1] - self._first_used()

    def fits(self, width: int, new: int) -> bool:
        """Whether a group of prompts ``width`` tokens wide (left-padded) asking for up to ``new``
        tokens can join now without the joined cache outgrowing the model's positions."""
        return max(self._width(), width) + max(self._room(), new) <= self.lm.max_length

    def add(self, keys: Sequence[Hashable], configs: Sequence[GenerationConfig], input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
            generators: Sequence[torch.Generator | None] | None = None) -> None:  # fmt: skip
        """Prefill a left-padded group of prompts (``input_ids`` ``[G, P]``, the penalties' history;
        ``inputs_embeds`` ``[G, P, D]`` when given, what the model reads) and join its rows, each
        with its checked config (``max_new_tokens`` or ``max_length`` set its length)."""
        prompt = _prompt(self.lm, input_ids, attention_mask, inputs_embeds)
        rows, width = prompt.batch, prompt.length
        generators = list(generators) if generators is not None else [None] * rows
        if not len(keys) == len(configs) == len(generators) == rows:
            raise VlkitError(f"DecodingBatch.add: {rows} prompts but {len(keys)} keys, {len(configs)} configs and "
                             f"{len(generators)} generators; expected one each per prompt")  # fmt: skip
        mask = prompt.mask if prompt.mask is not None else torch.ones(rows, width, dtype=torch.long, device=self.device)
        lengths = mask.sum(1).tolist()
        news = [_new_tokens(self.lm, cfg, n) for cfg, n in zip(configs, lengths)]
        if not self.fits(width, max(news)):
            raise VlkitError(f"DecodingBatch.add: {width} prompt positions + {max(news)} new tokens do not fit beside the "
                             f"running rows in the model's {self.lm.max_length} positions; add them when fewer rows run")
        ids = prompt.ids
        new_rows = []
        for i, (key, cfg, gen, new) in enumerate(zip(keys, configs, generators, news)):
            stopper = StopStrings(self.tokenizer or getattr(self.lm, "tokenizer", None), cfg.stops) if cfg.stops else None
            process = processors(cfg, None, self.device)
            history = None
            if process:
                history = torch.zeros(1, lengths[i] + new, dtype=torch.long, device=self.device)
                if ids is not None:
                    history[0, : lengths[i]] = ids[i, width - lengths[i] :]
            new_rows.append(_Row(key, cfg, new, process, gen, stopper, history, lengths[i] if ids is not None else 0))
        with torch.inference_mode():
            end = self._make_room(rows, width, max(news))
            n = len(self.rows)
            keys, values = self.keys_buffer[:, n : n + rows], self.values_buffer[:, n : n + rows]
            keys[:, :, :, : end - width] = 0  # the new rows' unused columns: masked, and no stale values
            values[:, :, :, : end - width] = 0
            cache = _CacheView(keys[:, :, :, end - width :], values[:, :, :, end - width :], 0)
            out = self.lm(input_ids=ids if prompt.embeds is None else None, inputs_embeds=prompt.embeds,
                          attention_mask=prompt.mask, cache=cache, logits_to_keep=1)  # fmt: skip
            self._join(mask, out.logits[:, -1], end)
        self.rows += new_rows

    def _make_room(self, rows: int, width: int, new: int) -> int:
        """Lay the running rows out for ``rows`` more, ``width`` columns wide (left-padded), that
        generate up to ``new`` tokens: drop the leading columns no row uses when they are a quarter
        of the used width or the model's positions need it, move the rows right where the group is
        wider, grow the buffers where they are too small. The running rows stay a consistent batch
        (whatever the group's prefill does next); returns the column their next token goes to."""
        n = len(self.rows)
        end = self.cache.length if n else 0
        first = self._first_used() if n else end
        room = max(self._room(), new)
        drop = first if first * 4 > end - first or max(end, width) + room > self.lm.max_length else 0
        kept = end - drop  # the running rows' columns that stay
        joined = max(kept, width)
        cap_rows = 0 if self.keys_buffer is None else self.keys_buffer.shape[1]
        cap_cols = 0 if self.keys_buffer is None else self.keys_buffer.shape[3]
        if n + rows > cap_rows or joined + room > cap_cols:
            cols = min(self.lm.max_length, max(cap_cols, (joined + room) * 5 // 4))
            fresh = self.lm.new_cache(max(cap_rows, n + rows), cols, device=self.device)
            if n:
                fresh.keys[:, :n, :, joined - kept : joined] = self.keys_buffer[:, :n, :, drop:end]
                fresh.values[:, :n, :, joined - kept : joined] = self.values_buffer[:, :n, :, drop:end]
            self.keys_buffer, self.values_buffer = fresh.keys, fresh.values
        else:
            _shift((self.keys_buffer, self.values_buffer), n, drop, end, joined - kept - drop)
        if n:
            mask = self.mask.new_zeros(n, joined)
            mask[:, joined - kept :] = self.mask[:, drop:]
            self.mask = mask
            self.cache = _CacheView(self.keys_buffer[:, :n], self.values_buffer[:, :n], joined)
        return joined

    def _join(self, mask: torch.Tensor, logits: torch.Tensor, end: int) -> None:
        """The prefilled rows (their keys and values in the buffers' rows after the running ones,
        ending at column ``end``) join the batch."""
        rows = len(self.rows) + mask.shape[0]
        self.cache = _CacheView(self.keys_buffer[:, :rows], self.values_buffer[:, :rows], end)
        position = mask.sum(1)
        if end > mask.shape[1]:
            mask = torch.cat([mask.new_zeros(mask.shape[0], end - mask.shape[1]), mask], 1)
        if not self.rows:
            self.mask, self.position, self.logits = mask, position, logits
            return
        self.mask = torch.cat([self.mask, mask])
        self.position = torch.cat([self.position, position])
        self.logits = torch.cat([self.logits, logits])

    def step(self) -> list[tuple[Hashable, int, str | None]]:
        """Choose every row's next token, let the rows that ended leave, and run the model on the
        rest: ``(key, token, finish)`` per row, in row order."""
        if not self.rows:
            return []
        with torch.inference_mode():
            tokens = self.logits.argmax(-1)
            for i, row in enumerate(self.rows):
                if not row.simple:
                    tokens[i] = row.pick(self.logits[i : i + 1])[0]
            events, keep = [], []
            for i, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
                finish = row.finish(token)
                events.append((row.key, token, finish))
                if finish is None:
                    keep.append(i)
            order = self._keep(keep)
            if self.rows:
                self._forward(tokens[order] if len(order) < tokens.shape[0] else tokens)
        return events

    def drop(self, keys) -> None:
        """Remove the rows of ``keys`` (no more tokens are made for them)."""
        gone = set(keys)
        self._keep([i for i, r in enumerate(self.rows) if r.key not in gone])

    def _keep(self, index: list[int]) -> list[int]:
        """Keep the rows at ``index`` (ascending): each gap below the new row count takes one of
        the kept rows above it, so only as many rows' caches move as rows left. Returns the rows'
        new order (old row numbers)."""
        count = len(index)
        if count == len(self.rows):
            return index
        if not count:
            self.rows, self.cache = [], None
            self.mask = self.position = self.logits = None
            return index
        kept = set(index)
        gaps = [i for i in range(count) if i not in kept]
        movers = [i for i in index if i >= count]
        end, order = self.cache.length, list(range(count))
        with torch.inference_mode():
            for gap, row in zip(gaps, movers):
                for buf in (self.keys_buffer, self.values_buffer):
                    buf[:, gap, :, :end] = buf[:, row, :, :end]
                order[gap] = row
        self.rows = [self.rows[i] for i in order]
        self.cache = _CacheView(self.keys_buffer[:, :count], self.values_buffer[:, :count], end)
        at = torch.tensor(order, device=self.device)
        self.mask, self.position, self.logits = self.mask[at], self.position[at], self.logits[at]
        return order

    def _forward(self, tokens: torch.Tensor) -> None:
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        out = self.lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=self.position[:, None], cache=self.cache,
                      logits_to_keep=1)  # fmt: skip
        self.mask, self.position, self.logits = mask, self.position + 1, out.logits[:, -1]
