"""Model compositions. ``MODELS`` maps a checkpoint's ``model`` field to its config and class."""

from vlkit.lm import LlamaConfig, LlamaLM, OPTConfig, OPTLM
from vlkit.models.blip2 import Blip2, Blip2Config
from vlkit.models.blip2_qformer import Blip2QFormer, Blip2QFormerConfig
from vlkit.models.clip import CLIP, CLIPConfig
from vlkit.models.diffusion import DiffusionConfig, TextToImage
from vlkit.models.llava import Llava, LlavaConfig
from vlkit.models.llava_next import LlavaNext, LlavaNextConfig
from vlkit.models.single_tower import TextEncoderConfig, TextTower, VisionEncoder, VisionEncoderConfig

MODELS = {
    "clip": (CLIPConfig, CLIP),
    "diffusion": (DiffusionConfig, TextToImage),
    "blip2_qformer": (Blip2QFormerConfig, Blip2QFormer),
    "vision_encoder": (VisionEncoderConfig, VisionEncoder),
    "text_encoder": (TextEncoderConfig, TextTower),
    "llama": (LlamaConfig, LlamaLM),
    "opt": (OPTConfig, OPTLM),
    "llava": (LlavaConfig, Llava),
    "llava_next": (LlavaNextConfig, LlavaNext),
    "blip2": (Blip2Config, Blip2),
}

__all__ = ["Blip2", "Blip2Config", "CLIP", "CLIPConfig", "Llava", "LlavaConfig", "LlavaNext", "LlavaNextConfig", "MODELS", "TextEncoderConfig", "TextTower", "VisionEncoder", "VisionEncoderConfig"]
