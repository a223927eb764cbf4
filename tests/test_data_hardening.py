"""Hardening of data loading: bounded work for odd images, whole pack folders, verified
images, one bad-record rule with skips recorded, paths kept inside the dataset folder."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from vlkit.errors import VlkitError
from vlkit.vision import preprocess
from vlkit.vision.preprocess import ImageProcessor

# --- item: a tiny but extremely wide image -----------------------------------------------------

WIDE_IMAGE_PEAK = textwrap.dedent(
    """
    import resource, sys
    from PIL import Image
    from vlkit.vision.preprocess import ImageProcessor
    width, size = int(sys.argv[1]), int(sys.argv[2])
    image = Image.new("RGB", (width, 1), (10, 20, 30))
    processor = ImageProcessor(size=size, crop_size=size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shape = tuple(processor(image).shape)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(shape, (after - before) // 1024)
    """
)


@pytest.mark.parametrize("width, size", [(30_000, 32), (100_000, 224)])
def test_wide_image_preprocessing_memory_is_bounded_by_the_output(width, size):
    """A 30000x1 image at size 32 took 557 MB before (its 960000x32 resize, then float32);
    100000x1 at the default 224 took 7.7 GB. Now the work follows the crop the model sees."""
    run = subprocess.run([sys.executable, "-c", WIDE_IMAGE_PEAK, str(width), str(size)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    shape, grown_mb = run.stdout.split(")")
    assert shape == f"(3, {size}, {size}"
    assert int(grown_mb) < 40, f"peak memory grew by {grown_mb} MB"


def smooth(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([128 + 100 * np.sin(x / 37.0), 128 + 100 * np.cos(y / 23.0), (x + y) % 256], axis=-1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.mark.parametrize("size, crop", [(32, 32), (32, 40), (32, 24)])
@pytest.mark.parametrize("width, height", [(3000, 20), (20, 3000), (600, 500)])
def test_bounded_resize_agrees_with_the_full_resize(monkeypatch, size, crop, width, height):
    """Past the pixel budget only the kept region is resized; it matches the crop of the full resize."""
    processor = ImageProcessor(size=size, crop_size=crop)
    image = smooth(width, height)
    exact = processor(image)
    monkeypatch.setattr(preprocess, "MAX_RESIZE_PIXELS", 1)
    bounded = processor(image)
    assert bounded.shape == exact.shape == (3, crop, crop)
    assert (bounded - exact).abs().max().item() < 0.1  # a few grey levels of 255 at most


def test_without_a_crop_a_huge_resize_is_refused():
    processor = ImageProcessor(size=224, crop_size=None)
    with pytest.raises(VlkitError, match=r"100000x1 image.*22400000x224.*crop_size"):
        processor(Image.new("RGB", (100_000, 1)))
    assert processor(Image.new("RGB", (300, 200))).shape == (3, 224, 336)
