"""The LM tokenizer read from a folder matches transformers' ``AutoTokenizer`` on the same folder:
ids with and without special tokens, left-padded batches, decoding (special tokens kept or
skipped) and chat templates, for ChatML, Llama-3-like and SentencePiece-like tokenizers."""

from __future__ import annotations

import json
import random

import pytest

transformers = pytest.importorskip("transformers")

from vlkit.errors import MissingPart, VlkitError  # noqa: E402
from vlkit.text.chat_template import ChatTemplateError  # noqa: E402
from vlkit.text.lm_tokenizer import LMTokenizer  # noqa: E402

from _lm_util import CHATML_TEMPLATE, FAMILIES, chatml_folder, sentencepiece_folder  # noqa: E402

PIECES = ["Hello", "how", "are", "you", "?", "the", "capital", "of", "France", "café", "naïve", "日本語", "😀", "👍🏽",
          "привет", "12345", "x", "\n", "\t", "  ", "def f(x):", "<|im_end|>", "<|im_start|>", "</s>", "<s>", "<unk>",
          "<|begin_of_text|>", "<|eot_id|>", "ß", "\u200b", "e\u0301"]


def texts(n: int = 120, seed: int = 0) -> list[str]:
    """Short and long strings mixing scripts, emoji, whitespace runs and special tokens written as text."""
    rng = random.Random(seed)
    out = ["", " ", "a", " leading space", "trailing space ", "two\n\nlines", "Hello, how are you today?"]
    while len(out) < n:
        sep = rng.choice([" ", "", "  ", "\n", ", "])
        out.append(sep.join(rng.choice(PIECES) for _ in range(rng.choice([1, 2, 5, 12, 40]))))
    return out


CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "  What is the capital of France?  "},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Japan? 日本 😀"},
]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(family, transformers' tokenizer, vlkit's tokenizer) for one saved folder."""
    folder = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, transformers.AutoTokenizer.from_pretrained(folder), LMTokenizer.from_folder(folder)


def test_encode_matches_transformers(pair):
    _, ref, ours = pair
    assert ours.vocab_size == len(ref)
    for text in texts():
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special), text


def test_special_token_ids_match(pair):
    _, ref, ours = pair
    for role in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, role) == getattr(ref, role), role


def test_batch_is_left_padded_like_transformers(pair):
    _, ref, ours = pair
    if ref.pad_token is None:  # Llama-3 ships no pad token; vlkit pads with EOS under the mask
        ref.pad_token = ref.eos_token
    ref.padding_side = "left"
    batch = texts(12, seed=3)
    expected = ref(batch, padding=True)
    got = ours(batch)
    assert got["input_ids"].tolist() == expected["input_ids"]
    assert got["attention_mask"].tolist() == expected["attention_mask"]
    lengths = got["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # rows of different lengths really were padded
    assert (got["attention_mask"][lengths > 0, -1] == 1).all()  # every non-empty row ends with a real token


def test_decode_matches_transformers(pair):
    _, ref, ours = pair
    rng = random.Random(1)
    for text in texts(60, seed=2):
        ids = ref.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    for _ in range(50):  # arbitrary id runs: split characters, specials mid-text
        ids = [rng.randrange(len(ref)) for _ in range(rng.randrange(1, 20))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, generation_prompt):
    _, ref, ours = pair
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]):
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected
        ids = ref.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=generation_prompt)
        assert ours.encode_chat(messages, add_generation_prompt=generation_prompt) == list(ids)


def test_template_refusal_names_the_template_file(tmp_path):
    folder = sentencepiece_folder(tmp_path / "spm")
    ours = LMTokenizer.from_folder(folder)
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="chat_template.jinja.*roles must alternate"):
        ours.apply_chat_template(two_users)
    with pytest.raises(Exception, match="roles must alternate"):  # transformers refuses it too
        transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(two_users, tokenize=False)


def test_template_runs_sandboxed(tmp_path):
    folder = chatml_folder(tmp_path / "chatml")
    (folder / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="chat_template.jinja"):
        LMTokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "x"}])
    (folder / "chat_template.jinja").write_text("{% set ns = namespace(_x=1) %}{{ ns }}")
    with pytest.raises(ChatTemplateError, match="_x"):
        LMTokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "x"}])


def test_template_sources_in_order(tmp_path):
    """``chat_template.jinja`` (transformers 5) wins over ``chat_template.json`` over
    ``tokenizer_config.json``'s ``chat_template`` (a string or a list of named templates)."""
    folder = chatml_folder(tmp_path / "chatml")
    messages = [{"role": "user", "content": "hi"}]
    expected = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                                       add_generation_prompt=True)
    (folder / "chat_template.jinja").unlink()
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for value in (CHATML_TEMPLATE, [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHATML_TEMPLATE}]):
        config_file.write_text(json.dumps({**config, "chat_template": value}))
        assert LMTokenizer.from_folder(folder).apply_chat_template(messages) == expected
        assert transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True) == expected
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "JSON {{ messages[0].content }}"}))
    assert LMTokenizer.from_folder(folder).apply_chat_template(messages) == "JSON hi"
    (folder / "chat_template.jinja").write_text("JINJA {{ messages[0].content }}")
    assert LMTokenizer.from_folder(folder).apply_chat_template(messages) == "JINJA hi"


def test_generation_tag_and_tojson_render_as_transformers(tmp_path):
    folder = chatml_folder(tmp_path / "chatml")
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}<A>{{ m.content }}</A>"
                "{% endgeneration %}{% else %}{{ m | tojson }}{% endif %}{% endfor %}{{ tools | tojson(indent=1) }}")
    (folder / "chat_template.jinja").write_text(template)
    tools = [{"name": "lookup", "description": "finds <things> & 'stuff' café"}]
    expected = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(CONVERSATION[:3], tools=tools,
                                                                                       tokenize=False)
    assert LMTokenizer.from_folder(folder).apply_chat_template(CONVERSATION[:3], add_generation_prompt=False,
                                                               tools=tools) == expected


def test_config_flags_and_added_specials_match_transformers(tmp_path):
    """BOS/EOS come from tokenizer.json's post-processor whatever the config's ``add_bos_token`` /
    ``add_eos_token`` say (as in transformers 5); a named special token missing from the vocabulary
    gets the next id, as in transformers."""
    folder = sentencepiece_folder(tmp_path / "spm")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "add_bos_token": False, "add_eos_token": True, "pad_token": "<pad>"}))
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    ours = LMTokenizer.from_folder(folder)
    assert ours.pad_token_id == ref.pad_token_id == ours.vocab_size - 1 == len(ref) - 1
    for text in texts(40, seed=5):
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text)[0] == ref.bos_token_id


def test_missing_tokenizer_json_names_folder_and_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPart, match=r"empty.*tokenizer\.json"):
        LMTokenizer.from_folder(tmp_path / "empty")


def test_bad_files_are_named(tmp_path):
    folder = chatml_folder(tmp_path / "chatml")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}never closed")
    with pytest.raises(VlkitError, match=r"chat_template\.jinja.*not valid jinja"):
        LMTokenizer.from_folder(folder)
    (folder / "chat_template.jinja").unlink()
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(VlkitError, match=r"tokenizer_config\.json.*malformed JSON"):
        LMTokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": 7}))
    with pytest.raises(VlkitError, match=r"tokenizer_config\.json.*eos_token"):
        LMTokenizer.from_folder(folder)
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(VlkitError, match=r"tokenizer\.json.*not a readable"):
        LMTokenizer.from_folder(folder)


def test_chat_without_template_or_messages_is_refused(tmp_path):
    folder = chatml_folder(tmp_path / "chatml")
    with pytest.raises(VlkitError, match="non-empty list of messages"):
        LMTokenizer.from_folder(folder).apply_chat_template([])
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(MissingPart, match=r"chatml.*no chat template"):
        LMTokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "hi"}])


# attach_lm_files: the tokenizer and generation defaults a loader attaches to a language model


def _tiny_lm(vocab_size: int):
    from vlkit.lm import LlamaConfig, LlamaLM

    return LlamaLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=5))


def test_attach_reads_tokenizer_and_generation_config(tmp_path):
    from vlkit.interop.lm_files import attach_lm_files

    folder = chatml_folder(tmp_path / "chatml")
    lm = _tiny_lm(448)  # more rows than ids is fine (checkpoints pad the matrix)
    attach_lm_files(lm, folder)
    assert lm.tokenizer.encode("Hello") == transformers.AutoTokenizer.from_pretrained(folder).encode("Hello")
    from vlkit.lm.generation_config import GenerationConfig

    assert lm.generation_config == GenerationConfig().updated({"eos_token_id": 5})  # the model config's ids, as transformers
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1], "do_sample": True, "top_p": 0.9,
                                                              "transformers_version": "5.0"}))
    attach_lm_files(lm, folder)
    assert lm.generation_config.eos_ids == [2, 1] and lm.generation_config.do_sample and lm.generation_config.top_p == 0.9


def test_missing_tokenizer_is_named_at_use(tmp_path):
    from vlkit.interop.lm_files import attach_lm_files

    (tmp_path / "no_tok").mkdir()
    lm = _tiny_lm(400)
    attach_lm_files(lm, tmp_path / "no_tok")
    assert not lm.tokenizer
    with pytest.raises(MissingPart, match=r"no_tok: no tokenizer\.json"):
        lm.tokenizer.encode("hello")


def test_vocabulary_larger_than_embedding_is_refused_whole(tmp_path):
    from vlkit.errors import CheckpointError
    from vlkit.interop.lm_files import attach_lm_files

    folder = chatml_folder(tmp_path / "chatml")  # 400 ids
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    lm = _tiny_lm(399)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*vocabulary of 400.*399 rows.*config\.json"):
        attach_lm_files(lm, folder)
    assert not hasattr(lm, "tokenizer") and not hasattr(lm, "generation_config")  # nothing half-attached


def test_saved_tokenizer_reads_back_the_same(pair, tmp_path):
    """``save`` writes files from which vlkit and transformers read the same tokenizer again."""
    family, ref, ours = pair
    ours.save(tmp_path)
    again, ref_again = LMTokenizer.from_folder(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in texts(40, seed=7):
        assert again.encode(text) == ours.encode(text) == ref_again.encode(text), text
        ids = ours.encode(text)
        assert again.decode(ids, skip_special_tokens=True) == ref_again.decode(ids, skip_special_tokens=True)
    assert again.special_tokens == ours.special_tokens and again.vocab_size == ours.vocab_size
    assert again.apply_chat_template(CONVERSATION) == ref_again.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True) == ours.apply_chat_template(CONVERSATION)


def test_written_generation_config_reads_back(tmp_path):
    from vlkit.interop.lm_files import attach_lm_files, write_lm_files

    folder = chatml_folder(tmp_path / "chatml")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1], "do_sample": True, "top_p": 0.9,
                                                              "max_new_tokens": 40}))
    lm = _tiny_lm(400)
    attach_lm_files(lm, folder)
    (tmp_path / "out").mkdir()
    write_lm_files(lm, tmp_path / "out")
    again = _tiny_lm(400)
    attach_lm_files(again, tmp_path / "out")
    assert again.generation_config == lm.generation_config
    assert again.tokenizer.encode("Hello there") == lm.tokenizer.encode("Hello there")
    ref = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert (ref.eos_token_id, ref.do_sample, ref.top_p, ref.max_new_tokens) == ([2, 1], True, 0.9, 40)


def test_convert_to_hf_carries_the_language_model_files(tmp_path):
    """``vlkit convert --to hf`` of a language model writes its tokenizer, chat template and
    generation defaults; transformers reads the same tokenizer and generation config back."""
    import torch

    from vlkit.cli import main

    src = chatml_folder(tmp_path / "src")
    ref = transformers.AutoTokenizer.from_pretrained(src)
    cfg = transformers.LlamaConfig(vocab_size=len(ref), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=64, eos_token_id=ref.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": ref.eos_token_id, "do_sample": True,
                                                           "temperature": 0.7}))
    assert main(["convert", "--to", "hf", str(src), str(tmp_path / "out")]) == 0
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in texts(30, seed=9):
        assert back.encode(text) == ref.encode(text), text
    assert back.apply_chat_template(CONVERSATION, tokenize=False) == ref.apply_chat_template(CONVERSATION, tokenize=False)
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert (gen.eos_token_id, gen.do_sample, gen.temperature) == (ref.eos_token_id, True, 0.7)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape[0] == len(back) and torch.isfinite(model.lm_head.weight).all()


def test_native_checkpoint_keeps_the_language_model_files(tmp_path):
    """A vlkit LM saved as a checkpoint folder (``save_model``, what training writes) carries its
    tokenizer and generation defaults; ``vlkit.load`` reads both back."""
    import vlkit
    from vlkit.interop.lm_files import attach_lm_files
    from vlkit.train.checkpoint import save_model

    folder = chatml_folder(tmp_path / "chatml")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1], "top_k": 7}))
    lm = _tiny_lm(400)
    attach_lm_files(lm, folder)
    save_model(tmp_path / "ckpt", lm, "llama")
    again = vlkit.load(tmp_path / "ckpt")
    assert again.generation_config == lm.generation_config and again.generation_config.top_k == 7
    assert again.tokenizer.encode("Hello there") == lm.tokenizer.encode("Hello there")
    assert again.tokenizer.apply_chat_template(CONVERSATION) == lm.tokenizer.apply_chat_template(CONVERSATION)
