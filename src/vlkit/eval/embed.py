"""Batched embedding of images and texts with any model that has ``encode_image``/``encode_text``."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlkit.errors import VlkitError
from vlkit.precision import autocast


def _autocast(model: torch.nn.Module, precision: str):
    return autocast(precision, next(model.parameters()).device)


@torch.no_grad()
def embed_images(
    model, pixel_batches: Iterable[torch.Tensor], precision: str = "fp32", progress: bool = False, total: int | None = None
) -> torch.Tensor:
    """L2-normalised image embeddings ``[N, D]`` (fp32) from batches of pixel tensors."""
    if isinstance(pixel_batches, torch.Tensor):
        pixel_batches = [pixel_batches]
    device = next(model.parameters()).device
    out = []
    for pixels in tqdm(pixel_batches, desc="images", disable=not progress, total=total, unit="batch"):
        if not isinstance(pixels, torch.Tensor):
            raise VlkitError(f"embed_images takes batches of pixel tensors [B,3,H,W], got a {type(pixels).__name__}; "
                             "use model.processor.batch(images) for each batch")
        with _autocast(model, precision):
            out.append(model.encode_image(pixels.to(device)).float())
    if not out:
        raise VlkitError("embed_images got no image batches; expected at least one [B,3,H,W] pixel tensor")
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def embed_texts(model, texts: list[str], batch_size: int = 256, precision: str = "fp32", progress: bool = False) -> torch.Tensor:
    """L2-normalised text embeddings ``[N, D]`` using the model's attached tokenizer."""
    if model.tokenizer is None:
        raise VlkitError("the model has no tokenizer attached; set model.tokenizer or load the model with vlkit.load")
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise VlkitError("embed_texts got an empty list of texts; expected at least one")
    if batch_size < 1:
        raise VlkitError(f"embed_texts: batch_size {batch_size}; expected a positive number")
    device = next(model.parameters()).device
    out = []
    starts = range(0, len(texts), batch_size)
    for i in tqdm(starts, desc="texts", disable=not progress, unit="batch"):
        tokens = model.tokenizer(texts[i : i + batch_size])
        with _autocast(model, precision):
            feats = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        out.append(feats.float())
    return F.normalize(torch.cat(out), dim=-1)
