"""Checkpoints are folders, written under a temporary name and renamed into place.

``run/checkpoints/step_000100/`` holds ``config.json``, ``model.safetensors``,
``tokenizer.json``, ``preprocessor_config.json`` and ``training_state/`` (optimizer,
scheduler, step, RNG states as safetensors + JSON; nothing is pickled). The file
``run/checkpoints/latest`` names the newest complete one and is replaced atomically, so a
crash mid-write leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vlkit.config import to_dict, write_json
from vlkit.errors import CheckpointError
from vlkit.files import atomic_folder, recover, write_text_whole


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
            raise CheckpointError(f"{folder / name}: missing; the training state is incomplete")
    try:
        tensors = load_file(str(folder / "state.safetensors"))
        return _unflatten(json.loads((folder / "state.json").read_text()), tensors)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder}: damaged training state ({err})") from None


def save_model(folder: Path, model, model_type: str, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model folder's files (config, weights, tokenizer, preprocessing) into ``folder``;
    ``weights``: the model's whole state dict where ``model.state_dict()`` holds only shards (FSDP)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", {"model_type": f"vlkit_{model_type}", **to_dict(model.cfg)})
    weights = model.state_dict() if weights is None else weights
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if getattr(model, "tokenizer", None):  # None, or Missing from the folder it was loaded from
        model.tokenizer.save(folder)
    if getattr(model, "generation_config", None):
        model.generation_config.save(folder)
    if getattr(model, "processor", None):
        write_json(folder / "preprocessor_config.json", model.processor.to_hf())


STEP = re.compile(r"step_(\d+)")
STALE = (".step_*.tmp-*", ".step_*.old-*", ".latest.tmp-*")
"""What a save killed midway leaves behind (see :func:`vlkit.files.atomic_folder`)."""


def _step_folders(root: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in root.glob("step_*") if (m := STEP.fullmatch(p.name)) and p.is_dir()}


def _recover_latest(root: Path) -> None:
    """Put back the checkpoint ``latest`` names if a save killed between two renames left it aside
    (:func:`vlkit.files.recover`), before the leftovers of killed saves are cleared."""
    try:
        name = (root / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return
    if STEP.fullmatch(name):
        recover(root / name)


def save_checkpoint(run_dir: Path, step: int, model, model_type: str, training_state: dict, keep: int = 2,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``checkpoints/step_N`` atomically, point ``latest`` at it, prune older ones
    (``weights`` as :func:`save_model` takes them).

    Checkpoints of a later step than ``step`` belong to an earlier run that this (fresh) run
    replaces, and go too; so do the temporary folders of a save that was killed."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _recover_latest(root)
    for pattern in STALE:
        for stale in root.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
    target = root / f"step_{step:08d}"

    def write(tmp: Path) -> None:
        save_model(tmp, model, model_type, weights)
        save_state(tmp / "training_state", training_state)

    atomic_folder(target, write)
    write_text_whole(root / "latest", target.name + "\n")
    others = sorted((s, p) for s, p in _step_folders(root).items() if p != target)
    older = [p for s, p in others if s < step]
    for old in [p for s, p in others if s > step] + older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (``checkpoints/latest`` names it), or ``None``
    if the run has none; a pointer naming a missing or incomplete folder is an error."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{pointer}: cannot be read ({err})") from None
    if not STEP.fullmatch(name):
        raise CheckpointError(f"{pointer}: expected the name of a checkpoint folder (step_NNNNNNNN), got {name[:80]!r}")
    folder = pointer.parent / name
    if not folder.exists():
        recover(folder)  # a save killed between atomic_folder's renames
    if not (folder / "model.safetensors").is_file():
        found = [p.name for _, p in sorted(_step_folders(pointer.parent).items())]
        problem = "has no model.safetensors" if folder.is_dir() else "does not exist"
        raise CheckpointError(
            f"{pointer} names {name}, but {folder} {problem}; the checkpoints there are {found or 'none'} "
            "(write the name of a complete one into latest, or train into a new --out)"
        )
    return folder


def run_recipe_file(folder: Path) -> Path:
    """The ``recipe.json`` of the run a model folder belongs to: ``run/model`` or ``run/checkpoints/step_N``."""
    folder = Path(folder)
    return (folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent) / "recipe.json"


def run_lora(checkpoint: Path):
    """The :class:`~vlkit.nn.lora.LoraConfig` of the LoRA run that ``checkpoint`` (``run/checkpoints/step_N``)
    belongs to when its weights hold unmerged adapters, else None: such a checkpoint loads as a
    model once they are added back and merged."""
    from vlkit.config import from_dict
    from vlkit.nn.lora import LoraConfig

    weights, recipe = Path(checkpoint) / "model.safetensors", run_recipe_file(checkpoint)
    if not weights.is_file() or Path(checkpoint).parent.name != "checkpoints":
        return None
    if not any(k.endswith(".lora_A") for k in _weight_shapes(weights)):
        return None
    if not recipe.is_file():
        raise CheckpointError(f"{weights}: holds LoRA adapters, but its run's recipe.json (their rank and scale) is missing")
    return from_dict(LoraConfig, json.loads(recipe.read_text()).get("lora") or {}, str(recipe) + ": lora")


def weight_mismatches(folder: Path, model) -> list[str]:
    """How ``folder/model.safetensors`` differs from ``model``'s parameters (names and shapes,
    read from the header only); empty when the weights fit."""
    shapes = _weight_shapes(folder / "model.safetensors")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{k} is {shapes[k]} there but {expected[k]} here" for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing := sorted(set(expected) - set(shapes)):
        problems.append(f"it lacks {_some(missing)}")
    if unexpected := sorted(set(shapes) - set(expected)):
        problems.append(f"it has {_some(unexpected)}, which this model has not")
    return problems


def _weight_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a safetensors file, read from its header; a damaged file is named."""
    try:
        with safe_open(str(weights), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err}); it may be truncated") from None


def _some(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
