"""Batched embedding of images and texts with any model that has ``encode_image``/``encode_text``."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlkit.precision import autocast


def _autocast(model: torch.nn.Module, precision: str):
    return autocast(precision, next(model.parameters()).device)


@torch.no_grad()
def embed_images(
    model, pixel_batches: Iterable[torch.Tensor], precision: str = "fp32", progress: bool = False, total: int | None = None
) -> torch.Tensor:
    """L2-normalised image embeddings ``[N, D]`` (fp32) from batches of pixel tensors."""
    device = next(model.parameters()).device
    out = []
    for pixels in tqdm(pixel_batches, desc="images", disable=not progress, total=total, unit="batch"):
        with _autocast(model, precision):
            out.append(model.encode_image(pixels.to(device)).float())
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def embed_texts(model, texts: list[str], batch_size: int = 256, precision: str = "fp32", progress: bool = False) -> torch.Tensor:
    """L2-normalised text embeddings ``[N, D]`` using the model's attached tokenizer."""
    if model.tokenizer is None:
        raise RuntimeError("the model has no tokenizer attached; load it with vlkit.load")
    device = next(model.parameters()).device
    out = []
    starts = range(0, len(texts), batch_size)
    for i in tqdm(starts, desc="texts", disable=not progress, unit="batch"):
        tokens = model.tokenizer(texts[i : i + batch_size])
        with _autocast(model, precision):
            feats = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        out.append(feats.float())
    return F.normalize(torch.cat(out), dim=-1)
