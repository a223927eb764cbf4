"""Caption folders: ``captions.jsonl`` lines of ``{"image": path, "captions": [str, ...]}``
beside the images (what :func:`vlkit.data.export.export_shapes` writes, what CLIP training,
retrieval evaluation and packing read). One record check for all of them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from vlkit.data.formats.coco import CaptionRecord
from vlkit.data.formats.common import BadRecord, Skips, image_path, iter_jsonl, no_records

INDEX = "captions.jsonl"
CAPTIONS = 'lines of {"image": path, "captions": [str, ...]}'


def caption_record(rec, source: Path, line: int, root: Path, allow_outside: bool = False) -> CaptionRecord:
    """One parsed line checked: an image path inside ``root`` and a non-empty list of non-blank
    caption strings; other keys are kept in ``meta``. Raises :class:`BadRecord` naming the line."""
    record = f"line {line}"
    if not isinstance(rec, dict):
        raise BadRecord(str(source), f"a JSON {type(rec).__name__}; expected {{\"image\": path, \"captions\": [str, ...]}}", record)
    if "image" not in rec or "captions" not in rec:
        raise BadRecord(str(source), f"keys {sorted(rec)[:5]}; expected {{\"image\": path, \"captions\": [str, ...]}}", record)
    image = image_path(root, rec["image"], source, record, allow_outside)
    captions = rec["captions"]
    if not isinstance(captions, list) or not captions:
        raise BadRecord(str(source), f"'captions' is {captions!r:.60}; expected a non-empty list of caption strings", record)
    for k, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise BadRecord(str(source), f"caption {k} is {c!r:.60}; expected a non-blank string", record)
    return CaptionRecord(line, image, captions, "", {k: v for k, v in rec.items() if k not in ("image", "captions")})


def iter_captions(folder: str | Path, skips: Skips | None = None, allow_outside_paths: bool = False) -> Iterator[CaptionRecord]:
    """The records of ``folder/captions.jsonl`` (``id``: the line number), streamed; a bad one
    raises :class:`BadRecord` or is skipped under ``skips``; a file without records raises."""
    folder = Path(folder)
    path = folder / INDEX
    skips = skips if skips is not None else Skips()
    n = 0
    for line, rec in iter_jsonl(path, CAPTIONS, skips):
        try:
            r = caption_record(rec, path, line, folder, allow_outside_paths)
        except BadRecord as err:
            skips.reject(err, "bad record")
            continue
        n += 1
        yield r
    if not n:
        raise no_records(path, CAPTIONS, skips)
