"""The text encoder (CLIP's text transformer) and tokenizers."""

from vlkit.text.encoder import TextConfig, TextEncoder
from vlkit.text.tokenizer import Tokenizer

__all__ = ["TextConfig", "TextEncoder", "Tokenizer"]
