"""Image encoders (the ViT family) and image preprocessing."""

from vlkit.vision.vit import ViT, ViTConfig, ViTOutput
from vlkit.vision.preprocess import ImageProcessor

__all__ = ["ViT", "ViTConfig", "ViTOutput", "ImageProcessor"]
