"""GenerationConfig: transformers' defaults, ``generation_config.json`` as transformers writes it,
overrides, and clear errors naming the file and key for bad types and values."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vlkit.errors import VlkitError
from vlkit.lm.generation_config import GenerationConfig

transformers = pytest.importorskip("transformers")


def test_defaults_are_transformers_defaults():
    theirs = transformers.GenerationConfig._get_default_generation_params()
    unset = transformers.GenerationConfig()
    for field in dataclasses.fields(GenerationConfig):
        ours = getattr(GenerationConfig(), field.name)
        if field.name == "max_length":  # unset: 20 new tokens, what transformers' default max_length=20 means
            assert ours is None and theirs["max_length"] == 20
        elif field.name == "min_new_tokens":  # transformers' None: no minimum
            assert ours == 0 and unset.min_new_tokens is None
        elif field.name in theirs:
            assert ours == theirs[field.name], field.name
        else:
            assert ours == getattr(unset, field.name), field.name


def test_reads_what_transformers_writes(tmp_path):
    values = dict(do_sample=True, temperature=0.6, top_p=0.9, top_k=0, min_p=0.05, repetition_penalty=1.1,
                  max_new_tokens=77, eos_token_id=[128001, 128009], bos_token_id=128000, pad_token_id=0,
                  num_beams=3, length_penalty=0.8, early_stopping="never", no_repeat_ngram_size=3, min_new_tokens=2,
                  stop_strings=["###"], num_return_sequences=2)
    transformers.GenerationConfig(**values).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "generation_config.json").read_text())
    assert "transformers_version" in data  # an unknown key, ignored
    cfg = GenerationConfig.from_file(tmp_path / "generation_config.json")
    for key, value in values.items():
        assert getattr(cfg, key) == value, key
    assert cfg.eos_ids == [128001, 128009] and cfg.stops == ["###"]


def test_null_keeps_the_default_and_ints_stand_for_floats(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"temperature": None, "top_p": 1, "eos_token_id": 2, "cache_implementation": "static"}))
    cfg = GenerationConfig.from_file(path)
    assert cfg.temperature == 1.0 and cfg.top_p == 1.0 and isinstance(cfg.top_p, float) and cfg.eos_ids == [2]


@pytest.mark.parametrize(
    "key,value,expected",
    [("temperature", "hot", "a number"), ("top_k", 2.5, "an integer"), ("do_sample", "yes", "true or false"),
     ("eos_token_id", [2, "x"], "a list of integers"), ("stop_strings", 7, "a string"),
     ("top_p", 1.5, "(0, 1]"), ("top_p", 0, "(0, 1]"), ("max_new_tokens", 0, "positive"),
     ("early_stopping", "sometimes", '"never"'), ("num_beams", 0, "1 or more"), ("repetition_penalty", 0, "> 0"),
     ("min_p", -0.1, "[0, 1]"), ("eos_token_id", -1, ">= 0")],
)
def test_bad_values_in_the_file_name_file_and_key(tmp_path, key, value, expected):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(VlkitError) as err:
        GenerationConfig.from_file(path)
    message = str(err.value)
    assert str(path) in message and key in message and expected in message


def test_cross_field_checks(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"do_sample": True, "temperature": 0.0}))
    with pytest.raises(VlkitError, match="temperature=0.0.*when sampling"):
        GenerationConfig.from_file(path)
    with pytest.raises(VlkitError, match="num_return_sequences=5 is more than num_beams=4"):
        GenerationConfig().updated({"num_beams": 4, "num_return_sequences": 5})
    with pytest.raises(VlkitError, match="num_return_sequences=2.*greedy"):
        GenerationConfig().updated({"num_return_sequences": 2})
    GenerationConfig().updated({"temperature": 0.0})  # greedy ignores the temperature, as transformers does


def test_unreadable_files_are_named(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text("{not json")
    with pytest.raises(VlkitError, match="generation_config.json: not valid JSON"):
        GenerationConfig.from_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(VlkitError, match="expected a JSON object"):
        GenerationConfig.from_file(path)
    with pytest.raises(VlkitError, match="cannot read"):
        GenerationConfig.from_file(tmp_path / "absent.json")


def test_overrides_win_and_unknown_ones_are_refused():
    base = GenerationConfig(do_sample=True, temperature=0.7)
    cfg = base.updated({"temperature": 1.2, "eos_token_id": None})
    assert cfg.temperature == 1.2 and cfg.do_sample and cfg.eos_token_id is None
    assert base.temperature == 0.7
    with pytest.raises(VlkitError, match=r"unknown generation option\(s\) \['temprature'\]"):
        base.updated({"temprature": 1.0})


def test_save_round_trips_and_transformers_reads_it(tmp_path):
    cfg = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=[2, 7], max_new_tokens=40,
                           early_stopping="never", stop_strings=["###"])
    cfg.save(tmp_path)
    assert GenerationConfig.from_file(tmp_path / "generation_config.json") == cfg
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (theirs.temperature, theirs.top_p, theirs.eos_token_id, theirs.max_new_tokens) == (0.6, 0.9, [2, 7], 40)
