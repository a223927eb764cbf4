"""One-tower models: a vision encoder (DINOv2, CLIP vision-only checkpoints) or a text encoder
(CLIP text-only checkpoints), with the same ``encode_*`` interface as :class:`CLIP`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.errors import VlkitError
from vlkit.models.clip import _projection
from vlkit.models.inputs import check_pixels, check_tokens
from vlkit.text.encoder import TextConfig, TextEncoder
from vlkit.vision.vit import ViT, ViTConfig


class MissingTowerError(VlkitError):
    """Raised when a one-tower model is asked for the tower it does not have (a misuse the
    command line reports as an error, not a traceback)."""


@dataclass
class VisionEncoderConfig:
    """A ViT with an optional projection (``"none"``: the pooled embedding is the output)."""

    vision: ViTConfig = field(default_factory=ViTConfig)
    embed_dim: int | None = None
    vision_projection: str = "none"


class VisionEncoder(nn.Module):
    """Vision only: ``encode_image`` gives the (projected) pooled embedding; ``encode_text`` raises."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = ViT(cfg.vision)
        embed_dim = cfg.embed_dim or cfg.vision.width
        self.vision_proj = _projection(cfg.vision_projection, cfg.vision.width, embed_dim)
        self.tokenizer = None
        self.processor = None

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixels(pixel_values, self.cfg.vision.patch_size)
        return self.vision_proj(self.vision.pooled(pixel_values))

    def encode_text(self, *args, **kwargs) -> torch.Tensor:
        raise MissingTowerError("this model is vision-only (loaded from a checkpoint without a text tower); it cannot encode text")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encode_image(pixel_values), dim=-1)


@dataclass
class TextEncoderConfig:
    """A text transformer with an optional projection."""

    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int | None = None
    text_projection: str = "none"


class TextTower(nn.Module):
    """Text only: ``encode_text`` gives the (projected) pooled embedding; ``encode_image`` raises."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(cfg.text)
        embed_dim = cfg.embed_dim or cfg.text.width
        self.text_proj = _projection(cfg.text_projection, cfg.text.width, embed_dim)
        self.tokenizer = None
        self.processor = None

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_tokens(input_ids, attention_mask, self.cfg.text.vocab_size)
        return self.text_proj(self.text.pooled(input_ids, attention_mask))

    def encode_image(self, *args, **kwargs) -> torch.Tensor:
        raise MissingTowerError("this model is text-only (loaded from a checkpoint without a vision tower); it cannot encode images")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
