"""Checkpoints are folders, written under a temporary name and renamed into place.

``run/checkpoints/step_000100/`` holds ``config.json``, ``model.safetensors``,
``tokenizer.json``, ``preprocessor_config.json`` and ``training_state/`` (optimizer,
scheduler, step, RNG states as safetensors + JSON; nothing is pickled). The file
``run/checkpoints/latest`` names the newest complete one and is replaced atomically, so a
crash mid-write leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlkit.config import to_dict, write_json
from vlkit.files import atomic_folder


def _flatten(obj, prefix: str, tensors: dict[str, torch.Tensor]):
    """Split a nested state into tensors (by dotted path) and a JSON skeleton that points at them."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    return obj


def _key(k):
    return k if isinstance(k, (str, int, float, bool)) or k is None else str(k)


def _unflatten(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, dict) and "__list__" in obj:
        return [_unflatten(v, tensors) for v in obj["__list__"]]
    return obj


def save_state(folder: Path, state: dict) -> None:
    """A nested dict of tensors and plain values → ``state.safetensors`` + ``state.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "state", tensors)
    save_file(tensors, str(folder / "state.safetensors"))
    write_json(folder / "state.json", skeleton)


def load_state(folder: Path) -> dict:
    for name in ("state.safetensors", "state.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; the training state is incomplete")
    tensors = load_file(str(folder / "state.safetensors"))
    return _unflatten(json.loads((folder / "state.json").read_text()), tensors)


def save_model(folder: Path, model, model_type: str) -> None:
    """Write the model folder's files (config, weights, tokenizer, preprocessing) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", {"model_type": f"vlkit_{model_type}", **to_dict(model.cfg)})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save(folder / "tokenizer.json")
    if getattr(model, "processor", None) is not None:
        write_json(folder / "preprocessor_config.json", model.processor.to_hf())


def save_checkpoint(run_dir: Path, step: int, model, model_type: str, training_state: dict, keep: int = 2) -> Path:
    """Write ``checkpoints/step_N`` atomically, point ``latest`` at it, prune older ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step_{step:08d}"

    def write(tmp: Path) -> None:
        save_model(tmp, model, model_type)
        save_state(tmp / "training_state", training_state)

    atomic_folder(target, write)
    pointer = root / f".latest.tmp-{uuid.uuid4().hex[:8]}"
    pointer.write_text(target.name + "\n")
    os.replace(pointer, root / "latest")
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or ``None`` if it has none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which has no model.safetensors")
    return folder
