"""Token ids in, readable text pieces out, as they are generated.

A piece is released only once its characters are whole: a multi-byte character split over
byte-level tokens, or a run of byte-fallback tokens (``<0xE2><0x82><0xAC>``), decodes to U+FFFD
until its last byte arrives, so the text is held back while it ends with one. Each step decodes
only the tokens since the last release and the ones before them (whose text is subtracted), so
a decoder that strips the first token's leading space strips it from both alike. Text that may
be the start of a stop string is held back too; the pieces joined equal the full decode with
the stop string trimmed."""

from __future__ import annotations

from vlkit.lm.stopping import held_back, trim_stop_strings

INCOMPLETE = "\ufffd"


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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        """Move whole characters from the token window into ``self.text``."""
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
        self._advance(final=True)
        return self._release(final=True)
