"""``vlkit.load(path)``: a ready model (tokenizer and preprocessing attached) from a folder.

vlkit's own checkpoints (``model_type`` "vlkit_*") load here; transformers and OpenCLIP
layouts go to :mod:`vlkit.interop`, chosen by ``config.json``'s ``model_type`` (or by the
presence of ``open_clip_config.json``), never by the folder name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlkit.config import from_dict
from vlkit.errors import Missing
from vlkit.lm import DecoderLM
from vlkit.models import MODELS
from vlkit.text.tokenizer import Tokenizer
from vlkit.vision.preprocess import ImageProcessor


def resolve(path: str | Path) -> Path:
    """A model folder, or a run folder: its final ``model/`` when it writes one, else its newest checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file() or (path / "open_clip_config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():  # a run that writes its final model apart (VLM: LoRA merged)
        return path / "model"
    from vlkit.train.checkpoint import latest_checkpoint  # checks the pointer: one rule for load and --resume

    if (checkpoint := latest_checkpoint(path)) is not None:
        return checkpoint
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    raise FileNotFoundError(
        f"{path}: no config.json (vlkit or transformers layout), open_clip_config.json (OpenCLIP layout) "
        "nor checkpoints/latest (a training run)"
    )


def load(path: str | Path, device: str = "cpu", dtype=None):
    """Load a vlkit, transformers or OpenCLIP checkpoint folder (or a run folder) into an eval-mode
    model, its weights in ``dtype`` (default: the dtype they were saved in)."""
    from vlkit import interop
    from vlkit.interop.common import read_json

    folder = resolve(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return interop.load_open_clip(folder, dtype).to(device)
    raw = read_json(cfg_file)
    model_type = raw.get("model_type")
    if model_type in interop.LOADERS:
        return interop.load_transformers(folder, raw, dtype).to(device)
    raw.pop("model_type", None)
    kind = model_type[len("vlkit_") :] if isinstance(model_type, str) and model_type.startswith("vlkit_") else None
    if kind not in MODELS:
        known = sorted(f"vlkit_{k}" for k in MODELS) + sorted(interop.LOADERS)
        raise ValueError(f"{cfg_file}: unknown model_type {model_type!r}; expected one of {known}")
    cfg_cls, model_cls = MODELS[kind]
    cfg = from_dict(cfg_cls, raw, str(cfg_file))
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing")
    with torch.device("meta"):
        model = model_cls(cfg)
    from vlkit.train.checkpoint import run_lora

    lora = run_lora(folder)  # a LoRA run's checkpoint: its adapters, merged into the model
    if lora is not None:
        from vlkit.nn.lora import add_lora, merge_lora

        with torch.device("meta"):
            add_lora(model.lm, lora)
    load_native_weights(model, weights)
    if lora is not None:
        merge_lora(model.lm)
    if hasattr(cfg, "text") or getattr(getattr(cfg, "qformer", None), "text", False):  # a text tower, or a Q-Former's text path
        tok = folder / "tokenizer.json"
        model.tokenizer = Tokenizer.from_file(tok) if tok.is_file() else Missing(folder, tok.name, "tokenizer")
    if hasattr(cfg, "vision"):
        pre = folder / "preprocessor_config.json"
        model.processor = ImageProcessor.from_hf(read_json(pre)) if pre.is_file() else Missing(folder, pre.name, "image preprocessing")
    if isinstance(model, DecoderLM):
        from vlkit.interop.lm_files import attach_lm_files

        attach_lm_files(model, folder)
    elif isinstance(getattr(model, "lm", None), DecoderLM):  # a VLM: its language model's tokenizer and defaults
        from vlkit.interop.hf_llava import attach_lm_files_to

        attach_lm_files_to(model, folder)
    return (model if dtype is None else model.to(dtype)).to(device).eval()


def load_native_weights(model, weights: Path) -> None:
    """Fill ``model`` (built on the meta device) from a vlkit ``model.safetensors`` one tensor at a
    time, all keys or nothing."""
    from vlkit.interop.weights import CheckpointError, WeightReader

    reader = WeightReader.open(weights)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(reader.keys()))
    unexpected = sorted(set(reader.keys()) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{weights}: missing keys {missing}; unexpected keys {unexpected}")
    state = {}
    for key, param in expected.items():
        t = reader.get(key)
        if t.shape != param.shape:
            raise CheckpointError(f"{weights}: tensor {key!r} has shape {tuple(t.shape)}; expected {tuple(param.shape)} from config.json")
        state[key] = t
    model.load_state_dict(state, strict=True, assign=True)
