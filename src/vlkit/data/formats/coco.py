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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from vlkit.data.formats.common import FormatError, check_unique, read_json, require, write_json
from vlkit.eval.metrics.text import tokenize_caption


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


def read_karpathy(path: str | Path, split: str | Iterable[str] | None = None, image_root: str | Path | None = None) -> list[CaptionRecord]:
    """Records of a Karpathy-layout JSON, optionally of one split ("test", or
    ("train", "restval")). Raises :class:`FormatError` naming the file and record index."""
    path = Path(path)
    data = read_json(path, 'a Karpathy-split captions JSON ({"images": [...]})')
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise FormatError(f"{path}: expected an object with an 'images' list (Karpathy layout)")
    root = Path(image_root) if image_root is not None else path.parent
    splits = None if split is None else ({split} if isinstance(split, str) else set(split))
    out = []
    for i, img in enumerate(data["images"]):
        where = f"{path}, images[{i}]"
        require(img, {"filename": str, "sentences": list}, where)
        if splits is not None and img.get("split") not in splits:
            continue
        caps = []
        for j, s in enumerate(img["sentences"]):
            if isinstance(s, dict) and isinstance(s.get("raw"), str):
                caps.append(s["raw"])
            elif isinstance(s, dict) and isinstance(s.get("tokens"), list):
                caps.append(" ".join(s["tokens"]))
            else:
                raise FormatError(f"{where}.sentences[{j}]: expected {{'raw': str}} or {{'tokens': [str]}}")
        if not caps:
            raise FormatError(f"{where}: no sentences; expected at least one reference caption")
        rid = img.get("cocoid", img.get("imgid", i))
        out.append(CaptionRecord(rid, root / img.get("filepath", "") / img["filename"], caps, img.get("split", "test")))
    check_unique([r.id for r in out], "image id (cocoid/imgid)", str(path))
    return out


def write_results(path: str | Path, predictions: dict) -> Path:
    """COCO caption results: ``[{"image_id": id, "caption": text}]``."""
    return write_json(path, [{"image_id": k, "caption": v} for k, v in predictions.items()])
