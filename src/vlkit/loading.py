"""``vlkit.load(path)``: a ready model (tokenizer and preprocessing attached) from a folder."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from vlkit.config import from_dict
from vlkit.models import MODELS
from vlkit.text.tokenizer import Tokenizer
from vlkit.vision.preprocess import ImageProcessor


def resolve(path: str | Path) -> Path:
    """A model folder, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    pointer = path / "checkpoints" / "latest"
    if pointer.is_file():
        return pointer.parent / pointer.read_text().strip()
    raise FileNotFoundError(f"{path}: no config.json (nor checkpoints/latest of a training run)")


def load(path: str | Path, device: str = "cpu"):
    """Load a vlkit checkpoint folder (or a run folder) into an eval-mode model."""
    folder = resolve(path)
    cfg_file = folder / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_file}: malformed JSON ({err})") from None
    model_type = raw.pop("model_type", None)
    kind = model_type[len("vlkit_") :] if isinstance(model_type, str) and model_type.startswith("vlkit_") else None
    if kind not in MODELS:
        known = sorted(f"vlkit_{k}" for k in MODELS)
        raise ValueError(f"{cfg_file}: unknown model_type {model_type!r}; expected one of {known}")
    cfg_cls, model_cls = MODELS[kind]
    model = model_cls(from_dict(cfg_cls, raw, str(cfg_file)))
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing")
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{weights}: missing keys {sorted(missing)}; unexpected keys {sorted(unexpected)}")
    if (folder / "tokenizer.json").is_file():
        model.tokenizer = Tokenizer.from_file(folder / "tokenizer.json")
    if (folder / "preprocessor_config.json").is_file():
        model.processor = ImageProcessor.from_hf(json.loads((folder / "preprocessor_config.json").read_text()))
    return model.to(device).eval()
