"""Safe image loading: every failure names the file and says what was expected."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image

from vlkit.errors import VlkitError
from vlkit.vision.preprocess import to_rgb

MAX_PIXELS = 64_000_000
"""Images above this many pixels are refused as possible decompression bombs."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""The files read as images where a folder is looked through."""


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder``, hidden files and folders passed over (as every reader of
    folders does), sorted."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


class BadSample(VlkitError):
    """A sample that cannot be used; the message names the file (``where``), the record in it
    when there is one (``record``: "line 3", "images[4]") and the problem."""

    def __init__(self, where: str, problem: str | None = None, record: str = ""):
        if problem is None:  # rebuilt from its message alone, as a DataLoader worker's error is
            super().__init__(where)
        else:
            super().__init__(f"{where}, {record}: {problem}" if record else f"{where}: {problem}")
        self.where = where
        self.record = record
        self.problem = problem if problem is not None else where


def for_record(err: BadSample, where, record: str) -> BadSample:
    """``err``, an image that failed, as the bad record ``record`` of the data file ``where`` that
    names the image: the file and line (or id) first, as every other bad record is named."""
    return BadSample(str(where), f"image {err.where}: {err.problem}", record)


def load_record_image(path: str | Path, where, record: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """:func:`load_image` of the image that record ``record`` of the data file ``where`` names."""
    try:
        return load_image(path, max_pixels)
    except BadSample as err:
        raise for_record(err, where, record) from None


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, fully decode and convert an image file to RGB, or raise :class:`BadSample`."""
    path = Path(path)
    if not path.is_file():
        raise BadSample(str(path), "a folder, not an image file" if path.is_dir() else "file not found")
    return decode_image(path, str(path), max_pixels)


def decode_image(source: Path | bytes, where: str, max_pixels: int = MAX_PIXELS, record: str = "") -> Image.Image:
    """Fully decode an image file or its bytes to RGB, or raise :class:`BadSample` naming
    ``where`` (and ``record``): the one place images from files, TSV fields and shards are
    decoded. Sizes are checked from the header, before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                w, h = img.size
                if w == 0 or h == 0:
                    raise BadSample(where, f"zero-size image ({w}x{h})", record)
                if w * h > max_pixels:
                    raise BadSample(where, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}", record)
                img.load()
                return to_rgb(img)
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample(where, f"refused as a decompression bomb ({err})", record) from None
    except Exception as err:  # noqa: BLE001 - any failure to decode untrusted bytes means the image is unusable
        raise BadSample(where, f"corrupt or truncated image ({type(err).__name__}: {err})", record) from None
