"""transformers' CLIP layout (``CLIPModel``, ``CLIPVisionModel[WithProjection]``,
``CLIPTextModel[WithProjection]``): config translation and the explicit key map."""

from __future__ import annotations

from pathlib import Path

from vlkit.interop import keymap as km
from vlkit.interop.common import attach_processor, attach_tokenizer, hf_text_sizes, hf_vit_sizes, open_weights, require, section
from vlkit.models.clip import CLIP, CLIPConfig
from vlkit.models.single_tower import TextEncoderConfig, TextTower, VisionEncoder, VisionEncoderConfig
from vlkit.text.encoder import TextConfig
from vlkit.vision.vit import ViTConfig

VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
TEXT_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512, num_hidden_layers=12,
    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    eos_token_id=49407,
)
LEGACY_EOS = 2
"""transformers pools at ``argmax(input_ids)`` when ``eos_token_id == 2`` (configs older than its PR #24773)."""


def vision_config(v: dict, where: str) -> ViTConfig:
    """CLIP's vision tower: class token, pre-norm, CLS pooling with the final norm on it, no patch bias."""
    require(v["num_channels"] == 3, where, f"num_channels={v['num_channels']} is not supported; expected 3")
    return ViTConfig(**hf_vit_sizes(v, where), class_token=True, patch_bias=False, pre_norm=True, final_norm="pooled", pool="cls")


def text_config(t: dict, where: str) -> TextConfig:
    """CLIP's text tower: causal, pooled at the first EOS (or at the highest id for legacy configs)."""
    eos = t.get("eos_token_id")
    return TextConfig(**hf_text_sizes(t, where), causal=True, pool="eot", eot_token_id=None if eos == LEGACY_EOS else eos)


def layer_rules(dst: str, prefix: str, depth: int) -> list[km.Rule]:
    """One pre-LN encoder layer per block, q/k/v fused into vlkit's single qkv projection;
    ``prefix`` is the tower's key prefix with its dot (``"vision_model."``) or ``""``."""
    rules = []
    for i in range(depth):
        d, s = f"{dst}.transformer.blocks.{i}", f"{prefix}encoder.layers.{i}"
        a = f"{s}.self_attn"
        for p in ("weight", "bias"):
            rules += [
                km.copy(f"{d}.norm1.{p}", f"{s}.layer_norm1.{p}"),
                km.cat(f"{d}.attn.qkv.{p}", f"{a}.q_proj.{p}", f"{a}.k_proj.{p}", f"{a}.v_proj.{p}"),
                km.copy(f"{d}.attn.proj.{p}", f"{a}.out_proj.{p}"),
                km.copy(f"{d}.norm2.{p}", f"{s}.layer_norm2.{p}"),
                km.copy(f"{d}.mlp.fc1.{p}", f"{s}.mlp.fc1.{p}"),
                km.copy(f"{d}.mlp.fc2.{p}", f"{s}.mlp.fc2.{p}"),
            ]
    return rules


def _prefix(src: str) -> str:
    return f"{src}." if src else ""


def vision_rules(cfg: ViTConfig, dst: str = "vision", src: str = "vision_model") -> list[km.Rule]:
    p = _prefix(src)
    e = f"{p}embeddings"
    n = cfg.grid**2 + 1
    rules = [
        km.copy(f"{dst}.patch_embed.weight", f"{e}.patch_embedding.weight"),
        km.view(f"{dst}.cls_token", f"{e}.class_embedding", (cfg.width,)),
        km.view(f"{dst}.pos_embed", f"{e}.position_embedding.weight", (n, cfg.width)),
    ]
    for q in ("weight", "bias"):
        rules += [km.copy(f"{dst}.norm_pre.{q}", f"{p}pre_layrnorm.{q}"), km.copy(f"{dst}.norm.{q}", f"{p}post_layernorm.{q}")]
    return rules + layer_rules(dst, p, cfg.depth)


def text_rules(cfg: TextConfig, dst: str = "text", src: str = "text_model") -> list[km.Rule]:
    p = _prefix(src)
    rules = [
        km.copy(f"{dst}.token_embed.weight", f"{p}embeddings.token_embedding.weight"),
        km.view(f"{dst}.pos_embed", f"{p}embeddings.position_embedding.weight", (cfg.context_length, cfg.width)),
        km.copy(f"{dst}.norm.weight", f"{p}final_layer_norm.weight"),
        km.copy(f"{dst}.norm.bias", f"{p}final_layer_norm.bias"),
    ]
    return rules + layer_rules(dst, p, cfg.depth)


def ignorable(key: str) -> bool:
    """Buffers older transformers versions saved, which carry no weights."""
    return key.endswith("position_ids")


def _tower_prefix(keys: list[str], name: str) -> str:
    """``vision_model``/``text_model`` when the checkpoint nests the tower, ``""`` when it is the root."""
    return name if any(k.startswith(f"{name}.") for k in keys) else ""


def load(folder: Path, raw: dict, dtype=None):
    """A CLIP-family transformers folder → :class:`CLIP`, :class:`VisionEncoder` or :class:`TextTower`."""
    where = str(folder / "config.json")
    model_type = raw["model_type"]
    reader = open_weights(folder)
    keys = reader.keys()
    arch = (raw.get("architectures") or [""])[0]
    if model_type == "clip":
        v = section(raw, "vision_config", VISION_DEFAULTS, where)
        t = section(raw, "text_config", TEXT_DEFAULTS, where)
        cfg = CLIPConfig(vision=vision_config(v, where), text=text_config(t, where),
                         embed_dim=raw.get("projection_dim", 512))
        rules = vision_rules(cfg.vision) + text_rules(cfg.text) + [
            km.copy("vision_proj.weight", "visual_projection.weight"),
            km.copy("text_proj.weight", "text_projection.weight"),
            km.copy("logit_scale", "logit_scale"),
        ]
        model = km.load_into(lambda: CLIP(cfg), rules, reader, "transformers CLIPModel", ignorable, dtype)
    elif model_type == "clip_vision_model":
        v = {**VISION_DEFAULTS, **raw}
        with_proj = arch.endswith("WithProjection") if arch else "visual_projection.weight" in keys
        cfg = VisionEncoderConfig(vision=vision_config(v, where), embed_dim=v["projection_dim"] if with_proj else None,
                                  vision_projection="linear" if with_proj else "none")
        rules = vision_rules(cfg.vision, src=_tower_prefix(keys, "vision_model"))
        if with_proj:
            rules.append(km.copy("vision_proj.weight", "visual_projection.weight"))
        model = km.load_into(lambda: VisionEncoder(cfg), rules, reader, f"transformers {arch or 'CLIPVisionModel'}", ignorable, dtype)
    else:
        t = {**TEXT_DEFAULTS, **raw}
        with_proj = arch.endswith("WithProjection") if arch else "text_projection.weight" in keys
        cfg = TextEncoderConfig(text=text_config(t, where), embed_dim=t["projection_dim"] if with_proj else None,
                                text_projection="linear" if with_proj else "none")
        rules = text_rules(cfg.text, src=_tower_prefix(keys, "text_model"))
        if with_proj:
            rules.append(km.copy("text_proj.weight", "text_projection.weight"))
        model = km.load_into(lambda: TextTower(cfg), rules, reader, f"transformers {arch or 'CLIPTextModel'}", ignorable, dtype)
    if hasattr(cfg, "text"):
        attach_tokenizer(model, folder, cfg.text.context_length)
    if hasattr(cfg, "vision"):
        attach_processor(model, folder)
    return model
