"""vlkit's ImageProcessor, read from a ``preprocessor_config.json``, reproduces transformers'
PIL-based CLIP and SigLIP image processors on real photographs and odd inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

from vlkit.interop.common import attach_processor  # noqa: E402

TOL = 1e-4


def photos() -> dict[str, Image.Image]:
    """Real photographs bundled with scikit-image (no download)."""
    return {name: Image.fromarray(getattr(skimage_data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")}


def odd_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (45, 61, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 61, dtype=np.uint8)[None, :]
    palette = Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).convert("P")
    palette.info["transparency"] = 0
    return {
        "tiny": Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)),
        "wide": Image.fromarray(rng.integers(0, 256, (12, 700, 3), dtype=np.uint8)),
        "tall": Image.fromarray(rng.integers(0, 256, (500, 9, 3), dtype=np.uint8)),
        "gray": Image.fromarray(skimage_data.camera()),
        "rgba": Image.fromarray(rgba, "RGBA"),
        "gray_alpha": Image.fromarray(rng.integers(0, 256, (33, 40, 2), dtype=np.uint8), "LA"),
        "palette_transparent": palette,
    }


class _Holder:
    processor = None


def vlkit_processor(folder):
    holder = _Holder()
    attach_processor(holder, folder)
    return holder.processor


PROCESSORS = {
    "clip": lambda: transformers.CLIPImageProcessorPil(),
    "clip_bilinear_336": lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                                     resample=2),
    "siglip": lambda: transformers.SiglipImageProcessorPil(),
    "siglip_384": lambda: transformers.SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.1, 0.2, 0.3],
                                                               image_std=[0.9, 0.8, 0.7]),
}


@pytest.mark.parametrize("kind", sorted(PROCESSORS))
def test_matches_transformers(tmp_path, kind):
    ref = PROCESSORS[kind]()
    ref.save_pretrained(tmp_path)
    ours = vlkit_processor(tmp_path)
    worst = 0.0
    for name, image in {**photos(), **odd_images()}.items():
        expected = torch.from_numpy(np.asarray(ref(images=image, return_tensors="np")["pixel_values"][0]))
        got = ours(image)
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        diff = (got - expected).abs().max().item()
        assert diff <= TOL, f"{kind}/{name}: max abs difference {diff}"
        worst = max(worst, diff)
    print(f"{kind}: worst max-abs difference {worst:.2e}")
