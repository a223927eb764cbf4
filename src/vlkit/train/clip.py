"""Train CLIP or SigLIP from a recipe: on the shapes world or a folder of captioned images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlkit.config import from_dict, to_dict, write_json
from vlkit.data.pairs import CaptionFolder, Collate, ShapesPairs, SkippingDataset
from vlkit.data.shapes import ShapesWorld
from vlkit.models.clip import CLIP, CLIPConfig
from vlkit.text.tokenizer import Tokenizer, word_level, words_of
from vlkit.train.distributed import setup, teardown
from vlkit.train.loop import LoopConfig, OptimConfig, fit
from vlkit.vision.preprocess import ImageProcessor


@dataclass
class DataConfig:
    """``source``: "shapes" (the bundled world) or a folder holding ``captions.jsonl``.
    ``group_size``: shapes scenes come in families of this many hard negatives (1 = none)."""

    source: str = "shapes"
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    object_sizes: tuple[float, float] = (0.25, 0.4)
    group_size: int = 4
    seed: int = 0
    on_bad_sample: str = "error"

    def __post_init__(self):
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")


@dataclass
class CLIPRecipe:
    model: CLIPConfig = field(default_factory=CLIPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)


def shapes_world(data: DataConfig) -> ShapesWorld:
    return ShapesWorld(data.image_size, data.min_objects, data.max_objects, data.seed, tuple(data.object_sizes))


def shapes_vocabulary(world: ShapesWorld, n: int = 3000) -> set[str]:
    """Every word the world's captions, questions, answers and expressions use."""
    texts = []
    for i in range(n):
        s = world.scene(i)
        texts += [c.text for c in s.captions] + [r["text"] for r in s.referring]
        texts += [q["question"] for q in s.vqa] + [q["answer"] for q in s.vqa]
    return words_of(texts)


def build_tokenizer(data: DataConfig, context_length: int) -> Tokenizer:
    """A word-level tokenizer over the training captions' vocabulary."""
    if data.source == "shapes":
        return word_level(shapes_vocabulary(shapes_world(data)), context_length)
    folder = CaptionFolder(Path(data.source), ImageProcessor())
    import json

    texts = []
    for line in folder.records:
        try:
            texts += [c for c in json.loads(line).get("captions", []) if isinstance(c, str)]
        except (json.JSONDecodeError, AttributeError):
            continue
    return word_level(words_of(texts), context_length)


def shapes_processor(image_size: int) -> ImageProcessor:
    return ImageProcessor(size=image_size, crop_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def build_dataset(recipe: CLIPRecipe, processor: ImageProcessor):
    data = recipe.data
    if data.source == "shapes":
        if recipe.loop.batch_size % data.group_size:
            raise ValueError(f"loop.batch_size {recipe.loop.batch_size} must be a multiple of data.group_size {data.group_size}")
        return ShapesPairs(shapes_world(data), processor, recipe.loop.steps * recipe.loop.batch_size, data.group_size)
    dataset = CaptionFolder(Path(data.source), processor)
    return SkippingDataset(dataset) if data.on_bad_sample == "skip" else dataset


def train_clip(recipe: CLIPRecipe, out: str | Path, resume: bool = False, stop_at: int | None = None) -> dict:
    """Train per the recipe into the run folder ``out``; returns the training summary.
    ``stop_at`` stops after that step as if interrupted (see :func:`~vlkit.train.loop.fit`)."""
    out = Path(out)
    world = setup()
    try:
        torch.manual_seed(recipe.loop.seed)
        tokenizer = build_tokenizer(recipe.data, recipe.model.text.context_length)
        cfg = recipe.model
        cfg.text.vocab_size = tokenizer.vocab_size
        cfg.text.eot_token_id = None  # [EOS] has the highest id: pool at the argmax, as OpenAI does
        cfg.vision.image_size = recipe.data.image_size
        model = CLIP(cfg)
        model.tokenizer = tokenizer
        model.processor = shapes_processor(recipe.data.image_size)
        dataset = build_dataset(recipe, model.processor)
        loop = recipe.loop
        if recipe.data.source == "shapes" and recipe.data.group_size > 1:
            loop = LoopConfig(**{**to_dict(loop), "batch_size": loop.batch_size // recipe.data.group_size})
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "recipe.json", to_dict(recipe))
        device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        summary = fit(
            model,
            dataset,
            Collate(tokenizer),
            loop,
            recipe.optim,
            out,
            "clip",
            world=world,
            resume=resume,
            device=device,
            after_step=CLIP.clamp_logit_scale,
            stop_at=stop_at,
        )
        if summary["skipped"] and world.is_main:
            print(f"skipped {summary['skipped']} bad samples (see metrics.jsonl)")
        return summary
    finally:
        teardown(world)


def load_recipe(data: dict) -> CLIPRecipe:
    return from_dict(CLIPRecipe, data, "recipe")
