"""Shared helpers for the interop parity tests: tiny transformers models, tokenizer files, diffs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "a photo of a cat", "a diagram of the eiffel tower", "two dogs playing in the snow", "a red circle and a blue star",
    "the quick brown fox jumps over the lazy dog", "an emoji 😀 and some café crème", "numbers 12345 and symbols #$%",
]


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its initial value (zero biases, unit norms) so a swapped key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def max_diff_states(a, b) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(max_diff(x, y) for x, y in zip(a, b))


def clip_bpe(folder: Path, vocab_size: int = 400, corpus=CORPUS, pad: str = "<|endoftext|>") -> Tokenizer:
    """A small byte-level BPE with CLIP's normaliser, pre-tokeniser and ``<|startoftext|> … <|endoftext|>``."""
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
                                  show_progress=False)
    tok.train_from_iterator(list(corpus) * 5, trainer)
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.RobertaProcessing(("<|endoftext|>", eos), ("<|startoftext|>", bos), add_prefix_space=False,
                                                      trim_offsets=False)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }))
    return tok


def siglip_unigram(folder: Path, vocab_size: int = 300, corpus=CORPUS) -> Tokenizer:
    """A small SentencePiece-style Unigram with SigLIP's conventions: no BOS, ``</s>`` appended, pad ``</s>``."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(list(corpus) * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64, "pad_token": "</s>", "eos_token": "</s>",
        "unk_token": "<unk>",
    }))
    return tok


def tiny_clip_folder(folder: Path, seed: int = 0, tokenizer: bool = True, processor: bool = True) -> Path:
    """A vlkit CLIP checkpoint folder, a few kB, that both the transformers and the OpenCLIP
    layouts can express (no conv stem, pooling at the highest token id)."""
    from vlkit.models.clip import CLIP, CLIPConfig
    from vlkit.text.encoder import TextConfig
    from vlkit.text.tokenizer import word_level
    from vlkit.train.checkpoint import save_model
    from vlkit.vision.preprocess import ImageProcessor
    from vlkit.vision.vit import ViTConfig

    tok = word_level({"a", "red", "blue", "green", "circle", "star", "square"}, 16)
    cfg = CLIPConfig(vision=ViTConfig(image_size=32, patch_size=8, width=16, depth=1, num_heads=2),
                     text=TextConfig(vocab_size=tok.vocab_size, context_length=16, width=16, depth=1, num_heads=2), embed_dim=8)
    torch.manual_seed(seed)
    model = CLIP(cfg)
    model.tokenizer = tok if tokenizer else None
    model.processor = ImageProcessor(size=32, crop_size=32) if processor else None
    save_model(Path(folder), model, "clip")
    return Path(folder)


def convert(*argv: str) -> int:
    """Run the ``convert`` subcommand exactly as ``vlkit`` will (via ``add_parser``)."""
    import argparse

    from vlkit.convert_cli import add_parser

    parser = argparse.ArgumentParser(prog="vlkit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *argv])
    return args.fn(args, [])
