"""Bad input to generation is a VlkitError that names what is wrong, before any compute."""

from __future__ import annotations

import pytest
import torch

from vlkit.errors import Missing, MissingPart, VlkitError
from vlkit.lm import LlamaConfig, LlamaLM
from vlkit.lm.generate import generate, generate_text, stream


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=32)
    return LlamaLM(cfg).eval()


IDS = torch.tensor([[5, 6, 7, 8]])


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(max_new_tokens=0), "max_new_tokens=0"), (dict(max_new_tokens=-3), "max_new_tokens=-3"),
     (dict(do_sample=True, top_p=0.0), r"top_p=0.0; expected a probability mass in \(0, 1\]"),
     (dict(do_sample=True, top_p=1.01), "top_p=1.01"), (dict(top_p=-0.5), "top_p=-0.5"),
     (dict(do_sample=True, temperature=0.0), "temperature=0.0; expected a temperature > 0 when sampling"),
     (dict(do_sample=True, temperature=-1.0), "temperature=-1.0"),
     (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 is more than num_beams=2"),
     (dict(num_return_sequences=2), "num_return_sequences=2; expected 1 for greedy"),
     (dict(top_k=-1), "top_k=-1"), (dict(min_p=1.5), "min_p=1.5"), (dict(repetition_penalty=0.0), "repetition_penalty"),
     (dict(early_stopping="soon"), "early_stopping='soon'"),
     (dict(max_tokens=5), r"unknown generation option\(s\) \['max_tokens'\]"),
     (dict(temperature="warm"), "temperature='warm'; expected a number")],
)
def test_bad_options(lm, kwargs, message):
    with pytest.raises(VlkitError, match=message):
        generate(lm, IDS, **kwargs)


def test_a_prompt_longer_than_the_positions_names_both_numbers(lm):
    with pytest.raises(VlkitError, match="the prompt has 40 tokens, more than the model's 32 positions"):
        generate(lm, torch.ones(1, 40, dtype=torch.long), max_new_tokens=1)
    too_many = r"prompt's 30 tokens \+ max_new_tokens=5 = 35 exceed the model's 32 positions.*at most 2"
    with pytest.raises(VlkitError, match=too_many):
        generate(lm, torch.ones(1, 30, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(VlkitError, match="the prompt has 4 tokens, max_length=4 leaves no room"):
        generate(lm, IDS, max_length=4)


def test_bad_prompts(lm):
    with pytest.raises(VlkitError, match="give the prompt as input_ids"):
        generate(lm)
    with pytest.raises(VlkitError, match="integer token ids"):
        generate(lm, IDS.float())
    with pytest.raises(VlkitError, match="the prompt is empty"):
        generate(lm, IDS[:, :0])
    with pytest.raises(VlkitError, match=r"attention_mask is \(1, 3\), the prompt \(1, 4\)"):
        generate(lm, IDS, torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(VlkitError, match="pad on the left"):
        generate(lm, IDS, torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(VlkitError, match="pad on the left"):
        generate(lm, IDS, torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(VlkitError, match="cover different tokens"):
        generate(lm, IDS, inputs_embeds=torch.zeros(1, 3, 16))


def test_stop_strings_need_a_tokenizer(lm):
    with pytest.raises(VlkitError, match="need a tokenizer with decode"):
        generate(lm, IDS, max_new_tokens=3, stop_strings=["x"])
    lm.tokenizer = Missing("/models/tiny", "tokenizer.json", "tokenizer")
    try:
        with pytest.raises(MissingPart, match="/models/tiny: no tokenizer.json"):
            generate(lm, IDS, max_new_tokens=3, stop_strings=["x"])
    finally:
        del lm.tokenizer


def test_rows_ending_on_stop_strings_need_a_fill_id(lm):
    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    with pytest.raises(VlkitError, match="set pad_token_id or eos_token_id"):
        generate(lm, IDS.repeat(2, 1), max_new_tokens=3, stop_strings=["x"], tokenizer=Chars())


def test_stream_takes_one_prompt_without_beams(lm):
    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    with pytest.raises(VlkitError, match="streams one answer; got 2 rows"):
        stream(lm, Chars(), IDS.repeat(2, 1), max_new_tokens=3)
    with pytest.raises(VlkitError, match="num_beams=2"):
        stream(lm, Chars(), IDS, max_new_tokens=3, num_beams=2)
    assert len(generate_text(lm, Chars(), IDS, max_new_tokens=3)[0]) == 3

