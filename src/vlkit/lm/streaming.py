"""Token ids in, readable text pieces out, as they are generated.

A piece is released only once its characters are whole: a multi-byte character split over
byte-level tokens decodes to U+FFFD until its last byte arrives, so the text is held back while it
ends with one. A run of byte-fallback tokens (``<0xE2><0x82><0xAC>``) is decoded as one byte
string (all of it becomes U+FFFDs if any part is not UTF-8), so it is held back whole until a
token that is not a byte follows (a skipped special token between bytes does not end the run). Each step decodes
only the tokens since the last release and the ones before them (whose text is subtracted), so
a decoder that strips the first token's leading space strips it from both alike. Text that may
be the start of a stop string is held back too; the pieces joined equal the full decode with
the stop string trimmed. (Not so for a decoder that rewrites text already released, such as
transformers' clean-up of spaces before punctuation, which word-piece tokenizers may ask for.)"""

from __future__ import annotations

import re

from vlkit.lm.stopping import held_back, trim_stop_strings

INCOMPLETE = "\ufffd"
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TextStream:
    """Feed tokens with :meth:`push`, which returns the text that may be shown now (often "");
    :meth:`finish` returns the rest."""

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.ids: list[int] = []
        self.prefix = 0  # the window decoded each step starts here ...
        self.read = 0  # ... and its text up to here is already in self.text
        self.text = ""  # the whole text released by the decoder so far
        self.sent = 0  # characters of self.text already returned
        self._holds: dict[int, bool] = {}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _may_continue_bytes(self, token: int) -> bool:
        """Whether a run of byte-fallback tokens may go on after ``token``: it is one (``<0x41>``,
        by its name in the vocabulary), or it decodes to nothing (a skipped special token)."""
        if token not in self._holds:
            name = getattr(self.tokenizer, "id_to_token", None)
            if name is None:
                convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
                name = None if convert is None else (lambda i: convert([i])[0])
            is_byte = bool(name and BYTE_TOKEN.fullmatch(name(token) or ""))
            self._holds[token] = is_byte or self._decode([token]) == ""
        return self._holds[token]

    def _advance(self, final: bool) -> None:
        """Move whole characters from the token window into ``self.text``."""
        if not final and self._may_continue_bytes(self.ids[-1]):
            return
        known = self._decode(self.ids[self.prefix : self.read])
        window = self._decode(self.ids[self.prefix :])
        ready = final or (window.startswith(known) and not window.endswith(INCOMPLETE))
        if ready and len(window) > len(known):
            self.text += window[len(known) :]
            self.prefix, self.read = self.read, len(self.ids)

    def _release(self, final: bool) -> str:
        shown = trim_stop_strings(self.text, self.stops)
        if not final and len(shown) == len(self.text):
            shown = shown[: len(shown) - held_back(shown, self.stops)]
        piece = shown[self.sent :]
        self.sent = max(self.sent, len(shown))
        return piece

    def push(self, token: int) -> str:
        self.ids.append(token)
        self._advance(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest: the full decode past what was released (the window's, should a decoder have
        rewritten released text, as a clean-up of spaces before punctuation can)."""
        full = self._decode(self.ids)
        if full.startswith(self.text):
            self.text = full
        else:
            self._advance(final=True)
        return self._release(final=True)
