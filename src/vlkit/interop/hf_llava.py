"""transformers' ``LlavaForConditionalGeneration`` layout: the config translated through the CLIP,
SigLIP and Llama-family translations, and the key map built from their rules under the LLaVA
prefixes. Folders come in several key layouts, found per part from the keys present:

- language model: ``language_model.model.*`` + ``language_model.lm_head.*`` (older transformers,
  and what transformers 5 writes) or ``model.language_model.*`` + ``lm_head.*`` (4.52 to 4.x);
- vision tower: ``[model.]vision_tower.vision_model.*`` or, as transformers 5 writes it,
  ``[model.]vision_tower.*``;
- projector: ``[model.]multi_modal_projector.*``.

Export writes the older layout (``vision_tower.vision_model.*``), which every transformers
version reads."""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from vlkit.config import from_dict
from vlkit.connectors import CONNECTORS
from vlkit.errors import CheckpointError
from vlkit.interop import hf_clip, hf_llama, hf_siglip
from vlkit.interop import keymap as km
from vlkit.interop.common import activation, attach_processor, open_weights, require, section
from vlkit.interop.lm_files import attach_lm_files
from vlkit.interop.weights import WeightReader
from vlkit.lm.llama import LlamaConfig
from vlkit.models.llava import Llava, LlavaConfig
from vlkit.vision.vit import ViTConfig

VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14)
"""The vision tower transformers' ``LlavaConfig`` builds when ``vision_config`` is absent (CLIP ViT-L/14-336)."""
VISION_TYPES = {
    "clip_vision_model": (hf_clip.VISION_DEFAULTS, hf_clip.vision_config),
    "siglip_vision_model": (hf_siglip.VISION_DEFAULTS, hf_siglip.vision_config),
}
TEXT_TYPES = tuple(hf_llama.ARCHITECTURES)
LAYOUT = "transformers LlavaForConditionalGeneration"


@dataclass(frozen=True)
class Layout:
    """Key prefixes (without their dots) of a LLaVA checkpoint's parts."""

    vision: str = "vision_tower.vision_model"
    projector: str = "multi_modal_projector"
    language: str = "language_model.model"
    head: str = "language_model.lm_head"


EXPORT_LAYOUT = Layout()
VISION_PREFIXES = ("vision_tower.vision_model", "vision_tower", "model.vision_tower.vision_model", "model.vision_tower")
PROJECTOR_PREFIXES = ("multi_modal_projector", "model.multi_modal_projector")
LANGUAGE_PREFIXES = {"language_model.model": "language_model.lm_head", "model.language_model": "lm_head"}


def find_layout(reader: WeightReader) -> Layout:
    """Each part's prefix, from the keys present; a :class:`CheckpointError` naming what was looked for."""

    def first(part: str, prefixes, probe: str) -> str:
        for prefix in prefixes:
            if f"{prefix}.{probe}" in reader:
                return prefix
        wanted = ", ".join(f"{p}.{probe}" for p in prefixes)
        raise CheckpointError(f"{reader.describe()}: no LLaVA {part} found; expected one of the keys {wanted}")

    language = first("language model", LANGUAGE_PREFIXES, "embed_tokens.weight")
    return Layout(vision=first("vision tower", VISION_PREFIXES, "embeddings.patch_embedding.weight"),
                  projector=first("projector", PROJECTOR_PREFIXES, "linear_1.weight"),
                  language=language, head=LANGUAGE_PREFIXES[language])


def vision_config_from_hf(raw: dict, where: str) -> ViTConfig:
    """The tower of a VLM config.json's ``vision_config``: CLIP, or SigLIP with or without its
    attention-pooling head (headless, it pools by the mean, which a VLM never reads)."""
    if raw.get("vision_config") is None:
        return hf_clip.vision_config({**hf_clip.VISION_DEFAULTS, **VISION_DEFAULTS}, where)
    require(isinstance(raw["vision_config"], dict), where, f"vision_config must be a mapping, got {raw['vision_config']!r}")
    kind = raw["vision_config"].get("model_type", "clip_vision_model")
    require(kind in VISION_TYPES, where, f"vision_config model_type {kind!r} is not supported; expected one of {list(VISION_TYPES)}")
    defaults, translate = VISION_TYPES[kind]
    v = section(raw, "vision_config", defaults, where)
    if kind == "siglip_vision_model" and not v["vision_use_head"]:
        return dataclasses.replace(translate({**v, "vision_use_head": True}, where), pool="mean")
    return translate(v, where)


def text_config_from_hf(raw: dict, where: str) -> LlamaConfig:
    """The Llama-family LM of a VLM config.json's ``text_config``, tied as transformers' LLaVA ties it."""
    text = {"model_type": "llama", **(raw.get("text_config") or {})}
    require(text["model_type"] in TEXT_TYPES, where,
            f"text_config model_type {text['model_type']!r} is not supported; expected one of {list(TEXT_TYPES)}")
    lm = hf_llama.config_from_hf(text, f"{where} (text_config)")
    tied = bool(raw.get("tie_word_embeddings")) or lm.tie_word_embeddings  # transformers' LlavaConfig rule
    return dataclasses.replace(lm, tie_word_embeddings=tied)


def _identity(reader: WeightReader, prefix: str, bias: bool) -> bool:
    """Whether ``{prefix}.linear_2`` is the identity (an exported linear connector)."""
    weight = reader.get(f"{prefix}.linear_2.weight")
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1] or not torch.equal(weight, torch.eye(weight.shape[0], dtype=weight.dtype)):
        return False
    return not bias or not reader.get(f"{prefix}.linear_2.bias").count_nonzero()


def connector_from_hf(raw: dict, reader: WeightReader, layout: Layout, where: str) -> tuple[str, dict]:
    """``(kind, options)``: the two-layer projector, or, for ``projector_hidden_act: linear`` over an
    identity second layer (what vlkit writes for LLaVA v1's connector), the linear one."""
    act = raw.get("projector_hidden_act", "gelu")
    bias = bool(raw.get("multimodal_projector_bias", True))
    if act == "linear":
        require(_identity(reader, layout.projector, bias), where,
                "projector_hidden_act 'linear' is supported only with an identity linear_2 (a linear connector)")
        return "linear", dict(bias=bias)
    return "mlp", dict(act=activation(act, f"{where}: projector_hidden_act"), bias=bias)


def config_from_hf(raw: dict, where: str, connector: tuple[str, dict] = ("mlp", {})) -> LlavaConfig:
    """A transformers ``llava`` config.json → :class:`LlavaConfig` (``connector`` as found by the loader)."""
    layers = raw.get("vision_feature_layer", -2)
    kind, options = connector
    try:
        return LlavaConfig(
            vision=vision_config_from_hf(raw, where), lm=text_config_from_hf(raw, where), connector=kind,
            connector_options=options,
            vision_feature_layer=tuple(layers) if isinstance(layers, list) else layers,
            vision_feature_select_strategy=raw.get("vision_feature_select_strategy", "default"),
            image_token_id=raw.get("image_token_index", raw.get("image_token_id", 32000)),
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _nest(rules: list[km.Rule], dst: str, source) -> list[km.Rule]:
    return [dataclasses.replace(r, target=f"{dst}.{r.target}", sources=tuple(source(s) for s in r.sources)) for r in rules]


def connector_rules(cfg: LlavaConfig, prefix: str) -> list[km.Rule]:
    """``connector.linear_1`` (and ``linear_2`` for the MLP) ← ``{prefix}.linear_*``, as transformers names them."""
    if cfg.connector not in ("linear", "mlp"):
        raise ValueError(f"the {cfg.connector!r} connector has no place in {LAYOUT} (only 'linear' and 'mlp' have)")
    options = from_dict(CONNECTORS[cfg.connector][0], cfg.connector_options)
    layers = ["linear_1", "linear_2"] if cfg.connector == "mlp" else ["linear_1"]
    params = ["weight", "bias"] if options.bias else ["weight"]
    return [km.copy(f"connector.{n}.{p}", f"{prefix}.{n}.{p}") for n in layers for p in params]


def rules(cfg: LlavaConfig, layout: Layout = EXPORT_LAYOUT) -> list[km.Rule]:
    """vlkit :class:`Llava` ← the checkpoint's keys under ``layout``: the CLIP or SigLIP tower's
    rules, the connector's, and the Llama family's."""
    vision = hf_clip.vision_rules if cfg.vision.class_token else hf_siglip.vision_rules
    language = _nest(hf_llama.rules(cfg.lm, prefix=""), "lm",
                     lambda s: f"{layout.head}{s[len('lm_head'):]}" if s.startswith("lm_head.") else f"{layout.language}.{s}")
    return vision(cfg.vision, dst="vision", src=layout.vision) + connector_rules(cfg, layout.projector) + language


def ignorable(cfg: LlavaConfig, layout: Layout, connector: str):
    """Buffers older versions saved, a tied head's copy, and an exported linear connector's identity layer."""
    skipped = {f"{layout.head}.weight"} if cfg.lm.tie_word_embeddings else set()
    if connector == "linear":
        skipped |= {f"{layout.projector}.linear_2.weight", f"{layout.projector}.linear_2.bias"}

    def ignore(key: str) -> bool:
        return hf_clip.ignorable(key) or key.endswith("rotary_emb.inv_freq") or key in skipped
    return ignore


def attach_lm_files_to(model, folder: Path) -> None:
    """The language model's tokenizer (checked against its vocabulary) and generation defaults,
    set on the VLM as ``model.tokenizer`` and ``model.generation_config``."""
    files = types.SimpleNamespace(config=model.lm.config)
    attach_lm_files(files, folder)
    model.tokenizer, model.generation_config = files.tokenizer, files.generation_config


def load(folder: Path, raw: dict, dtype=None) -> Llava:
    """A transformers LLaVA folder → :class:`Llava` with tokenizer, generation defaults and image
    preprocessing attached."""
    where = str(folder / "config.json")
    reader = open_weights(folder)
    layout = find_layout(reader)
    connector = connector_from_hf(raw, reader, layout, where)
    cfg = config_from_hf(raw, where, connector)
    arch = (raw.get("architectures") or ["LlavaForConditionalGeneration"])[0]
    model = km.load_into(lambda: Llava(cfg), rules(cfg, layout), reader, f"transformers {arch}",
                         ignorable(cfg, layout, connector[0]), dtype)
    attach_lm_files_to(model, folder)
    attach_processor(model, folder)
    return model


def projector_to_hf(model: Llava) -> tuple[dict, dict[str, torch.Tensor], list[str]]:
    """``(config keys, extra tensors, problems)`` for the connector: the MLP as it is; the linear
    connector as the MLP with a linear activation over an identity second layer (the same map)."""
    cfg = model.cfg
    if cfg.connector not in ("linear", "mlp"):
        return {}, {}, [f"connector {cfg.connector!r} (transformers' LLaVA has the 'mlp' projector; 'linear' exports as one)"]
    options = model.connector.config
    problems, extra = [], {}
    if cfg.connector == "mlp":
        if options.hidden not in (None, cfg.lm.hidden_size):
            problems.append(f"connector hidden width {options.hidden} (transformers' projector is {cfg.lm.hidden_size} wide)")
        act = options.act
    else:
        act, width, p = "linear", cfg.lm.hidden_size, EXPORT_LAYOUT.projector
        extra[f"{p}.linear_2.weight"] = torch.eye(width)
        if options.bias:
            extra[f"{p}.linear_2.bias"] = torch.zeros(width)
    return dict(projector_hidden_act=act, multimodal_projector_bias=options.bias), extra, problems
