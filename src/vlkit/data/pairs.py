"""Image-caption datasets for contrastive training: the shapes world and captions.jsonl folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vlkit.data.formats.captions import CAPTIONS, INDEX, caption_record
from vlkit.data.formats.coco import CaptionRecord
from vlkit.data.formats.common import BadRecord, json_problem, no_records, read_text
from vlkit.data.images import BadSample, load_record_image
from vlkit.data.shapes import ShapesWorld
from vlkit.data.skips import Skip
from vlkit.errors import VlkitError
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

    Records are checked when read (:func:`~vlkit.data.formats.captions.caption_record`): a bad
    one raises :class:`BadSample` naming the file and line (or the image file), which
    :class:`SkippingDataset` turns into a skip under ``on_bad_sample="skip"``. Blank lines are
    not records; a file with none, or text that is not UTF-8, raises at once.
    """

    root: Path
    processor: ImageProcessor
    max_caption_chars: int = 1000
    allow_outside_paths: bool = False

    def __post_init__(self):
        self.root = Path(self.root)
        self.index = self.root / INDEX
        lines = read_text(self.index, CAPTIONS).split("\n")
        self.lines = [n for n, line in enumerate(lines, 1) if line.strip()]
        self.records = [lines[n - 1] for n in self.lines]
        if not self.records:
            raise no_records(self.index, CAPTIONS)

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int) -> CaptionRecord:
        """Record ``i`` parsed and checked."""
        source, line = self.index, self.lines[i]
        try:
            rec = json.loads(self.records[i])
        except json.JSONDecodeError as err:
            raise BadRecord(str(source), f"malformed JSON ({json_problem(err, f'column {err.colno}')}); expected {CAPTIONS}", f"line {line}") from None
        except RecursionError:
            raise BadRecord(str(source), f"JSON nested too deeply; expected {CAPTIONS}", f"line {line}") from None
        r = caption_record(rec, source, line, self.root, self.allow_outside_paths)
        longest = max(len(c) for c in r.captions)
        if longest > self.max_caption_chars:
            raise BadRecord(str(source), f"caption of {longest} characters exceeds {self.max_caption_chars}", f"line {line}")
        return r

    def __getitem__(self, i: int) -> list[tuple[torch.Tensor, str]]:
        """Record ``i mod len``; the epoch ``i // len`` picks which of its captions to use."""
        epoch, i = divmod(i, len(self.records))
        r = self.record(i)
        rng = np.random.default_rng([i, epoch])
        caption = r.captions[int(rng.integers(len(r.captions)))]
        record = f"line {self.lines[i]}"
        image = load_record_image(r.image, self.index, record)
        try:
            pixels = self.processor(image)
        except VlkitError as err:
            raise BadSample(str(self.index), f"image {r.image}: {err}", record) from None
        return [(pixels, caption)]


class Skipped:
    """Stands in for a bad sample that was skipped; carries its :class:`~vlkit.data.skips.Skip`."""

    def __init__(self, skip: Skip):
        self.skip = skip

    @property
    def reason(self) -> str:
        return str(self.skip)


class SkippingDataset(Dataset):
    """Wraps a dataset so that a :class:`BadSample` becomes a :class:`Skipped` marker (the
    ``on_bad_sample="skip"`` rule applied where the sample is read, in a DataLoader worker)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except BadSample as err:
            return Skipped(Skip(err.where, err.record, "bad image" if not isinstance(err, BadRecord) else "bad record", err.problem))


class Collate:
    """Flattens items into ``pixel_values`` and tokenised captions; skipped samples are left
    out and listed in ``batch["skipped"]`` (their :class:`~vlkit.data.skips.Skip` records) so
    the trainer can count and report them (``Skips.extend``)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list) -> dict:
        skipped = [it.skip for it in items if isinstance(it, Skipped)]
        flat = [pair for it in items if not isinstance(it, Skipped) for pair in it]
        batch: dict = {"skipped": skipped}
        if flat:
            batch["pixel_values"] = torch.stack([img for img, _ in flat])
            batch.update(self.tokenizer([caption for _, caption in flat]))
        return batch
