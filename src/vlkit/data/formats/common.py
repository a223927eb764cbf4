"""Shared pieces of the format readers: JSON and JSON-lines reading with errors that name
the file and record, duplicate-id checks, and counted skips (streamed JSON arrays are in
:mod:`vlkit.data.formats.json_stream`)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlkit.data.images import BadSample
from vlkit.errors import VlkitError


class FormatError(VlkitError):
    """A record that does not follow its format; the message names the file and record and
    says what was expected."""


def read_json(path: str | Path, expected: str):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected {expected}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: malformed JSON ({err.msg} at line {err.lineno}, column {err.colno}); expected {expected}") from None


def write_json(path: str | Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    return path


def iter_jsonl(path: str | Path, expected: str = "one JSON object per line"):
    """``(line_number, record)`` for each non-blank line, streaming."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected {expected}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise FormatError(f"{path}, line {n}: malformed JSON ({err.msg}); expected {expected}") from None
            if not isinstance(rec, dict):
                raise FormatError(f"{path}, line {n}: a {type(rec).__name__}; expected {expected}")
            yield n, rec


def require(rec: dict, keys: dict[str, type | tuple], where: str) -> None:
    """Raise :class:`FormatError` naming ``where`` unless ``rec`` has each key with its type."""
    if not isinstance(rec, dict):
        raise FormatError(f"{where}: a {type(rec).__name__}; expected an object with keys {sorted(keys)}")
    for k, tp in keys.items():
        if k not in rec:
            raise FormatError(f"{where}: missing key {k!r}; expected keys {sorted(keys)}")
        if not isinstance(rec[k], tp):
            want = tp.__name__ if isinstance(tp, type) else " or ".join(t.__name__ for t in tp)
            raise FormatError(f"{where}: {k!r} is {type(rec[k]).__name__} ({rec[k]!r:.60}); expected {want}")


def check_unique(ids, what: str, where: str) -> None:
    dup = [k for k, c in Counter(ids).items() if c > 1]
    if dup:
        raise FormatError(f"{where}: duplicate {what} {dup[:5]!r} ({len(dup)} in all); expected each {what} once")


@dataclass
class Skips:
    """Counted skips, by reason, with a few examples; goes into ``results.json``."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}


def check_images(paths, skips: Skips | None = None) -> list[bool]:
    """Whether each image file exists; missing ones raise :class:`BadSample` naming the file,
    or are counted in ``skips`` when given."""
    ok = []
    for p in paths:
        if Path(p).is_file():
            ok.append(True)
            continue
        if skips is None:
            raise BadSample(str(p), "image file not found")
        skips.add("missing image", str(p))
        ok.append(False)
    return ok
