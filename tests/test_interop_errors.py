"""Bad checkpoint folders fail loudly: the error names the file and the key and says what was
expected; nothing is ever loaded partially."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402
from vlkit.interop import CheckpointError  # noqa: E402

from _interop_util import max_diff, perturb  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture()
def clip_dir(tmp_path):
    cfg = transformers.CLIPConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=50,
                         max_position_embeddings=8, eos_token_id=49, bos_token_id=0, pad_token_id=1),
        projection_dim=8,
    )
    hf = perturb(transformers.CLIPModel(cfg))
    hf.save_pretrained(tmp_path / "m")
    return tmp_path / "m", hf


def rewrite(folder, edit):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    return path


def test_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*open_clip_config.json"):
        vlkit.load(tmp_path)


def test_missing_weights_file(clip_dir):
    folder, _ = clip_dir
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights file; expected one of \['model.safetensors'"):
        vlkit.load(folder)


def test_unknown_model_type(clip_dir):
    folder, _ = clip_dir
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"config.json: unknown model_type 'bert'; expected one of .*'clip'.*'siglip'"):
        vlkit.load(folder)


def test_model_type_comes_from_config_not_folder_name(tmp_path, clip_dir):
    folder, hf = clip_dir
    renamed = folder.rename(tmp_path / "siglip-dinov2-openclip")
    model = vlkit.load(renamed)
    px = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(model.encode_image(px), hf.get_image_features(pixel_values=px).pooler_output) <= 1e-5


def test_wrong_shape(clip_dir):
    folder, _ = clip_dir
    path = rewrite(folder, lambda s: s.__setitem__("vision_model.post_layernorm.weight", torch.ones(15)))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor 'vision_model.post_layernorm.weight' has shape \(15,\); expected \(16,\)"):
        vlkit.load(folder)


def test_missing_key(clip_dir):
    folder, _ = clip_dir
    path = rewrite(folder, lambda s: s.pop("text_model.encoder.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=rf"{path}: missing key\(s\) text_model.encoder.layers.1.self_attn.k_proj.bias;"):
        vlkit.load(folder)


def test_unexpected_key(clip_dir):
    folder, _ = clip_dir
    path = rewrite(folder, lambda s: s.__setitem__("vision_model.extra_head.weight", torch.ones(2)))
    with pytest.raises(CheckpointError, match=rf"{path}: unexpected key\(s\) vision_model.extra_head.weight;"):
        vlkit.load(folder)


def test_config_that_does_not_describe_the_weights(clip_dir):
    folder, _ = clip_dir
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"]["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) vision_model.encoder.layers.2.layer_norm1.weight"):
        vlkit.load(folder)


def test_truncated_safetensors(clip_dir):
    folder, _ = clip_dir
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{path}: .*truncated"):
        vlkit.load(folder)
    path.write_bytes(data[:50])  # cut inside the header
    with pytest.raises(CheckpointError, match=rf"{path}: not a valid safetensors file"):
        vlkit.load(folder)


def test_sharded_checkpoint_and_missing_shard(tmp_path, clip_dir):
    _, hf = clip_dir
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = vlkit.load(tmp_path / "sharded")
    ids = torch.tensor([[0, 5, 7, 49, 1, 1, 1, 1]])
    with torch.no_grad():
        assert max_diff(model.encode_text(ids), hf.get_text_features(input_ids=ids).pooler_output) <= 1e-5
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard}: missing \(named by model.safetensors.index.json\)"):
        vlkit.load(tmp_path / "sharded")


def test_unsupported_switch_is_refused(tmp_path):
    hf = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                            image_size=14, patch_size=7, use_swiglu_ffn=True))
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config.json: use_swiglu_ffn=true .* is not supported"):
        vlkit.load(tmp_path)


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: malformed JSON"):
        vlkit.load(tmp_path)
