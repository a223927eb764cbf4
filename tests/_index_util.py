"""Shared helpers for the photo-index, web-page and endpoint tests: a tiny CLIP folder of any
width, and a folder of shapes images."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_clip(folder: Path, seed: int = 0, embed_dim: int = 8) -> Path:
    """A vlkit CLIP checkpoint folder (a few kB) with a word-level tokenizer and 32-pixel inputs."""
    from vlkit.models.clip import CLIP, CLIPConfig
    from vlkit.text.encoder import TextConfig
    from vlkit.text.tokenizer import word_level
    from vlkit.train.checkpoint import save_model
    from vlkit.vision.preprocess import ImageProcessor
    from vlkit.vision.vit import ViTConfig

    tok = word_level({"a", "red", "blue", "green", "yellow", "circle", "star", "square", "triangle"}, 16)
    cfg = CLIPConfig(vision=ViTConfig(image_size=32, patch_size=8, width=16, depth=1, num_heads=2),
                     text=TextConfig(vocab_size=tok.vocab_size, context_length=16, width=16, depth=1, num_heads=2),
                     embed_dim=embed_dim)  # fmt: skip
    torch.manual_seed(seed)
    model = CLIP(cfg)
    model.tokenizer = tok
    model.processor = ImageProcessor(size=32, crop_size=32)
    save_model(Path(folder), model, "clip")
    return Path(folder)


def shapes_images(folder: Path, n: int = 12, seed: int = 0) -> list[Path]:
    """``n`` shapes-world PNGs in two sub-folders; returns their paths."""
    from vlkit.data.shapes import ShapesWorld

    world = ShapesWorld(image_size=48, seed=seed)
    paths = []
    for i in range(n):
        scene = world.scene(i)
        path = Path(folder) / ("a" if i % 2 else "b") / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        scene.render().save(path)
        paths.append(path)
    return paths
