"""transformers' ``LlavaNextForConditionalGeneration`` (and ``LlavaNextVideoForConditionalGeneration``)
layout: LLaVA's layouts and rules (:mod:`vlkit.interop.hf_llava`) plus ``[model.]image_newline``,
the grid pinpoints from ``config.json`` and, for video, the video token and the frame pooling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlkit.interop import hf_llava
from vlkit.interop import keymap as km
from vlkit.interop.common import attach_processor, open_weights, read_json, require
from vlkit.interop.weights import CheckpointError, WeightReader
from vlkit.models.llava import LlavaConfig
from vlkit.models.llava_next import LlavaNext, LlavaNextConfig
from vlkit.vision import anyres

NEWLINE_KEYS = ("image_newline", "model.image_newline")
VIDEO_TYPE = "llava_next_video"
POOLS = {"average": "average", "max": "max"}
"""transformers' ``spatial_pool_mode`` values vlkit runs (``conv`` has weights vlkit does not model)."""


def newline_key(reader: WeightReader) -> str:
    """Where the checkpoint keeps ``image_newline`` (top level, or under ``model.`` in 4.52+ folders)."""
    for key in NEWLINE_KEYS:
        if key in reader:
            return key
    raise CheckpointError(f"{reader.describe()}: no LLaVA-NeXT image_newline; expected one of the keys {list(NEWLINE_KEYS)}")


def config_from_hf(raw: dict, where: str, connector: tuple[str, dict] = ("mlp", {})) -> LlavaNextConfig:
    """A transformers ``llava_next`` or ``llava_next_video`` config.json → :class:`LlavaNextConfig`."""
    base = hf_llava.config_from_hf(raw, where, connector)
    video = raw.get("model_type") == VIDEO_TYPE
    options = {}
    if video:
        mode = raw.get("spatial_pool_mode", "average")
        require(mode in POOLS, where, f"spatial_pool_mode {mode!r} is not supported; expected one of {list(POOLS)}")
        options = dict(video_token_id=raw.get("video_token_index", raw.get("video_token_id", 32000)),
                       video_pool=POOLS[mode], video_pool_stride=raw.get("spatial_pool_stride", 2))
    pinpoints = raw.get("image_grid_pinpoints", anyres.grid_pinpoints(336))
    try:
        pinpoints = anyres.check_pinpoints(pinpoints, base.vision.image_size, f"{where}: image_grid_pinpoints")
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LlavaConfig)}
        return LlavaNextConfig(**fields, image_grid_pinpoints=tuple(pinpoints), **options)
    except ValueError as err:
        raise ValueError(err if str(err).startswith(where) else f"{where}: {err}") from None


def rules(cfg: LlavaNextConfig, layout: hf_llava.Layout, newline: str) -> list[km.Rule]:
    """LLaVA's rules under ``layout`` and the newline vector."""
    return [*hf_llava.rules(cfg, layout), km.copy("image_newline", newline)]


def check_processor_pinpoints(folder: Path, cfg: LlavaNextConfig) -> None:
    """The tiling the preprocessing does must be the one the model unpads for."""
    path = folder / "preprocessor_config.json"
    if not path.is_file() or "image_grid_pinpoints" not in (pre := read_json(path)):
        return
    tiling = anyres.check_pinpoints(pre["image_grid_pinpoints"], cfg.vision.image_size, f"{path}: image_grid_pinpoints")
    if tuple(tiling) != cfg.image_grid_pinpoints:
        raise CheckpointError(f"{path}: image_grid_pinpoints {tiling} differ from config.json's "
                              f"{list(cfg.image_grid_pinpoints)}; the model unpads its features for the tiling config.json names")


def load(folder: Path, raw: dict, dtype=None) -> LlavaNext:
    """A transformers LLaVA-NeXT (or LLaVA-NeXT-Video) folder → :class:`LlavaNext` with tokenizer,
    generation defaults and image preprocessing attached."""
    where = str(folder / "config.json")
    reader = open_weights(folder)
    layout = hf_llava.find_layout(reader)
    connector = hf_llava.connector_from_hf(raw, reader, layout, where)
    cfg = config_from_hf(raw, where, connector)
    check_processor_pinpoints(folder, cfg)
    default = "LlavaNextVideoForConditionalGeneration" if cfg.video_token_id is not None else "LlavaNextForConditionalGeneration"
    arch = (raw.get("architectures") or [default])[0]
    model = km.load_into(lambda: LlavaNext(cfg), rules(cfg, layout, newline_key(reader)), reader, f"transformers {arch}",
                         hf_llava.ignorable(cfg, layout, connector[0]), dtype)
    hf_llava.attach_lm_files_to(model, folder)
    attach_processor(model, folder)
    return model
