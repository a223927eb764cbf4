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

from vlkit.data.formats.common import FormatError, check_unique, require, write_json
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


def iter_llava(path: str | Path, image_root: str | Path | None = None) -> Iterator[Conversation]:
    """Conversations of a LLaVA JSON, streamed (LLaVA-665k is ~1 GB). Raises
    :class:`FormatError` naming the file and record; duplicate ids once the file is read."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    ids = []
    for i, rec in enumerate(iter_json_array(path, None, LLAVA)):
        conv = _conversation(rec, f"{path}, record {i}", root)
        ids.append(conv.id)
        yield conv
    check_unique(ids, "id", str(path))


def read_llava(path: str | Path, image_root: str | Path | None = None) -> list[Conversation]:
    """All conversations of :func:`iter_llava` as a list."""
    return list(iter_llava(path, image_root))


def _conversation(rec: dict, where: str, root: Path) -> Conversation:
    """One record checked: human/gpt turns, one image placeholder exactly when there is an image."""
    require(rec, {"id": (str, int), "conversations": list}, where)
    where = f"{where} (id {rec['id']!r})"
    conv = rec["conversations"]
    if not conv or len(conv) % 2:
        raise FormatError(f"{where}: {len(conv)} turns; expected human/gpt pairs")
    turns, tokens = [], 0
    for k in range(0, len(conv), 2):
        h, g = conv[k], conv[k + 1]
        for t, role in ((h, "human"), (g, "gpt")):
            if not isinstance(t, dict) or t.get("from") != role or not isinstance(t.get("value"), str):
                raise FormatError(f"{where}, turn {k + (role == 'gpt')}: expected {{'from': '{role}', 'value': str}}")
        tokens += h["value"].count(IMAGE_TOKEN) + g["value"].count(IMAGE_TOKEN)
        q = h["value"].replace(f"{IMAGE_TOKEN}\n", "").replace(f"\n{IMAGE_TOKEN}", "").replace(IMAGE_TOKEN, "").strip()
        turns.append((q, g["value"]))
    has_image = "image" in rec
    if has_image and tokens != 1:
        raise FormatError(f"{where}: {tokens} '{IMAGE_TOKEN}' placeholders; expected exactly 1 for a record with an image")
    if not has_image and tokens:
        raise FormatError(f"{where}: '{IMAGE_TOKEN}' placeholder but no 'image' key")
    return Conversation(str(rec["id"]), root / rec["image"] if has_image else None, turns)
