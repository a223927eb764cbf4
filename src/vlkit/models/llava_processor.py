"""LLaVA's processor: images and conversations → the batches a LLaVA model takes.

API::

    processor = LlavaProcessor(image_processor, tokenizer, image_tokens=576, template="llava_v1", max_length=4096)
    processor = LlavaProcessor.for_model(model)          # a loaded Llava: its preprocessing, tokenizer, token count
    batch = processor(text=prompts, images=images)       # transformers' LlavaProcessor: rendered prompts in
    sample = processor.encode(messages, images)          # one conversation for training: ids and labels
    batch = processor.collate([sample, ...])             # input_ids, attention_mask, labels, pixel_values
    batch = processor.prompt_batch(images, prompts)      # generation prompts through the template, left-padded
    answers = LlavaAnswerer(model).generate(images, prompts, max_new_tokens=32)   # eval/generative.py's contract

- Images become pixel values as the vision tower's preprocessing says (:class:`ImageProcessor`:
  resize and centre crop, or LLaVA-1.5's pad to square first). Each ``<image>`` placeholder
  becomes :meth:`LlavaProcessor.num_image_tokens` image tokens (one per visual token the
  connector gives that image); ``pixel_values`` hold every image of the batch in the order of
  their placeholders, ``[images, 3, S, S]``.
- Batches are padded on the left (generation) or on the right (training); the pad id is the
  tokenizer's pad token, else its EOS; labels are -100 on padding.
- Bad input is a :class:`VlkitError` naming the sample: a placeholder count that differs from the
  image count, an empty or non-alternating conversation, an unreadable image, a sample longer
  than ``max_length`` (the language model's context).

A successor whose token count or pixels depend on the image (AnyRes) overrides
:meth:`~LlavaProcessor.num_image_tokens`, :meth:`~LlavaProcessor.process_images` and
:meth:`~LlavaProcessor.merge_images`; everything else goes through them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image

from vlkit.errors import VlkitError
from vlkit.text.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    ConversationError,
    Segment,
    Template,
    count_images,
    encode_conversation,
    get_template,
    image_token,
    image_token_id,
    special_texts,
    tokenize_segments,
)


@dataclass
class ProcessedSample:
    """One conversation ready to batch: ``input_ids`` with the image tokens expanded, ``labels``
    (-100 where not supervised) and its images' tensors (``{"pixel_values": [n, 3, S, S]}``, empty
    without images)."""

    input_ids: list[int]
    labels: list[int]
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    num_images: int = 0
    sample: str = "the conversation"

    def __len__(self) -> int:
        return len(self.input_ids)


class LlavaProcessor:
    """Images and text → LLaVA batches. ``image_tokens``: the image tokens one image takes (an
    int, or a function of the PIL image); ``template``: a :mod:`vlkit.text.conversation` template
    (default the one the model was trained with where its folder records it, else the tokenizer's
    chat template when it has one, else ``llava_v1``); ``max_length``: the longest sample accepted
    (the language model's positions)."""

    def __init__(self, image_processor, tokenizer, image_tokens: int | Callable[[Image.Image], int],
                 template: str | Template | None = None, max_length: int | None = None):  # fmt: skip
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        if template is None:  # the one the model was trained with, else the tokenizer's own
            template = getattr(tokenizer, "trained_template", None) or (
                "chat_template" if getattr(tokenizer, "chat_template", None) is not None else "llava_v1")
        self.template = get_template(template, tokenizer)
        self.image_token = image_token(tokenizer)
        self.image_token_id = image_token_id(tokenizer)
        self.max_length = max_length

    @classmethod
    def for_model(cls, model, template: str | Template | None = None) -> "LlavaProcessor":
        """The processor of a loaded LLaVA model: its image preprocessing (``model.processor``), its
        tokenizer, its per-image token count and its context length."""
        return cls(model.processor, model.tokenizer, lambda image: model.num_image_tokens(), template,
                   model.lm.config.max_position_embeddings)

    def __repr__(self) -> str:
        return f"LlavaProcessor(template={self.template.name!r}, tokenizer={self.tokenizer!r})"

    # ---------------------------------------------------------------- images
    def num_image_tokens(self, image: Image.Image) -> int:
        """How many image tokens ``image``'s placeholder becomes: the connector's output count."""
        return self.image_tokens(image) if callable(self.image_tokens) else int(self.image_tokens)

    def process_images(self, images: Sequence[Image.Image], sample: str = "the sample") -> dict[str, torch.Tensor]:
        """One sample's images → ``{"pixel_values": [n, 3, S, S]}`` (empty without images); an image
        that is not a PIL image or cannot be decoded is an error naming the sample and the image."""
        if not images:
            return {}
        return {"pixel_values": torch.stack([self._pixels(image, sample, i) for i, image in enumerate(images)])}

    def _pixels(self, image, sample: str, i: int) -> torch.Tensor:
        _check_image(image, sample, i)
        try:
            return self.image_processor(image)
        except VlkitError as err:
            raise VlkitError(f"{sample}, image {i}: {err}") from None
        except Exception as err:  # noqa: BLE001 - a lazily opened image decodes here; any failure means it is unreadable
            raise VlkitError(f"{sample}, image {i}: unreadable image ({type(err).__name__}: {err})") from None

    def merge_images(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Samples' image tensors → the batch's (concatenated in order; none without images)."""
        parts = [p for p in parts if p]
        if not parts:
            return {}
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def _image_counts(self, images: Sequence[Image.Image], sample: str) -> list[int]:
        for i, image in enumerate(images):
            _check_image(image, sample, i)
        return [self.num_image_tokens(image) for image in images]

    # ---------------------------------------------------------------- text
    def __call__(self, text: str | Sequence[str], images=None, padding_side: str = "left",
                 samples: Sequence[str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """transformers' ``LlavaProcessor(text=, images=)``: prompts already rendered, with an image
        placeholder (``<image>`` or the tokenizer's image token) per image; ``images`` in placeholder
        order, a flat list for the batch or one list per prompt. Returns ``input_ids``,
        ``attention_mask`` and ``pixel_values`` (when there are images)."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise VlkitError(f"the processor takes a prompt string or a non-empty list of them, got {text!r:.80}")
        names = self._names(samples, len(texts))
        per_prompt = self._split_images(texts, images, names)
        encoded = []
        for t, imgs, name in zip(texts, per_prompt, names):
            ids, labels = tokenize_segments([Segment(t, False)], self.tokenizer, self._image_counts(imgs, name), True, name)
            encoded.append(self._sample(ids, labels, imgs, name))
        batch = self.collate(encoded, padding_side)
        del batch["labels"]
        return batch

    def _split_images(self, texts: list[str], images, names: list[str]) -> list[list[Image.Image]]:
        """Each prompt's images: a list per prompt as given, or a flat list cut by placeholder counts."""
        counts = [count_images(t, self.tokenizer) for t in texts]
        if images is None:
            images = []
        elif isinstance(images, Image.Image):
            images = [images]
        if images and all(isinstance(i, (list, tuple)) for i in images):
            if len(images) != len(texts):
                raise VlkitError(f"{len(texts)} prompts but {len(images)} lists of images; expected one list per prompt")
            for name, n, imgs in zip(names, counts, images):
                if n != len(imgs):
                    raise ConversationError(f"{name}: {n} {self.image_token} placeholder(s) but {len(imgs)} image(s)")
            return [list(i) for i in images]
        if sum(counts) != len(images):
            raise ConversationError(f"the batch: {sum(counts)} {self.image_token} placeholder(s) in the prompts (per prompt "
                                    f"{counts}) but {len(images)} image(s); expected one image per placeholder")
        starts = [sum(counts[:k]) for k in range(len(counts))]
        return [list(images[s : s + n]) for s, n in zip(starts, counts)]

    def encode(self, messages, images: Sequence[Image.Image] = (), add_generation_prompt: bool = False,
               sample: str = "the conversation") -> ProcessedSample:  # fmt: skip
        """One conversation (LLaVA or OpenAI messages, ``<image>`` placeholders where its images go)
        → ids and labels through the template, and its images' pixel values."""
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        enc = encode_conversation(messages, self.tokenizer, self.template, add_generation_prompt=add_generation_prompt,
                                  image_counts=self._image_counts(images, sample), sample=sample)
        return self._sample(enc.input_ids, enc.labels, images, sample)

    def _sample(self, ids: list[int], labels: list[int], images: list, sample: str) -> ProcessedSample:
        if self.max_length is not None and len(ids) > self.max_length:
            image_ids = sum(1 for i in ids if i == self.image_token_id)
            raise ConversationError(f"{sample}: {len(ids)} tokens ({image_ids} of them image tokens) exceed the model's "
                                    f"context of {self.max_length}")
        return ProcessedSample(ids, labels, self.process_images(images, sample), len(images), sample)

    def collate(self, samples: Sequence[ProcessedSample], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Samples → ``input_ids``, ``attention_mask``, ``labels`` ``[B, longest]`` padded on
        ``padding_side`` ("right" for training, "left" for generation), and the images' tensors."""
        if padding_side not in ("left", "right"):
            raise VlkitError(f"padding_side {padding_side!r}; expected 'left' or 'right'")
        if not samples:
            raise VlkitError("collate got no samples; expected at least one")
        width = max(len(s) for s in samples)
        batch = {
            "input_ids": torch.full((len(samples), width), self.tokenizer.padding_id(), dtype=torch.long),
            "attention_mask": torch.zeros((len(samples), width), dtype=torch.long),
            "labels": torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, s in enumerate(samples):
            span = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
            batch["input_ids"][row, span] = torch.tensor(s.input_ids, dtype=torch.long)
            batch["attention_mask"][row, span] = 1
            batch["labels"][row, span] = torch.tensor(s.labels, dtype=torch.long)
        return {**batch, **self.merge_images([s.images for s in samples])}

    def prompt_batch(self, images: Sequence[Image.Image | None], prompts: Sequence[str],
                     samples: Sequence[str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """Generation prompts: each prompt a user turn after its image (``<image>\\n{prompt}``; no
        placeholder for a None image), rendered by the template with the assistant's turn opened,
        left-padded. Returns ``input_ids``, ``attention_mask`` and the images' tensors."""
        if len(images) != len(prompts):
            raise VlkitError(f"{len(images)} images but {len(prompts)} prompts; expected one image (or None) per prompt")
        names = self._names(samples, len(prompts))
        encoded = []
        for image, prompt, name in zip(images, prompts, names):
            if not isinstance(prompt, str):
                raise VlkitError(f"{name}: the prompt is a {type(prompt).__name__}; expected a string")
            text = prompt if image is None else f"{IMAGE_TOKEN}\n{prompt}"
            encoded.append(self.encode([{"role": "user", "content": text}], [] if image is None else [image], True, name))
        batch = self.collate(encoded, "left")
        del batch["labels"]
        return batch

    @staticmethod
    def _names(samples: Sequence[str] | None, n: int) -> list[str]:
        if samples is None:
            return [f"sample {i}" for i in range(n)]
        if len(samples) != n:
            raise VlkitError(f"{len(samples)} sample names for {n} samples")
        return [str(s) for s in samples]


def _check_image(image, sample: str, i: int) -> None:
    if not isinstance(image, Image.Image):
        raise VlkitError(f"{sample}, image {i}: a {type(image).__name__}; expected a PIL image "
                         "(open files with vlkit.data.images.load_image)")


class LlavaAnswerer:
    """The contract of :mod:`vlkit.eval.generative` for a LLaVA model: ``generate(images, prompts,
    max_new_tokens)`` → one answer string per prompt, in batches with left padding. Generation
    stops at the template's end of turn as well as the model's EOS; ``options`` are generation
    options (``num_beams``, ``do_sample``, ...) for every call."""

    def __init__(self, model, processor: LlavaProcessor | None = None, **options):
        self.model = model
        self.processor = processor if processor is not None else LlavaProcessor.for_model(model)
        self.options = options

    def generate(self, images: Sequence[Image.Image | None], prompts: Sequence[str], max_new_tokens: int = 32,
                 **options) -> list[str]:  # fmt: skip
        from vlkit.lm.generate import decode_new, resolve_config

        batch = self.processor.prompt_batch(images, prompts)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        options = self.with_stops({**self.options, **options, "max_new_tokens": max_new_tokens})
        ids = self.model.generate(**batch, **options)
        cfg = resolve_config(self.model.lm, self.model.generation_config, **options)
        return [text.strip() for text in decode_new(self.processor.tokenizer, ids, cfg)]

    def with_stops(self, options: dict) -> dict:
        """``options`` with the template's end of turn added: an id when it is a special token, else
        a stop string; the model's own EOS ids are kept."""
        from vlkit.lm.generate import resolve_config

        tokenizer = self.processor.tokenizer
        cfg = resolve_config(self.model.lm, self.model.generation_config, **options)
        eos = cfg.eos_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        stops = cfg.stops
        end = self.processor.template.end_of_turn(tokenizer)
        if end and end in special_texts(tokenizer):
            eos = [*eos, tokenizer.token_to_id(end)]
        elif end:
            stops = [*stops, end]
        return {**options, "eos_token_id": sorted(set(eos)) or None, "stop_strings": stops or None}
