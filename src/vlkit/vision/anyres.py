"""AnyRes (LLaVA-NeXT): an image of any size becomes a grid of tiles plus a downsized global view.

The grid resolution is picked from a list of pinpoints, the tiles' feature grid is unpadded
back to the image's aspect ratio, and each row of it ends in a learned newline token. Sizes
are ``(height, width)`` throughout, as transformers' ``image_sizes`` are; the arithmetic
(rounding, tie order) is transformers' own, so token counts and features line up exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from vlkit.errors import VlkitError
from vlkit.vision.preprocess import RESAMPLE, ImageProcessor, to_rgb

Size = tuple[int, int]
"""``(height, width)``."""

LLAVA_NEXT_GRIDS: tuple[Size, ...] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
"""LLaVA-NeXT's ``(rows, cols)`` tile grids: with 336-pixel tiles, transformers' default pinpoints."""


def grid_pinpoints(tile: int, grids: Iterable[Size] = LLAVA_NEXT_GRIDS) -> list[Size]:
    """``(rows, cols)`` tile grids → the pixel resolutions ``(height, width)`` they cover, in order."""
    return [(rows * tile, cols * tile) for rows, cols in grids]


def grid_range(first: Size, last: Size) -> list[Size]:
    """Every grid from ``first`` to ``last``, rows outer (LLaVA-NeXT's ``"(1x1),...,(3x3)"`` form)."""
    return [(r, c) for r in range(first[0], last[0] + 1) for c in range(first[1], last[1] + 1)]


def check_pinpoints(pinpoints, tile: int, where: str = "image_grid_pinpoints") -> list[Size]:
    """Pinpoints as ``(height, width)`` tuples, each a positive multiple of ``tile`` (so tiles
    never straddle the edge), or an error naming the one at fault."""
    if isinstance(pinpoints, (str, bytes)) or not isinstance(pinpoints, Sequence) or not pinpoints:
        raise VlkitError(f"{where}: expected a non-empty list of [height, width] pairs, got {pinpoints!r}")
    out = []
    for i, p in enumerate(pinpoints):
        ok = isinstance(p, Sequence) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in p)
        if not ok or min(p) <= 0 or p[0] % tile or p[1] % tile:
            raise VlkitError(f"{where}[{i}]: expected [height, width], positive multiples of the tile size {tile}, got {p!r}")
        out.append((p[0], p[1]))
    return out


def select_best_resolution(image_size: Size, pinpoints: Sequence[Size]) -> Size:
    """The pinpoint that keeps the most of the image's pixels once fitted inside it; among
    equals the one that wastes the fewest, and among those the first listed."""
    h, w = image_size
    best, best_kept, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (ph, pw), kept, waste
    if best is None:
        raise VlkitError(f"no resolution fits an image of {h}x{w} (height x width) among pinpoints {list(pinpoints)}")
    return best


def fitted_size(image_size: Size, target: Size) -> Size:
    """The image's size once scaled to fit ``target`` with its aspect ratio kept (rounded up,
    never past the target)."""
    h, w = image_size
    th, tw = target
    if tw / w < th / h:
        return min(math.ceil(h * (tw / w)), th), tw
    return th, min(math.ceil(w * (th / h)), tw)


def centre_padding(size: Size, target: Size) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` padding that centres ``size`` in ``target``; the odd pixel
    goes to the bottom or right."""
    top, extra_y = divmod(target[0] - size[0], 2)
    left, extra_x = divmod(target[1] - size[1], 2)
    return top, top + extra_y, left, left + extra_x


def resize_and_pad(image: Image.Image, target: Size, resample: int = 3) -> np.ndarray:
    """An RGB image fitted inside ``target`` and centred on black: ``[H, W, 3]`` uint8."""
    h, w = fitted_size((image.height, image.width), target)
    resized = np.asarray(image.resize((w, h), RESAMPLE[resample]))
    top, bottom, left, right = centre_padding((h, w), target)
    return np.pad(resized, ((top, bottom), (left, right), (0, 0)))


def split_tiles(arr: np.ndarray, tile: int) -> list[np.ndarray]:
    """``[H, W, C]`` → ``tile``×``tile`` pieces, row by row."""
    return [arr[y : y + tile, x : x + tile] for y in range(0, arr.shape[0], tile) for x in range(0, arr.shape[1], tile)]


def grid_shape(image_size: Size, pinpoints: Sequence[Size], tile: int) -> Size:
    """``(rows, cols)`` of tiles the image is cut into."""
    h, w = select_best_resolution(image_size, pinpoints)
    return h // tile, w // tile


def num_views(image_size: Size, pinpoints: Sequence[Size], tile: int) -> int:
    """Tiles plus the global view: how many images the vision tower sees for this one."""
    rows, cols = grid_shape(image_size, pinpoints, tile)
    return rows * cols + 1


def anyres_pixels(image: Image.Image, processor: ImageProcessor, pinpoints: Sequence[Size]) -> torch.Tensor:
    """One image → ``[views, 3, S, S]``: the whole image squashed to the processor's size, then
    the tiles row by row, each through the processor's resize, crop and normalisation (as
    transformers' ``LlavaNextImageProcessor`` does). Tiles are the processor's output size."""
    if not isinstance(image, Image.Image):
        raise VlkitError(f"AnyRes takes a PIL image, got a {type(image).__name__} (open files with vlkit.data.images.load_image)")
    if not image.width or not image.height:
        raise VlkitError(f"a {image.width}x{image.height} image: nothing to tile; expected an image of at least 1x1 pixels")
    image = to_rgb(processor.flatten_alpha(image))
    tile = processor.output_size
    target = select_best_resolution((image.height, image.width), pinpoints)
    tiles = split_tiles(resize_and_pad(image, target, processor.resample), tile)
    views = [image.resize((processor.size, processor.size), RESAMPLE[processor.resample])]
    views += [Image.fromarray(np.ascontiguousarray(t)) for t in tiles]
    return torch.stack([processor(v) for v in views])


def unpadded_shape(image_size: Size, grid: Size) -> Size:
    """The part of a ``(height, width)`` feature grid that the image covers: the grid is cut
    back symmetrically to the image's aspect ratio, undoing the padding of the tiling."""
    h, w = image_size
    gh, gw = grid
    if w / h > gw / gh:
        pad = (gh - int(round(h * (gw / w), 7))) // 2
        return gh - 2 * pad, gw
    pad = (gw - int(round(w * (gh / h), 7))) // 2
    return gh, gw - 2 * pad


def unpad(features: torch.Tensor, image_size: Size) -> torch.Tensor:
    """``[H, W, D]`` feature grid → the rows and columns that cover the image."""
    gh, gw = features.shape[:2]
    uh, uw = unpadded_shape(image_size, (gh, gw))
    top, left = (gh - uh) // 2, (gw - uw) // 2
    return features[top : top + uh, left : left + uw]


def num_image_tokens(image_size: Size, pinpoints: Sequence[Size], tile: int, patch: int) -> int:
    """Visual tokens of one image: the global view's ``(tile/patch)²``, then the unpadded tile
    grid with a newline after each row. transformers' ``LlavaNextProcessor`` gives the same
    count (with ``num_additional_image_tokens`` matching the feature selection)."""
    side = tile // patch
    rows, cols = grid_shape(image_size, pinpoints, tile)
    uh, uw = unpadded_shape(image_size, (rows * side, cols * side))
    return side * side + uh * (uw + 1)


__all__ = [
    "LLAVA_NEXT_GRIDS",
    "Size",
    "anyres_pixels",
    "centre_padding",
    "check_pinpoints",
    "fitted_size",
    "grid_pinpoints",
    "grid_range",
    "grid_shape",
    "num_image_tokens",
    "num_views",
    "resize_and_pad",
    "select_best_resolution",
    "split_tiles",
    "unpad",
    "unpadded_shape",
]
