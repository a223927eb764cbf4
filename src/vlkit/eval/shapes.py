"""The shapes-world benchmarks: zero-shot over the 40 classes and truth-checked retrieval.

Held-out scenes come from seeds no training run uses. In retrieval a text and an image
match when the caption is *true of* the scene (``Caption.describes``), so a vague caption
("two objects") is rightly matched by every two-object image.
"""

from __future__ import annotations

import numpy as np
import torch

from vlkit.data.shapes import TEMPLATES, ShapesWorld, class_prompts
from vlkit.eval.embed import embed_images, embed_texts
from vlkit.eval.retrieval import retrieval
from vlkit.eval.zeroshot import zeroshot

ZEROSHOT_SEED = 1_000_001
RETRIEVAL_SEED = 1_000_002
def pixels(model, scenes, batch_size: int = 250):
    """Batches of preprocessed renders of ``scenes``."""
    for i in range(0, len(scenes), batch_size):
        yield model.processor.batch([s.render() for s in scenes[i : i + batch_size]])


def zeroshot_split(world: ShapesWorld, n: int = 1000):
    held = ShapesWorld(world.image_size, 1, 1, ZEROSHOT_SEED, world.sizes)
    return [held.single(i) for i in range(n)]


def retrieval_split(world: ShapesWorld, n: int = 1000):
    """Held-out 1–3-object scenes, each with one of its captions (chosen by seed)."""
    held = ShapesWorld(world.image_size, world.min_objects, world.max_objects, RETRIEVAL_SEED, world.sizes)
    scenes = [held.scene(i) for i in range(n)]
    rng = np.random.default_rng(RETRIEVAL_SEED)
    captions = [s.captions[int(rng.integers(len(s.captions)))] for s in scenes]
    return scenes, captions


def truth_matrix(scenes, captions) -> torch.Tensor:
    """``[images, texts]``: whether each caption is true of each scene."""
    return torch.tensor([[c.describes(s) for c in captions] for s in scenes], dtype=torch.bool)


@torch.no_grad()
def evaluate(model, world: ShapesWorld, n: int = 1000, precision: str = "fp32") -> dict:
    """Zero-shot and retrieval metrics plus what the report draws (confusion, rankings)."""
    singles = zeroshot_split(world, n)
    feats = embed_images(model, pixels(model, singles), precision)
    labels = torch.tensor([s.label for s in singles])
    zs = zeroshot(model, feats, labels, class_prompts(), TEMPLATES)
    scenes, captions = retrieval_split(world, n)
    image_feats = embed_images(model, pixels(model, scenes), precision)
    text_feats = embed_texts(model, [c.text for c in captions], precision=precision)
    truth = truth_matrix(scenes, captions)
    rt = retrieval(image_feats, text_feats, truth)
    return {
        "zeroshot_top1": zs["top1"],
        "zeroshot_top5": zs["top5"],
        "zeroshot_mean_per_class_recall": zs["mean_per_class_recall"],
        **rt,
        "confusion": zs["confusion"],
        "scenes": scenes,
        "captions": captions,
        "similarity": text_feats @ image_feats.T,
        "truth": truth,
    }
