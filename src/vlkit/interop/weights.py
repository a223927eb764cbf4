"""Reading checkpoint tensors lazily: one tensor at a time from safetensors (single or sharded)
or a ``.bin`` opened with ``torch.load(weights_only=True, mmap=True)``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vlkit.errors import CheckpointError


class WeightReader:
    """Maps each tensor name to the file that holds it and reads tensors on demand."""

    def __init__(self, files: dict[str, Path], bins: dict[Path, dict] | None = None):
        self._file_of = files
        self._bins = bins or {}
        self._handles: dict[Path, object] = {}

    @classmethod
    def open(cls, path: Path) -> "WeightReader":
        """``*.safetensors``, ``*.safetensors.index.json`` or ``*.bin.index.json`` (shards), or ``*.bin``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing")
        if path.name.endswith(".index.json"):
            return cls._sharded(path)
        if path.suffix == ".bin":
            return cls._bin(path)
        return cls({k: path for k in _safetensors_keys(path)})

    @classmethod
    def _sharded(cls, index: Path) -> "WeightReader":
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a shard index (expected JSON with a 'weight_map' of key -> shard file; {err!r})") from None
        files: dict[str, Path] = {}
        bins: dict[Path, dict] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = index.parent / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"{shard_path}: missing (named by {index.name})")
            if shard_path.suffix == ".bin":  # pytorch_model-0000N-of-0000M.bin, as older checkpoints are sharded
                bins[shard_path] = _bin_state(shard_path)
                keys = set(bins[shard_path])
            else:
                keys = set(_safetensors_keys(shard_path))
            for key, name in weight_map.items():
                if name == shard and key not in keys:
                    raise CheckpointError(f"{shard_path}: has no tensor {key!r}, which {index.name} places in it")
            files.update({k: shard_path for k in keys})
        return cls(files, bins)

    @classmethod
    def _bin(cls, path: Path) -> "WeightReader":
        state = _bin_state(path)
        return cls({k: path for k in state}, {path: state})

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def file(self, key: str) -> Path:
        return self._file_of[key]

    def describe(self) -> str:
        """The file (or files) behind this reader, for error messages."""
        files = sorted({str(p) for p in self._file_of.values()})
        return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more shards)" if files else "(empty checkpoint)"

    def get(self, key: str) -> torch.Tensor:
        """One tensor; the rest of the checkpoint stays on disk."""
        path = self._file_of[key]
        if path in self._bins:
            return self._bins[path][key]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({err}); the file may be truncated") from None


def _bin_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.bin``: memory-mapped, or read whole when it predates torch's zip format
    (which cannot be mapped)."""
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "_use_new_zipfile_serialization" not in str(err):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for bad pickles
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, checking the header and the data size."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file ({err}); it may be truncated or corrupt") from None
    _check_size(path)
    return keys


def _check_size(path: Path) -> None:
    """safetensors maps the file lazily, so check up front that the data the header promises is there."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if size < 8 + n + end:
        raise CheckpointError(f"{path}: truncated: the header describes {8 + n + end} bytes but the file has {size}")
