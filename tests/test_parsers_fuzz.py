"""Property-based fuzzing of every dataset record parser and of image decoding: whatever the
input, it parses or raises vlkit's own error (:class:`~vlkit.errors.VlkitError`) naming the
file; never another exception type. A bounded number of examples each, in the default run."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlkit.data.formats.captions import iter_captions
from vlkit.data.formats.coco import read_karpathy
from vlkit.data.formats.imagefolder import read_imagefolder
from vlkit.data.formats.llava import read_llava
from vlkit.data.formats.refcoco import read_refcoco
from vlkit.data.formats.tsv import read_tsv
from vlkit.data.formats.vqav2 import read_vqav2
from vlkit.data.images import decode_image, load_image
from vlkit.data.pairs import CaptionFolder
from vlkit.data.skips import Skips
from vlkit.errors import VlkitError
from vlkit.vision.preprocess import ImageProcessor

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# --- strategies ------------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)
paths = st.sampled_from(["a.png", "img/a.png", "../a.png", "/etc/passwd", "", ".", "a\x00b.png", "images/../a.png", "C:\\x.png"])


def maybe(valid):
    """Mostly a plausible value for a key, sometimes any JSON value at all."""
    return st.one_of(valid, valid, json_values)


def records(keys: dict) -> st.SearchStrategy:
    """Objects whose keys are each present or not, with plausible or arbitrary values; or any JSON value."""
    return st.fixed_dictionaries({}, optional={k: maybe(v) for k, v in keys.items()}) | json_values


ids = st.integers(-3, 5) | st.text(max_size=4)
captions_text = st.text(max_size=10)
sentence = records({"raw": captions_text, "tokens": st.lists(captions_text, max_size=3), "sentid": ids})
coco_image = records({"filename": paths, "filepath": st.sampled_from(["", "val", "..", "/"]), "sentences": st.lists(sentence, max_size=3),
                      "cocoid": ids, "imgid": ids, "split": st.sampled_from(["test", "train", ""])})  # fmt: skip
question = records({"question_id": ids, "image_id": ids | st.sampled_from(["/../x", "a/b"]), "question": captions_text})
answer = records({"answer": captions_text, "answer_confidence": captions_text})
annotation = records({"question_id": ids, "answers": st.lists(answer, max_size=3), "question_type": captions_text, "answer_type": captions_text})
turn = records({"from": st.sampled_from(["human", "gpt", "system"]), "value": st.sampled_from(["<image>\nhi", "hi", "<image>"]) | captions_text})
conversation = records({"id": ids, "image": paths, "conversations": st.lists(turn, max_size=4)})
ref_sentence = records({"sent": captions_text, "sent_id": ids})
ref = records({"ref_id": ids, "ann_id": ids, "split": st.sampled_from(["test", "val"]), "sentences": st.lists(ref_sentence, max_size=2)})
ref_image = records({"id": ids, "file_name": paths, "width": st.integers(-1, 64), "height": st.integers(-1, 64)})
box = st.lists(st.integers(-5, 50) | st.floats(), min_size=3, max_size=5)
ref_annotation = records({"id": ids, "image_id": ids, "bbox": box})


def top_level(item, key: str | None) -> st.SearchStrategy:
    """The file's top level: mostly the expected layout, sometimes any JSON value."""
    items = st.lists(item, max_size=4)
    expected = items if key is None else st.fixed_dictionaries({key: items})
    return st.one_of(expected, expected, expected, json_values)


def text_or_garbage(layout: st.SearchStrategy) -> st.SearchStrategy:
    """The JSON text of ``layout`` (as bytes), sometimes cut short or with a byte changed."""
    text = layout.map(lambda v: json.dumps(v, allow_nan=True).encode())
    return st.one_of(text, text, st.tuples(text, st.integers(0, 200), st.binary(max_size=3)).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]), st.binary(max_size=60))


# --- the contract ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch():
    root = Path(tempfile.mkdtemp(prefix="vlkit-fuzz-"))
    yield root
    shutil.rmtree(root)


def fresh(scratch: Path) -> Path:
    """An empty dataset folder with one real image in the places the formats look."""
    root = scratch / "ds"
    if root.exists():
        shutil.rmtree(root)
    for where in ("a.png", "img/a.png", "images/a.png", "images/COCO_val2014_000000000001.jpg"):
        (root / where).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (9, 9, 9)).save(root / where, format="PNG")
    return root


def parses_or_names(read, root: Path):
    """Run ``read``: it returns, or raises a VlkitError whose message names a path in ``root``."""
    try:
        return read()
    except VlkitError as err:
        assert str(root) in str(err), f"error does not name the dataset's file: {err}"
        return None


def both_rules(read, root: Path) -> None:
    """The parser under each bad-record rule: stop at the first, or skip them all."""
    parses_or_names(lambda: read(None), root)
    parses_or_names(lambda: read(Skips("skip")), root)


# --- record parsers --------------------------------------------------------------------------------


@FUZZ
@given(text_or_garbage(top_level(coco_image, "images")))
def test_coco(scratch, data):
    root = fresh(scratch)
    (root / "c.json").write_bytes(data)
    both_rules(lambda skips: read_karpathy(root / "c.json", split=None, skips=skips), root)


@FUZZ
@given(text_or_garbage(top_level(question, "questions")), text_or_garbage(top_level(annotation, "annotations")))
@example(b'{"questions": []}', b'{"annotations": [{"question_id": []}]}')  # found by the fuzzing: an unhashable id
def test_vqav2(scratch, questions, annotations):
    root = fresh(scratch)
    (root / "q.json").write_bytes(questions)
    (root / "a.json").write_bytes(annotations)
    both_rules(lambda skips: read_vqav2(root / "q.json", root / "a.json", skips=skips), root)
    both_rules(lambda skips: read_vqav2(root / "q.json", skips=skips), root)


@FUZZ
@given(text_or_garbage(top_level(conversation, None)))
def test_llava(scratch, data):
    root = fresh(scratch)
    (root / "l.json").write_bytes(data)
    both_rules(lambda skips: read_llava(root / "l.json", skips=skips), root)


@FUZZ
@given(text_or_garbage(top_level(ref, None)), st.fixed_dictionaries({"images": st.lists(ref_image, max_size=3),
                                                                     "annotations": st.lists(ref_annotation, max_size=3)}) | json_values)  # fmt: skip
def test_refcoco(scratch, refs, instances):
    root = fresh(scratch)
    (root / "refs.json").write_bytes(refs)
    (root / "instances.json").write_text(json.dumps(instances))
    both_rules(lambda skips: read_refcoco(root, skips=skips), root)


caption_line = records({"image": paths, "captions": st.lists(captions_text, max_size=3) | captions_text}).map(json.dumps)
jsonl = st.lists(caption_line | st.text(max_size=20) | st.just(""), max_size=5).map(lambda lines: "\n".join(lines).encode())


@FUZZ
@given(jsonl | st.binary(max_size=80))
def test_captions_jsonl(scratch, data):
    root = fresh(scratch)
    (root / "captions.jsonl").write_bytes(data)
    both_rules(lambda skips: list(iter_captions(root, skips)), root)
    folder = parses_or_names(lambda: CaptionFolder(root, ImageProcessor(size=8, crop_size=8)), root)
    for i in range(len(folder) if folder is not None else 0):
        parses_or_names(lambda: folder[i], root)


tsv_cell = st.text(alphabet=st.sampled_from("ab1\t\"\n\r\\ =/+"), max_size=8)
tsv_text = st.lists(st.lists(tsv_cell, min_size=1, max_size=5).map("\t".join), max_size=5).map(lambda rows: ("index\tquestion\tanswer\timage\n" + "\n".join(rows)).encode())


@FUZZ
@given(tsv_text | st.binary(max_size=80))
def test_tsv(scratch, data):
    root = fresh(scratch)
    (root / "b.tsv").write_bytes(data)
    rows = parses_or_names(lambda: read_tsv(root / "b.tsv", skips=Skips("skip")), root)
    parses_or_names(lambda: read_tsv(root / "b.tsv"), root)
    for row in rows or []:
        parses_or_names(row.image, root)


@FUZZ
@given(text_or_garbage(json_values | st.lists(st.text(max_size=8), min_size=2, max_size=2)),
       text_or_garbage(json_values | st.lists(st.sampled_from(["a {c}", "{c} {}", "{0}", "{c", "{{c}} {c}", "{c.x}", "{c[0]}"]), max_size=3)))  # fmt: skip
def test_imagefolder_metadata(scratch, classnames, templates):
    root = fresh(scratch)
    for name in ("blue", "red"):
        (root / "cls" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / "cls" / name / "1.png")
    (root / "cls" / "classnames.json").write_bytes(classnames)
    (root / "cls" / "templates.json").write_bytes(templates)
    got = parses_or_names(lambda: read_imagefolder(root / "cls"), root)
    if got is not None:
        names, templates = got[2], got[3]
        assert [t.format(c=n) for t in templates for n in names]  # what zero-shot evaluation does with them


DEEP = "[" * 50_000 + "]" * 50_000
NESTED = {  # where a value nested past Python's recursion limit sits, and who reads it
    "llava-item": (lambda root: read_llava(root / "x.json"), "[" + DEEP + "]"),
    "coco-other-key": (lambda root: read_karpathy(root / "x.json"), '{"x": ' + DEEP + ', "images": []}'),
    "coco-other-object": (lambda root: read_karpathy(root / "x.json"), '{"x": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}"),
    "classnames": (lambda root: read_imagefolder(root / "cls"), DEEP),
    "captions-jsonl": (lambda root: list(iter_captions(root)), DEEP),
    "caption-folder": (lambda root: CaptionFolder(root, ImageProcessor())[0], DEEP),
}


@pytest.mark.parametrize("name", list(NESTED))
def test_deeply_nested_json_is_named(scratch, name):
    """Found by hand after the fuzzing: json raises RecursionError past ~1000 levels."""
    read, text = NESTED[name]
    root = fresh(scratch)
    (root / "cls" / "red").mkdir(parents=True)
    for file in ("x.json", "captions.jsonl", "cls/classnames.json"):
        (root / file).write_text(text)
    with pytest.raises(VlkitError, match=r"nested too deeply"):
        read(root)


# --- image decoding --------------------------------------------------------------------------------


def encoded(fmt: str, size=(5, 3), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 120).save(buf, format=fmt)
    return buf.getvalue()


VALID = {fmt: encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "DDS", "ICO", "TGA")}  # DDS: PIL raises NotImplementedError
VALID["PNG-RGBA"] = encoded("PNG", mode="RGBA")
VALID["PNG-16bit"] = encoded("PNG", mode="I;16")


@st.composite
def damaged(draw) -> bytes:
    """A valid small image with bytes of its header (or anywhere) changed, cut or inserted."""
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, min(len(data) - 1, draw(st.sampled_from([40, 120, len(data) - 1])))))
        kind = draw(st.sampled_from(["set", "cut", "insert"]))
        if kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            data = data[:at]
            if not data:
                break
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


def dds_of_unknown_pixel_format() -> bytes:
    """A DDS whose pixel format flags are zeroed: PIL raises NotImplementedError, not OSError."""
    data = bytearray(VALID["DDS"])
    data[80] = 0
    return bytes(data)


@FUZZ
@given(st.binary(max_size=300) | damaged())
@example(dds_of_unknown_pixel_format())
def test_image_decoding(scratch, data):
    root = fresh(scratch)
    (root / "x.img").write_bytes(data)
    for read in (lambda: load_image(root / "x.img"), lambda: decode_image(data, str(root / "bytes"))):
        image = parses_or_names(read, root)
        if image is not None:
            assert image.mode == "RGB" and image.size[0] * image.size[1] > 0
            assert ImageProcessor(size=8, crop_size=8)(image).shape == (3, 8, 8)
