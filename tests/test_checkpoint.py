"""Checkpoints: a failed save never damages the last good one, training state round-trips
without pickle, and a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlkit
import vlkit.train.checkpoint as checkpoint
from vlkit.errors import CheckpointError
from vlkit.models.clip import CLIP, CLIPConfig
from vlkit.text.encoder import TextConfig
from vlkit.text.tokenizer import word_level
from vlkit.train.checkpoint import latest_checkpoint, load_state, save_checkpoint, save_state
from vlkit.train.clip import CLIPRecipe, DataConfig, train_clip
from vlkit.train.loop import LoopConfig, OptimConfig
from vlkit.vision.vit import ViTConfig


def tiny_clip() -> CLIP:
    cfg = CLIPConfig(
        vision=ViTConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, act="gelu"),
        text=TextConfig(vocab_size=16, context_length=16, width=32, depth=1, num_heads=2, act="gelu", eot_token_id=3),
        embed_dim=32,
    )
    model = CLIP(cfg)
    model.tokenizer = word_level(["a", "red", "star"], 16)
    return model


def optimizer_and_schedule(model: torch.nn.Module):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tiny_clip()
    first = save_checkpoint(tmp_path, 1, model, "clip", {"step": 1})
    saved = weights(first)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save_file = checkpoint.save_file

    def save_half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, model, "clip", {"step": 2})
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", first.name]
    assert latest_checkpoint(tmp_path) == first
    assert_same_tensors(weights(first), saved)
    loaded = vlkit.load(tmp_path)
    assert_same_tensors(loaded.state_dict(), saved)
    assert load_state(first / "training_state") == {"step": 1}


def test_failed_training_state_write_keeps_latest_on_the_previous_step(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tiny_clip()
    first = save_checkpoint(tmp_path, 5, model, "clip", {"step": 5})

    def write_some_then_fail(folder, state):
        folder.mkdir(parents=True)
        (folder / "state.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed while writing the training state")

    monkeypatch.setattr(checkpoint, "save_state", write_some_then_fail)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(tmp_path, 6, model, "clip", {"step": 6})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    assert not list((tmp_path / "checkpoints").glob("*step_00000006*"))
    second = save_checkpoint(tmp_path, 6, model, "clip", {"step": 6})
    assert latest_checkpoint(tmp_path) == second


def test_keeps_only_the_newest_checkpoints(tmp_path):
    model = tiny_clip()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, "clip", {"step": step}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path).name == "step_00000003"


def test_training_state_round_trips_without_pickle(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tiny_clip()
    optimizer, scheduler = optimizer_and_schedule(model)
    pixels = torch.randn(4, 3, 32, 32)
    ids = torch.tensor([[1, 4, 5, 3], [1, 5, 4, 3], [1, 4, 3, 0], [1, 6, 3, 0]])
    for _ in range(2):
        model(pixels, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "step": 7,
        "elapsed": 1.25,
        "skipped": 0,
    }
    save_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("the training state must not be unpickled")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_state(tmp_path)
    monkeypatch.undo()

    assert loaded["step"] == 7 and loaded["elapsed"] == 1.25
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    original = state["optimizer"]
    assert loaded["optimizer"]["state"].keys() == original["state"].keys()
    for key, slots in original["state"].items():
        for name, value in slots.items():
            assert torch.equal(loaded["optimizer"]["state"][key][name], value), (key, name)

    # A fresh optimizer given the loaded state takes exactly the same next step.
    twin = tiny_clip()
    twin.load_state_dict(model.state_dict())
    twin_optimizer, twin_scheduler = optimizer_and_schedule(twin)  # in fit's order: build, then load
    twin_optimizer.load_state_dict(loaded["optimizer"])
    twin_scheduler.load_state_dict(loaded["scheduler"])
    assert twin_scheduler.get_last_lr() == scheduler.get_last_lr()
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    assert_same_tensors(model.state_dict(), twin.state_dict())


def test_missing_training_state_is_named(tmp_path):
    save_state(tmp_path, {"step": 1, "x": torch.zeros(2)})
    (tmp_path / "state.safetensors").unlink()
    with pytest.raises(CheckpointError, match="state.safetensors: missing"):
        load_state(tmp_path)


# --- resume exactness ---------------------------------------------------------------------


def shapes_recipe(steps: int) -> CLIPRecipe:
    return CLIPRecipe(
        model=CLIPConfig(
            vision=ViTConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, act="gelu"),
            text=TextConfig(context_length=24, width=32, depth=1, num_heads=2, act="gelu"),
            embed_dim=32,
        ),
        data=DataConfig(source="shapes", image_size=32),
        optim=OptimConfig(lr=1e-3, warmup_steps=2),
        loop=LoopConfig(steps=steps, batch_size=8, precision="fp32", log_every=1),
    )


def test_resumed_run_equals_uninterrupted_run_exactly(tmp_path):
    steps = 6
    whole = train_clip(shapes_recipe(steps), tmp_path / "whole")
    assert whole["steps"] == steps

    halted = train_clip(shapes_recipe(steps), tmp_path / "split", stop_at=steps // 2)
    assert halted["steps"] == steps // 2
    middle = latest_checkpoint(tmp_path / "split")
    assert middle.name == f"step_{steps // 2:08d}"
    assert load_state(middle / "training_state")["step"] == steps // 2
    # as a run killed two steps after that checkpoint leaves its logs (the last line torn): the resumed run logs
    # those steps again, and used to leave both copies
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 9.0}\n{"step": 5, "loss": 9.0}\n{"step": 6, "lo')

    resumed = train_clip(shapes_recipe(steps), tmp_path / "split", resume=True)
    assert resumed["steps"] == steps
    assert resumed["samples"] == whole["samples"] - halted["samples"]

    final_whole = latest_checkpoint(tmp_path / "whole")
    final_split = latest_checkpoint(tmp_path / "split")
    assert final_whole.name == final_split.name == f"step_{steps:08d}"
    assert_same_tensors(weights(final_whole), weights(final_split))
    # the halfway weights differ from the final ones, so the comparison above has teeth
    assert not torch.equal(weights(middle)["vision.pos_embed"], weights(final_split)["vision.pos_embed"])

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


def test_a_resume_refuses_new_optimizer_settings_and_a_truncated_newest_checkpoint_is_named(tmp_path):
    """A new weight decay was recorded in recipe.json but not used; a truncated checkpoint raised safetensors' own error."""
    from vlkit.train.clip import train_clip as train

    train(shapes_recipe(4), tmp_path / "r", stop_at=2)
    changed = shapes_recipe(4)
    changed.optim.weight_decay = 0.5
    with pytest.raises(CheckpointError, match=r"optimizer settings .* changes optim.weight_decay"):
        train(changed, tmp_path / "r", resume=True)
    weights = checkpoint.latest_checkpoint(tmp_path / "r") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        vlkit.load(tmp_path / "r")
