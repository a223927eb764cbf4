"""OpenCLIP layout (OpenAI's original key names): a random transformers CLIP rewritten under those
names by a map written independently here, loaded by vlkit, gives transformers' numbers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402
from vlkit.interop.export import to_open_clip  # noqa: E402

from _interop_util import max_diff, perturb  # noqa: E402

TOL = 1e-5


def hf_clip():
    cfg = transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=33,
                           patch_size=7, hidden_act="quick_gelu"),
        text_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3, vocab_size=99,
                         max_position_embeddings=20, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1),
        projection_dim=16,
    )
    return perturb(transformers.CLIPModel(cfg), seed=1)


def to_openai_names(hf) -> dict[str, torch.Tensor]:
    """transformers CLIP → OpenAI/OpenCLIP names (the test's own map, not vlkit's)."""
    sd = hf.state_dict()
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].T,
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].T,
        "logit_scale": sd["logit_scale"],
    }
    for ours, theirs in [("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                         ("ln_final", "text_model.final_layer_norm")]:
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = sd[f"{theirs}.{p}"]
    for tower, src in (("visual.transformer", "vision_model"), ("transformer", "text_model")):
        for i in range(2):
            s, d = f"{src}.encoder.layers.{i}", f"{tower}.resblocks.{i}"
            for p in ("weight", "bias"):
                out[f"{d}.attn.in_proj_{p}"] = torch.cat([sd[f"{s}.self_attn.{x}_proj.{p}"] for x in "qkv"])
                out[f"{d}.attn.out_proj.{p}"] = sd[f"{s}.self_attn.out_proj.{p}"]
                out[f"{d}.ln_1.{p}"] = sd[f"{s}.layer_norm1.{p}"]
                out[f"{d}.ln_2.{p}"] = sd[f"{s}.layer_norm2.{p}"]
                out[f"{d}.mlp.c_fc.{p}"] = sd[f"{s}.mlp.fc1.{p}"]
                out[f"{d}.mlp.c_proj.{p}"] = sd[f"{s}.mlp.fc2.{p}"]
    return {k: v.contiguous().clone() for k, v in out.items()}


OPEN_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 33, "layers": 2, "width": 32, "head_width": 8, "mlp_ratio": 2.0, "patch_size": 7},
        "text_cfg": {"context_length": 20, "vocab_size": 99, "width": 24, "heads": 3, "layers": 2, "mlp_ratio": 2.0},
    },
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
}


def inputs():
    g = torch.Generator().manual_seed(0)
    px = torch.randn(2, 3, 33, 33, generator=g)
    ids = torch.randint(3, 90, (2, 20), generator=g)
    ids[0, 6], ids[1, 19] = 98, 98  # EOT is the highest id, as in OpenAI's tokenizer
    ids[0, 7:] = 0
    return px, ids


def check(hf, model):
    px, ids = inputs()
    with torch.no_grad():
        assert max_diff(hf.get_image_features(pixel_values=px).pooler_output, model.encode_image(px)) <= TOL
        assert max_diff(hf.get_text_features(input_ids=ids).pooler_output, model.encode_text(ids)) <= TOL


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_open_clip_layout_loads_with_parity(tmp_path, fmt):
    hf = hf_clip()
    state = to_openai_names(hf)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    if fmt == "safetensors":
        save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    else:  # OpenAI's original state dicts carry these sizes and a mask next to the weights
        extra = {"input_resolution": torch.tensor(33), "context_length": torch.tensor(20), "vocab_size": torch.tensor(99),
                 "attn_mask": torch.zeros(20, 20)}
        torch.save({**state, **extra}, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.warns(UserWarning, match="tokenizer.json"):
        model = vlkit.load(tmp_path)
    check(hf, model)
    assert model.processor.mean == (0.5, 0.5, 0.5) and model.processor.size == 33


def test_bin_is_read_with_weights_only(tmp_path):
    """A pickle that is more than tensors is refused, never executed."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    torch.save({"x": Evil()}, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        vlkit.load(tmp_path)


def test_export_open_clip_round_trip(tmp_path):
    hf = hf_clip()
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning):
        model = vlkit.load(tmp_path / "hf")
    to_open_clip(model, tmp_path / "oc")
    exported = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert exported["model_cfg"]["quick_gelu"] is True and exported["model_cfg"]["vision_cfg"]["head_width"] == 8
    from safetensors import safe_open

    with safe_open(str(tmp_path / "oc" / "open_clip_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(to_openai_names(hf))  # exactly OpenAI's names, nothing more or less
    with pytest.warns(UserWarning):
        again = vlkit.load(tmp_path / "oc")
    check(hf, again)
