"""Image preprocessing as CLIP/SigLIP image processors do it: resize, center crop, rescale, normalise
(and, for LLaVA-1.5, a pad to square with the mean colour first).

The config reads and writes ``preprocessor_config.json`` in transformers' keys, so one
file serves vlkit checkpoints and downloaded ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlkit.errors import VlkitError

RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_RESIZE_PIXELS = 1 << 24
"""Resizes up to this many pixels (48 MB, a 4096x4096 image) are done whole, as transformers
does; past it (an extreme aspect ratio: 100000x1 would resize to 22400000x224) only the region
the center crop keeps is resized, so the work follows what the model sees."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB. Transparency is composited on black; 16-bit and float images are
    scaled from their full range, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
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


@dataclass
class ImageProcessor:
    """``resize_mode``: "shortest_edge" keeps the aspect ratio (CLIP), "exact" resizes to
    ``size``×``size`` (SigLIP). Then an optional center crop of ``crop_size``."""

    size: int = 224
    crop_size: int | None = 224
    resize_mode: str = "shortest_edge"
    resample: int = 3
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    alpha_background: int = 0
    """Grey level that transparency is composited onto: 0 (black, as vlkit's data loading does)
    or 255 (white, as transformers' image processors do; set when loading their checkpoints)."""
    pad_to_square: bool = False
    """LLaVA-1.5's ``image_aspect_ratio: pad``: centre the image on a square of the mean colour
    before resizing, so the crop cuts nothing off (transformers' ``LlavaImageProcessor(do_pad=True)``)."""

    @property
    def output_size(self) -> int:
        return self.crop_size or self.size

    def resized_size(self, image: Image.Image) -> tuple[int, int]:
        """``(width, height)`` after the resize (before the crop)."""
        w, h = image.size
        if not w or not h:
            raise VlkitError(f"a {w}x{h} image: nothing to resize; expected an image of at least 1x1 pixels")
        if self.resize_mode == "exact":
            return self.size, self.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)
        return (self.size, new_long) if w <= h else (new_long, self.size)

    def resize(self, image: Image.Image) -> Image.Image:
        target = self.resized_size(image)
        if target == image.size:
            return image
        return image.resize(target, RESAMPLE[self.resample])

    def resize_crop(self, image: Image.Image) -> np.ndarray:
        """Resize then center crop, as ``[H, W, 3]`` uint8; past :data:`MAX_RESIZE_PIXELS` only
        the kept region is resized (PIL's ``box``), within a few grey levels of the whole resize."""
        (w, h), (tw, th) = image.size, self.resized_size(image)
        if tw * th <= MAX_RESIZE_PIXELS:
            return self.crop(np.asarray(self.resize(image)))
        if self.crop_size is None:
            raise VlkitError(f"a {w}x{h} image: resizing it gives {tw}x{th} pixels, beyond the {MAX_RESIZE_PIXELS} this processor "
                             "takes without a center crop; expected a less extreme aspect ratio, or set crop_size")  # fmt: skip
        c = self.crop_size
        top, left = (th - c) // 2, (tw - c) // 2
        x0, x1, y0, y1 = max(left, 0), min(left + c, tw), max(top, 0), min(top + c, th)
        box = (x0 * w / tw, y0 * h / th, x1 * w / tw, y1 * h / th)
        region = np.asarray(image.resize((x1 - x0, y1 - y0), RESAMPLE[self.resample], box=box))
        out = np.zeros((c, c, region.shape[2]), dtype=region.dtype)
        out[y0 - top : y1 - top, x0 - left : x1 - left] = region
        return out

    def crop(self, arr: np.ndarray) -> np.ndarray:
        """Center crop ``[H, W, C]``, padding with zeros where the image is smaller."""
        c = self.crop_size
        h, w = arr.shape[:2]
        if c is None or (h, w) == (c, c):
            return arr
        top, left = (h - c) // 2, (w - c) // 2
        if top >= 0 and left >= 0:
            return arr[top : top + c, left : left + c]
        out = np.zeros((c, c, arr.shape[2]), dtype=arr.dtype)
        src = arr[max(top, 0) : max(top, 0) + c, max(left, 0) : max(left, 0) + c]
        out[max(-top, 0) : max(-top, 0) + src.shape[0], max(-left, 0) : max(-left, 0) + src.shape[1]] = src
        return out

    def pad_square(self, image: Image.Image) -> Image.Image:
        """The RGB image centred on a square of its longer side, filled with the mean colour
        (each channel ``int(mean * 255)``, as LLaVA and transformers fill it). A square past
        :data:`MAX_RESIZE_PIXELS` (a long thin image) is built from the image shrunk to fit it."""
        w, h = image.size
        if w == h:
            return image
        side = max(w, h)
        if side * side > MAX_RESIZE_PIXELS:
            scale = math.isqrt(MAX_RESIZE_PIXELS) / side
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), RESAMPLE[self.resample])
            w, h = image.size
            side = max(w, h)
        fill = tuple(int(m * 255) for m in self.mean)
        square = Image.new("RGB", (side, side), fill)
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        return square

    def flatten_alpha(self, image: Image.Image) -> Image.Image:
        """Composite a transparent image onto ``alpha_background`` (black is left to ``to_rgb``)."""
        if not self.alpha_background:
            return image
        if "A" not in image.getbands() and image.info.get("transparency") is None:
            return image
        rgba = image.convert("RGBA")
        grey = int(self.alpha_background)
        background = Image.new("RGBA", rgba.size, (grey, grey, grey, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image → ``[3, S, S]`` float tensor."""
        if not isinstance(image, Image.Image):
            raise VlkitError(f"the image processor takes a PIL image, got a {type(image).__name__} (open files with vlkit.data.images.load_image)")
        image = to_rgb(self.flatten_alpha(image))
        if self.pad_to_square:
            image = self.pad_square(image)
        arr = self.resize_crop(image).astype(np.float32)
        arr = (arr * self.rescale_factor - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images → ``[B, 3, S, S]``; anything else is refused with what was expected."""
        if isinstance(images, Image.Image) or not isinstance(images, (list, tuple)):
            raise VlkitError(f"processor.batch takes a list of PIL images, got a {type(images).__name__}")
        if not images:
            raise VlkitError("processor.batch got an empty list of images; expected at least one PIL image")
        bad = next((i for i, im in enumerate(images) if not isinstance(im, Image.Image)), None)
        if bad is not None:
            raise VlkitError(
                f"processor.batch takes PIL images; image {bad} is a {type(images[bad]).__name__} "
                "(open files with vlkit.data.images.load_image)"
            )
        return torch.stack([self(im) for im in images])

    def to_hf(self) -> dict:
        """transformers' ``preprocessor_config.json`` keys."""
        size = {"shortest_edge": self.size} if self.resize_mode == "shortest_edge" else {"height": self.size, "width": self.size}
        out = {
            "do_resize": True,
            "size": size,
            "resample": self.resample,
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_center_crop": self.crop_size is not None,
        }
        if self.crop_size is not None:
            out["crop_size"] = {"height": self.crop_size, "width": self.crop_size}
        if self.pad_to_square:  # only transformers' LLaVA image processor reads do_pad as a pad to square
            out.update(image_processor_type="LlavaImageProcessor", do_pad=True)
        return out

    @classmethod
    def from_hf(cls, cfg: dict) -> "ImageProcessor":
        size = cfg.get("size", 224)
        if isinstance(size, dict) and "shortest_edge" in size:
            mode, side = "shortest_edge", size["shortest_edge"]
        elif isinstance(size, dict):
            mode, side = "exact", size["height"]
        else:
            mode, side = "shortest_edge", int(size)
        crop = cfg.get("crop_size") if cfg.get("do_center_crop", False) else None
        if isinstance(crop, dict):
            crop = crop["height"]
        pad = bool(cfg.get("do_pad")) and str(cfg.get("image_processor_type", "")).startswith("LlavaImageProcessor")
        return cls(
            size=side,
            crop_size=crop,
            resize_mode=mode,
            resample=int(cfg.get("resample", 3)),
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(cfg.get("image_std", CLIP_STD)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            pad_to_square=pad,
        )
