"""LLaVA-NeXT loaded from transformers folders gives transformers' logits (within 1e-4) and greedy tokens on a
left-padded batch with images of different aspect ratios (tokens expanded as transformers' processor
expands them); LLaVA-NeXT-Video's pooled frames likewise; the packing of tiles (unpadding, newlines) and the
2x2 frame pooling against written-out references; vlkit's processor and answerer against transformers'
processor and generate; native round trip; named errors."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402
from vlkit.errors import CheckpointError, VlkitError  # noqa: E402
from vlkit.lm import LlamaConfig  # noqa: E402
from vlkit.models.llava_processor import LlavaAnswerer  # noqa: E402
from vlkit.models.llava_next import AnyResImages, LlavaNext, LlavaNextConfig, LlavaNextProcessor, pool_frames  # noqa: E402
from vlkit.train.checkpoint import save_model  # noqa: E402
from vlkit.vision import anyres  # noqa: E402
from vlkit.vision.vit import ViTConfig  # noqa: E402

from _llava_models import IMAGE_SIZE, IMAGE_TOKEN, NEWER, PATCH, edit_config, rename_keys  # noqa: E402
from _llava_next_models import FRAMES, IMAGES, PINPOINTS, VIDEO_TOKEN, batch, hf_model, hf_processor, random_image  # noqa: E402
from _lm_models import hf_positions, real  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*no (preprocessor_config|tokenizer).json:UserWarning")

TOL = 1e-4
NEW = 12
VARIANTS = {
    "clip-llama": ("clip", "llama", {}),
    "siglip-qwen2-full": ("siglip", "qwen2", dict(vision_feature_select_strategy="full")),
    "clip-mistral-layers-silu": ("clip", "mistral", dict(vision_feature_layer=[-3, -1], projector_hidden_act="silu")),
}


def load(hf, folder):
    hf.save_pretrained(folder)
    return vlkit.load(folder)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_model()
    return hf, load(hf, tmp_path_factory.mktemp("next"))


@pytest.fixture(scope="module")
def video_pair(tmp_path_factory):
    hf = hf_model(video=True, seed=3)
    return hf, load(hf, tmp_path_factory.mktemp("next_video"))


@torch.no_grad()
def hf_forward(hf, ids, mask, pixels, sizes, **kwargs):
    return hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, position_ids=hf_positions(mask),
              **kwargs)


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_logits_match_transformers_with_images_of_different_aspect_ratios(tmp_path, name):
    vision, text, overrides = VARIANTS[name]
    hf = hf_model(vision, text, **overrides)
    model = load(hf, tmp_path)
    assert isinstance(model, LlavaNext)
    strategy = overrides.get("vision_feature_select_strategy", "default")
    ids, mask, pixels, sizes, images = batch(hf_processor(strategy=strategy))
    counts = [model.num_image_tokens(im.height, im.width) for im in images]
    assert len(set(counts)) == len(counts)  # four tilings, four token counts
    assert (ids == IMAGE_TOKEN).sum(1).tolist() == [counts[0], counts[1] + counts[2], counts[3]]
    ref = hf_forward(hf, ids, mask, pixels, sizes).logits
    out = model(ids, pixels, mask, image_sizes=sizes).logits
    assert out.shape == ref.shape
    assert (real(out, mask) - real(ref, mask)).abs().max().item() <= TOL


@torch.no_grad()
def test_vlkit_views_give_the_same_logits(pair):
    """vlkit's own AnyRes pixels, every image's views concatenated (no padding views), give transformers' logits."""
    hf, model = pair
    proc = hf_processor()
    ids, mask, pixels, sizes, images = batch(proc)
    views = AnyResImages(vlkit_image_processor(proc), PINPOINTS)
    ours = torch.cat([views(im) for im in images])
    views = sum(anyres.num_views((im.height, im.width), PINPOINTS, IMAGE_SIZE) for im in images)
    assert ours.shape[0] == views < pixels.shape[0] * pixels.shape[1]
    ref = hf_forward(hf, ids, mask, pixels, sizes).logits
    out = model(ids, ours, mask, image_sizes=[(im.height, im.width) for im in images]).logits
    assert (real(out, mask) - real(ref, mask)).abs().max().item() <= TOL


def vlkit_image_processor(proc):
    from vlkit.vision.preprocess import ImageProcessor

    ours = ImageProcessor.from_hf(proc.image_processor.to_dict())
    ours.alpha_background = 255
    return ours


def test_greedy_generation_is_token_identical_to_transformers(pair):
    hf, model = pair
    ids, mask, pixels, sizes, _ = batch(hf_processor())
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, max_new_tokens=NEW,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = model.generate(ids, pixels, mask, image_sizes=sizes, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    assert got.shape == (3, NEW)
    assert torch.equal(got, want)


@torch.no_grad()
def test_video_logits_and_greedy_tokens_match_llava_next_video(video_pair):
    """Two prompts with a clip of frames each (and images), one with images only: pooled frame tokens
    placed at the video token, as transformers' LLaVA-NeXT-Video does."""
    hf, model = video_pair
    assert model.cfg.video_token_id == VIDEO_TOKEN and model.cfg.video_pool == "average"
    per_video = model.num_video_tokens(FRAMES)
    assert per_video == FRAMES * (IMAGE_SIZE // PATCH // 2) ** 2
    ids, mask, pixels, sizes, _ = batch(hf_processor(), videos=(per_video, 0, per_video))
    videos = torch.randn(2, FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    ref = hf_forward(hf, ids, mask, pixels, sizes, pixel_values_videos=videos).logits
    out = model(ids, pixels, mask, image_sizes=sizes, pixel_values_videos=videos).logits
    assert (real(out, mask) - real(ref, mask)).abs().max().item() <= TOL
    want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, pixel_values_videos=videos,
                       max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = model.generate(ids, pixels, mask, image_sizes=sizes, pixel_values_videos=videos, max_new_tokens=NEW,
                         do_sample=False, eos_token_id=None)
    assert torch.equal(got, want)


def test_frame_pooling_against_a_written_out_reference():
    """Each 2x2 block of a frame's patch grid, row by row, averaged (or maxed); an odd last row/column dropped."""
    g = torch.Generator().manual_seed(0)
    for side in (4, 5):
        tokens = torch.randn(3, side * side, 6, generator=g)
        half = side // 2
        for mode, reduce in (("average", lambda t: t.mean(0)), ("max", lambda t: t.max(0).values)):
            expected = torch.empty(3, half * half, 6)
            for f in range(3):
                for r in range(half):
                    for c in range(half):
                        block = [tokens[f, (2 * r + dr) * side + 2 * c + dc] for dr in (0, 1) for dc in (0, 1)]
                        expected[f, r * half + c] = reduce(torch.stack(block))
            assert torch.allclose(pool_frames(tokens, side, 2, mode), expected, atol=1e-6), (side, mode)
    with pytest.raises(VlkitError, match="4x4 patch grid"):
        pool_frames(torch.zeros(1, 17, 6), 4)


def tiny_config(**overrides) -> LlavaNextConfig:
    fields = dict(vision=ViTConfig(image_size=8, patch_size=4, width=16, depth=2, num_heads=2),
                  lm=LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=256),
                  image_token_id=49, image_grid_pinpoints=((8, 16), (16, 8), (16, 16), (24, 8)))
    return LlavaNextConfig(**{**fields, **overrides})


def test_packing_against_a_written_out_reference():
    """A 2x2-tile image of 12x20 pixels (wider than its grid): the global view's 4 tokens, then the 4x4
    grid of tile patches (tile by tile, row by row) with its top and bottom rows cut, a newline after each row."""
    model = LlavaNext(tiny_config())
    size = (12, 20)
    assert anyres.grid_shape(size, model.cfg.image_grid_pinpoints, 8) == (2, 2)
    features = torch.arange(5 * 4, dtype=torch.float32).view(5, 4, 1).expand(5, 4, 8).clone()  # token value = view*4 + patch
    packed = model.pack(features, size)
    newline = model.image_newline.detach()
    grid = [[None] * 4 for _ in range(4)]
    for tile in range(4):
        for patch in range(4):
            row, col = (tile // 2) * 2 + patch // 2, (tile % 2) * 2 + patch % 2
            grid[row][col] = features[1 + tile, patch]
    keep = anyres.unpadded_shape(size, (4, 4))
    assert keep == (2, 4)  # 12 * (4 / 20) = 2.4 → 2 rows, one cut from the top and one from the bottom
    expected = list(features[0]) + [t for row in grid[1:3] for t in [*row, newline]]
    assert packed.shape == (4 + 2 * 5, 8) == (model.num_image_tokens(*size), 8)
    assert torch.equal(packed, torch.stack(expected))


@torch.no_grad()
def test_native_round_trip_and_newer_key_layout(tmp_path, pair):
    hf, model = pair
    ids, mask, pixels, sizes, _ = batch(hf_processor())
    want = model(ids, pixels, mask, image_sizes=sizes).logits
    save_model(tmp_path / "native", model, "llava_next")
    native = vlkit.load(tmp_path / "native")
    assert isinstance(native, LlavaNext) and native.cfg == model.cfg
    assert torch.equal(native(ids, pixels, mask, image_sizes=sizes).logits, want)
    hf.save_pretrained(tmp_path / "newer")
    rename_keys(tmp_path / "newer", (*NEWER, ("image_newline", "model.image_newline")))
    newer = vlkit.load(tmp_path / "newer")
    assert torch.equal(newer(ids, pixels, mask, image_sizes=sizes).logits, want)


def test_export_to_transformers_is_refused_by_name(tmp_path, pair):
    """vlkit reads LLaVA-NeXT folders but does not write them yet: convert says so, writes nothing."""
    from vlkit.cli import main

    _, model = pair
    save_model(tmp_path / "native", model, "llava_next")
    assert main(["convert", "--to", "hf", str(tmp_path / "native"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def with_files(tmp_path_factory):
    """A tiny LLaVA-NeXT saved with a real BPE tokenizer (``<image>`` is id 3) and LlavaNextImageProcessor's
    config, and vlkit's load of the folder."""
    from test_llava_processor import IMAGE_ID, tokenizer_folder

    folder = tmp_path_factory.mktemp("next_files")
    hf = hf_model(vocab=400, image_token=IMAGE_ID)
    hf.save_pretrained(folder)
    tokenizer_folder(folder)
    hf_processor().image_processor.save_pretrained(folder)
    return hf, vlkit.load(folder), folder


def hf_full_processor(folder):
    return transformers.LlavaNextProcessor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(folder, backend="pil"),
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder), patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)


PROMPTS = ["USER: <image>\nWhat is the color of the circle? ASSISTANT:",
           "USER: <image> and <image>\nHow many shapes are there? ASSISTANT:", "Describe the image."]


def test_processor_expands_and_tiles_as_transformers_does(with_files):
    """vlkit's LlavaNextProcessor: the same ids (each image's own count), mask, sizes and views (concatenated,
    where transformers pads every image to the most views)."""
    _, model, folder = with_files
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(IMAGES[:3])]
    ref = hf_full_processor(folder)(text=PROMPTS, images=images, padding=True, padding_side="left", return_tensors="pt")
    got = LlavaNextProcessor.for_model(model, template="llava_v1")(PROMPTS, images)
    assert sorted(got) == ["attention_mask", "image_sizes", "input_ids", "pixel_values"]
    assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["attention_mask"], ref["attention_mask"])
    assert torch.equal(got["image_sizes"], ref["image_sizes"])
    views = [anyres.num_views(tuple(s), PINPOINTS, IMAGE_SIZE) for s in ref["image_sizes"].tolist()]
    expected = torch.cat([p[:n] for p, n in zip(ref["pixel_values"], views)])
    assert got["pixel_values"].shape == expected.shape
    assert (got["pixel_values"] - expected).abs().max() <= 1e-4


def test_the_eval_contract_answers_as_transformers_does(with_files):
    """``LlavaAnswerer`` with the LLaVA-NeXT processor gives the answers transformers' processor and greedy
    ``generate`` give for the same rendered prompts."""
    from test_llava_processor import transformers_answers

    hf, model, folder = with_files
    answerer = LlavaAnswerer(model, LlavaNextProcessor.for_model(model, template="llava_v1"))
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(IMAGES[:3])]
    prompts = ["What is the color of the circle?", "Describe the image.", "How many shapes are there?"]
    ours = answerer.generate(images, prompts, max_new_tokens=6)
    ref = hf_full_processor(folder)
    expected = transformers_answers(hf, ref, answerer, images, prompts)
    assert ours == expected
    assert any(ours), "every answer empty: the comparison would say nothing"


def test_training_batch_gives_transformers_loss(with_files):
    """Conversations through vlkit's processor (right-padded, labels on the answers, views concatenated with
    image_sizes) give transformers' loss on the same batch; gradients reach the newline and the connector."""
    from test_llava_processor import CONVERSATIONS

    hf, model, _ = with_files
    processor = LlavaNextProcessor.for_model(model, template="llava_v1")
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(IMAGES[:3])]
    samples = [processor.encode(c, imgs) for c, imgs in zip(CONVERSATIONS, [images[:2], images[2:3], []])]
    batch_ = processor.collate(samples)
    assert batch_["image_sizes"].tolist() == [[im.height, im.width] for im in images]
    with torch.no_grad():
        ref = hf(**batch_).loss
    model.zero_grad()
    loss = model(**batch_).loss
    assert abs(loss.item() - ref.item()) <= TOL
    loss.backward()
    assert model.image_newline.grad.abs().sum() > 0 and model.connector.linear_1.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_bad_inputs_are_named_errors(pair, video_pair):
    _, model = pair
    ids, mask, pixels, sizes, _ = batch(hf_processor())
    with pytest.raises(VlkitError, match="needs image_sizes"):
        model(ids, pixels, mask)
    with pytest.raises(VlkitError, match="one \\(height, width\\) pair"):
        model(ids, pixels, mask, image_sizes=[(50, 90)] * 3 + [(0, 4)])
    with pytest.raises(VlkitError, match="hold 4 images of up to 5 views; image_sizes ask for 3 images"):
        model(ids, pixels, mask, image_sizes=sizes[:3])
    views = [anyres.num_views(tuple(s), PINPOINTS, IMAGE_SIZE) for s in sizes.tolist()]
    flat = torch.cat([p[:n] for p, n in zip(pixels, views)])
    with pytest.raises(VlkitError, match=f"hold {sum(views) - 1} views but image_sizes ask for {sum(views)}"):
        model(ids, flat[:-1], mask, image_sizes=sizes)
    short = ids.clone()
    short[0, (ids[0] == IMAGE_TOKEN).nonzero()[0, 0]] = 5
    with pytest.raises(VlkitError, match="image tokens"):
        model(short, pixels, mask, image_sizes=sizes)
    with pytest.raises(VlkitError, match="without a video_token_id"):
        model(ids, pixels, mask, image_sizes=sizes, pixel_values_videos=torch.zeros(1, 2, 3, IMAGE_SIZE, IMAGE_SIZE))
    _, video = video_pair
    per_video = video.num_video_tokens(FRAMES)
    ids, mask, pixels, sizes, _ = batch(hf_processor(), videos=(per_video, 0, 0))
    with pytest.raises(VlkitError, match=f"hold {per_video} video tokens .* but no pixel_values_videos"):
        video(ids, pixels, mask, image_sizes=sizes)
    with pytest.raises(VlkitError, match=f"hold {per_video} video tokens .* give {per_video * 2} features"):
        video(ids, pixels, mask, image_sizes=sizes, pixel_values_videos=torch.zeros(2, FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(VlkitError, match="must be \\[videos, frames, 3, H, W\\]"):
        video(ids, pixels, mask, image_sizes=sizes, pixel_values_videos=torch.zeros(FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE))


def test_processor_tiles_must_be_the_towers_size(with_files):
    from vlkit.vision.preprocess import ImageProcessor

    _, model, _ = with_files
    kept = model.processor
    try:
        model.processor = ImageProcessor(size=48, crop_size=48)
        with pytest.raises(VlkitError, match="48-pixel views but the vision tower takes 32"):
            LlavaNextProcessor.for_model(model)
    finally:
        model.processor = kept


def test_configs_that_cannot_tile_are_refused():
    with pytest.raises(ValueError, match="multiples of the tile size 8"):
        tiny_config(image_grid_pinpoints=((8, 12),))
    with pytest.raises(ValueError, match="video_token_id 49 must be an id"):
        tiny_config(video_token_id=49)
    with pytest.raises(ValueError, match="2x2 patch grid.*give 1"):
        LlavaNext(tiny_config(connector="pixel_shuffle", connector_options={"factor": 2}))
    with pytest.raises(ValueError, match="give 5"):
        LlavaNext(tiny_config(vision_feature_select_strategy="full"))  # CLIP's class token kept: not a grid


def test_bad_folders_are_named(tmp_path, pair):
    hf, _ = pair
    hf.save_pretrained(tmp_path)
    edit_config(tmp_path, image_grid_pinpoints=[[32, 40]])
    with pytest.raises(ValueError, match="config.json: image_grid_pinpoints\\[0\\]"):
        vlkit.load(tmp_path)
    edit_config(tmp_path, image_grid_pinpoints=PINPOINTS)
    hf_processor(pinpoints=PINPOINTS[:3]).image_processor.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="preprocessor_config.json: image_grid_pinpoints .* differ from config.json"):
        vlkit.load(tmp_path)
    hf_processor().image_processor.save_pretrained(tmp_path)
    edit_config(tmp_path, model_type="llava_next_video", spatial_pool_mode="conv", video_token_index=VIDEO_TOKEN)
    with pytest.raises(ValueError, match="spatial_pool_mode 'conv' is not supported"):
        vlkit.load(tmp_path)
