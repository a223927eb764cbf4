"""Bad images and bad caption records: each is a BadSample naming the file (and line) and the
problem; with ``on_bad_sample='skip'`` they are skipped and counted instead."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlkit.data.images import BadSample, load_image
from vlkit.vision.preprocess import to_rgb
from vlkit.data.pairs import CaptionFolder, Collate, SkippingDataset, Skipped
from vlkit.models.clip import CLIPConfig
from vlkit.text.encoder import TextConfig
from vlkit.text.tokenizer import word_level
from vlkit.train.clip import CLIPRecipe, DataConfig, train_clip
from vlkit.train.loop import LoopConfig, OptimConfig
from vlkit.vision.preprocess import ImageProcessor
from vlkit.vision.vit import ViTConfig


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width``×``height`` RGB pixels (with no real pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def noise(size: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def truncated(tmp_path: Path, fmt: str) -> Path:
    full = tmp_path / f"full.{fmt}"
    noise().save(full)
    data = full.read_bytes()
    path = tmp_path / f"truncated.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    return path


def assert_bad(path: Path, problem: str, **kwargs) -> BadSample:
    with pytest.raises(BadSample) as info:
        load_image(path, **kwargs)
    err = info.value
    assert err.where == str(path) and str(path) in str(err)
    assert problem in err.problem
    return err


def test_missing_file(tmp_path):
    assert_bad(tmp_path / "nowhere.png", "file not found")


@pytest.mark.parametrize("content", [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "corrupt.png"
    path.write_bytes(content)
    assert_bad(path, "corrupt")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_image(tmp_path, fmt):
    path = truncated(tmp_path, fmt)
    assert_bad(path, "truncated")


def test_zero_size_image(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(png_with_header(0, 16))
    with pytest.raises(BadSample) as info:
        load_image(path)
    assert info.value.where == str(path)


def test_image_above_the_pixel_limit(tmp_path):
    path = tmp_path / "big.png"
    noise(64).save(path)
    assert_bad(path, "4096 pixels exceeds the limit of 1000", max_pixels=1000)
    assert load_image(path, max_pixels=4096).size == (64, 64)


@pytest.mark.parametrize(
    "size, problem",
    [((9000, 8000), "exceeds the limit"), ((100_000, 100_000), "decompression bomb")],
    ids=["above-limit", "bomb"],
)
def test_header_claiming_huge_dimensions_is_refused_before_decoding(tmp_path, size, problem):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header(*size))
    assert_bad(path, problem)


def rgb_at(image: Image.Image, tmp_path: Path, name: str) -> tuple[int, int, int]:
    """Save ``image`` losslessly, load it with vlkit and return its top-left pixel."""
    path = tmp_path / name
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == image.size
    return tuple(int(v) for v in np.asarray(loaded)[0, 0])


def test_non_rgb_modes_load_as_rgb_with_sensible_values(tmp_path):
    assert rgb_at(Image.new("L", (4, 4), 100), tmp_path, "l.png") == (100, 100, 100)
    assert rgb_at(Image.new("LA", (4, 4), (100, 255)), tmp_path, "la.png") == (100, 100, 100)
    assert rgb_at(Image.new("LA", (4, 4), (100, 0)), tmp_path, "la0.png") == (0, 0, 0)
    assert rgb_at(Image.new("RGBA", (4, 4), (200, 100, 50, 255)), tmp_path, "rgba.png") == (200, 100, 50)
    half = rgb_at(Image.new("RGBA", (4, 4), (200, 100, 50, 128)), tmp_path, "rgba_half.png")
    assert half == pytest.approx((100, 50, 25), abs=1)

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert rgb_at(palette, tmp_path, "p.png") == (10, 200, 30)
    palette.info["transparency"] = 1
    assert rgb_at(palette, tmp_path, "p_transparent.png") == (0, 0, 0)

    assert rgb_at(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), tmp_path, "cmyk.tif") == (255, 255, 255)
    assert rgb_at(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), tmp_path, "cmyk_red.tif") == (255, 0, 0)

    sixteen = Image.fromarray(np.array([[0, 65535], [32768, 1000]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    path = tmp_path / "i16.png"
    sixteen.save(path)
    values = np.asarray(load_image(path))[..., 0]
    assert values.tolist() == [[0, 255], [127, 3]]


def test_to_rgb_keeps_rgb_untouched():
    image = noise(8)
    assert to_rgb(image) is image


# --- caption records -------------------------------------------------------------------------

PROCESSOR = ImageProcessor(size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
GOOD_CAPTIONS = ["a red square", "a blue circle"]


def write_folder(root: Path, lines: list[str], n_images: int = 2) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for k in range(n_images):
        noise(32, seed=k).save(root / "img" / f"{k}.png")
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def record(image: str = "img/0.png", captions=GOOD_CAPTIONS) -> str:
    return json.dumps({"image": image, "captions": captions})


BAD_RECORDS = {
    "malformed-json": ('{"image": "img/0.png", "captions": ["a red', "malformed JSON"),
    "not-a-record": ('["img/0.png", "a red square"]', r'a JSON list; expected \{"image": path'),
    "captions-not-a-list": (json.dumps({"image": "img/0.png", "captions": "a red square"}), "'captions' is 'a red square'; expected a non-empty list"),
    "empty-caption-list": (record(captions=[]), "'captions' is \\[\\]; expected a non-empty list"),
    "empty-string-captions": (record(captions=["", "   "]), "caption 0 is ''; expected a non-blank string"),
    "caption-not-a-string": (record(captions=["a red square", 7]), "caption 1 is 7; expected a non-blank string"),
    "image-not-a-string": (json.dumps({"image": 3, "captions": ["a"]}), "image path 3; expected a file path"),
    "over-long-caption": (record(captions=["a red square", "word " * 300]), "1500 characters exceeds 1000"),
    "missing-image": (record(image="img/missing.png"), "file not found"),
    "corrupt-image": (record(image="img/corrupt.png"), "corrupt"),
}


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_bad_record_names_file_line_and_problem(tmp_path, name):
    line, problem = BAD_RECORDS[name]
    root = write_folder(tmp_path, [record(), line])
    (root / "img" / "corrupt.png").write_bytes(b"garbage")
    folder = CaptionFolder(root, PROCESSOR)
    [(pixels, caption)] = folder[0]
    assert pixels.shape == (3, 32, 32) and caption in GOOD_CAPTIONS
    for index in (1, 1 + len(folder)):  # every epoch, whichever caption it would pick
        with pytest.raises(BadSample, match=problem) as info:
            folder[index]
        err = info.value  # an image that fails is named by the record that names it, then by its path
        assert (err.where, err.record) == (str(root / "captions.jsonl"), "line 2")
        assert str(err).startswith(f"{root / 'captions.jsonl'}, line 2: ")
        if name in ("missing-image", "corrupt-image"):
            assert err.problem.startswith(f"image {root / json.loads(line)['image']}: ")


def test_missing_captions_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        CaptionFolder(tmp_path, PROCESSOR)


def test_skipping_dataset_and_collate_skip_and_report_bad_samples(tmp_path):
    lines = [record(), BAD_RECORDS["malformed-json"][0], record("img/1.png"), BAD_RECORDS["missing-image"][0]]
    root = write_folder(tmp_path, lines)
    dataset = SkippingDataset(CaptionFolder(root, PROCESSOR))
    items = [dataset[i] for i in range(len(dataset))]
    assert [isinstance(it, Skipped) for it in items] == [False, True, False, True]
    assert "captions.jsonl, line 2: malformed JSON" in items[1].reason
    assert (items[1].skip.record, items[1].skip.reason) == ("line 2", "bad record")
    batch = Collate(word_level(["a", "red", "blue", "square", "circle"], 16))(items)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 2
    assert len(batch["skipped"]) == 2 and str(batch["skipped"][1]).endswith("missing.png: file not found")
    skip = batch["skipped"][1]  # the record that names the image, then the image
    assert (skip.source, skip.record, skip.reason) == (str(root / "captions.jsonl"), "line 4", "bad image")
    assert skip.detail == f"image {root / 'img' / 'missing.png'}: file not found"
    only_bad = Collate(word_level(["a"], 16))([items[1], items[3]])
    assert only_bad == {"skipped": [items[1].skip, items[3].skip]}


# --- end to end: train_clip on a folder with bad records --------------------------------------


def tiny_recipe(source: Path, on_bad_sample: str) -> CLIPRecipe:
    return CLIPRecipe(
        model=CLIPConfig(
            vision=ViTConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, act="gelu"),
            text=TextConfig(context_length=16, width=32, depth=1, num_heads=2, act="gelu"),
            embed_dim=32,
        ),
        data=DataConfig(source=str(source), image_size=32, on_bad_sample=on_bad_sample),
        optim=OptimConfig(warmup_steps=1),
        loop=LoopConfig(steps=3, batch_size=8, precision="fp32", log_every=1),
    )


@pytest.fixture
def folder_with_bad_records(tmp_path):
    """12 records, 3 of them bad: with batches of 8 for 3 steps every record is read twice."""
    good = [record(f"img/{k % 4}.png", [f"a red square number {k}"]) for k in range(9)]
    bad = [BAD_RECORDS["malformed-json"][0], record(captions=[""]), record(image="img/missing.png")]
    lines = good[:3] + bad[:1] + good[3:6] + bad[1:2] + good[6:] + bad[2:]
    return write_folder(tmp_path / "data", lines, n_images=4)


def test_train_clip_skips_and_counts_bad_samples(tmp_path, folder_with_bad_records):
    run = tmp_path / "run"
    summary = train_clip(tiny_recipe(folder_with_bad_records, "skip"), run)
    assert summary["steps"] == 3
    assert summary["skipped"] == 6
    assert summary["samples"] == 3 * 8 - 6
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["skipped"] == 6
    assert all(np.isfinite(m["loss"]) for m in metrics)
    weights = load_file(str(run / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_train_clip_stops_at_the_first_bad_sample_by_default(tmp_path, folder_with_bad_records):
    with pytest.raises(BadSample) as info:
        train_clip(tiny_recipe(folder_with_bad_records, "error"), tmp_path / "run")
    index = str(folder_with_bad_records / "captions.jsonl")
    bad = {(index, "line 4"), (index, "line 8"), (str(folder_with_bad_records / "img" / "missing.png"), "")}
    assert (info.value.where, info.value.record) in bad
    assert str(info.value).startswith(info.value.where)
