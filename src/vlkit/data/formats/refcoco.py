"""RefCOCO-style referring expressions, in the ``refer`` toolkit's layout with JSON in place
of its pickle (vlkit never unpickles): ``refs.json`` + COCO ``instances.json``.

``refs.json``: ``[{"ref_id", "ann_id", "image_id", "split", "category_id",
"sentences": [{"sent", "sent_id", "tokens"}]}]``. ``instances.json``: COCO detection
layout, ``{"images": [{"id", "file_name", "width", "height"}], "annotations": [{"id",
"image_id", "bbox": [x, y, w, h], "category_id", "area", "iscrowd"}], "categories":
[{"id", "name"}]}``. A grounding sample is one sentence with its ref's box, as
``(x0, y0, x1, y1)`` in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlkit.data.formats.common import FormatError, check_unique, read_json, require, write_json
from vlkit.eval.metrics.boxes import xywh_to_xyxy


@dataclass
class RefSample:
    id: str  # "{ref_id}:{sent_id}"
    ref_id: int
    image_id: int
    image: Path
    text: str
    box: tuple[float, float, float, float]
    width: int
    height: int
    split: str = "test"


def write_refcoco(folder: str | Path, images: list[dict], annotations: list[dict], refs: list[dict], categories: list[dict]) -> None:
    folder = Path(folder)
    write_json(folder / "instances.json", {"images": images, "annotations": annotations, "categories": categories})
    write_json(folder / "refs.json", refs)


def read_refcoco(folder: str | Path, split: str | None = None, image_dir: str | Path | None = None) -> list[RefSample]:
    """One sample per sentence; ``split`` keeps refs of that split ("val", "testA", ...)."""
    folder = Path(folder)
    inst_path, refs_path = folder / "instances.json", folder / "refs.json"
    inst = read_json(inst_path, "COCO instances JSON with images and annotations")
    refs = read_json(refs_path, "a list of refs")
    if not isinstance(inst, dict) or not isinstance(inst.get("images"), list) or not isinstance(inst.get("annotations"), list):
        raise FormatError(f"{inst_path}: expected an object with 'images' and 'annotations' lists")
    if not isinstance(refs, list):
        raise FormatError(f"{refs_path}: a {type(refs).__name__}; expected a list of refs")
    images = {}
    for i, im in enumerate(inst["images"]):
        require(im, {"id": int, "file_name": str}, f"{inst_path}, images[{i}]")
        images[im["id"]] = im
    check_unique([im["id"] for im in inst["images"]], "image id", str(inst_path))
    anns = {}
    for i, a in enumerate(inst["annotations"]):
        where = f"{inst_path}, annotations[{i}]"
        require(a, {"id": int, "image_id": int, "bbox": list}, where)
        if len(a["bbox"]) != 4 or not all(isinstance(v, (int, float)) for v in a["bbox"]) or a["bbox"][2] < 0 or a["bbox"][3] < 0:
            raise FormatError(f"{where}: bbox {a['bbox']!r}; expected [x, y, w, h] with w, h >= 0")
        anns[a["id"]] = a
    check_unique([a["id"] for a in inst["annotations"]], "annotation id", str(inst_path))
    root = Path(image_dir) if image_dir is not None else folder / "images"
    out = []
    for i, r in enumerate(refs):
        where = f"{refs_path}, refs[{i}]"
        require(r, {"ref_id": int, "ann_id": int, "sentences": list}, where)
        if split is not None and r.get("split") != split:
            continue
        a = anns.get(r["ann_id"])
        if a is None:
            raise FormatError(f"{where}: ann_id {r['ann_id']} not in {inst_path}")
        im = images.get(a["image_id"])
        if im is None:
            raise FormatError(f"{inst_path}: annotation {a['id']} names image_id {a['image_id']}, which is not in 'images'")
        for j, s in enumerate(r["sentences"]):
            if not isinstance(s, dict) or not isinstance(s.get("sent"), str):
                raise FormatError(f"{where}.sentences[{j}]: expected {{'sent': str, 'sent_id': int}}")
            sid = s.get("sent_id", j)
            out.append(
                RefSample(f"{r['ref_id']}:{sid}", r["ref_id"], im["id"], root / im["file_name"], s["sent"],
                          xywh_to_xyxy(a["bbox"]), im.get("width", 0), im.get("height", 0), r.get("split", "test"))
            )  # fmt: skip
    check_unique([s.id for s in out], "ref_id:sent_id", str(refs_path))
    return out
