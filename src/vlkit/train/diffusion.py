"""Train the text-to-image diffusion model on the shapes world, conditioned on a trained CLIP's
frozen text tower, through the one training loop (checkpoints, exact resume, torchrun)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torch.utils.data import Dataset

from vlkit.config import Bound, NonNegativeFloat, NonNegativeInt, PositiveInt, build, key_rows, key_table, to_dict, validate
from vlkit.data.pairs import Collate
from vlkit.data.shapes import BACKGROUND, ShapesWorld
from vlkit.errors import ConfigError, VlkitError
from vlkit.models.diffusion import DiffusionConfig, TextToImage
from vlkit.train.clip import shapes_processor
from vlkit.train.distributed import setup, teardown
from vlkit.train.loop import LoopConfig, OptimConfig, fit
from vlkit.vision.preprocess import ImageProcessor

ObjectSize = Annotated[float, Bound(0, 1, low_open=True, high_open=True)]


@dataclass
class DiffusionDataConfig:
    """Scenes of ``min_objects``–``max_objects`` objects from the shapes world of ``seed``.
    ``object_weight`` > 0 weighs the loss on the objects' pixels ``1 + object_weight`` times the
    background's (see :meth:`TextToImage.forward`), so small objects are not drowned out."""

    image_size: PositiveInt = 64
    min_objects: PositiveInt = 1
    max_objects: PositiveInt = 2
    object_sizes: tuple[ObjectSize, ObjectSize] = (0.25, 0.4)
    seed: NonNegativeInt = 0
    object_weight: NonNegativeFloat = 0.0

    def __post_init__(self):
        validate(self)
        if self.max_objects < self.min_objects:
            raise ConfigError(f"max_objects {self.max_objects} is below min_objects {self.min_objects}", ("max_objects", "min_objects"))


@dataclass
class DiffusionRecipe:
    """``text_encoder``: the CLIP (model or run folder) whose text tower, frozen, conditions the model."""

    text_encoder: str = "runs/demo/clip"
    model: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        validate(self)


DERIVED = {
    "model.text": "the text tower of text_encoder",
    "model.image_size": "data.image_size",
    "model.text_source": "text_encoder",
}
"""Recipe keys that training sets itself, from what."""


@dataclass
class ShapesCaptions(Dataset):
    """Item ``i``: scene ``i`` of the world, with one of its captions that names its objects
    (chosen by seed; a bare count such as "two objects" names nothing to draw), and with
    ``object_weight`` > 0 the per-pixel loss weights ``[H, W]`` (1 off the objects)."""

    world: ShapesWorld
    processor: ImageProcessor
    length: int
    object_weight: float = 0.0
    shuffle = False

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> list[tuple[torch.Tensor, str]]:
        scene = self.world.scene(i)
        captions = [c.text for c in scene.captions if c.refs]
        rng = np.random.default_rng([self.world.seed, i, 11])
        image = scene.render()
        caption = captions[int(rng.integers(len(captions)))]
        if not self.object_weight:
            return [(self.processor(image), caption)]
        objects = torch.from_numpy((np.asarray(image) != BACKGROUND).any(-1))
        return [(self.processor(image), caption, 1 + self.object_weight * objects.float())]


class WeightedCollate(Collate):
    """:class:`Collate` that also stacks each item's per-pixel loss weights into ``pixel_weights``."""

    def __call__(self, items: list) -> dict:
        batch = super().__call__([[(img, caption) for img, caption, _ in it] if isinstance(it, list) else it for it in items])
        if weights := [w for it in items if isinstance(it, list) for _, _, w in it]:
            batch["pixel_weights"] = torch.stack(weights)
        return batch


def text_tower(folder: str | Path):
    """The CLIP at ``folder`` (a model or run folder), checked to have a text tower and tokenizer."""
    from vlkit.loading import load

    if not Path(folder).exists():
        raise VlkitError(f"text_encoder {folder}: no such folder; expected a trained CLIP (vlkit train clip --out DIR), "
                         "e.g. the demo's runs/demo/clip")  # fmt: skip
    clip = load(folder)
    if not hasattr(clip, "text") or not hasattr(getattr(clip, "cfg", None), "text") or not getattr(clip, "tokenizer", None):
        raise VlkitError(f"text_encoder {folder}: holds a {type(clip).__name__}, not a CLIP with a text tower and tokenizer")
    return clip


def build_model(recipe: DiffusionRecipe) -> TextToImage:
    """The diffusion model with the recipe's CLIP text tower (weights and tokenizer) in place."""
    clip = text_tower(recipe.text_encoder)
    cfg = recipe.model
    cfg.text = clip.cfg.text
    cfg.image_size = recipe.data.image_size
    cfg.text_source = str(Path(recipe.text_encoder).resolve())
    cfg.__post_init__()
    model = TextToImage(cfg)
    model.text.load_state_dict(clip.text.state_dict())
    model.tokenizer = clip.tokenizer
    return model


def training_data(d: DiffusionDataConfig, tokenizer, length: int) -> tuple[ShapesCaptions, Collate]:
    """The first ``length`` captioned scenes of the data config's world and the collate for them."""
    shapes = ShapesWorld(d.image_size, d.min_objects, d.max_objects, d.seed, tuple(d.object_sizes))
    dataset = ShapesCaptions(shapes, shapes_processor(d.image_size), length, d.object_weight)
    return dataset, WeightedCollate(tokenizer) if d.object_weight else Collate(tokenizer)


def train_diffusion(recipe: DiffusionRecipe, out: str | Path, resume: bool = False, stop_at: int | None = None) -> dict:
    """Train per the recipe into the run folder ``out``; returns the training summary."""
    out = Path(out)
    world = setup()
    try:
        torch.manual_seed(recipe.loop.seed)
        model = build_model(recipe)
        dataset, collate = training_data(recipe.data, model.tokenizer, recipe.loop.steps * recipe.loop.batch_size)
        device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        return fit(
            model, dataset, collate, recipe.loop, recipe.optim, out, "diffusion", world=world, resume=resume,
            device=device, after_step=TextToImage.update_ema, stop_at=stop_at, recipe=to_dict(recipe),
        )  # fmt: skip
    finally:
        teardown(world)


def load_recipe(data: dict, overrides: list[str] = (), source: str | Path | None = None) -> DiffusionRecipe:
    """A recipe from a dict (the recipe file ``source``'s contents) and ``--key=value`` overrides."""
    return build(DiffusionRecipe, data, list(overrides), f"{source}: recipe" if source else "recipe", DERIVED)


def recipe_help() -> str:
    """Every recipe key with its default and type (the ``train diffusion --help`` epilog)."""
    rows = [row for row in key_rows(DiffusionRecipe, DERIVED) if not row[0].startswith("model.text.")]
    rows.append(("model.text.*", f"set by training from {DERIVED['model.text']}"))
    return "\n".join(["recipe keys and their defaults (override any with --key=value):", *key_table(rows)])
