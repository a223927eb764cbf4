"""Caption tokenisation for the caption metrics and COCO-style exports: lowercased, punctuation
removed (coco-caption's PTB tokenizer then punctuation filter, done in Python; contractions
stay whole). See :mod:`vlkit.eval.metrics.text`."""

from __future__ import annotations

import re

_NOT_WORD = re.compile(r"[^\w']+|_")
_EDGE_APOSTROPHES = re.compile(r"(?<!\w)'+|'+(?!\w)")


def tokenize_caption(text: str) -> str:
    """Lowercased, punctuation removed, tokens joined by single spaces."""
    text = _NOT_WORD.sub(" ", text.lower())
    text = _EDGE_APOSTROPHES.sub(" ", text)
    return " ".join(text.split())
