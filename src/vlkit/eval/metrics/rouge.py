"""ROUGE-L exactly as coco-caption's ``Rouge`` computes it: per image, the LCS-based
precision and recall are each maximised over the references, combined as an F-measure
with β = 1.2, then averaged over images.

The LCS length uses the bit-parallel algorithm (Hyyrö 2004): one big-integer add per
token instead of a table, so long captions cost little.
"""

from __future__ import annotations

from vlkit.eval.metrics.text import prepare

BETA = 1.2


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) > len(b):
        a, b = b, a
    if not a:
        return 0
    masks: dict[str, int] = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l_sentence(hyp: list[str], refs: list[list[str]], beta: float = BETA) -> float:
    """coco-caption splits on single spaces, so an empty caption is one empty token (and
    matches an empty reference); kept for equality."""
    hyp = hyp or [""]
    prec, rec = [], []
    for r in refs:
        r = r or [""]
        lcs = lcs_length(r, hyp)
        prec.append(lcs / float(len(hyp)))
        rec.append(lcs / float(len(r)))
    p, r = max(prec), max(rec)
    if p == 0 or r == 0:
        return 0.0
    return ((1 + beta**2) * p * r) / float(r + beta**2 * p)


def rouge_l_scores(predictions: dict, references: dict, tokenize: bool = True) -> tuple[float, dict]:
    """``(mean ROUGE-L, {id: ROUGE-L})``."""
    import numpy as np

    ids, hyps, refs = prepare(predictions, references, tokenize, "rouge_l")
    per = {k: rouge_l_sentence(h, rs) for k, h, rs in zip(ids, hyps, refs)}
    return (float(np.mean(list(per.values()))) if per else 0.0), per


def rouge_l(predictions: dict, references: dict, tokenize: bool = True) -> float:
    return rouge_l_scores(predictions, references, tokenize)[0]
