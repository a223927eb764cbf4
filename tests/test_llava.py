"""LLaVA loaded from transformers folders gives transformers' logits (within 1e-4) on a left-padded batch
with images (one prompt with two), its loss with labels and its greedy tokens; every key layout loads;
vlkit LLaVAs export to folders transformers loads with the same logits and round-trip natively; bad
input gets named errors."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402
from vlkit.errors import CheckpointError, VlkitError  # noqa: E402
from vlkit.lm import LlamaConfig  # noqa: E402
from vlkit.models.llava import Llava, LlavaConfig  # noqa: E402
from vlkit.train.checkpoint import save_model  # noqa: E402
from vlkit.vision.vit import ViTConfig  # noqa: E402

from _interop_util import convert, perturb  # noqa: E402
from _llava_models import (  # noqa: E402
    IMAGE_SIZE, IMAGE_TOKEN, NEWER, OLDER, PATCH, VOCAB, batch, edit_config, hf_logits, hf_model, rename_keys, save,
    tokens_per_image,
)
from _lm_models import real  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*no preprocessor_config.json:UserWarning")

TOL = 1e-4
NEW = 16
HEADLESS = dict(vision_overrides=dict(vision_use_head=False), vision_feature_layer=-1, vision_feature_select_strategy="full")
"""As llava-interleave's SigLIP: no attention-pooling head, the last layer's every token."""
VARIANTS = {
    "clip-llama": ("clip", "llama", {}),
    "siglip-qwen2": ("siglip", "qwen2", {}),
    "siglip-llama-full": ("siglip", "llama", dict(vision_feature_select_strategy="full")),
    "siglip-headless-qwen2": ("siglip", "qwen2", HEADLESS),
    "clip-qwen2-layers-full-tied": ("clip", "qwen2", dict(text_overrides=dict(tie_word_embeddings=True),
                                    vision_feature_layer=[-3, 0, -1], vision_feature_select_strategy="full")),
    "clip-mistral-no-bias-silu": ("clip", "mistral", dict(text_overrides=dict(sliding_window=64),
                                  multimodal_projector_bias=False, projector_hidden_act="silu")),
}


def reference(name: str):
    vision, text, overrides = VARIANTS[name]
    return hf_model(vision, text, **overrides)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The default variant's transformers model and vlkit's load of its folder."""
    hf = reference("clip-llama")
    with pytest.warns(UserWarning, match="preprocessor_config.json"):
        return hf, vlkit.load(save(hf, tmp_path_factory.mktemp("llava")))


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_logits_match_transformers_on_left_padded_batch_with_images(tmp_path, name):
    hf = reference(name)
    model = vlkit.load(save(hf, tmp_path))
    assert isinstance(model, Llava)
    assert (model.vision.head is None) == (model.cfg.vision.pool != "map")  # a headless SigLIP has none to load
    ids, mask, pixels = batch(tokens_per_image(hf))
    assert model.num_image_tokens() == tokens_per_image(hf)
    assert (ids == IMAGE_TOKEN).sum(1).tolist() == [model.num_image_tokens() * n for n in (1, 2, 1)]
    ref = hf_logits(hf, ids, mask, pixels).logits
    out = model(ids, pixels, mask).logits
    assert out.shape == ref.shape
    assert (real(out, mask) - real(ref, mask)).abs().max().item() <= TOL


@torch.no_grad()
def test_loss_with_labels_equals_transformers(pair):
    hf, model = pair
    ids, mask, pixels = batch(tokens_per_image(hf))
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN), -100)
    labels[:, : ids.shape[1] // 2] = -100  # the prompt's first half unsupervised, as a template would
    ref = hf_logits(hf, ids, mask, pixels, labels=labels).loss
    out = model(ids, pixels, mask, labels=labels)
    assert abs(out.loss.item() - ref.item()) <= TOL
    # the loss is next-token cross entropy over the supervised labels
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    keep = targets != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert abs(out.loss.item() - manual.item()) <= 1e-6


def test_loss_trains_the_connector(pair):
    _, model = pair
    ids, mask, pixels = batch(model.num_image_tokens())
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN), -100)
    model.zero_grad()
    model(ids, pixels, mask, labels=labels).loss.backward()
    assert model.connector.linear_1.weight.grad.abs().sum() > 0
    assert model.vision.transformer.blocks[-1].attn.qkv.weight.grad is None  # -2: the last block is not run
    model.zero_grad()


@pytest.mark.parametrize("name", ["clip-llama", "siglip-qwen2"])
def test_greedy_generation_is_token_identical_to_transformers(tmp_path, name):
    hf = reference(name)
    model = vlkit.load(save(hf, tmp_path))
    ids, mask, pixels = batch(tokens_per_image(hf))
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=NEW, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = model.generate(ids, pixels, mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    assert got.shape == (3, NEW)
    assert torch.equal(got, want)


def test_generation_options_reach_the_engine(pair):
    """Beam search and several samples per prompt run through the same engine (one row each per return)."""
    hf, model = pair
    ids, mask, pixels = batch(tokens_per_image(hf))
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, num_beams=3,
                           num_return_sequences=2, do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = model.generate(ids, pixels, mask, max_new_tokens=6, num_beams=3, num_return_sequences=2, eos_token_id=None)
    assert torch.equal(got, want)
    with pytest.raises(VlkitError, match="attention_mask must pad on the left"):
        model.generate(*_right_padded(model), max_new_tokens=2)


def _right_padded(model):
    ids, mask, pixels = batch(model.num_image_tokens(), side="right")
    return ids, pixels, mask


@torch.no_grad()
def test_right_padding_gives_each_prompt_its_own_logits(pair):
    _, model = pair
    left_ids, left_mask, pixels = batch(model.num_image_tokens())
    ids, pixels_, mask = _right_padded(model)
    assert torch.equal(pixels, pixels_)
    left = real(model(left_ids, pixels, left_mask).logits, left_mask)
    right = real(model(ids, pixels, mask).logits, mask)
    assert (left - right).abs().max().item() <= TOL
    alone = model(ids[2:, : int(mask[2].sum())], pixels[3:]).logits[0]  # the third prompt, unpadded, its one image
    assert (alone - model(ids, pixels, mask).logits[2, : int(mask[2].sum())]).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", ["newer", "older"])
@torch.no_grad()
def test_every_key_layout_loads(tmp_path, pair, layout):
    """transformers 5 writes ``language_model.model.*`` and ``vision_tower.*``; 4.52+ wrote ``model.language_model.*``,
    ``model.vision_tower.vision_model.*``, ``lm_head.*``; the hub's older folders ``vision_tower.vision_model.*``."""
    hf, _ = pair
    folder = rename_keys(save(hf, tmp_path), NEWER if layout == "newer" else OLDER)
    with pytest.warns(UserWarning):
        model = vlkit.load(folder)
    ids, mask, pixels = batch(tokens_per_image(hf))
    ref = hf_logits(hf, ids, mask, pixels).logits
    assert (real(model(ids, pixels, mask).logits, mask) - real(ref, mask)).abs().max().item() <= TOL


def test_tokenizer_generation_defaults_and_processor_attach(tmp_path):
    from _lm_util import chatml_folder

    hf = hf_model(text_overrides=dict(vocab_size=400))
    folder = save(hf, tmp_path)
    chatml_folder(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(folder)
    transformers.GenerationConfig(max_new_tokens=5, eos_token_id=7, pad_token_id=0).save_pretrained(folder)
    model = vlkit.load(folder)
    assert model.tokenizer.encode("a red circle") == model.tokenizer.encode("a red circle") != []
    assert model.generation_config.max_new_tokens == 5 and model.generation_config.eos_ids == [7]
    assert model.processor.size == IMAGE_SIZE
    ids, mask, pixels = batch(tokens_per_image(hf))
    assert model.generate(ids, pixels, mask, eos_token_id=None).shape == (3, 5)  # the folder's max_new_tokens
    save_model(tmp_path / "native", model, "llava")  # and they travel with the native and the exported folder
    from vlkit.interop.export import to_hf

    to_hf(model, tmp_path / "hf")
    for copy in (vlkit.load(tmp_path / "native"), vlkit.load(tmp_path / "hf")):
        assert copy.tokenizer.encode("a red circle") == model.tokenizer.encode("a red circle")
        assert copy.generation_config == model.generation_config and copy.processor.size == IMAGE_SIZE




def hf_reload(folder):
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("name", ["clip-llama", "siglip-qwen2", "siglip-headless-qwen2", "clip-qwen2-layers-full-tied"])
@torch.no_grad()
def test_convert_to_hf_gives_transformers_the_same_logits(tmp_path, name):
    hf = reference(name)
    src = save(hf, tmp_path / "src")
    transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(src)
    assert convert("--to", "hf", str(src), str(tmp_path / "out")) == 0
    again = hf_reload(tmp_path / "out")
    ids, mask, pixels = batch(tokens_per_image(hf))
    ref = hf_logits(hf, ids, mask, pixels).logits
    assert (real(hf_logits(again, ids, mask, pixels).logits, mask) - real(ref, mask)).abs().max().item() <= TOL
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["image_processor_type"] == "CLIPImageProcessor"


def tiny(connector: str, **options) -> Llava:
    """A random vlkit LLaVA, every weight moved off its initial value."""
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision=ViTConfig(image_size=IMAGE_SIZE, patch_size=PATCH, width=32, depth=2, num_heads=4),
        lm=LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128),
        connector=connector, connector_options=options, image_token_id=IMAGE_TOKEN,
    )
    return perturb(Llava(cfg), scale=0.1)


@pytest.mark.parametrize("connector,options", [("linear", {}), ("linear", {"bias": False}), ("mlp", {"act": "gelu"})])
@torch.no_grad()
def test_vlkit_llava_exports_and_round_trips(tmp_path, connector, options):
    from vlkit.interop.export import to_hf

    model = tiny(connector, **options)
    ids, mask, pixels = batch(model.num_image_tokens())
    want = model(ids, pixels, mask).logits
    save_model(tmp_path / "native", model, "llava")
    native = vlkit.load(tmp_path / "native")
    assert native.cfg == model.cfg
    assert (native(ids, pixels, mask).logits - want).abs().max().item() == 0
    to_hf(native, tmp_path / "hf")
    theirs = hf_reload(tmp_path / "hf")
    assert (real(hf_logits(theirs, ids, mask, pixels).logits, mask) - real(want, mask)).abs().max().item() <= TOL
    back = vlkit.load(tmp_path / "hf")
    assert back.cfg.connector == connector and back.cfg.connector_options.get("bias", True) == options.get("bias", True)
    assert (real(back(ids, pixels, mask).logits, mask) - real(want, mask)).abs().max().item() <= TOL


def test_export_refuses_what_transformers_llava_cannot_express(tmp_path):
    from vlkit.interop.export import to_hf

    with pytest.raises(ValueError, match="connector hidden width 48"):
        to_hf(tiny("mlp", hidden=48), tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- bad input
def test_image_token_count_mismatch_names_both_counts(pair):
    _, model = pair
    ids, mask, pixels = batch(model.num_image_tokens())
    with pytest.raises(VlkitError, match=r"64 image tokens .*per row \[16, 32, 16\].* give 48 features \(3 images × 16\)"):
        model(ids, pixels[:3], mask)
    with pytest.raises(VlkitError, match=r"hold 64 image tokens .* give 80 features"):
        model(ids, torch.cat([pixels, pixels[:1]]), mask)
    extra = ids.clone()
    extra[0, -1] = IMAGE_TOKEN
    with pytest.raises(VlkitError, match=r"65 image tokens .* 64 features"):
        model(extra, pixels, mask)


def test_missing_pixel_values_and_bad_pixels_are_named(pair):
    _, model = pair
    ids, mask, pixels = batch(model.num_image_tokens())
    with pytest.raises(VlkitError, match=r"input_ids hold 64 image tokens \(id 99\) but no pixel_values"):
        model(ids, attention_mask=mask)
    with pytest.raises(VlkitError, match=r"no pixel_values"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(VlkitError, match=r"pixel_values must be \[images, 3, H, W\].*\(3, 32, 32\)"):
        model(ids, pixels[0], mask)
    with pytest.raises(VlkitError, match="float tensor"):
        model(ids, pixels.long(), mask)
    with pytest.raises(VlkitError, match="takes no image_sizes"):
        model(ids, pixels, mask, image_sizes=[(32, 32)] * 4)
    with pytest.raises(VlkitError, match=r"labels have shape \(3, 5\)"):
        model(ids, pixels, mask, labels=ids[:, :5])
    text_only = ids.masked_fill(ids == IMAGE_TOKEN, 5)
    assert model(text_only, attention_mask=mask).logits.shape == (*ids.shape, VOCAB)  # no images, no image tokens: fine


def test_config_checks():
    base = dict(vision=ViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4),
                lm=LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"vision_feature_layer .* 3 hidden states \(-3\.\.2\), got -4"):
        LlavaConfig(**base, vision_feature_layer=-4, image_token_id=10)
    with pytest.raises(ValueError, match="got \\(\\)"):
        LlavaConfig(**base, vision_feature_layer=(), image_token_id=10)
    with pytest.raises(ValueError, match="image_token_id 50 is outside the LM's vocabulary of 50"):
        LlavaConfig(**base, image_token_id=50)
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        LlavaConfig(**base, image_token_id=10, vision_feature_select_strategy="cls")
    with pytest.raises(ValueError, match="unknown key"):
        LlavaConfig(**base, image_token_id=10, connector_options={"widht": 3})
    assert LlavaConfig(**base, image_token_id=10, vision_feature_layer=[0, -1]).feature_layers == (0, 2)


def test_unsupported_folders_are_named(tmp_path, pair):
    hf, _ = pair
    folder = save(hf, tmp_path / "a")
    cfg = json.loads((folder / "config.json").read_text())
    edit_config(folder, text_config={**cfg["text_config"], "model_type": "gemma"})
    with pytest.raises(ValueError, match="text_config model_type 'gemma' is not supported"):
        vlkit.load(folder)
    folder = rename_keys(save(hf, tmp_path / "b"), (("multi_modal_projector.", "projector."),))
    with pytest.raises(CheckpointError, match="no LLaVA projector found; expected one of the keys multi_modal_projector.linear_1.weight"):
        vlkit.load(folder)
    folder = edit_config(save(hf, tmp_path / "c"), projector_hidden_act="linear")
    with pytest.raises(ValueError, match="'linear' is supported only with an identity linear_2"):
        vlkit.load(folder)
