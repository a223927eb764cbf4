"""The one generation loop every vlkit language model answers through.

API (``lm`` is any module with the language-model contract of ``DESIGN.md``: ``lm(input_ids=,
inputs_embeds=, attention_mask=, position_ids=, cache=, logits_to_keep=)`` returning ``.logits``,
``lm.new_cache(batch, max_length, device=)``, ``lm.config.max_position_embeddings``)::

    from vlkit.lm.generate import GenerationConfig, generate, generate_text, stream

    ids = generate(lm, input_ids, attention_mask, max_new_tokens=32)       # [B * R, new] LongTensor
    texts = generate_text(lm, tokenizer, input_ids, attention_mask, ...)    # list of B * R strings
    for piece in stream(lm, tokenizer, input_ids, attention_mask, ...):    # batch 1: text pieces
        print(piece, end="", flush=True)
    cfg = resolve_config(lm, **options)           # the config a call would use, checked
    texts = decode_new(tokenizer, ids, cfg)       # what generate_text makes of generate's ids

- The prompt is ``input_ids`` ``[B, P]`` or ``inputs_embeds`` ``[B, P, D]`` (a VLM's text embeddings
  with image features spliced in), left-padded with ``attention_mask`` ``[B, P]`` (1 = token). With
  both, the embeddings are prefilled and the ids are the history the repetition penalty and the
  n-gram ban see (with embeddings alone they see only the new tokens, as in transformers).
- Options come from ``generation_config`` (a :class:`GenerationConfig`), else ``lm.generation_config``
  (what the loader read from ``generation_config.json``), else the defaults; keyword arguments
  override any field (``max_new_tokens=, do_sample=, temperature=, top_k=, top_p=, min_p=,
  repetition_penalty=, no_repeat_ngram_size=, num_beams=, length_penalty=, early_stopping=,
  num_return_sequences=, eos_token_id=, pad_token_id=, min_new_tokens=, stop_strings=, ...``).
- ``generate`` returns only the new tokens. A row that ended (an EOS id, a stop string) is filled
  with the pad id (``pad_token_id``, else the first EOS id) and the loop stops once every row has
  ended, so the width is the longest row. Sampling returns ``num_return_sequences`` rows per prompt
  in a row; beam search the best ``num_return_sequences`` hypotheses per prompt, best first.
- Stop strings are matched on decoded text, so they need a tokenizer with ``decode(ids,
  skip_special_tokens=True)`` (``tokenizer=``, else ``lm.tokenizer``); the ids keep the token that
  completed the stop string, ``generate_text`` and ``stream`` trim it and what follows. Unlike
  transformers, a stop string never matches across the prompt's end.
- ``generator`` (a ``torch.Generator``) makes sampling reproducible; without one sampling draws from
  torch's global generator, as transformers does.
- ``stream`` takes one prompt (greedy or sampling, not beams) and checks its options when called,
  before the first piece; its pieces joined equal ``generate_text``'s string.
- Errors (:class:`vlkit.errors.VlkitError`) name the option and value: ``max_new_tokens`` <= 0, top-p
  outside (0, 1], temperature <= 0 with sampling, more sequences than beams, a prompt longer than
  the model's positions (or prompt + new tokens past them), right padding, unknown options.

Speed: the KV cache is allocated once for prompt + new tokens, the prefill computes only the last
position's logits, each step is one forward of one token per row, and whether every row has ended
is read without stalling an accelerator (one step late; the extra step is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from vlkit.errors import VlkitError
from vlkit.lm.beam import BeamSearch
from vlkit.lm.generation_config import GenerationConfig
from vlkit.lm.logits import processors
from vlkit.lm.stopping import StopStrings, trim_stop_strings
from vlkit.lm.streaming import TextStream

__all__ = ["GenerationConfig", "decode_new", "generate", "generate_text", "pick_tokens", "resolve_config", "stream"]


def resolve_config(lm, generation_config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
    """The config a call uses: the one given, else the model's, else the defaults; then the
    keyword overrides, every value checked."""
    base = generation_config if generation_config is not None else getattr(lm, "generation_config", None)
    if not isinstance(base, GenerationConfig):
        base = GenerationConfig()
    return base.updated(overrides, where="generate()")


@dataclass
class _Prompt:
    """A left-padded prompt on the model's device; ``mask`` is None when no row is padded."""

    ids: torch.Tensor | None
    embeds: torch.Tensor | None
    mask: torch.Tensor | None

    @property
    def batch(self) -> int:
        return (self.ids if self.embeds is None else self.embeds).shape[0]

    @property
    def length(self) -> int:
        return (self.ids if self.embeds is None else self.embeds).shape[1]

    def repeat(self, n: int) -> "_Prompt":
        """Each row ``n`` times in a row (beams, several samples per prompt)."""
        if n == 1:
            return self
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        return _Prompt(rep(self.ids), rep(self.embeds), rep(self.mask))

    def pad_start(self) -> torch.Tensor | None:
        """Where each row's real tokens begin (the repetition penalty skips the padding)."""
        return None if self.mask is None else (self.mask != 0).int().argmax(1)


def _device(lm) -> torch.device:
    param = next(iter(lm.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _prompt(lm, input_ids, attention_mask, inputs_embeds) -> _Prompt:
    """Check the prompt's shapes and padding and move it to the model's device."""
    if input_ids is None and inputs_embeds is None:
        raise VlkitError("generate(): give the prompt as input_ids [B, P] or inputs_embeds [B, P, D]")
    if input_ids is not None and (input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int)):
        raise VlkitError(
            f"generate(): input_ids must be integer token ids [B, P], got {tuple(input_ids.shape)} {input_ids.dtype}"
        )
    if inputs_embeds is not None and inputs_embeds.dim() != 3:
        raise VlkitError(f"generate(): inputs_embeds must be [B, P, D], got {tuple(inputs_embeds.shape)}")
    shape = tuple((input_ids if inputs_embeds is None else inputs_embeds).shape[:2])
    if input_ids is not None and inputs_embeds is not None and tuple(input_ids.shape) != shape:
        raise VlkitError(
            f"generate(): input_ids {tuple(input_ids.shape)} and inputs_embeds {shape} cover different tokens"
        )
    if shape[1] == 0:
        raise VlkitError("generate(): the prompt is empty; give at least one token")
    device = _device(lm)
    mask = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != shape:
            raise VlkitError(f"generate(): attention_mask is {tuple(attention_mask.shape)}, the prompt {shape}")
        real = attention_mask != 0
        if not bool(real[:, -1].all()) or bool((real[:, 1:] < real[:, :-1]).any()):
            raise VlkitError(
                "generate(): attention_mask must pad on the left (zeros before each row's tokens, ones to the end)"
            )
        if not bool(real.all()):
            mask = attention_mask.to(device=device, dtype=torch.long)
    ids = None if input_ids is None else input_ids.to(device=device, dtype=torch.long)
    embeds = None if inputs_embeds is None else inputs_embeds.to(device)
    return _Prompt(ids, embeds, mask)


def _new_tokens(lm, cfg: GenerationConfig, prompt_len: int) -> int:
    """How many tokens to generate: ``max_new_tokens``, else ``max_length`` minus the prompt,
    else 20; all of them must fit the model's positions."""
    if cfg.max_new_tokens is not None:
        new = cfg.max_new_tokens
    elif cfg.max_length is not None:
        new = cfg.max_length - prompt_len
        if new <= 0:
            raise VlkitError(
                f"generate(): the prompt has {prompt_len} tokens, max_length={cfg.max_length} leaves no room "
                "for new ones; raise max_length or set max_new_tokens"
            )
    else:
        new = 20
    limit = getattr(getattr(lm, "config", None), "max_position_embeddings", None)
    if limit is not None and prompt_len > limit:
        raise VlkitError(
            f"generate(): the prompt has {prompt_len} tokens, more than the model's {limit} positions "
            "(max_position_embeddings)"
        )
    if limit is not None and prompt_len + new > limit:
        raise VlkitError(
            f"generate(): the prompt's {prompt_len} tokens + max_new_tokens={new} = {prompt_len + new} exceed the "
            f"model's {limit} positions (max_position_embeddings); ask for at most {limit - prompt_len} new tokens"
        )
    return new


def _pad_id(cfg: GenerationConfig, rows: int) -> int:
    """The id that fills a row after it ended: ``pad_token_id``, else the first EOS id."""
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    if cfg.eos_ids:
        return cfg.eos_ids[0]
    if cfg.stops and (rows > 1 or cfg.num_beams > 1):
        raise VlkitError(
            "generate(): rows that end on a stop string are filled with pad_token_id; set pad_token_id or eos_token_id"
        )
    return 0  # nothing ends early, so no row is ever filled


class _Decoder:
    """Runs the model: the prefill fills a cache sized for prompt + new tokens, then each step
    feeds one token per row at the position that row has reached."""

    def __init__(self, lm, prompt: _Prompt, new: int):
        self.lm, self.prompt = lm, prompt
        rows, length = prompt.batch, prompt.length
        device = prompt.embeds.device if prompt.embeds is not None else prompt.ids.device
        self.cache = lm.new_cache(rows, length + new, device=device)
        if prompt.mask is None:
            self.mask, self.position = None, torch.full((rows, 1), length, dtype=torch.long, device=device)
        else:
            self.mask = torch.cat([prompt.mask, prompt.mask.new_ones(rows, new)], 1)
            self.position = prompt.mask.sum(1, keepdim=True)

    def prefill(self) -> torch.Tensor:
        p = self.prompt
        ids = p.ids if p.embeds is None else None
        out = self.lm(input_ids=ids, inputs_embeds=p.embeds, attention_mask=p.mask, cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1]

    def next(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Logits after feeding ``tokens`` ``[rows]``, the ``step``-th new token of each row."""
        length = self.prompt.length + step + 1
        mask = None if self.mask is None else self.mask[:, :length]
        out = self.lm(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=self.position + step,
            cache=self.cache, logits_to_keep=1,
        )  # fmt: skip
        return out.logits[:, -1]


class _AllEnded:
    """Whether every row has ended. On CPU the answer is read at once; on a GPU (``lazy``) the
    previous step's answer is read, copied without waiting, so the host never drains the device
    queue to ask: the step after the last is computed and dropped."""

    def __init__(self, device: torch.device, lazy: bool | None = None):
        self.cuda = device.type == "cuda"
        self.lazy = self.cuda if lazy is None else lazy
        self.flag = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)
        self.event = None
        self.asked = False

    def __call__(self, unfinished: torch.Tensor, step: int) -> int | None:
        """The number of steps to keep once every row has ended, else None."""
        if not self.lazy:
            return None if bool(unfinished.any()) else step + 1
        kept = None
        if self.asked:
            if self.event is not None:
                self.event.synchronize()
            kept = step if bool(self.flag) else None
        self.flag.copy_(~unfinished.any(), non_blocking=self.cuda)
        if self.cuda:
            self.event = torch.cuda.Event()
            self.event.record()
        self.asked = True
        return kept


def _history(prompt: _Prompt, new: int, pad: int, device) -> tuple[torch.Tensor, int]:
    """Room for each row's tokens, prompt then new ones (``[rows, P + new]``, pad-filled), and
    where the history the penalties see starts: the prompt's ids, or only the new tokens when
    the prompt came as embeddings alone."""
    seqs = torch.full((prompt.batch, prompt.length + new), pad, dtype=torch.long, device=device)
    if prompt.ids is None:
        return seqs, prompt.length
    seqs[:, : prompt.length] = prompt.ids
    return seqs, 0


def pick_tokens(logits: torch.Tensor, history: torch.Tensor, process, sample: bool, generator, step: int) -> torch.Tensor:
    """The next token of each row ``[rows]``: the processors ``process`` applied to the float logits
    ``[rows, V]`` (``history`` ``[rows, T]`` is what penalties see, ``step`` the new tokens so far),
    then a draw (``sample``) or the best token. The one choice both loops and a step-wise batch make."""
    scores = logits.float()
    for f in process:
        scores = f(history, scores, step)
    if sample:
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
    return scores.argmax(-1)


def _search_steps(lm, prompt: _Prompt, cfg: GenerationConfig, new: int, pad: int, generator, stopper):
    """Greedy or sampled decoding, one token per row per step: yields ``(tokens, unfinished)``
    after each step and returns the new tokens ``[rows, steps]``."""
    length = prompt.length
    decoder = _Decoder(lm, prompt, new)
    device = decoder.position.device
    seqs, start = _history(prompt, new, pad, device)
    process = processors(cfg, prompt.pad_start(), device)
    eos = torch.tensor(cfg.eos_ids, device=device) if cfg.eos_ids else None
    can_end = eos is not None or stopper is not None
    unfinished = torch.ones(prompt.batch, dtype=torch.bool, device=device)
    ended = _AllEnded(device)
    logits = decoder.prefill()
    for step in range(new):
        tokens = pick_tokens(logits, seqs[:, start : length + step], process, cfg.do_sample, generator, step)
        if can_end:
            tokens = torch.where(unfinished, tokens, pad)
        seqs[:, length + step] = tokens
        if eos is not None:
            unfinished &= ~torch.isin(tokens, eos)
        if stopper is not None:
            unfinished &= ~stopper.hits(seqs[:, length : length + step], tokens)
        yield tokens, unfinished
        kept = ended(unfinished, step) if can_end else None
        if kept is not None:
            return seqs[:, length : length + kept]
        if step + 1 < new:
            logits = decoder.next(tokens, step)
    return seqs[:, length:]


def _beam_search(lm, prompt: _Prompt, cfg: GenerationConfig, new: int, pad: int, generator, stopper) -> torch.Tensor:
    """Beam search (see :mod:`vlkit.lm.beam`): the best ``num_return_sequences`` per prompt."""
    prompt = prompt.repeat(cfg.num_beams)
    length = prompt.length
    decoder = _Decoder(lm, prompt, new)
    device = decoder.position.device
    seqs, start = _history(prompt, new, pad, device)
    search = BeamSearch(seqs, length, cfg, pad, generator)
    process = processors(cfg, prompt.pad_start(), device)
    eos = torch.tensor(cfg.eos_ids, device=device) if cfg.eos_ids else None

    def ends(generated: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        hit = torch.isin(tokens, eos) if eos is not None else torch.zeros_like(tokens, dtype=torch.bool)
        return hit | stopper.hits(generated, tokens) if stopper is not None else hit

    logits = decoder.prefill()
    for step in range(new):
        scores = torch.log_softmax(logits.float(), -1)
        for f in process:
            scores = f(search.history(start, step), scores, step)
        origin, go_on = search.step(scores, step, ends)
        if not go_on:
            break
        decoder.cache.reorder(origin)
        logits = decoder.next(search.last_tokens(step), step)
    return search.result(cfg.num_return_sequences)


def _setup(lm, input_ids, attention_mask, inputs_embeds, generation_config, tokenizer, overrides):
    cfg = resolve_config(lm, generation_config, **overrides)
    prompt = _prompt(lm, input_ids, attention_mask, inputs_embeds)
    new = _new_tokens(lm, cfg, prompt.length)
    if cfg.num_beams == 1:
        prompt = prompt.repeat(cfg.num_return_sequences)
    pad = _pad_id(cfg, prompt.batch)
    if tokenizer is None and cfg.stops:
        tokenizer = getattr(lm, "tokenizer", None)
    stopper = StopStrings(tokenizer, cfg.stops) if cfg.stops else None
    return cfg, prompt, new, pad, stopper


def _run(lm, input_ids, attention_mask, inputs_embeds, generation_config, generator, tokenizer, overrides):
    cfg, prompt, new, pad, stopper = _setup(
        lm, input_ids, attention_mask, inputs_embeds, generation_config, tokenizer, overrides
    )
    with torch.inference_mode():
        if cfg.num_beams > 1:
            return cfg, _beam_search(lm, prompt, cfg, new, pad, generator, stopper)
        steps = _search_steps(lm, prompt, cfg, new, pad, generator, stopper)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return cfg, done.value


def generate(
    lm, input_ids=None, attention_mask=None, inputs_embeds=None, *,
    generation_config: GenerationConfig | None = None, generator: torch.Generator | None = None, tokenizer=None,
    **overrides,
) -> torch.Tensor:  # fmt: skip
    """The new tokens ``[B * num_return_sequences, new]`` for a left-padded prompt batch."""
    return _run(lm, input_ids, attention_mask, inputs_embeds, generation_config, generator, tokenizer, overrides)[1]


def decode_new(tokenizer, ids: torch.Tensor, cfg: GenerationConfig) -> list[str]:
    """The text of each row of new tokens: cut at its first EOS id, special tokens skipped, the
    first stop string and what follows it trimmed."""
    eos, texts = set(cfg.eos_ids), []
    for row in ids.tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(trim_stop_strings(tokenizer.decode(row[:end], skip_special_tokens=True), cfg.stops))
    return texts


def generate_text(
    lm, tokenizer, input_ids=None, attention_mask=None, inputs_embeds=None, *,
    generation_config: GenerationConfig | None = None, generator: torch.Generator | None = None, **overrides,
) -> list[str]:  # fmt: skip
    """``generate``, decoded: one string per returned row, stop strings trimmed."""
    cfg, ids = _run(lm, input_ids, attention_mask, inputs_embeds, generation_config, generator, tokenizer, overrides)
    return decode_new(tokenizer, ids, cfg)


def stream(
    lm, tokenizer, input_ids=None, attention_mask=None, inputs_embeds=None, *,
    generation_config: GenerationConfig | None = None, generator: torch.Generator | None = None, **overrides,
) -> Iterator[str]:  # fmt: skip
    """Text pieces of one prompt's answer as they are generated (greedy or sampled; no beams).
    No piece splits a character; joined they equal ``generate_text``'s string. Bad options raise
    here, before the first piece is asked for."""
    cfg, prompt, new, pad, stopper = _setup(
        lm, input_ids, attention_mask, inputs_embeds, generation_config, tokenizer, overrides
    )
    if prompt.batch != 1 or cfg.num_beams != 1:
        raise VlkitError(
            f"stream(): streams one answer; got {prompt.batch} rows (batch x num_return_sequences) and "
            f"num_beams={cfg.num_beams}; use generate_text for batches and beam search"
        )
    steps = _search_steps(lm, prompt, cfg, new, pad, generator, stopper)
    return _pieces(steps, TextStream(tokenizer, cfg.stops), set(cfg.eos_ids))


def _pieces(steps, text: TextStream, eos: set[int]) -> Iterator[str]:
    """Drive the decoding steps (the model runs in inference mode, the caller's code between
    pieces does not) and turn each new token into the text it completes."""
    while True:
        with torch.inference_mode():
            item = next(steps, None)
        if item is None:
            break
        tokens, unfinished = item
        token = int(tokens[0])
        if token in eos:
            break
        piece = text.push(token)
        if piece:
            yield piece
        if not bool(unfinished[0]):
            break
    rest = text.finish()
    if rest:
        yield rest
