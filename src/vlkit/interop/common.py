"""Helpers every layout shares: finding the weights, reading configs, attaching the tokenizer
and image preprocessing that travel with a checkpoint folder."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from vlkit.errors import Missing
from vlkit.interop.weights import CheckpointError, WeightReader
from vlkit.nn.mlp import ACTIVATIONS
from vlkit.text.tokenizer import Tokenizer
from vlkit.vision.preprocess import ImageProcessor

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def open_weights(folder: Path, names: tuple[str, ...] = HF_WEIGHTS) -> WeightReader:
    """The first weights file of ``names`` present in ``folder``."""
    for name in names:
        if (folder / name).is_file():
            return WeightReader.open(folder / name)
    raise FileNotFoundError(f"{folder}: no weights file; expected one of {list(names)}")


def section(cfg: dict, key: str, defaults: dict, where: str) -> dict:
    """A sub-config (e.g. ``vision_config``) merged over the reference defaults."""
    sub = cfg.get(key) or cfg.get(f"{key}_dict") or {}
    if not isinstance(sub, dict):
        raise ValueError(f"{where}: {key!r} must be a mapping, got {sub!r}")
    return {**defaults, **{k: v for k, v in sub.items() if v is not None}}


def activation(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: activation {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return name


def mlp_ratio(hidden: int, width: int) -> float:
    """A ratio from which ``int(round(width * ratio))`` gives back ``hidden`` exactly."""
    ratio = hidden / width
    if int(round(width * ratio)) != hidden:
        raise ValueError(f"MLP size {hidden} cannot be expressed as a ratio of width {width}")
    return ratio


def hf_vit_sizes(v: dict, where: str) -> dict:
    """The ViTConfig sizes from a transformers vision config (CLIP and SigLIP name them alike)."""
    return dict(
        image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"], depth=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], mlp_ratio=mlp_ratio(v["intermediate_size"], v["hidden_size"]),
        act=activation(v["hidden_act"], f"{where}: vision hidden_act"), eps=v["layer_norm_eps"],
    )


def hf_text_sizes(t: dict, where: str) -> dict:
    """The TextConfig sizes from a transformers text config (CLIP and SigLIP name them alike)."""
    return dict(
        vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"], width=t["hidden_size"],
        depth=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
        mlp_ratio=mlp_ratio(t["intermediate_size"], t["hidden_size"]),
        act=activation(t["hidden_act"], f"{where}: text hidden_act"), eps=t["layer_norm_eps"],
    )


def require(cond: bool, where: str, message: str) -> None:
    """Refuse a config switch vlkit does not implement rather than load it approximately."""
    if not cond:
        raise ValueError(f"{where}: {message}")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def attach_tokenizer(model, folder: Path, context_length: int) -> None:
    """``tokenizer.json`` (with the pad token from ``tokenizer_config.json``), padded and
    truncated to ``context_length`` as the reference pipelines do; without it a
    :class:`~vlkit.errors.Missing` tokenizer that names the file at first use."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        warnings.warn(f"{folder}: no tokenizer.json; the model loads without a tokenizer (encode_text needs ids)", stacklevel=3)
        model.tokenizer = Missing(folder, "tokenizer.json", "tokenizer")
        return
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exceptions
        raise ValueError(f"{path}: not a readable tokenizer.json ({err})") from None
    tok_cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    pad = _token_text(tok_cfg.get("pad_token"))
    tok.no_padding()
    tok.no_truncation()
    if pad is not None:
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"{folder / 'tokenizer_config.json'}: pad_token {pad!r} is not in {path.name}'s vocabulary")
        tok.enable_padding(pad_id=pad_id, pad_token=pad)
    model.tokenizer = Tokenizer(tok, context_length, pad_to_max=True)


def attach_processor(model, folder: Path, fallback: ImageProcessor | None = None) -> None:
    """``preprocessor_config.json`` (transparency onto white, as transformers does), else ``fallback``,
    else a :class:`~vlkit.errors.Missing` processor that names the file at first use."""
    path = folder / "preprocessor_config.json"
    if path.is_file():
        model.processor = ImageProcessor.from_hf(read_json(path))
        model.processor.alpha_background = 255
    elif fallback is not None:
        model.processor = fallback
    else:
        warnings.warn(f"{folder}: no preprocessor_config.json; the model loads without image preprocessing", stacklevel=3)
        model.processor = Missing(folder, "preprocessor_config.json", "image preprocessing")


__all__ = ["CheckpointError", "read_json", "open_weights", "section", "activation", "mlp_ratio", "require"]
