"""Image-caption datasets for contrastive training: the shapes world and captions.jsonl folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vlkit.data.images import BadSample, load_image
from vlkit.data.shapes import ShapesWorld
from vlkit.vision.preprocess import ImageProcessor


@dataclass
class ShapesPairs(Dataset):
    """Item ``i`` is a *family* of ``group_size`` scenes: scene ``i`` and hard negatives that
    differ from it in one object's shape (mostly), color or placement. Each member gets a
    caption that is false of its siblings where one exists, so every batch holds pairs that
    only shape, color or relation can tell apart."""

    world: ShapesWorld
    processor: ImageProcessor
    length: int
    group_size: int = 4
    shuffle = False

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> list[tuple[torch.Tensor, str]]:
        rng = np.random.default_rng([self.world.seed, i, 7])
        family = self.world.family(self.world.scene(i), i, self.group_size)
        items = []
        for k, scene in enumerate(family):
            others = family[:k] + family[k + 1 :]
            telling = [c for c in scene.captions if not any(c.describes(o) for o in others)] or scene.captions
            items.append((self.processor(scene.render()), telling[int(rng.integers(len(telling)))].text))
        return items


@dataclass
class CaptionFolder(Dataset):
    """A folder with ``captions.jsonl`` lines ``{"image": path, "captions": [...]}``.

    Bad records raise :class:`BadSample` naming the file and line; the collate function can
    skip and count them instead.
    """

    root: Path
    processor: ImageProcessor
    max_caption_chars: int = 1000

    def __post_init__(self):
        self.root = Path(self.root)
        index = self.root / "captions.jsonl"
        if not index.is_file():
            raise FileNotFoundError(f"{index}: missing; expected lines of {{\"image\": path, \"captions\": [...]}}")
        self.records = index.read_text().splitlines()
        self.index = index

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> list[tuple[torch.Tensor, str]]:
        """Record ``i mod len``; the epoch ``i // len`` picks which of its captions to use."""
        epoch, i = divmod(i, len(self.records))
        where = f"{self.index}:{i + 1}"
        try:
            rec = json.loads(self.records[i])
        except json.JSONDecodeError as err:
            raise BadSample(where, f"malformed JSON ({err.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not isinstance(rec.get("captions"), list):
            raise BadSample(where, 'expected {"image": str, "captions": [str, ...]}')
        captions = [c for c in rec["captions"] if isinstance(c, str) and c.strip()]
        if not captions:
            raise BadSample(where, "no non-empty caption")
        longest = max(len(c) for c in captions)
        if longest > self.max_caption_chars:
            raise BadSample(where, f"caption of {longest} characters exceeds {self.max_caption_chars}")
        rng = np.random.default_rng([i, epoch])
        caption = captions[int(rng.integers(len(captions)))]
        image = load_image(self.root / rec["image"])
        return [(self.processor(image), caption)]


class Skipped:
    """Stands in for a bad sample that was skipped; carries the reason for the report."""

    def __init__(self, reason: str):
        self.reason = reason


class SkippingDataset(Dataset):
    """Wraps a dataset so that a :class:`BadSample` becomes a :class:`Skipped` marker."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except BadSample as err:
            return Skipped(str(err))


class Collate:
    """Flattens items into ``pixel_values`` and tokenised captions; skipped samples are left
    out and listed in ``batch["skipped"]`` so the trainer can count and report them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list) -> dict:
        skipped = [it.reason for it in items if isinstance(it, Skipped)]
        flat = [pair for it in items if not isinstance(it, Skipped) for pair in it]
        batch: dict = {"skipped": skipped}
        if flat:
            batch["pixel_values"] = torch.stack([img for img, _ in flat])
            batch.update(self.tokenizer([caption for _, caption in flat]))
        return batch
