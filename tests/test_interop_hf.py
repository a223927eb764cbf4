"""Parity with transformers: tiny random CLIP, CLIP one-tower, SigLIP and DINOv2 models saved with
``save_pretrained`` and loaded with ``vlkit.load`` give the same embeddings and hidden states."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402
from vlkit.models import CLIP, TextTower, VisionEncoder  # noqa: E402
from vlkit.models.single_tower import MissingTowerError  # noqa: E402

from _interop_util import max_diff, max_diff_states, perturb  # noqa: E402

TOL = 1e-5
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=33, patch_size=7)
TEXT = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
            max_position_embeddings=20)


def text_batch(eos: int, n: int = 20, seed: int = 0):
    """Ids with an EOS at different places, right padding after it, and a matching mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, n), generator=g)
    mask = torch.ones_like(ids)
    for row, end in enumerate((5, 11, n - 1)):
        ids[row, end] = eos
        ids[row, end + 1 :] = 1
        mask[row, end + 1 :] = 0
    return ids, mask


def pixels(h: int, w: int, n: int = 2, seed: int = 0):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def save_load(hf_model, path):
    hf_model.save_pretrained(path)
    with pytest.warns(UserWarning):  # no tokenizer / preprocessor files in these folders
        return vlkit.load(path)


@pytest.mark.parametrize("act,eps,eos", [("quick_gelu", 1e-5, 98), ("gelu", 1e-6, 2)])
@torch.no_grad()
def test_clip_model_parity(tmp_path, act, eps, eos):
    cfg = transformers.CLIPConfig(
        vision_config={**VISION, "hidden_act": act, "layer_norm_eps": eps},
        text_config={**TEXT, "hidden_act": act, "layer_norm_eps": eps, "eos_token_id": eos, "bos_token_id": 0, "pad_token_id": 1},
        projection_dim=16,
    )
    hf = perturb(transformers.CLIPModel(cfg))
    model = save_load(hf, tmp_path)
    assert isinstance(model, CLIP)
    px = pixels(33, 33)
    ids, mask = text_batch(eos if eos != 2 else 98)
    assert max_diff(hf.get_image_features(pixel_values=px).pooler_output, model.encode_image(px)) <= TOL
    assert max_diff(hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, model.encode_text(ids, mask)) <= TOL
    hv = hf.vision_model(pixel_values=px, output_hidden_states=True)
    vv = model.vision(px, output_hidden_states=True)
    assert len(vv.hidden_states) == VISION["num_hidden_layers"] + 1
    assert max_diff_states(hv.hidden_states, vv.hidden_states) <= TOL
    assert max_diff(hv.pooler_output, vv.pooled) <= TOL
    ht = hf.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    vt = model.text(ids, mask, output_hidden_states=True)
    assert max_diff_states(ht.hidden_states, vt.hidden_states) <= TOL
    assert max_diff(ht.last_hidden_state, vt.tokens) <= TOL
    logits = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits_per_image
    ours = model.similarity(model.encode_image(px), model.encode_text(ids, mask))
    assert max_diff(logits, ours) <= 1e-4  # logits are scaled by exp(logit_scale) ~ 14


@torch.no_grad()
def test_clip_vision_with_projection(tmp_path):
    hf = perturb(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION, projection_dim=12)))
    model = save_load(hf, tmp_path)
    assert isinstance(model, VisionEncoder)
    px = pixels(33, 33)
    out = hf(pixel_values=px, output_hidden_states=True)
    assert max_diff(out.image_embeds, model.encode_image(px)) <= TOL
    assert max_diff_states(out.hidden_states, model.vision(px, output_hidden_states=True).hidden_states) <= TOL
    with pytest.raises(MissingTowerError, match="vision-only"):
        model.encode_text(torch.zeros(1, 4, dtype=torch.long))


@torch.no_grad()
def test_clip_vision_model_without_projection(tmp_path):
    hf = perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
    model = save_load(hf, tmp_path)
    px = pixels(33, 33)
    assert max_diff(hf(pixel_values=px).pooler_output, model.encode_image(px)) <= TOL


@pytest.mark.parametrize("with_projection", [False, True])
@torch.no_grad()
def test_clip_text_models(tmp_path, with_projection):
    cfg = transformers.CLIPTextConfig(**TEXT, eos_token_id=98, bos_token_id=0, pad_token_id=1, projection_dim=10)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    hf = perturb(cls(cfg))
    model = save_load(hf, tmp_path)
    assert isinstance(model, TextTower)
    ids, mask = text_batch(98)
    out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    ref = out.text_embeds if with_projection else out.pooler_output
    assert max_diff(ref, model.encode_text(ids, mask)) <= TOL
    assert max_diff_states(out.hidden_states, model.text(ids, mask, output_hidden_states=True).hidden_states) <= TOL
    with pytest.raises(MissingTowerError, match="text-only"):
        model.encode_image(pixels(33, 33))


@torch.no_grad()
def test_siglip_parity(tmp_path):
    vision = {**VISION, "image_size": 27, "patch_size": 5, "layer_norm_eps": 1e-6}
    text = {**TEXT, "projection_size": 32, "layer_norm_eps": 1e-6}
    hf = perturb(transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)))
    model = save_load(hf, tmp_path)
    assert model.cfg.vision.pool == "map" and model.logit_bias is not None
    px = pixels(27, 27)
    ids, mask = text_batch(98)
    # SigLIP's reference pipeline passes no attention mask (the padding is attended to); vlkit ignores it likewise
    assert max_diff(hf.get_image_features(pixel_values=px).pooler_output, model.encode_image(px)) <= TOL
    assert max_diff(hf.get_text_features(input_ids=ids).pooler_output, model.encode_text(ids, mask)) <= TOL
    hv = hf.vision_model(pixel_values=px, output_hidden_states=True)
    assert max_diff_states(hv.hidden_states, model.vision(px, output_hidden_states=True).hidden_states) <= TOL
    ht = hf.text_model(input_ids=ids, output_hidden_states=True)
    assert max_diff_states(ht.hidden_states, model.text(ids, output_hidden_states=True).hidden_states) <= TOL
    out = hf(input_ids=ids, pixel_values=px)
    assert max_diff(out.logits_per_image, model.similarity(model.encode_image(px), model.encode_text(ids))) <= 1e-4
    assert max_diff(hf.logit_bias.reshape(()), model.logit_bias) == 0


@pytest.mark.parametrize("registers", [0, 3])
@pytest.mark.parametrize("qkv_bias", [True, False])
@torch.no_grad()
def test_dinov2_parity(tmp_path, registers, qkv_bias):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7,
                  layerscale_value=0.5, qkv_bias=qkv_bias, mlp_ratio=3)
    if registers:
        hf = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**common, num_register_tokens=registers))
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    hf = perturb(hf)
    model = save_load(hf, tmp_path)
    assert isinstance(model, VisionEncoder) and model.cfg.vision.num_registers == registers
    for h, w in [(28, 28), (35, 49), (41, 30)]:  # native size, then interpolated position embeddings
        px = pixels(h, w)
        out = hf(pixel_values=px, output_hidden_states=True)
        ours = model.vision(px, output_hidden_states=True)
        assert max_diff(out.pooler_output, model.encode_image(px)) <= TOL
        assert max_diff(out.last_hidden_state, ours.tokens) <= TOL
        assert max_diff_states(out.hidden_states, ours.hidden_states) <= TOL


def test_vision_encoder_native_round_trip(tmp_path):
    """A loaded DINOv2 is a registered vlkit model: saved natively, it loads back identically."""
    from vlkit.train.checkpoint import save_model

    hf = perturb(transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                                       image_size=28, patch_size=7)))
    model = save_load(hf, tmp_path / "hf")
    save_model(tmp_path / "native", model, "vision_encoder")
    again = vlkit.load(tmp_path / "native")
    px = pixels(28, 28)
    with torch.no_grad():
        assert max_diff(model.encode_image(px), again.encode_image(px)) == 0
