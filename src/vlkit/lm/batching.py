"""A decoding batch whose rows join and leave between steps (continuous batching): what a server
drives to answer requests that arrive at different times with one forward per step for all.

API::

    batch = DecodingBatch(lm, tokenizer)
    cfg = resolve_config(lm, generation_config, max_new_tokens=32, ...)      # each row's own options
    if batch.fits(prompt_width, cfg.max_new_tokens):
        batch.add(keys, configs, input_ids, attention_mask, inputs_embeds=None, generators=None)
        # or batch.join(...): prefilled by the next step's forward, packed beside the running rows' tokens
    for key, token, finish in batch.step():    # one new token for every running row; finish: None, "stop", "length"
        ...                                    # a finished row has left the batch
    # step() is pick() (the tokens, from the last forward's scores) then advance() (the next forward):
    # a server hands out what pick() returns before it advances
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
A group that joins by :meth:`DecodingBatch.join` saves a forward: its prompts and the running rows'
tokens go through the model as one packed sequence, each written to its own row and column, the
running tokens attending as a decode step does and the prompts as a prefill does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

from vlkit.errors import VlkitError
from vlkit.lm.cache import CacheLayer, KVCache
from vlkit.lm.decoder import causal_mask, positions_from_mask
from vlkit.lm.generate import GenerationConfig, _device, _new_tokens, _prompt, pick_tokens
from vlkit.lm.logits import processors
from vlkit.lm.stopping import StopStrings
from vlkit.nn.attention import sdpa


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


@dataclass
class _Group:
    """Rows that join together: their left-padded prompt, its mask ``[G, P]`` and their longest answer."""

    rows: list[_Row]
    prompt: object  # vlkit.lm.generate._Prompt
    mask: torch.Tensor
    new: int

    def only(self, index: list[int]) -> "_Group | None":
        """The rows at ``index`` alone (None for none)."""
        if not index:
            return None
        at = torch.tensor(index, device=self.mask.device)
        pick = lambda t: None if t is None else t[at]  # noqa: E731
        prompt = type(self.prompt)(pick(self.prompt.ids), pick(self.prompt.embeds), pick(self.prompt.mask))
        return _Group([self.rows[i] for i in index], prompt, self.mask[at], self.new)


class _CacheView(KVCache):
    """A :class:`KVCache` over a block of the batch's buffers (a view: nothing allocated), so the
    model reads and writes the rows in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        self.keys, self.values = keys, values
        self.max_length, self.length, self._end = keys.shape[3], length, length
        self.layers = [CacheLayer(self, i) for i in range(keys.shape[0])]


class _Packing:
    """Where a packed forward's tokens go: the running rows' one token each (rows ``[0, n)``, column
    ``end``), then the joining rows' prompts (rows ``[n, n + g)``, their ``width`` columns ending at
    ``end``; ``real`` marks each left-padded prompt's tokens). The masks are made once for all layers."""

    def __init__(self, n: int, end: int, real: torch.Tensor, running_mask: torch.Tensor, dtype: torch.dtype):
        self.n, self.end, self.real = n, end, real
        self.padded = not bool(real.all())  # else the prompts' tokens fill their grid: views, no scatter
        self.columns = slice(end - real.shape[1] + 1, end + 1)
        if self.padded:
            at = real.nonzero()  # (row, column) of each prompt token, row by row
            self.rows, self.cols = n + at[:, 0], self.columns.start + at[:, 1]
        self.running = running_mask[:, None, None, :].bool()  # True: attend
        self.prompts = causal_mask(real.long(), 0, real.shape[1], dtype, real.device)[0]  # None: causal alone


class _PackedLayer:
    """One layer's slot for packed tokens (:class:`_Packing`): each token's keys and values are
    written to its row and column of the batch's buffers; the running rows' tokens attend to their
    rows' columns, each prompt to its own columns (causal, padding masked): two attentions of the
    shapes a decode step and a prefill have, not one over every row's columns."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, packing: _Packing):
        self.keys, self.values, self.packing = keys, values, packing

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, causal, gqa: bool) -> torch.Tensor:
        p = self.packing
        n, (g, width) = p.n, p.real.shape
        for buf, new in ((self.keys, k[0]), (self.values, v[0])):  # new: [kv heads, tokens, head dim]
            buf[:n, :, p.end] = new[:, :n].transpose(0, 1)
            if p.padded:
                buf[p.rows, :, p.cols] = new[:, n:].transpose(0, 1)
            else:
                buf[n:, :, p.columns] = new[:, n:].unflatten(1, (g, width)).transpose(0, 1)
        ran = sdpa(q[0, :, :n].transpose(0, 1)[:, :, None], self.keys[:n, :, : p.end + 1], self.values[:n, :, : p.end + 1],
                   p.running, False, gqa)[:, :, 0].transpose(0, 1)  # fmt: skip
        if p.padded:
            grid = q.new_zeros(g, width, q.shape[1], q.shape[3])
            grid[p.real] = q[0, :, n:].transpose(0, 1)
            grid = grid.transpose(1, 2)
        else:
            grid = q[0, :, n:].unflatten(1, (g, width)).transpose(0, 1)
        joined = sdpa(grid, self.keys[n:, :, p.columns], self.values[n:, :, p.columns], p.prompts, p.prompts is None, gqa)
        joined = joined.transpose(1, 2)[p.real].transpose(0, 1) if p.padded else joined.transpose(0, 1).flatten(1, 2)
        return torch.cat([ran, joined], 1)[None]


class _PackedCache:
    """The cache :meth:`DecoderLM.forward` writes through for packed tokens (one sequence of them)."""

    batch, length = 1, 0

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, packing: _Packing):
        self.layers = [_PackedLayer(keys[i], values[i], packing) for i in range(keys.shape[0])]

    def reserve(self, n: int) -> None:
        pass

    def commit(self) -> None:
        pass


PACK_LIMIT = 2**16
"""The most prompt tokens × joining rows a step packs beside the running rows' tokens (each prompt
attends in a grid as wide as the longest); a larger group is prefilled on its own."""


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
        self.joining: _Group | None = None  # prefilled by the next step
        self.pending: torch.Tensor | None = None  # [rows]: the tokens picked, waiting for advance()
        self.join_error: tuple[list[Hashable], Exception] | None = None  # the keys of a group whose prefill failed, why
        self.joins = {"packed": 0, "apart": 0}  # joining groups prefilled inside a step's forward, and on their own

    def __len__(self) -> int:
        return len(self.rows) + len(self._joining_rows)

    @property
    def keys(self) -> list[Hashable]:
        return [r.key for r in self.rows + self._joining_rows]

    @property
    def _joining_rows(self) -> list[_Row]:
        return [] if self.joining is None else self.joining.rows

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
        ``inputs_embeds`` ``[G, P, D]`` when given, what the model reads) now and join its rows, each
        with its checked config (``max_new_tokens`` or ``max_length`` set its length)."""
        group = self._group(keys, configs, input_ids, attention_mask, inputs_embeds, generators)
        with torch.inference_mode():
            self._prefill(group)

    def join(self, keys: Sequence[Hashable], configs: Sequence[GenerationConfig], input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
             generators: Sequence[torch.Generator | None] | None = None) -> None:  # fmt: skip
        """:meth:`add`, but the group is prefilled by the next :meth:`step`'s forward, its prompts
        packed beside the running rows' tokens (one forward for both, where the packed attention
        stays under ``PACK_LIMIT`` scores a head; else a prefill of its own): for a small model
        the forward's fixed cost is most of a step's. Its rows' first tokens come from the step after.
        If its prefill fails, the running rows go on and ``join_error`` holds its keys and the error."""
        if self.joining is not None:
            raise VlkitError("DecodingBatch.join: a group is already waiting to join; step() before joining another")
        self.joining = self._group(keys, configs, input_ids, attention_mask, inputs_embeds, generators)

    def _group(self, keys, configs, input_ids, attention_mask, inputs_embeds, generators) -> _Group:
        """The prompts checked, and their rows (not yet running)."""
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
        return _Group(new_rows, prompt, mask, max(news))

    def _prefill(self, group: _Group) -> None:
        """The group's own forward, into free rows of the buffers; its rows join."""
        prompt, rows, width = group.prompt, len(group.rows), group.mask.shape[1]
        end = self._make_room(rows, width, group.new)
        n = len(self.rows)
        keys, values = self.keys_buffer[:, n : n + rows], self.values_buffer[:, n : n + rows]
        keys[:, :, :, : end - width] = 0  # the new rows' unused columns: masked, and no stale values
        values[:, :, :, : end - width] = 0
        cache = _CacheView(keys[:, :, :, end - width :], values[:, :, :, end - width :], 0)
        out = self.lm(input_ids=prompt.ids if prompt.embeds is None else None, inputs_embeds=prompt.embeds,
                      attention_mask=prompt.mask, cache=cache, logits_to_keep=1)  # fmt: skip
        self._join(group.mask, out.logits[:, -1], end)
        self.rows += group.rows

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
        """Choose every running row's next token, let the rows that ended leave, and run the model on
        the rest (and on the joining group's prompts): ``(key, token, finish)`` per running row, in
        row order. The same as :meth:`pick` then :meth:`advance`."""
        events = self.pick()
        self.advance()
        return events

    def pick(self) -> list[tuple[Hashable, int, str | None]]:
        """Choose every running row's next token from the last forward's scores and let the rows that
        ended leave: ``(key, token, finish)`` per running row, in row order. The tokens wait for
        :meth:`advance`; a server hands finished answers out before that forward, not after it."""
        if self.pending is not None:
            raise VlkitError("DecodingBatch.pick: the tokens picked last are not yet through the model; advance() first")
        if not self.rows:
            return []
        events = []
        with torch.inference_mode():
            tokens = self.logits.argmax(-1)
            for i, row in enumerate(self.rows):
                if not row.simple:
                    tokens[i] = row.pick(self.logits[i : i + 1])[0]
            self.pending = tokens
            keep = []
            for i, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
                finish = row.finish(token)
                events.append((row.key, token, finish))
                if finish is None:
                    keep.append(i)
            self._keep(keep)
        return events

    def advance(self) -> None:
        """Run the model on the picked tokens of the rows still running and on the joining group's
        prompts (packed into one forward where :meth:`_packs` allows), so that the next :meth:`pick`
        has their scores. A joining group whose prefill fails leaves its keys in ``join_error``."""
        tokens, self.pending = self.pending, None
        group, self.joining = self.joining, None  # no rows running: no tokens picked either
        with torch.inference_mode():
            if group is not None and self._packs(group):
                try:
                    self._forward_packed(tokens, group)
                    self.joins["packed"] += 1
                    return
                except Exception:  # noqa: BLE001 - done apart below: a failing prefill then fails its group alone
                    pass  # the running rows are as they were before the forward (their layout made room)
            if self.rows:
                self._forward(tokens)
            if group is not None:
                try:
                    self._prefill(group)
                    self.joins["apart"] += 1
                except Exception as err:  # noqa: BLE001 - the running rows go on; the caller fails the group
                    self.join_error = ([r.key for r in group.rows], err)

    def drop(self, keys) -> None:
        """Remove the rows of ``keys`` (no more tokens are made for them)."""
        gone = set(keys)
        if self.joining is not None:
            self.joining = self.joining.only([i for i, r in enumerate(self.joining.rows) if r.key not in gone])
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
            self.mask = self.position = self.logits = self.pending = None
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
        if self.pending is not None:
            self.pending = self.pending[at]
        return order

    def _forward(self, tokens: torch.Tensor) -> None:
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        out = self.lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=self.position[:, None], cache=self.cache,
                      logits_to_keep=1)  # fmt: skip
        self.mask, self.position, self.logits = mask, self.position + 1, out.logits[:, -1]

    def _packs(self, group: _Group) -> bool:
        """Whether the group's prompts go into the running rows' forward: when rows run (else a plain
        prefill is the same forward, cheaper) and the group is small (:data:`PACK_LIMIT`)."""
        return bool(self.rows) and group.mask.numel() * len(group.rows) <= PACK_LIMIT

    def _forward_packed(self, tokens: torch.Tensor, group: _Group) -> None:
        """One forward for the running rows' tokens and the group's prompts, packed into one sequence
        (:class:`_Packing`): each prompt ends in the column of the running rows' token, so its rows
        are right-aligned with them."""
        n, (g, width) = len(self.rows), group.mask.shape
        end = self._make_room(g, width - 1, group.new)  # the column of this step's tokens
        columns, rows = end + 1, n + g
        for buf in (self.keys_buffer, self.values_buffer):
            buf[:, n:rows, :, :columns] = 0  # the new rows' columns: masked, and no stale values
        mask = group.mask.new_zeros(rows, columns)
        mask[:n, :end] = self.mask
        mask[:n, end] = 1
        mask[n:, end - width + 1 :] = group.mask
        real = group.mask.bool()
        prompts = group.prompt.embeds if group.prompt.embeds is not None else self.lm.embed(group.prompt.ids)
        x = torch.cat([self.lm.embed(tokens[:, None])[:, 0], prompts[real]])
        positions = torch.cat([self.position, positions_from_mask(group.mask, width)[real]])
        lengths = group.mask.sum(1)
        last = torch.cat([torch.arange(n, device=self.device), n + lengths.cumsum(0) - 1])
        packing = _Packing(n, end, real, mask[:n], x.dtype)
        cache = _PackedCache(self.keys_buffer[:, :rows], self.values_buffer[:, :rows], packing)
        out = self.lm(inputs_embeds=x[None], position_ids=positions[None], cache=cache, logits_to_keep=last)
        self.rows += group.rows
        self.cache = _CacheView(self.keys_buffer[:, :rows], self.values_buffer[:, :rows], columns)
        self.mask, self.logits = mask, out.logits[0]
        self.position = torch.cat([self.position + 1, lengths])
