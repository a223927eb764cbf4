"""Streaming a JSON array out of a file of any size: the items of the top-level array, or of
one key's array, decoded one at a time from chunks, with errors naming the file, the item
and the character offset; optionally each item's byte span, to read it again on its own."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator, TextIO

from vlkit.data.formats.common import FormatError, json_problem, not_utf8

CHUNK_SIZE = 1 << 18  # characters per read: peak memory is a few times this plus one item
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_MARGIN = 16  # characters past a decoded value that prove it was not cut short by the chunk end ("1." of "1.5")


def _kind(c: str) -> str:
    """What a JSON value starting with ``c`` is, for error messages."""
    kinds = {"{": "a JSON object", "[": "a JSON array", '"': "a JSON string", "t": "a JSON boolean", "f": "a JSON boolean", "n": "JSON null"}
    return kinds.get(c, "a JSON number" if c in "-0123456789" else f"not JSON ({c!r})")


class _JSONStream:
    """A JSON text read in chunks and decoded one value at a time, so memory holds one chunk
    and one value, never the whole file."""

    def __init__(self, f: TextIO, path: Path, expected: str, chunk_size: int):
        self.f, self.path, self.expected, self.chunk_size = f, path, expected, chunk_size
        self.buf, self.pos, self.base, self.eof = "", 0, 0, False
        self.decoder = json.JSONDecoder()
        self._mark, self._mark_bytes = 0, 0  # a position in buf and its byte offset in the file

    def offset(self) -> int:
        """The byte offset of the cursor in the file, counted on from the last one asked for
        (the file is read with ``newline=""``, so each character is its UTF-8 bytes)."""
        self._mark_bytes += len(self.buf[self._mark : self.pos].encode("utf-8"))
        self._mark = self.pos
        return self._mark_bytes

    def skip_bom(self) -> None:
        """Step over a byte-order mark that starts the file (Windows tools write one); its bytes are
        still counted in the offsets."""
        if self.fill(self.chunk_size) and self.buf.startswith("\ufeff"):
            self.pos += 1

    def fail(self, where: str, what: str) -> FormatError:
        """The error for text that is not the JSON expected, naming the file and record."""
        return FormatError(f"{where}: malformed JSON ({what}); expected {self.expected}")

    def fill(self, size: int) -> bool:
        """Append up to ``size`` more characters to the unread text; False at the end of the file."""
        if self.eof:
            return False
        self._mark_bytes, self._mark = self.offset(), 0
        self.base, self.buf, self.pos = self.base + self.pos, self.buf[self.pos :], 0  # free what was read first
        try:
            chunk = self.f.read(size)
        except UnicodeDecodeError:
            raise not_utf8(self.path, self.expected) from None
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def peek(self) -> str:
        """The next non-whitespace character, not consumed ("" at the end of the file)."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill(self.chunk_size):
                return ""

    def take(self, chars: str, where: str) -> str:
        """Consume the next non-whitespace character, which must be one of ``chars``."""
        c = self.peek()
        if not c or c not in chars:
            found = "the file ends" if not c else f"found {c!r} at character {self.base + self.pos}"
            raise self.fail(where, f"expecting {' or '.join(map(repr, chars))}; {found}")
        self.pos += 1
        return c

    def enter(self, bracket: str, what: str) -> None:
        """Consume the ``[`` or ``{`` that opens ``what``, or say what is there instead."""
        c = self.peek()
        if not c:
            raise self.fail(str(self.path), f"the file ends before {what}")
        if c != bracket:
            raise FormatError(f"{self.path}: {what} is {_kind(c)}; expected {self.expected}")
        self.pos += 1

    def value(self, where: str):
        """Decode the value at the cursor, reading on until it is complete."""
        self.peek()
        size = self.chunk_size
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                cut = err.pos + _MARGIN >= len(self.buf) or err.msg.startswith("Unterminated string")
                if self.eof or not cut:
                    raise self.fail(where, json_problem(err, f"character {self.base + err.pos}")) from None
            else:
                if self.eof or end + _MARGIN < len(self.buf):
                    self.pos = end
                    return obj
            self.fill(size)
            size = max(size, len(self.buf) - self.pos)  # the text held at least doubles per retry: linear time

    def items(self, where: Callable[[int], str], spans: bool = False) -> Iterator:
        """The items of the array whose ``[`` was just consumed, decoded one at a time; with
        ``spans``, ``(item, first byte, end byte)``."""
        if self.peek() == "]":
            self.pos += 1
            return
        i = 0
        while True:
            if not self.peek():
                raise self.fail(str(self.path), f"the file ends inside the array, after {i} items")
            start = self.offset() if spans else 0
            item = self.value(where(i))
            yield (item, start, self.offset()) if spans else item
            if self.take(",]", where(i)) == "]":
                return
            i += 1

    def members(self, where: str) -> Iterator[str]:
        """The keys of the object whose ``{`` was just consumed; the caller consumes each value."""
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            if self.peek() != '"':
                raise self.fail(where, f"expecting a key string; found {_kind(self.peek())} at character {self.base + self.pos}")
            key = self.value(where)
            self.take(":", f"{where}, key {key!r}")
            yield key
            if self.take(",}", f"{where}, key {key!r}") == "}":
                return

    def skip(self, where: str) -> None:
        """Consume one value; arrays and objects piece by piece, so a huge one is never held."""
        c = self.peek()
        if c == "[":
            self.pos += 1
            for _ in self.items(lambda i: f"{where}[{i}]"):
                pass
        elif c == "{":
            self.pos += 1
            for key in self.members(where):
                self.skip(f"{where}.{key}")
        else:
            self.value(where)


def iter_json_array(path: str | Path, key: str | None = None, expected: str = "a JSON array", chunk_size: int = CHUNK_SIZE) -> Iterator:
    """The items of the top-level array, or of the array under the top-level object's ``key``,
    decoded one at a time from chunks of the file: a file of any size streams in the memory
    of one chunk and one item. Other keys' values are skipped piece by piece. Errors are
    :class:`FormatError` naming the file, the item (``key[i]``) and the character offset."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected {expected}")
    try:
        yield from _iter_json_array(path, key, expected, chunk_size)
    except RecursionError:
        raise FormatError(f"{path}: JSON nested too deeply to read; expected {expected}") from None


def iter_json_array_spans(path: str | Path, expected: str = "a JSON array", chunk_size: int = CHUNK_SIZE) -> Iterator:
    """``(item, start, end)`` for each item of the top-level array, as :func:`iter_json_array`
    streams them, with the item's byte span in the file (:func:`read_json_span` reads it again)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected {expected}")
    try:
        yield from _iter_json_array(path, None, expected, chunk_size, spans=True)
    except RecursionError:
        raise FormatError(f"{path}: JSON nested too deeply to read; expected {expected}") from None


def read_json_span(path: str | Path, start: int, end: int, where: str, expected: str = "a JSON value"):
    """The JSON value at bytes ``start:end`` of ``path`` (a span from :func:`iter_json_array_spans`)."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise FormatError(f"{where}: cannot be read again at bytes {start}-{end} ({err}); has the file changed? "
                          f"expected {expected}") from None


def _iter_json_array(path: Path, key: str | None, expected: str, chunk_size: int, spans: bool = False) -> Iterator:
    """:func:`iter_json_array` for an existing file (JSON nested past Python's recursion limit raises)."""
    with open(path, encoding="utf-8", newline="") as f:
        s = _JSONStream(f, path, expected, chunk_size)
        s.skip_bom()
        if key is None:
            s.enter("[", "the top level")
            yield from s.items(lambda i: f"{path}, item {i}", spans)
            if s.peek():
                raise s.fail(str(path), f"extra data after the top-level array at character {s.base + s.pos}")
            return
        s.enter("{", "the top level")
        for k in s.members(str(path)):
            if k == key:
                s.enter("[", repr(key))
                yield from s.items(lambda i: f"{path}, {key}[{i}]")
                return
            s.skip(f"{path}, {k}")
        raise FormatError(f"{path}: no key {key!r} in the top-level object; expected {expected}")
