"""Tiny random transformers LLaVA models (CLIP or SigLIP vision; Llama, Qwen2 or Mistral text), saved by
``save_pretrained``, and padded batches of prompts with expanded image tokens: the LLaVA parity tests'
reference, reusable by the LLaVA-NeXT and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from _interop_util import perturb
from _lm_models import SIZES, hf_positions

VOCAB = 100
IMAGE_TOKEN = 99
IMAGE_SIZE, PATCH = 32, 8
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE,
              patch_size=PATCH)
TEXT = {**SIZES, "vocab_size": VOCAB, "max_position_embeddings": 128}


def hf_config(vision: str = "clip", text: str = "llama", text_overrides: dict | None = None, vision_overrides: dict | None = None,
              **overrides):
    """A transformers ``LlavaConfig`` with a 3-layer, 32-wide tower on 32×32 images (16 patches) and a
    2-layer, 64-wide LM of :data:`VOCAB` ids, the last of which is the image token."""
    import transformers

    vcls = {"clip": transformers.CLIPVisionConfig, "siglip": transformers.SiglipVisionConfig}[vision]
    tcls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[text]
    return transformers.LlavaConfig(vision_config=vcls(**{**VISION, **(vision_overrides or {})}),
                                    text_config=tcls(**{**TEXT, **(text_overrides or {})}),
                                    image_token_index=IMAGE_TOKEN, **overrides)


def hf_model(vision: str = "clip", text: str = "llama", seed: int = 0, text_overrides: dict | None = None,
             vision_overrides: dict | None = None, **overrides):
    """A random ``LlavaForConditionalGeneration`` in eval mode, its weights moved off their initial values."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(hf_config(vision, text, text_overrides, vision_overrides, **overrides))
    return perturb(model, seed=seed, scale=0.1)


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return Path(folder)


def tokens_per_image(hf) -> int:
    """Visual tokens per image: the patches, plus the class token (CLIP) when "full", less one when "default"."""
    c = hf.config
    grid = (c.vision_config.image_size // c.vision_config.patch_size) ** 2
    cls = int(c.vision_config.model_type == "clip_vision_model")
    return grid + cls - (c.vision_feature_select_strategy == "default")


ROWS = ((5, 1, 4), (2, 2, 3), (0, 1, 1))
"""Per prompt ``(text before, images, text after)``; the second prompt has two images with text
between them, the third starts with its image."""


def batch(per_image: int, rows=ROWS, side: str = "left", seed: int = 1):
    """``(input_ids, attention_mask, pixel_values)``: each prompt's image tokens expanded to
    ``per_image`` ids, prompts padded (id 0) on ``side`` to the longest; one image per placeholder."""
    g = torch.Generator().manual_seed(seed)
    seqs, images = [], 0
    for before, n, after in rows:
        words = lambda k: torch.randint(1, IMAGE_TOKEN, (k,), generator=g).tolist()  # noqa: E731
        ids = words(before)
        for i in range(n):
            ids += [IMAGE_TOKEN] * per_image + (words(2) if i < n - 1 else [])
        seqs.append(ids + words(after))
        images += n
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for r, s in enumerate(seqs):
        span = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[r, span] = torch.tensor(s)
        mask[r, span] = 1
    pixels = torch.randn(images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return ids, mask, pixels


@torch.no_grad()
def hf_logits(hf, ids, mask, pixels, **kwargs):
    """transformers' logits with the positions its ``generate`` gives a padded batch."""
    return hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=hf_positions(mask), **kwargs)


NEWER = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
         ("vision_tower.", "model.vision_tower.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector."))
OLDER = (("vision_tower.", "vision_tower.vision_model."),)
"""Key renames from the layout transformers 5 writes to the 4.52+ one and to the older hub one."""


def rename_keys(folder: Path, renames) -> Path:
    """Rewrite ``model.safetensors`` with each key's first matching prefix replaced."""
    path = Path(folder) / "model.safetensors"
    state = load_file(str(path))
    out = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    save_file(out, str(path), metadata={"format": "pt"})
    return Path(folder)


def edit_config(folder: Path, **changes) -> Path:
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return Path(folder)
