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

import math

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vlkit.data.formats.common import BadRecord, Skips, check_unique, has_type, image_path, no_records, optional, require, write_json
from vlkit.data.formats.json_stream import iter_json_array
from vlkit.boxes import xywh_to_xyxy


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


def iter_refcoco(folder: str | Path, split: str | None = None, image_dir: str | Path | None = None,
                 skips: Skips | None = None, allow_outside_paths: bool = False) -> Iterator[RefSample]:  # fmt: skip
    """One sample per sentence; ``split`` keeps refs of that split ("val", "testA", ...).

    ``instances.json`` (COCO's, hundreds of MB with its masks) is streamed twice, keeping
    each image's name and size and each annotation's image and box; ``refs.json`` is
    streamed. A bad image, annotation or ref raises :class:`BadRecord`, or is skipped under
    ``skips`` (with the refs that need it). Duplicate sample ids, and no sample at all, are
    reported once the refs are read."""
    folder = Path(folder)
    inst_path, refs_path = folder / "instances.json", folder / "refs.json"
    skips = skips if skips is not None else Skips()
    root = Path(image_dir) if image_dir is not None else folder / "images"
    images = _images(inst_path, root, skips, allow_outside_paths)
    anns = _boxes(inst_path, skips)
    ids, present = [], set()
    for i, r in enumerate(iter_json_array(refs_path, None, REFS)):
        try:
            samples = _samples(r, refs_path, f"refs[{i}]", split, images, anns, inst_path, present)
        except BadRecord as err:
            skips.reject(err, "bad record")
            continue
        for sample in samples:
            ids.append(sample.id)
            yield sample
    check_unique(ids, "ref_id:sent_id", str(refs_path))
    if not ids:
        raise no_records(refs_path, REFS if split is None else f"refs of split {split!r} (it has {sorted(present)})", skips)


def read_refcoco(folder: str | Path, split: str | None = None, image_dir: str | Path | None = None,
                 skips: Skips | None = None, allow_outside_paths: bool = False) -> list[RefSample]:  # fmt: skip
    """All samples of :func:`iter_refcoco` as a list."""
    return list(iter_refcoco(folder, split, image_dir, skips, allow_outside_paths))


def _samples(r, path: Path, record: str, split: str | None, images: dict, anns: dict, inst_path: Path, present: set) -> list[RefSample]:
    """The samples of one ref (one per sentence), checked; none when it is of another split
    (``present`` collects the splits seen)."""
    require(r, {"ref_id": int, "ann_id": int, "sentences": list}, path, record)
    ref_split = optional(r, "split", str, "test", path, record)
    present.add(ref_split)
    if split is not None and ref_split != split:
        return []
    if r["ann_id"] not in anns:
        raise BadRecord(str(path), f"ann_id {r['ann_id']} is not an annotation of {inst_path}", record)
    image_id, box = anns[r["ann_id"]]
    if image_id not in images:
        raise BadRecord(str(path), f"its annotation {r['ann_id']} names image_id {image_id}, which is not an image of {inst_path}", record)
    image, width, height = images[image_id]
    if width and height and not (box[0] < width and box[1] < height and box[2] > 0 and box[3] > 0):
        raise BadRecord(str(path), f"its annotation {r['ann_id']}'s box {[round(v, 2) for v in box]} lies outside its "
                        f"{width}x{height} image (x0, y0, x1, y1 in pixels)", record)  # fmt: skip
    out = []
    for j, s in enumerate(r["sentences"]):
        where = f"{record}.sentences[{j}]"
        require(s, {"sent": str}, path, where)
        sent_id = optional(s, "sent_id", (int, str), j, path, where)
        out.append(RefSample(f"{r['ref_id']}:{sent_id}", r["ref_id"], image_id, image, s["sent"], box, width, height, ref_split))
    return out


def _images(path: Path, root: Path, skips: Skips, allow_outside: bool) -> dict[int, tuple[Path, int, int]]:
    """``image id -> (file, width, height)`` from the instances' images, checked."""
    images = {}
    ids = []
    for i, im in enumerate(iter_json_array(path, "images", INSTANCES)):
        record = f"images[{i}]"
        try:
            require(im, {"id": int, "file_name": str}, path, record)
            size = [optional(im, k, int, 0, path, record) for k in ("width", "height")]
            if "width" in im or "height" in im:
                if min(size) <= 0:
                    raise BadRecord(str(path), f"width {size[0]}, height {size[1]}; expected the image's size in pixels, "
                                    "both at least 1", record)  # fmt: skip
            images[im["id"]] = (image_path(root, im["file_name"], path, record, allow_outside), *size)
        except BadRecord as err:
            skips.reject(err, "bad record")
            continue
        ids.append(im["id"])
    check_unique(ids, "image id", str(path))
    return images


def _boxes(path: Path, skips: Skips) -> dict[int, tuple[int, tuple[float, float, float, float]]]:
    """``annotation id -> (image id, (x0, y0, x1, y1))``, checked; masks and the rest are dropped."""
    boxes = {}
    ids = []
    for i, a in enumerate(iter_json_array(path, "annotations", INSTANCES)):
        record = f"annotations[{i}]"
        try:
            require(a, {"id": int, "image_id": int, "bbox": list}, path, record)
            b = a["bbox"]
            if len(b) != 4 or not all(has_type(v, (int, float)) and math.isfinite(v) for v in b) or b[2] <= 0 or b[3] <= 0:
                raise BadRecord(str(path), f"bbox {b!r:.80}; expected [x, y, w, h] of finite numbers with w, h > 0", record)
        except BadRecord as err:
            skips.reject(err, "bad record")
            continue
        boxes[a["id"]] = (a["image_id"], xywh_to_xyxy(b))
        ids.append(a["id"])
    check_unique(ids, "annotation id", str(path))
    return boxes
