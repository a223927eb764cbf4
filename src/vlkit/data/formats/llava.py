"""LLaVA conversation JSON: instruction-tuning data.

``[{"id": "...", "image": "relative/path.png", "conversations": [{"from": "human",
"value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}]``. Turns
alternate human/gpt starting with human; the ``<image>`` placeholder appears exactly once
(in the first human turn) when the record has an image, never when it has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from vlkit.data.formats.common import BadRecord, Skips, check_unique, image_path, no_records, require, write_json
from vlkit.data.formats.json_stream import iter_json_array

IMAGE_TOKEN = "<image>"


@dataclass
class Conversation:
    id: str
    image: Path | None
    turns: list[tuple[str, str]]  # (human, gpt) pairs, the image token removed

    def to_json(self, image_root: Path | None = None) -> dict:
        conv = []
        for k, (q, a) in enumerate(self.turns):
            conv.append({"from": "human", "value": (f"{IMAGE_TOKEN}\n{q}" if k == 0 and self.image is not None else q)})
            conv.append({"from": "gpt", "value": a})
        rec = {"id": self.id, "conversations": conv}
        if self.image is not None:
            img = Path(self.image)
            rec["image"] = img.relative_to(image_root).as_posix() if image_root is not None and img.is_absolute() else img.as_posix()
        return rec


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
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    skips = skips if skips is not None else Skips()
    ids = []
    for i, rec in enumerate(iter_json_array(path, None, LLAVA)):
        try:
            conv = _conversation(rec, path, i, root, allow_outside_paths)
        except BadRecord as err:
            skips.reject(err, "bad record")
            continue
        ids.append(conv.id)
        yield conv
    check_unique(ids, "id", str(path))
    if not ids:
        raise no_records(path, LLAVA, skips)


def read_llava(path: str | Path, image_root: str | Path | None = None, skips: Skips | None = None,
               allow_outside_paths: bool = False) -> list[Conversation]:  # fmt: skip
    """All conversations of :func:`iter_llava` as a list."""
    return list(iter_llava(path, image_root, skips, allow_outside_paths))


def _conversation(rec, path: Path, i: int, root: Path, allow_outside: bool) -> Conversation:
    """One record checked: human/gpt turns, one image placeholder exactly when there is an image."""
    require(rec, {"id": (str, int), "conversations": list}, path, f"record {i}")
    record = f"record {i} (id {rec['id']!r})"
    conv = rec["conversations"]
    if not conv or len(conv) % 2:
        raise BadRecord(str(path), f"{len(conv)} turns; expected human/gpt pairs", record)
    turns, tokens = [], 0
    for k in range(0, len(conv), 2):
        h, g = conv[k], conv[k + 1]
        for t, role in ((h, "human"), (g, "gpt")):
            if not isinstance(t, dict) or t.get("from") != role or not isinstance(t.get("value"), str):
                raise BadRecord(str(path), f"turn {k + (role == 'gpt')} is {t!r:.60}; expected {{'from': '{role}', 'value': str}}", record)
        tokens += h["value"].count(IMAGE_TOKEN) + g["value"].count(IMAGE_TOKEN)
        q = h["value"].replace(f"{IMAGE_TOKEN}\n", "").replace(f"\n{IMAGE_TOKEN}", "").replace(IMAGE_TOKEN, "").strip()
        turns.append((q, g["value"]))
    has_image = "image" in rec
    if has_image and tokens != 1:
        raise BadRecord(str(path), f"{tokens} '{IMAGE_TOKEN}' placeholders; expected exactly 1 for a record with an image", record)
    if not has_image and tokens:
        raise BadRecord(str(path), f"'{IMAGE_TOKEN}' placeholder but no 'image' key", record)
    image = image_path(root, rec["image"], path, record, allow_outside) if has_image else None
    return Conversation(str(rec["id"]), image, turns)
