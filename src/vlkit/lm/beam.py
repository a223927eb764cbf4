"""Beam search as tensors: every prompt keeps ``num_beams`` running hypotheses and the
``num_beams`` best finished ones, scored as transformers scores them (sum of log-probabilities
divided by generated length ** ``length_penalty``), so both pick the same sequences.

Each step looks at the best ``keep = max(2, 1 + #EOS) * num_beams`` continuations, so enough of
them go on even when the best ones all end; only the best ``num_beams`` of those may enter the
finished set. ``early_stopping`` decides when a prompt is done: ``True`` as soon as it has
``num_beams`` finished hypotheses, ``False`` when the best running score divided by the current
length can no longer beat the worst finished one, ``"never"`` when it could not even at the
longest allowed length (for a positive ``length_penalty``)."""

from __future__ import annotations

from typing import Callable

import torch

from vlkit.lm.generation_config import GenerationConfig

NEG = -1.0e9  # the score of what may not be chosen; added, not assigned, as transformers does


class BeamSearch:
    """Running and finished hypotheses of ``batch`` prompts. ``seqs`` ``[batch * beams, total]``
    holds each prompt (repeated per beam) followed by room for the new tokens."""

    def __init__(self, seqs: torch.Tensor, prompt_len: int, cfg: GenerationConfig, pad: int, generator=None):
        self.beams = cfg.num_beams
        self.batch = seqs.shape[0] // self.beams
        self.prompt_len, self.new = prompt_len, seqs.shape[1] - prompt_len
        self.cfg, self.generator = cfg, generator
        device = seqs.device
        self.seqs = seqs.view(self.batch, self.beams, -1)
        self.scores = torch.zeros(self.batch, self.beams, device=device)
        self.scores[:, 1:] = NEG  # at first every beam is the same: let only one of them expand
        self.done = torch.full((self.batch, self.beams, self.new), pad, dtype=torch.long, device=device)
        self.done_scores = torch.full((self.batch, self.beams), NEG, device=device)
        self.done_lengths = torch.zeros(self.batch, self.beams, dtype=torch.long, device=device)
        self.is_done = torch.zeros(self.batch, self.beams, dtype=torch.bool, device=device)
        self.improvable = torch.ones(self.batch, 1, dtype=torch.bool, device=device)
        self.keep = max(2, 1 + len(cfg.eos_ids)) * self.beams
        self.top = torch.arange(self.keep, device=device) < self.beams
        self.offsets = torch.arange(self.batch, device=device)[:, None] * self.beams

    def history(self, start: int, step: int) -> torch.Tensor:
        """The running hypotheses' tokens ``[batch * beams, ...]`` from ``start`` up to this step."""
        return self.seqs.view(self.batch * self.beams, -1)[:, start : self.prompt_len + step]

    def last_tokens(self, step: int) -> torch.Tensor:
        return self.seqs[:, :, self.prompt_len + step].reshape(-1)

    def step(self, log_probs: torch.Tensor, step: int, ends: Callable) -> tuple[torch.Tensor, bool]:
        """Advance by one token given the processed ``log_probs`` ``[batch * beams, V]`` of the
        running beams; ``ends(generated [N, step], token [N])`` tells which continuations end.
        Returns, for each new running beam, the row it continues (to reorder the KV cache), and
        whether any prompt can still improve."""
        b, vocab, cur = self.batch, log_probs.shape[-1], self.prompt_len + step
        flat = (log_probs.view(b, self.beams, vocab) + self.scores[:, :, None]).view(b, -1)
        if self.cfg.do_sample:
            index = torch.multinomial(flat.softmax(-1), self.keep, generator=self.generator)
            top, order = flat.gather(1, index).sort(-1, descending=True)
            index = index.gather(1, order)
        else:
            top, index = flat.topk(self.keep)
        beam, token = index // vocab, index % vocab
        cand = torch.take_along_dim(self.seqs, beam[..., None], dim=1)
        cand[:, :, cur] = token
        origin = beam + self.offsets
        if step + 1 == self.new:  # the last token: every continuation ends
            hits = torch.ones_like(token, dtype=torch.bool)
        else:
            generated = cand[:, :, self.prompt_len : cur].reshape(b * self.keep, step)
            hits = ends(generated, token.view(-1)).view(b, self.keep)

        live = top + hits.to(torch.float32) * NEG
        pick = live.topk(self.beams).indices
        self.seqs = cand.gather(1, pick[..., None].expand(-1, -1, cand.shape[-1]))
        self.scores = live.gather(1, pick)
        self._finish(cand[:, :, self.prompt_len :], top, hits & self.top, step)
        self._update_improvable(step + 1)
        go_on = self.improvable.any() & ~(self.is_done.all() & (self.cfg.early_stopping is True)) & ~hits.all()
        return origin.gather(1, pick).view(-1), bool(go_on)

    def _finish(self, cand: torch.Tensor, top: torch.Tensor, ended: torch.Tensor, step: int) -> None:
        """Merge the continuations that just ended into the finished set, keeping the best."""
        score = top / ((step + 1) ** self.cfg.length_penalty)
        full = self.is_done.all(-1, keepdim=True) & (self.cfg.early_stopping is True)
        score += full.to(torch.float32) * NEG
        score += (~self.improvable).to(torch.float32) * NEG
        score += (~ended) * NEG
        scores = torch.cat((self.done_scores, score), 1)
        best = scores.topk(self.beams).indices
        lengths = torch.cat((self.done_lengths, torch.full_like(score, step + 1, dtype=torch.long)), 1)
        tokens = torch.cat((self.done, cand), 1)
        self.done = tokens.gather(1, best[..., None].expand(-1, -1, tokens.shape[-1]))
        self.done_scores = scores.gather(1, best)
        self.done_lengths = lengths.gather(1, best)
        self.is_done = torch.cat((self.is_done, ended), 1).gather(1, best)

    def _update_improvable(self, length: int) -> None:
        """A prompt stops improving once its best running beam, at the most favourable length
        ``early_stopping`` allows, scores no better than its worst finished hypothesis."""
        lp = self.cfg.length_penalty
        best_length = self.new if self.cfg.early_stopping == "never" and lp > 0.0 else length
        best_running = self.scores[:, :1] / (best_length**lp)
        worst = torch.where(self.is_done, self.done_scores.min(1, keepdim=True).values, NEG)
        self.improvable = self.improvable & (best_running > worst).any(-1, keepdim=True)

    def result(self, count: int) -> torch.Tensor:
        """The ``count`` best finished hypotheses of each prompt, ``[batch * count, longest]``."""
        tokens = self.done[:, :count].reshape(self.batch * count, self.new)
        return tokens[:, : int(self.done_lengths[:, :count].max())]
