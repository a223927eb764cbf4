"""Tokenisation read from ``tokenizer.json`` + ``tokenizer_config.json`` gives the same ids,
padding and truncation as transformers' fast tokenizer: CLIP (77, pad to max length) and SigLIP
(64, pad with ``</s>`` to max length), on a few hundred varied strings."""

from __future__ import annotations

import random

import pytest

transformers = pytest.importorskip("transformers")

from vlkit.interop.common import attach_tokenizer  # noqa: E402

from _interop_util import clip_bpe, siglip_unigram  # noqa: E402

WORDS = ["photo", "cat", "Dog", "the", "a", "of", "Eiffel", "tower", "naïve", "café", "Ωmega", "日本語", "東京", "中文字符",
         "مرحبا", "привет", "😀", "🐱‍👤", "👍🏽", "#hashtag", "e-mail", "it's", "don't", "3.14159", "1,000", "NASA", "x"]


def strings(n: int = 300, seed: int = 0) -> list[str]:
    """Short and very long, mixed case and scripts, emoji, odd whitespace, specials in the text."""
    rng = random.Random(seed)
    out = ["", " ", "a", "A PHOTO OF A CAT.", "  leading and   inner   spaces\t\nnewline ", "<|endoftext|> inside",
           "</s> inside", "ﬁ ligature ＦＵＬＬＷＩＤＴＨ", "e\u0301 combining", "zero\u200bwidth", "word " * 200]
    while len(out) < n:
        k = rng.choice([1, 3, 8, 20, 60, 150])
        sep = rng.choice([" ", " ", "  ", ", ", "\n", ""])
        out.append(sep.join(rng.choice(WORDS) for _ in range(k)))
    return out


class _Holder:
    tokenizer = None


def vlkit_tokenizer(folder, length):
    holder = _Holder()
    attach_tokenizer(holder, folder, length)
    return holder.tokenizer


def compare(ref, ours, texts, length):
    expected = ref(texts, padding="max_length", truncation=True, max_length=length)
    got = ours(texts)
    assert got["input_ids"].shape == (len(texts), length)
    for i, text in enumerate(texts):
        assert got["input_ids"][i].tolist() == expected["input_ids"][i], text
        assert got["attention_mask"][i].tolist() == expected["attention_mask"][i], text
    return sum(sum(m) == length for m in expected["attention_mask"])


def test_clip_tokenizer_parity(tmp_path):
    clip_bpe(tmp_path, vocab_size=600, corpus=strings(100, seed=1))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(ref).__name__ == "CLIPTokenizer"
    texts = strings()
    truncated = compare(ref, vlkit_tokenizer(tmp_path, 77), texts, 77)
    assert truncated >= 10  # the long strings really were cut at 77 (ending in <|endoftext|>)


def test_siglip_tokenizer_parity(tmp_path):
    siglip_unigram(tmp_path, vocab_size=400, corpus=strings(100, seed=2))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = vlkit_tokenizer(tmp_path, 64)
    texts = strings()
    truncated = compare(ref, ours, texts, 64)
    assert truncated >= 10
    pad = ref.convert_tokens_to_ids("</s>")
    assert ours([""])["input_ids"][0].tolist() == [pad] * 64  # empty text: EOS then </s> padding
