"""Streaming text: pieces never split a character (byte-level BPE and byte-fallback tokenizers
that spell multi-byte characters over several tokens), joined they equal the full decode with
stop strings trimmed; ``stream`` gives what ``generate_text`` gives."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlkit.lm import LlamaConfig, LlamaLM
from vlkit.lm.generate import generate, generate_text, stream
from vlkit.lm.stopping import StopStrings, held_back, trim_stop_strings
from vlkit.lm.streaming import TextStream
from vlkit.text.lm_tokenizer import LMTokenizer

from _lm_util import chatml_folder, sentencepiece_folder

TEXT = "Hello 日本語のテキスト, café 😀 👍🏽 привет! ß ø 🐱 end"


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback"])
def tokenizer(request, tmp_path_factory):
    make = chatml_folder if request.param == "byte_level" else sentencepiece_folder
    return LMTokenizer.from_folder(make(tmp_path_factory.mktemp(request.param)))


def pieces(tok, ids, stops=()) -> list[str]:
    text = TextStream(tok, stops)
    out = [text.push(i) for i in ids]
    return [p for p in out + [text.finish()] if p]


def test_multibyte_characters_are_split_across_tokens(tokenizer):
    """The premise: some tokens alone decode to half a character."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == TEXT
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_pieces_join_to_the_full_decode_and_keep_characters_whole(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    out = pieces(tokenizer, ids)
    assert "".join(out) == TEXT
    assert not any("\ufffd" in p for p in out)
    assert len(out) > 5


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_token_sequence_streams_to_its_decode(tokenizer, data):
    """Random ids (bytes that never form a character, special tokens, ...) still join exactly."""
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=40))
    assert "".join(pieces(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_stop_strings_are_held_back_and_trimmed(tokenizer, data):
    words = ["ab", "a", "b", " ", "日本", "😀", "é", "ca", "fé"]
    text = "".join(data.draw(st.lists(st.sampled_from(words), max_size=15)))
    stops = data.draw(st.lists(st.sampled_from(["ab", "b a", "😀é", "日", "fé!", "aaa"]), min_size=1, max_size=3))
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    out = pieces(tokenizer, ids, stops)
    assert "".join(out) == trim_stop_strings(full, stops)


def test_text_that_may_begin_a_stop_string_waits():
    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    text = TextStream(Chars(), ["END"])
    assert [text.push(ord(c)) for c in "xEN"] == ["x", "", ""]
    assert text.push(ord("o")) == "ENo"
    assert [text.push(ord(c)) for c in "ENDz"] == ["", "", "", ""]
    assert text.finish() == ""
    assert held_back("abcE", ["END", "cEx"]) == 2


def test_a_stop_string_spelled_over_byte_tokens_is_found(tokenizer):
    stops = ["é 😀"]
    stop = StopStrings(tokenizer, stops)
    ids = tokenizer.encode("café 😀 after", add_special_tokens=False)
    ends = [i for i in range(len(ids)) if stop.hit(ids[:i], ids[i])]
    text_upto = lambda i: tokenizer.decode(ids[: i + 1])  # noqa: E731
    assert len(ends) == 1 and "é 😀" in text_upto(ends[0]) and "é 😀" not in text_upto(ends[0] - 1)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    lm = LlamaLM(cfg).eval()
    with torch.no_grad():
        lm.embed_tokens.weight.normal_(0, 1.0)  # peaked, varied predictions
    return lm


def test_stream_gives_what_generate_text_gives(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("Hello 日本", add_special_tokens=False)])
    free = generate_text(model, tokenizer, ids, max_new_tokens=40)[0]
    assert len(free) > 10
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    for kwargs in ({}, {"stop_strings": [stop]}, {"do_sample": True, "temperature": 2.0}):
        seed = lambda: torch.Generator().manual_seed(5)  # noqa: E731
        text = generate_text(model, tokenizer, ids, max_new_tokens=40, generator=seed(), **kwargs)[0]
        out = list(stream(model, tokenizer, ids, max_new_tokens=40, generator=seed(), **kwargs))
        assert "".join(out) == text, kwargs
        assert len(out) > 1 or kwargs.get("stop_strings"), "the answer should come in several pieces"
    assert "".join(stream(model, tokenizer, ids, max_new_tokens=40, stop_strings=[stop])) == free[: free.find(stop)]


def test_stream_stops_at_eos(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("café", add_special_tokens=False)])
    free = generate(model, ids, max_new_tokens=30)[0].tolist()
    eos = free[12]
    cut = free.index(eos)
    # the stream's text is the answer decoded as generate_text decodes it: special tokens (a random model's <unk>) skipped
    want = tokenizer.decode(free[:cut], skip_special_tokens=True)
    assert "".join(stream(model, tokenizer, ids, max_new_tokens=30, eos_token_id=eos)) == want
