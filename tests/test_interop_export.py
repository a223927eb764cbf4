"""``vlkit convert --to hf|open_clip``: transformers loads the exported folders without missing or
unexpected keys and gives the same embeddings; loaded checkpoints work with ``vlkit embed`` / ``eval``."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402
from vlkit.interop.convert import add_parser  # noqa: E402
from vlkit.models import CLIP, CLIPConfig  # noqa: E402
from vlkit.text.encoder import TextConfig  # noqa: E402
from vlkit.text.tokenizer import word_level  # noqa: E402
from vlkit.train.checkpoint import save_model  # noqa: E402
from vlkit.vision.preprocess import ImageProcessor  # noqa: E402
from vlkit.vision.vit import ViTConfig  # noqa: E402

from _interop_util import clip_bpe, max_diff, perturb  # noqa: E402

TOL = 1e-5


def convert(*argv: str) -> int:
    """Run the ``convert`` subcommand exactly as ``vlkit`` will (via ``add_parser``)."""
    parser = argparse.ArgumentParser(prog="vlkit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *argv])
    return args.fn(args, [])


def shapes_clip(tmp_path):
    """The shapes recipe's CLIP (word-level tokenizer, EOS pooling), saved as vlkit saves a training run."""
    words = "a large small red green blue circle square star triangle on the left of".split()
    tok = word_level(words, 32)
    cfg = CLIPConfig(vision=ViTConfig(image_size=64, patch_size=8, width=128, depth=2, num_heads=4, act="gelu"),
                     text=TextConfig(vocab_size=tok.vocab_size, context_length=32, width=128, depth=2, num_heads=4, act="gelu",
                                     eot_token_id=tok.token_id("[EOS]")),
                     embed_dim=64)
    torch.manual_seed(0)
    model = perturb(CLIP(cfg))
    model.tokenizer = tok
    model.processor = ImageProcessor(size=64, crop_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    save_model(tmp_path / "vlkit", model, "clip")
    return model, ["a large red circle", "a small blue star on the left of a green square"]


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


def test_shapes_clip_to_open_clip_is_refused_clearly(tmp_path):
    shapes_clip(tmp_path)
    with pytest.raises(ValueError, match="eot_token_id.*highest token id"):
        convert("--to", "open_clip", str(tmp_path / "vlkit"), str(tmp_path / "oc"))


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
