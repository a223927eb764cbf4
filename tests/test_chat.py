"""``vlkit chat`` end to end on a tiny random Llama saved by transformers with a ChatML tokenizer:
the answers (greedy, beam, multi-turn) are transformers' ``generate`` answers to the same
template-rendered conversation; sampling with a seed repeats; bad folders are named."""

from __future__ import annotations

import io

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from vlkit.cli import main  # noqa: E402

from _lm_util import chatml_folder  # noqa: E402

NEW = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Llama (large init so greedy choices are far from ties) with a ChatML tokenizer."""
    path = chatml_folder(tmp_path_factory.mktemp("chat") / "lm")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   initializer_range=0.3, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def reference(folder, messages=None, text=None, new=NEW, **kw) -> str:
    """transformers' answer: the template-rendered conversation (or raw text), generate, decode."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    if messages is not None:
        ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False,
                  return_tensors="pt").input_ids
    else:
        ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, **kw)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def chat(argv, capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(["chat", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prompt_answers_once_like_transformers(folder, capsys):
    code, out, _ = chat(["--model", str(folder), "--prompt", "Hello, how are you?", "--max-new-tokens", str(NEW)], capsys)
    assert code == 0
    assert out == reference(folder, [{"role": "user", "content": "Hello, how are you?"}]) + "\n"
    assert out.strip()  # a real answer, not an empty line


def test_multi_turn_keeps_history_and_exits(folder, capsys, monkeypatch):
    code, out, _ = chat(["--model", str(folder), "--max-new-tokens", str(NEW), "--system", "Be brief."], capsys,
                        stdin="Hello\n\nWhat is the capital of France?\n/exit\nnever read\n", monkeypatch=monkeypatch)
    assert code == 0
    first, second = out.split("\n")[:2]
    assert out.count("\n") == 2  # two answers; the empty line is skipped, nothing after /exit
    system = {"role": "system", "content": "Be brief."}
    assert first == reference(folder, [system, {"role": "user", "content": "Hello"}])
    history = [system, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "What is the capital of France?"}]
    assert second == reference(folder, history)


def test_end_of_input_ends_the_session(folder, capsys, monkeypatch):
    code, out, _ = chat(["--model", str(folder), "--max-new-tokens", "3"], capsys, stdin="Hi", monkeypatch=monkeypatch)
    assert code == 0 and out.count("\n") == 1


def test_beam_search_answer_like_transformers(folder, capsys):
    code, out, _ = chat(["--model", str(folder), "--prompt", "Write a poem", "--max-new-tokens", str(NEW),
                         "--num-beams", "3"], capsys)
    assert code == 0
    assert out == reference(folder, [{"role": "user", "content": "Write a poem"}], num_beams=3) + "\n"


def test_sampling_flags_with_seed_repeat(folder, capsys):
    argv = ["--model", str(folder), "--prompt", "Hi", "--max-new-tokens", "12", "--temperature", "1.5", "--top-k", "50",
            "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.2"]
    answers = [chat([*argv, "--seed", str(s)], capsys)[1] for s in (1, 1, 2, 3)]
    assert answers[0] == answers[1]
    assert len(set(answers[1:])) > 1  # other seeds sample other answers
    greedy = chat(["--model", str(folder), "--prompt", "Hi", "--max-new-tokens", "12", "--temperature", "0"], capsys)[1]
    assert greedy == reference(folder, [{"role": "user", "content": "Hi"}], new=12) + "\n"  # --temperature 0: greedy


def test_without_chat_template_plain_text_with_notice(folder, capsys, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in folder.iterdir():
        if f.name != "chat_template.jinja":
            (plain / f.name).write_bytes(f.read_bytes())
    code, out, err = chat(["--model", str(plain), "--prompt", "The quick brown fox", "--max-new-tokens", str(NEW)], capsys)
    assert code == 0 and "no chat template" in err and "plain text" in err
    assert out == reference(plain, text="The quick brown fox") + "\n"
    code, _, err = chat(["--model", str(plain), "--prompt", "x", "--system", "Be brief."], capsys)
    assert code == 2 and "--system needs a chat template" in err and "plain" in err


def test_folder_without_tokenizer_is_named(folder, capsys, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    code, _, err = chat(["--model", str(bare), "--prompt", "x"], capsys)
    assert code == 2 and "bare: no tokenizer.json" in err


def test_bad_sampling_value_is_refused(folder, capsys):
    code, _, err = chat(["--model", str(folder), "--prompt", "x", "--top-p", "1.5"], capsys)
    assert code == 2 and "top_p" in err


@pytest.mark.filterwarnings("ignore:.*the model loads without")  # a bare CLIP folder, on purpose
def test_a_model_that_is_not_a_language_model_is_refused(capsys, tmp_path):
    cfg = transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                           patch_size=16),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100),
        projection_dim=16)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    code, _, err = chat(["--model", str(tmp_path / "clip"), "--prompt", "x"], capsys)
    assert code == 2 and "clip" in err and "not a language model" in err


def test_a_conversation_that_outgrows_the_model_forgets_its_oldest_exchanges(folder, capsys, monkeypatch):
    """Once the history filled the context every later turn failed, for the rest of the session."""
    line = "Tell me everything about the long history of the city of Paris and of France, please. " * 3
    code, out, err = chat(["--model", str(folder), "--max-new-tokens", str(NEW)], capsys, stdin=(line + "\n") * 12,
                          monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0 and out.count("\n") == 12 and "exceed" not in err
    assert "the conversation outgrew the model's positions" in err


@pytest.mark.parametrize("flag, value, message", [
    ("--max-new-tokens", "0", "expected a whole number of at least 1"),  # 0 used to mean the default
    ("--seed", str(2**70), "expected a whole number from -2**63"),
    ("--device", "bogus", "'bogus' is not a device"),
])  # fmt: skip
def test_flags_are_checked_by_name(folder, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exc:
        main(["chat", "--model", str(folder), "--prompt", "x", flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {flag}: " in err and message in err


def test_ctrl_c_while_the_command_line_is_read_is_a_plain_interruption(capsys, monkeypatch):
    import vlkit.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(vlkit.cli, "parser", interrupted)
    assert main(["chat"]) == 130 and capsys.readouterr().err == "vlkit: interrupted\n"
