"""The pretrained vision tower a VLM or BLIP-2 trainer starts from (recipe key ``model.vision``)."""

from __future__ import annotations

from vlkit.errors import ConfigError
from vlkit.vision.preprocess import ImageProcessor
from vlkit.vision.vit import ViT


def pretrained_vision_tower(folder: str) -> tuple[ViT, ImageProcessor]:
    """The ViT and its preprocessing from a CLIP, SigLIP or vision-encoder folder; a folder
    without either is refused by name, before any training starts."""
    from vlkit.loading import load

    loaded = load(folder)
    tower = loaded if isinstance(loaded, ViT) else getattr(loaded, "vision", None)
    if not isinstance(tower, ViT):
        raise ConfigError(f"model.vision {folder!r}: a {type(loaded).__name__}, which has no ViT vision tower; expected "
                          "a CLIP, SigLIP or vision-encoder folder", ("model.vision",))  # fmt: skip
    processor = getattr(loaded, "processor", None)
    if not isinstance(processor, ImageProcessor):
        raise ConfigError(f"model.vision {folder!r}: no image preprocessing (preprocessor_config.json)", ("model.vision",))
    return tower, processor
