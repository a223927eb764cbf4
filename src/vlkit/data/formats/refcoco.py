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
from typing import Iterator

from vlkit.data.formats.common import FormatError, check_unique, require, write_json
from vlkit.data.formats.json_stream import iter_json_array
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


INSTANCES = 'COCO instances JSON ({"images": [...], "annotations": [...]})'
REFS = "a list of refs"


def iter_refcoco(folder: str | Path, split: str | None = None, image_dir: str | Path | None = None) -> Iterator[RefSample]:
    """One sample per sentence; ``split`` keeps refs of that split ("val", "testA", ...).

    ``instances.json`` (COCO's, hundreds of MB with its masks) is streamed twice, keeping
    each image's name and size and each annotation's image and box; ``refs.json`` is
    streamed. Duplicate sample ids are reported once the refs are read."""
    folder = Path(folder)
    inst_path, refs_path = folder / "instances.json", folder / "refs.json"
    images = _images(inst_path)
    anns = _boxes(inst_path)
    root = Path(image_dir) if image_dir is not None else folder / "images"
    ids = []
    for i, r in enumerate(iter_json_array(refs_path, None, REFS)):
        where = f"{refs_path}, refs[{i}]"
        require(r, {"ref_id": int, "ann_id": int, "sentences": list}, where)
        if split is not None and r.get("split") != split:
            continue
        if r["ann_id"] not in anns:
            raise FormatError(f"{where}: ann_id {r['ann_id']} not in {inst_path}")
        image_id, box = anns[r["ann_id"]]
        if image_id not in images:
            raise FormatError(f"{inst_path}: annotation {r['ann_id']} names image_id {image_id}, which is not in 'images'")
        file_name, width, height = images[image_id]
        for j, s in enumerate(r["sentences"]):
            if not isinstance(s, dict) or not isinstance(s.get("sent"), str):
                raise FormatError(f"{where}.sentences[{j}]: expected {{'sent': str, 'sent_id': int}}")
            sample = RefSample(f"{r['ref_id']}:{s.get('sent_id', j)}", r["ref_id"], image_id, root / file_name, s["sent"], box,
                               width, height, r.get("split", "test"))  # fmt: skip
            ids.append(sample.id)
            yield sample
    check_unique(ids, "ref_id:sent_id", str(refs_path))


def read_refcoco(folder: str | Path, split: str | None = None, image_dir: str | Path | None = None) -> list[RefSample]:
    """All samples of :func:`iter_refcoco` as a list."""
    return list(iter_refcoco(folder, split, image_dir))


def _images(path: Path) -> dict[int, tuple[str, int, int]]:
    """``image id -> (file name, width, height)`` from the instances' images, checked."""
    images = {}
    ids = []
    for i, im in enumerate(iter_json_array(path, "images", INSTANCES)):
        require(im, {"id": int, "file_name": str}, f"{path}, images[{i}]")
        images[im["id"]] = (im["file_name"], im.get("width", 0), im.get("height", 0))
        ids.append(im["id"])
    check_unique(ids, "image id", str(path))
    return images


def _boxes(path: Path) -> dict[int, tuple[int, tuple[float, float, float, float]]]:
    """``annotation id -> (image id, (x0, y0, x1, y1))``, checked; masks and the rest are dropped."""
    boxes = {}
    ids = []
    for i, a in enumerate(iter_json_array(path, "annotations", INSTANCES)):
        where = f"{path}, annotations[{i}]"
        require(a, {"id": int, "image_id": int, "bbox": list}, where)
        b = a["bbox"]
        if len(b) != 4 or not all(isinstance(v, (int, float)) for v in b) or b[2] < 0 or b[3] < 0:
            raise FormatError(f"{where}: bbox {b!r}; expected [x, y, w, h] with w, h >= 0")
        boxes[a["id"]] = (a["image_id"], xywh_to_xyxy(b))
        ids.append(a["id"])
    check_unique(ids, "annotation id", str(path))
    return boxes
