"""Train a language model's tokenizer with ``tokenizers`` on a corpus of texts.

The model is byte-level BPE with every digit its own token:

- byte level: any text encodes (no unknown token) and decoding gives the text back exactly,
  which the answer and box parsers of the evaluation read;
- BPE on a small closed world (the shapes texts) learns each word, with its leading space, as
  one token, so sequences are as short as word-level ones;
- digits split one by one, so a box coordinate on the 0–999 grid is one to three tokens from
  a ten-token alphabet (coarse to fine), never a thousand rare whole-number tokens.

The special tokens are BOS/EOS/padding, ChatML's role markers and ``<image>``; BOS is added
in front of every encoded text by the post-processor. The chat template is ChatML after BOS,
so the built-in ``chatml`` conversation template (fast: no jinja per turn) and the tokenizer's
own template give the same ids and labels. The
result is an :class:`~vlkit.text.lm_tokenizer.LMTokenizer`: ``save`` writes the files that
``LMTokenizer.from_folder`` and transformers' ``AutoTokenizer`` both read.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vlkit.errors import VlkitError
from vlkit.text.chat_template import ChatTemplate
from vlkit.text.lm_tokenizer import LMTokenizer

SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "image_token": "<image>",
}
ROLE_TOKENS = ("<|im_start|>", "<|im_end|>")
"""ChatML's turn markers: ``<|im_start|>role\\n ... <|im_end|>``."""
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML after BOS as a jinja template (string contents only: the conversation code renders images as
``<image>``). It gives the ids of the built-in ``chatml`` conversation template, whose BOS the post-processor adds."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> LMTokenizer:
    """A byte-level BPE tokenizer of at most ``vocab_size`` ids learned from ``texts``, with
    the special tokens (ids 0..5, in the order of :data:`SPECIAL_TOKENS` then
    :data:`ROLE_TOKENS`) and the ChatML chat template."""
    specials = [*SPECIAL_TOKENS.values(), *ROLE_TOKENS]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise VlkitError(f"vocab_size {vocab_size} is too small: the {len(specials)} special tokens and the "
                         f"{len(alphabet)} bytes need {len(specials) + len(alphabet)} ids")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    count = 0

    def counted():
        nonlocal count
        for text in texts:
            if not isinstance(text, str):
                raise VlkitError(f"text {count} of the tokenizer's corpus is a {type(text).__name__}; expected a string")
            count += 1
            yield text

    tok.train_from_iterator(counted(), trainer)
    if count == 0:
        raise VlkitError("the tokenizer's corpus holds no texts; expected at least one")
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return LMTokenizer(tok, dict(SPECIAL_TOKENS), ChatTemplate(CHATML, "the trained tokenizer's chat template"),
                       origin="a tokenizer trained on texts")
