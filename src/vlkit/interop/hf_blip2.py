"""transformers' BLIP-2 layouts (``model_type`` "blip-2"): ``Blip2ForConditionalGeneration`` and
``Blip2Model`` (the same keys) load as :class:`~vlkit.models.blip2.Blip2`; a
``Blip2ForImageTextRetrieval`` folder goes to the stage-1 loader in :mod:`vlkit.interop.hf_qformer`.

Keys: ``vision_model.*`` (the tower; its ``post_layernorm`` is the Q-Former's ``image_norm``),
``query_tokens``, ``qformer.*``, ``language_projection.*``, ``language_model.*`` (an OPT or
Llama-family ``*ForCausalLM``). The tower's helpers (:func:`vision_config_from_hf`,
:func:`vision_rules`, :func:`qformer_config_from_hf`) serve every BLIP-2 layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlkit.connectors.qformer import QFormerConfig
from vlkit.errors import CheckpointError, VlkitError
from vlkit.interop import hf_clip, hf_llama, hf_opt, hf_qformer
from vlkit.interop import keymap as km
from vlkit.interop.common import attach_processor, hf_vit_sizes, open_weights, read_json, require, section
from vlkit.interop.hf_llava import attach_lm_files_to
from vlkit.interop.weights import WeightReader
from vlkit.models.blip2 import Blip2, Blip2Config
from vlkit.vision.preprocess import ImageProcessor
from vlkit.vision.vit import ViTConfig

VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
                       patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, num_channels=3)
"""``Blip2VisionConfig``'s defaults, for keys a config.json leaves out."""
ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2Model")
RETRIEVAL = "Blip2ForImageTextRetrieval"
LM_PREFIX = "language_model."
PROCESSOR_CONFIG = "processor_config.json"


def vision_config_from_hf(raw: dict, where: str) -> ViTConfig:
    """The tower of a ``Blip2Config`` dict: class token, patch bias, no pre-norm (its final norm is
    the Q-Former's ``image_norm``)."""
    v = section(raw, "vision_config", VISION_DEFAULTS, where)
    for key in ("image_size", "patch_size"):
        require(isinstance(v[key], int), where, f"vision_config {key} {v[key]!r} is not supported; expected one integer")
    return ViTConfig(**hf_vit_sizes(v, where), class_token=True, patch_bias=True, pre_norm=False, final_norm="all", pool="cls")


def vision_qkv_bias(raw: dict) -> bool:
    return bool(section(raw, "vision_config", VISION_DEFAULTS, "config.json")["qkv_bias"])


def qformer_config_from_hf(raw: dict, where: str, text: bool = False) -> QFormerConfig:
    """The Q-Former of a ``Blip2Config`` dict: ``num_query_tokens`` queries over the tower's width,
    with the tower's ``post_layernorm`` as ``image_norm``; ``text`` builds the text path (stage 1)."""
    q = section(raw, "qformer_config", hf_qformer.QFORMER_DEFAULTS, where)
    v = section(raw, "vision_config", VISION_DEFAULTS, where)
    q["encoder_hidden_size"] = v["hidden_size"]  # Blip2Config's rule, whatever the sub-config says
    q["use_qformer_text_input"] = text
    queries = raw.get("num_query_tokens", 32)
    require(isinstance(queries, int) and queries > 0, where, f"num_query_tokens must be a positive integer, got {queries!r}")
    return hf_qformer.model_config(q, where, num_queries=queries, image_norm_eps=v["layer_norm_eps"])


def vision_rules(cfg: ViTConfig, qkv_bias: bool = True, dst: str = "vision", src: str = "vision_model") -> list[km.Rule]:
    """vlkit tower ``{dst}`` ← transformers ``Blip2VisionModel`` keys under ``{src}`` (without its
    ``post_layernorm``, which :func:`hf_qformer.rules` maps to the Q-Former)."""
    e = f"{src}.embeddings"
    rules = [
        km.copy(f"{dst}.patch_embed.weight", f"{e}.patch_embedding.weight"),
        km.copy(f"{dst}.patch_embed.bias", f"{e}.patch_embedding.bias"),
        km.copy(f"{dst}.cls_token", f"{e}.class_embedding"),
        km.copy(f"{dst}.pos_embed", f"{e}.position_embedding"),
    ]
    for i in range(cfg.depth):
        d, s = f"{dst}.transformer.blocks.{i}", f"{src}.encoder.layers.{i}"
        rules.append(km.copy(f"{d}.attn.qkv.bias", f"{s}.self_attn.qkv.bias") if qkv_bias else km.zeros(f"{d}.attn.qkv.bias"))
        rules.append(km.copy(f"{d}.attn.qkv.weight", f"{s}.self_attn.qkv.weight"))
        for p in ("weight", "bias"):
            rules += [
                km.copy(f"{d}.norm1.{p}", f"{s}.layer_norm1.{p}"),
                km.copy(f"{d}.attn.proj.{p}", f"{s}.self_attn.projection.{p}"),
                km.copy(f"{d}.norm2.{p}", f"{s}.layer_norm2.{p}"),
                km.copy(f"{d}.mlp.fc1.{p}", f"{s}.mlp.fc1.{p}"),
                km.copy(f"{d}.mlp.fc2.{p}", f"{s}.mlp.fc2.{p}"),
            ]
    return rules


def lm_config_from_hf(raw: dict, where: str):
    """``(lm_type, config)`` of the ``text_config``: OPT, or a Llama-family decoder."""
    text = {"model_type": "opt", **(raw.get("text_config") or {})}
    kind = text["model_type"]
    if kind == "opt":
        return "opt", hf_opt.config_from_hf(text, f"{where} (text_config)")
    if kind in hf_llama.ARCHITECTURES:
        return "llama", hf_llama.config_from_hf(text, f"{where} (text_config)")
    raise ValueError(f"{where}: text_config model_type {kind!r} is not supported; vlkit's BLIP-2 takes a decoder-only "
                     f"LM: one of {['opt', *hf_llama.ARCHITECTURES]} (the Flan-T5 variants are encoder-decoders)")


def config_from_hf(raw: dict, where: str) -> Blip2Config:
    """A transformers ``blip-2`` config.json → :class:`Blip2Config`."""
    lm_type, lm = lm_config_from_hf(raw, where)
    image_token = raw.get("image_token_index", raw.get("image_token_id"))
    require(isinstance(image_token, int), where,
            f"image_token_index is {image_token!r}; expected the id of the image token the processor writes "
            "(folders from before transformers 4.47 lack it: add the id of the tokenizer's '<image>')")
    try:
        return Blip2Config(vision=vision_config_from_hf(raw, where), qformer=qformer_config_from_hf(raw, where), lm=lm,
                           lm_type=lm_type, image_token_id=image_token)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _nest_lm(rules: list[km.Rule]) -> list[km.Rule]:
    return [dataclasses.replace(r, target=f"lm.{r.target}", sources=tuple(LM_PREFIX + s for s in r.sources)) for r in rules]


def rules(cfg: Blip2Config, qkv_bias: bool = True) -> list[km.Rule]:
    """vlkit :class:`Blip2` ← transformers ``Blip2ForConditionalGeneration`` / ``Blip2Model`` keys."""
    lm = hf_opt.rules(cfg.lm, "model.decoder.") if cfg.lm_type == "opt" else hf_llama.rules(cfg.lm, "model.")
    projection = [km.copy(f"language_projection.{p}", f"language_projection.{p}") for p in ("weight", "bias")]
    return vision_rules(cfg.vision, qkv_bias) + hf_qformer.rules(cfg.qformer, target="qformer.") + projection + _nest_lm(lm)


def _ignorable(cfg: Blip2Config):
    """Buffers older versions saved, and a tied head's copy."""
    head = f"{LM_PREFIX}lm_head.weight"

    def ignore(key: str) -> bool:
        return hf_clip.ignorable(key) or key.endswith("rotary_emb.inv_freq") or (cfg.lm.tie_word_embeddings and key == head)
    return ignore


def check_query_count(reader: WeightReader, num_queries: int, where: str) -> None:
    """``query_tokens`` must hold the config's ``num_query_tokens`` queries: said plainly, before a shape error."""
    if "query_tokens" not in reader:
        return
    shape = tuple(reader.get("query_tokens").shape)
    if len(shape) == 3 and shape[1] != num_queries:
        raise CheckpointError(f"{reader.file('query_tokens')}: query_tokens holds {shape[1]} queries {shape}, but {where} "
                              f"says num_query_tokens={num_queries}; the config does not describe these weights")


def load(folder: Path, raw: dict, dtype=None):
    """A transformers BLIP-2 folder → :class:`Blip2` (tokenizer, generation defaults and image
    preprocessing attached), or the stage-1 model for ``Blip2ForImageTextRetrieval``."""
    where = str(folder / "config.json")
    reader = open_weights(folder)
    arch = (raw.get("architectures") or [""])[0]
    if arch == RETRIEVAL or (not arch and "itm_head.weight" in reader):
        retrieval = getattr(hf_qformer, "load_retrieval", None)
        if retrieval is None:
            raise VlkitError(f"{where}: vlkit cannot load {RETRIEVAL} folders yet")
        return retrieval(folder, raw, dtype)
    if arch not in ("", *ARCHITECTURES):
        raise VlkitError(f"{where}: architectures {arch!r} is not supported; vlkit loads {[*ARCHITECTURES, RETRIEVAL]}")
    cfg = config_from_hf(raw, where)
    check_query_count(reader, cfg.num_query_tokens, where)
    model = km.load_into(lambda: Blip2(cfg), rules(cfg, vision_qkv_bias(raw)), reader, f"transformers {arch or ARCHITECTURES[0]}",
                         _ignorable(cfg), dtype)
    attach_lm_files_to(model, folder)
    attach_image_processor(model, folder, cfg.num_query_tokens)
    return model


def attach_image_processor(model, folder: Path, num_queries: int) -> None:
    """``preprocessor_config.json``, else the ``image_processor`` part of the ``processor_config.json``
    transformers 5 writes (whose ``num_query_tokens`` must be the model's)."""
    path = folder / PROCESSOR_CONFIG
    nested = read_json(path) if path.is_file() else {}
    if nested.get("num_query_tokens") not in (None, num_queries):
        raise CheckpointError(f"{path}: num_query_tokens is {nested['num_query_tokens']} but config.json's is {num_queries}; "
                              "the processor would write a different number of image tokens than the model reads")
    if not (folder / "preprocessor_config.json").is_file() and isinstance(nested.get("image_processor"), dict):
        model.processor = ImageProcessor.from_hf(nested["image_processor"])
        model.processor.alpha_background = 255  # transparency onto white, as transformers converts to RGB
        return
    attach_processor(model, folder)


def config_to_hf(model: Blip2) -> tuple[dict, list[str]]:
    """``(config.json, problems)`` for transformers' ``Blip2ForConditionalGeneration``: what its tower,
    Q-Former and LM cannot express is named in ``problems``."""
    c = model.cfg
    v, q = c.vision, c.qformer
    problems = [f"vision.{k} is {getattr(v, k)!r}, {want!r} needed" for k, want in
                dict(class_token=True, num_registers=0, patch_bias=True, pre_norm=False, pool="cls", layer_scale=None,
                     stem_channels=()).items() if getattr(v, k) != want]
    if not q.image_norm:
        problems.append("qformer.image_norm is false (transformers' tower always ends in post_layernorm)")
    if q.text:
        problems.append("qformer.text is true (Blip2ForConditionalGeneration's Q-Former has no text path)")
    layout = hf_opt if c.lm_type == "opt" else hf_llama
    text, more = layout.config_to_hf(c.lm)
    vision = dict(hidden_size=v.width, intermediate_size=int(round(v.width * v.mlp_ratio)), num_hidden_layers=v.depth,
                  num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.act,
                  layer_norm_eps=q.image_norm_eps, qkv_bias=True)
    if q.image_norm and q.image_norm_eps != v.eps:
        problems.append(f"qformer.image_norm_eps {q.image_norm_eps} differs from vision.eps {v.eps} (transformers has one layer_norm_eps)")
    qformer = dict(hidden_size=q.width, num_hidden_layers=q.depth, num_attention_heads=q.num_heads, intermediate_size=q.mlp_dim,
                   hidden_act=q.act, hidden_dropout_prob=q.dropout, layer_norm_eps=q.eps, cross_attention_frequency=q.cross_attention_every,
                   encoder_hidden_size=v.width, vocab_size=q.vocab_size, max_position_embeddings=q.max_positions,
                   pad_token_id=q.pad_token_id)
    config = dict(architectures=[ARCHITECTURES[0]], model_type="blip-2", vision_config=vision, qformer_config=qformer,
                  text_config={k: val for k, val in text.items() if k != "architectures"}, num_query_tokens=q.num_queries,
                  image_token_index=c.image_token_id, use_decoder_only_language_model=True)
    return config, problems + more
