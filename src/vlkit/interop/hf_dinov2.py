"""transformers' DINOv2 layouts (``Dinov2Model``, ``Dinov2WithRegistersModel``): vision only,
layer scale, bicubic position interpolation, the final norm on every token, CLS pooling."""

from __future__ import annotations

from pathlib import Path

from vlkit.interop import keymap as km
from vlkit.interop.common import activation, attach_processor, mlp_ratio, open_weights, require
from vlkit.models.single_tower import VisionEncoder, VisionEncoderConfig
from vlkit.vision.vit import ViTConfig

DEFAULTS = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
    layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3, qkv_bias=True, layerscale_value=1.0,
    use_swiglu_ffn=False, num_register_tokens=0,
)
UNUSED = ("embeddings.mask_token",)
"""Masked-image-modelling token: used only in pre-training, not for features."""


def vision_config(raw: dict, where: str) -> ViTConfig:
    c = {**DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    require(not c["use_swiglu_ffn"], where, "use_swiglu_ffn=true (the SwiGLU MLP of DINOv2-giant) is not supported")
    require(c["num_channels"] == 3, where, f"num_channels={c['num_channels']} is not supported; expected 3")
    width = c["hidden_size"]
    registers = c["num_register_tokens"] if raw["model_type"] == "dinov2_with_registers" else 0
    return ViTConfig(
        image_size=c["image_size"], patch_size=c["patch_size"], width=width, depth=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], mlp_ratio=mlp_ratio(int(width * c["mlp_ratio"]), width),
        act=activation(c["hidden_act"], f"{where}: hidden_act"), eps=c["layer_norm_eps"], class_token=True,
        num_registers=registers, patch_bias=True, pre_norm=False, final_norm="all", pool="cls",
        layer_scale=float(c["layerscale_value"]), pos_antialias=raw["model_type"] == "dinov2_with_registers",
    )


def rules(cfg: ViTConfig, qkv_bias: bool) -> list[km.Rule]:
    """DINOv2 keys → vlkit; without ``qkv_bias`` vlkit's fused qkv bias is held at zero."""
    e = "embeddings"
    out = [
        km.copy("vision.patch_embed.weight", f"{e}.patch_embeddings.projection.weight"),
        km.copy("vision.patch_embed.bias", f"{e}.patch_embeddings.projection.bias"),
        km.copy("vision.cls_token", f"{e}.cls_token"),
        km.copy("vision.pos_embed", f"{e}.position_embeddings"),
        km.copy("vision.norm.weight", "layernorm.weight"),
        km.copy("vision.norm.bias", "layernorm.bias"),
    ]
    if cfg.num_registers:
        out.append(km.copy("vision.registers", f"{e}.register_tokens"))
    for i in range(cfg.depth):
        d, s = f"vision.transformer.blocks.{i}", f"encoder.layer.{i}"
        a = f"{s}.attention.attention"
        out += [
            km.cat(f"{d}.attn.qkv.weight", f"{a}.query.weight", f"{a}.key.weight", f"{a}.value.weight"),
            km.cat(f"{d}.attn.qkv.bias", f"{a}.query.bias", f"{a}.key.bias", f"{a}.value.bias")
            if qkv_bias else km.zeros(f"{d}.attn.qkv.bias"),
            km.copy(f"{d}.ls1.gamma", f"{s}.layer_scale1.lambda1"),
            km.copy(f"{d}.ls2.gamma", f"{s}.layer_scale2.lambda1"),
        ]
        for p in ("weight", "bias"):
            out += [
                km.copy(f"{d}.norm1.{p}", f"{s}.norm1.{p}"),
                km.copy(f"{d}.attn.proj.{p}", f"{s}.attention.output.dense.{p}"),
                km.copy(f"{d}.norm2.{p}", f"{s}.norm2.{p}"),
                km.copy(f"{d}.mlp.fc1.{p}", f"{s}.mlp.fc1.{p}"),
                km.copy(f"{d}.mlp.fc2.{p}", f"{s}.mlp.fc2.{p}"),
            ]
    return out


def load(folder: Path, raw: dict, dtype=None) -> VisionEncoder:
    """A DINOv2 folder → :class:`VisionEncoder` whose ``encode_image`` is the pooler output (normed CLS)."""
    where = str(folder / "config.json")
    vit = vision_config(raw, where)
    cfg = VisionEncoderConfig(vision=vit)
    reader = open_weights(folder)
    qkv_bias = raw.get("qkv_bias", True)
    model = km.load_into(lambda: VisionEncoder(cfg), rules(vit, qkv_bias), reader, f"transformers {raw['model_type']}",
                         lambda k: k in UNUSED, dtype)
    attach_processor(model, folder)
    return model
