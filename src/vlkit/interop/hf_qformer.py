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
from vlkit.interop.common import activation, attach_tokenizer, open_weights, require
from vlkit.models.blip2_qformer import Blip2QFormer, Blip2QFormerConfig

QFORMER_DEFAULTS = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, max_position_embeddings=512, layer_norm_eps=1e-12, pad_token_id=0,
    cross_attention_frequency=2, encoder_hidden_size=1408, use_qformer_text_input=False,
)
"""``Blip2QFormerConfig``'s defaults, for keys a config.json leaves out."""
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



def retrieval_rules(cfg: Blip2QFormerConfig, qkv_bias: bool) -> list[km.Rule]:
    """vlkit :class:`Blip2QFormer` ← transformers ``Blip2ForImageTextRetrieval`` keys (the tower's by
    :func:`vlkit.interop.hf_blip2.vision_rules`); the temperature, which transformers lacks, is 1."""
    from vlkit.interop import hf_blip2  # it imports this module

    out = hf_blip2.vision_rules(cfg.vision, qkv_bias) + rules(cfg.qformer, target="qformer.")
    for name in ("vision", "text"):
        out += [km.copy(f"{name}_proj.{p}", f"{name}_projection.{p}") for p in ("weight", "bias")]
    return out + [km.copy(f"itm_head.{p}", f"itm_head.{p}") for p in ("weight", "bias")] + [km.zeros("logit_scale")]


def load_retrieval(folder: Path, raw: dict, dtype=None) -> Blip2QFormer:
    """A transformers ``Blip2ForImageTextRetrieval`` folder → :class:`Blip2QFormer` (ITC with plain
    cosines, as transformers scores them; ITM; no ITG head, which transformers lacks), with its
    tokenizer and image preprocessing."""
    from vlkit.interop import hf_blip2

    where = str(folder / "config.json")
    cfg = Blip2QFormerConfig(vision=hf_blip2.vision_config_from_hf(raw, where), qformer=hf_blip2.qformer_config_from_hf(raw, where, text=True),
                             embed_dim=raw.get("image_text_hidden_size", 256), decoder=False)
    reader = open_weights(folder)
    hf_blip2.check_query_count(reader, cfg.qformer.num_queries, where)
    model = km.load_into(lambda: Blip2QFormer(cfg), retrieval_rules(cfg, hf_blip2.vision_qkv_bias(raw)), reader, RETRIEVAL,
                         lambda key: key.endswith("position_ids"), dtype)
    attach_tokenizer(model, folder, cfg.qformer.max_positions)
    hf_blip2.attach_image_processor(model, folder, cfg.qformer.num_queries)
    return model
