"""vlkit's caption tokenisation, applied before BLEU, CIDEr-D and ROUGE-L.

coco-caption runs the Stanford PTB tokenizer (Java) and then drops punctuation tokens.
vlkit does the same job in Python: lowercase, every character that is not a letter, digit
or in-word apostrophe becomes a space, then split on whitespace. "A Dog's bone, here." →
``["a", "dog's", "bone", "here"]``. The one deliberate difference from PTB: contractions
stay whole ("don't", not "do n't"). The scorers themselves match coco-caption exactly on
the same tokens; pass ``tokenize=False`` to score text you have tokenised yourself
(it is then split on whitespace, as coco-caption does).
"""

from __future__ import annotations

from collections import Counter

from vlkit.text.caption import tokenize_caption


def prepare(
    predictions: dict, references: dict, tokenize: bool = True, where: str = "predictions"
) -> tuple[list, list[list[str]], list[list[list[str]]]]:
    """Check the two dicts cover the same ids; return ids, hypothesis tokens, reference tokens.

    Order follows ``references`` (coco-caption iterates the ground truth's keys).
    """
    missing_refs = [k for k in predictions if k not in references]
    if missing_refs:
        raise KeyError(
            f"{where}: {len(missing_refs)} prediction id(s) have no references, e.g. {missing_refs[:3]!r}; "
            "expected every predicted id to appear in the references"
        )
    missing_preds = [k for k in references if k not in predictions]
    if missing_preds:
        raise KeyError(
            f"{where}: {len(missing_preds)} reference id(s) have no prediction, e.g. {missing_preds[:3]!r}; "
            "expected one prediction per id (drop those references or predict them)"
        )
    norm = tokenize_caption if tokenize else (lambda s: s)
    ids, hyps, refs = [], [], []
    for k, rs in references.items():
        p = predictions[k]
        if not isinstance(p, str):
            raise TypeError(f"{where}: prediction for id {k!r} is {type(p).__name__}; expected a string")
        if isinstance(rs, str) or not rs or not all(isinstance(r, str) for r in rs):
            raise ValueError(f"{where}: references for id {k!r} must be a non-empty list of strings, got {rs!r:.80}")
        ids.append(k)
        hyps.append(norm(p).split())
        refs.append([norm(r).split() for r in rs])
    return ids, hyps, refs


def ngram_counts_by_n(tokens: list[str], n: int = 4) -> list[Counter]:
    """Per length k = 1..n, the counts of each k-gram (tuples) in order of first occurrence."""
    return [Counter(zip(*(tokens[i:] for i in range(k)))) for k in range(1, n + 1)]


def ngram_counts(tokens: list[str], n: int = 4) -> dict[tuple[str, ...], int]:
    """Counts of every 1..n-gram, inserted by length then position (coco-caption's order)."""
    counts: dict[tuple[str, ...], int] = {}
    for c in ngram_counts_by_n(tokens, n):
        counts.update(c)
    return counts
