"""BLIP-2's processor: images and prompts → the batches :class:`~vlkit.models.blip2.Blip2` takes, as
transformers' ``Blip2Processor`` makes them, and the answerer of :mod:`vlkit.eval.generative`.

API::

    processor = Blip2Processor.for_model(model)             # its preprocessing, tokenizer, query count
    batch = processor(text=prompts, images=images)          # input_ids, attention_mask, pixel_values
    batch = processor.training_batch(images, prompts, targets)   # + labels on the targets only
    batch = processor.training_text(prompts, targets)            # the same without pixel_values
    answers = Blip2Answerer(model).generate(images, prompts, max_new_tokens=20)

- Each prompt is tokenised with the tokenizer's special tokens (BOS for OPT and Llama), padded,
  and then ``num_query_tokens`` image tokens are put before it, padding or not: transformers'
  layout, so both libraries take identical inputs. Generation batches pad on the left.
- Training samples are ``[image tokens][prompt][target][EOS]``, padded on the right; labels are
  -100 on the image tokens, the prompt and the padding. Prompt and target are tokenised apart, so
  a tokenizer that would merge across their boundary cannot shift the label mask.
- Bad input is a :class:`VlkitError` naming the sample: not a PIL image, an image that cannot be
  decoded, prompts and images of different counts, a sample longer than the language model's
  positions.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from vlkit.errors import VlkitError
from vlkit.losses import IGNORE_INDEX

CAPTION_PROMPT = "a photo of"
"""BLIP-2's captioning prompt (the caption continues it)."""
VQA_PROMPT = "Question: {} Short answer:"
"""BLIP-2's zero-shot VQA prompt, the question in the braces."""


class Blip2Processor:
    """Images and text → BLIP-2 batches. ``image_processor``: the tower's preprocessing (a
    :class:`~vlkit.vision.preprocess.ImageProcessor`); ``tokenizer``: the LM's
    :class:`~vlkit.text.lm_tokenizer.LMTokenizer`; ``max_length``: the LM's positions."""

    def __init__(self, image_processor, tokenizer, num_query_tokens: int, image_token_id: int, max_length: int | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        self.image_token_id = image_token_id
        self.max_length = max_length

    @classmethod
    def for_model(cls, model) -> "Blip2Processor":
        """The processor of a loaded :class:`~vlkit.models.blip2.Blip2`."""
        return cls(model.processor, model.tokenizer, model.cfg.num_query_tokens, model.cfg.image_token_id,
                   model.lm.config.max_position_embeddings)

    def pixels(self, images: Sequence[Image.Image], names: Sequence[str]) -> torch.Tensor:
        """``[images, 3, S, S]``; an image that is not a PIL image or cannot be decoded is named."""
        out = []
        for image, name in zip(images, names):
            if not isinstance(image, Image.Image):
                raise VlkitError(f"{name}: the image is a {type(image).__name__}; expected a PIL image "
                                 "(open files with vlkit.data.images.load_image)")
            try:
                out.append(self.image_processor(image))
            except VlkitError as err:
                raise VlkitError(f"{name}: {err}") from None
            except Exception as err:  # noqa: BLE001 - a lazily opened image decodes here; any failure means it is unreadable
                raise VlkitError(f"{name}: unreadable image ({type(err).__name__}: {err})") from None
        return torch.stack(out)

    def _check_length(self, n: int, name: str) -> None:
        total = self.num_query_tokens + n
        if self.max_length is not None and total > self.max_length:
            raise VlkitError(f"{name}: {self.num_query_tokens} image tokens + {n} text tokens = {total}, more than the "
                             f"language model's {self.max_length} positions (max_position_embeddings); shorten the text")

    def _pad(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.padding_id(), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask

    def _with_image_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image tokens before each padded row, as transformers' processor puts them."""
        image = torch.full((ids.shape[0], self.num_query_tokens), self.image_token_id, dtype=torch.long)
        return torch.cat([image, ids], 1), torch.cat([torch.ones_like(image), mask], 1)

    @staticmethod
    def _names(n: int, samples: Sequence[str] | None) -> list[str]:
        if samples is None:
            return [f"sample {i}" for i in range(n)]
        if len(samples) != n:
            raise VlkitError(f"{len(samples)} sample names for {n} samples")
        return [str(s) for s in samples]

    @staticmethod
    def _texts(text, what: str) -> list[str]:
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise VlkitError(f"the processor takes {what} as a string or a non-empty list of strings, got {text!r:.80}")
        return texts

    def __call__(self, text: str | Sequence[str], images=None, padding_side: str = "left",
                 samples: Sequence[str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """transformers' ``Blip2Processor(images=, text=)``: ``input_ids`` and ``attention_mask`` (the
        image tokens first when there are images), and ``pixel_values`` (one image per prompt)."""
        if padding_side not in ("left", "right"):
            raise VlkitError(f"padding_side {padding_side!r}; expected 'left' or 'right'")
        texts = self._texts(text, "prompts")
        names = self._names(len(texts), samples)
        images = [images] if isinstance(images, Image.Image) else images
        rows = [self.tokenizer.encode(t) for t in texts]
        for row, name in zip(rows, names):
            self._check_length(len(row), name)
        ids, mask = self._pad(rows, padding_side)
        if images is None:
            return {"input_ids": ids, "attention_mask": mask}
        if len(images) != len(texts):
            raise VlkitError(f"{len(texts)} prompts but {len(images)} images; BLIP-2 takes one image per prompt")
        ids, mask = self._with_image_tokens(ids, mask)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": self.pixels(images, names)}

    def training_batch(self, images: Sequence[Image.Image], prompts: Sequence[str], targets: Sequence[str],
                       samples: Sequence[str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """Stage-2 batches: :meth:`training_text` and ``pixel_values``, one image per sample."""
        if len(images) != len(prompts):
            raise VlkitError(f"{len(images)} images and {len(prompts)} prompts; expected one image per sample")
        batch = self.training_text(prompts, targets, samples)
        return {**batch, "pixel_values": self.pixels(images, self._names(len(prompts), samples))}

    def training_text(self, prompts: Sequence[str], targets: Sequence[str],
                      samples: Sequence[str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """``input_ids`` ``[image tokens][prompt][target][EOS]`` right-padded, ``attention_mask`` and
        ``labels`` (the target and EOS only). An empty prompt is BLIP-2's captioning pre-training (the
        LM's BOS alone before the caption)."""
        prompts, targets = list(prompts), list(targets)
        if len(prompts) != len(targets):
            raise VlkitError(f"{len(prompts)} prompts and {len(targets)} targets; expected one each per sample")
        names = self._names(len(prompts), samples)
        eos = self.tokenizer.eos_token_id
        rows, supervised = [], []
        for prompt, target, name in zip(prompts, targets, names):
            if not isinstance(prompt, str) or not isinstance(target, str) or not target.strip():
                raise VlkitError(f"{name}: prompt {prompt!r:.60} and target {target!r:.60}; expected strings, the target not empty")
            head = self.tokenizer.encode(prompt)
            text = target.strip() if not prompt or prompt.endswith(" ") else " " + target.strip()
            tail = self.tokenizer.encode(text, add_special_tokens=False) + ([] if eos is None else [eos])
            self._check_length(len(head) + len(tail), name)
            rows.append(head + tail)
            supervised.append(len(tail))
        ids, mask = self._pad(rows, "right")
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, (row, n) in enumerate(zip(rows, supervised)):
            labels[i, len(row) - n : len(row)] = ids[i, len(row) - n : len(row)]
        ids, mask = self._with_image_tokens(ids, mask)
        labels = torch.cat([torch.full((ids.shape[0], self.num_query_tokens), IGNORE_INDEX, dtype=torch.long), labels], 1)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Blip2Answerer:
    """The contract of :mod:`vlkit.eval.generative` for a BLIP-2 model: ``generate(images, prompts,
    max_new_tokens)`` → one answer per prompt, in left-padded batches. ``prompt_for`` maps a task's
    prompt to the one BLIP-2 answers (eval's captioning prompt to :data:`CAPTION_PROMPT`, ...);
    ``options`` are generation options for every call."""

    def __init__(self, model, processor: Blip2Processor | None = None, prompt_for=None, **options):
        self.model = model
        self.processor = processor if processor is not None else Blip2Processor.for_model(model)
        self.prompt_for = prompt_for or (lambda prompt: prompt)
        self.options = options

    @staticmethod
    def question_prompt(question: str) -> str:
        """A bare question as BLIP-2 is asked it zero-shot."""
        return VQA_PROMPT.format(question.strip())

    def generate(self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int = 32, **options) -> list[str]:
        from vlkit.lm.generate import decode_new, resolve_config

        if len(images) != len(prompts):
            raise VlkitError(f"{len(images)} images but {len(prompts)} prompts; expected one image per prompt")
        for i, image in enumerate(images):
            if image is None:
                raise VlkitError(f"sample {i}: no image; BLIP-2 answers about an image, one per prompt")
        batch = self.processor([self.prompt_for(p) for p in prompts], list(images))
        device = next(self.model.parameters()).device
        options = {**self.options, **options, "max_new_tokens": max_new_tokens}
        ids = self.model.generate(**{k: v.to(device) for k, v in batch.items()}, **options)
        cfg = resolve_config(self.model.lm, self.model.generation_config, **options)
        return [text.strip() for text in decode_new(self.processor.tokenizer, ids, cfg)]
