"""transformers' SigLIP layout (``SiglipModel``): no class token, MAP head, bidirectional text
pooled at the last token, a text head with bias, a learned logit bias."""

from __future__ import annotations

from pathlib import Path

from vlkit.interop import keymap as km
from vlkit.interop.common import attach_processor, attach_tokenizer, hf_text_sizes, hf_vit_sizes, open_weights, require, section
from vlkit.interop.hf_clip import ignorable, layer_rules
from vlkit.models.clip import CLIP, CLIPConfig
from vlkit.text.encoder import TextConfig
from vlkit.vision.vit import ViTConfig

VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True,
)
TEXT_DEFAULTS = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=64, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, projection_size=None,
)


def vision_config(v: dict, where: str) -> ViTConfig:
    require(v["num_channels"] == 3, where, f"num_channels={v['num_channels']} is not supported; expected 3")
    require(v["vision_use_head"], where, "vision_use_head=false (no pooled embedding) is not supported")
    return ViTConfig(**hf_vit_sizes(v, where), class_token=False, patch_bias=True, pre_norm=False, final_norm="all", pool="map")


def text_config(t: dict, where: str) -> TextConfig:
    """Bidirectional, last-token pooled, and (as the reference pipeline) blind to the padding mask."""
    return TextConfig(**hf_text_sizes(t, where), causal=False, pool="last", padding_mask=False)


def model_config(raw: dict, where: str) -> CLIPConfig:
    v = section(raw, "vision_config", VISION_DEFAULTS, where)
    t = section(raw, "text_config", TEXT_DEFAULTS, where)
    embed_dim = t["projection_size"] or t["hidden_size"]
    require(embed_dim == v["hidden_size"], where,
            f"text projection_size {embed_dim} must equal the vision hidden_size {v['hidden_size']} (SigLIP has no image projection)")
    return CLIPConfig(vision=vision_config(v, where), text=text_config(t, where), embed_dim=embed_dim,
                      vision_projection="none", text_projection="linear_bias", loss="sigmoid", logit_bias_init=-10.0)


def rules(cfg: CLIPConfig) -> list[km.Rule]:
    """SigLIP keys → vlkit; the MAP head's packed in-projection splits into q and k|v."""
    out = [
        km.view("logit_scale", "logit_scale", (1,)),
        km.view("logit_bias", "logit_bias", (1,)),
        km.copy("text.token_embed.weight", "text_model.embeddings.token_embedding.weight"),
        km.view("text.pos_embed", "text_model.embeddings.position_embedding.weight", (cfg.text.context_length, cfg.text.width)),
    ]
    for p in ("weight", "bias"):
        out += [km.copy(f"text.norm.{p}", f"text_model.final_layer_norm.{p}"), km.copy(f"text_proj.{p}", f"text_model.head.{p}")]
    return vision_rules(cfg.vision) + out + layer_rules("text", "text_model.", cfg.text.depth)


def vision_rules(cfg: ViTConfig, dst: str = "vision", src: str = "vision_model") -> list[km.Rule]:
    """The SigLIP vision tower at ``src`` (a key prefix without its dot) → vlkit's ``dst`` ViT; the
    attention-pooling head's keys only where the tower has one (``pool="map"``)."""
    v = f"{src}."
    e, h = f"{v}embeddings", f"{v}head"
    out = [
        km.copy(f"{dst}.patch_embed.weight", f"{e}.patch_embedding.weight"),
        km.copy(f"{dst}.patch_embed.bias", f"{e}.patch_embedding.bias"),
        km.view(f"{dst}.pos_embed", f"{e}.position_embedding.weight", (cfg.grid**2, cfg.width)),
    ] + [km.copy(f"{dst}.norm.{p}", f"{v}post_layernorm.{p}") for p in ("weight", "bias")]
    return out + (_head_rules(f"{dst}.head", h, cfg.width) if cfg.pool == "map" else []) + layer_rules(dst, v, cfg.depth)


def _head_rules(dst: str, src: str, width: int) -> list[km.Rule]:
    out = [km.copy(f"{dst}.probe", f"{src}.probe")]
    for p in ("weight", "bias"):
        out += [
            km.copy(f"{dst}.proj.{p}", f"{src}.attention.out_proj.{p}"),
            km.copy(f"{dst}.norm.{p}", f"{src}.layernorm.{p}"),
            km.copy(f"{dst}.mlp.fc1.{p}", f"{src}.mlp.fc1.{p}"),
            km.copy(f"{dst}.mlp.fc2.{p}", f"{src}.mlp.fc2.{p}"),
        ]
    return out + _split_in_proj(dst, f"{src}.attention", width)


def _split_in_proj(dst: str, src: str, width: int) -> list[km.Rule]:
    """``nn.MultiheadAttention``'s packed q|k|v rows: vlkit keeps q alone and k|v packed."""
    out = []
    for p in ("weight", "bias"):
        shape = (3 * width, width) if p == "weight" else (3 * width,)
        out += [
            km.rows(f"{dst}.q.{p}", f"{src}.in_proj_{p}", 0, width, shape),
            km.rows(f"{dst}.kv.{p}", f"{src}.in_proj_{p}", width, 3 * width, shape),
        ]
    return out


def load(folder: Path, raw: dict, dtype=None) -> CLIP:
    """A ``SiglipModel`` folder → :class:`CLIP` with the sigmoid loss's logit bias."""
    cfg = model_config(raw, str(folder / "config.json"))
    reader = open_weights(folder)
    model = km.load_into(lambda: CLIP(cfg), rules(cfg), reader, "transformers SiglipModel", ignorable, dtype)
    attach_tokenizer(model, folder, cfg.text.context_length)
    attach_processor(model, folder)
    return model
