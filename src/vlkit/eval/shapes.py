"""The shapes-world benchmarks: zero-shot over the 40 classes, truth-checked retrieval, and
left/right relations against the mirrored scene.

Held-out scenes come from seeds no training run uses. In retrieval a text and an image
match when the caption is *true of* the scene (``Caption.describes``), so a vague caption
("two objects") is rightly matched by every two-object image.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from vlkit.data.shapes import TEMPLATES, Scene, ShapesWorld, class_prompts
from vlkit.errors import VlkitError
from vlkit.eval.embed import embed_images, embed_texts
from vlkit.eval.retrieval import retrieval
from vlkit.eval.zeroshot import zeroshot

ZEROSHOT_SEED = 1_000_001
RETRIEVAL_SEED = 1_000_002
MIRROR_SEED = 1_000_004
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


def mirror_split(world: ShapesWorld, n: int = 400):
    """Held-out scenes, each with a caption that places one object left or right of another, and
    the scene mirrored left to right: the same objects (every shape is symmetric about its
    vertical axis), so only the relation tells them apart, and the caption is false of the mirror.
    A model that reads relations scores the caption higher on the scene (chance: half)."""
    if world.max_objects < 2:
        raise VlkitError(f"a world of at most {world.max_objects} object per scene has no relations to mirror")
    held = ShapesWorld(world.image_size, 2, world.max_objects, MIRROR_SEED, world.sizes)
    scenes, mirrors, captions = [], [], []
    for i in range(50 * n):
        if len(scenes) == n:
            break
        scene = held.scene(i)
        mirror = Scene(scene.image_size, [replace(o, cx=scene.image_size - o.cx) for o in scene.objects])
        sided = [c for c in scene.captions if c.relation and c.relation[1] in ("left of", "right of") and not c.describes(mirror)]
        if sided:
            scenes.append(scene)
            mirrors.append(mirror)
            captions.append(sided[0])
    if len(scenes) < n:
        raise VlkitError(f"only {len(scenes)} of {50 * n} held-out scenes have a left/right caption false of their mirror; {n} wanted")
    return scenes, mirrors, captions


def mirror_accuracy(scores: torch.Tensor, mirrored: torch.Tensor) -> float:
    """The fraction of captions scored higher on their scene than on its mirror (ties count half)."""
    return ((scores > mirrored).float() + 0.5 * (scores == mirrored).float()).mean().item()


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
    sided, mirrors, sided_captions = mirror_split(world)
    sided_text = embed_texts(model, [c.text for c in sided_captions], precision=precision)
    on_scene, on_mirror = (
        (embed_images(model, pixels(model, group), precision) * sided_text).sum(dim=-1) for group in (sided, mirrors)
    )
    return {
        "zeroshot_top1": zs["top1"],
        "zeroshot_top5": zs["top5"],
        "zeroshot_mean_per_class_recall": zs["mean_per_class_recall"],
        **rt,
        "relation_mirror_acc": mirror_accuracy(on_scene, on_mirror),
        "confusion": zs["confusion"],
        "scenes": scenes,
        "captions": captions,
        "similarity": text_feats @ image_feats.T,
        "truth": truth,
    }
