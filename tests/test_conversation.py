"""Conversation templates and their labels: every supervised token is the assistant's text (and its
end of turn), every assistant token is supervised, on a multi-turn conversation with several images,
for each template and three tokenizer families; ids equal the whole text's where the tokenizer's
pre-tokenizer allows; bad conversations are named."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from _lm_util import FAMILIES  # noqa: E402

from vlkit.errors import VlkitError  # noqa: E402
from vlkit.text.conversation import (  # noqa: E402
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    ConversationError,
    Segment,
    encode_conversation,
    get_template,
    image_token_id,
    render,
    tokenize_segments,
)
from vlkit.text.lm_tokenizer import LMTokenizer  # noqa: E402

ANSWERS = ["Paris is the capital of France.", "I am fine, thank you.", "The quick brown fox jumps over the lazy dog."]
QUESTIONS = ["<image>\nWhat is the capital of France?", "And you?\n<image>", "<image>\nWrite a short poem about the sea."]
CONV = [m for q, a in zip(QUESTIONS, ANSWERS) for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
TEMPLATES = ("plain", "llava_v1", "chatml", "chat_template")
BYTE_LEVEL = ("chatml", "llama3")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, LMTokenizer]:
    """The three families of ``_lm_util`` with ``<image>`` named as their image token."""
    out = {}
    for name, make in FAMILIES.items():
        folder = make(tmp_path_factory.mktemp(name))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "image_token": "<image>"}))
        out[name] = LMTokenizer.from_folder(folder)
    return out


def supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive supervised positions."""
    runs, current = [], []
    for idx, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == idx
            current.append(idx)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_supervised_tokens_are_exactly_the_assistant_turns(tokenizers, family, template):
    tok = tokenizers[family]
    enc = encode_conversation(CONV, tok, template, image_counts=[3, 5, 2])
    end = get_template(template, tok).end_of_turn(tok)
    runs = supervised_runs(enc.input_ids, enc.labels)
    decoded = [tok.decode(run) for run in runs]
    assert [d.strip() for d in decoded] == [f"{a}{end}".strip() for a in ANSWERS], decoded
    unsupervised = tok.decode([i for i, label in zip(enc.input_ids, enc.labels) if label == IGNORE_INDEX])
    assert not any(a in unsupervised for a in ANSWERS)
    image_id = image_token_id(tok)
    assert enc.input_ids.count(image_id) == 10 and enc.num_images == 3
    assert all(label == IGNORE_INDEX for i, label in zip(enc.input_ids, enc.labels) if i == image_id)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("family", BYTE_LEVEL)
def test_ids_equal_the_whole_texts_for_byte_level_tokenizers(tokenizers, family, template):
    tok = tokenizers[family]
    for prompt in (False, True):
        messages = CONV[:-1] if prompt else CONV
        enc = encode_conversation(messages, tok, template, add_generation_prompt=prompt)
        whole = tok.encode(enc.text, add_special_tokens=get_template(template, tok).wraps_specials)
        assert enc.input_ids == whole


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_generation_prompt_is_the_training_ids_before_the_answer(tokenizers, family, template):
    """The prompt a model answers at inference is tokenised exactly as the text it was trained on."""
    tok = tokenizers[family]
    for turns in (2, 4, 6):
        train = encode_conversation(CONV[:turns], tok, template)
        prompt = encode_conversation(CONV[: turns - 1], tok, template, add_generation_prompt=True)
        start = max(i for i, label in enumerate(train.labels) if label != IGNORE_INDEX)
        while train.labels[start - 1] != IGNORE_INDEX:
            start -= 1
        assert prompt.input_ids == train.input_ids[:start]
        assert prompt.labels == train.labels[:start]


def test_templates_render_as_llava_and_chatml_write_them(tokenizers):
    tok = tokenizers["llama3"]
    v1 = "".join(s.text for s in render(CONV[:4], tok, "llava_v1"))
    assert v1 == (f"{VICUNA_SYSTEM} USER: <image>\nWhat is the capital of France? ASSISTANT: Paris is the capital of France."
                  "<|eot_id|>USER: And you?\n<image> ASSISTANT: I am fine, thank you.<|eot_id|>")
    prompt = "".join(s.text for s in render(CONV[:1], tok, "llava_v1", add_generation_prompt=True))
    assert prompt == f"{VICUNA_SYSTEM} USER: <image>\nWhat is the capital of France? ASSISTANT:"
    plain = "".join(s.text for s in render(CONV, tok, "plain"))
    assert plain == f"<image>{ANSWERS[0]}\n<image>{ANSWERS[1]}\n<image>{ANSWERS[2]}\n"
    chatml = "".join(s.text for s in render([{"role": "system", "content": "Be brief."}, *CONV[:2]], tok, "chatml"))
    assert chatml == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat is the capital of France?"
                      f"<|im_end|>\n<|im_start|>assistant\n{ANSWERS[0]}<|im_end|>\n")
    system = "".join(s.text for s in render([{"from": "system", "value": "Be brief."}, *CONV[:2]], tok, "llava_v1"))
    assert system.startswith("Be brief. USER:")


def test_openai_messages_give_the_same_ids_as_llava_messages(tokenizers):
    tok = tokenizers["chatml"]
    openai = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the capital of France?"}]},
        {"role": "assistant", "content": ANSWERS[0]},
        {"role": "user", "content": [{"type": "text", "text": "And you?"}, {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[1]}]},
    ]
    for template in ("llava_v1", "chatml", "plain"):
        a = encode_conversation(openai, tok, template)
        b = encode_conversation(CONV[:4], tok, template)
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


def test_image_placeholders_expand_to_their_counts_in_place(tokenizers):
    tok = tokenizers["llama3"]
    image_id = image_token_id(tok)
    one = encode_conversation(CONV, tok, "chatml")
    many = encode_conversation(CONV, tok, "chatml", image_counts=[3, 5, 2])
    runs = [len(r) for r in "".join("x" if i == image_id else "." for i in many.input_ids).split(".") if r]
    assert runs == [3, 5, 2] and one.input_ids.count(image_id) == 3
    assert [i for i in many.input_ids if i != image_id] == [i for i in one.input_ids if i != image_id]


def test_a_tokenizer_image_token_other_than_the_placeholder(tmp_path):
    """``<image>`` in messages is written as the tokenizer's own image token."""
    folder = FAMILIES["chatml"](tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "image_token": "<|image_pad|>"}))
    tok = LMTokenizer.from_folder(folder)
    enc = encode_conversation(CONV[:2], tok, "chatml", image_counts=[4])
    assert enc.input_ids.count(tok.token_to_id("<|image_pad|>")) == 4


def test_the_jinja_template_needs_each_turn_to_extend_the_last(tokenizers, tmp_path):
    tok = tokenizers["chatml"]
    enc = encode_conversation(CONV, tok, "chat_template")
    assert enc.text == tok.apply_chat_template([{"role": m["from"].replace("human", "user").replace("gpt", "assistant"),
                                                "content": m["value"]} for m in CONV], add_generation_prompt=False)
    folder = FAMILIES["chatml"](tmp_path)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}")
    odd = LMTokenizer.from_folder(folder)
    with pytest.raises(ConversationError, match="record 2: .*extends its output"):
        encode_conversation(CONV[:4], odd, "chat_template", sample="record 2")
    (folder / "chat_template.jinja").write_text("{{ raise_exception('only one image, please') }}")
    with pytest.raises(ConversationError, match="record 2: .*refused the conversation: only one image, please"):
        encode_conversation(CONV[:4], LMTokenizer.from_folder(folder), "chat_template", sample="record 2")


# The shape of llava-hf's llava-1.5 template: it renders OpenAI image parts as <image> itself.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_a_multimodal_jinja_template_renders_openai_image_parts(tmp_path):
    folder = FAMILIES["llama3"](tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "image_token": "<image>"}))
    (folder / "chat_template.jinja").write_text(LLAVA_HF_TEMPLATE)
    tok = LMTokenizer.from_folder(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the capital of France?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[0]}]},
                {"role": "user", "content": [{"type": "text", "text": "And you?"}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[1]}]}]
    enc = encode_conversation(messages, tok, "chat_template", image_counts=[2, 3])
    assert enc.text.startswith("USER: <image>\nWhat is the capital of France? ASSISTANT: Paris")
    assert enc.num_images == 2 and enc.input_ids.count(image_token_id(tok)) == 5
    assert [tok.decode(run).strip() for run in supervised_runs(enc.input_ids, enc.labels)] == ANSWERS[:2]


@pytest.mark.parametrize(
    "messages, prompt, match",
    [
        ([], False, "empty conversation"),
        ("hello", False, "empty conversation|non-empty list"),
        ([{"from": "gpt", "value": "hi"}], False, "message 0: an assistant turn where a user turn"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], False, "message 1: a user turn where an assistant"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "system", "value": "c"}], False,
         "message 2: a system turn"),
        ([{"from": "human", "value": "a"}], False, "ends with a user turn"),
        (CONV[:2], True, "ends with an assistant turn"),
        ([{"from": "robot", "value": "a"}], False, "speaker 'robot'"),
        ([{"text": "a"}], False, "no 'from' or 'role'"),
        ([{"role": "user", "content": 3}], False, "content is a int"),
        ([{"role": "user", "content": [{"type": "audio"}]}], False, "part 0"),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image> b"}], False, "placeholder in an assistant turn"),
        ([{"from": "system", "value": "s"}], False, "no user turn"),
    ],
)
def test_bad_conversations_are_named(tokenizers, messages, prompt, match):
    with pytest.raises(ConversationError, match=match) as err:
        encode_conversation(messages, tokenizers["chatml"], "llava_v1", add_generation_prompt=prompt, sample="record 7 (id 'abc')")
    assert "record 7 (id 'abc')" in str(err.value)


def test_placeholder_and_image_counts_must_agree(tokenizers):
    tok = tokenizers["chatml"]
    with pytest.raises(ConversationError, match="record 3: 3 <image> placeholder\\(s\\) but 4 image"):
        encode_conversation(CONV, tok, "llava_v1", image_counts=[1, 1, 1, 1], sample="record 3")
    with pytest.raises(ConversationError, match="3 <image> placeholder\\(s\\) but 1 image"):
        encode_conversation(CONV, tok, "llava_v1", image_counts=[1], sample="record 3")


def test_templates_and_tokenizers_that_cannot_serve_are_named(tokenizers, tmp_path):
    with pytest.raises(VlkitError, match="unknown conversation template 'vicuna'"):
        get_template("vicuna")
    folder = FAMILIES["llama3"](tmp_path)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((folder / "tokenizer_config.json").read_text()).items() if k != "chat_template"}))
    bare = LMTokenizer.from_folder(folder)
    bare.chat_template = None
    with pytest.raises(VlkitError, match="has none"):
        get_template("chat_template", bare)
    with pytest.raises(VlkitError, match="no '<image>' token"):
        encode_conversation(CONV, bare, "llava_v1")
    text_only = encode_conversation([{"from": "human", "value": "Hi"}, CONV[1]], bare, "llava_v1")  # no image: no image token needed
    assert text_only.num_images == 0


def test_tokenize_segments_wraps_with_the_post_processors_tokens(tokenizers):
    tok = tokenizers["llama3"]
    ids, labels = tokenize_segments([Segment("Hello", False), Segment(" you", True)], tok)
    assert ids == tok.encode("Hello you") and ids[0] == tok.bos_token_id
    assert labels == [IGNORE_INDEX] * (len(ids) - len(tok.encode(" you", add_special_tokens=False))) + tok.encode(
        " you", add_special_tokens=False)
