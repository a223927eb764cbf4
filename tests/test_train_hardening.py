"""Training runs given bad options, bad data or a damaged run folder: each ends in vlkit's own
error naming the key, file or override (never a traceback, never a run that claims success),
and a failed resume leaves the run folder as it was."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

import vlkit
from vlkit.cli import main
from vlkit.config import flatten, to_dict
from vlkit.errors import CheckpointError, VlkitError
from vlkit.models.clip import CLIP
from vlkit.train.checkpoint import latest_checkpoint, save_checkpoint
from vlkit.train.clip import CLIPRecipe, load_recipe, train_clip

TINY = [
    "--model.vision.width=32", "--model.vision.depth=1", "--model.vision.num_heads=2", "--model.vision.patch_size=8",
    "--model.text.width=32", "--model.text.depth=1", "--model.text.num_heads=2", "--model.text.context_length=24",
    "--model.embed_dim=32", "--data.image_size=32", "--loop.steps=2", "--loop.batch_size=8", "--optim.warmup_steps=1",
    "--loop.precision=fp32", "--loop.log_every=1",
]  # fmt: skip


def train(out: Path, *extra: str) -> int:
    return main(["train", "clip", "--out", str(out), *TINY, *extra])


def error_of(capsys) -> str:
    """The error line the command printed (after any progress bar)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("vlkit: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished two-step run; tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("hardening") / "run"
    assert train(out) == 0
    return out


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# --- 1. strict numeric options, named by key -------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("--loop.steps=true", "loop.steps: expected a positive integer, got True"),
        ("--loop.steps=1.5", "loop.steps: expected a positive integer, got 1.5"),
        ("--loop.steps='3'", "loop.steps: expected a positive integer, got '3'"),
        ("--loop.batch_size=0", "loop.batch_size: expected a positive integer, got 0"),
        ("--loop.grad_accum=-2", "loop.grad_accum: expected a positive integer, got -2"),
        ("--loop.log_every=0", "loop.log_every: expected a positive integer, got 0"),
        ("--loop.keep_checkpoints=0", "loop.keep_checkpoints: expected a positive integer, got 0"),
        ("--loop.save_every=-1", "loop.save_every: expected a non-negative integer, got -1"),
        ("--optim.lr=0", "optim.lr: expected a positive number, got 0"),
        ("--optim.lr=-1e-3", "optim.lr: expected a positive number, got '-1e-3'"),
        ("--optim.warmup_steps=2.5", "optim.warmup_steps: expected a non-negative integer, got 2.5"),
        ("--optim.betas=[0.9, 1.5]", "optim.betas: expected a list of 2 items, each a number in [0, 1)"),
        ("--data.image_size=0", "data.image_size: expected a positive integer, got 0"),
        ("--data.group_size=3", "loop.batch_size 8 must be a multiple of data.group_size 3"),
        ("--model.vision.width=0", "model.vision.width: expected a positive integer, got 0"),
        ("--model.vision.patch_size=0", "model.vision.patch_size: expected a positive integer, got 0"),
        ("--model.text.depth=0", "model.text.depth: expected a positive integer, got 0"),
        ("--model.embed_dim=-1", "model.embed_dim: expected a positive integer, got -1"),
        ("--model.vision.mlp_ratio=-1", "model.vision.mlp_ratio: expected a positive number, got -1"),
        ("--model.vision.num_registers=-1", "model.vision.num_registers: expected a non-negative integer, got -1"),
        ("--model.vision.num_heads=5", "width 32 is not divisible by num_heads 5"),
    ],
)
def test_bad_numeric_options_are_refused_before_anything_is_written(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert train(out, override) == 2
    err = error_of(capsys)
    assert message in err and override in err
    assert not out.exists()


# --- 2. malformed overrides -----------------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--loop.steps=[1", "is not a valid YAML value"),
        ("--loop=3", "'loop' is a section, not a value; set its keys as --loop.KEY=VALUE"),
        ("--=3", "'' is not a dotted key of names"),
        ("--a..b=1", "'a..b' is not a dotted key of names"),
        ("--loop.stepz=3", "unknown key 'loop.stepz'; expected one of ['batch_size'"),
        ("--loop.steps.max=3", "'loop.steps' is a value (a positive integer), not a section"),
        ("--loop.freeze=vision", "loop.freeze: expected a list, each item a string, got 'vision'"),
    ],
)
def test_malformed_overrides_name_the_override_and_what_was_expected(tmp_path, capsys, override, expected):
    assert train(tmp_path / "run", override) == 2
    err = error_of(capsys)
    assert f"override {override!r}" in err and expected in err


def test_an_override_without_a_value_gets_a_hint(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "clip", "--out", str(tmp_path / "run"), "--loop.steps", "3"])
    assert info.value.code == 2
    assert "recipe overrides take the form --key=value" in capsys.readouterr().err


# --- 3. nothing trained is an error, not a checkpoint ---------------------------------------


def captions_folder(root: Path, images: dict[str, bool]) -> Path:
    """A captions.jsonl folder whose records name ``images``; those marked False are not written."""
    (root / "img").mkdir(parents=True)
    lines = []
    for name, exists in images.items():
        if exists:
            Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "img" / name)
        lines.append(json.dumps({"image": f"img/{name}", "captions": [f"a red square called {name[:-4]}"]}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_every_sample_skipped_is_an_error_and_saves_nothing(tmp_path, capsys):
    data = captions_folder(tmp_path / "data", {f"{k}.png": False for k in range(5)})
    out = tmp_path / "run"
    code = train(out, f"--data.source={data}", "--data.on_bad_sample=skip", "--loop.steps=50", "--data.group_size=1")
    assert code == 2
    err = error_of(capsys)
    assert "every sample read in step 1 was skipped as bad (8 skipped" in err and "nothing was trained, so no checkpoint was saved" in err
    assert not (out / "checkpoints").exists()
    # it stopped once every sample had been tried, not after 50 steps of nothing
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 8 and max(r["step"] for r in skipped) == 1
    assert {(r["source"], r["record"]) for r in skipped} == {(str(data / "captions.jsonl"), f"line {k + 1}") for k in range(5)}
    images = {f"line {k + 1}": data / "img" / f"{k}.png" for k in range(5)}
    assert all(r["detail"] == f"image {images[r['record']]}: file not found" for r in skipped)


def test_skipped_samples_are_listed_with_file_and_reason(tmp_path, capsys):
    data = captions_folder(tmp_path / "data", {"0.png": True, "1.png": False, "2.png": True, "3.png": True})
    out = tmp_path / "run"
    assert train(out, f"--data.source={data}", "--data.on_bad_sample=skip", "--data.group_size=1") == 0
    stdout = capsys.readouterr().out
    summary = json.loads(stdout.splitlines()[-2])
    assert summary["skipped"] == 4 and summary["samples"] == 12  # 2 steps × 8 reads of 4 records, 1 bad
    assert f"skipped 4 bad samples, each listed with its file and reason in {out / 'skipped.jsonl'}" in stdout
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1, 2, 2]
    assert {(r["source"], r["record"], r["detail"]) for r in rows} == {
        (str(data / "captions.jsonl"), "line 2", f"image {data / 'img' / '1.png'}: file not found")}
    assert "skipped.jsonl (4 skipped samples)" in stdout


def test_an_empty_captions_file_is_named(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "captions.jsonl").write_text("")
    assert train(tmp_path / "run", f"--data.source={data}") == 2
    err = error_of(capsys)
    assert str(data / "captions.jsonl") in err and "no records" in err


def test_an_unknown_data_source_lists_the_named_one(tmp_path, capsys):
    assert train(tmp_path / "run", "--data.source=shapse") == 2
    err = error_of(capsys)
    assert "data.source 'shapse': no such folder; expected 'shapes'" in err


# --- 4. a failed resume changes nothing -----------------------------------------------------


def test_resume_with_a_different_model_fails_first_and_keeps_the_recipe(run, tmp_path, capsys):
    out = copy_run(run, tmp_path / "run")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert train(out, "--resume", "--loop.steps=4", "--model.vision.patch_size=16") == 2
    err = error_of(capsys)
    ckpt = out / "checkpoints" / "step_00000002" / "model.safetensors"
    assert f"{ckpt}: does not fit the model this recipe builds" in err
    assert "vision.pos_embed is (1, 17, 32) there but (1, 5, 32) here" in err
    assert f"The recipe differs from {out / 'recipe.json'} in model.vision.patch_size 8 → 16" in err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_resume_past_the_end_and_of_a_finished_run(run, tmp_path, capsys):
    out = copy_run(run, tmp_path / "run")
    assert train(out, "--resume", "--loop.steps=1") == 2
    assert "the run is at step 2, beyond loop.steps=1" in error_of(capsys)
    assert train(out, "--resume") == 0
    assert f"nothing to train: {out} is already at step 2" in capsys.readouterr().out
    assert latest_checkpoint(out).name == "step_00000002"


# --- 5. a latest pointer that names a missing step ------------------------------------------


@pytest.mark.parametrize(
    "pointer, problem",
    [
        ("step_00000099\n", "names step_00000099, but {folder} does not exist; the checkpoints there are ['step_00000002']"),
        ("../../etc\n", "expected the name of a checkpoint folder (step_NNNNNNNN), got '../../etc'"),
        (b"\xff\xfe\n", "cannot be read"),
    ],
)
def test_a_bad_latest_pointer_is_named_by_load_and_resume(run, tmp_path, capsys, pointer, problem):
    out = copy_run(run, tmp_path / "run")
    latest = out / "checkpoints" / "latest"
    if isinstance(pointer, bytes):
        latest.write_bytes(pointer)
    else:
        latest.write_text(pointer)
    problem = problem.format(folder=out / "checkpoints" / "step_00000099")
    with pytest.raises(CheckpointError) as info:
        vlkit.load(out)
    assert str(info.value).startswith(f"{latest}") and problem in str(info.value)
    assert train(out, "--resume", "--loop.steps=3") == 2
    err = error_of(capsys)
    assert str(latest) in err and problem in err


def test_a_checkpoint_without_weights_is_named(run, tmp_path):
    out = copy_run(run, tmp_path / "run")
    (out / "checkpoints" / "step_00000002" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="step_00000002 has no model.safetensors"):
        vlkit.load(out)


# --- 6. resume with nothing to resume; stale temporaries ------------------------------------


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--resume", "--loop.steps=1") == 0
    assert f"{out}: no checkpoint to resume from; starting a fresh run" in capsys.readouterr().out
    assert latest_checkpoint(out).name == "step_00000001"


def test_the_next_save_removes_what_a_killed_save_left(run, tmp_path):
    out = copy_run(run, tmp_path / "run")
    root = out / "checkpoints"
    stale = [root / ".step_00000003.tmp-0a1b2c3d", root / ".step_00000002.old-deadbeef"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (root / ".latest.tmp-12345678").write_text("step_00000003\n")
    model = vlkit.load(out)
    save_checkpoint(out, 3, model, "clip", {"step": 3})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]


def test_a_kill_between_the_renames_of_a_save_loses_nothing(run, tmp_path):
    """A fresh run saving the step that ``latest`` names moves the old folder aside, then its own in:
    killed between the two, ``latest`` named a folder that was gone, and the next save deleted the
    old copy as a leftover."""
    out = copy_run(run, tmp_path / "run")
    root, model = out / "checkpoints", vlkit.load(out)
    named = latest_checkpoint(out)
    weights = (named / "model.safetensors").read_bytes()
    named.rename(root / f".{named.name}.old-0a1b2c3d")  # the state such a kill leaves
    (root / f".{named.name}.tmp-4e5f6a7b").mkdir()
    assert latest_checkpoint(out) == named and (named / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    named.rename(root / f".{named.name}.old-0a1b2c3d")
    save_checkpoint(out, 9, model, "clip", {"step": 9})
    assert (named / "model.safetensors").read_bytes() == weights  # put back, not cleared, by the next save


def test_an_atomic_folder_killed_between_its_renames_is_put_back_by_the_next_write(tmp_path):
    from vlkit.files import atomic_folder

    target = tmp_path / "out"
    atomic_folder(target, lambda tmp: (tmp.mkdir(), (tmp / "a.txt").write_text("first")))
    target.rename(tmp_path / ".out.old-12345678")  # killed here: no out/ at all
    (tmp_path / ".out.tmp-9abcdef0").mkdir()
    atomic_folder(target, lambda tmp: (tmp.mkdir(), (tmp / "a.txt").write_text("second")))
    assert (target / "a.txt").read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_fresh_run_over_an_earlier_one_replaces_it(run, tmp_path, capsys):
    """The earlier run got further; its later checkpoints must not outlive the new run's."""
    out = copy_run(run, tmp_path / "run")
    assert train(out, "--loop.steps=1") == 0
    assert "holds an earlier run; starting a fresh one" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert latest_checkpoint(out).name == "step_00000001"


def test_a_fresh_run_killed_before_its_first_checkpoint_leaves_the_earlier_run_whole(run, tmp_path, monkeypatch):
    """Its metrics.jsonl and recipe.json used to be replaced at once, describing checkpoints they never made."""
    import vlkit.train.loop as loop

    out = copy_run(run, tmp_path / "run")
    before = {name: (out / name).read_text() for name in ("metrics.jsonl", "recipe.json")}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed as it saved")

    monkeypatch.setattr(loop, "save_checkpoint", killed)
    assert train(out, "--optim.lr=0.01") == 130  # the command line's Ctrl+C
    assert {name: (out / name).read_text() for name in before} == before
    monkeypatch.undo()
    assert train(out, "--optim.lr=0.01", "--loop.steps=3") == 0  # the next fresh run replaces it, logs and all
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((out / "recipe.json").read_text())["optim"]["lr"] == 0.01
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    model = CLIP(load_recipe({}, TINY).model)
    for step in (7, 8, 9):
        save_checkpoint(tmp_path, step, model, "clip", {"step": step}, keep=2)
    save_checkpoint(tmp_path, 2, model, "clip", {"step": 2}, keep=2)  # a new run in the same folder
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002"]


# --- 7, 8. help and the --out message -------------------------------------------------------


def test_train_help_explains_overrides_and_lists_every_recipe_key(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "clip", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--key=value" in out and "not a whole section" in out
    rows = [re.match(r"  --(\S+?)=(.*?)\s{2,}(.+)", line) for line in out.splitlines()]
    listed = {m[1]: (m[2], m[3]) for m in rows if m}
    keys = set(listed)
    assert keys == set(flatten(to_dict(CLIPRecipe())))
    assert listed["loop.steps"] == ("1000", "a positive integer")
    assert listed["data.source"] == ("shapes", "a string")
    assert listed["optim.betas"] == ("[0.9, 0.98]", "a list of 2 items, each a number in [0, 1)")
    assert listed["model.text.vocab_size"][1].startswith("set by training from the tokenizer")


def test_train_says_what_it_wrote(run, capsys, tmp_path):
    out = tmp_path / "run"
    assert train(out, "--loop.steps=1") == 0
    stdout = capsys.readouterr().out
    checkpoint = out / "checkpoints" / "step_00000001"
    assert f"wrote {out}: {checkpoint} (model folder + training state), metrics.jsonl, recipe.json" in stdout
    for written in (checkpoint / "model.safetensors", out / "metrics.jsonl", out / "recipe.json"):
        assert written.is_file()
    assert json.loads(stdout.splitlines()[-2])["checkpoint"] == str(checkpoint)


def test_errors_are_vlkit_errors_in_the_api_too(tmp_path):
    with pytest.raises(VlkitError, match="loop.batch_size: expected a positive integer, got 0"):
        load_recipe({"loop": {"batch_size": 0}})
    with pytest.raises(VlkitError, match="data.source 'nowhere': no such folder"):
        train_clip(load_recipe({}, [*TINY, "--data.source=nowhere"]), tmp_path / "run")


def test_a_bad_recipe_file_is_named(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("loop: {steps: true}\n")
    assert main(["train", "clip", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert error_of(capsys) == f"vlkit: error: {recipe}: recipe.loop.steps: expected a positive integer, got True"


def test_an_out_that_is_a_file_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("not a folder")
    assert train(out) == 2
    assert error_of(capsys) == f"vlkit: error: {out}: is a file; the run folder (--out) must be a folder"


def test_fit_refuses_an_empty_dataset_before_writing(tmp_path):
    from vlkit.data.pairs import Collate
    from vlkit.train.loop import LoopConfig, OptimConfig, fit

    model = CLIP(load_recipe({}, TINY).model)
    model.tokenizer = None
    with pytest.raises(VlkitError, match="the training data holds no samples"):
        fit(model, [], Collate(None), LoopConfig(steps=1, batch_size=2), OptimConfig(), tmp_path / "run", "clip", recipe={})
    assert not (tmp_path / "run").exists()


def test_commands_without_a_recipe_refuse_overrides(tmp_path, capsys):
    """A mistyped flag such as --batch-sise=8 is not silently taken for a recipe override."""
    with pytest.raises(SystemExit) as info:
        main(["data", "shapes", "--out", str(tmp_path / "data"), "-n", "4", "--image-sise=32"])
    assert info.value.code == 2
    assert "unrecognised arguments: --image-sise=32" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
