"""The trained tokenizer: exact round trip, digits one by one, special tokens kept whole, the
chat template equal to the built-in chatml template, and the same ids in transformers."""

from __future__ import annotations

import pytest

from vlkit.errors import VlkitError
from vlkit.text.conversation import encode_conversation
from vlkit.text.lm_tokenizer import LMTokenizer
from vlkit.text.train_tokenizer import ROLE_TOKENS, SPECIAL_TOKENS, train_tokenizer

TEXTS = ["a red circle to the left of a blue star", "what color is the square? green",
         "the large red diamond: [279, 362, 679, 762]", "two shapes: a red circle and a blue star"] * 20
CHAT = [{"role": "user", "content": "<image>\nwhat color is the square?"}, {"role": "assistant", "content": "green"},
        {"role": "user", "content": "Give the bounding box of: the square"}, {"role": "assistant", "content": "[1, 20, 300, 999]"}]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400)


def test_round_trip_and_digits(tok):
    for text in ["the large red diamond: [279, 362, 679, 762]", "unseen wörds ✓ 12345"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    digits = [tok.id_to_token(i) for i in tok.encode("[279, 5]", add_special_tokens=False)]
    assert [d for d in digits if d.isdigit()] == ["2", "7", "9", "5"]
    assert len(tok.encode(" circle", add_special_tokens=False)) == 1  # a frequent word is one token


def test_special_tokens_whole(tok):
    for token in [*SPECIAL_TOKENS.values(), *ROLE_TOKENS]:
        assert tok.encode(token, add_special_tokens=False) == [tok.token_to_id(token)]
    assert sorted(tok.token_to_id(t) for t in [*SPECIAL_TOKENS.values(), *ROLE_TOKENS]) == list(range(6))


def test_chat_template_equals_builtin_chatml(tok):
    jinja = encode_conversation(CHAT, tok, "chat_template")
    builtin = encode_conversation(CHAT, tok, "chatml")
    assert jinja.input_ids == builtin.input_ids
    assert jinja.labels == builtin.labels
    supervised = tok.decode([i for i in builtin.labels if i >= 0])
    assert supervised == "green<|im_end|>[1, 20, 300, 999]<|im_end|>"


def test_save_load_and_transformers(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    back = LMTokenizer.from_folder(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "is the red circle left of the blue star? yes [12, 999]"
    assert back.encode(text) == tok.encode(text) == hf.encode(text)
    assert hf.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(CHAT, add_generation_prompt=False)
    assert back.special_tokens == tok.special_tokens
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<s>", "</s>", "<pad>")
    assert hf.decode(hf.encode("<image> red <|im_end|>"), skip_special_tokens=True).strip() == "red"


def test_bad_corpus():
    with pytest.raises(VlkitError, match="no texts"):
        train_tokenizer([])
    with pytest.raises(VlkitError, match="text 1 .* int"):
        train_tokenizer(["a", 3])
    with pytest.raises(VlkitError, match="too small"):
        train_tokenizer(TEXTS, vocab_size=100)
