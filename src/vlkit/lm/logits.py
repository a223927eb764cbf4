"""Next-token score processors: penalties and bans that shape the scores of every search, then the
sampling filters (temperature, top-k, top-p, min-p). Each is a plain function of the scores
``[N, V]`` (and the token history ``[N, T]`` where it needs one), computed as transformers'
processors compute it, so the same config gives the same distribution."""

from __future__ import annotations

from typing import Callable

import torch

from vlkit.lm.generation_config import GenerationConfig

# (history [N, T], scores [N, V], new tokens so far) -> processed scores
Processor = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float, start=None) -> torch.Tensor:
    """Make every token already in ``history`` less likely: positive scores divided by ``penalty``,
    negative ones multiplied. ``start`` ``[N]`` skips each row's left padding."""
    vocab = scores.shape[-1]
    if start is not None:
        before = torch.arange(history.shape[1], device=history.device)[None, :] < start[:, None]
        history = history.masked_fill(before, vocab)
    seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(1, history.clamp(max=vocab), True)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, :vocab], penalised, scores)


def ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid the tokens that would repeat an ``n``-gram already in ``history``: every earlier
    window whose first ``n-1`` tokens equal the last ``n-1`` bans its own last token."""
    length = history.shape[1]
    if length < n:
        return scores
    vocab = scores.shape[-1]
    suffix = history[:, length + 1 - n :]
    windows = history.unfold(1, n, 1)
    matches = (windows[..., :-1] == suffix[:, None, :]).all(-1)
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], float("-inf"))


def ban_tokens(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Forbid ``tokens`` (``min_new_tokens`` forbids EOS until enough tokens are out)."""
    return scores.index_fill(-1, tokens, float("-inf"))


def temperature(scores: torch.Tensor, t: float) -> torch.Tensor:
    return scores / t


def top_k(scores: torch.Tensor, k: int, keep: int = 1) -> torch.Tensor:
    """Keep the ``max(k, keep)`` best tokens (ties with the last one included)."""
    k = min(max(k, keep), scores.shape[-1])
    threshold = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < threshold, float("-inf"))


def top_p(scores: torch.Tensor, p: float, keep: int = 1) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probability reaches ``p`` (at least ``keep``)."""
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(-1).cumsum(-1)
    drop = cumulative <= 1 - p
    drop[..., -keep:] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def min_p(scores: torch.Tensor, p: float, keep: int = 1) -> torch.Tensor:
    """Keep the tokens at least ``p`` times as likely as the best one (at least ``keep``)."""
    probs = scores.softmax(-1)
    drop = probs < p * probs.amax(-1, keepdim=True)
    drop.scatter_(-1, torch.topk(probs, min(keep, probs.shape[-1])).indices, False)
    return scores.masked_fill(drop, float("-inf"))


def processors(cfg: GenerationConfig, pad_start: torch.Tensor | None, device: torch.device) -> list[Processor]:
    """The processors ``cfg`` asks for, in transformers' order: repetition penalty, n-gram ban,
    EOS ban under ``min_new_tokens``, then (sampling only) temperature, top-k, top-p, min-p.
    ``pad_start`` ``[N]`` is where each row's real prompt begins in the history."""
    out: list[Processor] = []
    if cfg.repetition_penalty != 1.0:
        penalty = cfg.repetition_penalty
        out.append(lambda history, s, step: repetition_penalty(s, history, penalty, pad_start))
    if cfg.no_repeat_ngram_size > 0:
        n = cfg.no_repeat_ngram_size
        out.append(lambda history, s, step: ban_repeated_ngrams(s, history, n))
    if cfg.min_new_tokens > 0 and cfg.eos_ids:
        eos, least = torch.tensor(cfg.eos_ids, device=device), cfg.min_new_tokens
        out.append(lambda history, s, step: ban_tokens(s, eos) if step < least else s)
    if cfg.do_sample:
        # beams keep one token more than there are EOS ids, so a live continuation always remains
        keep = max(2, len(cfg.eos_ids) + 1) if cfg.num_beams > 1 else 1
        if cfg.temperature != 1.0:
            t = cfg.temperature
            out.append(lambda history, s, step: temperature(s, t))
        if cfg.top_k != 0:
            k = cfg.top_k
            out.append(lambda history, s, step: top_k(s, k, keep))
        if cfg.top_p < 1.0:
            p = cfg.top_p
            out.append(lambda history, s, step: top_p(s, p, keep))
        if cfg.min_p is not None:
            m = cfg.min_p
            out.append(lambda history, s, step: min_p(s, m, keep))
    return out
