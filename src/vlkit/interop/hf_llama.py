"""transformers' Llama-family layouts (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``MistralForCausalLM``): config translation both ways and the explicit key map (q|k|v and
gate|up fused into vlkit's single projections)."""

from __future__ import annotations

from pathlib import Path

from vlkit.interop import keymap as km
from vlkit.interop.common import activation, open_weights, require
from vlkit.interop.lm_files import attach_lm_files
from vlkit.lm.llama import LlamaConfig, LlamaLM
from vlkit.nn.rope import ROPE_TYPES, RopeConfig

DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, hidden_act="silu", max_position_embeddings=4096 * 32, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None, sliding_window=4096),
}
"""transformers' config defaults per ``model_type``, for the keys a config.json may leave out."""

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
QWEN2_MAX_WINDOW_LAYERS = 28


def rope_config(raw: dict, where: str) -> RopeConfig:
    """``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (older folders)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    require(isinstance(params, dict), where, f"rope_parameters must be a mapping, got {params!r}")
    require(all(not isinstance(v, dict) for v in params.values()), where,
            "per-layer-type rope_parameters are not supported; expected one set for every layer")
    kind = params.get("rope_type", params.get("type", "default"))
    require(kind in ROPE_TYPES, where, f"rope type {kind!r} is not supported; expected one of {list(ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    require(partial in (None, 1.0), where, f"partial_rotary_factor={partial} is not supported; expected 1.0")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    out = dict(type=kind, theta=float(theta))
    if kind in ("linear", "dynamic", "llama3"):
        require("factor" in params, where, f"{kind} rope scaling needs a 'factor'")
        out["factor"] = float(params["factor"])
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            require(key in params, where, f"llama3 rope scaling needs {key!r}")
            out[key] = float(params[key])
        out["original_max_position_embeddings"] = int(
            raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
            or raw["max_position_embeddings"]
        )
    return RopeConfig(**out)


def _sliding_window(raw: dict, model_type: str, where: str) -> tuple[int | None, int]:
    """``(the window, when any layer attends through one; how many first layers attend to
    everything)``, by transformers' rules per model type."""
    window = raw.get("sliding_window")
    if model_type == "mistral" or window is None:
        return window, 0
    if model_type == "qwen2" and raw.get("use_sliding_window"):
        kinds = raw.get("layer_types") or ["sliding_attention" if i >= raw.get("max_window_layers", QWEN2_MAX_WINDOW_LAYERS)
                                           else "full_attention" for i in range(raw["num_hidden_layers"])]
        if "sliding_attention" not in kinds:
            return None, 0
        full = kinds.index("sliding_attention")
        require(all(k == "sliding_attention" for k in kinds[full:]), where,
                f"layer_types {kinds}: full-attention layers after sliding ones; vlkit represents the first layers full only")
        return window, full
    return None, 0


def config_from_hf(raw: dict, where: str) -> LlamaConfig:
    """A transformers ``llama``/``qwen2``/``mistral`` config.json → :class:`LlamaConfig`."""
    model_type = raw["model_type"]
    c = {**DEFAULTS[model_type], **raw}
    if model_type == "llama":
        qkv_bias = out_bias = bool(c.get("attention_bias", False))
        mlp_bias = bool(c.get("mlp_bias", False))
    else:
        qkv_bias, out_bias, mlp_bias = model_type == "qwen2", False, False
    require(c["hidden_size"] % c["num_attention_heads"] == 0 or c.get("head_dim"), where,
            f"hidden_size {c['hidden_size']} is not divisible by num_attention_heads {c['num_attention_heads']}")
    window, full = _sliding_window(c, model_type, where)
    return LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c.get("num_key_value_heads"), head_dim=c.get("head_dim"),
        hidden_act=activation(c["hidden_act"], f"{where}: hidden_act"), max_position_embeddings=c["max_position_embeddings"],
        rms_norm_eps=c["rms_norm_eps"], tie_word_embeddings=bool(c["tie_word_embeddings"]), rope=rope_config(c, where),
        qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias, sliding_window=window, full_attention_layers=full,
        family=model_type, bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
    )


def rules(cfg: LlamaConfig, prefix: str = "model.") -> list[km.Rule]:
    """vlkit ``LlamaLM`` ← transformers ``*ForCausalLM`` keys (``prefix`` ``""`` for a bare ``LlamaModel``)."""
    hd = cfg.head_dim
    qkv = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_key_value_heads * hd)
    out = [km.copy("embed_tokens.weight", f"{prefix}embed_tokens.weight"), km.copy("norm.weight", f"{prefix}norm.weight")]
    if not cfg.tie_word_embeddings:
        out.append(km.copy("lm_head.weight", "lm_head.weight"))
    params = ["weight"]
    for i in range(cfg.num_hidden_layers):
        d, s = f"layers.{i}", f"{prefix}layers.{i}"
        a, m = f"{s}.self_attn", f"{s}.mlp"
        out += [km.copy(f"{d}.norm1.weight", f"{s}.input_layernorm.weight"),
                km.copy(f"{d}.norm2.weight", f"{s}.post_attention_layernorm.weight")]
        for p in params + (["bias"] if cfg.qkv_bias else []):
            out.append(km.cat(f"{d}.attn.qkv.{p}", f"{a}.q_proj.{p}", f"{a}.k_proj.{p}", f"{a}.v_proj.{p}", splits=qkv))
        for p in params + (["bias"] if cfg.out_bias else []):
            out.append(km.copy(f"{d}.attn.proj.{p}", f"{a}.o_proj.{p}"))
        for p in params + (["bias"] if cfg.mlp_bias else []):
            out += [km.cat(f"{d}.mlp.gate_up.{p}", f"{m}.gate_proj.{p}", f"{m}.up_proj.{p}"),
                    km.copy(f"{d}.mlp.down.{p}", f"{m}.down_proj.{p}")]
    return out


def _ignorable(cfg: LlamaConfig):
    """Keys that carry nothing vlkit needs: rotary buffers older versions saved; a tied head's copy."""
    def ignore(key: str) -> bool:
        return key.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and key == "lm_head.weight")
    return ignore


def load(folder: Path, raw: dict, dtype=None) -> LlamaLM:
    """A transformers Llama/Qwen2/Mistral folder → :class:`LlamaLM` (tokenizer and generation
    defaults attached)."""
    where = str(folder / "config.json")
    cfg = config_from_hf(raw, where)
    reader = open_weights(folder)
    prefix = "model." if any(k.startswith("model.") for k in reader.keys()) else ""
    arch = (raw.get("architectures") or [ARCHITECTURES[cfg.family]])[0]
    model = km.load_into(lambda: LlamaLM(cfg), rules(cfg, prefix), reader, f"transformers {arch}", _ignorable(cfg), dtype)
    attach_lm_files(model, folder)
    return model


def rope_to_hf(rope: RopeConfig) -> dict:
    """transformers 5's ``rope_parameters``."""
    out = {"rope_type": rope.type, "rope_theta": rope.theta}
    if rope.type != "default":
        out["factor"] = rope.factor
    if rope.type == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    return out


def config_to_hf(cfg: LlamaConfig) -> tuple[dict, list[str]]:
    """``(config.json, problems)``: the transformers config for ``cfg.family``, and what that
    architecture cannot express. The rope settings are written both ways (``rope_parameters`` and
    ``rope_theta``/``rope_scaling``) so transformers 4 and 5 read the same model."""
    problems = []
    rope = rope_to_hf(cfg.rope)
    legacy = {k: v for k, v in rope.items() if k != "rope_theta"}
    out = dict(
        architectures=[ARCHITECTURES[cfg.family]], model_type=cfg.family, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope, rope_theta=cfg.rope.theta,
        rope_scaling=None if cfg.rope.type == "default" else legacy,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )
    if cfg.family == "llama":
        if cfg.qkv_bias != cfg.out_bias:
            problems.append(f"qkv_bias={cfg.qkv_bias} with out_bias={cfg.out_bias} (Llama's attention_bias sets both)")
        if cfg.sliding_window is not None:
            problems.append(f"sliding_window={cfg.sliding_window} (Llama has none; family 'mistral' or 'qwen2' has)")
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    else:
        want_qkv = cfg.family == "qwen2"
        if (cfg.qkv_bias, cfg.out_bias, cfg.mlp_bias) != (want_qkv, False, False):
            problems.append(f"biases qkv={cfg.qkv_bias}, out={cfg.out_bias}, mlp={cfg.mlp_bias}; {cfg.family} has "
                            f"qkv={want_qkv}, out=False, mlp=False")
        out["sliding_window"] = cfg.sliding_window
        if cfg.family == "qwen2":  # which layers slide: nothing to vlkit (no sequence runs past the window), all to transformers
            slides = cfg.sliding_window is not None
            out.update(use_sliding_window=slides, max_window_layers=cfg.full_attention_layers if slides else cfg.num_hidden_layers)
    return out, problems
