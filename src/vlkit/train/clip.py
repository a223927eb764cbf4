"""Train CLIP or SigLIP from a recipe: on the shapes world or a folder of captioned images."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from vlkit.config import Bound, NonNegativeInt, OneOf, PositiveInt, build, key_rows, key_table, to_dict, validate
from vlkit.data.pairs import CaptionFolder, Collate, ShapesPairs, SkippingDataset
from vlkit.data.shapes import ShapesWorld
from vlkit.data.skips import ON_BAD_SAMPLE, SKIPPED_FILE
from vlkit.errors import ConfigError
from vlkit.models.clip import CLIP, CLIPConfig
from vlkit.text.tokenizer import Tokenizer, word_level, words_of
from vlkit.train.distributed import setup, teardown
from vlkit.train.loop import LoopConfig, OptimConfig, fit
from vlkit.vision.preprocess import ImageProcessor

SHAPES = "shapes"
"""The one named data source: the bundled shapes world. Any other ``data.source`` is a folder."""

ObjectSize = Annotated[float, Bound(0, 1, low_open=True, high_open=True)]


@dataclass
class DataConfig:
    """``source``: "shapes" (the bundled world) or a folder holding ``captions.jsonl``.
    ``group_size``: shapes scenes come in families of this many hard negatives (1 = none).
    ``object_sizes``: small and large object diameters as fractions of the image side.
    ``allow_outside_paths``: let a folder's records name images outside it (absolute, or ``..``)."""

    source: str = SHAPES
    image_size: PositiveInt = 64
    min_objects: PositiveInt = 1
    max_objects: PositiveInt = 3
    object_sizes: tuple[ObjectSize, ObjectSize] = (0.25, 0.4)
    group_size: PositiveInt = 4
    seed: NonNegativeInt = 0
    on_bad_sample: Annotated[str, OneOf(ON_BAD_SAMPLE)] = "error"
    allow_outside_paths: bool = False

    def __post_init__(self):
        validate(self)
        if self.max_objects < self.min_objects:
            raise ConfigError(f"max_objects {self.max_objects} is below min_objects {self.min_objects}", ("max_objects", "min_objects"))


@dataclass
class CLIPRecipe:
    model: CLIPConfig = field(default_factory=CLIPConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        validate(self)
        if self.data.source == SHAPES and self.loop.batch_size % self.data.group_size:
            raise ConfigError(
                f"loop.batch_size {self.loop.batch_size} must be a multiple of data.group_size {self.data.group_size} "
                "(shapes scenes come in families of that many)",
                ("loop.batch_size", "data.group_size"),
            )
        families = self.loop.batch_size // self.data.group_size if self.data.source == SHAPES else self.loop.batch_size
        if families % self.loop.grad_accum:
            raise ConfigError(
                f"loop.batch_size {self.loop.batch_size} in families of data.group_size {self.data.group_size} "
                f"does not split into loop.grad_accum {self.loop.grad_accum} micro-batches",
                ("loop.batch_size", "data.group_size", "loop.grad_accum"),
            )


DERIVED = {
    "model.vision.image_size": "data.image_size",
    "model.text.vocab_size": "the tokenizer built from the training captions",
    "model.text.eot_token_id": "the tokenizer ([EOS] has the highest id)",
}
"""Recipe keys that training sets itself, from what."""


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


def caption_folder(data: DataConfig, processor: ImageProcessor) -> CaptionFolder:
    """The folder ``data.source`` names; an error lists what a source may be when it is neither."""
    folder = Path(data.source)
    if not folder.is_dir():
        raise ConfigError(
            f"data.source {data.source!r}: no such folder; expected {SHAPES!r} (the bundled world, the only named "
            "data source) or a folder holding captions.jsonl",
            ("data.source",),
        )
    return CaptionFolder(folder, processor, allow_outside_paths=data.allow_outside_paths)


def build_tokenizer(data: DataConfig, context_length: int) -> Tokenizer:
    """A word-level tokenizer over the training captions' vocabulary."""
    if data.source == SHAPES:
        return word_level(shapes_vocabulary(shapes_world(data)), context_length)
    folder = caption_folder(data, ImageProcessor())
    texts = []
    for line in folder.records:  # bad records are reported when training reads them
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        captions = rec.get("captions") if isinstance(rec, dict) else None
        texts += [c for c in captions if isinstance(c, str)] if isinstance(captions, list) else []
    return word_level(words_of(texts), context_length)


def shapes_processor(image_size: int) -> ImageProcessor:
    return ImageProcessor(size=image_size, crop_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def build_dataset(recipe: CLIPRecipe, processor: ImageProcessor):
    data = recipe.data
    if data.source == SHAPES:
        return ShapesPairs(shapes_world(data), processor, recipe.loop.steps * recipe.loop.batch_size, data.group_size)
    dataset = caption_folder(data, processor)
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
            recipe=to_dict(recipe),
        )
        if summary["skipped"] and world.is_main:
            print(f"skipped {summary['skipped']} bad samples, each listed with its file and reason in {out / SKIPPED_FILE}")
        return summary
    finally:
        teardown(world)


def recipe_help() -> str:
    """How ``--key=value`` overrides work and every recipe key with its default and its type,
    generated from the recipe's dataclasses (the ``train --help`` epilog)."""
    return "\n".join(
        [
            "recipe overrides:",
            "  Any recipe key can be set on the command line as --key=value; it overrides the --recipe",
            "  file, which overrides the defaults below. Values are read as YAML: --loop.steps=200,",
            "  --optim.lr=1e-3, --loop.freeze=[vision], --model.logit_bias_init=null. A key names one",
            "  value (--loop.batch_size=64), not a whole section (--loop=...).",
            "",
            "recipe keys and their defaults:",
            *key_table(key_rows(CLIPRecipe, DERIVED)),
        ]
    )


def load_recipe(data: dict, overrides: list[str] = (), source: str | Path | None = None) -> CLIPRecipe:
    """A recipe from a dict (the contents of the recipe file ``source``) and ``--key=value``
    overrides; errors name the file too."""
    return build(CLIPRecipe, data, list(overrides), f"{source}: recipe" if source else "recipe", DERIVED)
