"""Model compositions. ``MODELS`` maps a checkpoint's ``model`` field to its config and class."""

from vlkit.models.clip import CLIP, CLIPConfig

MODELS = {"clip": (CLIPConfig, CLIP)}

__all__ = ["CLIP", "CLIPConfig", "MODELS"]
