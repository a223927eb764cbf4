"""Checks on what the Python API's ``encode_image`` / ``encode_text`` are given, so a PIL image,
a list of strings or a tensor of the wrong shape gets an error that says what to do instead of
a shape error from deep inside torch."""

from __future__ import annotations

import torch

from vlkit.errors import VlkitError


def check_pixels(pixel_values, patch_size: int) -> None:
    """``pixel_values`` must be a float tensor ``[B, 3, H, W]`` of at least one patch."""
    if not isinstance(pixel_values, torch.Tensor):
        hint = "model.processor.batch(images)" if isinstance(pixel_values, (list, tuple)) else "model.processor.batch([image])"
        what = "PIL image" if type(pixel_values).__module__.startswith("PIL") else type(pixel_values).__name__
        raise VlkitError(f"encode_image takes a pixel tensor [B,3,H,W], got a {what}; use {hint} first")
    shape = tuple(pixel_values.shape)
    if pixel_values.dim() != 4:
        hint = " (one image: add the batch dimension, pixels[None])" if pixel_values.dim() == 3 else ""
        raise VlkitError(f"encode_image takes a pixel tensor [B,3,H,W], got shape {shape}{hint}")
    if shape[1] != 3:
        hint = " (channels last: use model.processor.batch(images), or pixels.permute(0, 3, 1, 2))" if shape[3] == 3 else ""
        raise VlkitError(f"encode_image takes 3 colour channels first [B,3,H,W], got shape {shape}{hint}")
    if not pixel_values.is_floating_point():
        raise VlkitError(
            f"encode_image got {pixel_values.dtype} pixels; expected floats normalised by model.processor "
            "(use model.processor.batch(images))"
        )
    if min(shape[2:]) < patch_size:
        raise VlkitError(f"encode_image got {shape[2]}x{shape[3]} pixels, smaller than one {patch_size}-pixel patch")


def check_tokens(input_ids, attention_mask, vocab_size: int) -> None:
    """``input_ids`` must be integer ids ``[B, L]`` inside the vocabulary; the mask, if any, the same shape."""
    if isinstance(input_ids, dict) and "input_ids" in input_ids:
        raise VlkitError("encode_text takes tensors, not the tokenizer's dict: use model.encode_text(**model.tokenizer(texts))")
    if not isinstance(input_ids, torch.Tensor):
        raise VlkitError(
            f"encode_text takes token ids [B,L], got a {type(input_ids).__name__}; "
            "use model.encode_text(**model.tokenizer(texts)) for strings"
        )
    if input_ids.dim() != 2:
        hint = " (one text: add the batch dimension, ids[None])" if input_ids.dim() == 1 else ""
        raise VlkitError(f"encode_text takes token ids [B,L], got shape {tuple(input_ids.shape)}{hint}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise VlkitError(f"encode_text takes integer token ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise VlkitError(f"encode_text got an empty batch of token ids, shape {tuple(input_ids.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise VlkitError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(input_ids.shape)} like input_ids")
    lo, hi = (int(v) for v in torch.aminmax(input_ids))
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise VlkitError(
            f"token id {bad} is outside this model's vocabulary of {vocab_size} (ids 0..{vocab_size - 1}); "
            "was the text tokenized for another model?"
        )
