"""Export vlkit models to transformers (``CLIPModel``, ``SiglipModel``, CLIP one-tower models,
``Dinov2Model``, ``LlamaForCausalLM``/``Qwen2ForCausalLM``/``MistralForCausalLM``, ``OPTForCausalLM``,
``LlavaForConditionalGeneration``, ``Blip2ForConditionalGeneration``)
and OpenCLIP folders: the loaders' key maps run backwards, and every config
switch the target cannot express is refused by name rather than exported approximately."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlkit.errors import VlkitError
from vlkit.files import atomic_folder
from vlkit.interop import hf_blip2, hf_clip, hf_dinov2, hf_llama, hf_llava, hf_opt, hf_siglip, open_clip
from vlkit.interop import keymap as km
from vlkit.interop.lm_files import write_lm_files
from vlkit.lm import DecoderLM, LlamaLM
from vlkit.models.blip2 import Blip2
from vlkit.models.clip import CLIP
from vlkit.models.llava import Llava
from vlkit.models.llava_next import LlavaNext
from vlkit.models.single_tower import TextTower, VisionEncoder
from vlkit.nn.lora import lora_layers
from vlkit.text.encoder import TextConfig
from vlkit.vision.vit import ViTConfig


def _refuse(problems: list[str], target: str) -> None:
    if problems:
        raise VlkitError(f"cannot export to {target} exactly: " + "; ".join(problems))


def _differences(cfg, expected: dict, name: str) -> list[str]:
    """Config fields that differ from what the target architecture hard-codes."""
    return [f"{name}.{k} is {getattr(cfg, k)!r}, {target_value!r} needed" for k, target_value in expected.items()
            if getattr(cfg, k) != target_value]


def _stem(v: ViTConfig) -> list[str]:
    return [f"vision.stem_channels is {v.stem_channels!r}, () needed"] if getattr(v, "stem_channels", ()) else []


def _intermediate(width: int, ratio: float) -> int:
    return int(round(width * ratio))


def clip_vision_hf(v: ViTConfig) -> tuple[dict, list[str]]:
    problems = _differences(v, dict(class_token=True, num_registers=0, patch_bias=False, pre_norm=True, final_norm="pooled",
                                    pool="cls", layer_scale=None), "vision") + _stem(v)
    cfg = dict(hidden_size=v.width, intermediate_size=_intermediate(v.width, v.mlp_ratio), num_hidden_layers=v.depth,
               num_attention_heads=v.num_heads, num_channels=3, image_size=v.image_size, patch_size=v.patch_size,
               hidden_act=v.act, layer_norm_eps=v.eps)
    return cfg, problems


def clip_text_hf(t: TextConfig) -> tuple[dict, list[str]]:
    problems = _differences(t, dict(causal=True, pool="eot"), "text")
    if t.eot_token_id == hf_clip.LEGACY_EOS:
        problems.append("text.eot_token_id is 2, which transformers reads as 'pool at the highest id'")
    cfg = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=_intermediate(t.width, t.mlp_ratio),
               num_hidden_layers=t.depth, num_attention_heads=t.num_heads, max_position_embeddings=t.context_length,
               hidden_act=t.act, layer_norm_eps=t.eps,
               eos_token_id=hf_clip.LEGACY_EOS if t.eot_token_id is None else t.eot_token_id,
               bos_token_id=None, pad_token_id=None)
    return cfg, problems


def _projection(kind: str, name: str, src: str, width: int, embed_dim: int, bias_ok: bool = False):
    """A projection rule, or (for "none") an identity matrix the target layout needs instead."""
    if kind == "none":
        extra = {f"{src}.weight": torch.eye(embed_dim, width)}
        if bias_ok:
            extra[f"{src}.bias"] = torch.zeros(embed_dim)
        return [], extra, []
    rules = [km.copy(f"{name}.weight", f"{src}.weight")]
    if kind == "linear_bias":
        if not bias_ok:
            return [], {}, [f"{name} has a bias, which the target layout has no place for"]
        rules.append(km.copy(f"{name}.bias", f"{src}.bias"))
    elif bias_ok:
        return rules, {f"{src}.bias": torch.zeros(embed_dim)}, []
    return rules, {}, []


def hf_layout(model) -> tuple[dict, list[km.Rule], dict[str, torch.Tensor], str]:
    """``(config.json, rules, extra tensors, image processor class)`` for a vlkit model."""
    if isinstance(model, DecoderLM):
        return _lm_layout(model)
    if isinstance(model, LlavaNext):
        _refuse(["vlkit does not write the LLaVA-NeXT layout yet (image_newline, grid pinpoints)"],
                "transformers LlavaNextForConditionalGeneration")
    if isinstance(model, Llava):
        return _llava_layout(model)
    if isinstance(model, Blip2):
        return _blip2_layout(model)
    if isinstance(model, CLIP) and model.cfg.loss == "sigmoid":
        return _siglip_layout(model)
    if isinstance(model, CLIP):
        c = model.cfg
        vcfg, problems = clip_vision_hf(c.vision)
        tcfg, more = clip_text_hf(c.text)
        problems += more + ([] if c.logit_bias_init is None else ["logit_bias (CLIPModel has none)"])
        vr, vextra, p1 = _projection(c.vision_projection, "vision_proj", "visual_projection", c.vision.width, c.embed_dim)
        tr, textra, p2 = _projection(c.text_projection, "text_proj", "text_projection", c.text.width, c.embed_dim)
        _refuse(problems + p1 + p2, "transformers CLIPModel")
        rules = hf_clip.vision_rules(c.vision) + hf_clip.text_rules(c.text) + vr + tr + [km.copy("logit_scale", "logit_scale")]
        config = dict(architectures=["CLIPModel"], model_type="clip", projection_dim=c.embed_dim,
                      logit_scale_init_value=float(model.logit_scale.detach()),
                      vision_config={**vcfg, "projection_dim": c.embed_dim}, text_config={**tcfg, "projection_dim": c.embed_dim})
        return config, rules, {**vextra, **textra}, "CLIPImageProcessor"
    if isinstance(model, VisionEncoder) and model.cfg.vision.layer_scale is not None:
        return _dinov2_layout(model)
    if isinstance(model, VisionEncoder):
        c = model.cfg
        vcfg, problems = clip_vision_hf(c.vision)
        if c.vision_projection == "linear_bias":
            problems.append("vision_proj has a bias (CLIPVisionModelWithProjection's has none)")
        _refuse(problems, "transformers CLIPVisionModel")
        with_proj = c.vision_projection == "linear"
        rules = hf_clip.vision_rules(c.vision, src="vision_model")
        if with_proj:
            rules.append(km.copy("vision_proj.weight", "visual_projection.weight"))
        arch = "CLIPVisionModelWithProjection" if with_proj else "CLIPVisionModel"
        config = dict(architectures=[arch], model_type="clip_vision_model", **vcfg,
                      projection_dim=c.embed_dim or c.vision.width)
        return config, rules, {}, "CLIPImageProcessor"
    if isinstance(model, TextTower):
        c = model.cfg
        tcfg, problems = clip_text_hf(c.text)
        _refuse(problems + (["text_proj has a bias"] if c.text_projection == "linear_bias" else []), "transformers CLIPTextModel")
        with_proj = c.text_projection == "linear"
        rules = hf_clip.text_rules(c.text, src="text_model")
        if with_proj:
            rules.append(km.copy("text_proj.weight", "text_projection.weight"))
        arch = "CLIPTextModelWithProjection" if with_proj else "CLIPTextModel"
        config = dict(architectures=[arch], model_type="clip_text_model", **tcfg, projection_dim=c.embed_dim or c.text.width)
        return config, rules, {}, ""
    raise ValueError(f"cannot export a {type(model).__name__} to transformers; expected CLIP, VisionEncoder, TextTower, "
                     "a language model, LLaVA or BLIP-2")


def _lm_layout(model: DecoderLM):
    """A Llama-family or OPT language model: the loader's rules backwards, the config its family writes."""
    layout = hf_llama if isinstance(model, LlamaLM) else hf_opt
    config, problems = layout.config_to_hf(model.cfg)
    _refuse(problems, f"transformers {config['architectures'][0]}")
    return config, layout.rules(model.cfg), {}, ""


def siglip_vision_hf(v: ViTConfig) -> tuple[dict, list[str]]:
    problems = _differences(v, dict(class_token=False, num_registers=0, patch_bias=True, pre_norm=False, final_norm="all",
                                    pool="map", layer_scale=None), "vision") + _stem(v)
    cfg = dict(hidden_size=v.width, intermediate_size=_intermediate(v.width, v.mlp_ratio), num_hidden_layers=v.depth,
               num_attention_heads=v.num_heads, num_channels=3, image_size=v.image_size, patch_size=v.patch_size,
               hidden_act=v.act, layer_norm_eps=v.eps, vision_use_head=True)
    return cfg, problems


def _siglip_layout(model: CLIP):
    c = model.cfg
    v, t = c.vision, c.text
    vision_config, problems = siglip_vision_hf(v)
    problems += _differences(t, dict(causal=False, pool="last"), "text")
    if c.vision_projection != "none":
        problems.append(f"vision_projection is {c.vision_projection!r}; SigLIP has no image projection ('none' needed)")
    if c.embed_dim != v.width:
        problems.append(f"embed_dim {c.embed_dim} must equal the vision width {v.width}")
    tr, textra, p2 = _projection(c.text_projection, "text_proj", "text_model.head", t.width, c.embed_dim, bias_ok=True)
    _refuse(problems + p2, "transformers SiglipModel")
    rules = [r for r in hf_siglip.rules(c) if not r.target.startswith("text_proj.")] + tr
    config = dict(
        architectures=["SiglipModel"], model_type="siglip",
        vision_config=vision_config,
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=_intermediate(t.width, t.mlp_ratio),
                         num_hidden_layers=t.depth, num_attention_heads=t.num_heads, max_position_embeddings=t.context_length,
                         hidden_act=t.act, layer_norm_eps=t.eps, projection_size=c.embed_dim,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None),
    )
    return config, rules, textra, "SiglipImageProcessor"


def _llava_layout(model: Llava):
    """LLaVA: a CLIP (class token) or SigLIP tower, the projector, a Llama-family LM, in the older
    key layout every transformers version reads."""
    c = model.cfg
    clip = c.vision.class_token
    if clip:
        vision, problems = clip_vision_hf(c.vision)
    else:  # a SigLIP tower pooled by the mean is a headless one (a VLM reads no pooled output)
        headless = c.vision.pool == "mean"
        vision, problems = siglip_vision_hf(dataclasses.replace(c.vision, pool="map") if headless else c.vision)
        vision["vision_use_head"] = not headless
    text, more = hf_llama.config_to_hf(c.lm)
    projector, extra, more2 = hf_llava.projector_to_hf(model)
    _refuse(problems + more + more2, "transformers LlavaForConditionalGeneration")
    layers = c.vision_feature_layer
    config = dict(
        architectures=["LlavaForConditionalGeneration"], model_type="llava",
        vision_config={**vision, "model_type": "clip_vision_model" if clip else "siglip_vision_model"},
        text_config={k: v for k, v in text.items() if k != "architectures"},
        image_token_index=c.image_token_id, image_seq_length=model.num_image_tokens(),
        vision_feature_layer=list(layers) if isinstance(layers, tuple) else layers,
        vision_feature_select_strategy=c.vision_feature_select_strategy, tie_word_embeddings=c.lm.tie_word_embeddings,
        **projector,
    )
    return config, hf_llava.rules(c), extra, "CLIPImageProcessor"  # it reads every resize and crop vlkit's processor writes


def _blip2_layout(model: Blip2):
    """BLIP-2: the loader's rules backwards; preprocessing that resizes to the exact size is BLIP's."""
    config, problems = hf_blip2.config_to_hf(model)
    _refuse(problems, "transformers Blip2ForConditionalGeneration")
    exact = getattr(model.processor, "resize_mode", "exact") == "exact"
    return config, hf_blip2.rules(model.cfg), {}, "BlipImageProcessor" if exact else "CLIPImageProcessor"


def _dinov2_layout(model: VisionEncoder):
    v = model.cfg.vision
    problems = _differences(v, dict(class_token=True, patch_bias=True, pre_norm=False, final_norm="all", pool="cls"), "vision")
    problems += _stem(v) + ([] if model.cfg.vision_projection == "none" else ["a vision projection (DINOv2 has none)"])
    ratio = v.mlp_ratio
    if ratio != int(ratio):
        problems.append(f"vision.mlp_ratio {ratio} is not a whole number (transformers' Dinov2Config takes an int)")
    model_type = "dinov2_with_registers" if v.num_registers or v.pos_antialias else "dinov2"
    if v.num_registers and not v.pos_antialias:
        problems.append("registers with plain bicubic position interpolation (transformers' registers model antialiases)")
    _refuse(problems, f"transformers {model_type}")
    qkv_bias = any(b.attn.qkv.bias.count_nonzero() for b in model.vision.transformer.blocks)
    rules = hf_dinov2.rules(v, qkv_bias)
    config = dict(architectures=["Dinov2WithRegistersModel" if v.num_registers or v.pos_antialias else "Dinov2Model"],
                  model_type=model_type, hidden_size=v.width, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
                  mlp_ratio=int(ratio), hidden_act=v.act, layer_norm_eps=v.eps, image_size=v.image_size, patch_size=v.patch_size,
                  num_channels=3, qkv_bias=bool(qkv_bias), layerscale_value=v.layer_scale, use_swiglu_ffn=False)
    if model_type == "dinov2_with_registers":
        config["num_register_tokens"] = v.num_registers
    extra = {"embeddings.mask_token": torch.zeros(1, v.width)}
    return config, rules, extra, "BitImageProcessor"


def _refuse_adapters(model) -> None:
    """Exported folders hold plain weights; unmerged LoRA adapters would not map onto them."""
    adapted = list(lora_layers(model))
    if adapted:
        raise VlkitError(
            f"{type(model).__name__} has unmerged LoRA adapters on {len(adapted)} layers ({', '.join(adapted[:3])}"
            f"{', ...' if len(adapted) > 3 else ''}); "
            "fold them in first with vlkit.nn.lora.merge_lora(model), or write the adapter alone with "
            "vlkit.interop.peft.save_adapter"
        )


def _write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_tokenizer(model, dst: Path) -> None:
    """``tokenizer.json`` plus a ``tokenizer_config.json`` that transformers' fast tokenizer reads."""
    if isinstance(model, (DecoderLM, Llava, Blip2)):
        write_lm_files(model, dst)
        return
    tok = getattr(model, "tokenizer", None)
    if not tok:  # None or Missing
        return
    tok.save(dst)
    pad_id = tok.tok.padding["pad_id"] if tok.tok.padding else None
    pad = tok.tok.id_to_token(pad_id) if pad_id is not None else None
    _write_json(dst / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": tok.context_length,
                                                "pad_token": pad, "padding_side": "right"})


def _write_folder(dst: str | Path, overwrite: bool, write) -> Path:
    """Write ``dst`` whole (see :func:`vlkit.files.atomic_folder`): a replaced export leaves no
    stale file behind for a loader to pick up, and a failed one leaves the old folder as it was."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise VlkitError(f"{dst}: is a file; expected a folder to export into")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise VlkitError(f"{dst}: exists and is not empty; pass overwrite=True (vlkit convert --force) to replace it")

    def fill(tmp: Path) -> None:
        tmp.mkdir()
        write(tmp)

    atomic_folder(dst, fill)
    return dst


def to_hf(model, dst: str | Path, overwrite: bool = False) -> Path:
    """Write a transformers folder: ``config.json``, ``model.safetensors``, tokenizer and
    preprocessing. ``overwrite`` replaces a non-empty ``dst`` whole."""
    _refuse_adapters(model)
    config, rules, extra, processor_class = hf_layout(model)
    state = {**km.export_state(model, rules, "transformers"), **extra}

    def write(folder: Path) -> None:
        _write_weights(folder / "model.safetensors", state)
        _write_json(folder / "config.json", {**config, "dtype": "float32"})
        _write_tokenizer(model, folder)
        if getattr(model, "processor", None) and processor_class:
            _write_json(folder / "preprocessor_config.json", {"image_processor_type": processor_class, **model.processor.to_hf()})

    return _write_folder(dst, overwrite, write)


def open_clip_layout(model) -> tuple[dict, list[km.Rule], dict[str, torch.Tensor]]:
    """``(open_clip_config.json, rules, extra tensors)`` for a CLIP-architecture model."""
    if not isinstance(model, CLIP):
        raise ValueError(f"cannot export a {type(model).__name__} to OpenCLIP; expected a two-tower CLIP")
    c = model.cfg
    v, t = c.vision, c.text
    problems = _differences(v, dict(class_token=True, num_registers=0, patch_bias=False, final_norm="pooled", pool="cls",
                                    eps=open_clip.EPS), "vision") + _stem(v)
    problems += _differences(t, dict(causal=True, pool="eot", eot_token_id=None, eps=open_clip.EPS), "text")
    if t.eot_token_id is not None:
        problems[-1] += " (OpenCLIP pools at the highest token id)"
    if v.act != t.act or v.act not in ("gelu", "quick_gelu"):
        problems.append(f"activations {v.act!r}/{t.act!r}; OpenCLIP uses one of 'gelu', 'quick_gelu' for both towers")
    for name, cfg in (("vision", v), ("text", t)):
        if int(cfg.width * cfg.mlp_ratio) != _intermediate(cfg.width, cfg.mlp_ratio):
            problems.append(f"{name}.mlp_ratio {cfg.mlp_ratio} rounds differently in OpenCLIP's int(width * mlp_ratio)")
    if c.vision_projection == "linear_bias":
        problems.append("vision_projection has a bias (OpenCLIP's visual.proj has none)")
    _refuse(problems, "OpenCLIP")
    rules = [r for r in open_clip.rules(c) if not r.target.startswith(("vision_proj.", "text_proj."))]
    extra = {}
    if c.vision_projection == "none":
        extra["visual.proj"] = torch.eye(v.width, c.embed_dim)
    else:
        rules.append(km.transposed("vision_proj.weight", "visual.proj"))
    if c.text_projection == "none":
        extra["text_projection"] = torch.eye(t.width, c.embed_dim)
    elif c.text_projection == "linear":
        rules.append(km.transposed("text_proj.weight", "text_projection"))
    else:
        rules += [km.copy("text_proj.weight", "text_projection.weight"), km.copy("text_proj.bias", "text_projection.bias")]
    vision_cfg = dict(image_size=v.image_size, layers=v.depth, width=v.width, head_width=v.width // v.num_heads,
                      mlp_ratio=v.mlp_ratio, patch_size=v.patch_size)
    if v.layer_scale is not None:
        vision_cfg["ls_init_value"] = v.layer_scale
    if not v.pre_norm:
        vision_cfg["no_ln_pre"] = True
    text_cfg = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.num_heads, layers=t.depth,
                    mlp_ratio=t.mlp_ratio)
    if c.text_projection == "linear_bias":
        text_cfg["proj_bias"] = True
    model_cfg = dict(embed_dim=c.embed_dim, quick_gelu=v.act == "quick_gelu", vision_cfg=vision_cfg, text_cfg=text_cfg)
    if model.logit_bias is not None:
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach())
    config = {"model_cfg": model_cfg}
    p = getattr(model, "processor", None)
    if p:
        interpolation = {v_: k for k, v_ in open_clip.RESAMPLE.items()}.get(p.resample)
        shortest = p.resize_mode == "shortest_edge" and p.crop_size == p.size
        exact = p.resize_mode == "exact" and p.crop_size in (None, p.size)
        if interpolation is None or not (shortest or exact):
            raise ValueError(f"cannot export the image preprocessing to OpenCLIP exactly: {p}")
        config["preprocess_cfg"] = dict(mean=list(p.mean), std=list(p.std), interpolation=interpolation,
                                        resize_mode="shortest" if shortest else "squash", size=p.size)
    return config, rules, extra


def to_open_clip(model, dst: str | Path, overwrite: bool = False) -> Path:
    """Write an OpenCLIP folder: ``open_clip_config.json``, ``open_clip_model.safetensors``,
    tokenizer. ``overwrite`` replaces a non-empty ``dst`` whole."""
    _refuse_adapters(model)
    config, rules, extra = open_clip_layout(model)
    state = {**km.export_state(model, rules, "OpenCLIP"), **extra}

    def write(folder: Path) -> None:
        _write_weights(folder / "open_clip_model.safetensors", state)
        _write_json(folder / open_clip.CONFIG, config)
        _write_tokenizer(model, folder)

    return _write_folder(dst, overwrite, write)


EXPORTERS = {"hf": to_hf, "open_clip": to_open_clip}
