"""transformers' BLIP-2 Q-Former layout (``Blip2QFormerModel`` and where BLIP-2 models keep its
neighbours): config translation and the key map to :class:`~vlkit.connectors.qformer.QFormer`.

In a BLIP-2 folder the Q-Former's parts live under several roots: ``qformer.*`` (the layers and
the embedding LayerNorm), ``query_tokens``, ``embeddings.*`` (word and position embeddings, in
retrieval models only) and ``vision_model.post_layernorm`` (the image features' LayerNorm).
:func:`rules` takes each root as an argument, so the same map serves a bare ``Blip2QFormerModel``
and a Q-Former nested inside a larger vlkit model (``target``)."""

from __future__ import annotations

from pathlib import Path

from vlkit.connectors.qformer import QFormerConfig
from vlkit.interop import keymap as km
from vlkit.interop.common import activation, attach_processor, attach_tokenizer, hf_vit_sizes, open_weights, require, section
from vlkit.models.blip2_qformer import Blip2QFormer, Blip2QFormerConfig
from vlkit.vision.vit import ViTConfig

QFORMER_DEFAULTS = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, max_position_embeddings=512, layer_norm_eps=1e-12, pad_token_id=0,
    cross_attention_frequency=2, encoder_hidden_size=1408, use_qformer_text_input=False,
)
"""``Blip2QFormerConfig``'s defaults, for keys a config.json leaves out."""
VISION_DEFAULTS = dict(
    hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224, patch_size=14,
    hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
)
"""``Blip2VisionConfig``'s defaults (EVA ViT-g/14 without its last layer)."""
RETRIEVAL = "transformers Blip2ForImageTextRetrieval"


def model_config(q: dict, where: str, *, num_queries: int = 32, image_norm_eps: float | None = None) -> QFormerConfig:
    """A ``Blip2QFormerConfig`` dict → :class:`QFormerConfig`. ``num_queries`` comes from the
    enclosing ``Blip2Config`` (``num_query_tokens``); ``image_norm_eps`` from its vision config's
    ``layer_norm_eps`` when the image features' LayerNorm belongs to the Q-Former (``None``: none)."""
    pad_token_id = q.get("pad_token_id", QFORMER_DEFAULTS["pad_token_id"])
    q = {**QFORMER_DEFAULTS, **{k: v for k, v in q.items() if v is not None}}
    require(q["hidden_size"] % q["num_attention_heads"] == 0, where,
            f"qformer hidden_size {q['hidden_size']} is not divisible by num_attention_heads {q['num_attention_heads']}")
    return QFormerConfig(
        width=q["hidden_size"], depth=q["num_hidden_layers"], num_heads=q["num_attention_heads"], mlp_dim=q["intermediate_size"],
        num_queries=num_queries, context_dim=q["encoder_hidden_size"], cross_attention_every=q["cross_attention_frequency"],
        act=activation(q["hidden_act"], f"{where}: qformer hidden_act"), eps=q["layer_norm_eps"], dropout=q["hidden_dropout_prob"],
        image_norm=image_norm_eps is not None,
        image_norm_eps=QFormerConfig.image_norm_eps if image_norm_eps is None else image_norm_eps, text=q["use_qformer_text_input"],
        vocab_size=q["vocab_size"], max_positions=q["max_position_embeddings"], pad_token_id=pad_token_id,
    )


def rules(
    cfg: QFormerConfig,
    *,
    target: str = "",
    qformer: str = "qformer.",
    embeddings: str = "embeddings.",
    query_tokens: str = "query_tokens",
    image_norm: str = "vision_model.post_layernorm",
) -> list[km.Rule]:
    """transformers keys → vlkit ``{target}`` parameters. BERT's separate query/key/value
    Linears become the fused ``qkv`` rows (self-attention) or ``q`` and ``kv`` (cross-attention)."""
    out = [km.copy(f"{target}query_tokens", query_tokens)]
    for p in ("weight", "bias"):
        out.append(km.copy(f"{target}embed_norm.{p}", f"{qformer}layernorm.{p}"))
        if cfg.image_norm:
            out.append(km.copy(f"{target}image_norm.{p}", f"{image_norm}.{p}"))
    if cfg.text:
        out += [
            km.copy(f"{target}word_embed.weight", f"{embeddings}word_embeddings.weight"),
            km.copy(f"{target}pos_embed.weight", f"{embeddings}position_embeddings.weight"),
        ]
    for i in range(cfg.depth):
        out += _layer_rules(cfg, i, f"{target}layers.{i}.", f"{qformer}encoder.layer.{i}.")
    return out


def _layer_rules(cfg: QFormerConfig, i: int, t: str, s: str) -> list[km.Rule]:
    cross = i % cfg.cross_attention_every == 0
    out = []
    for p in ("weight", "bias"):
        sa, ca = f"{s}attention.attention", f"{s}crossattention.attention"
        out += [
            km.cat(f"{t}attn.qkv.{p}", f"{sa}.query.{p}", f"{sa}.key.{p}", f"{sa}.value.{p}"),
            km.copy(f"{t}attn.proj.{p}", f"{s}attention.output.dense.{p}"),
            km.copy(f"{t}attn_norm.{p}", f"{s}attention.output.LayerNorm.{p}"),
            km.copy(f"{t}query_mlp.fc1.{p}", f"{s}intermediate_query.dense.{p}"),
            km.copy(f"{t}query_mlp.fc2.{p}", f"{s}output_query.dense.{p}"),
            km.copy(f"{t}query_norm.{p}", f"{s}output_query.LayerNorm.{p}"),
        ]
        if cross:
            out += [
                km.copy(f"{t}cross.q.{p}", f"{ca}.query.{p}"),
                km.cat(f"{t}cross.kv.{p}", f"{ca}.key.{p}", f"{ca}.value.{p}"),
                km.copy(f"{t}cross.proj.{p}", f"{s}crossattention.output.dense.{p}"),
                km.copy(f"{t}cross_norm.{p}", f"{s}crossattention.output.LayerNorm.{p}"),
            ]
        if cfg.text:
            out += [
                km.copy(f"{t}text_mlp.fc1.{p}", f"{s}intermediate.dense.{p}"),
                km.copy(f"{t}text_mlp.fc2.{p}", f"{s}output.dense.{p}"),
                km.copy(f"{t}text_norm.{p}", f"{s}output.LayerNorm.{p}"),
            ]
    return out


def vision_config(v: dict, where: str) -> ViTConfig:
    """transformers' ``Blip2VisionModel``: class token and patch bias, no LayerNorm before the layers;
    ``post_layernorm`` normalises every token, but it is the Q-Former's ``image_norm`` that applies
    it (see :func:`rules`), so the tower's tokens come out un-normed (``final_norm="pooled"``)."""
    return ViTConfig(**hf_vit_sizes(v, where), class_token=True, patch_bias=True, pre_norm=False, final_norm="pooled", pool="cls")


def vision_rules(cfg: ViTConfig, qkv_bias: bool = True, dst: str = "vision", src: str = "vision_model") -> list[km.Rule]:
    """``Blip2VisionModel`` keys (under ``src``) → vlkit :class:`~vlkit.vision.vit.ViT` (under ``dst``).
    transformers 5 saves the fused ``self_attn.qkv.bias`` (q | zeros | v); without ``qkv_bias`` it has none."""
    e = f"{src}.embeddings"
    out = [
        km.copy(f"{dst}.patch_embed.weight", f"{e}.patch_embedding.weight"),
        km.copy(f"{dst}.patch_embed.bias", f"{e}.patch_embedding.bias"),
        km.copy(f"{dst}.cls_token", f"{e}.class_embedding"),
        km.copy(f"{dst}.pos_embed", f"{e}.position_embedding"),
    ]
    for p in ("weight", "bias"):
        out.append(km.copy(f"{dst}.norm.{p}", f"{src}.post_layernorm.{p}"))
    for i in range(cfg.depth):
        d, s = f"{dst}.transformer.blocks.{i}", f"{src}.encoder.layers.{i}"
        out.append(km.copy(f"{d}.attn.qkv.weight", f"{s}.self_attn.qkv.weight"))
        out.append(km.copy(f"{d}.attn.qkv.bias", f"{s}.self_attn.qkv.bias") if qkv_bias else km.zeros(f"{d}.attn.qkv.bias"))
        for p in ("weight", "bias"):
            out += [
                km.copy(f"{d}.norm1.{p}", f"{s}.layer_norm1.{p}"),
                km.copy(f"{d}.attn.proj.{p}", f"{s}.self_attn.projection.{p}"),
                km.copy(f"{d}.norm2.{p}", f"{s}.layer_norm2.{p}"),
                km.copy(f"{d}.mlp.fc1.{p}", f"{s}.mlp.fc1.{p}"),
                km.copy(f"{d}.mlp.fc2.{p}", f"{s}.mlp.fc2.{p}"),
            ]
    return out


def retrieval_config(raw: dict, where: str) -> tuple[Blip2QFormerConfig, bool]:
    """A ``Blip2ForImageTextRetrieval`` config.json → the stage-1 model's config (no ITG head:
    transformers has none) and whether the vision attention has a q/v bias."""
    v = section(raw, "vision_config", VISION_DEFAULTS, where)
    q = section(raw, "qformer_config", {}, where)
    q.setdefault("encoder_hidden_size", v["hidden_size"])
    require(q.get("use_qformer_text_input", True), where, "qformer_config.use_qformer_text_input is false; a retrieval model needs the text path")
    num_queries = raw.get("num_query_tokens", 32)
    qcfg = model_config({**q, "use_qformer_text_input": True}, where, num_queries=num_queries, image_norm_eps=v["layer_norm_eps"])
    cfg = Blip2QFormerConfig(vision=vision_config(v, where), qformer=qcfg, embed_dim=raw.get("image_text_hidden_size", 256),
                             vision_layer=-1, decoder=False)
    return cfg, bool(v["qkv_bias"])


def retrieval_rules(cfg: Blip2QFormerConfig, qkv_bias: bool) -> list[km.Rule]:
    out = vision_rules(cfg.vision, qkv_bias) + rules(cfg.qformer, target="qformer.")
    for name in ("vision_projection", "text_projection"):
        for p in ("weight", "bias"):
            out.append(km.copy(f"{name.replace('projection', 'proj')}.{p}", f"{name}.{p}"))
    out += [km.copy("itm_head.weight", "itm_head.weight"), km.copy("itm_head.bias", "itm_head.bias"), km.zeros("logit_scale")]
    return out


def load_retrieval(folder: Path, raw: dict, dtype=None) -> Blip2QFormer:
    """A transformers ``Blip2ForImageTextRetrieval`` folder → :class:`Blip2QFormer` (ITC with plain
    cosines, as transformers scores them; ITM; no captions), with its BERT tokenizer and preprocessing."""
    where = str(folder / "config.json")
    cfg, qkv_bias = retrieval_config(raw, where)
    reader = open_weights(folder)
    model = km.load_into(lambda: Blip2QFormer(cfg), retrieval_rules(cfg, qkv_bias), reader, RETRIEVAL,
                         lambda key: key.endswith("position_ids"), dtype)
    attach_tokenizer(model, folder, cfg.qformer.max_positions)
    attach_processor(model, folder)
    return model
