"""CLIP and SigLIP: two towers, projections into a shared space and a learned temperature."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import NonNegativeFloat, PositiveInt, validate
from vlkit.errors import VlkitError
from vlkit.losses import clip_loss, siglip_loss
from vlkit.models.inputs import check_pixels, check_tokens
from vlkit.text.encoder import TextConfig, TextEncoder
from vlkit.vision.vit import ViT, ViTConfig

PROJECTIONS = ("linear", "linear_bias", "none")


def _projection(kind: str, width: int, embed_dim: int) -> nn.Module:
    if kind not in PROJECTIONS:
        raise ValueError(f"unknown projection {kind!r}; expected one of {PROJECTIONS}")
    if kind == "none":
        if width != embed_dim:
            raise ValueError(f"projection 'none' needs tower width {width} == embed_dim {embed_dim}")
        return nn.Identity()
    return nn.Linear(width, embed_dim, bias=kind == "linear_bias")


@dataclass
class CLIPConfig:
    """Defaults are OpenAI CLIP ViT-B/32. ``loss``: "softmax" (CLIP) or "sigmoid" (SigLIP,
    which also learns a logit bias)."""

    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: PositiveInt = 512
    vision_projection: str = "linear"
    text_projection: str = "linear"
    loss: str = "softmax"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None
    max_logit_scale: float = math.log(100)
    label_smoothing: NonNegativeFloat = 0.0

    def __post_init__(self):
        validate(self)
        if self.loss not in ("softmax", "sigmoid"):
            raise ValueError(f"CLIPConfig.loss must be 'softmax' or 'sigmoid', got {self.loss!r}")
        if self.loss == "sigmoid" and self.logit_bias_init is None:
            raise ValueError("CLIPConfig.loss='sigmoid' needs logit_bias_init (SigLIP uses -10)")


class CLIP(nn.Module):
    """``encode_image`` / ``encode_text`` give projected, unnormalised embeddings (like
    transformers' ``get_image_features``); ``forward`` returns the training loss."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = ViT(cfg.vision)
        self.text = TextEncoder(cfg.text)
        self.vision_proj = _projection(cfg.vision_projection, cfg.vision.width, cfg.embed_dim)
        self.text_proj = _projection(cfg.text_projection, cfg.text.width, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.logit_bias_init))) if cfg.logit_bias_init is not None else None
        self.tokenizer = None
        self.processor = None

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixels(pixel_values, self.cfg.vision.patch_size)
        return self.vision_proj(self.vision.pooled(pixel_values))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_tokens(input_ids, attention_mask, self.cfg.text.vocab_size)
        return self.text_proj(self.text.pooled(input_ids, attention_mask))

    def similarity(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Logits ``[images, texts]`` as the model is trained to score them."""
        logits = self.logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
        return logits if self.logit_bias is None else logits + self.logit_bias

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        image = F.normalize(self.encode_image(pixel_values), dim=-1)
        text = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        scale = self.logit_scale.exp()
        if self.cfg.loss == "sigmoid":
            return siglip_loss(image, text, scale, self.logit_bias)
        return clip_loss(image, text, scale, self.cfg.label_smoothing)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the temperature in ``[0, max_logit_scale]`` after each step, as OpenCLIP does."""
        self.logit_scale.clamp_(0, self.cfg.max_logit_scale)

    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Tokenise and embed strings with the attached tokenizer (normalised)."""
        if self.tokenizer is None:
            raise VlkitError("this model has no tokenizer attached; set model.tokenizer or load the model with vlkit.load")
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise VlkitError("embed_texts got an empty list of texts; expected at least one")
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[i : i + batch_size])
            device = self.logit_scale.device
            out.append(self.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)))
        return F.normalize(torch.cat(out), dim=-1)
