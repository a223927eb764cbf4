"""Tiny language-model tokenizers saved the way transformers saves them, for parity tests.

Three families: ChatML (Qwen2-like byte-level BPE, no BOS), Llama-3-like (byte-level BPE, BOS by
the post-processor) and SentencePiece-like (Llama-2/Mistral: metaspace BPE with byte fallback,
BOS from ``add_bos_token``), each with its realistic chat template.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "Hello, how are you today?", "I am fine, thank you. And you?", "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.", "Write a short poem about the sea.",
    "a red circle and a blue star", "café crème, naïve résumé", "日本語のテキスト", "emoji 😀 🐱 👍🏽", "numbers 12345 67.89",
    "def f(x):\n    return x * 2\n", "Ünïcödé everywhere: ß, ø, å, ç", "привет мир", "multiple   spaces\tand\ttabs",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Written over several lines, as many hub templates are: the output depends on trim_blocks and
# lstrip_blocks; raise_exception refuses roles that do not alternate; a namespace carries the system text.
MISTRAL_TEMPLATE = """{% set ns = namespace(system='') %}
{% if messages[0]['role'] == 'system' %}
    {% set ns.system = messages[0]['content'] + '\\n\\n' %}
    {% set messages = messages[1:] %}
{% endif %}
{{ bos_token }}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {% if loop.first %}
{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}
        {% else %}
{{ '[INST] ' + message['content'] + ' [/INST]' }}
        {% endif %}
    {% elif message['role'] == 'assistant' %}
{{ message['content'] + eos_token }}
    {% endif %}
{% endfor %}
"""


def _byte_level_bpe(specials: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def _save(folder: Path, tok: Tokenizer, **kwargs) -> Path:
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(folder)
    return folder


def chatml_folder(folder: Path, vocab_size: int = 400) -> Path:
    """Qwen2-like: no BOS; ``<|im_end|>`` ends a turn; ``<|endoftext|>`` pads."""
    tok = _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return _save(folder, tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
                 additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def llama3_folder(folder: Path, vocab_size: int = 400) -> Path:
    """Llama-3-like: the post-processor writes ``<|begin_of_text|>``; ``<|eot_id|>`` ends a turn; no pad token."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _byte_level_bpe(specials, vocab_size)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)])
    return _save(folder, tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE)


def _alphabet(size: int) -> list[str]:
    """The ``size`` commonest characters of the normalised corpus, ties broken by the character: the
    trainer's own ``limit_alphabet`` breaks ties in hash order, so each process trained a different
    tokenizer (and a test whose random model's text depends on it could fail one run in many)."""
    counts = Counter("".join("▁" + text.replace(" ", "▁") for text in CORPUS))
    return sorted(counts, key=lambda c: (-counts[c], c))[:size]


def sentencepiece_folder(folder: Path, vocab_size: int = 500) -> Path:
    """Llama-2/Mistral-like: metaspace BPE with byte fallback (``<0x..>`` tokens), ``add_bos_token``."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                                initial_alphabet=_alphabet(60), limit_alphabet=60))
    model = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return _save(folder, tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True,
                 add_eos_token=False, chat_template=MISTRAL_TEMPLATE)


FAMILIES = {"chatml": chatml_folder, "llama3": llama3_folder, "sentencepiece": sentencepiece_folder}
