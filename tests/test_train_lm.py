"""`vlkit train lm`: a tiny run on the shapes texts gives a folder vlkit.load reads (tokenizer,
chat template, generation defaults), the loss falls, a resumed run ends bit-identical to an
uninterrupted one, a text JSONL's bad lines stop or are skipped and counted, and a tokenizer
taken from a folder is used as is."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vlkit
from vlkit.cli import main
from vlkit.data.formats.common import BadRecord
from vlkit.lm.generate import generate_text
from vlkit.lm.llama import LlamaLM
from vlkit.train.lm import load_recipe, pack, train_lm

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "model.num_attention_heads=2",
        "model.max_position_embeddings=64", "data.block_size=32", "data.scenes=40", "loop.batch_size=4",
        "loop.log_every=1", "optim.warmup_steps=2"]


def tiny(*more, steps=6):
    return load_recipe({}, [*TINY, f"loop.steps={steps}", *more])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    return out, train_lm(tiny("optim.lr=1e-2", steps=12), out)


def test_folder_loads_with_tokenizer_and_generation_defaults(run):
    out, summary = run
    assert summary["steps"] == 12 and summary["samples"] == 48
    model = vlkit.load(out)
    assert type(model) is LlamaLM
    tok = model.tokenizer
    assert tok.token_to_id("<image>") is not None and tok.chat_template is not None
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.token_to_id("<|im_end|>")]
    assert model.config.vocab_size == tok.vocab_size
    final = load_file(str(out / "model.safetensors"))
    last = load_file(str(sorted((out / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 1.0
    texts = generate_text(model, tok, **tok("what color is the"), generation_config=model.generation_config, max_new_tokens=3)
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_pack_keeps_each_group_together_and_in_order(run):
    out, _ = run
    tok = vlkit.load(out).tokenizer
    groups = [["a red circle", "what color is the circle? red"], ["two shapes"], ["a blue star", "the star: [1, 2, 3, 4]", "no"]]
    ids = pack(groups, tok, seed=3).tolist()
    texts = [tok.decode(part, skip_special_tokens=True).strip() for part in _split(ids, tok.eos_token_id)]
    assert sorted(texts) == sorted(t for g in groups for t in g)
    starts = sorted((texts.index(g[0]), g) for g in groups)
    assert [t for _, g in starts for t in g] == texts
    assert len({tuple(pack(groups, tok, seed=s).tolist()) for s in range(6)}) > 1


def _split(ids, sep):
    part = []
    for i in ids:
        if i == sep:
            yield part
            part = []
        else:
            part.append(i)


def test_resume_is_exact(tmp_path):
    whole = train_lm(tiny(), tmp_path / "whole")
    train_lm(tiny(), tmp_path / "split", stop_at=3)
    resumed = train_lm(tiny(), tmp_path / "split", resume=True)
    assert resumed["steps"] == whole["steps"] == 6
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


LINES = [json.dumps({"text": f"the {c} circle is left of the {d} star"}) for c in ("red", "blue", "green") for d in ("cyan", "white")] * 8


def test_jsonl_bad_lines_stop_or_are_skipped(tmp_path):
    data = write_jsonl(tmp_path / "texts.jsonl", LINES[:5] + ["{not json", json.dumps({"txt": "x"}), json.dumps([1])] + LINES[5:])
    with pytest.raises(BadRecord, match=r"texts.jsonl.*line 6.*malformed JSON"):
        train_lm(tiny(f"data.source={data}", "data.vocab_size=300", steps=2), tmp_path / "stop")
    summary = train_lm(tiny(f"data.source={data}", "data.vocab_size=300", "data.on_bad_sample=skip", steps=2), tmp_path / "skip")
    assert summary["skipped"] == 3
    skipped = [json.loads(line) for line in (tmp_path / "skip" / "skipped.jsonl").read_text().splitlines()]
    assert [s["record"] for s in skipped] == ["line 6", "line 7", "line 8"]
    assert "no 'text' key" in skipped[1]["detail"]
    assert vlkit.load(tmp_path / "skip").tokenizer.decode(vlkit.load(tmp_path / "skip").tokenizer.encode("the red circle"),
                                                          skip_special_tokens=True) == "the red circle"


def test_tokenizer_from_a_folder(run, tmp_path):
    out, _ = run
    data = write_jsonl(tmp_path / "texts.jsonl", LINES)
    summary = train_lm(tiny(f"data.source={data}", f"data.tokenizer={out}", steps=2), tmp_path / "given")
    assert summary["steps"] == 2
    given = json.loads((tmp_path / "given" / "tokenizer.json").read_text())
    assert given["model"]["vocab"] == json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]


def test_command_line(tmp_path, capsys):
    recipe = tmp_path / "lm.yaml"
    recipe.write_text("loop: {steps: 2}\n")
    assert main(["train", "lm", "--recipe", str(recipe), "--out", str(tmp_path / "cli"), *[f"--{o}" for o in TINY]]) == 0
    assert (tmp_path / "cli" / "config.json").is_file()
    assert main(["train", "lm", "--out", str(tmp_path / "bad"), "--data.source=/nonexistent.jsonl"]) == 2
    assert "data.source" in capsys.readouterr().err


def test_a_finished_run_extended_and_interrupted_loads_its_newest_checkpoint(tmp_path):
    """The finished run's model stayed at the top of the folder, and vlkit.load kept taking it."""
    train_lm(tiny(steps=3), tmp_path / "run")
    train_lm(tiny(steps=6), tmp_path / "run", resume=True, stop_at=5)
    newest = load_file(str(tmp_path / "run" / "checkpoints" / "step_00000005" / "model.safetensors"))
    loaded = vlkit.load(tmp_path / "run").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in newest.items())
    assert not list((tmp_path / "run").glob(".*.stale"))
