"""Tokenised conversations for VLM training: records of images and messages, from a LLaVA JSON
(streamed) or from memory, become ids, labels (the assistant's turns only) and pixels.

A record is a :class:`ChatSample`. A bad one follows the Skips rule (``on_bad_sample``): an image
missing or unreadable, a malformed record, a conversation with no assistant turn to learn, or one
longer than ``max_length`` that cannot be cut without losing an image token or an answer token.
Under "skip" it becomes a :class:`~vlkit.data.pairs.Skipped` marker naming the file and sample,
which :class:`ConversationCollate` hands to the loop to count; under "error" it stops.

Batches are bucketed by length, not packed. Within a window of ``bucket_window`` micro-batches
of a seeded shuffle the samples are sorted by length and cut into micro-batches, whose order is
shuffled again (transformers' ``group_by_length``): a micro-batch then holds samples of similar
length, so little of it is padding, while the data order stays random across windows. Packing
would also remove the padding but needs attention masked per sample (block-diagonal) and
positions restarting inside a row, which the language models here do not take.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vlkit.data.formats.common import Skips
from vlkit.data.formats.llava import index_llava, llava_record
from vlkit.data.images import BadSample, load_image
from vlkit.data.pairs import Skipped
from vlkit.data.skips import Skip, check_rule
from vlkit.errors import VlkitError
from vlkit.losses import IGNORE_INDEX, loss_units
from vlkit.models.llava_processor import LlavaProcessor, ProcessedSample
from vlkit.text.conversation import encode_conversation


@dataclass
class ChatSample:
    """One training record: its ``images`` (PIL images or paths) and ``messages``
    (``{"role": "user"|"assistant"|"system", "content": str}``, one ``<image>`` placeholder per
    image in the user turns, in order, ending with the assistant's answer). ``source`` names where
    it came from in skip and error messages (the file; empty for data made in memory)."""

    id: str
    images: list = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    source: str = ""


class LlavaSource(Sequence):
    """The good records of a LLaVA JSON, indexed in one streaming pass that keeps only each
    record's byte span (the file may be larger than memory); a record is read again, and its
    images found, when asked for. Bad records follow ``skips`` while indexing. ``image_counts``:
    each record's number of images."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None, skips: Skips | None = None,
                 allow_outside_paths: bool = False):  # fmt: skip
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.allow_outside_paths = allow_outside_paths
        rows = array("q")  # 8 bytes a number while indexing, not a Python tuple per record
        for conv, i, start, end in index_llava(self.path, self.image_root, skips, allow_outside_paths):
            rows.extend((i, start, end, len(conv.images)))
        table = np.frombuffer(rows, dtype=np.int64).reshape(-1, 4).copy()
        self.spans, self.image_counts = table[:, :3], table[:, 3]

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, k: int) -> ChatSample:
        """Record ``k`` (modulo the count: the same record every epoch)."""
        i, start, end = (int(v) for v in self.spans[k % len(self.spans)])
        conv = llava_record(self.path, i, start, end, self.image_root, self.allow_outside_paths)
        return ChatSample(conv.id, list(conv.images), conv.messages, str(self.path))

    def record(self, k: int) -> str:
        """How skip messages name sample ``k``: its place in the file."""
        return f"record {int(self.spans[k % len(self.spans)][0])}"


class LengthBuckets:
    """Which samples make micro-batch ``c`` (counted over the whole run): per epoch a seeded
    permutation, topped up to whole micro-batches from its start, sorted by length within windows
    of ``window`` micro-batches and cut, the micro-batches then shuffled (``window`` 0: no sorting)."""

    def __init__(self, lengths: np.ndarray | None, n: int, micro: int, window: int, seed: int):
        self.lengths, self.n, self.micro, self.window, self.seed = lengths, n, micro, window, seed
        self.per_epoch = -(-n // micro)
        self._plans: dict[int, np.ndarray] = {}

    def plan(self, epoch: int) -> np.ndarray:
        """``[micro-batches, micro]`` sample indices of an epoch."""
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch, 11])
            perm = rng.permutation(self.n)
            perm = np.resize(perm, self.per_epoch * self.micro)  # repeats its start to fill the last micro-batch
            if self.window and self.lengths is not None:
                span = self.window * self.micro
                for s in range(0, len(perm), span):
                    part = perm[s : s + span]
                    perm[s : s + span] = part[np.argsort(-self.lengths[part], kind="stable")]
            batches = perm.reshape(self.per_epoch, self.micro)
            self._plans = {epoch: batches[rng.permutation(self.per_epoch)]}
        return self._plans[epoch]

    def sample(self, k: int) -> int:
        """The sample at position ``k`` of the run (micro-batch ``k // micro``), as ``epoch · n + index``."""
        c, j = divmod(k, self.micro)
        epoch, b = divmod(c, self.per_epoch)
        return epoch * self.n + int(self.plan(epoch)[b, j])


class ConversationDataset(Dataset):
    """Item ``k`` of the run (the loop's step order, so ``shuffle`` is off here and the order is
    :class:`LengthBuckets`') → a :class:`ProcessedSample` or a :class:`Skipped` marker.

    ``processor`` gives the template, the image tokens and the pixels; ``max_length`` the context;
    ``micro_batch`` the loop's micro-batch (buckets are cut to it); ``bucket_window`` 0 turns
    bucketing off (then no lengths are measured). With ``images_only`` a sample without images is
    left out: when nothing but the connector and the tower train, nothing trained is reached
    through it; under FSDP every rank must run the (sharded) tower at every step. A LLaVA file's
    text-only records are left out up front (``left_out`` counts them, and no
    micro-batch is emptied by them, which under DDP would leave a rank without a backward); other
    sources' are skipped when read, whatever the rule, and counted as "no image"."""

    shuffle = False

    def __init__(self, source: Sequence[ChatSample], processor: LlavaProcessor, max_length: int, micro_batch: int,
                 on_bad_sample: str = "error", bucket_window: int = 16, seed: int = 0, images_only: bool = False):  # fmt: skip
        self.source, self.processor, self.max_length, self.images_only = source, processor, max_length, images_only
        self.on_bad_sample = check_rule(on_bad_sample, "data.on_bad_sample")
        self.usable = np.arange(len(source))
        if images_only and isinstance(source, LlavaSource):
            self.usable = np.flatnonzero(source.image_counts > 0)
            if not len(self.usable):
                raise VlkitError(f"{source.path}: no record has an image, and this run trains on samples with images only")
        self.left_out = len(source) - len(self.usable)
        self.lengths = measure_lengths(source, processor, self.usable) if bucket_window else None
        self.buckets = LengthBuckets(self.lengths, len(self.usable), micro_batch, bucket_window, seed)

    def __len__(self) -> int:
        return len(self.usable)

    def planned_padding(self) -> tuple[float, float] | None:
        """The share of padding in the first epoch's micro-batches, bucketed and (for comparison)
        in random ones, from the measured lengths; None without bucketing."""
        if self.lengths is None:
            return None
        bucketed = [self.lengths[row] for row in self.buckets.plan(0)]
        random = LengthBuckets(None, len(self.lengths), self.buckets.micro, 0, self.buckets.seed).plan(0)
        return padding_fraction(bucketed), padding_fraction([self.lengths[row] for row in random])

    def __getitem__(self, k: int) -> ProcessedSample | Skipped:
        epoch, j = divmod(self.buckets.sample(k), len(self.usable))
        try:
            return self.encode(epoch * len(self.source) + int(self.usable[j]))
        except BadSample as err:
            if self.on_bad_sample == "error" and getattr(err, "reason", "") != "no image":
                raise
            return Skipped(Skip(err.where, err.record, getattr(err, "reason", "bad record"), err.problem))

    def encode(self, index: int) -> ProcessedSample:
        """Sample ``index`` (``epoch · n + i``) of the source: its images read, tokenised through the
        template, cut to ``max_length`` where only unsupervised text is lost; a bad one raises
        :class:`BadChatSample`. A source may vary a sample by epoch (a list or tuple is taken modulo
        its length); a LLaVA record is read again (BadRecord if the file changed since indexing)."""
        i = index % len(self.source)
        sample = self.source[i if isinstance(self.source, (list, tuple)) else index]
        where = sample.source or "the in-memory data"
        record = f"{self.source.record(i) if isinstance(self.source, LlavaSource) else f'sample {i}'} (id {sample.id!r})"
        if self.images_only and not sample.images:
            raise BadChatSample(where, "no image, and this run trains on samples with images only", record, "no image")
        images = []
        for n, image in enumerate(sample.images):
            if not isinstance(image, (str, Path)):
                images.append(image)
                continue
            try:
                images.append(load_image(image))
            except BadSample as err:
                reason = "missing image" if not Path(image).is_file() else "bad image"
                raise BadChatSample(where, f"image {n} {err.where}: {err.problem}", record, reason) from None
        try:
            out = self.processor.encode(sample.messages, images, sample=f"{where}, {record}")
        except VlkitError as err:
            raise BadChatSample(where, str(err).removeprefix(f"{where}, {record}: "), record, "bad conversation") from None
        return truncate(out, self.max_length, self.processor.image_token_id, where, record)


class BadChatSample(BadSample):
    """A sample that cannot be trained on; ``reason`` is its skip category."""

    def __init__(self, where: str, problem: str, record: str, reason: str):
        super().__init__(where, problem, record)
        self.reason = reason


def truncate(sample: ProcessedSample, max_length: int, image_token_id: int, where: str = "", record: str = "") -> ProcessedSample:
    """``sample`` cut to ``max_length`` tokens when every image token and supervised label lies
    before the cut; else :class:`BadChatSample` ("too long") naming the sample."""
    if len(sample) <= max_length:
        return sample
    needed = [t for t, (idx, label) in enumerate(zip(sample.input_ids, sample.labels))
              if idx == image_token_id or label != IGNORE_INDEX]  # fmt: skip
    if needed and needed[-1] >= max_length:
        images = sum(1 for idx in sample.input_ids if idx == image_token_id)
        at = next(t for t in needed if t >= max_length)
        lost = "an image token" if sample.input_ids[at] == image_token_id else "an answer token"
        raise BadChatSample(where, f"{len(sample)} tokens ({images} of them image tokens) exceed max_length {max_length}, "
                            f"and cutting there would lose {lost} (at position {at})", record, "too long")
    return ProcessedSample(sample.input_ids[:max_length], sample.labels[:max_length], sample.images, sample.num_images,
                           sample.sample)


def measure_lengths(source: Sequence[ChatSample], processor: LlavaProcessor, indices: Sequence[int] | None = None) -> np.ndarray:
    """The token count of each sample (of ``indices``, default all) with its images expanded, from
    its messages alone (images are not read); one that cannot be encoded counts 0 (it is skipped
    or stops when read)."""
    per_image = processor.num_image_tokens(Image.new("RGB", (1, 1)))
    indices = range(len(source)) if indices is None else indices
    lengths = np.zeros(len(indices), dtype=np.int64)
    for n, i in enumerate(indices):
        sample = source[int(i)]
        try:
            enc = encode_conversation(sample.messages, processor.tokenizer, processor.template,
                                      image_counts=[per_image] * len(sample.images))
        except VlkitError:
            continue
        lengths[n] = len(enc.input_ids)
    return lengths


class ConversationCollate:
    """Samples → a right-padded training batch (``input_ids``, ``attention_mask``, ``labels``,
    ``pixel_values`` when any sample has images); skipped samples are left out and listed in
    ``batch["skipped"]`` for the loop to count. A ``loss_reduction`` other than "token" goes
    into the batch for the model's loss (:func:`vlkit.losses.causal_lm_loss`).

    ``length_groups`` > 1 sorts the samples by length and collates them as that many parts, each
    padded to its own longest, in ``batch["parts"]`` as ``(part, weight)``: the loop runs each part's
    forward and backward with its loss times its weight (its share of the batch's answers or tokens),
    which gives the whole batch's gradient while the model reads far less padding, whose cost in
    attention grows with the square of the longest sample. A part with nothing supervised is left out
    (its loss would be 0 / 0); ``batch["rows"]`` then counts every sample the parts came from."""

    def __init__(self, processor: LlavaProcessor, loss_reduction: str = "token", length_groups: int = 1):
        if isinstance(length_groups, bool) or not isinstance(length_groups, int) or length_groups < 1:
            raise VlkitError(f"ConversationCollate: length_groups must be a positive integer, got {length_groups!r}")
        self.processor = processor
        self.loss_reduction = loss_reduction
        self.length_groups = length_groups

    def __call__(self, items: list) -> dict:
        skipped = [it.skip for it in items if isinstance(it, Skipped)]
        samples = [it for it in items if not isinstance(it, Skipped)]
        batch: dict = {"skipped": skipped}
        if not samples:
            return batch
        groups = self._groups(samples)
        parts = [self._collate(group) for group in groups] if len(groups) > 1 else []
        units = [loss_units(part["labels"], self.loss_reduction) for part in parts]
        if total := sum(units):
            batch["parts"] = [(part, n / total) for part, n in zip(parts, units) if n]
            batch["rows"] = len(samples)
        else:  # one group, or nothing supervised: one batch (whose loss says so)
            batch.update(self._collate(samples))
        return batch

    def _collate(self, samples: list[ProcessedSample]) -> dict:
        batch = self.processor.collate(samples, "right")
        if self.loss_reduction != "token":
            batch["loss_reduction"] = self.loss_reduction
        return batch

    def _groups(self, samples: list[ProcessedSample]) -> list[list[ProcessedSample]]:
        """The samples by length, cut into ``length_groups`` runs of near-equal count."""
        k = min(self.length_groups, len(samples))
        if k == 1:
            return [samples]
        ordered = sorted(samples, key=len)
        bounds = [round(i * len(ordered) / k) for i in range(k + 1)]
        return [ordered[a:b] for a, b in zip(bounds, bounds[1:])]


def padding_fraction(batches: Sequence[Sequence[int]]) -> float:
    """The share of a padded batch's positions that are padding, over ``batches`` of sample lengths."""
    total = sum(len(b) * max(b) for b in batches if len(b))
    return 1 - sum(sum(b) for b in batches) / total if total else 0.0


