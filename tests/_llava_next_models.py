"""Tiny random transformers LLaVA-NeXT (and LLaVA-NeXT-Video) models saved by ``save_pretrained``, the
transformers processor that expands their image tokens, and left-padded batches of prompts with images of
different aspect ratios (and videos): the LLaVA-NeXT parity tests' reference."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from _interop_util import perturb
from _llava_models import IMAGE_SIZE, IMAGE_TOKEN, PATCH, TEXT, VISION

PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
"""llava-v1.6's grids ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)) of 32-pixel tiles."""
VIDEO_TOKEN = 98
FRAMES = 3
CONTEXT = 512
"""Two AnyRes images take up to ~180 positions; the tiny LM gets room for them."""


def hf_processor(pinpoints=PINPOINTS, tile: int = IMAGE_SIZE, patch: int = PATCH, strategy: str = "default"):
    """transformers' ``LlavaNextProcessor`` (PIL backend) over a three-word tokenizer in which ``<image>`` is id 1."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1, "hi": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", additional_special_tokens=["<image>"])
    images = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=[list(p) for p in pinpoints])
    return transformers.LlavaNextProcessor(image_processor=images, tokenizer=fast, patch_size=patch,
                                           vision_feature_select_strategy=strategy,
                                           num_additional_image_tokens=1 if strategy == "default" else 0)


def hf_model(vision: str = "clip", text: str = "llama", video: bool = False, seed: int = 0, vocab: int | None = None,
             image_token: int = IMAGE_TOKEN, **overrides):
    """A random ``LlavaNextForConditionalGeneration`` (``LlavaNextVideoForConditionalGeneration`` with
    ``video``) in eval mode, weights moved off their initial values; ``vocab`` ids (default the tiny LM's)."""
    import transformers

    vcls = {"clip": transformers.CLIPVisionConfig, "siglip": transformers.SiglipVisionConfig}[vision]
    tcls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[text]
    cfg_cls, model_cls = ((transformers.LlavaNextVideoConfig, transformers.LlavaNextVideoForConditionalGeneration) if video
                          else (transformers.LlavaNextConfig, transformers.LlavaNextForConditionalGeneration))
    extra = dict(video_token_index=VIDEO_TOKEN) if video else {}
    text_sizes = {**TEXT, "max_position_embeddings": CONTEXT, **({"vocab_size": vocab} if vocab else {})}
    cfg = cfg_cls(vision_config=vcls(**VISION), text_config=tcls(**text_sizes), image_token_index=image_token,
                  image_grid_pinpoints=PINPOINTS, **extra, **overrides)
    torch.manual_seed(seed)
    return perturb(model_cls(cfg), seed=seed, scale=0.1)


def random_image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMAGES = [(50, 90), (120, 40), (33, 33), (45, 200)]
"""Wide, tall (3:1, no unpadding), square and very wide: four different tilings and unpaddings."""
ROWS = ((5, [0], 4), (2, [1, 2], 3), (0, [3], 1))
"""Per prompt ``(words before, images, words after)``: the second prompt has two images with words between."""


def batch(proc, rows=ROWS, sizes=IMAGES, seed: int = 1, videos: tuple[int, ...] = ()):
    """``(input_ids, attention_mask, pixel_values, image_sizes, images)``, left-padded: each image's tokens
    expanded as ``proc`` (transformers' processor) expands them, pixel values as it makes them.
    ``videos``: per prompt, how many video tokens to append (0 for none)."""
    g = torch.Generator().manual_seed(seed)
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    counts = [int((proc(images=[im], text=["<image>"], return_tensors="pt")["input_ids"] == 1).sum()) for im in images]
    seqs = []
    for r, (before, which, after) in enumerate(rows):
        words = lambda k: torch.randint(1, VIDEO_TOKEN, (k,), generator=g).tolist()  # noqa: E731
        ids = words(before)
        for i, k in enumerate(which):
            ids += [IMAGE_TOKEN] * counts[k] + (words(2) if i < len(which) - 1 else [])
        if videos and videos[r]:
            ids += words(1) + [VIDEO_TOKEN] * videos[r]
        seqs.append(ids + words(after))
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, length - len(s):] = torch.tensor(s)
        mask[r, length - len(s):] = 1
    used = [images[k] for _, which, _ in rows for k in which]
    pixels = proc.image_processor(images=used, return_tensors="pt")
    return ids, mask, pixels["pixel_values"], pixels["image_sizes"], used
