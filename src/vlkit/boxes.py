"""Boxes: IoU and the box-as-text formats VLMs emit, shared by data formats, training data and evaluation.

Boxes are ``(x0, y0, x1, y1)`` in pixels. Text formats (:func:`parse_box`):

- ``"pixels"``: four numbers in pixels, e.g. ``[12, 30, 40, 61]``;
- ``"norm1000"``: four integers on a 0-999/1000 grid (Qwen-VL's ``(x0,y0),(x1,y1)``),
  ``x = v / 1000 · W``;
- ``"loc1000"``: Florence-2's ``<loc_N>`` tokens (x0 y0 x1 y1, 1000 bins); a bin's centre is
  taken, ``x = (N + 0.5) / 1000 · W``;
- ``"loc1024"``: PaliGemma's ``<locNNNN>`` tokens, ordered **y0 x0 y1 x1**, 1024 bins,
  ``x = N / 1024 · W`` (big_vision's convention).
- ``"norm1"``: four floats in [0, 1].
"""

from __future__ import annotations

import re

Box = tuple[float, float, float, float]
FORMATS = ("pixels", "norm1", "norm1000", "loc1000", "loc1024")


def iou(a, b) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def xywh_to_xyxy(box) -> Box:
    """COCO ``[x, y, w, h]`` → ``(x0, y0, x1, y1)``."""
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def parse_box(text: str, fmt: str, width: float, height: float) -> Box | None:
    """The first box in ``text`` in ``fmt`` (see module doc), in pixels, or ``None``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown box format {fmt!r}; expected one of {FORMATS}")
    if text is None:
        return None
    if fmt == "loc1000":
        v = [int(t) for t in re.findall(r"<loc_(\d+)>", text)[:4]]
        if len(v) < 4:
            return None
        return ((v[0] + 0.5) / 1000 * width, (v[1] + 0.5) / 1000 * height, (v[2] + 0.5) / 1000 * width, (v[3] + 0.5) / 1000 * height)
    if fmt == "loc1024":
        v = [int(t) for t in re.findall(r"<loc(\d{4})>", text)[:4]]
        if len(v) < 4:
            return None
        y0, x0, y1, x1 = v
        return (x0 / 1024 * width, y0 / 1024 * height, x1 / 1024 * width, y1 / 1024 * height)
    nums = [float(t) for t in re.findall(r"-?\d+(?:\.\d+)?", text)[:4]]
    if len(nums) < 4:
        return None
    x0, y0, x1, y1 = nums
    if fmt == "norm1000":
        return (x0 / 1000 * width, y0 / 1000 * height, x1 / 1000 * width, y1 / 1000 * height)
    if fmt == "norm1":
        return (x0 * width, y0 * height, x1 * width, y1 * height)
    return (x0, y0, x1, y1)


def format_box(box, fmt: str, width: float, height: float) -> str:
    """The inverse of :func:`parse_box` (to the format's grid), for prompts and exports."""
    x0, y0, x1, y1 = box
    if fmt == "pixels":
        return f"[{x0:g}, {y0:g}, {x1:g}, {y1:g}]"
    if fmt == "norm1":
        return f"[{x0 / width:.3f}, {y0 / height:.3f}, {x1 / width:.3f}, {y1 / height:.3f}]"

    def q(v, size, bins):
        return min(bins - 1, max(0, int(v / size * bins)))

    if fmt == "norm1000":
        return f"({q(x0, width, 1000)},{q(y0, height, 1000)}),({q(x1, width, 1000)},{q(y1, height, 1000)})"
    if fmt == "loc1000":
        return "".join(f"<loc_{q(v, s, 1000)}>" for v, s in ((x0, width), (y0, height), (x1, width), (y1, height)))
    if fmt == "loc1024":
        return "".join(f"<loc{q(v, s, 1024):04d}>" for v, s in ((y0, height), (x0, width), (y1, height), (x1, width)))
    raise ValueError(f"unknown box format {fmt!r}; expected one of {FORMATS}")
