"""COCO captions in the Karpathy split layout (``dataset_coco.json``), and COCO's
caption-results list.

Karpathy layout::

    {"dataset": "coco", "images": [
      {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
       "split": "test", "cocoid": 391895, "sentids": [0, 1],
       "sentences": [{"raw": "A man riding ...", "tokens": ["a", "man", ...],
                      "imgid": 0, "sentid": 0}, ...]}, ...]}

The image file is ``image_root / filepath / filename``; the id of a record is ``cocoid``
when present, else ``imgid``. Results (what a captioner outputs and coco-caption reads)
are ``[{"image_id": cocoid, "caption": "..."}]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from vlkit.data.formats.common import BadRecord, Skips, check_type, check_unique, image_path, no_records, optional, require, write_json
from vlkit.data.formats.json_stream import iter_json_array
from vlkit.text.caption import tokenize_caption


@dataclass
class CaptionRecord:
    id: int | str
    image: Path
    captions: list[str]
    split: str = "test"
    meta: dict = field(default_factory=dict)


def write_karpathy(path: str | Path, records: Iterable[CaptionRecord], image_root: str | Path | None = None) -> Path:
    """Write records as a Karpathy-layout JSON; image paths are stored relative to
    ``image_root`` (default: the JSON's folder) as ``filepath``/``filename``."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    images, sentid = [], 0
    for imgid, r in enumerate(records):
        try:
            rel = Path(r.image).relative_to(root)
        except ValueError:
            rel = Path(r.image)
        sents = []
        for c in r.captions:
            sents.append({"raw": c, "tokens": tokenize_caption(c).split(), "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filepath": rel.parent.as_posix() if rel.parent != Path(".") else "",
                "filename": rel.name,
                "imgid": imgid,
                "cocoid": r.id,
                "split": r.split,
                "sentids": [s["sentid"] for s in sents],
                "sentences": sents,
            }
        )
    return write_json(path, {"dataset": "coco", "images": images})


KARPATHY = 'a Karpathy-split captions JSON ({"images": [...]})'


def iter_karpathy(path: str | Path, split: str | Iterable[str] | None = None, image_root: str | Path | None = None,
                  skips: Skips | None = None, allow_outside_paths: bool = False) -> Iterator[CaptionRecord]:  # fmt: skip
    """Records of a Karpathy-layout JSON, streamed (the COCO file is ~150 MB), optionally of
    one split ("test", or ("train", "restval")). A bad record raises :class:`BadRecord` naming
    the file and record index, or is skipped under ``skips`` (:mod:`vlkit.data.skips`); image
    paths outside ``image_root`` are refused unless ``allow_outside_paths``. Duplicate ids,
    and a file with no record (of the split), are reported once the file is read."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    splits = None if split is None else ({split} if isinstance(split, str) else set(split))
    skips = skips if skips is not None else Skips()
    ids, present = [], set()
    for i, img in enumerate(iter_json_array(path, "images", KARPATHY)):
        try:
            rec = _record(img, i, path, root, allow_outside_paths)
        except BadRecord as err:
            skips.reject(err, "bad record")
            continue
        present.add(rec.split)
        if splits is not None and rec.split not in splits:
            continue
        ids.append(rec.id)
        yield rec
    check_unique(ids, "image id (cocoid/imgid)", str(path))
    if not ids:
        raise no_records(path, KARPATHY if splits is None else f"records of split {sorted(splits)} (it has {sorted(present)})", skips)


def read_karpathy(path: str | Path, split: str | Iterable[str] | None = None, image_root: str | Path | None = None,
                  skips: Skips | None = None, allow_outside_paths: bool = False) -> list[CaptionRecord]:  # fmt: skip
    """All records of :func:`iter_karpathy` as a list."""
    return list(iter_karpathy(path, split, image_root, skips, allow_outside_paths))


def _record(img, i: int, path: Path, root: Path, allow_outside: bool) -> CaptionRecord:
    """One image entry checked: its file inside ``root``, its id, split and reference captions."""
    record = f"images[{i}]"
    require(img, {"filename": str, "sentences": list}, path, record)
    filepath = optional(img, "filepath", str, "", path, record)
    split = optional(img, "split", str, "test", path, record)
    rid = optional(img, "cocoid", (int, str), None, path, record)
    rid = optional(img, "imgid", (int, str), i, path, record) if rid is None else rid
    image = image_path(root, os.path.join(filepath, img["filename"]), path, record, allow_outside)
    return CaptionRecord(rid, image, _captions(img["sentences"], path, record), split)


def _captions(sentences: list, path: Path, record: str) -> list[str]:
    """The reference captions of one image: each sentence's ``raw`` text, else its tokens joined."""
    caps = []
    for j, s in enumerate(sentences):
        where = f"{record}.sentences[{j}]"
        if isinstance(s, dict) and "raw" in s:
            check_type(s["raw"], str, path, where, "'raw'")
            caps.append(s["raw"])
        elif isinstance(s, dict) and "tokens" in s:
            check_type(s["tokens"], list, path, where, "'tokens'")
            for t in s["tokens"]:
                check_type(t, str, path, where, "a token")
            caps.append(" ".join(s["tokens"]))
        else:
            raise BadRecord(str(path), "expected {'raw': str} or {'tokens': [str]}", where)
        if not caps[-1].strip():
            raise BadRecord(str(path), "a blank caption; expected reference text", where)
    if not caps:
        raise BadRecord(str(path), "no sentences; expected at least one reference caption", record)
    return caps


def write_results(path: str | Path, predictions: dict) -> Path:
    """COCO caption results: ``[{"image_id": id, "caption": text}]``."""
    return write_json(path, [{"image_id": k, "caption": v} for k, v in predictions.items()])
