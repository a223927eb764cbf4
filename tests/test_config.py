"""Typed configs: dicts, JSON/YAML files and ``key=value`` overrides, with errors that name the
key or file at fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlkit.config import apply_overrides, from_dict, read, to_dict, write_json
from vlkit.errors import ConfigError
from vlkit.models.clip import CLIPConfig
from vlkit.train.clip import CLIPRecipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = next(p for p in (ROOT / "recipes", ROOT / "src" / "vlkit" / "recipes") if p.is_dir()) / "clip_shapes.yaml"


def test_from_dict_builds_nested_dataclasses_and_converts_types():
    recipe = from_dict(
        CLIPRecipe,
        {
            "model": {"vision": {"width": 64, "num_heads": 4, "mlp_ratio": 2}, "embed_dim": 64},
            "data": {"object_sizes": [0.2, 0.3]},
            "optim": {"betas": [0.9, 0.95], "lr": 1},
            "loop": {"freeze": ["vision"]},
        },
    )
    assert recipe.model.vision.width == 64 and recipe.model.embed_dim == 64
    assert recipe.model.vision.mlp_ratio == 2.0 and isinstance(recipe.model.vision.mlp_ratio, float)
    assert recipe.model.vision.depth == 12  # untouched keys keep their defaults
    assert recipe.data.object_sizes == (0.2, 0.3) and recipe.optim.betas == (0.9, 0.95)
    assert isinstance(recipe.optim.lr, float) and recipe.loop.freeze == ["vision"]


def test_to_dict_round_trips():
    recipe = from_dict(CLIPRecipe, {"model": {"text": {"width": 96}}, "loop": {"steps": 7}})
    again = from_dict(CLIPRecipe, json.loads(json.dumps(to_dict(recipe))))
    assert again == recipe


@pytest.mark.parametrize(
    "data, where",
    [
        ({"modle": {}}, "recipe: unknown key(s) ['modle']"),
        ({"model": {"vision": {"widht": 3}}}, "recipe.model.vision: unknown key(s) ['widht']"),
        ({"loop": {"step": 3}}, "recipe.loop: unknown key(s) ['step']"),
        ({"model": {"vision": 5}}, "recipe.model.vision: expected a mapping of ViTConfig keys, got 5"),
        ({"loop": {"steps": "many"}}, "recipe.loop.steps: expected a positive integer, got 'many'"),
        ({"optim": {"lr": "fast"}}, "recipe.optim.lr: expected a positive number, got 'fast'"),
        ({"model": {"vision": {"pool": "max"}}}, "recipe.model.vision: ViTConfig.pool must be"),
        ({"loop": {"precision": "fp8"}}, "recipe.loop.precision: expected one of ['auto', 'bf16', 'fp32'], got 'fp8'"),
    ],
)
def test_errors_name_the_key_by_dotted_path(data, where):
    with pytest.raises(ConfigError) as info:
        from_dict(CLIPRecipe, data, "recipe")
    assert str(info.value).startswith(where)


def test_unknown_key_error_lists_the_expected_keys():
    with pytest.raises(ValueError, match=r"expected some of \[.*'patch_size'.*'width'"):
        from_dict(CLIPRecipe, {"model": {"vision": {"widht": 3}}})


def test_overrides_parse_values_as_yaml_scalars():
    data = {"loop": {"steps": 300, "precision": "auto"}, "model": {"vision": {"width": 128, "num_heads": 4}}}
    out = apply_overrides(
        data,
        [
            "--loop.steps=20",
            "loop.precision=fp32",
            "model.vision.width=64",
            "loop.freeze=[vision, text]",
            "model.logit_bias_init=null",
            "data.group_size=1",
            "optim.lr=1e-3",
            "optim.warmup_steps=0",
        ],
    )
    assert data["loop"]["steps"] == 300, "the input dict is not modified"
    assert out["loop"] == {"steps": 20, "precision": "fp32", "freeze": ["vision", "text"]}
    assert out["model"] == {"vision": {"width": 64, "num_heads": 4}, "logit_bias_init": None}
    assert out["data"] == {"group_size": 1}
    recipe = load_recipe(out)
    assert recipe.optim.lr == 1e-3 and isinstance(recipe.optim.lr, float)
    assert recipe.loop.steps == 20 and recipe.loop.freeze == ["vision", "text"]
    assert recipe.data.group_size == 1 and recipe.optim.warmup_steps == 0


@pytest.mark.parametrize("bad", ["loop.steps", "loop.steps.max=3"])
def test_malformed_overrides_are_named(bad):
    with pytest.raises(ValueError, match="override"):
        apply_overrides({"loop": {"steps": 3}}, [bad])


def test_bundled_recipe_loads():
    recipe = load_recipe(read(RECIPE))
    assert recipe.data.source == "shapes"
    assert recipe.model.vision.image_size == recipe.data.image_size == 64
    assert recipe.model.vision.patch_size == 16 and recipe.model.vision.stem_channels == (32, 64, 128)
    assert recipe.model.embed_dim == 128 and recipe.data.group_size == 4
    assert recipe.loop.batch_size % recipe.data.group_size == 0 and recipe.optim.lr == 1e-3


def test_yaml_and_json_recipes_give_the_same_config(tmp_path):
    recipe = load_recipe(read(RECIPE))
    path = tmp_path / "recipe.json"
    write_json(path, to_dict(recipe))
    assert load_recipe(read(path)) == recipe
    yml = tmp_path / "recipe.yml"
    yml.write_text("loop:\n  steps: 5\nmodel:\n  text: {width: 48}\n")
    small = load_recipe(read(yml))
    assert small.loop.steps == 5 and small.model.text.width == 48 and small.model == CLIPConfig(text=small.model.text)


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("broken.yaml", "loop: {steps: 3\n", "malformed yaml file"),
        ("broken.json", '{"loop": {"steps": 3}', "malformed json file"),
        ("list.yaml", "- 1\n- 2\n", "expected a mapping at the top level"),
    ],
)
def test_malformed_files_are_named(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        read(path)
    assert str(info.value).startswith(f"{path}: {problem}")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.yaml")):
        read(tmp_path / "nope.yaml")


# --- strict types and declared ranges ---------------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        ({"loop": {"steps": True}}, "recipe.loop.steps: expected a positive integer, got True"),
        ({"loop": {"steps": 1.5}}, "recipe.loop.steps: expected a positive integer, got 1.5"),
        ({"loop": {"steps": 3.0}}, "recipe.loop.steps: expected a positive integer, got 3.0"),
        ({"loop": {"steps": "3"}}, "recipe.loop.steps: expected a positive integer, got '3'"),
        ({"loop": {"batch_size": 0}}, "recipe.loop.batch_size: expected a positive integer, got 0"),
        ({"loop": {"unfreeze_at": 0}}, "recipe.loop.unfreeze_at: expected a positive integer or null, got 0"),
        ({"loop": {"grad_checkpointing": 1}}, "recipe.loop.grad_checkpointing: expected true or false, got 1"),
        ({"loop": {"freeze": "vision"}}, "recipe.loop.freeze: expected a list, each item a string, got 'vision'"),
        ({"loop": {"freeze": [3]}}, "recipe.loop.freeze: expected a list, each item a string, got [3]"),
        ({"optim": {"lr": True}}, "recipe.optim.lr: expected a positive number, got True"),
        ({"optim": {"lr": float("inf")}}, "recipe.optim.lr: expected a positive number, got inf"),
        ({"optim": {"lr": float("nan")}}, "recipe.optim.lr: expected a positive number, got nan"),
        ({"optim": {"min_lr_ratio": 1.5}}, "recipe.optim.min_lr_ratio: expected a number in [0, 1], got 1.5"),
        ({"optim": {"betas": [0.9]}}, "recipe.optim.betas: expected a list of 2 items, each a number in [0, 1), got [0.9]"),
        ({"data": {"object_sizes": [0.2, 0]}}, "recipe.data.object_sizes: expected a list of 2 items, each a number in (0, 1)"),
        ({"data": {"source": 3}}, "recipe.data.source: expected a string, got 3"),
        ({"data": {"on_bad_sample": "ignore"}}, "recipe.data.on_bad_sample: expected one of ['error', 'skip'], got 'ignore'"),
        ({"data": {"min_objects": 3, "max_objects": 2}}, "recipe.data: max_objects 2 is below min_objects 3"),
        ({"model": {"vision": {"width": 64.5}}}, "recipe.model.vision.width: expected a positive integer, got 64.5"),
        ({"loop": {"batch_size": 10}}, "recipe: loop.batch_size 10 must be a multiple of data.group_size 4"),
        ({"loop": {"batch_size": 8, "grad_accum": 4}}, "recipe: loop.batch_size 8 in families of data.group_size 4 does not split"),
    ],
)
def test_types_are_strict_and_ranges_declared(data, message):
    with pytest.raises(ConfigError) as info:
        load_recipe(data)
    assert str(info.value).startswith(message)


def test_lenient_where_it_is_safe():
    recipe = load_recipe({"optim": {"lr": 1, "eps": "1e-8"}, "loop": {"save_every": 0, "unfreeze_at": None}})
    assert recipe.optim.lr == 1.0 and isinstance(recipe.optim.lr, float)  # a float field takes an int
    assert recipe.optim.eps == 1e-8  # YAML 1.1 reads 1e-8 (no dot) as a string
    assert recipe.loop.save_every == 0 and recipe.loop.unfreeze_at is None


def test_configs_built_in_python_are_checked_too():
    from vlkit.train.loop import LoopConfig, OptimConfig

    with pytest.raises(ConfigError, match=r"^LoopConfig.steps: expected a positive integer, got 0$"):
        LoopConfig(steps=0)
    with pytest.raises(ConfigError, match=r"^batch_size 6 is not a multiple of grad_accum 4$"):
        LoopConfig(batch_size=6, grad_accum=4)
    assert isinstance(OptimConfig(lr=1).lr, float)


def test_an_error_caused_by_an_override_names_it():
    with pytest.raises(ConfigError) as info:
        load_recipe(read(RECIPE), ["--loop.steps=3", "--data.group_size=3"])
    assert str(info.value).endswith("(set by '--data.group_size=3')")
    with pytest.raises(ConfigError, match=r"ViTConfig.pool='cls' needs class_token=True \(set by '--model.vision.class_token=false'\)"):
        load_recipe(read(RECIPE), ["--model.vision.class_token=false"])
    with pytest.raises(ConfigError, match=r"^override '--model.vision.image_size=32': model.vision.image_size is set by training "
                                          r"from data.image_size; it cannot be overridden$"):  # it used to be ignored
        load_recipe(read(RECIPE), ["--model.vision.image_size=32"])
    for key in ("vision.act", "text.act"):  # checked when the recipe loads, not when the module is built
        with pytest.raises(ConfigError, match=rf"\.act: unknown activation 'foo'; expected one of .*\(set by '--model.{key}=foo'\)"):
            load_recipe(read(RECIPE), [f"--model.{key}=foo"])


def test_a_mapping_merges_into_a_section_and_replaces_a_value():
    from vlkit.train.vlm import load_recipe as load_vlm_recipe

    stage2 = read(RECIPE.with_name("llava_shapes_stage2.yaml"))
    assert len(stage2["data"]["shapes"]["mix"]) > 1 and stage2["model"]["connector_options"]
    recipe = load_vlm_recipe(stage2, ["--data.shapes.mix={vqa: 1}", "--data.shapes={scenes: 100}", "--model.connector_options={}"])
    assert recipe.data.shapes.mix == {"vqa": 1}, "a dict-valued field takes the mapping as its whole value"
    assert recipe.model.connector_options == {}
    assert recipe.data.shapes.scenes == 100 and recipe.data.shapes.seed == stage2["data"]["shapes"]["seed"], "a section merges"


def test_override_values_keep_their_meaning():
    recipe = load_recipe(read(RECIPE), ["--data.source=2024", "--loop={steps: 5}", "--data.source=2024-13-45"])
    assert recipe.data.source == "2024-13-45"  # a string field takes the text as written
    assert recipe.loop.steps == 5 and recipe.loop.batch_size == 128, "a mapping merges into the section"


@pytest.mark.parametrize("bad", [5, [1], "abc"])
def test_a_mapping_field_takes_only_a_mapping(bad):
    import re

    from vlkit.train.vlm import VlmModelConfig

    with pytest.raises(ConfigError, match=re.escape(f"recipe.model.connector_options: expected dict, got {bad!r}")):
        from_dict(VlmModelConfig, {"connector_options": bad}, "recipe.model")
