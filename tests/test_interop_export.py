"""``vlkit convert --to hf|open_clip``: transformers loads the exported folders without missing or
unexpected keys and gives the same embeddings; loaded checkpoints work with ``vlkit embed`` / ``eval``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402
from vlkit.config import apply_overrides, read, to_dict  # noqa: E402
from vlkit.loading import resolve  # noqa: E402
from vlkit.train.clip import load_recipe, train_clip  # noqa: E402

from _interop_util import clip_bpe, convert, max_diff, perturb  # noqa: E402

TOL = 1e-5
RECIPE = Path(__file__).resolve().parents[1] / "src" / "vlkit" / "recipes" / "clip_shapes.yaml"




def shapes_clip(tmp_path):
    """A CLIP trained by vlkit on the shapes world (a few steps of the recipe, patch
    embedding instead of the conv stem, which transformers' CLIP has no place for)."""
    recipe = load_recipe(read(RECIPE))
    recipe = load_recipe(apply_overrides(to_dict(recipe), [
        "model.vision.patch_size=8", "model.vision.stem_channels=[]", "model.vision.depth=2", "model.text.depth=2",
        "model.embed_dim=64", "loop.steps=3", "loop.batch_size=16", "optim.warmup_steps=1",
    ]))
    train_clip(recipe, tmp_path / "run")
    model = vlkit.load(tmp_path / "run")
    shutil.copytree(resolve(tmp_path / "run"), tmp_path / "vlkit")
    return model, ["a large red circle", "a small blue star to the left of a green square"]


@torch.no_grad()
def test_shapes_clip_to_transformers(tmp_path):
    model, texts = shapes_clip(tmp_path)
    assert convert("--to", "hf", str(tmp_path / "vlkit"), str(tmp_path / "hf")) == 0
    hf, info = transformers.CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    px = torch.randn(2, 3, 64, 64)
    batch = model.tokenizer(texts)
    assert max_diff(hf.get_image_features(pixel_values=px).pooler_output, model.encode_image(px)) <= TOL
    ref = hf.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    assert max_diff(ref, model.encode_text(batch["input_ids"], batch["attention_mask"])) <= TOL
    back = vlkit.load(tmp_path / "hf")  # and vlkit reads its own export, tokenizer included
    assert max_diff(back.embed_texts(texts), model.embed_texts(texts)) <= TOL
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert fast(texts, padding=True, truncation=True)["input_ids"] == model.tokenizer(texts)["input_ids"].tolist()


@torch.no_grad()
def test_shapes_clip_to_open_clip_and_back(tmp_path):
    model, texts = shapes_clip(tmp_path)
    assert convert("--to", "open_clip", str(tmp_path / "vlkit"), str(tmp_path / "oc")) == 0
    back = vlkit.load(tmp_path / "oc")
    px = torch.randn(2, 3, 64, 64)
    assert max_diff(back.encode_image(px), model.encode_image(px)) <= TOL
    batch = model.tokenizer(texts)
    assert max_diff(back.encode_text(batch["input_ids"]), model.encode_text(batch["input_ids"], batch["attention_mask"])) <= TOL


def test_conv_stem_clip_to_transformers_is_refused_clearly(tmp_path):
    recipe = load_recipe(apply_overrides(read(RECIPE), ["loop.steps=1", "loop.batch_size=8", "model.vision.depth=1",
                                                        "model.text.depth=1", "optim.warmup_steps=1"]))
    train_clip(recipe, tmp_path / "run")
    with pytest.raises(ValueError, match="stem_channels"):
        convert("--to", "hf", str(tmp_path / "run"), str(tmp_path / "hf"))


@torch.no_grad()
def test_loaded_siglip_to_transformers(tmp_path):
    cfg = transformers.SiglipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=27, patch_size=5),
        text_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
                         max_position_embeddings=16, projection_size=32),
    )
    src = perturb(transformers.SiglipModel(cfg))
    src.save_pretrained(tmp_path / "src")
    assert convert("--to", "hf", str(tmp_path / "src"), str(tmp_path / "dst")) == 0
    hf, info = transformers.SiglipModel.from_pretrained(tmp_path / "dst", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    px, ids = torch.randn(2, 3, 27, 27), torch.randint(0, 99, (2, 16))
    assert max_diff(hf.get_image_features(pixel_values=px).pooler_output, src.get_image_features(pixel_values=px).pooler_output) <= TOL
    assert max_diff(hf.get_text_features(input_ids=ids).pooler_output, src.get_text_features(input_ids=ids).pooler_output) <= TOL
    assert max_diff(hf.logit_bias, src.logit_bias) == 0 and max_diff(hf.logit_scale, src.logit_scale) == 0


@torch.no_grad()
def test_loaded_clip_to_transformers_via_open_clip(tmp_path):
    """transformers → vlkit → OpenCLIP → vlkit → transformers gives back the same model."""
    cfg = transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
                         max_position_embeddings=16, eos_token_id=2, bos_token_id=0, pad_token_id=1),
        projection_dim=16,
    )
    src = perturb(transformers.CLIPModel(cfg))
    src.save_pretrained(tmp_path / "src")
    assert convert("--to", "open_clip", str(tmp_path / "src"), str(tmp_path / "oc")) == 0
    assert convert("--to", "hf", str(tmp_path / "oc"), str(tmp_path / "dst")) == 0
    hf, info = transformers.CLIPModel.from_pretrained(tmp_path / "dst", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for name, p in src.state_dict().items():
        assert torch.equal(p, hf.state_dict()[name]), name


@torch.no_grad()
def test_loaded_dinov2_and_clip_vision_to_transformers(tmp_path):
    dino = perturb(transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                                         image_size=28, patch_size=7, qkv_bias=False)))
    vis = perturb(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7, projection_dim=8)))
    for name, src, cls in (("dino", dino, transformers.Dinov2Model), ("vis", vis, transformers.CLIPVisionModelWithProjection)):
        src.save_pretrained(tmp_path / name)
        with pytest.warns(UserWarning):
            assert convert("--to", "hf", str(tmp_path / name), str(tmp_path / f"{name}_out")) == 0
        hf, info = cls.from_pretrained(tmp_path / f"{name}_out", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        for key, p in src.state_dict().items():
            if key != "embeddings.mask_token":  # pre-training only: vlkit drops it, exports zeros
                assert torch.equal(p, hf.state_dict()[key]), key


def test_convert_refuses_a_non_empty_destination(tmp_path):
    shapes_clip(tmp_path)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        convert("--to", "hf", str(tmp_path / "vlkit"), str(tmp_path / "dst"))


def hf_clip_folder(tmp_path):
    """A complete transformers CLIP folder: weights, tokenizer files and preprocessor_config.json."""
    tok = clip_bpe(tmp_path, vocab_size=300)
    cfg = transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=tok.get_vocab_size(),
                         max_position_embeddings=77, eos_token_id=tok.token_to_id("<|endoftext|>"),
                         bos_token_id=tok.token_to_id("<|startoftext|>"), pad_token_id=tok.token_to_id("<|endoftext|>")),
        projection_dim=16,
    )
    hf = perturb(transformers.CLIPModel(cfg))
    hf.save_pretrained(tmp_path)
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    return hf


@torch.no_grad()
def test_loaded_checkpoint_works_with_embed_and_eval(tmp_path):
    from PIL import Image

    from vlkit import cli

    hf = hf_clip_folder(tmp_path / "model")
    texts = ["a photo of a cat", "two dogs playing in the snow"]
    out = tmp_path / "texts.npy"
    assert cli.main(["embed", "--model", str(tmp_path / "model"), "--texts", *texts, "--out", str(out), "--precision", "fp32"]) == 0
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    batch = ref_tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ref = torch.nn.functional.normalize(hf.get_text_features(**batch).pooler_output, dim=-1)
    assert max_diff(torch.from_numpy(np.load(out)), ref) <= TOL
    data = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(data / c / f"{i}.png")
    (data / "classnames.json").write_text(json.dumps(["cat", "dog"]))
    (data / "templates.json").write_text(json.dumps(["a photo of a {c}"]))
    assert cli.main(["eval", "zeroshot", "--model", str(tmp_path / "model"), "--data", str(data), "--precision", "fp32"]) == 0
