"""Python API misuse and incomplete model folders get vlkit's own errors that say what to do:
a PIL image or a list where a tensor belongs, tensors of the wrong rank, channels or dtype,
empty lists, and a tokenizer or preprocessing the folder lacks (named at first use)."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

import vlkit
from vlkit.cli import main
from vlkit.errors import MissingPart, VlkitError
from vlkit.eval.embed import embed_images, embed_texts
from vlkit.eval.retrieval import recall_at_k, retrieval
from vlkit.eval.zeroshot import classification_metrics, classifier_weights
from vlkit.interop.export import to_hf

from _interop_util import tiny_clip_folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return vlkit.load(tiny_clip_folder(tmp_path_factory.mktemp("tiny") / "m"))


IMAGE = Image.new("RGB", (40, 30), (200, 10, 10))


@pytest.mark.parametrize("pixels,message", [
    (IMAGE, r"takes a pixel tensor \[B,3,H,W\], got a PIL image; use model.processor.batch\(\[image\]\) first"),
    ([IMAGE], r"got a list; use model.processor.batch\(images\) first"),
    (torch.randn(3, 32, 32), r"got shape \(3, 32, 32\) \(one image: add the batch dimension"),
    (torch.randn(2, 1, 32, 32), r"3 colour channels first \[B,3,H,W\], got shape \(2, 1, 32, 32\)"),
    (torch.randn(2, 32, 32, 3), r"channels last: use model.processor.batch"),
    (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), r"got torch.uint8 pixels; expected floats normalised by model.processor"),
    (torch.randn(1, 3, 4, 4), r"4x4 pixels, smaller than one 8-pixel patch"),
])  # fmt: skip
def test_encode_image_misuse(model, pixels, message):
    with pytest.raises(VlkitError, match=message):
        model.encode_image(pixels)


def test_encode_image_takes_what_the_processor_gives(model):
    assert model.encode_image(model.processor.batch([IMAGE, IMAGE])).shape == (2, 8)


@pytest.mark.parametrize("args,message", [
    ((["a red star"],), r"takes token ids \[B,L\], got a list; use model.encode_text\(\*\*model.tokenizer\(texts\)\)"),
    (({"input_ids": torch.ones(1, 3, dtype=torch.long)},), r"not the tokenizer's dict"),
    ((torch.tensor([1, 2, 3]),), r"got shape \(3,\) \(one text: add the batch dimension"),
    ((torch.randn(2, 5),), r"integer token ids, got torch.float32"),
    ((torch.tensor([[1, 2, 300]]),), r"token id 300 is outside this model's vocabulary of 11 \(ids 0..10\)"),
    ((torch.tensor([[1, -1]]),), r"token id -1 is outside"),
    ((torch.ones(2, 4, dtype=torch.long), torch.ones(2, 5)), r"attention_mask has shape \(2, 5\); expected \(2, 4\)"),
])  # fmt: skip
def test_encode_text_misuse(model, args, message):
    with pytest.raises(VlkitError, match=message):
        model.encode_text(*args)


@pytest.mark.parametrize("call,message", [
    (lambda m: m.tokenizer([]), "the tokenizer got an empty list of texts"),
    (lambda m: m.tokenizer(["a", None]), "text 1 is a NoneType"),
    (lambda m: m.tokenizer(5), "takes a string or a list of strings, got a int"),
    (lambda m: m.processor.batch([]), "processor.batch got an empty list of images"),
    (lambda m: m.processor.batch(IMAGE), "processor.batch takes a list of PIL images, got a Image"),
    (lambda m: m.processor.batch(["x.png"]), r"image 0 is a str \(open files with vlkit.data.images.load_image\)"),
    (lambda m: m.processor(torch.zeros(3, 4, 4)), "the image processor takes a PIL image, got a Tensor"),
    (lambda m: m.embed_texts([]), "embed_texts got an empty list"),
    (lambda m: embed_texts(m, []), "embed_texts got an empty list"),
    (lambda m: embed_images(m, []), "embed_images got no image batches"),
    (lambda m: embed_images(m, [[IMAGE]]), r"got a list; use model.processor.batch\(images\)"),
    (lambda m: classifier_weights(m, [], ["a {c}"]), "at least one class name and one template, got 0 and 1"),
    (lambda m: classifier_weights(m, ["star"], []), "got 1 and 0"),
    (lambda m: classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 3), "at least one labelled image"),
    (lambda m: retrieval(torch.zeros(0, 8), torch.zeros(4, 8), torch.zeros(0, 4, dtype=torch.bool)), "at least one query"),
    (lambda m: recall_at_k(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.bool)), "differ in shape"),
])  # fmt: skip
def test_empty_and_wrong_lists(model, call, message):
    with pytest.raises(VlkitError, match=message):
        call(model)


def folder_without(tmp_path, name: str, layout: str = "vlkit"):
    folder = tiny_clip_folder(tmp_path / "m")
    if layout == "hf":
        to_hf(vlkit.load(folder), tmp_path / "hf")
        folder = tmp_path / "hf"
    (folder / name).unlink()
    return folder


@pytest.mark.parametrize("layout", ["vlkit", "hf"])
def test_folder_without_tokenizer_loads_and_names_the_file_at_use(tmp_path, layout):
    folder = folder_without(tmp_path, "tokenizer.json", layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = vlkit.load(folder)
    assert model.encode_image(model.processor.batch([IMAGE])).shape == (1, 8)  # the rest works
    for use in (lambda: model.tokenizer(["a red star"]), lambda: embed_texts(model, ["a red star"]),
                lambda: model.embed_texts(["a"])):
        with pytest.raises(MissingPart, match=f"{folder}: no tokenizer.json; this model folder has no tokenizer"):
            use()


@pytest.mark.parametrize("layout", ["vlkit", "hf"])
def test_folder_without_preprocessing_loads_and_names_the_file_at_use(tmp_path, layout):
    folder = folder_without(tmp_path, "preprocessor_config.json", layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = vlkit.load(folder)
    assert model.encode_text(**model.tokenizer(["a red star"])).shape == (1, 8)
    with pytest.raises(MissingPart, match=f"{folder}: no preprocessor_config.json; this model folder has no image preprocessing"):
        model.processor.batch([IMAGE])


def test_cli_names_the_missing_file(tmp_path, capsys):
    folder = folder_without(tmp_path, "tokenizer.json")
    assert main(["embed", "--model", str(folder), "--texts", "a red star", "--out", str(tmp_path / "t.npy")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    (folder / "preprocessor_config.json").unlink()
    IMAGE.save(tmp_path / "x.png")
    assert main(["embed", "--model", str(folder), "--images", str(tmp_path / "x.png"), "--out", str(tmp_path / "i.npy")]) == 2
    assert "no preprocessor_config.json" in capsys.readouterr().err


def test_export_of_a_folder_without_tokenizer_has_none(tmp_path):
    folder = folder_without(tmp_path, "tokenizer.json")
    assert main(["convert", "--to", "hf", str(folder), str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "preprocessor_config.json").is_file()
