"""Streaming readers: the chunked JSON parser against json.load, each format's streaming
reader against its list reader, bounded memory on a large file, and WebDataset shards
through DataLoader workers on several (simulated) ranks."""

import io
import json
import tarfile
import tracemalloc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlkit.data.formats.coco import iter_karpathy, read_karpathy
from vlkit.data.formats.common import FormatError
from vlkit.data.formats.json_stream import iter_json_array
from vlkit.data.formats.llava import iter_llava, read_llava
from vlkit.data.formats.refcoco import iter_refcoco, read_refcoco
from vlkit.data.formats.shapes_export import export
from vlkit.data.formats.shards import ShardStream, write_shards
from vlkit.data.formats.vqav2 import iter_vqav2, read_vqav2
from vlkit.data.shapes import ShapesWorld

CHUNKS = (1, 7, 64, 1 << 18)
TRICKY = 'ab[]{}",:\\/ \n\t\x00é€😀'  # brackets, quotes and escapes inside strings; non-BMP → surrogate pairs

# ---------------------------------------------------------------- the parser


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(TRICKY, max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(TRICKY, max_size=6), inner, max_size=4),
    max_leaves=12,
)
dump_styles = st.fixed_dictionaries({"indent": st.sampled_from([None, 0, 2]), "ensure_ascii": st.booleans(),
                                     "separators": st.sampled_from([None, (",", ":"), (" , ", " : ")])})  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(items=st.lists(json_values, max_size=6), style=dump_styles)
def test_top_level_array_matches_json_load(tmp_path_factory, items, style):
    text = json.dumps(items, **style)
    path = _write(tmp_path_factory.getbasetemp() / "top.json", f" \n{text}\n ")
    for chunk in CHUNKS:
        assert list(iter_json_array(path, chunk_size=chunk)) == json.loads(text)


@settings(max_examples=60, deadline=None)
@given(before=st.dictionaries(st.text(TRICKY, max_size=6).filter(lambda k: k != "data"), json_values, max_size=3),
       items=st.lists(json_values, max_size=6), after=json_values, style=dump_styles)  # fmt: skip
def test_keyed_array_matches_json_load(tmp_path_factory, before, items, after, style):
    doc = {**before, "data": items, "zz after": after}
    path = _write(tmp_path_factory.getbasetemp() / "keyed.json", json.dumps(doc, **style))
    for chunk in CHUNKS:
        assert list(iter_json_array(path, "data", chunk_size=chunk)) == json.loads(path.read_text())["data"]


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        " [ ] ",
        "[0]",
        "[1.5, -0.25e-3, 12345678901234567890, 1E+2, -0, 7]",
        '["]", "[", "}", "{", "\\"", "\\\\", "\\\\\\"]", "\\u005d", "\\ud83d\\ude00"]',
        '[{"a": [[], {}, [[[]]]], "b": {"]": "[", "}": "{"}}, true, false, null]',
        '{"info": {"x": [1, {"y": "]]"}], "z": "\\"}"}, "n": 3.25, "data": [{"k": "v"}, [1, 2]], "tail": [4]}',
    ],
)
def test_every_chunk_boundary(tmp_path, text):
    """Each split point of the text: numbers, escapes and strings cut anywhere."""
    path = _write(tmp_path / "x.json", text)
    key = "data" if text.startswith("{") else None
    want = json.loads(text)["data"] if key else json.loads(text)
    for chunk in range(1, len(text) + 2):
        assert list(iter_json_array(path, key, chunk_size=chunk)) == want, chunk


@pytest.mark.parametrize(
    "text,key,match",
    [
        ('[1, {"a": x}, 3]', None, r"x\.json, item 1: malformed JSON \(Expecting value at character 10\)"),
        ("[1, 2 3]", None, r"x\.json, item 1: malformed JSON \(expecting ',' or '\]'; found '3' at character 6\)"),
        ('{"data": [{"a": 1}, {"a": 2,}]}', "data", r"x\.json, data\[1\]: malformed JSON \(Expecting property name"),
        ('{"data": [1, 2', "data", r"x\.json, data\[1\]: malformed JSON \(expecting ',' or '\]'; the file ends\)"),
        ('{"data": [', "data", r"x\.json: malformed JSON \(the file ends inside the array, after 0 items\)"),
        ("[1] [2]", None, r"x\.json: malformed JSON \(extra data after the top-level array at character 4\)"),
        ("", None, r"x\.json: malformed JSON \(the file ends before the top level\)"),
        ('["a", "b\tc"]', None, r"x\.json, item 1: malformed JSON \(Invalid control character at character 8\)"),
        ('["a", "b', None, r"x\.json, item 1: malformed JSON \(Unterminated string starting at character 6\)"),  # not "at at"
        ('{"other": [1]}', "data", r"x\.json: no key 'data' in the top-level object; expected the test layout"),
        ('{"data": {"a": 1}}', "data", r"x\.json: 'data' is a JSON object; expected the test layout"),
        ('{"data": [1]}', None, r"x\.json: the top level is a JSON object; expected the test layout"),
        ("[1]", "data", r"x\.json: the top level is a JSON array; expected the test layout"),
        ('{"a": [1, }, "data": []}', "data", r"x\.json, a\[1\]: malformed JSON \(Expecting value"),
        ('{"a" 1, "data": []}', "data", r"x\.json, key 'a': malformed JSON \(expecting ':'; found '1'"),
    ],
)
def test_malformed_names_file_item_and_offset(tmp_path, text, key, match):
    path = _write(tmp_path / "x.json", text)
    messages = set()
    for chunk in (1, 7, 1 << 18):
        with pytest.raises(FormatError, match=match) as err:
            list(iter_json_array(path, key, expected="the test layout", chunk_size=chunk))
        messages.add(str(err.value))
    assert len(messages) == 1  # the same error whatever the chunk size


def test_not_utf8_and_missing_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'["ok", "\xff"]')
    with pytest.raises(FormatError, match=r"x\.json, line 1, column 9: not UTF-8 \(byte 0xff\)"):
        list(iter_json_array(path))
    with pytest.raises(FileNotFoundError, match=r"nope\.json: missing; expected a JSON array"):
        list(iter_json_array(tmp_path / "nope.json"))


def test_items_come_before_the_rest_is_read(tmp_path):
    path = _write(tmp_path / "x.json", '[{"a": 1}, {"a": 2}, oops]')
    it = iter_json_array(path, chunk_size=4)
    assert next(it) == {"a": 1} and next(it) == {"a": 2}
    with pytest.raises(FormatError, match=r"item 2: malformed JSON"):
        next(it)


def test_memory_stays_far_below_the_file_size(tmp_path):
    """A ~40 MB VQAv2-like file: streaming holds a chunk and an item; json.load holds it all."""
    path = tmp_path / "big.json"
    pad = "x" * 1500
    n_skipped, n = 4000, 16000
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"info": {"year": 2017, "nested": {"list": [1, 2, 3]}}, "skipped": [')
        f.write(",".join(json.dumps({"id": i, "pad": pad}) for i in range(n_skipped)))
        f.write('], "annotations": [')
        answers = [{"answer": "yes", "answer_confidence": "yes", "answer_id": j} for j in range(10)]
        f.write(",\n".join(json.dumps({"question_id": i, "answers": answers, "pad": pad}) for i in range(n)))
        f.write('], "license": {"name": "test"}}')
    size = path.stat().st_size
    assert size > 30e6

    tracemalloc.start()
    try:
        count = total = 0
        for rec in iter_json_array(path, "annotations"):
            count, total = count + 1, total + rec["question_id"]
        streamed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        with open(path, encoding="utf-8") as f:
            whole = len(json.load(f)["annotations"])
        loaded = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (count, total, whole) == (n, n * (n - 1) // 2, n)
    assert streamed < size / 10, (streamed, size)
    assert loaded > size > 10 * streamed  # the measurement sees a whole-file load


# ---------------------------------------------------------------- the format readers

WORLD = ShapesWorld(seed=5)
N = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    for f in ("coco", "vqav2", "llava", "refcoco"):
        export(WORLD, N, root / f, f)
    return root


def test_streaming_readers_equal_list_readers(exported):
    coco, vqa = exported / "coco" / "captions_karpathy.json", exported / "vqav2"
    for split in (None, "test", ("test", "restval")):
        assert list(iter_karpathy(coco, split)) == read_karpathy(coco, split)
    assert len(read_karpathy(coco)) == N
    pairs = (vqa / "questions.json", vqa / "annotations.json")
    assert list(iter_vqav2(*pairs)) == read_vqav2(*pairs) and len(read_vqav2(*pairs)) == sum(len(WORLD.scene(i).vqa) for i in range(N))
    assert list(iter_vqav2(pairs[0])) == read_vqav2(pairs[0])
    assert list(iter_llava(exported / "llava" / "conversations.json")) == read_llava(exported / "llava" / "conversations.json")
    for split in (None, "test"):
        assert list(iter_refcoco(exported / "refcoco", split)) == read_refcoco(exported / "refcoco", split)
    assert read_refcoco(exported / "refcoco")


@pytest.mark.parametrize("fmt", ["coco", "llava"])
def test_readers_yield_before_a_bad_tail(exported, tmp_path, fmt):
    """A record is yielded before the rest of the file is read: the bad tail raises later."""
    src = exported / fmt / ("captions_karpathy.json" if fmt == "coco" else "conversations.json")
    text = src.read_text()
    cut = text.index("}, {", len(text) // 2) + 3
    bad = _write(tmp_path / src.name, text[:cut] + "garbage" + text[cut:])
    it = iter_karpathy(bad, image_root=src.parent) if fmt == "coco" else iter_llava(bad, src.parent)
    first = next(it)
    assert first == (read_karpathy(src) if fmt == "coco" else read_llava(src))[0]
    with pytest.raises(FormatError, match=rf"{src.name}, (images\[\d+\]|item \d+): malformed JSON"):
        list(it)


def test_vqav2_streams_annotations_in_their_order(exported, tmp_path):
    vqa = exported / "vqav2"
    anns = json.loads((vqa / "annotations.json").read_text())
    anns["annotations"].reverse()
    anns = {"info": {"note": "keys before the list are skipped"}, **anns}
    _write(tmp_path / "annotations.json", json.dumps(anns))
    recs = read_vqav2(vqa / "questions.json", tmp_path / "annotations.json")
    assert recs == read_vqav2(vqa / "questions.json", vqa / "annotations.json")[::-1]
    anns["annotations"].append({"question_id": 10**9, "answers": [{"answer": "x"}]})
    _write(tmp_path / "annotations.json", json.dumps(anns))
    with pytest.raises(FormatError, match=r"annotations\.json, annotations\[64\]: question_id 1000000000 is not in .*questions\.json"):
        read_vqav2(vqa / "questions.json", tmp_path / "annotations.json")


def test_refcoco_skips_masks_and_other_keys(exported, tmp_path):
    """COCO instances carry masks and extra keys around the lists the reader streams."""
    src = exported / "refcoco"
    inst = json.loads((src / "instances.json").read_text())
    for a in inst["annotations"]:
        a["segmentation"] = [[float(v) for v in range(40)]]
    inst = {"info": {"year": 2014}, "licenses": [{"id": 1}], **inst}
    _write(tmp_path / "instances.json", json.dumps(inst, indent=1))
    _write(tmp_path / "refs.json", (src / "refs.json").read_text())
    assert read_refcoco(tmp_path, image_dir=src / "images") == read_refcoco(src)


# ---------------------------------------------------------------- shards through DataLoader workers

N_SHARDED = 24


def _tag(sample: dict) -> tuple[int, int, str]:
    """Runs in the worker (the collate step), so it can say which worker produced the sample."""
    info = torch.utils.data.get_worker_info()
    return (info.id if info else -1), sample["json"]["id"], sample["url"]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Eight shards of three samples, and a ninth with two bad samples and one good one."""
    out = tmp_path_factory.mktemp("shards")
    samples = ({"__key__": f"s{i:04d}", "png": Image.new("RGB", (8, 8), (i, 0, 0)), "json": {"id": i}} for i in range(N_SHARDED))
    files = write_shards(samples, out, maxcount=3, prefix="a")
    assert len(files) == 8
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    members = [("bad1.png", b"not a png"), ("bad1.json", b"{}"), ("bad2.png", png.getvalue()), ("bad2.json", b"{oops"),
               ("good.png", png.getvalue()), ("good.json", json.dumps({"id": N_SHARDED}).encode())]  # fmt: skip
    with tarfile.open(out / "a-000008.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def _read(shard_dir, **kw):
    stream = ShardStream(shard_dir, shuffle=4, seed=1, on_bad_sample="skip", **kw)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, collate_fn=_tag)
    return list(loader), stream.skips


@pytest.mark.parametrize("world_size", [1, 2])
def test_shards_split_by_rank_and_worker_see_each_sample_once(shard_dir, monkeypatch, world_size):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    seen, owner, skipped = [], {}, {}
    for rank in range(world_size):
        monkeypatch.setenv("RANK", str(rank))
        got, skips = _read(shard_dir)
        for worker, i, url in got:
            assert owner.setdefault(url, (rank, worker)) == (rank, worker)  # a shard is read by one worker of one rank
            seen.append(i)
        for reason, n in skips.counts.items():
            skipped[reason] = skipped.get(reason, 0) + n
        assert {w for w, _, _ in got} == {0, 1}  # both workers of this rank had shards
    assert sorted(seen) == list(range(N_SHARDED + 1))  # every sample exactly once
    assert len(owner) == 9 and len(set(owner.values())) == 2 * world_size
    assert skipped == {"corrupt image": 1, "malformed json": 1}  # counted in the workers, seen here


def test_set_epoch_reshuffles_reproducibly(shard_dir):
    def order(epoch):
        stream = ShardStream(shard_dir, shuffle=20, seed=1, on_bad_sample="skip")
        stream.set_epoch(epoch)
        return [s["json"]["id"] for s in stream]

    assert order(0) == order(0) and order(1) == order(1)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))


def test_more_ranks_than_shards_is_refused_clearly(shard_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="9 shards for 16 ranks"):
        list(ShardStream(shard_dir))
    monkeypatch.setenv("WORLD_SIZE", "9")
    assert len(list(ShardStream(shard_dir, shuffle=0))) == 3  # rank 3 of 9: one shard, three samples


def test_shards_resampled_through_workers(shard_dir):
    stream = ShardStream(shard_dir, shuffle=4, resample=True, on_bad_sample="skip")
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, collate_fn=_tag)
    got = []
    for sample in loader:
        got.append(sample)
        if len(got) == 3 * N_SHARDED:
            break
    assert {w for w, _, _ in got} == {0, 1} and {i for _, i, _ in got} <= set(range(N_SHARDED + 1))
