"""Stop strings: matched on decoded text (so any tokenization of the string stops generation, and
byte-fallback or multi-byte pieces count once whole) and cut from the text a caller sees."""

from __future__ import annotations

import torch

from vlkit.errors import VlkitError


def trim_stop_strings(text: str, stops: list[str]) -> str:
    """``text`` up to the first stop string (the stop string and what follows it removed)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could still grow into a stop string (the longest
    suffix that is a prefix of one), which a stream must not show yet."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class StopStrings:
    """Tells which rows a new token ends with a stop string: the stop string occurs more often in
    the decoded tail of the generated tokens with the new token than without it. The tail is long
    enough to hold the longest stop string even spelled one byte per token."""

    def __init__(self, tokenizer, stops: list[str]):
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise VlkitError(
                f"stop_strings={stops!r} need a tokenizer with decode(ids) to match on text; pass tokenizer="
            )
        self.tokenizer = tokenizer
        self.stops = stops
        self.window = 4 * max(len(s.encode()) for s in stops) + 4

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def hit(self, generated: list[int], new: int) -> bool:
        """Whether appending ``new`` to ``generated`` completes a stop string."""
        tail = generated[-self.window :]
        before, after = self._decode(tail), self._decode(tail + [new])
        return any(after.count(s) > before.count(s) for s in self.stops)

    def hits(self, generated: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``hit`` for every row: ``generated`` ``[N, T]``, ``new`` ``[N]`` -> bool ``[N]``."""
        rows = generated[:, -self.window :].tolist()
        flags = [self.hit(row, tok) for row, tok in zip(rows, new.tolist())]
        return torch.tensor(flags, dtype=torch.bool, device=new.device)
