"""LLaVA conversation JSON: instruction-tuning data.

``[{"id": "...", "image": "relative/path.png", "conversations": [{"from": "human",
"value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}]``. Turns
alternate human/gpt starting with human. With one image (a path) the ``<image>`` placeholder
appears exactly once; with ``"image": [paths]`` there is one placeholder per image, anywhere in
the human turns, in the order of the list; without an image there is none. ``"images"`` is taken
for ``"image"`` (as some multi-image sets name it). A blank gpt answer is a bad record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from vlkit.data.formats.common import BadRecord, Skips, check_unique, image_path, no_records, require, write_json
from vlkit.data.formats.json_stream import iter_json_array_spans, read_json_span

IMAGE_TOKEN = "<image>"


@dataclass
class Conversation:
    """``turns``: (human, gpt) pairs with the placeholders removed; ``images``: every image, in
    placeholder order (``image`` is the first); ``messages``: the turns as ``{"role", "content"}``
    with the placeholders where they are (by default all before the first question)."""

    id: str
    image: Path | None
    turns: list[tuple[str, str]]
    images: list[Path] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if not self.images and self.image is not None:
            self.images = [Path(self.image)]
        if not self.messages:
            self.messages = []
            for k, (q, a) in enumerate(self.turns):
                placeholders = f"{IMAGE_TOKEN}\n" * len(self.images) if k == 0 else ""
                self.messages += [{"role": "user", "content": placeholders + q}, {"role": "assistant", "content": a}]

    def to_json(self, image_root: Path | None = None) -> dict:
        speaker = {"user": "human", "assistant": "gpt"}
        rec = {"id": self.id, "conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in self.messages]}
        paths = [_relative(Path(img), image_root) for img in self.images]
        if paths:
            rec["image"] = paths[0] if len(paths) == 1 else paths
        return rec


def _relative(img: Path, image_root: Path | None) -> str:
    """``img`` relative to ``image_root`` where it lies under it (either may be given relative to the
    working folder), else as given."""
    if image_root is not None:
        try:
            return Path(os.path.abspath(img)).relative_to(os.path.abspath(image_root)).as_posix()
        except ValueError:
            pass
    return img.as_posix()


def write_llava(path: str | Path, conversations: Iterable[Conversation], image_root: str | Path | None = None) -> Path:
    root = Path(image_root) if image_root is not None else None
    return write_json(path, [c.to_json(root) for c in conversations])


LLAVA = "a LLaVA conversation JSON (a list of records)"


def iter_llava(path: str | Path, image_root: str | Path | None = None, skips: Skips | None = None,
               allow_outside_paths: bool = False) -> Iterator[Conversation]:  # fmt: skip
    """Conversations of a LLaVA JSON, streamed (LLaVA-665k is ~1 GB). A bad record raises
    :class:`BadRecord` naming the file and record, or is skipped under ``skips``; image paths
    outside ``image_root`` are refused unless ``allow_outside_paths``. Duplicate ids, and a
    file with no conversation, are reported once the file is read."""
    for conv, *_ in index_llava(path, image_root, skips, allow_outside_paths):
        yield conv


def read_llava(path: str | Path, image_root: str | Path | None = None, skips: Skips | None = None,
               allow_outside_paths: bool = False) -> list[Conversation]:  # fmt: skip
    """All conversations of :func:`iter_llava` as a list."""
    return list(iter_llava(path, image_root, skips, allow_outside_paths))


def index_llava(path: str | Path, image_root: str | Path | None = None, skips: Skips | None = None,
                allow_outside_paths: bool = False) -> Iterator[tuple[Conversation, int, int, int]]:  # fmt: skip
    """``(conversation, record number, start byte, end byte)`` for each good record, streamed as
    :func:`iter_llava` does, so a dataset can keep only the spans and read a record again with
    :func:`llava_record`."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    skips = skips if skips is not None else Skips()
    ids = []
    for i, (rec, start, end) in enumerate(iter_json_array_spans(path, LLAVA)):
        try:
            conv = _conversation(rec, path, i, root, allow_outside_paths)
        except BadRecord as err:
            skips.reject(err, "bad record")
            continue
        ids.append(conv.id)
        yield conv, i, start, end
    check_unique(ids, "id", str(path))
    if not ids:
        raise no_records(path, LLAVA, skips)


def llava_record(path: str | Path, i: int, start: int, end: int, image_root: str | Path | None = None,
                 allow_outside_paths: bool = False) -> Conversation:  # fmt: skip
    """Record ``i`` of ``path`` read again from its byte span (see :func:`index_llava`)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    rec = read_json_span(path, start, end, f"{path}, record {i}", LLAVA)
    return _conversation(rec, path, i, root, allow_outside_paths)


def _conversation(rec, path: Path, i: int, root: Path, allow_outside: bool) -> Conversation:
    """One record checked: human/gpt turns, one image placeholder in the human turns per image."""
    require(rec, {"id": (str, int), "conversations": list}, path, f"record {i}")
    record = f"record {i} (id {rec['id']!r})"
    conv = rec["conversations"]
    if not conv or len(conv) % 2:
        raise BadRecord(str(path), f"{len(conv)} turns; expected human/gpt pairs", record)
    turns, messages, tokens = [], [], 0
    for k in range(0, len(conv), 2):
        h, g = conv[k], conv[k + 1]
        for t, role in ((h, "human"), (g, "gpt")):
            if not isinstance(t, dict) or t.get("from") != role or not isinstance(t.get("value"), str):
                raise BadRecord(str(path), f"turn {k + (role == 'gpt')} is {t!r:.60}; expected {{'from': '{role}', 'value': str}}", record)
        if IMAGE_TOKEN in g["value"]:
            raise BadRecord(str(path), f"turn {k + 1}: an '{IMAGE_TOKEN}' placeholder in a gpt turn; images go in human turns", record)
        if not g["value"].strip():
            raise BadRecord(str(path), f"turn {k + 1}: a blank gpt answer; expected the text to learn", record)
        tokens += h["value"].count(IMAGE_TOKEN)
        q = h["value"].replace(f"{IMAGE_TOKEN}\n", "").replace(f"\n{IMAGE_TOKEN}", "").replace(IMAGE_TOKEN, "").strip()
        turns.append((q, g["value"]))
        messages += [{"role": "user", "content": h["value"]}, {"role": "assistant", "content": g["value"]}]
    images = _images(rec, path, record, root, allow_outside)
    if images and tokens != len(images):
        one = isinstance(rec.get("image", rec.get("images")), str)
        expected = "exactly 1 for a record with an image" if one else f"{len(images)}, one per image"
        raise BadRecord(str(path), f"{tokens} '{IMAGE_TOKEN}' placeholders; expected {expected}", record)
    if not images and tokens:
        raise BadRecord(str(path), f"'{IMAGE_TOKEN}' placeholder but no 'image' (or 'images') key", record)
    return Conversation(str(rec["id"]), images[0] if images else None, turns, images, messages)


def _images(rec: dict, path: Path, record: str, root: Path, allow_outside: bool) -> list[Path]:
    """The record's image paths: none, one (a path) or several (a non-empty list of paths), under
    ``image`` (LLaVA's key) or ``images`` (as some multi-image sets name it), not both."""
    keys = [k for k in ("image", "images") if k in rec]
    if len(keys) == 2:
        raise BadRecord(str(path), "both 'image' and 'images'; expected one of them", record)
    if not keys:
        return []
    value = rec[keys[0]]
    if isinstance(value, list):
        if not value:
            raise BadRecord(str(path), f"'{keys[0]}' is an empty list; expected a path or a non-empty list of paths", record)
        return [image_path(root, v, path, f"{record}, image {k}", allow_outside) for k, v in enumerate(value)]
    return [image_path(root, value, path, record, allow_outside)]
