"""transformers' ``OPTForCausalLM`` layout: config translation both ways and the explicit key map."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlkit.interop import keymap as km
from vlkit.interop.common import activation, open_weights, require
from vlkit.interop.lm_files import attach_lm_files
from vlkit.lm.opt import OPTConfig, OPTLM

FIELDS = [f.name for f in dataclasses.fields(OPTConfig) if f.name != "remove_final_layer_norm"]
REMOVE_FINAL = "_remove_final_layer_norm"


def config_from_hf(raw: dict, where: str) -> OPTConfig:
    """A transformers ``opt`` config.json → :class:`OPTConfig` (absent keys take transformers' defaults)."""
    values = {k: raw[k] for k in FIELDS if k in raw}
    if "activation_function" in values:
        activation(values["activation_function"], f"{where}: activation_function")
    require(raw.get("hidden_size", OPTConfig.hidden_size) % raw.get("num_attention_heads", OPTConfig.num_attention_heads) == 0,
            where, "hidden_size is not divisible by num_attention_heads")
    return OPTConfig(**values, remove_final_layer_norm=bool(raw.get(REMOVE_FINAL, False)))


def rules(cfg: OPTConfig, prefix: str = "model.decoder.") -> list[km.Rule]:
    """vlkit ``OPTLM`` ← transformers keys (``prefix`` ``"decoder."`` for a bare ``OPTModel``)."""
    p = prefix
    norm_params = ["weight", "bias"] if cfg.layer_norm_elementwise_affine else []
    params = ["weight", "bias"] if cfg.enable_bias else ["weight"]
    out = [km.copy("embed_tokens.weight", f"{p}embed_tokens.weight"),
           km.copy("embed_positions.weight", f"{p}embed_positions.weight")]
    if cfg.word_embed_proj_dim != cfg.hidden_size:
        out += [km.copy("project_in.weight", f"{p}project_in.weight"), km.copy("project_out.weight", f"{p}project_out.weight")]
    if cfg.final_norm:
        out += [km.copy(f"norm.{q}", f"{p}final_layer_norm.{q}") for q in norm_params]
    if not cfg.tie_word_embeddings:
        out.append(km.copy("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.num_hidden_layers):
        d, s = f"layers.{i}", f"{p}layers.{i}"
        a = f"{s}.self_attn"
        out += [km.copy(f"{d}.norm1.{q}", f"{s}.self_attn_layer_norm.{q}") for q in norm_params]
        out += [km.copy(f"{d}.norm2.{q}", f"{s}.final_layer_norm.{q}") for q in norm_params]
        for q in params:
            out += [km.cat(f"{d}.attn.qkv.{q}", f"{a}.q_proj.{q}", f"{a}.k_proj.{q}", f"{a}.v_proj.{q}"),
                    km.copy(f"{d}.attn.proj.{q}", f"{a}.out_proj.{q}"),
                    km.copy(f"{d}.mlp.fc1.{q}", f"{s}.fc1.{q}"),
                    km.copy(f"{d}.mlp.fc2.{q}", f"{s}.fc2.{q}")]
    return out


def load(folder: Path, raw: dict, dtype=None) -> OPTLM:
    """A transformers OPT folder → :class:`OPTLM` (tokenizer and generation defaults attached)."""
    cfg = config_from_hf(raw, str(folder / "config.json"))
    reader = open_weights(folder)
    prefix = "decoder." if not any(k.startswith("model.") for k in reader.keys()) else "model.decoder."
    ignore = (lambda key: key == "lm_head.weight") if cfg.tie_word_embeddings else (lambda key: False)
    arch = (raw.get("architectures") or ["OPTForCausalLM"])[0]
    model = km.load_into(lambda: OPTLM(cfg), rules(cfg, prefix), reader, f"transformers {arch}", ignore, dtype)
    attach_lm_files(model, folder)
    return model


def config_to_hf(cfg: OPTConfig) -> tuple[dict, list[str]]:
    """``(config.json, problems)``: OPT expresses every :class:`OPTConfig`, so no problems."""
    values = {k: getattr(cfg, k) for k in FIELDS}
    return dict(architectures=["OPTForCausalLM"], model_type="opt", **values, **{REMOVE_FINAL: cfg.remove_final_layer_norm}), []
