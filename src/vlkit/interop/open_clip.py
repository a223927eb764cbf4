"""OpenCLIP's layout (``open_clip_config.json`` + ``open_clip_model.safetensors`` or ``.bin``),
whose keys are OpenAI's original CLIP names (``visual.transformer.resblocks.N.attn.in_proj_weight``).
Only the ViT + text-transformer towers; ResNet, timm and HF-text towers are refused by name."""

from __future__ import annotations

from pathlib import Path

from vlkit.interop import keymap as km
from vlkit.interop.common import attach_processor, attach_tokenizer, open_weights, read_json, require
from vlkit.models.clip import CLIP, CLIPConfig
from vlkit.text.encoder import TextConfig
from vlkit.vision.preprocess import CLIP_MEAN, CLIP_STD, ImageProcessor
from vlkit.vision.vit import ViTConfig

CONFIG = "open_clip_config.json"
WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")
VISION_DEFAULTS = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224,
                       ls_init_value=None, no_ln_pre=False, pool_type="tok", final_ln_after_pool=False,
                       attentional_pool=False, timm_model_name=None)
TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0,
                     ls_init_value=None, hf_model_name=None, pool_type="argmax", proj_bias=False, proj_type="linear",
                     no_causal_mask=False, embed_cls=False)
UNUSED = ("attn_mask", "input_resolution", "context_length", "vocab_size")
"""Buffers and sizes OpenAI's original state dicts carry next to the weights."""
EPS = 1e-5
"""OpenCLIP's LayerNorm eps (it has no config key in the standard towers)."""
RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def model_config(cfg: dict, where: str, has_text_linear: bool) -> CLIPConfig:
    """``model_cfg`` → :class:`CLIPConfig`, refusing any switch vlkit would get wrong."""
    m = cfg.get("model_cfg")
    require(isinstance(m, dict), where, "expected a 'model_cfg' mapping")
    v = {**VISION_DEFAULTS, **(m.get("vision_cfg") or {})}
    t = {**TEXT_DEFAULTS, **(m.get("text_cfg") or {})}
    require(v["timm_model_name"] is None, where, f"timm vision towers ({v['timm_model_name']!r}) are not supported")
    require(isinstance(v["layers"], int), where, "ResNet vision towers (vision_cfg.layers is a list) are not supported")
    require(not v["attentional_pool"], where, "vision_cfg.attentional_pool is not supported")
    require(v["pool_type"] in ("tok", "avg"), where, f"vision_cfg.pool_type {v['pool_type']!r}; expected 'tok' or 'avg'")
    require(t["hf_model_name"] is None, where, f"transformers text towers ({t['hf_model_name']!r}) are not supported")
    require(not t["embed_cls"], where, "text_cfg.embed_cls is not supported")
    require(t["ls_init_value"] is None, where, "text_cfg.ls_init_value (text layer scale) is not supported")
    require(t["pool_type"] in ("argmax", "last"), where, f"text_cfg.pool_type {t['pool_type']!r}; expected 'argmax' or 'last'")
    require(t["proj_type"] == "linear", where, f"text_cfg.proj_type {t['proj_type']!r}; expected 'linear'")
    act = "quick_gelu" if m.get("quick_gelu", False) else "gelu"
    size = v["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    vision = ViTConfig(
        image_size=size, patch_size=v["patch_size"], width=v["width"], depth=v["layers"],
        num_heads=v["width"] // v["head_width"], mlp_ratio=float(v["mlp_ratio"]), act=act, eps=EPS, class_token=True,
        patch_bias=False, pre_norm=not v["no_ln_pre"], final_norm="pooled" if v["pool_type"] == "tok" else "all",
        pool="cls" if v["pool_type"] == "tok" else "mean", layer_scale=v["ls_init_value"],
    )
    text = TextConfig(
        vocab_size=t["vocab_size"], context_length=t["context_length"], width=t["width"], depth=t["layers"],
        num_heads=t["heads"], mlp_ratio=float(t["mlp_ratio"]), act=act, eps=EPS, causal=not t["no_causal_mask"],
        pool="eot" if t["pool_type"] == "argmax" else "last",
    )
    text_proj = "linear_bias" if t["proj_bias"] else "linear"
    return CLIPConfig(vision=vision, text=text, embed_dim=m.get("embed_dim", 512), text_projection=text_proj,
                      loss="sigmoid" if m.get("init_logit_bias") is not None else "softmax",
                      logit_bias_init=m.get("init_logit_bias"))


def block_rules(dst: str, src: str, depth: int, layer_scale: bool) -> list[km.Rule]:
    """OpenAI's resblocks: ``nn.MultiheadAttention`` packs q|k|v exactly as vlkit's qkv does."""
    rules = []
    for i in range(depth):
        d, s = f"{dst}.transformer.blocks.{i}", f"{src}.resblocks.{i}"
        for p in ("weight", "bias"):
            rules += [
                km.copy(f"{d}.norm1.{p}", f"{s}.ln_1.{p}"),
                km.copy(f"{d}.attn.qkv.{p}", f"{s}.attn.in_proj_{p}"),
                km.copy(f"{d}.attn.proj.{p}", f"{s}.attn.out_proj.{p}"),
                km.copy(f"{d}.norm2.{p}", f"{s}.ln_2.{p}"),
                km.copy(f"{d}.mlp.fc1.{p}", f"{s}.mlp.c_fc.{p}"),
                km.copy(f"{d}.mlp.fc2.{p}", f"{s}.mlp.c_proj.{p}"),
            ]
        if layer_scale:
            rules += [km.copy(f"{d}.ls1.gamma", f"{s}.ls_1.gamma"), km.copy(f"{d}.ls2.gamma", f"{s}.ls_2.gamma")]
    return rules


def rules(cfg: CLIPConfig) -> list[km.Rule]:
    v, t = cfg.vision, cfg.text
    out = [
        km.copy("vision.patch_embed.weight", "visual.conv1.weight"),
        km.view("vision.cls_token", "visual.class_embedding", (v.width,)),
        km.view("vision.pos_embed", "visual.positional_embedding", (v.grid**2 + 1, v.width)),
        km.transposed("vision_proj.weight", "visual.proj"),
        km.copy("text.token_embed.weight", "token_embedding.weight"),
        km.view("text.pos_embed", "positional_embedding", (t.context_length, t.width)),
        km.copy("logit_scale", "logit_scale"),
    ]
    if cfg.text_projection == "linear_bias":
        out += [km.copy("text_proj.weight", "text_projection.weight"), km.copy("text_proj.bias", "text_projection.bias")]
    else:
        out.append(km.transposed("text_proj.weight", "text_projection"))
    if cfg.logit_bias_init is not None:
        out.append(km.copy("logit_bias", "logit_bias"))
    for p in ("weight", "bias"):
        if v.pre_norm:
            out.append(km.copy(f"vision.norm_pre.{p}", f"visual.ln_pre.{p}"))
        out += [km.copy(f"vision.norm.{p}", f"visual.ln_post.{p}"), km.copy(f"text.norm.{p}", f"ln_final.{p}")]
    out += block_rules("vision", "visual.transformer", v.depth, v.layer_scale is not None)
    return out + block_rules("text", "transformer", t.depth, False)


def processor(cfg: dict, image_size: int) -> ImageProcessor:
    """``preprocess_cfg`` → :class:`ImageProcessor` (OpenCLIP resizes the shortest side, then crops)."""
    p = cfg.get("preprocess_cfg") or {}
    mode = p.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"{CONFIG}: preprocess_cfg.resize_mode {mode!r} is not supported; expected 'shortest' or 'squash'")
    interpolation = p.get("interpolation", "bicubic")
    if interpolation not in RESAMPLE:
        raise ValueError(f"{CONFIG}: preprocess_cfg.interpolation {interpolation!r}; expected one of {sorted(RESAMPLE)}")
    size = p.get("size", image_size)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return ImageProcessor(
        size=size, crop_size=size if mode == "shortest" else None, resize_mode="shortest_edge" if mode == "shortest" else "exact",
        resample=RESAMPLE[interpolation], mean=tuple(p.get("mean", CLIP_MEAN)), std=tuple(p.get("std", CLIP_STD)),
        alpha_background=255,
    )


def load(folder: Path, dtype=None) -> CLIP:
    """An OpenCLIP folder → :class:`CLIP` (tokenizer from ``tokenizer.json`` where the folder has one)."""
    cfg_file = folder / CONFIG
    raw = read_json(cfg_file)
    reader = open_weights(folder, WEIGHTS)
    cfg = model_config(raw, str(cfg_file), "text_projection.weight" in reader)
    model = km.load_into(lambda: CLIP(cfg), rules(cfg), reader, "OpenCLIP", lambda k: k in UNUSED, dtype)
    attach_tokenizer(model, folder, cfg.text.context_length)
    attach_processor(model, folder, fallback=processor(raw, cfg.vision.image_size))
    return model
