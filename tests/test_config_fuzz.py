"""Fuzzing recipe overrides and recipe files: any input either applies (and then the recipe holds
exactly the value given) or raises vlkit's own error naming the override or file; never another
exception type."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vlkit.config import defaults, flatten, read, to_dict
from vlkit.errors import VlkitError
from vlkit.train.clip import CLIPRecipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
BASE = read(ROOT / "recipes" / "clip_shapes.yaml")
DEFAULTS = {key: default for key, default, _ in defaults(CLIPRecipe)}
LEAVES = list(DEFAULTS)
STRING_KEYS = {key for key, default, _ in defaults(CLIPRecipe) if isinstance(default, str)}
SECTIONS = sorted({key.rpartition(".")[0] for key in LEAVES if "." in key})
SYNTAX = list("-.=_[]{}:,'\"#&*!|>%@` \t\n\\") + list("abelmopst0123456789")


def named(err: Exception, override: str) -> bool:
    """Whether the message names the override (long ones are cut short in messages)."""
    shown = repr(override)
    return shown in str(err) or (len(shown) > 100 and shown[:97] in str(err))


def check(override: str) -> None:
    try:
        recipe = load_recipe(BASE, [override])
    except VlkitError as err:
        assert named(err, override), (override, str(err))
        return
    values = flatten(to_dict(recipe))
    for leaf, default in DEFAULTS.items():  # every value has its field's type: a bool is no int, an int no float
        if default is not None and not isinstance(default, (list, tuple)):
            assert type(values[leaf]) is type(default), (override, leaf, values[leaf])
    key, _, raw = override.removeprefix("--").partition("=")
    if key in LEAVES:  # it applied: the recipe holds exactly the value given
        try:
            given_value = yaml.safe_load(raw)
        except ValueError:  # YAML syntax, unreadable value (a date like 2024-13-45): the text itself
            given_value = raw
        if key in STRING_KEYS and not isinstance(given_value, str):
            given_value = raw
        if isinstance(given_value, str) and key not in STRING_KEYS:
            given_value = float(given_value)  # "1e-3", which YAML 1.1 leaves a string
        assert values[key] == given_value, override


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=40), st.text(alphabet=st.sampled_from(SYNTAX), max_size=40).map(lambda s: "--" + s)))
@example("--loop.steps=[1")
@example("--loop=3")
@example("--=3")
@example("--a..b=1")
@example("--data.source=2024-13-45")
@example("--loop.steps=" + "9" * 5000)
@example("--loop.steps=" + "[" * 2000)
def test_any_override_text_applies_or_is_named(override):
    check(override)


VALUES = st.one_of(
    st.integers(-3, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "false", "null", "~", "", "[]", "{}", "[1, 2]", "[0.5, 0.25]", "[vision]", "{steps: 3}",
                     "yes", "'3'", "1e-3", "1.0e-3", ".inf", ".nan", "0x10", "0o7", "2024-01-01", "!!binary aGk=",
                     "!!python/object:os.system x", "&a [*a]", "fp32", "auto", "sigmoid", "skip"]),  # fmt: skip
    st.text(max_size=12),
)
KEYS = st.one_of(st.sampled_from(LEAVES), st.sampled_from(SECTIONS), st.sampled_from(["loop.stepz", "model.vision.width.x", "optim..lr"]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(KEYS, VALUES)
def test_any_value_for_any_key_applies_or_is_named(key, value):
    check(f"--{key}={value}")


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.lists(st.sampled_from(SYNTAX + LEAVES[-20:] + ["\n  "]), max_size=40).map("".join).map(str.encode)))
def test_any_recipe_file_loads_or_is_named(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_bytes(content)
    try:
        load_recipe(read(path))
    except VlkitError as err:
        assert str(path) in str(err) or str(err).startswith("recipe"), str(err)
