"""The full CLIP ViT-B/32 architecture (random weights, 151M parameters) loads with parity."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402

from _interop_util import max_diff, max_diff_states  # noqa: E402


@pytest.mark.filterwarnings("ignore::UserWarning")
@torch.no_grad()
def test_clip_vit_b32_parity(tmp_path):
    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # defaults are openai/clip-vit-base-patch32's sizes
    hf.save_pretrained(tmp_path)
    model = vlkit.load(tmp_path)
    px = torch.randn(2, 3, 224, 224)
    ids = torch.randint(0, 49406, (2, 77))
    ids[0, 9], ids[1, 76] = 49407, 49407
    ids[0, 10:] = 49407
    hv = hf.vision_model(pixel_values=px, output_hidden_states=True)
    vv = model.vision(px, output_hidden_states=True)
    assert max_diff_states(hv.hidden_states, vv.hidden_states) <= 1e-4
    assert max_diff(hf.visual_projection(hv.pooler_output), model.encode_image(px)) <= 1e-4
    assert max_diff(hf.get_text_features(input_ids=ids).pooler_output, model.encode_text(ids)) <= 1e-4
