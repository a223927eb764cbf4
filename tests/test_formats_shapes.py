"""Every dataset format: the shapes world exports itself and the reader gets the world back."""

import json

import pytest

from vlkit.data.formats.coco import read_karpathy
from vlkit.data.formats.common import FormatError
from vlkit.data.formats.imagefolder import read_imagefolder
from vlkit.data.formats.llava import read_llava
from vlkit.data.formats.refcoco import read_refcoco
from vlkit.data.formats.shapes_export import FORMATS, export
from vlkit.data.formats.shards import ShardStream, pack
from vlkit.data.formats.tsv import read_tsv
from vlkit.data.formats.vqav2 import read_vqav2
from vlkit.data.images import load_image
from vlkit.data.shapes import CLASS_NAMES, ShapesWorld
from vlkit.errors import VlkitError

N = 12
WORLD = ShapesWorld(seed=5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return {f: (root / f, export(WORLD, N, root / f, f)) for f in FORMATS}


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        export(0, 1, tmp_path, "csv")


def test_coco_karpathy(exported):
    folder, summary = exported["coco"]
    recs = read_karpathy(folder / "captions_karpathy.json", split="test")
    assert [r.id for r in recs] == list(range(N))
    for i, r in enumerate(recs):
        assert r.captions == [c.text for c in WORLD.scene(i).captions]
        assert load_image(r.image).tobytes() == WORLD.scene(i).render().tobytes()
    with pytest.raises(FormatError, match=r"captions_karpathy\.json: no records; expected records of split \['train'\] \(it has \['test'\]\)"):
        read_karpathy(folder / "captions_karpathy.json", split="train")
    raw = json.loads((folder / "captions_karpathy.json").read_text())
    assert raw["images"][0]["sentences"][0]["tokens"] and raw["images"][0]["filepath"] == "images"


def test_vqav2(exported):
    folder, summary = exported["vqav2"]
    recs = read_vqav2(folder / "questions.json", folder / "annotations.json")
    assert len(recs) == summary["questions"]
    expected = [(i, qa) for i in range(N) for qa in WORLD.scene(i).vqa]
    for r, (i, qa) in zip(recs, expected):
        assert (r.image_id, r.question, r.answers, r.question_type) == (i, qa["question"], [qa["answer"]] * 10, qa["type"])
        assert r.image.is_file()
    assert all(a == [] for a in (r.answers for r in read_vqav2(folder / "questions.json")))


def test_llava(exported):
    folder, _ = exported["llava"]
    convs = read_llava(folder / "conversations.json")
    assert len(convs) == N
    s = WORLD.scene(3)
    assert convs[3].turns[0] == ("Describe the image.", s.captions[0].text)
    assert convs[3].turns[1:] == [(qa["question"], qa["answer"]) for qa in s.vqa]
    raw = json.loads((folder / "conversations.json").read_text())
    assert raw[0]["conversations"][0]["value"].startswith("<image>\n")
    assert load_image(convs[3].image).size == (64, 64)


def test_refcoco(exported):
    folder, summary = exported["refcoco"]
    samples = read_refcoco(folder, split="test")
    assert len(samples) == summary["sentences"] == sum(len(WORLD.scene(i).referring) for i in range(N))
    by_text = {(s.image_id, s.text): s.box for s in samples}
    for i in range(N):
        for r in WORLD.scene(i).referring:
            assert by_text[(i, r["text"])] == pytest.approx(tuple(r["box"]), abs=0.02)
    with pytest.raises(FormatError, match=r"refs\.json: no records; expected refs of split 'val' \(it has \['test'\]\)"):
        read_refcoco(folder, split="val")


def test_imagefolder(exported):
    folder, _ = exported["imagefolder"]
    paths, labels, names, templates = read_imagefolder(folder)
    assert len(paths) == N and len(names) == len(CLASS_NAMES)
    assert labels == sorted(labels)  # files listed class by class
    by_index = {int(p.stem.split("_")[1]): y for p, y in zip(paths, labels)}
    assert by_index == {i: WORLD.single(i).label for i in range(N)}
    assert all("{c}" in t for t in templates)


def test_mmbench_tsv(exported):
    folder, summary = exported["mmbench"]
    rows = read_tsv(folder / "mmbench.tsv")
    assert len(rows) == summary["questions"] > 0
    for r in rows:
        i, k = divmod(int(r.index), 100)
        qa = WORLD.scene(i).vqa[k]
        assert r.question == qa["question"] and r.options[r.answer] == qa["answer"] and len(r.options) == 4
    assert rows[0].image().tobytes() == WORLD.scene(int(rows[0].index) // 100).render().tobytes()


def test_mathvista_tsv(exported):
    folder, _ = exported["mathvista"]
    rows = read_tsv(folder / "mathvista.tsv")
    assert rows and all(r.options == {} and r.answer.isdigit() and r.fields["answer_type"] == "integer" for r in rows)


def test_shards_stream_everything_once(exported):
    folder, summary = exported["shards"]
    assert len(summary["files"]) > 1
    stream = ShardStream(folder / "shards", shuffle=8, seed=1)
    got = list(stream)
    assert sorted(s["json"]["id"] for s in got) == list(range(N))
    assert [s["json"]["id"] for s in got] != list(range(N))  # shuffled
    s = got[0]
    assert s["image"].tobytes() == WORLD.scene(s["json"]["id"]).render().tobytes()
    assert s["json"]["captions"] == [c.text for c in WORLD.scene(s["json"]["id"]).captions]
    assert stream.skips.total == 0


def test_shards_resampled_is_endless(exported):
    folder, _ = exported["shards"]
    it = iter(ShardStream(folder / "shards", shuffle=0, resample=True))
    assert len([next(it) for _ in range(3 * N)]) == 3 * N


def test_pack_from_coco_counts_missing_images(exported, tmp_path):
    folder, _ = exported["coco"]
    src = tmp_path / "coco"
    import shutil

    shutil.copytree(folder, src)
    (src / "images" / "shapes_000000000003.png").unlink()
    summary = pack(src, tmp_path / "shards", maxcount=5, on_bad_sample="skip")
    assert summary["samples"] == N - 1 and summary["skipped"]["by_reason"] == {"bad image": 1}
    got = list(ShardStream(tmp_path / "shards", shuffle=0))
    assert sorted(s["json"]["id"] for s in got) == [i for i in range(N) if i != 3]
    assert got[0]["json"]["captions"] == [c.text for c in WORLD.scene(got[0]["json"]["id"]).captions]


@pytest.mark.parametrize("fmt", ["coco", "llava"])
def test_an_export_to_a_relative_folder_stores_paths_inside_it(tmp_path, monkeypatch, fmt):
    """The images are written in a temporary sibling folder first; a relative --out used to leave
    that folder's path in a LLaVA export (gone once the export is renamed into place)."""
    monkeypatch.chdir(tmp_path)
    export(WORLD, 2, "data/out", fmt)
    text = "".join(p.read_text() for p in (tmp_path / "data/out").glob("*.json"))
    assert ".tmp-" not in text
    folder = tmp_path / "data/out"
    records = read_llava(folder / "conversations.json") if fmt == "llava" else read_karpathy(folder / "captions_karpathy.json", split="test")
    assert [load_image(r.image).tobytes() for r in records] == [WORLD.scene(i).render().tobytes() for i in range(2)]


@pytest.mark.parametrize("fmt", ["imagefolder", "shards"])
def test_re_export_replaces_the_folder_whole(tmp_path, fmt):
    """A smaller re-export used to leave the earlier images (as records of their class) and shards."""
    out = tmp_path / fmt
    export(WORLD, 12, out, fmt)
    small = export(WORLD, 2, out, fmt)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.suffix in (".png", ".tar"))
    if fmt == "imagefolder":
        assert len(files) == 2 and len(read_imagefolder(out)[0]) == 2
    else:
        assert small["files"] == [str(out / f) for f in files] == [str(out / "shards" / f"shapes-00000{k}.tar") for k in range(2)]
    assert json.loads((out / "shapes_export.json").read_text()) == small


def test_export_refuses_a_folder_that_is_not_an_export(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(VlkitError, match="is not an earlier shapes export"):
        export(WORLD, 2, tmp_path, "coco")
    assert (tmp_path / "mine.txt").read_text() == "keep me"
