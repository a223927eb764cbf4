"""A tiny random shapes CLIP and tiny diffusion overrides, shared by the diffusion tests."""

from __future__ import annotations

from pathlib import Path

import torch

from vlkit.data.shapes import ShapesWorld
from vlkit.models.clip import CLIP, CLIPConfig
from vlkit.text.encoder import TextConfig
from vlkit.text.tokenizer import word_level
from vlkit.train.checkpoint import save_model
from vlkit.train.clip import shapes_processor, shapes_vocabulary
from vlkit.vision.vit import ViTConfig

CONTEXT = 24
TINY = [
    "--model.unet.patch=2", "--model.unet.channels=[8,16]", "--model.unet.attention_levels=[1]", "--model.unet.num_heads=2",
    "--model.unet.norm_groups=4", "--model.schedule.num_train_timesteps=100", "--data.image_size=16", "--loop.steps=3",
    "--loop.batch_size=4", "--optim.warmup_steps=1", "--loop.precision=fp32", "--loop.log_every=1",
]  # fmt: skip


def tiny_clip(folder: Path) -> Path:
    """A tiny random CLIP with the shapes world's vocabulary, saved as a vlkit model folder."""
    torch.manual_seed(0)
    text = TextConfig(vocab_size=1, context_length=CONTEXT, width=16, depth=1, num_heads=2, act="gelu")
    tok = word_level(shapes_vocabulary(ShapesWorld(16, 1, 2, 0), 200) | {"to", "the", "left", "right"}, CONTEXT)
    text.vocab_size = tok.vocab_size
    vision = ViTConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, act="gelu")
    clip = CLIP(CLIPConfig(vision=vision, text=text, embed_dim=16))
    clip.tokenizer, clip.processor = tok, shapes_processor(16)
    save_model(folder, clip, "clip")
    return folder
