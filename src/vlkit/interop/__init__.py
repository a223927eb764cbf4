"""Loading checkpoints from other libraries' folder layouts (and exporting back to them).

The loader is chosen from ``config.json``'s ``model_type`` (transformers layouts) or from the
presence of ``open_clip_config.json`` (OpenCLIP), never from the folder's name.
"""

from __future__ import annotations

from pathlib import Path

from vlkit.interop import hf_blip2, hf_clip, hf_dinov2, hf_llama, hf_llava, hf_llava_next, hf_opt, hf_siglip, open_clip
from vlkit.interop.weights import CheckpointError

LOADERS = {
    "clip": hf_clip.load,
    "clip_vision_model": hf_clip.load,
    "clip_text_model": hf_clip.load,
    "siglip": hf_siglip.load,
    "dinov2": hf_dinov2.load,
    "dinov2_with_registers": hf_dinov2.load,
    "llama": hf_llama.load,
    "qwen2": hf_llama.load,
    "mistral": hf_llama.load,
    "opt": hf_opt.load,
    "llava": hf_llava.load,
    "llava_next": hf_llava_next.load,
    "llava_next_video": hf_llava_next.load,
    "blip-2": hf_blip2.load,
}
"""transformers ``model_type`` → loader ``(folder, config, dtype) -> model``."""

OPEN_CLIP_CONFIG = "open_clip_config.json"


def load_transformers(folder: Path, raw: dict, dtype=None):
    """Dispatch on ``raw['model_type']``, which the caller has checked is in :data:`LOADERS`. A
    config value of the wrong type (a string or null for a number) is named with its file."""
    try:
        return LOADERS[raw["model_type"]](Path(folder), raw, dtype)
    except TypeError as err:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: a value of the wrong type ({err}); expected the numbers, "
                              "strings and lists transformers writes") from None  # fmt: skip


def load_open_clip(folder: Path, dtype=None):
    return open_clip.load(Path(folder), dtype)


__all__ = ["LOADERS", "OPEN_CLIP_CONFIG", "CheckpointError", "load_transformers", "load_open_clip"]
