"""Hardening of data loading: bounded work for odd images, whole pack folders, verified
images, one bad-record rule with skips recorded, paths kept inside the dataset folder."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlkit.cli import main
from vlkit.data.formats.captions import iter_captions
from vlkit.data.formats.coco import read_karpathy
from vlkit.data.formats.common import FormatError
from vlkit.data.formats.imagefolder import read_imagefolder
from vlkit.data.formats.llava import read_llava
from vlkit.data.formats.refcoco import read_refcoco
from vlkit.data.formats.shards import ShardStream, pack
from vlkit.data.formats.tsv import read_tsv
from vlkit.data.formats.vqav2 import read_vqav2
from vlkit.data.images import BadSample
from vlkit.data.pairs import CaptionFolder, Skipped, SkippingDataset
from vlkit.data.skips import Skip, Skips
from vlkit.errors import VlkitError
from vlkit.vision import preprocess
from vlkit.vision.preprocess import ImageProcessor

PROCESSOR = ImageProcessor(size=16, crop_size=16)

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


# --- helpers -------------------------------------------------------------------------------------


def png(path: Path, color=(200, 30, 30), size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def truncated_png(path: Path) -> Path:
    """A PNG cut in half: its header reads, its pixels do not."""
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(full, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    return path


def caption_folder(root: Path, lines: list[str], images=("a.png", "b.png", "c.png")) -> Path:
    for k, name in enumerate(images):
        png(root / "img" / name, (40 * k, 100, 50))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def line(image: str, *captions: str) -> str:
    return json.dumps({"image": image, "captions": list(captions) or ["a red square"]})


# --- item: pack writes its folder whole ---------------------------------------------------------


def test_repack_replaces_the_earlier_pack_entirely(tmp_path):
    """Before: a re-pack into a folder of an earlier, larger pack left its stale shards behind."""
    big = caption_folder(tmp_path / "big", [line(f"img/{n}") for n in ("a.png", "b.png", "c.png")])
    small = caption_folder(tmp_path / "small", [line("img/a.png")])
    out = tmp_path / "shards"
    first = pack(big, out, maxcount=1)
    assert len(first["shards"]) == 3
    second = pack(small, out, maxcount=1)
    assert sorted(p.name for p in out.glob("*.tar")) == ["data-000000.tar"]
    assert second["shards"] == [str(out / "data-000000.tar")] and second["source"] == str(small)
    assert json.loads((out / "pack.json").read_text()) == second
    assert [s["json"]["captions"] for s in ShardStream(out, shuffle=0)] == [["a red square"]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_pack_refuses_a_folder_that_is_not_a_pack(tmp_path):
    src = caption_folder(tmp_path / "src", [line("img/a.png")])
    out = tmp_path / "mine"
    png(out / "holiday.png")
    with pytest.raises(VlkitError, match=r"mine: exists and is not an earlier pack"):
        pack(src, out)
    assert (out / "holiday.png").is_file()
    with pytest.raises(VlkitError, match="is not an earlier pack"):
        pack(src, src)  # the dataset itself is never replaced


# --- item: pack verifies images -----------------------------------------------------------------


def test_pack_decodes_each_image_and_a_truncated_one_is_a_bad_record(tmp_path):
    """Before: the truncated image was packed and the summary said ``skipped 0``."""
    src = caption_folder(tmp_path / "src", [line("img/a.png"), line("img/cut.png"), line("img/b.png")])
    truncated_png(src / "img" / "cut.png")
    with pytest.raises(BadSample, match=r"cut\.png: corrupt or truncated image"):
        pack(src, tmp_path / "stopped")
    assert not (tmp_path / "stopped").exists()
    summary = pack(src, tmp_path / "shards", on_bad_sample="skip")
    assert summary["samples"] == 2 and summary["skipped"]["total"] == 1
    assert summary["skipped"]["by_reason"] == {"bad image": 1}
    keys = sorted(s["key"] for s in ShardStream(tmp_path / "shards", shuffle=0))
    assert keys == ["cap-00000001", "cap-00000003"]


def test_pack_records_every_skip_with_file_record_and_reason(tmp_path):
    lines = [line("img/a.png"), "{oops", line("img/gone.png"), line("img/b.png", ""), line("img/c.png")]
    src = caption_folder(tmp_path / "src", lines)
    out = tmp_path / "shards"
    summary = pack(src, out, on_bad_sample="skip")
    assert summary["samples"] == 2 and summary["skipped"]["file"] == str(out / "skipped.jsonl")
    rows = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    index = str(src / "captions.jsonl")
    assert [(r["source"], r["record"], r["reason"]) for r in rows] == [
        (index, "line 2", "bad record"),
        (index, "line 3", "bad image"),
        (index, "line 4", "bad record"),
    ]
    assert "malformed JSON" in rows[0]["detail"] and "file not found" in rows[1]["detail"] and "caption 0 is ''" in rows[2]["detail"]


def test_cli_pack_says_where_the_skips_are(tmp_path, capsys):
    src = caption_folder(tmp_path / "src", [line("img/a.png"), line("img/gone.png")])
    out = tmp_path / "shards"
    assert main(["data", "pack", str(src), "--out", str(out), "--on-bad-sample=skip"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {out}: 1 samples in 1 shards, pack.json, skipped.jsonl (1 skipped samples" in err
    assert main(["data", "pack", str(src), "--out", str(tmp_path / "strict")]) == 2
    assert "gone.png: file not found" in capsys.readouterr().err


def test_pack_of_nothing_usable_is_refused(tmp_path):
    src = caption_folder(tmp_path / "src", [line("img/gone.png")])
    with pytest.raises(FormatError, match=r"src: no usable records; all 1 were bad and skipped \(first: .*gone\.png: file not found\)"):
        pack(src, tmp_path / "shards", on_bad_sample="skip")
    assert not (tmp_path / "shards").exists()


def test_pack_reencodes_image_types_shards_do_not_hold(tmp_path):
    root = tmp_path / "cls"
    png(root / "red" / "a.png")
    Image.new("RGB", (16, 16), (0, 0, 200)).save((root / "blue").mkdir() or root / "blue" / "b.bmp")
    (root / "classnames.json").write_text(json.dumps(["blue", "red"]))
    (root / "templates.json").write_text(json.dumps(["a {c} thing"]))
    pack(root, tmp_path / "shards")
    got = {s["json"]["classname"]: s["image"].getpixel((0, 0)) for s in ShardStream(tmp_path / "shards", shuffle=0)}
    assert got == {"blue": (0, 0, 200), "red": (200, 30, 30)}


# --- dataset builders: one small valid dataset per format, with a hook to spoil one file ---------

LATIN1 = "caf\xe9".encode("latin-1")  # b"caf\xe9": valid Latin-1, not UTF-8


def _json_lines(value) -> bytes:
    """JSON with one item per line, so a spoiled value sits on a known line."""
    return json.dumps(value, indent=1).encode()


def coco(root: Path, images=None) -> Path:
    images = images if images is not None else [{"filename": "a.png", "cocoid": 1, "sentences": [{"raw": "a red square"}]}]
    png(root / "a.png")
    (root / "captions_karpathy.json").write_bytes(_json_lines({"images": images}))
    return root / "captions_karpathy.json"


def vqa(root: Path, questions=None, annotations=None) -> tuple[Path, Path]:
    questions = questions if questions is not None else [{"question_id": 1, "image_id": 7, "question": "what color?"}]
    annotations = annotations if annotations is not None else [{"question_id": 1, "answers": [{"answer": "red"}] * 3}]
    png(root / "images" / "COCO_val2014_000000000007.jpg")
    (root / "questions.json").write_bytes(_json_lines({"questions": questions}))
    (root / "annotations.json").write_bytes(_json_lines({"annotations": annotations}))
    return root / "questions.json", root / "annotations.json"


def llava(root: Path, records=None) -> Path:
    conv = [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a square"}]
    records = records if records is not None else [{"id": "a", "image": "a.png", "conversations": conv}]
    png(root / "a.png")
    (root / "llava.json").write_bytes(_json_lines(records))
    return root / "llava.json"


def refcoco(root: Path, refs=None, images=None, annotations=None) -> Path:
    refs = refs if refs is not None else [{"ref_id": 1, "ann_id": 10, "split": "test", "sentences": [{"sent": "the square", "sent_id": 0}]}]
    images = images if images is not None else [{"id": 5, "file_name": "a.png", "width": 16, "height": 16}]
    annotations = annotations if annotations is not None else [{"id": 10, "image_id": 5, "bbox": [1, 2, 3, 4]}]
    png(root / "images" / "a.png")
    (root / "refs.json").write_bytes(_json_lines(refs))
    (root / "instances.json").write_bytes(_json_lines({"images": images, "annotations": annotations}))
    return root


def imagefolder(root: Path, classnames=("a red thing", "a blue thing"), templates=("a photo of {c}",)) -> Path:
    png(root / "blue" / "1.png", (0, 0, 200))
    png(root / "red" / "1.png")
    (root / "classnames.json").write_bytes(_json_lines(list(classnames) if isinstance(classnames, tuple) else classnames))
    (root / "templates.json").write_bytes(_json_lines(list(templates) if isinstance(templates, tuple) else templates))
    return root


def tsv(root: Path, body: str = "1\twhat?\tA\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "bench.tsv").write_text("index\tquestion\tanswer\n" + body)
    return root / "bench.tsv"


def spoil_line(path: Path, n: int) -> None:
    """Put a Latin-1 byte inside a JSON string on line ``n`` of ``path``."""
    lines = path.read_bytes().split(b"\n")
    assert b'"' in lines[n - 1], lines[n - 1]
    head, sep, tail = lines[n - 1].rpartition(b'"')
    lines[n - 1] = head + LATIN1 + sep + tail
    path.write_bytes(b"\n".join(lines))


# --- item: text that is not UTF-8 is named by file and line -------------------------------------


def _read_all(kind: str, root: Path):
    readers = {
        "coco": lambda: read_karpathy(root / "captions_karpathy.json"),
        "vqa-questions": lambda: read_vqav2(root / "questions.json", root / "annotations.json"),
        "vqa-annotations": lambda: read_vqav2(root / "questions.json", root / "annotations.json"),
        "llava": lambda: read_llava(root / "llava.json"),
        "refcoco-refs": lambda: read_refcoco(root),
        "refcoco-instances": lambda: read_refcoco(root),
        "classnames": lambda: read_imagefolder(root),
        "templates": lambda: read_imagefolder(root),
        "captions": lambda: list(iter_captions(root)),
        "caption-folder": lambda: CaptionFolder(root, PROCESSOR),
        "pack": lambda: pack(root, root.parent / "shards"),
        "tsv": lambda: read_tsv(root / "bench.tsv"),
    }
    return readers[kind]()


NOT_UTF8 = {  # kind: (build the dataset, the file to spoil, its line)
    "coco": (coco, "captions_karpathy.json", 8),
    "vqa-questions": (vqa, "questions.json", 6),
    "vqa-annotations": (vqa, "annotations.json", 7),
    "llava": (llava, "llava.json", 4),
    "refcoco-refs": (refcoco, "refs.json", 8),
    "refcoco-instances": (refcoco, "instances.json", 5),
    "classnames": (imagefolder, "classnames.json", 3),
    "templates": (imagefolder, "templates.json", 2),
    "captions": (lambda r: caption_folder(r, [line("img/a.png"), line("img/b.png", "fine"), line("img/c.png")]), "captions.jsonl", 2),
    "caption-folder": (lambda r: caption_folder(r, [line("img/a.png"), line("img/b.png", "fine")]), "captions.jsonl", 2),
    "pack": (lambda r: caption_folder(r, [line("img/a.png"), line("img/b.png", "fine")]), "captions.jsonl", 2),
    "tsv": (lambda r: tsv(r, "1\twhat?\tA\n2\t\"why\"\tB\n"), "bench.tsv", 3),
}


@pytest.mark.parametrize("kind", list(NOT_UTF8))
def test_text_that_is_not_utf8_is_named_by_file_and_line(tmp_path, kind):
    build, name, n = NOT_UTF8[kind]
    root = tmp_path / "ds"
    root.mkdir()
    build(root)
    _read_all(kind, root)  # reads cleanly before
    if kind == "pack":
        shutil.rmtree(root.parent / "shards")
    spoil_line(root / name, n)
    with pytest.raises(FormatError, match=rf"{re.escape(str(root / name))}, line {n}, column \d+: not UTF-8 \(byte 0xe9\)"):
        _read_all(kind, root)


# --- item: wrong JSON types inside records are named by file, record and key --------------------

COCO_IMG = {"filename": "a.png", "cocoid": 1, "sentences": [{"raw": "a red square"}]}
VQA_Q = {"question_id": 1, "image_id": 7, "question": "what color?"}
VQA_A = {"question_id": 1, "answers": [{"answer": "red"}]}
TURNS = [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a square"}]
LLAVA_REC = {"id": "a", "image": "a.png", "conversations": TURNS}
REF = {"ref_id": 1, "ann_id": 10, "sentences": [{"sent": "the square", "sent_id": 0}]}
REF_IMAGE = {"id": 5, "file_name": "a.png", "width": 16, "height": 16}
REF_ANN = {"id": 10, "image_id": 5, "bbox": [1, 2, 3, 4]}

WRONG_TYPES = {  # name: (read the spoiled dataset under root, file, record, message)
    "coco-filename": (lambda r: read_karpathy(coco(r, [{**COCO_IMG, "filename": 7}])), "captions_karpathy.json", r"images\[0\]", "'filename' is a JSON integer \\(7\\); expected string"),
    "coco-filepath": (lambda r: read_karpathy(coco(r, [{**COCO_IMG, "filepath": ["val"]}])), "captions_karpathy.json", r"images\[0\]", "'filepath' is a JSON array .*; expected string"),
    "coco-split": (lambda r: read_karpathy(coco(r, [{**COCO_IMG, "split": None}])), "captions_karpathy.json", r"images\[0\]", "'split' is a JSON null .*; expected string"),
    "coco-cocoid": (lambda r: read_karpathy(coco(r, [{**COCO_IMG, "cocoid": 1.5}])), "captions_karpathy.json", r"images\[0\]", "'cocoid' is a JSON number .*; expected integer or string"),
    "coco-sentences": (lambda r: read_karpathy(coco(r, [{**COCO_IMG, "sentences": {"raw": "x"}}])), "captions_karpathy.json", r"images\[0\]", "'sentences' is a JSON object .*; expected array"),
    "coco-raw": (lambda r: read_karpathy(coco(r, [{**COCO_IMG, "sentences": [{"raw": 3}]}])), "captions_karpathy.json", r"images\[0\]\.sentences\[0\]", "'raw' is a JSON integer .*; expected string"),
    "coco-tokens": (lambda r: read_karpathy(coco(r, [{**COCO_IMG, "sentences": [{"tokens": ["a", 2]}]}])), "captions_karpathy.json", r"images\[0\]\.sentences\[0\]", "a token is a JSON integer .*; expected string"),
    "vqa-question-id": (lambda r: read_vqav2(*vqa(r, [{**VQA_Q, "question_id": 1.0}])), "questions.json", r"questions\[0\]", "'question_id' is a JSON number .*; expected integer or string"),
    "vqa-image-id-bool": (lambda r: read_vqav2(*vqa(r, [{**VQA_Q, "image_id": True}])), "questions.json", r"questions\[0\]", "'image_id' is a JSON boolean .*; expected integer or string"),
    "vqa-question": (lambda r: read_vqav2(*vqa(r, [{**VQA_Q, "question": ["what?"]}])), "questions.json", r"questions\[0\]", "'question' is a JSON array .*; expected string"),
    "vqa-answers": (lambda r: read_vqav2(*vqa(r, None, [{**VQA_A, "answers": "red"}])), "annotations.json", r"annotations\[0\]", "'answers' is a JSON string .*; expected array"),
    "vqa-answer": (lambda r: read_vqav2(*vqa(r, None, [{**VQA_A, "answers": ["red"]}])), "annotations.json", r"annotations\[0\]", r"answers\[0\] is 'red'; expected \{'answer': str"),
    "vqa-question-type": (lambda r: read_vqav2(*vqa(r, None, [{**VQA_A, "question_type": 4}])), "annotations.json", r"annotations\[0\]", "'question_type' is a JSON integer .*; expected string"),
    "llava-id": (lambda r: read_llava(llava(r, [{**LLAVA_REC, "id": None}])), "llava.json", "record 0", "'id' is a JSON null .*; expected string or integer"),
    "llava-image": (lambda r: read_llava(llava(r, [{**LLAVA_REC, "image": {"path": "a.png"}}])), "llava.json", r"record 0 \(id 'a'\)", r"image path \{'path': 'a.png'\}; expected a file path"),
    "llava-conversations": (lambda r: read_llava(llava(r, [{**LLAVA_REC, "conversations": "hi"}])), "llava.json", "record 0", "'conversations' is a JSON string .*; expected array"),
    "llava-turn": (lambda r: read_llava(llava(r, [{**LLAVA_REC, "conversations": [TURNS[0], {"from": "gpt", "value": 5}]}])), "llava.json", r"record 0 \(id 'a'\)", r"turn 1 is .*; expected \{'from': 'gpt', 'value': str\}"),
    "refcoco-ref-id": (lambda r: read_refcoco(refcoco(r, [{**REF, "ref_id": "1"}])), "refs.json", r"refs\[0\]", "'ref_id' is a JSON string .*; expected integer"),
    "refcoco-sent": (lambda r: read_refcoco(refcoco(r, [{**REF, "sentences": [{"sent": 1}]}])), "refs.json", r"refs\[0\]\.sentences\[0\]", "'sent' is a JSON integer .*; expected string"),
    "refcoco-split": (lambda r: read_refcoco(refcoco(r, [{**REF, "split": 0}])), "refs.json", r"refs\[0\]", "'split' is a JSON integer .*; expected string"),
    "refcoco-file-name": (lambda r: read_refcoco(refcoco(r, None, [{**REF_IMAGE, "file_name": 5}])), "instances.json", r"images\[0\]", "'file_name' is a JSON integer .*; expected string"),
    "refcoco-width": (lambda r: read_refcoco(refcoco(r, None, [{**REF_IMAGE, "width": "16"}])), "instances.json", r"images\[0\]", "'width' is a JSON string .*; expected integer"),
    "refcoco-bbox": (lambda r: read_refcoco(refcoco(r, None, None, [{**REF_ANN, "bbox": [1, "2", 3, 4]}])), "instances.json", r"annotations\[0\]", "bbox .*; expected \\[x, y, w, h\\] of finite numbers"),
    "refcoco-bbox-nan": (lambda r: read_refcoco(refcoco(r, None, None, [{**REF_ANN, "bbox": [1, 2, float("nan"), 4]}])), "instances.json", r"annotations\[0\]", "bbox .*; expected \\[x, y, w, h\\] of finite numbers"),
    "captions-image": (lambda r: list(iter_captions(caption_folder(r, [json.dumps({"image": {"p": 1}, "captions": ["x"]})]))), "captions.jsonl", "line 1", r"image path \{'p': 1\}; expected a file path"),
    "captions-captions": (lambda r: list(iter_captions(caption_folder(r, [json.dumps({"image": "img/a.png", "captions": {"0": "x"}})]))), "captions.jsonl", "line 1", "'captions' is .*; expected a non-empty list"),
}


@pytest.mark.parametrize("name", list(WRONG_TYPES))
def test_wrong_json_types_name_file_record_and_key(tmp_path, name):
    read, file, record, message = WRONG_TYPES[name]
    with pytest.raises(FormatError, match=rf"{re.escape(str(tmp_path / 'ds' / file))}, {record}: {message}") as info:
        read(tmp_path / "ds")
    assert isinstance(info.value, BadSample)  # a bad record: the rule may skip it


IMAGEFOLDER_META = {
    "classnames-not-strings": ({"classnames": [1, 2]}, r"classnames\.json: expected a list of 2 non-empty strings \(one per subfolder: blue, red\)"),
    "classnames-count": ({"classnames": ["one"]}, r"classnames\.json: expected a list of 2 non-empty strings"),
    "templates-not-a-list": ({"templates": "a photo of {c}"}, r"templates\.json: 'a photo of \{c\}'; expected a non-empty list"),
    "template-not-a-string": ({"templates": ["a {c}", 3]}, r"templates\.json, item 1: template 3; expected a string with \{c\}"),
    "template-other-braces": ({"templates": ["a {c} of {x}"]}, r"templates\.json, item 0: template 'a \{c\} of \{x\}'; expected a string with \{c\} and no other braces"),
    "template-lone-brace": ({"templates": ["a {c} {"]}, r"templates\.json, item 0: .*no other braces"),
}


@pytest.mark.parametrize("name", list(IMAGEFOLDER_META))
def test_imagefolder_metadata_of_the_wrong_type(tmp_path, name):
    kwargs, message = IMAGEFOLDER_META[name]
    with pytest.raises(FormatError, match=message):
        read_imagefolder(imagefolder(tmp_path / "ds", **kwargs))


# --- item: empty datasets are named, not a crash later ------------------------------------------

EMPTY = {  # name: (read an empty dataset under root, message)
    "coco": (lambda r: read_karpathy(coco(r, [])), r"captions_karpathy\.json: no records; expected a Karpathy"),
    "vqa": (lambda r: read_vqav2(*vqa(r, [], [])), r"questions\.json: no records; expected a VQAv2 questions JSON"),
    "vqa-no-answers": (lambda r: read_vqav2(*vqa(r, None, [])), r"questions\.json, questions\[0\]: question_id 1 has no annotation"),
    "llava": (lambda r: read_llava(llava(r, [])), r"llava\.json: no records; expected a LLaVA conversation JSON"),
    "refcoco": (lambda r: read_refcoco(refcoco(r, [])), r"refs\.json: no records; expected a list of refs"),
    "captions-empty-file": (lambda r: list(iter_captions(caption_folder(r, []))), r"captions\.jsonl: no records; expected lines of"),
    "captions-blank-lines": (lambda r: list(iter_captions(caption_folder(r, ["", "  ", ""]))), r"captions\.jsonl: no records"),
    "caption-folder": (lambda r: CaptionFolder(caption_folder(r, ["", ""]), PROCESSOR), r"captions\.jsonl: no records"),
    "pack": (lambda r: pack(caption_folder(r, [""]), r.parent / "out"), r"captions\.jsonl: no records"),
    "pack-empty-folder": (lambda r: pack(r.mkdir(parents=True) or r, r.parent / "out"), r"ds: unrecognised source"),
    "tsv-header-only": (lambda r: read_tsv(tsv(r, "")), r"bench\.tsv: no records; expected a benchmark TSV"),
    "tsv-empty-file": (lambda r: read_tsv(r.mkdir(parents=True) or (r / "bench.tsv").write_text("") or r / "bench.tsv"), r"bench\.tsv: empty file"),
    "json-empty-file": (lambda r: read_llava(r.mkdir(parents=True) or (r / "l.json").write_text("") or r / "l.json"), r"l\.json: malformed JSON \(the file ends before the top level\)"),
    "imagefolder-empty": (lambda r: read_imagefolder(r.mkdir(parents=True) or r), r"ds: no class subfolders"),
    "imagefolder-no-images": (lambda r: read_imagefolder(_no_images(imagefolder(r))), r"ds: no records; expected image files"),
}


def _no_images(root: Path) -> Path:
    for p in root.glob("*/*.png"):
        p.unlink()
    (root / "red" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("name", list(EMPTY))
def test_an_empty_dataset_is_named(tmp_path, name):
    read, message = EMPTY[name]
    with pytest.raises(VlkitError, match=message):
        read(tmp_path / "ds")


# --- item: image paths stay inside the dataset folder unless allowed ----------------------------

OUTSIDE = {  # name: (read with the given allow flag, file, record)
    "coco-dotdot": (lambda r, ok: read_karpathy(coco(r, [{**COCO_IMG, "filename": "../secret.png"}]), allow_outside_paths=ok), "captions_karpathy.json", r"images\[0\]"),
    "coco-absolute-filepath": (lambda r, ok: read_karpathy(coco(r, [{**COCO_IMG, "filepath": "/etc"}]), allow_outside_paths=ok), "captions_karpathy.json", r"images\[0\]"),
    "vqa-image-id": (lambda r, ok: read_vqav2(*vqa(r, [{**VQA_Q, "image_id": "/../../x"}]), allow_outside_paths=ok), "questions.json", r"questions\[0\]"),
    "llava-absolute": (lambda r, ok: read_llava(llava(r, [{**LLAVA_REC, "image": "/etc/passwd"}]), allow_outside_paths=ok), "llava.json", r"record 0 \(id 'a'\)"),
    "refcoco-dotdot": (lambda r, ok: read_refcoco(refcoco(r, None, [{**REF_IMAGE, "file_name": "x/../../a.png"}]), allow_outside_paths=ok), "instances.json", r"images\[0\]"),
    "captions-dotdot": (lambda r, ok: list(iter_captions(caption_folder(r, [line("../a.png")]), allow_outside_paths=ok)), "captions.jsonl", "line 1"),
    "caption-folder": (lambda r, ok: CaptionFolder(caption_folder(r, [line("/tmp/a.png")]), PROCESSOR, allow_outside_paths=ok).record(0), "captions.jsonl", "line 1"),
}


@pytest.mark.parametrize("name", list(OUTSIDE))
def test_image_paths_outside_the_dataset_are_refused_unless_allowed(tmp_path, name):
    read, file, record = OUTSIDE[name]
    with pytest.raises(BadSample, match=rf"{re.escape(str(tmp_path / 'ds' / file))}, {record}: image path .* is outside the dataset folder"):
        read(tmp_path / "ds", False)
    assert read(tmp_path / "ds2", True)


def test_inner_dotdot_that_stays_inside_is_fine(tmp_path):
    root = caption_folder(tmp_path / "ds", [line("img/../img/a.png")])
    assert [r.image for r in iter_captions(root)] == [root / "img/../img/a.png"]


def test_pack_outside_paths_only_with_the_flag(tmp_path, capsys):
    png(tmp_path / "elsewhere.png")
    src = caption_folder(tmp_path / "src", [line("../elsewhere.png")])
    assert main(["data", "pack", str(src), "--out", str(tmp_path / "a")]) == 2
    assert "line 1: image path '../elsewhere.png' is outside the dataset folder" in capsys.readouterr().err
    assert main(["data", "pack", str(src), "--out", str(tmp_path / "b"), "--allow-outside-paths"]) == 0
    assert len(list(ShardStream(tmp_path / "b", shuffle=0))) == 1


# --- item: one rule for a bad record, whichever command reads it --------------------------------

MIXED = ["", line("img/a.png"), "   ", "{oops", line("img/gone.png"), line("img/b.png")]  # lines 1..6


def test_training_evaluation_and_packing_apply_one_rule(tmp_path):
    """Blank lines are not records; a malformed line and a missing image stop every reader
    under "error" with the same message, and are the same skips under "skip"."""
    root = caption_folder(tmp_path / "ds", MIXED)
    index, gone = str(root / "captions.jsonl"), str(root / "img" / "gone.png")
    folder = CaptionFolder(root, PROCESSOR)  # training
    assert len(folder) == 4 and folder.lines == [2, 4, 5, 6]

    with pytest.raises(BadSample) as train_err:
        folder[1]
    with pytest.raises(BadSample) as eval_err:
        list(iter_captions(root))  # what eval retrieval reads
    with pytest.raises(BadSample) as pack_err:
        pack(root, tmp_path / "stopped")
    assert str(train_err.value) == str(eval_err.value) == str(pack_err.value)
    assert str(train_err.value).startswith(f"{index}, line 4: malformed JSON")
    with pytest.raises(BadSample, match=f"{re.escape(gone)}: file not found"):
        folder[2]

    trained = [it.skip for it in map(SkippingDataset(folder).__getitem__, range(len(folder))) if isinstance(it, Skipped)]
    skips = Skips("skip")
    assert [r.id for r in iter_captions(root, skips)] == [2, 5, 6]  # the id is the line number
    pack(root, tmp_path / "shards", on_bad_sample="skip")
    packed = [Skip(**json.loads(x)) for x in (tmp_path / "shards" / "skipped.jsonl").read_text().splitlines()]
    assert [(s.source, s.record, s.reason) for s in trained] == [(index, "line 4", "bad record"), (index, "line 5", "bad image")]
    assert trained[1].detail == f"image {gone}: file not found"
    assert packed == trained
    assert skips.items == trained[:1]  # the record check; the image is loaded by the evaluation


def test_stray_files_in_an_imagefolder_are_not_records(tmp_path):
    root = imagefolder(tmp_path / "ds")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "red" / ".DS_Store").write_bytes(b"\0\1")
    (root / "red" / "._1.png").write_bytes(b"AppleDouble")
    png(root / "red" / "nested" / "2.png")
    (root / "README.md").write_text("about")
    paths, labels, names, _ = read_imagefolder(root)
    assert [p.relative_to(root).as_posix() for p in paths] == ["blue/1.png", "red/1.png"] and labels == [0, 1]
    assert names == ["a red thing", "a blue thing"]


def test_skips_write_one_line_per_skip(tmp_path):
    skips = Skips("skip")
    skips.add("bad image", tmp_path / "a.png", "", "file not found")
    skips.reject(BadSample("x.jsonl", "malformed JSON", "line 3"), "bad record")
    path = skips.write(tmp_path / "run")
    assert path == tmp_path / "run" / "skipped.jsonl"
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"source": str(tmp_path / "a.png"), "record": "", "reason": "bad image", "detail": "file not found"},
        {"source": "x.jsonl", "record": "line 3", "reason": "bad record", "detail": "malformed JSON"},
    ]
    assert skips.to_dict()["by_reason"] == {"bad image": 1, "bad record": 1}
    with pytest.raises(BadSample, match="x.jsonl, line 3: malformed JSON"):
        Skips().reject(BadSample("x.jsonl", "malformed JSON", "line 3"), "bad record")
    with pytest.raises(VlkitError, match=r"on_bad_sample must be one of \['error', 'skip'\], got 'ignore'"):
        Skips("ignore")


def test_pack_takes_a_captions_jsonl_file_as_its_folder(tmp_path):
    src = caption_folder(tmp_path / "src", [line("img/a.png"), line("img/b.png")])
    by_file = pack(src / "captions.jsonl", tmp_path / "a")
    by_folder = pack(src, tmp_path / "b")
    assert by_file["samples"] == by_folder["samples"] == 2
    assert [s["json"] for s in ShardStream(tmp_path / "a", shuffle=0)] == [s["json"] for s in ShardStream(tmp_path / "b", shuffle=0)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image-size", "2"], "image_size 2 leaves no room for objects of 0.4 of the side; expected at least 4 pixels"),
        (["--format", "coco", "--image-size", "3"], "expected at least 4 pixels"),
        (["--max-objects", "0"], "argument --max-objects: expected a whole number of at least 1, got 0"),
        (["-n", "-3"], "argument -n: expected a whole number of at least 1, got -3"),
    ],
)
def test_cli_data_shapes_names_bad_settings(tmp_path, capsys, args, message):
    try:
        rc = main(["data", "shapes", "--out", str(tmp_path / "out"), "-n", "2", *args])
    except SystemExit as exit:  # argparse
        rc = exit.code
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
