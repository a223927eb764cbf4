"""Tokenizer wrapper over Hugging Face ``tokenizers`` (reads and writes ``tokenizer.json``)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, processors

from vlkit.errors import VlkitError

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


class Tokenizer:
    """Batches of strings → padded ``input_ids`` and ``attention_mask`` tensors.

    Padding and truncation live in ``tokenizer.json`` itself, so a saved tokenizer
    reproduces the same lengths.
    """

    def __init__(self, tok: HFTokenizer, context_length: int, pad_to_max: bool = True):
        self.tok = tok
        self._whole: HFTokenizer | None = None  # tok without truncation or padding, made when first asked
        self.context_length = context_length
        self.pad_to_max = pad_to_max
        pad_id = self._pad_id()
        tok.enable_truncation(max_length=context_length)
        if pad_to_max:
            tok.enable_padding(pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or "", length=context_length)
        else:
            tok.enable_padding(pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or "")

    def _pad_id(self) -> int:
        padding = self.tok.padding
        if padding is not None:
            return padding["pad_id"]
        for name in ("[PAD]", "<pad>", "<|endoftext|>"):
            idx = self.tok.token_to_id(name)
            if idx is not None:
                return idx
        return 0

    @classmethod
    def from_file(cls, path: str | Path, context_length: int | None = None) -> "Tokenizer":
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as err:
            raise ValueError(f"{path}: not a readable tokenizer.json ({err})") from err
        trunc = tok.truncation
        length = context_length or (trunc["max_length"] if trunc else None)
        if length is None:
            raise ValueError(f"{path}: no truncation length stored; pass context_length")
        pad_to_max = tok.padding is None or tok.padding.get("length") is not None
        return cls(tok, length, pad_to_max)

    def save(self, folder: str | Path) -> None:
        """Write ``folder/tokenizer.json`` (padding and truncation included)."""
        self.tok.save(str(Path(folder) / "tokenizer.json"))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def lengths(self, texts: list[str]) -> list[int]:
        """Each text's token count before truncation to the context (its special tokens included):
        what a caller checks before a long text is cut short without a word."""
        if self._whole is None:
            self._whole = HFTokenizer.from_str(self.tok.to_str())
            self._whole.no_truncation()
            self._whole.no_padding()
        return [len(e.ids) for e in self._whole.encode_batch(list(texts))]

    def token_id(self, token: str) -> int:
        idx = self.tok.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return idx

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise VlkitError(f"the tokenizer takes a string or a list of strings, got a {type(texts).__name__}")
        if not texts:
            raise VlkitError("the tokenizer got an empty list of texts; expected at least one string")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise VlkitError(f"the tokenizer takes strings; text {bad} is a {type(texts[bad]).__name__} ({texts[bad]!r:.40})")
        enc = self.tok.encode_batch(list(texts))
        return {
            "input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.long),
        }


def word_level(words: set[str] | list[str], context_length: int) -> Tokenizer:
    """A lowercase word-level tokenizer: ``[BOS] words [EOS]``, unknown words → ``[UNK]``,
    batches padded to their longest text (EOT pooling does not need a fixed length).
    ``[EOS]`` takes the highest id, so pooling at the highest id (OpenAI's and OpenCLIP's
    rule) finds it, and the model exports to both layouts."""
    vocab = {t: i for i, t in enumerate(SPECIALS[:-1])}
    for w in sorted(set(words) - set(SPECIALS)):
        vocab[w] = len(vocab)
    vocab[SPECIALS[-1]] = len(vocab)
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return Tokenizer(tok, context_length, pad_to_max=False)


def words_of(texts) -> set[str]:
    """The words (and punctuation marks) the word-level pre-tokenizer will see."""
    return {w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t.lower())}
