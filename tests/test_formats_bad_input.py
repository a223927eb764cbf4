"""Bad records: errors name the file and record and say what was expected; skips are counted."""

import io
import json
import tarfile

import pytest

from vlkit.data.formats.coco import read_karpathy
from vlkit.data.formats.common import FormatError
from vlkit.data.formats.llava import read_llava
from vlkit.data.formats.refcoco import read_refcoco
from vlkit.data.formats.shards import ShardStream
from vlkit.data.formats.shapes_export import export
from vlkit.data.formats.tsv import read_tsv
from vlkit.data.formats.vqav2 import read_vqav2
from vlkit.data.images import BadSample


def test_malformed_json_names_file(tmp_path):
    p = tmp_path / "captions.json"
    p.write_text('{"images": [')
    with pytest.raises(FormatError, match=r"captions\.json: malformed JSON"):
        read_karpathy(p)


def test_coco_record_errors(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"images": [{"filename": "a.png", "sentences": [{"raw": "x"}]}, {"filename": "b.png"}]}))
    with pytest.raises(FormatError, match=r"c\.json, images\[1\]: missing key 'sentences'"):
        read_karpathy(p)
    p.write_text(json.dumps({"images": [{"filename": "a.png", "cocoid": 7, "sentences": [{"raw": "x"}]}] * 2}))
    with pytest.raises(FormatError, match=r"duplicate image id.*\['7'\]"):
        read_karpathy(p)
    p.write_text(json.dumps({"images": [{"filename": "a.png", "sentences": [{"raw": "x"}, {"raw": "  "}]}]}))
    with pytest.raises(FormatError, match=r"c\.json, images\[0\]\.sentences\[1\]: a blank caption"):  # it was a reference
        read_karpathy(p)


def test_vqa_errors(tmp_path):
    q, a = tmp_path / "q.json", tmp_path / "a.json"
    q.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1, "question": "?"}] * 2}))
    with pytest.raises(FormatError, match=r"q\.json: duplicate question_id \['1'\]"):
        read_vqav2(q)
    q.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1, "question": "?"}, {"question_id": 2, "image_id": 1, "question": "?"}]}))
    a.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "x"}]}]}))
    with pytest.raises(FormatError, match=r"q\.json, questions\[1\]: question_id 2 has no annotation"):
        read_vqav2(q, a)
    q.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 1, "question": " "}]}))
    with pytest.raises(FormatError, match=r"q\.json, questions\[0\]: a blank question"):  # it was scored
        read_vqav2(q)


def test_llava_errors(tmp_path):
    p = tmp_path / "l.json"
    p.write_text(json.dumps([{"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]))
    with pytest.raises(FormatError, match=r"record 0 \(id 'a'\): 0 '<image>' placeholders"):
        read_llava(p)
    p.write_text(json.dumps([{"id": "a", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}]}]))
    with pytest.raises(FormatError, match=r"turn 0 is .*; expected \{'from': 'human'"):
        read_llava(p)


def test_refcoco_errors(tmp_path):
    export(0, 2, tmp_path, "refcoco")
    inst = json.loads((tmp_path / "instances.json").read_text())
    inst["annotations"][0]["bbox"] = [0, 0, -1, 3]
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    with pytest.raises(FormatError, match=r"instances\.json, annotations\[0\]: bbox"):
        read_refcoco(tmp_path)


def test_tsv_errors(tmp_path):
    p = tmp_path / "b.tsv"
    p.write_text("index\tquestion\tanswer\timage\n1\tq?\tA\tnot-base64!\n2\tq?\n")
    with pytest.raises(FormatError, match=r"b\.tsv, line 3: 2 fields; expected 4"):
        read_tsv(p)
    p.write_text("index\tquestion\tanswer\timage\n1\tq?\tA\tnot-base64!\n1\tq?\tB\t\n")
    with pytest.raises(FormatError, match=r"line 3: duplicate index '1'"):
        read_tsv(p)
    p.write_text("index\tquestion\tanswer\timage\n1\tq?\tA\tnot-base64!\n")
    with pytest.raises(BadSample, match=r"b\.tsv, line 2 \(index 1\): 'image' is not valid base64"):
        read_tsv(p)[0].image()
    p.write_text("index\tquestion\n")
    with pytest.raises(FormatError, match="header lacks column"):
        read_tsv(p)


def test_shards_skip_and_count_bad_samples(tmp_path):
    export(0, 4, tmp_path, "shards")
    bad = tmp_path / "shards" / "shapes-999999.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in [("x1.png", b"not a png"), ("x1.json", b"{}"), ("x2.png", b"\x89PNG"), ("x2.json", b"{oops")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BadSample, match=r"shapes-999999\.tar, key x1: corrupt or truncated image"):
        list(ShardStream(tmp_path / "shards", shuffle=0))
    stream = ShardStream(tmp_path / "shards", shuffle=0, on_bad_sample="skip")
    got = list(stream)
    assert len(got) == 4
    assert stream.skips.counts == {"corrupt image": 1, "malformed json": 1}
    assert "shapes-999999.tar, key x1" in stream.skips.examples["corrupt image"][0]
