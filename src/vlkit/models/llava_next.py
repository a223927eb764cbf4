"""LLaVA-NeXT: LLaVA with AnyRes images and, optionally, videos (LLaVA-NeXT-Video).

An image is seen as a downsized global view plus a grid of tiles (:mod:`vlkit.vision.anyres`);
its visual tokens are the global view's, then the tiles' feature grid cut back to the image's
aspect ratio with a learned ``image_newline`` vector after each row. A video's frames each go
through the tower alone, their token grid average- (or max-) pooled 2×2 before the connector,
and take ``video_token_id`` positions. Everything else (layer selection, connector, masked
scatter, loss, generation) is :class:`~vlkit.models.llava.Llava`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlkit.config import NonNegativeInt, OneOf, PositiveInt
from vlkit.errors import VlkitError
from vlkit.models.llava import Llava, LlavaConfig
from vlkit.models.llava_processor import LlavaProcessor
from vlkit.vision import anyres
from vlkit.vision.preprocess import ImageProcessor

Pinpoints = tuple[tuple[PositiveInt, PositiveInt], ...]


@dataclass
class LlavaNextConfig(LlavaConfig):
    """:class:`LlavaConfig` plus ``image_grid_pinpoints`` (the ``(height, width)`` resolutions
    an image may be tiled at, multiples of the tower's image size; default llava-v1.6's) and,
    for video, ``video_token_id`` with the ``video_pool`` ("average" or "max") over
    ``video_pool_stride``² patches of each frame."""

    image_grid_pinpoints: Pinpoints = tuple(anyres.grid_pinpoints(336))
    video_token_id: NonNegativeInt | None = None
    video_pool: Annotated[str, OneOf(("average", "max"))] = "average"
    video_pool_stride: PositiveInt = 2

    def __post_init__(self):
        super().__post_init__()
        self.image_grid_pinpoints = tuple(anyres.check_pinpoints(list(self.image_grid_pinpoints), self.vision.image_size))
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(f"AnyRes needs whole patches per tile: image_size {self.vision.image_size} is not a multiple "
                             f"of patch_size {self.vision.patch_size}")  # fmt: skip
        video = self.video_token_id
        if video is not None and (video >= self.lm.vocab_size or video == self.image_token_id):
            raise ValueError(f"video_token_id {video} must be an id of the LM's vocabulary of {self.lm.vocab_size} "
                             f"other than image_token_id {self.image_token_id}")  # fmt: skip

    @property
    def grid_side(self) -> int:
        """Patches along a tile's side: each tile's features are a ``grid_side``² grid."""
        return self.vision.image_size // self.vision.patch_size


class LlavaNext(Llava):
    """:class:`Llava` whose images are AnyRes views (``image_sizes`` say each image's size) and
    which, with ``video_token_id`` set, also takes ``pixel_values_videos``."""

    def __init__(self, cfg: LlavaNextConfig):
        super().__init__(cfg)
        side = cfg.grid_side
        per_tile = super().num_image_tokens()
        if per_tile != side * side:
            raise ValueError(
                f"AnyRes arranges each tile's visual tokens in its {side}x{side} patch grid, but this tower, feature "
                f"selection ({cfg.vision_feature_select_strategy!r}) and {cfg.connector!r} connector give {per_tile}; "
                "expected one token per patch ('default' with a class token, 'full' without; a linear or mlp connector)"
            )
        self.image_newline = nn.Parameter(torch.randn(cfg.lm.hidden_size) / math.sqrt(cfg.lm.hidden_size))

    # ---------------------------------------------------------------- images
    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Image tokens an image of ``height`` × ``width`` pixels (default one tile) takes in
        ``input_ids``, as transformers' ``LlavaNextProcessor`` counts them."""
        v = self.cfg.vision
        size = (height or v.image_size, width or v.image_size)
        return anyres.num_image_tokens(size, self.cfg.image_grid_pinpoints, v.image_size, v.patch_size)

    def image_features(self, pixel_values: torch.Tensor, image_sizes=None) -> list[torch.Tensor]:
        """Each image's visual tokens ``[M_i, D_lm]``. ``pixel_values``: every image's views
        concatenated, ``[views, 3, S, S]``, or transformers' ``[images, max_views, 3, S, S]``
        padded with zero views; ``image_sizes``: each image's ``(height, width)``."""
        sizes = self._sizes(image_sizes)
        views = self._views(sizes)
        pixels = self._real_views(pixel_values, views)
        features = self.connector(self.vision_features(pixels)).split(views)
        return [self.pack(f, s) for f, s in zip(features, sizes)]

    def pack(self, features: torch.Tensor, image_size: anyres.Size) -> torch.Tensor:
        """One image's ``[views, side², D]`` features → its tokens: the global view's, then the
        tiles' grid unpadded to the image, each row followed by ``image_newline``."""
        side = self.cfg.grid_side
        rows, cols = anyres.grid_shape(image_size, self.cfg.image_grid_pinpoints, self.cfg.vision.image_size)
        grid = features[1:].view(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, -1)
        grid = anyres.unpad(grid, image_size)
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, -1)
        return torch.cat([features[0], torch.cat([grid, newline], dim=1).flatten(0, 1)])

    def _sizes(self, image_sizes) -> list[anyres.Size]:
        if image_sizes is None:
            raise VlkitError("LLaVA-NeXT needs image_sizes, each image's (height, width), to tile and unpad its features")
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
        ok = isinstance(sizes, (list, tuple)) and all(
            isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s) for s in sizes)
        if not ok:
            raise VlkitError(f"image_sizes must be one (height, width) pair of positive ints per image, got {image_sizes!r:.120}")
        return [(int(h), int(w)) for h, w in sizes]

    def _views(self, sizes: list[anyres.Size]) -> list[int]:
        return [anyres.num_views(s, self.cfg.image_grid_pinpoints, self.cfg.vision.image_size) for s in sizes]

    @staticmethod
    def _real_views(pixel_values: torch.Tensor, views: list[int]) -> torch.Tensor:
        """``[sum(views), 3, S, S]``: the views as given, or a padded 5-D batch with its padding dropped."""
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(views) or pixel_values.shape[1] < max(views, default=0):
                raise VlkitError(f"pixel_values {tuple(pixel_values.shape)} hold {pixel_values.shape[0]} images of up to "
                                 f"{pixel_values.shape[1]} views; image_sizes ask for {len(views)} images of {views} views")
            return torch.cat([p[:n] for p, n in zip(pixel_values, views)])
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4 and pixel_values.shape[0] != sum(views):
            raise VlkitError(f"pixel_values hold {pixel_values.shape[0]} views but image_sizes ask for {sum(views)} "
                             f"({views} per image: the global view and the tiles)")  # fmt: skip
        return pixel_values

    # ---------------------------------------------------------------- videos
    def num_video_tokens(self, frames: int) -> int:
        """Video tokens a clip of ``frames`` frames takes: each frame's pooled grid."""
        return frames * (self.cfg.grid_side // self.cfg.video_pool_stride) ** 2

    def video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """``[videos, frames · m, D_lm]`` for ``[videos, frames, 3, S, S]``: each frame's patch grid
        pooled ``stride``×``stride`` (m patches left) before the connector, frames in order."""
        videos = pixel_values_videos
        if not isinstance(videos, torch.Tensor) or videos.dim() != 5:
            shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
            raise VlkitError(f"pixel_values_videos must be [videos, frames, 3, H, W], got {shape}")
        tokens = self.vision_features(videos.flatten(0, 1))
        pooled = pool_frames(tokens, self.cfg.grid_side, self.cfg.video_pool_stride, self.cfg.video_pool)
        return self.connector(pooled).reshape(videos.shape[0], -1, self.cfg.lm.hidden_size)

    def inputs_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, image_sizes=None,
                      pixel_values_videos: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """:meth:`Llava.inputs_embeds`, then the videos' tokens written over ``video_token_id``'s positions."""
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5:
            pixel_values = self._real_views(pixel_values, self._views(self._sizes(image_sizes)))
        embeds = super().inputs_embeds(input_ids, pixel_values, image_sizes)
        video_id = self.cfg.video_token_id
        mask = input_ids.to(embeds.device) == video_id if video_id is not None else None
        tokens = 0 if mask is None else int(mask.sum())
        if pixel_values_videos is None:
            if tokens:
                raise VlkitError(f"input_ids hold {tokens} video tokens (id {video_id}) but no pixel_values_videos were given")
            return embeds
        if video_id is None:
            raise VlkitError("pixel_values_videos given to a LLaVA-NeXT without a video_token_id; expected images only")
        features = self.video_features(pixel_values_videos.to(embeds.device)).flatten(0, 1)
        if features.shape[0] != tokens:
            raise VlkitError(f"input_ids hold {tokens} video tokens (id {video_id}; per row {mask.sum(1).tolist()}) but the "
                             f"videos give {features.shape[0]} features ({self.num_video_tokens(1)} per frame)")  # fmt: skip
        return embeds.masked_scatter(mask[..., None], features.to(embeds.dtype))


def pool_frames(tokens: torch.Tensor, side: int, stride: int = 2, mode: str = "average") -> torch.Tensor:
    """``[frames, side², D]`` → ``[frames, (side // stride)², D]``: each frame's patch grid
    pooled over ``stride``×``stride`` blocks (a ragged last row or column is dropped)."""
    frames, n, dim = tokens.shape
    if n != side * side:
        raise VlkitError(f"a frame has {n} tokens; pooling expects its {side}x{side} patch grid ({side * side} tokens)")
    grid = tokens.view(frames, side, side, dim).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, stride) if mode == "average" else F.max_pool2d(grid, stride)
    return pooled.flatten(2).transpose(1, 2)


class AnyResImages:
    """An image → its AnyRes views ``[views, 3, S, S]`` (global view first) through ``processor``."""

    def __init__(self, processor: ImageProcessor, pinpoints: Sequence[anyres.Size]):
        self.processor, self.pinpoints = processor, list(pinpoints)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return anyres.anyres_pixels(image, self.processor, self.pinpoints)


class LlavaNextProcessor(LlavaProcessor):
    """:class:`LlavaProcessor` for AnyRes: each ``<image>`` expands to its own image's token count,
    and a batch's ``pixel_values`` are every image's views concatenated, with ``image_sizes``."""

    @classmethod
    def for_model(cls, model: LlavaNext, template=None) -> "LlavaNextProcessor":
        """The processor of a loaded LLaVA-NeXT: its preprocessing cut into tiles of the tower's size."""
        tile = model.cfg.vision.image_size
        if model.processor and model.processor.output_size != tile:
            raise VlkitError(f"the image preprocessing gives {model.processor.output_size}-pixel views but the vision tower "
                             f"takes {tile}; AnyRes tiles are the tower's size")  # fmt: skip
        return cls(AnyResImages(model.processor, model.cfg.image_grid_pinpoints), model.tokenizer,
                   lambda image: model.num_image_tokens(image.height, image.width), template,
                   model.lm.config.max_position_embeddings)

    def process_images(self, images: Sequence[Image.Image], sample: str = "the sample") -> dict[str, torch.Tensor]:
        if not images:
            return {}
        views = [self._pixels(image, sample, i) for i, image in enumerate(images)]
        sizes = torch.tensor([[image.height, image.width] for image in images], dtype=torch.long)
        return {"pixel_values": torch.cat(views), "image_sizes": sizes}


__all__ = ["AnyResImages", "LlavaNext", "LlavaNextConfig", "LlavaNextProcessor", "pool_frames"]
