"""Tiny random language models built by transformers and saved by ``save_pretrained``, a left-padded
batch of three prompts, and the logits transformers gives for it: the parity tests' reference."""

from __future__ import annotations

from pathlib import Path

import torch

from _interop_util import perturb

VOCAB = 97
LENGTHS = (11, 7, 3)
"""The three prompts' lengths: left-padded to 11."""

SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
OPT_SIZES = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, init_std=0.2, dropout=0.0)


def hf_config(family: str, **overrides):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig,
           "opt": transformers.OPTConfig}[family]
    sizes = OPT_SIZES if family == "opt" else SIZES
    return cls(**{**sizes, **overrides})


def hf_model(family: str, seed: int = 0, **overrides):
    """A random ``*ForCausalLM`` in eval mode, its weights moved off their initial values (unit norms,
    zero biases) so that a swapped or dropped key shows in the logits."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides), attn_implementation="sdpa")
    return perturb(model, seed=seed, scale=0.1)


def save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def padded_batch(lengths=LENGTHS, vocab: int = VOCAB, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for prompts of ``lengths`` tokens, left-padded with id 0."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, n - length :] = torch.randint(1, vocab, (length,), generator=g)
        mask[i, n - length :] = 1
    return ids, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids transformers' ``generate`` gives a left-padded batch."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits


def real(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits at real (unpadded) positions, ``[tokens, V]``."""
    return logits[mask.bool()]
