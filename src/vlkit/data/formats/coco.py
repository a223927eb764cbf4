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
from typing import Iterable, Iterator

from vlkit.data.formats.common import FormatError, check_unique, require, write_json
from vlkit.data.formats.json_stream import iter_json_array
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


KARPATHY = 'a Karpathy-split captions JSON ({"images": [...]})'


def iter_karpathy(path: str | Path, split: str | Iterable[str] | None = None, image_root: str | Path | None = None) -> Iterator[CaptionRecord]:
    """Records of a Karpathy-layout JSON, streamed (the COCO file is ~150 MB), optionally of
    one split ("test", or ("train", "restval")). Raises :class:`FormatError` naming the file
    and record index; duplicate ids are reported once the file is read."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    splits = None if split is None else ({split} if isinstance(split, str) else set(split))
    ids = []
    for i, img in enumerate(iter_json_array(path, "images", KARPATHY)):
        where = f"{path}, images[{i}]"
        require(img, {"filename": str, "sentences": list}, where)
        if splits is not None and img.get("split") not in splits:
            continue
        rec = CaptionRecord(img.get("cocoid", img.get("imgid", i)), root / img.get("filepath", "") / img["filename"],
                            _captions(img["sentences"], where), img.get("split", "test"))  # fmt: skip
        ids.append(rec.id)
        yield rec
    check_unique(ids, "image id (cocoid/imgid)", str(path))


def read_karpathy(path: str | Path, split: str | Iterable[str] | None = None, image_root: str | Path | None = None) -> list[CaptionRecord]:
    """All records of :func:`iter_karpathy` as a list."""
    return list(iter_karpathy(path, split, image_root))


def _captions(sentences: list, where: str) -> list[str]:
    """The reference captions of one image: each sentence's ``raw`` text, else its tokens joined."""
    caps = []
    for j, s in enumerate(sentences):
        if isinstance(s, dict) and isinstance(s.get("raw"), str):
            caps.append(s["raw"])
        elif isinstance(s, dict) and isinstance(s.get("tokens"), list):
            caps.append(" ".join(s["tokens"]))
        else:
            raise FormatError(f"{where}.sentences[{j}]: expected {{'raw': str}} or {{'tokens': [str]}}")
    if not caps:
        raise FormatError(f"{where}: no sentences; expected at least one reference caption")
    return caps


def write_results(path: str | Path, predictions: dict) -> Path:
    """COCO caption results: ``[{"image_id": id, "caption": text}]``."""
    return write_json(path, [{"image_id": k, "caption": v} for k, v in predictions.items()])
