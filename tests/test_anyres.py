"""AnyRes tiling against transformers' own LLaVA-NeXT functions: best-resolution selection (ties
included), the tile grid, unpadding, the processor's per-image token count and its pixel values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlkit.errors import VlkitError
from vlkit.vision import anyres
from vlkit.vision.preprocess import ImageProcessor

transformers = pytest.importorskip("transformers")
from transformers.image_processing_utils import select_best_resolution as hf_select  # noqa: E402
from transformers.models.llava_next import modeling_llava_next as hf_next  # noqa: E402

from _llava_next_models import hf_processor  # noqa: E402

SMALL = dict(tile=32, patch=8)
"""A tiny tower: 32-pixel tiles of 8-pixel patches (a 4x4 feature grid per tile)."""
REAL = dict(tile=336, patch=14)
"""CLIP ViT-L/14-336, as llava-v1.6 uses."""

CONFIGS = {
    "small_default": (SMALL, anyres.grid_pinpoints(32)),
    "small_range": (SMALL, anyres.grid_pinpoints(32, anyres.grid_range((1, 1), (3, 3)))),
    "real_default": (REAL, anyres.grid_pinpoints(336)),
    "real_range": (REAL, anyres.grid_pinpoints(336, anyres.grid_range((1, 1), (6, 6)))),
}

SIZES = [(h, w) for h in (1, 2, 5, 16, 31, 32, 33, 50, 64, 65, 96, 97, 100, 127, 200, 333, 336, 337, 500, 672, 1000, 1008, 2000)
         for w in (1, 3, 17, 32, 45, 64, 90, 100, 128, 250, 336, 640, 671, 672, 1007, 1344, 3000)]
SIZES += [(47, 94), (49, 49), (94, 47), (49, 147), (98, 147), (44, 55), (47, 47), (88, 55), (55, 176), (47, 1128)]
"""Square, wide, tall, smaller and larger than every pinpoint, on and next to tile multiples; the
last ten are sizes whose unpadded grid side is a float just below an integer (49 * (4 / 49)),
which transformers rounds to 7 places before truncating."""

sizes = st.tuples(st.integers(1, 3000), st.integers(1, 3000))
pinpoint_lists = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=8).map(
    lambda grids: anyres.grid_pinpoints(32, grids))


def test_grid_pinpoints_are_transformers_defaults():
    assert anyres.grid_pinpoints(336) == [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    assert [list(p) for p in anyres.grid_pinpoints(336)] == transformers.LlavaNextImageProcessorPil.image_grid_pinpoints
    assert anyres.grid_range((1, 1), (2, 3)) == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]


def test_ties_keep_the_first_listed():
    # A square image fits (32, 64) and (64, 32) equally well: same pixels kept, same waste.
    assert anyres.select_best_resolution((100, 100), [(32, 64), (64, 32)]) == (32, 64)
    assert anyres.select_best_resolution((100, 100), [(64, 32), (32, 64)]) == (64, 32)
    # Same pixels kept (the whole 20x20 image), less waste wins whatever the order.
    assert anyres.select_best_resolution((20, 20), [(64, 64), (32, 32)]) == (32, 32)
    assert anyres.select_best_resolution((20, 20), [(32, 32), (64, 64)]) == (32, 32)
    # More pixels kept beats less waste.
    assert anyres.select_best_resolution((100, 100), [(32, 32), (64, 64)]) == (64, 64)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_selection_grid_and_views_match_transformers(name):
    dims, pinpoints = CONFIGS[name]
    lists = [list(p) for p in pinpoints]
    for size in SIZES:
        assert anyres.select_best_resolution(size, pinpoints) == hf_select(size, lists), size
        assert anyres.grid_shape(size, pinpoints, dims["tile"]) == hf_next.get_anyres_image_grid_shape(size, lists, dims["tile"])
        assert anyres.num_views(size, pinpoints, dims["tile"]) == hf_next.image_size_to_num_patches(size, lists, dims["tile"])


@settings(max_examples=300, deadline=None)
@given(size=sizes, pinpoints=pinpoint_lists)
def test_selection_matches_transformers_on_any_list(size, pinpoints):
    # Random lists repeat grids and hold mirrored ones, so ties in kept pixels and waste are common.
    assert anyres.select_best_resolution(size, pinpoints) == hf_select(size, [list(p) for p in pinpoints])


@settings(max_examples=300, deadline=None)
@given(size=sizes, grid=st.tuples(st.integers(1, 40), st.integers(1, 40)))
@example(size=(49, 49), grid=(9, 4)).via("49 * (4 / 49) is just below 4")
@example(size=(49, 49), grid=(4, 9)).via("the same along the width")
def test_unpad_matches_transformers(size, grid):
    features = torch.arange(grid[0] * grid[1], dtype=torch.float32).view(*grid, 1)
    expected = hf_next.unpad_image(features.permute(2, 0, 1), list(size)).permute(1, 2, 0)
    got = anyres.unpad(features, size)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert anyres.unpadded_shape(size, grid) == tuple(expected.shape[:2])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_token_count_matches_the_processor(name):
    dims, pinpoints = CONFIGS[name]
    for strategy in ("default", "full"):  # CLIP (class token dropped) and SigLIP (no class token)
        proc = hf_processor(pinpoints, dims["tile"], dims["patch"], strategy)
        for h, w in SIZES:
            expected = proc._get_number_of_features(h, w, dims["tile"], dims["tile"]) - (strategy == "default")
            assert anyres.num_image_tokens((h, w), pinpoints, **dims) == expected, (h, w, strategy)


def _image(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


PIXEL_CASES = [(50, 90, "RGB"), (90, 50, "RGB"), (32, 32, "RGB"), (64, 64, "RGB"), (33, 65, "RGB"), (7, 300, "RGB"),
               (300, 7, "RGB"), (1, 1, "RGB"), (120, 40, "L"), (45, 61, "RGBA"), (200, 199, "RGB")]


def test_pixels_and_expansion_match_the_processor():
    """Pixel values of the global view and every tile, and the number of ``<image>`` tokens the
    processor writes into the prompt, image by image."""
    pinpoints = CONFIGS["small_range"][1]
    proc = hf_processor(pinpoints, **SMALL)
    ours = ImageProcessor.from_hf(proc.image_processor.to_dict())
    ours.alpha_background = 255
    for h, w, mode in PIXEL_CASES:
        image = _image(h, w, seed=h * w, mode=mode)
        ref = proc(images=[image], text=["hi <image> hi"], return_tensors="pt")
        got = anyres.anyres_pixels(image, ours, pinpoints)
        expected = ref["pixel_values"][0]
        assert got.shape == expected.shape, (h, w, got.shape, expected.shape)
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-4, f"{h}x{w} {mode}: max abs difference {diff}"
        assert ref["image_sizes"][0].tolist() == [h, w]
        assert int((ref["input_ids"] == 1).sum()) == anyres.num_image_tokens((h, w), pinpoints, **SMALL), (h, w)


def test_pinpoints_are_checked():
    assert anyres.check_pinpoints([[32, 64], (64, 32)], 32) == [(32, 64), (64, 32)]
    for bad in ([], "(1x1)", [[32, 40]], [[32]], [[0, 32]], [[32.0, 64]], None):
        with pytest.raises(VlkitError, match="image_grid_pinpoints"):
            anyres.check_pinpoints(bad, 32)


def test_bad_images_are_named_errors():
    proc = ImageProcessor(size=32, crop_size=32)
    with pytest.raises(VlkitError, match="PIL image"):
        anyres.anyres_pixels(np.zeros((4, 4, 3)), proc, anyres.grid_pinpoints(32))
    with pytest.raises(VlkitError, match="no resolution fits"):
        anyres.anyres_pixels(_image(5, 5), proc, [])
    assert anyres.anyres_pixels(_image(1, 3000), proc, [(32, 32)]).shape == (2, 3, 32, 32)  # a 1x32 strip, padded
