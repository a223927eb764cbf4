"""Decoder-only language models (the Llama family, OPT), their KV cache and generation."""

from vlkit.lm.cache import KVCache
from vlkit.lm.decoder import DecoderLM
from vlkit.lm.llama import LlamaConfig, LlamaLM
from vlkit.lm.opt import OPTConfig, OPTLM
from vlkit.lm.output import LMOutput

__all__ = ["DecoderLM", "KVCache", "LMOutput", "LlamaConfig", "LlamaLM", "OPTConfig", "OPTLM"]
