"""``vlkit eval`` on odd input: bad records follow the one bad-record rule (stop, or skip and
list in skipped.jsonl), duplicate images are merged and counted, predictions files that are
empty, not UTF-8, of the wrong JSON types or for unknown ids stop with the file and record
named, unknown ``--data`` names list what is accepted, and numeric options are checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlkit
from vlkit.cli import main
from vlkit.data.formats.common import FormatError
from vlkit.data.formats.shapes_export import export
from vlkit.data.images import BadSample
from vlkit.data.skips import Skips
from vlkit.errors import VlkitError
from vlkit.eval.generative import load_samples, read_predictions, score_predictions_file
from vlkit.eval.tasks import eval_retrieval, eval_zeroshot
from vlkit.text.tokenizer import word_level
from vlkit.vision.preprocess import ImageProcessor

N = 16


class OracleCLIP(torch.nn.Module):
    """Image k (grey level 10·k) and the word "imgk" embed to the same one-hot vector, so
    retrieval and zero-shot are perfect when every caption names its own image."""

    def __init__(self, n: int = N):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.n = n
        self.tokenizer = word_level({f"img{k}" for k in range(n)} | {"a", "photo", "of"}, 16)
        self.word = {self.tokenizer.token_id(f"img{k}"): k for k in range(n)}
        self.processor = ImageProcessor(size=8, crop_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def encode_image(self, pixels):
        return F.one_hot((pixels[:, 0].mean(dim=(1, 2)) * 25.5).round().long(), self.n).float()

    def encode_text(self, input_ids, attention_mask=None):
        out = torch.full((len(input_ids), self.n), 1e-3)
        for r, row in enumerate(input_ids.tolist()):
            for t in row:
                if t in self.word:
                    out[r, self.word[t]] += 1
        return out


def grey(path: Path, k: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10 * k,) * 3).save(path)
    return path


def caption_folder(root: Path, lines: list) -> Path:
    """``root/captions.jsonl`` from records (dicts, written as JSON) or raw lines (str)."""
    for k in range(N):
        grey(root / "images" / f"{k}.png", k)
    root.mkdir(parents=True, exist_ok=True)
    (root / "captions.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in lines))
    return root


def clean(k: int) -> dict:
    return {"image": f"images/{k}.png", "captions": [f"img{k}", f"a photo of img{k}"]}


def retrieve(folder: Path, rule: str = "error", out: Path | None = None) -> tuple[dict, Skips]:
    skips = Skips(rule)
    return eval_retrieval(OracleCLIP(), str(folder), out, 4, "fp32", skips), skips


def test_oracle_is_perfect_on_clean_data(tmp_path):
    res, skips = retrieve(caption_folder(tmp_path, [clean(k) for k in range(N)]))
    assert res["i2t_r1"] == res["t2i_r1"] == 1.0 and skips.total == 0
    assert res["counts"]["images"] == N and res["counts"]["captions"] == 2 * N


def test_record_without_captions_follows_the_training_rule(tmp_path):
    """An empty caption list used to score its image as a miss (i2t R@1 15/16 = 0.94)."""
    lines = [clean(k) for k in range(N)]
    lines[5] = {"image": "images/5.png", "captions": []}
    folder = caption_folder(tmp_path / "d", lines)
    with pytest.raises(BadSample, match=r"captions.jsonl, line 6: 'captions' is \[\]; expected a non-empty list"):
        retrieve(folder)
    out = tmp_path / "out"
    out.mkdir()
    res, skips = retrieve(folder, "skip", out)
    assert res["i2t_r1"] == res["t2i_r1"] == 1.0 and res["counts"]["images"] == N - 1
    assert skips.to_dict()["by_reason"] == {"bad record": 1}
    assert "line 6" in str(skips.items[0]) and "expected a non-empty list of caption strings" in str(skips.items[0])


def test_training_and_evaluation_reject_the_same_records(tmp_path):
    from vlkit.data.pairs import CaptionFolder

    lines = [clean(k) for k in range(N)]
    lines[2] = {"image": "images/2.png", "captions": ["  ", "img2"]}
    lines[9] = {"image": "images/9.png", "captions": []}
    folder = caption_folder(tmp_path, lines)
    train = CaptionFolder(folder, OracleCLIP().processor)
    train_bad = []
    for i in range(len(train)):
        try:
            train.record(i)
        except BadSample as err:
            train_bad.append(err.record)
    _, skips = retrieve(folder, "skip")
    assert [s.record for s in skips.items] == train_bad == ["line 3", "line 10"]


def test_an_image_listed_twice_is_merged_and_counted(tmp_path):
    lines = [clean(k) for k in range(N)] + [{"image": "./images/3.png", "captions": ["img3 again", "img3"]}]
    res, _ = retrieve(caption_folder(tmp_path, lines))
    assert res["t2i_r1"] == res["i2t_r1"] == 1.0  # the second copy no longer outranks the first's captions
    c = res["counts"]
    assert (c["images"], c["captions"], c["merged_duplicate_images"], c["repeated_captions_dropped"]) == (N, 2 * N + 1, 1, 1)


def test_a_caption_shared_by_two_images_is_correct_for_both(tmp_path):
    lines = [clean(k) for k in range(N)]
    lines[0] = {"image": "images/0.png", "captions": ["img0 img1"]}
    lines[1] = {"image": "images/1.png", "captions": ["img0 img1"]}
    res, _ = retrieve(caption_folder(tmp_path, lines))
    assert res["t2i_r1"] == 1.0 and res["counts"]["captions_shared_by_several_images"] == 1


@pytest.mark.parametrize("line,message", [
    ('{"image": "images/1.png", "captions": "img1"}', r"line 2: 'captions' is 'img1'; expected a non-empty list"),
    ('{"image": 1, "captions": ["img1"]}', r"line 2: image path 1; expected a file path"),
    ('{"image": "images/1.png", "captions": ["img1", 5]}', r"line 2: caption 1 is 5; expected a non-blank string"),
    ('{"image": "images/1.png"}', r"line 2: keys \['image'\]; expected"),
    ('["images/1.png", "img1"]', r"line 2: a JSON array"),
    ('{"image": "../outside.png", "captions": ["img1"]}', r"line 2: image path '../outside.png' is outside the dataset folder"),
])  # fmt: skip
def test_wrong_record_types_name_file_and_line(tmp_path, line, message):
    folder = caption_folder(tmp_path, [clean(0), line] + [clean(k) for k in range(2, N)])
    with pytest.raises(VlkitError, match=f"captions.jsonl, {message}"):
        retrieve(folder)
    res, skips = retrieve(folder, "skip")
    assert skips.total == 1 and res["counts"]["images"] == N - 1


def test_unreadable_caption_files(tmp_path):
    folder = caption_folder(tmp_path / "a", [clean(0)])
    (folder / "captions.jsonl").write_bytes(json.dumps(clean(0)).encode() + b'\n{"image": "images/1.png", "captions": ["\xff"]}\n')
    with pytest.raises(FormatError, match=r"captions.jsonl, line 2, column \d+: not UTF-8"):
        retrieve(folder)
    (folder / "captions.jsonl").write_text("\n\n")
    with pytest.raises(FormatError, match=r"captions.jsonl: no records"):
        retrieve(folder)
    root = tmp_path / "export"
    caption_folder(root / "captions", [clean(0)])
    with pytest.raises(FileNotFoundError, match=r"export/captions.jsonl: missing; .*export/captions holds one"):
        retrieve(root)


def test_bad_image_stops_or_is_left_out_with_its_captions(tmp_path):
    folder = caption_folder(tmp_path, [clean(k) for k in range(N)])
    (folder / "images" / "7.png").write_bytes(b"not a png")
    with pytest.raises(BadSample, match=r"captions.jsonl, line 8: image .*7.png: corrupt or truncated image"):
        retrieve(folder)
    res, skips = retrieve(folder, "skip")
    assert res["t2i_r1"] == 1.0 and res["counts"]["images"] == N - 1 and res["counts"]["captions"] == 2 * (N - 1)
    assert skips.to_dict()["by_reason"] == {"bad image": 1}
    for k in range(N):
        (folder / "images" / f"{k}.png").write_bytes(b"")
    with pytest.raises(FormatError, match=r"no usable records; all 16 were bad and skipped"):
        retrieve(folder, "skip")


def image_folder(root: Path) -> Path:
    for k in range(4):
        for j in range(2):
            grey(root / f"c{k}" / f"{j}.png", k)
    (root / "classnames.json").write_text(json.dumps([f"img{k}" for k in range(4)]))
    (root / "templates.json").write_text(json.dumps(["a photo of {c}"]))
    return root


def test_zeroshot_bad_image_stops_or_is_left_out(tmp_path):
    folder = image_folder(tmp_path)
    res = eval_zeroshot(OracleCLIP(), str(folder), None, 3, "fp32", Skips())
    assert res["zeroshot_top1"] == 1.0 and res["counts"]["images"] == 8
    (folder / "c2" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(BadSample, match=r"c2/1.png: corrupt"):
        eval_zeroshot(OracleCLIP(), str(folder), None, 3, "fp32", Skips())
    skips = Skips("skip")
    res = eval_zeroshot(OracleCLIP(), str(folder), None, 3, "fp32", skips)
    assert res["zeroshot_top1"] == 1.0 and res["counts"]["images"] == 7 and skips.total == 1


@pytest.fixture()
def oracle(monkeypatch):
    monkeypatch.setattr(vlkit, "load", lambda path: OracleCLIP())


def test_cli_skip_writes_skipped_jsonl_and_names_what_it_wrote(tmp_path, oracle, capsys):
    lines = [clean(k) for k in range(N)]
    lines[5] = {"image": "images/5.png", "captions": []}
    folder = caption_folder(tmp_path / "d", lines)
    out = tmp_path / "out"
    assert main(["eval", "retrieval", "--model", "m", "--data", str(folder), "--out", str(out)]) == 2
    assert "line 6: 'captions' is []" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--model", "m", "--data", str(folder), "--out", str(out), "--on-bad-sample", "skip"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'results.json'}, {out / 'predictions.jsonl'}, {out / 'skipped.jsonl'} and {out / 'report.md'}" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["i2t_r1"] == 1.0 and results["skipped"]["total"] == 1
    [skip] = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skip["record"] == "line 6" and skip["reason"] == "bad record" and skip["source"].endswith("captions.jsonl")
    (folder / "captions.jsonl").write_text("".join(json.dumps(clean(k)) + "\n" for k in range(N)))
    assert main(["eval", "retrieval", "--model", "m", "--data", str(folder), "--out", str(out)]) == 0
    assert not (out / "skipped.jsonl").exists()  # no stale list from the earlier run
    assert main(["eval", "retrieval", "--model", "m", "--data", str(folder), "--out", str(out / "results.json")]) == 2
    assert "results.json: is a file; expected a folder" in capsys.readouterr().err


@pytest.mark.parametrize("task,data", [("zeroshot", "shapez"), ("retrieval", "no/such/folder"), ("caption", "shapes")])
def test_unknown_data_names_list_what_is_accepted(task, data, oracle, capsys, tmp_path):
    args = ["eval", task, "--data", data] + (["--predictions", str(tmp_path / "p.jsonl")] if task == "caption" else ["--model", "m"])
    assert main(args) == 2
    err = capsys.readouterr().err
    if task == "caption":
        assert "--data 'shapes' names a dataset only zeroshot and retrieval have built in; eval caption takes a path: " in err
        assert "Karpathy-layout COCO captions JSON" in err
    else:
        assert f"--data {data!r}: no such dataset name, file or folder; eval {task} takes" in err
        assert "the name 'shapes' (the bundled shapes world" in err and "a path: " in err


@pytest.mark.parametrize("argv,option", [
    (["eval", "zeroshot", "--batch-size", "0"], "--batch-size"),
    (["eval", "zeroshot", "--batch-size", "-3"], "--batch-size"),
    (["eval", "zeroshot", "--batch-size", "2.5"], "--batch-size"),
    (["eval", "caption", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["eval", "caption", "--max-new-tokens", "ten"], "--max-new-tokens"),
    (["embed", "--model", "m", "--texts", "a", "--out", "x.npy", "--batch-size", "0"], "--batch-size"),
])  # fmt: skip
def test_numeric_options_must_be_positive_whole_numbers(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"argument {option}: expected a whole number of at least 1, got" in capsys.readouterr().err


def test_embed_writes_exactly_the_given_path(tmp_path, oracle, capsys):
    out = tmp_path / "emb"
    assert main(["embed", "--model", "m", "--texts", "img1", "img2", "--out", str(out)]) == 0
    assert f"wrote {out}: (2, 16)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]  # not emb.npy, no temporary file left
    assert np.load(out).shape == (2, 16)
    assert main(["embed", "--model", "m", "--texts", "img1", "--out", str(tmp_path)]) == 2
    assert "is a folder; expected a file name" in capsys.readouterr().err


def test_embed_text_files(tmp_path, oracle, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"img1\nimg\xff2\n")
    assert main(["embed", "--model", "m", "--texts", str(texts), "--out", str(tmp_path / "e.npy")]) == 2
    assert "texts.txt, line 2, column 4: not UTF-8" in capsys.readouterr().err
    texts.write_text("\n  \n")
    assert main(["embed", "--model", "m", "--texts", str(texts), "--out", str(tmp_path / "e.npy")]) == 2
    assert "texts.txt: no texts" in capsys.readouterr().err
    assert main(["embed", "--model", "m", "--texts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "e.npy")]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err


# ------------------------------------------------------------ generative tasks: predictions files
DATA = {"caption": "coco", "vqa": "vqav2", "grounding": "refcoco", "mcq": "mmbench"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    for fmt in (*DATA.values(), "mathvista"):
        export(3, 6, root / fmt, fmt)
    return root


def first_id(task, data) -> str:
    return load_samples(task, data / DATA[task])[0].id


@pytest.mark.parametrize("task", list(DATA))
@pytest.mark.parametrize("name,content,message", [
    ("p.jsonl", b"", r"p.jsonl: no predictions; expected"),
    ("p.jsonl", b"\n \n", r"p.jsonl: no predictions"),
    ("p.json", b"[]", r"p.json: no predictions"),
    ("p.json", b"{}", r"p.json: no predictions"),
    ("p.jsonl", b'{"id": "ID", "prediction": "ok"}\n{"id": "x", "prediction": "caf\xe9"}\n', r"p.jsonl, line 2, column \d+: not UTF-8"),
    ("p.json", b'{"ID": "\xff"}', r"p.json, line 1, column \d+: not UTF-8"),
    ("p.jsonl", b'{"id": ["ID"], "prediction": "a"}\n', r"p.jsonl, line 1: the id is a JSON array"),
    ("p.jsonl", b'{"id": true, "prediction": "a"}\n', r"p.jsonl, line 1: the id is a JSON boolean"),
    ("p.jsonl", b'{"id": 1.5, "prediction": "a"}\n', r"p.jsonl, line 1: the id is a JSON number"),
    ("p.jsonl", b'{"id": "ID", "prediction": {"text": "a"}}\n', r"p.jsonl, line 1: the prediction is a JSON object"),
    ("p.jsonl", b'{"id": "ID", "prediction": false}\n', r"p.jsonl, line 1: the prediction is a JSON boolean"),
    ("p.jsonl", b'{"id": "ID"}\n', r"p.jsonl, line 1: no prediction key"),
    ("p.jsonl", b'"ID"\n', r"p.jsonl, line 1: a JSON string"),
    ("p.json", b'"ID"', r"p.json: the file's content is a JSON string"),
    ("p.json", b'[{"id": "ID", "prediction": "a"}, ["ID", "b"]]', r"p.json, record 1: the record is a JSON array"),
    ("p.jsonl", b'{"id": "ID", "prediction": "a"}\n{"id": "no-such-id", "prediction": "b"}\n',
     r"p.jsonl: 1 prediction id\(s\) not in the data, e.g. \['no-such-id'\] \(first at .*p.jsonl, line 2\)"),
])  # fmt: skip
def test_odd_predictions_files_name_the_file_and_record(task, name, content, message, data, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content.replace(b"ID", first_id(task, data).encode()))
    with pytest.raises(FormatError, match=message):
        score_predictions_file(task, path, data / DATA[task])
    assert main(["eval", task, "--predictions", str(path), "--data", str(data / DATA[task])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlkit: error: ") and str(path) in err and "Traceback" not in err


def test_predictions_for_skipped_records_are_counted_not_refused(data, tmp_path):
    """A predictions file made for the whole dataset holds the ids of the records skipped as bad:
    under the skip rule they are left out and counted (an id the data never had stays an error
    while nothing was skipped: above)."""
    import shutil

    folder = tmp_path / "coco"
    shutil.copytree(data / "coco", folder)
    ids = [s.id for s in load_samples("caption", folder)]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": i, "prediction": "a photo of a shape"}) + "\n" for i in ids))
    raw = json.loads((folder / "captions_karpathy.json").read_text())
    del raw["images"][4]["filename"]
    (folder / "captions_karpathy.json").write_text(json.dumps(raw))
    with pytest.raises(FormatError, match=r"captions_karpathy\.json, images\[4\]: missing key 'filename'"):
        score_predictions_file("caption", preds, folder)
    res = score_predictions_file("caption", preds, folder, skips=Skips("skip"))
    assert res["counts"]["samples"] == len(ids) - 1 and res["skipped"]["total"] == 1
    assert res["counts"]["predictions_without_data"] == 1 and res["counts"]["missing_predictions"] == 0


def test_duplicate_ids_name_both_records(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"id": 7, "prediction": "a"}, {"id": "7", "prediction": "b"}]))
    with pytest.raises(FormatError, match=r"p.json, record 1: duplicate id '7' \(first at .*p.json, record 0\)"):
        read_predictions(path)


def test_null_and_number_predictions_are_answers(data, tmp_path):
    samples = load_samples("mcq", data / "mathvista")
    path = tmp_path / "p.json"
    path.write_text(json.dumps({s.id: (None if i == 0 else float(s.target["answer"])) for i, s in enumerate(samples)}))
    res = score_predictions_file("mcq", path, data / "mathvista")
    assert res["counts"]["empty_predictions"] == 1 and res["accuracy"] == pytest.approx((len(samples) - 1) / len(samples))


def test_bad_numeric_precision_names_the_line(data, tmp_path):
    tsv = (data / "mathvista" / "mathvista.tsv").read_text().splitlines()
    header = tsv[0].split("\t")
    row = tsv[2].split("\t")
    row[header.index("precision")] = "two"
    (tmp_path / "m.tsv").write_text("\n".join([tsv[0], tsv[1], "\t".join(row)]) + "\n")
    with pytest.raises(FormatError, match=r"m.tsv, line 3 \(index \d+\): precision 'two'; expected a whole number"):
        load_samples("mcq", tmp_path / "m.tsv")


def test_a_split_with_no_samples_is_an_error(data):
    with pytest.raises(VlkitError, match=r"no .*split"):
        load_samples("caption", data / "coco", split="tset")


def test_a_bad_mcq_row_is_skipped_and_counted_under_skip(data, tmp_path):
    """A wrong answer letter or precision always stopped the run, even under --on-bad-sample skip."""
    for fmt, column, value in (("mmbench", "answer", "Z"), ("mathvista", "precision", "two")):
        tsv = (data / fmt / f"{fmt}.tsv").read_text().splitlines()
        header, row = tsv[0].split("\t"), tsv[1].split("\t")
        row[header.index(column)] = value
        (tmp_path / f"{fmt}.tsv").write_text("\n".join([tsv[0], "\t".join(row), *tsv[2:]]) + "\n")
        skips = Skips("skip")
        assert len(load_samples("mcq", tmp_path / f"{fmt}.tsv", skips=skips)) == len(tsv) - 2
        assert skips.total == 1 and f"{column} '{value}'" in str(skips.items[0])


def _refcoco_copy(data, tmp_path, change) -> Path:
    import shutil

    folder = tmp_path / "ref"
    shutil.copytree(data / "refcoco", folder)
    inst = next(folder.rglob("instances.json"))
    doc = json.loads(inst.read_text())
    change(doc)
    inst.write_text(json.dumps(doc))
    return folder


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 0]), "expected \\[x, y, w, h\\] of finite numbers with w, h > 0"),
    (lambda d: d["annotations"][0].update(bbox=[1000, 1000, 10, 10]), "lies outside its"),
    (lambda d: d["images"][0].update(width=-5, height=0), "expected the image's size in pixels"),
])  # fmt: skip
def test_refcoco_boxes_that_cannot_be_scored_are_bad_records(data, tmp_path, change, message):
    """A zero-area box scored a perfect answer as a miss, and a bad image size shifted every parsed box."""
    folder = _refcoco_copy(data, tmp_path, change)
    with pytest.raises(FormatError, match=message):
        load_samples("grounding", folder)
    skips = Skips("skip")
    assert len(load_samples("grounding", folder, skips=skips)) < len(load_samples("grounding", data / "refcoco"))
    assert skips.total >= 1


def test_ids_that_read_the_same_are_one_id(data, tmp_path):
    """0 and "0" passed the loader's duplicate check, then stopped scoring with an error naming nothing."""
    import shutil

    folder = tmp_path / "vqa"
    shutil.copytree(data / "vqav2", folder)
    q = next(folder.glob("*questions*.json"))
    a = next(folder.glob("*annotations*.json"))
    qd, ad = json.loads(q.read_text()), json.loads(a.read_text())
    first = qd["questions"][0]["question_id"]
    qd["questions"][1]["question_id"] = ad["annotations"][1]["question_id"] = str(first)
    q.write_text(json.dumps(qd))
    a.write_text(json.dumps(ad))
    with pytest.raises(FormatError, match=f"questions.json: duplicate question_id \\['{first}'\\]"):
        load_samples("vqa", folder)


def test_a_byte_order_mark_is_read_past(data, tmp_path):
    """Windows tools start UTF-8 files with one: it cost JSON lines their first record and stopped TSV and JSON."""
    import shutil

    for task, fmt in (("mcq", "mmbench"), ("caption", "coco"), ("vqa", "vqav2")):
        folder = tmp_path / fmt
        shutil.copytree(data / fmt, folder)
        for f in [*folder.glob("*.tsv"), *folder.glob("*.json")]:
            f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
        assert [s.id for s in load_samples(task, folder)] == [s.id for s in load_samples(task, data / fmt)], fmt
    lines = tmp_path / "c.jsonl"
    lines.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"a": 2}\n')
    from vlkit.data.formats.common import iter_jsonl

    assert [r for _, r in iter_jsonl(lines, "lines")] == [{"a": 1}, {"a": 2}]
