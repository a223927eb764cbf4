"""Safe image loading: every failure names the file and says what was expected."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from vlkit.errors import VlkitError

MAX_PIXELS = 64_000_000
"""Images above this many pixels are refused as possible decompression bombs."""


class BadSample(VlkitError):
    """A sample that cannot be used; the message names the file or record and the problem."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB. Transparency is composited on black; 16-bit and float images are
    scaled from their full range, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0, 0, 255).astype("uint8")
        return Image.fromarray(arr, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, fully decode and convert an image to RGB, or raise :class:`BadSample`."""
    path = Path(path)
    if not path.is_file():
        raise BadSample(str(path), "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w == 0 or h == 0:
                    raise BadSample(str(path), f"zero-size image ({w}x{h})")
                if w * h > max_pixels:
                    raise BadSample(str(path), f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
                img.load()
                return to_rgb(img)
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample(str(path), f"refused as a decompression bomb ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSample(str(path), f"corrupt or truncated image ({err})") from None
