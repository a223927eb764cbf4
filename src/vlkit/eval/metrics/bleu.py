"""BLEU-1..4 exactly as coco-caption's ``Bleu(4)`` computes it.

Corpus level: clipped n-gram matches and candidate n-gram counts are summed over all
images; the reference length of each image is the reference length closest to the
candidate's (ties to the shorter); the brevity penalty ``exp(1 - r/c)`` applies when the
summed candidate length is shorter. coco-caption's smoothing constants (1e-15 added to
matches, 1e-9 to counts and lengths) are kept so the numbers agree to the last digits.
"""

from __future__ import annotations

import math

from vlkit.eval.metrics.text import ngram_counts, prepare

_TINY = 1e-15
_SMALL = 1e-9


def _stats(hyp: list[str], refs: list[list[str]], n: int) -> tuple[int, int, list[int], list[int]]:
    maxref: dict[tuple[str, ...], int] = {}
    for r in refs:
        for g, c in ngram_counts(r, n).items():
            if c > maxref.get(g, 0):
                maxref[g] = c
    correct = [0] * n
    for g, c in ngram_counts(hyp, n).items():
        m = maxref.get(g, 0)
        if m:
            correct[len(g) - 1] += min(m, c)
    length = len(hyp)
    reflen = min((abs(len(r) - length), len(r)) for r in refs)[1]
    guess = [max(0, length - k + 1) for k in range(1, n + 1)]
    return length, reflen, guess, correct


def _combine(length: float, reflen: float, guess: list[int], correct: list[int], n: int) -> list[float]:
    out, prod = [], 1.0
    for k in range(n):
        prod *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
        out.append(prod ** (1.0 / (k + 1)))
    ratio = (length + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


def bleu_scores(predictions: dict, references: dict, n: int = 4, tokenize: bool = True) -> tuple[list[float], dict]:
    """``(corpus BLEU-1..n, {id: sentence BLEU-1..n})``; sentence BLEU as coco-caption reports it."""
    ids, hyps, refs = prepare(predictions, references, tokenize, "bleu")
    tot_len = tot_ref = 0
    tot_guess, tot_correct = [0] * n, [0] * n
    per = {}
    for k, h, rs in zip(ids, hyps, refs):
        length, reflen, guess, correct = _stats(h, rs, n)
        tot_len += length
        tot_ref += reflen
        for j in range(n):
            tot_guess[j] += guess[j]
            tot_correct[j] += correct[j]
        per[k] = _combine(length, reflen, guess, correct, n)
    return _combine(tot_len, tot_ref, tot_guess, tot_correct, n), per


def bleu(predictions: dict, references: dict, n: int = 4, tokenize: bool = True) -> list[float]:
    """Corpus BLEU-1..n of ``{id: caption}`` against ``{id: [reference, ...]}``."""
    return bleu_scores(predictions, references, n, tokenize)[0]
