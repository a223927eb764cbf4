"""Shared pieces of the format readers: JSON and JSON-lines reading with errors that name
the file and record, record type checks, image paths kept inside the dataset folder,
duplicate-id and empty-dataset checks; bad records go through :mod:`vlkit.data.skips`
(streamed JSON arrays are in :mod:`vlkit.data.formats.json_stream`)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

from vlkit.data.images import BadSample
from vlkit.data.skips import Skips  # the readers' bad-record rule (also imported from here)
from vlkit.errors import VlkitError


class FormatError(VlkitError):
    """A file that does not follow its format; the message names the file (and record) and
    says what was expected."""


class BadRecord(BadSample, FormatError):
    """One record that does not follow its format: a :class:`FormatError` that the bad-record
    rule may skip like any other :class:`BadSample` (``where``: the file, ``record``: which)."""


def not_utf8(path: Path, expected: str) -> FormatError:
    """The error for a file that is not UTF-8, naming the line and column of the first bad byte."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return FormatError(f"{path}, line {n}, column {err.start + 1}: not UTF-8 (byte {raw[err.start]:#04x}); expected {expected} in UTF-8")
    return FormatError(f"{path}: not UTF-8; expected {expected} in UTF-8")


def read_text(path: str | Path, expected: str) -> str:
    """A whole UTF-8 text file; a missing file or another encoding is named with what was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected {expected}")
    try:
        return path.read_bytes().decode("utf-8-sig")  # a byte-order mark, as Windows tools write, is dropped
    except UnicodeDecodeError:
        raise not_utf8(path, expected) from None


def json_problem(err: json.JSONDecodeError, where: str) -> str:
    """What ``err`` says, then ``where`` ("column 14"): some of json's messages end in a dangling
    "at" ("Invalid control character at"), which ``where`` completes."""
    return f"{err.msg.removesuffix(' at')} at {where}"


def read_json(path: str | Path, expected: str):
    path = Path(path)
    text = read_text(path, expected)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: malformed JSON ({json_problem(err, f'line {err.lineno}, column {err.colno}')}); expected {expected}") from None
    except RecursionError:
        raise FormatError(f"{path}: JSON nested too deeply to read; expected {expected}") from None


def write_json(path: str | Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    return path


def iter_jsonl(path: str | Path, expected: str = "one JSON object per line", skips: Skips | None = None):
    """``(line_number, record)`` for each non-blank line, streaming. A line that is not a JSON
    object is a bad record (stops, or is skipped under ``skips``); text that is not UTF-8 stops."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected {expected}")
    skips = skips if skips is not None else Skips()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark before line 1 is dropped
            except UnicodeDecodeError:
                raise not_utf8(path, expected) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                problem = f"malformed JSON ({json_problem(err, f'column {err.colno}')}); expected {expected}"
                skips.reject(BadRecord(str(path), problem, f"line {n}"), "bad record")
                continue
            except RecursionError:
                skips.reject(BadRecord(str(path), f"JSON nested too deeply; expected {expected}", f"line {n}"), "bad record")
                continue
            if not isinstance(rec, dict):
                skips.reject(BadRecord(str(path), f"a JSON {_json_type(rec)}; expected {expected}", f"line {n}"), "bad record")
                continue
            yield n, rec


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _json_type(value) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def has_type(value, tp: type | tuple) -> bool:
    """``isinstance`` for JSON values, where a boolean is not a number and a number is finite."""
    types = tp if isinstance(tp, tuple) else (tp,)
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, types)


def type_names(tp: type | tuple) -> str:
    return " or ".join(_JSON_NAMES.get(t, t.__name__) for t in (tp if isinstance(tp, tuple) else (tp,)))


def require(rec, keys: dict[str, type | tuple], source, record: str) -> None:
    """Raise :class:`BadRecord` naming ``source``, ``record`` and the key unless ``rec`` is an
    object with each key of its type (optional keys are checked with :func:`optional`)."""
    if not isinstance(rec, dict):
        raise BadRecord(str(source), f"a JSON {_json_type(rec)}; expected an object with keys {sorted(keys)}", record)
    for k, tp in keys.items():
        if k not in rec:
            raise BadRecord(str(source), f"missing key {k!r}; expected keys {sorted(keys)}", record)
        check_type(rec[k], tp, source, record, repr(k))


def optional(rec: dict, key: str, tp: type | tuple, default, source, record: str):
    """``rec[key]`` checked against ``tp``, or ``default`` when the key is absent."""
    if key not in rec:
        return default
    check_type(rec[key], tp, source, record, repr(key))
    return rec[key]


def check_type(value, tp: type | tuple, source, record: str, what: str) -> None:
    if not has_type(value, tp):
        raise BadRecord(str(source), f"{what} is a JSON {_json_type(value)} ({value!r:.60}); expected {type_names(tp)}", record)


def check_unique(ids, what: str, where: str) -> None:
    """Each id once, compared as the text it becomes in results (``5`` and ``"5"`` are one id)."""
    dup = [k for k, c in Counter(str(i) for i in ids).items() if c > 1]
    if dup:
        raise FormatError(f"{where}: duplicate {what} {dup[:5]!r} ({len(dup)} in all); expected each {what} once")


def image_path(root: Path, rel, source, record: str, allow_outside: bool = False) -> Path:
    """``root / rel`` for an image path read from a record. An absolute path, or one that
    climbs out of ``root`` with ``..``, is a :class:`BadRecord` unless ``allow_outside``
    (``allow_outside_paths`` on the readers): a dataset reads only its own folder."""
    if not isinstance(rel, str) or not rel.strip() or "\0" in rel:
        raise BadRecord(str(source), f"image path {rel!r:.80}; expected a file path relative to {root}", record)
    if not allow_outside:
        normal = os.path.normpath(rel)
        if os.path.isabs(rel) or normal == ".." or normal.startswith(".." + os.sep):
            raise BadRecord(str(source), f"image path {rel!r:.200} is outside the dataset folder {root}; expected a path "
                            "inside it (allow_outside_paths=true reads it anyway)", record)  # fmt: skip
    return Path(root) / rel


def no_records(source, expected: str, skips: Skips | None = None) -> FormatError:
    """The error for a dataset with nothing to read: empty, or every record bad and skipped."""
    if skips is not None and skips.total:
        return FormatError(f"{source}: no usable records; all {skips.total} were bad and skipped "
                           f"(first: {skips.items[0] if skips.items else '?'}); expected {expected}")  # fmt: skip
    return FormatError(f"{source}: no records; expected {expected}")
