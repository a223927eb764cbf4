"""Bad input to the language models and their loaders: clear vlkit errors naming the numbers, keys and
files at fault, and nothing half-loaded."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402
from vlkit.errors import CheckpointError, VlkitError  # noqa: E402
from vlkit.lm import LlamaConfig, LlamaLM  # noqa: E402
from vlkit.lm.cache import CacheFull  # noqa: E402

from _lm_models import hf_model, save  # noqa: E402


def tiny(**overrides) -> LlamaLM:
    cfg = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=16)
    return LlamaLM(LlamaConfig(**{**cfg, **overrides})).eval()


@pytest.mark.parametrize("family", ["llama", "opt"])
@torch.no_grad()
def test_prompt_longer_than_positions_names_both_numbers(tmp_path, family):
    model = vlkit.load(save(hf_model(family, max_position_embeddings=16), tmp_path))
    with pytest.raises(VlkitError, match=r"20 tokens.*16 positions"):
        model(input_ids=torch.ones(1, 20, dtype=torch.long))
    cache = model.new_cache(1, 16)
    model(input_ids=torch.ones(1, 12, dtype=torch.long), cache=cache)
    with pytest.raises(VlkitError, match=r"17 tokens \(12 cached \+ 5 new\).*16 positions"):
        model(input_ids=torch.ones(1, 5, dtype=torch.long), cache=cache)
    assert cache.length == 12  # the refused call wrote nothing
    with pytest.raises(VlkitError, match="17 positions.*16 positions"):
        model.new_cache(1, 17)


@torch.no_grad()
def test_cache_overflow_and_mismatches():
    model = tiny()
    cache = model.new_cache(2, 4)
    with pytest.raises(CacheFull, match="holds 4 positions; 0 are filled and 5 more do not fit"):
        model(input_ids=torch.ones(2, 5, dtype=torch.long), cache=cache)
    with pytest.raises(VlkitError, match="holds 2 rows; this batch has 3"):
        model(input_ids=torch.ones(3, 2, dtype=torch.long), cache=cache)
    model(input_ids=torch.ones(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(VlkitError, match=r"attention_mask has shape \(2, 1\); expected \[2, 4\]"):
        model(input_ids=torch.ones(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 1), cache=cache)


@torch.no_grad()
def test_bad_inputs():
    model = tiny()
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(VlkitError, match="exactly one of input_ids and inputs_embeds"):
        model(input_ids=ids, inputs_embeds=model.embed(ids))
    with pytest.raises(VlkitError, match="exactly one"):
        model()
    with pytest.raises(VlkitError, match=r"range over \[1, 50\].*50 ids"):
        model(input_ids=torch.tensor([[1, 50]]))
    with pytest.raises(VlkitError, match=r"inputs_embeds must be \[batch, length, 32\]"):
        model(inputs_embeds=torch.zeros(1, 3, 8))


@torch.no_grad()
def test_sliding_window_refused_beyond_the_window(tmp_path):
    model = vlkit.load(save(hf_model("mistral", sliding_window=8), tmp_path))
    model(input_ids=torch.ones(1, 8, dtype=torch.long))
    with pytest.raises(VlkitError, match="9 tokens.*sliding attention window of 8"):
        model(input_ids=torch.ones(1, 9, dtype=torch.long))


@pytest.mark.parametrize("max_window_layers, window", [(2, None), (1, 8)])
def test_qwen2_sliding_window_only_where_a_layer_slides(tmp_path, max_window_layers, window):
    """Qwen2 slides only with ``use_sliding_window``, and only in layers from ``max_window_layers`` on."""
    hf = hf_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=max_window_layers)
    assert vlkit.load(save(hf, tmp_path)).cfg.sliding_window == window


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_unsupported_rope_is_refused_by_name(tmp_path):
    folder = save(hf_model("llama"), tmp_path)
    edit_config(folder, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match=r"config.json: rope type 'yarn' is not supported"):
        vlkit.load(folder)


def test_missing_and_misshapen_keys_name_file_and_key(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save(hf_model("llama"), tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    key = "model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in weights.items() if k != key}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: missing key\(s\) {key}"):
        vlkit.load(folder)
    save_file({**weights, key: weights[key][:8]}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has shape \(8, 64\); expected \(32, 64\)"):
        vlkit.load(folder)


def test_config_that_does_not_describe_the_weights(tmp_path):
    """A config.json with more layers than the weights hold is refused by name, not half-loaded."""
    folder = save(hf_model("opt"), tmp_path)
    edit_config(folder, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing key\(s\) model.decoder.layers.2"):
        vlkit.load(folder)


def test_a_qwen2_whose_first_layers_attend_fully_exports_as_it_came(tmp_path):
    """The export said every layer slides (max_window_layers 0): transformers then ran another model past the window."""
    from vlkit.interop.export import to_hf

    hf = hf_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    model = vlkit.load(save(hf, tmp_path / "a"))
    assert model.cfg.full_attention_layers == 1
    to_hf(model, tmp_path / "b")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", attn_implementation="sdpa").eval()
    assert json.loads((tmp_path / "b" / "config.json").read_text())["max_window_layers"] == 1
    ids = torch.randint(3, 90, (1, 20))  # past the window, where it matters which layers slide
    with torch.no_grad():
        assert (hf(ids).logits - back(ids).logits).abs().max() < 1e-5


def test_config_values_of_the_wrong_type_are_named(tmp_path):
    for key, value in (("num_hidden_layers", "2"), ("hidden_size", None)):
        folder = save(hf_model("llama"), tmp_path / key)
        edit_config(folder, **{key: value})
        with pytest.raises(CheckpointError, match=r"config.json: a value of the wrong type"):
            vlkit.load(folder)


def test_dtype_is_honoured_for_every_folder_and_defaults_to_the_saved_one(tmp_path):
    from vlkit.train.checkpoint import save_model

    hf = save(hf_model("llama"), tmp_path / "hf")
    native = tmp_path / "native"
    save_model(native, vlkit.load(hf), "llama")
    assert {p.dtype for p in vlkit.load(native, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    save(hf_model("llama").to(torch.bfloat16), tmp_path / "bf16")
    assert {p.dtype for p in vlkit.load(tmp_path / "bf16").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in vlkit.load(tmp_path / "bf16", dtype=torch.float32).parameters()} == {torch.float32}


def test_sharded_and_legacy_bin_checkpoints_load(tmp_path):
    hf = hf_model("llama")
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    ids = torch.randint(3, 90, (1, 6))
    with torch.no_grad():
        expected = hf(ids).logits
    for name, write in (("sharded", "shards"), ("legacy", "legacy")):
        folder = tmp_path / name
        hf.config.save_pretrained(folder)
        if write == "legacy":  # torch's format before zip files: cannot be memory-mapped
            torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        else:
            keys = sorted(state)
            halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
            for file, part in halves.items():
                torch.save({k: state[k] for k in part}, folder / file)
            index = {"metadata": {}, "weight_map": {k: f for f, part in halves.items() for k in part}}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        with torch.no_grad():
            assert (vlkit.load(folder)(input_ids=ids).logits - expected).abs().max() < 1e-5, name
