"""The photo index (``vlkit index`` / ``vlkit search``): every image under a folder embedded
(unreadable files skipped and counted), exact search equal to brute force over the model's own
embeddings, incremental updates that embed only new or changed files and drop deleted ones, a
crash mid-write that leaves the previous index loadable, FAISS HNSW above the size threshold,
and a query model other than the one that made the index refused by name."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlkit
from vlkit.cli import main
from vlkit.data.images import load_image
from vlkit.errors import VlkitError
from vlkit.index import PhotoIndex, Searcher, backends, build_index
from vlkit.index import photos as photos_mod
from vlkit.index.identity import probe_image

from _index_util import shapes_images, tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _embed(model, paths):
    with torch.no_grad():
        return F.normalize(model.encode_image(model.processor.batch([load_image(p) for p in paths])), dim=-1).numpy()


def _count_embedded(model, monkeypatch) -> list[int]:
    """Records the batch size of every ``encode_image`` call on a file (not the identity probe)."""
    seen = []
    original = model.encode_image
    probe = model.processor.batch([probe_image()])

    def counting(pixels):
        if not (len(pixels) == 1 and torch.equal(pixels, probe)):
            seen.append(len(pixels))
        return original(pixels)

    monkeypatch.setattr(model, "encode_image", counting)
    return seen


def test_index_and_search_match_brute_force(tmp_path, clip_dir):
    paths = shapes_images(tmp_path / "photos", n=12)
    (tmp_path / "photos" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "photos" / ".hidden.png").write_bytes(b"skipped silently")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "photos" / "dangling.png").symlink_to(tmp_path / "nowhere.png")  # a link to nothing: unreadable too
    model = vlkit.load(clip_dir)
    summary = build_index(model, clip_dir, tmp_path / "photos", tmp_path / "idx", precision="fp32", progress=False)
    assert (summary["images"], summary["new"], summary["unreadable"]) == (12, 12, 2)
    assert summary["kind"] == "exact" and "exact" in summary["kind_reason"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert [b["path"] for b in meta["unreadable"]] == ["broken.png", "dangling.png"]
    assert "corrupt" in meta["unreadable"][0]["problem"]

    idx = PhotoIndex.load(tmp_path / "idx")
    rel = [p.relative_to(tmp_path / "photos").as_posix() for p in paths]
    assert [f.path for f in idx.files] == sorted(rel)
    truth = _embed(model, [tmp_path / "photos" / f.path for f in idx.files])
    np.testing.assert_allclose(idx.vectors, truth, atol=1e-5)

    searcher = Searcher(idx, model, clip_dir)
    tokens = model.tokenizer(["a red star"])
    with torch.no_grad():
        q = F.normalize(model.encode_text(tokens["input_ids"], tokens["attention_mask"]), dim=-1).numpy()[0]
    order = np.argsort(-(truth @ q), kind="stable")[:5]
    hits = searcher.search("a red star", k=5)
    assert [h.path for h in hits] == [idx.files[i].path for i in order]
    np.testing.assert_allclose([h.score for h in hits], (truth @ q)[order], atol=1e-5)
    by_image = searcher.search(image=load_image(paths[3]), k=1)
    assert by_image[0].path == rel[3] and by_image[0].score == pytest.approx(1.0, abs=1e-5)

    body = searcher.search_json("a red star", k=3)
    assert body["index"] == {"size": 12, "kind": "exact", "model": "clip"}
    assert [r["path"] for r in body["results"]] == [h.path for h in hits[:3]]
    assert all(r["thumbnail"].startswith("data:image/jpeg;base64,") for r in body["results"])
    data, mime = searcher.image_bytes(rel[0])
    assert data == paths[0].read_bytes() and mime == "image/png"
    for bad in ("../clip/config.json", "broken.png", "/etc/passwd"):
        with pytest.raises(VlkitError, match="not an image of the index"):
            searcher.image_bytes(bad)
    for k in (0, 101, 2.5):
        with pytest.raises(VlkitError, match="expected a whole number from 1 to 100"):
            searcher.search("a star", k=k)
    with pytest.raises(VlkitError, match="exactly one"):
        searcher.search("  ")


def test_update_embeds_only_new_or_changed_and_drops_deleted(tmp_path, clip_dir, monkeypatch):
    photos = tmp_path / "photos"
    paths = shapes_images(photos, n=10)
    model = vlkit.load(clip_dir)
    build_index(model, clip_dir, photos, tmp_path / "idx", precision="fp32", progress=False)
    before = PhotoIndex.load(tmp_path / "idx")
    seen = _count_embedded(model, monkeypatch)

    again = build_index(model, clip_dir, photos, tmp_path / "idx", precision="fp32", progress=False)
    assert (again["new"], again["changed"], again["unchanged"], again["removed"], sum(seen)) == (0, 0, 10, 0, 0)

    paths[0].unlink()  # deleted
    Image.new("RGB", (48, 48), (200, 30, 30)).save(paths[1])  # changed in place
    os.utime(paths[1], ns=(paths[1].stat().st_atime_ns, paths[1].stat().st_mtime_ns + 10**9))
    new = photos / "c" / "new.png"
    new.parent.mkdir()
    Image.new("RGB", (48, 48), (30, 30, 200)).save(new)
    (photos / "c" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    summary = build_index(model, clip_dir, photos, tmp_path / "idx", precision="fp32", progress=False)
    assert (summary["new"], summary["changed"], summary["unchanged"], summary["removed"], summary["unreadable"]) == (1, 1, 8, 1, 1)
    assert sum(seen) == 2  # only the changed and the new file went through the model

    after = PhotoIndex.load(tmp_path / "idx")
    names = [f.path for f in after.files]
    assert paths[0].relative_to(photos).as_posix() not in names and "c/new.png" in names
    old_rows = {f.path: before.vectors[i] for i, f in enumerate(before.files)}
    for i, f in enumerate(after.files):
        if f.path in old_rows and f.path != paths[1].relative_to(photos).as_posix():
            np.testing.assert_array_equal(after.vectors[i], old_rows[f.path])
    fresh = _embed(model, [photos / f.path for f in after.files])
    np.testing.assert_allclose(after.vectors, fresh, atol=1e-5)  # the changed file's row is its new content

    seen.clear()  # an unchanged unreadable file is remembered, not read again
    summary = build_index(model, clip_dir, photos, tmp_path / "idx", precision="fp32", progress=False)
    assert (summary["new"], summary["unreadable"], summary["unreadable_new"], sum(seen)) == (0, 1, 0, 0)


def test_crash_mid_write_leaves_previous_index_loadable(tmp_path, clip_dir, monkeypatch):
    photos = tmp_path / "photos"
    shapes_images(photos, n=6)
    model = vlkit.load(clip_dir)
    build_index(model, clip_dir, photos, tmp_path / "idx", precision="fp32", progress=False)
    before = PhotoIndex.load(tmp_path / "idx")
    shapes_images(photos / "more", n=4, seed=1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(photos_mod.np, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        build_index(model, clip_dir, photos, tmp_path / "idx", precision="fp32", progress=False)
    monkeypatch.undo()
    after = PhotoIndex.load(tmp_path / "idx")
    assert [f.path for f in after.files] == [f.path for f in before.files]
    np.testing.assert_array_equal(after.vectors, before.vectors)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.lock", "idx", "photos"]  # no temporary folder left behind


def test_query_model_must_be_the_one_that_made_the_index(tmp_path, clip_dir):
    photos = tmp_path / "photos"
    shapes_images(photos, n=4)
    build_index(vlkit.load(clip_dir), clip_dir, photos, tmp_path / "idx", precision="fp32", progress=False)
    import shutil

    shutil.copytree(clip_dir, tmp_path / "moved")  # the same model elsewhere is accepted
    assert Searcher.open(tmp_path / "idx", tmp_path / "moved").search("a star", k=1)
    other = tiny_clip(tmp_path / "retrained", seed=1)
    with pytest.raises(VlkitError, match="made by model 'clip'.*'retrained'.*embeds differently"):
        Searcher.open(tmp_path / "idx", other)
    wide = tiny_clip(tmp_path / "wide", embed_dim=16)
    with pytest.raises(VlkitError, match="8-wide embeddings.*'wide'.*16-wide"):
        Searcher.open(tmp_path / "idx", wide)
    with pytest.raises(VlkitError, match="embeds differently"):  # nor may another model update it
        build_index(vlkit.load(other), other, photos, tmp_path / "idx", precision="fp32", progress=False)
    with pytest.raises(VlkitError, match="indexes the folder"):
        build_index(vlkit.load(clip_dir), clip_dir, tmp_path / "moved", tmp_path / "idx", precision="fp32", progress=False)


def test_faiss_above_threshold_is_chosen_reported_and_accurate(tmp_path, clip_dir, monkeypatch):
    pytest.importorskip("faiss")
    photos = tmp_path / "photos"
    shapes_images(photos, n=12)
    monkeypatch.setattr(backends, "EXACT_MAX", 8)
    model = vlkit.load(clip_dir)
    for kind, out in (("auto", "pq"), ("rabitq", "rabitq"), ("hnsw", "hnsw"), ("ivf", "ivf")):
        summary = build_index(model, clip_dir, photos, tmp_path / kind, kind=kind, precision="fp32", progress=False)
        assert summary["kind"] == out
        reason = "12 vectors > 8: approximate search (FAISS PQ fast scan, exact re-ranking)" if kind == "auto" else f"--kind {kind}"
        assert reason == summary["kind_reason"]
        assert (tmp_path / kind / backends.FAISS_FILE).is_file()
        idx = PhotoIndex.load(tmp_path / kind)
        assert idx.kind == out
        q = idx.vectors[:5]
        np.testing.assert_array_equal(idx.backend.search(q, 3)[1], backends.ExactSearch(idx.vectors).search(q, 3)[1])

    rng = np.random.default_rng(0)  # clustered vectors, as embeddings are: both find the true neighbours
    centres = rng.standard_normal((30, 32)).astype(np.float32)
    x = centres[rng.integers(0, 30, 3000)] + 0.3 * rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[:50] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    truth = backends.ExactSearch(x).search(queries, 10)[1]
    for searcher in (backends.IVFSearch.build(x), backends.HNSWSearch.build(x), backends.RaBitQSearch.build(x), backends.PQSearch.build(x)):
        got = searcher.search(queries, 10)[1]
        assert got.shape == truth.shape and np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)]) >= 0.95
    (tmp_path / "hnsw" / backends.FAISS_FILE).write_bytes((tmp_path / "ivf" / backends.FAISS_FILE).read_bytes())
    with pytest.raises(VlkitError, match="a FAISS IndexIVFFlat; index.json says kind 'hnsw'"):
        PhotoIndex.load(tmp_path / "hnsw")
    (tmp_path / "auto" / backends.FAISS_FILE).write_bytes((tmp_path / "ivf" / backends.FAISS_FILE).read_bytes())
    with pytest.raises(VlkitError, match="a FAISS IndexIVFFlat; index.json says kind 'pq'"):
        PhotoIndex.load(tmp_path / "auto")
    (tmp_path / "rabitq" / backends.FAISS_FILE).write_bytes((tmp_path / "ivf" / backends.FAISS_FILE).read_bytes())
    with pytest.raises(VlkitError, match="a FAISS IndexIVFFlat; index.json says kind 'rabitq'"):
        PhotoIndex.load(tmp_path / "rabitq")


def unit_rows(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["pq", "rabitq"])
def test_code_scans_find_true_neighbours_without_clusters_and_round_trip(tmp_path, kind):
    """Isotropic vectors, the case IVF cannot handle: a re-ranked scan of PQ or RaBitQ codes still
    finds the exact top 10 with exact scores, and a saved index (codes only) searches the same after loading."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    x, queries = unit_rows(rng, 20_000, 64), unit_rows(rng, 50, 64)
    exact_scores, truth = backends.ExactSearch(x).search(queries, 10)
    searcher = backends.build(x, kind)
    scores, rows = searcher.search(queries, 10)
    assert rows.shape == truth.shape and np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)]) >= 0.95
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ x.T, rows, axis=1), rtol=0, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)
    ivf = backends.IVFSearch.build(x)  # the same budget of cells IVF scans by default misses most of them
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ivf.search(queries, 10)[1], truth)]) < 0.9
    searcher.save(tmp_path)
    assert (tmp_path / backends.FAISS_FILE).stat().st_size < x.nbytes / 4  # codes, not a second copy of the floats
    loaded = backends.load(tmp_path, x, kind)
    assert type(loaded) is backends.SEARCHERS[kind]
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], rows)
    with pytest.raises(VlkitError, match="holds 20000 vectors; expected 19999"):
        backends.load(tmp_path, x[:-1], kind)
    small = backends.SEARCHERS[kind].build(x[:5])  # k beyond the index: every vector, best first
    assert small.search(queries[:2], 10)[1].shape == (2, 5)
    np.testing.assert_array_equal(small.search(queries[:2], 10)[1], backends.ExactSearch(x[:5]).search(queries[:2], 10)[1])


def test_automatic_kind_by_size(monkeypatch):
    assert backends.choose_kind(backends.EXACT_MAX) == "exact"
    assert backends.choose_kind(backends.EXACT_MAX + 1) == "pq"
    kinds = ("exact", "rabitq", "ivf", "hnsw")
    assert [backends.choose_kind(10**6, kind) for kind in kinds] == list(kinds)


def test_exact_search_orders_and_clamps_k():
    v = np.eye(4, dtype=np.float32)
    scores, rows = backends.ExactSearch(v).search(np.array([[0.1, 0.7, 0.2, 0.0]], np.float32), 10)
    assert rows.tolist() == [[1, 2, 0, 3]] and scores[0].tolist() == pytest.approx([0.7, 0.2, 0.1, 0.0])


def test_broken_index_folders_are_named(tmp_path, clip_dir):
    with pytest.raises(VlkitError, match="no such folder"):
        PhotoIndex.load(tmp_path / "nope")
    shapes_images(tmp_path / "photos", n=3)
    build_index(vlkit.load(clip_dir), clip_dir, tmp_path / "photos", tmp_path / "idx", precision="fp32", progress=False)
    (tmp_path / "idx" / "files.jsonl").write_text('{"path": "a.png"}\n')
    with pytest.raises(VlkitError, match=r"files.jsonl, line 1: KeyError"):
        PhotoIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text("{")
    with pytest.raises(VlkitError, match="index.json: not valid JSON"):
        PhotoIndex.load(tmp_path / "idx")
    with pytest.raises(VlkitError, match="index kind 'annoy'"):
        backends.choose_kind(5, "annoy")


def test_cli_index_and_search(tmp_path, clip_dir, capsys):
    paths = shapes_images(tmp_path / "photos", n=6)
    assert main(["index", "--model", str(clip_dir), "--images", str(tmp_path / "photos"), "--out", str(tmp_path / "idx")]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["images"] == 6 and "exact search" in out.err
    assert main(["search", "--index", str(tmp_path / "idx"), "a blue circle", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(str(tmp_path / "photos") in line for line in lines)
    scores = [float(line.split("\t")[0]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert main(["search", "--index", str(tmp_path / "idx"), "--image", str(paths[2]), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"] == str(paths[2].resolve())
    assert main(["search", "--index", str(tmp_path / "idx")]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "missing"), "x"]) == 2
    assert "expected a folder written by vlkit index" in capsys.readouterr().err


def test_an_out_that_is_or_holds_the_images_folder_is_refused_and_the_photos_stay(tmp_path, clip_dir):
    photos = tmp_path / "photos"
    paths = shapes_images(photos, n=3)
    model = vlkit.load(clip_dir)
    for out in (photos, tmp_path, photos / "."):
        with pytest.raises(VlkitError, match="--out .*(is|holds) the images folder"):
            build_index(model, clip_dir, photos, out, precision="fp32", progress=False)
    assert all(p.is_file() for p in paths)
    build_index(model, clip_dir, photos, photos / "idx", precision="fp32", progress=False)  # inside it: fine, not indexed
    assert len(PhotoIndex.load(photos / "idx")) == 3


def test_a_second_run_on_one_index_is_refused_while_the_first_holds_it(tmp_path, clip_dir):
    photos = tmp_path / "photos"
    shapes_images(photos, n=2)
    with photos_mod._lock(tmp_path / "idx"):
        with pytest.raises(VlkitError, match="another vlkit index is updating it"):
            build_index(vlkit.load(clip_dir), clip_dir, photos, tmp_path / "idx", precision="fp32", progress=False)


def test_a_run_killed_between_the_renames_is_recovered_with_its_embeddings(tmp_path, clip_dir, monkeypatch):
    photos = tmp_path / "photos"
    shapes_images(photos, n=4)
    model = vlkit.load(clip_dir)
    build_index(model, clip_dir, photos, tmp_path / "idx", precision="fp32", progress=False)
    (tmp_path / "idx").rename(tmp_path / ".idx.old-deadbeef")  # what a kill after the first rename leaves
    seen = _count_embedded(model, monkeypatch)
    summary = build_index(model, clip_dir, photos, tmp_path / "idx", precision="fp32", progress=False)
    assert (summary["unchanged"], summary["new"], seen) == (4, 0, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.lock", "idx", "photos"]


def test_an_out_that_links_to_an_index_updates_it_through_the_link(tmp_path, clip_dir):
    photos = tmp_path / "photos"
    shapes_images(photos, n=2)
    model = vlkit.load(clip_dir)
    build_index(model, clip_dir, photos, tmp_path / "real", precision="fp32", progress=False)
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    shapes_images(photos / "more", n=1, seed=3)
    build_index(model, clip_dir, photos, tmp_path / "link", precision="fp32", progress=False)
    assert (tmp_path / "link").is_symlink() and len(PhotoIndex.load(tmp_path / "real")) == 3
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_an_interrupted_run_keeps_what_it_embedded_and_a_rerun_goes_on(tmp_path, clip_dir, monkeypatch):
    photos = tmp_path / "photos"
    shapes_images(photos, n=6)
    model = vlkit.load(clip_dir)
    seen = _count_embedded(model, monkeypatch)
    counting = model.encode_image

    def interrupted(pixels):
        if len(seen) == 2:  # the third batch of files: Ctrl+C
            raise KeyboardInterrupt
        return counting(pixels)

    monkeypatch.setattr(model, "encode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, clip_dir, photos, tmp_path / "idx", batch_size=2, precision="fp32", progress=False)
    partial = PhotoIndex.load(tmp_path / "idx")
    assert len(partial) == 4 and partial.meta["last_run"]["complete"] is False
    monkeypatch.setattr(model, "encode_image", counting)
    summary = build_index(model, clip_dir, photos, tmp_path / "idx", batch_size=2, precision="fp32", progress=False)
    assert (summary["unchanged"], summary["new"], summary["complete"], seen[2:]) == (4, 2, True, [2])


def test_output_and_faiss_problems_are_found_before_any_image_is_embedded(tmp_path, clip_dir, monkeypatch):
    photos = tmp_path / "photos"
    shapes_images(photos, n=2)
    model = vlkit.load(clip_dir)
    seen = _count_embedded(model, monkeypatch)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(VlkitError, match=r"--out .*afile.* is a file; expected a folder"):
        build_index(model, clip_dir, photos, tmp_path / "afile" / "sub", precision="fp32", progress=False)

    def no_faiss():
        raise VlkitError("an approximate photo index needs FAISS")

    monkeypatch.setattr(backends, "_faiss", no_faiss)
    with pytest.raises(VlkitError, match="needs FAISS"):
        build_index(model, clip_dir, photos, tmp_path / "idx", kind="pq", precision="fp32", progress=False)
    assert seen == []


@pytest.mark.parametrize("kind", ["ivf", "rabitq", "pq", "hnsw"])
def test_an_empty_folder_gives_an_empty_index_whatever_the_kind(tmp_path, clip_dir, kind):
    pytest.importorskip("faiss")
    (tmp_path / "photos").mkdir()
    summary = build_index(vlkit.load(clip_dir), clip_dir, tmp_path / "photos", tmp_path / "idx", kind=kind,
                          precision="fp32", progress=False)  # fmt: skip
    assert (summary["images"], summary["kind"]) == (0, "exact")
    assert Searcher.open(tmp_path / "idx").search("a red star", k=3) == []


def test_damaged_descriptions_are_named_not_tracebacks(tmp_path, clip_dir):
    photos = tmp_path / "photos"
    shapes_images(photos, n=2)
    build_index(vlkit.load(clip_dir), clip_dir, photos, tmp_path / "idx", precision="fp32", progress=False)
    meta_path = tmp_path / "idx" / "index.json"
    meta = json.loads(meta_path.read_text())
    for key, value, message in (("images", None, "'images' is None"), ("unreadable", 5, "'unreadable' is 5"),
                                ("unreadable", [{"path": "x"}], "'unreadable' is .*expected a list")):  # fmt: skip
        meta_path.write_text(json.dumps({**meta, key: value}))
        with pytest.raises(VlkitError, match=message):
            PhotoIndex.load(tmp_path / "idx")
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "idx" / "files.jsonl").write_bytes(b"\xff\xfe\n")
    with pytest.raises(VlkitError, match="files.jsonl: not UTF-8"):
        PhotoIndex.load(tmp_path / "idx")
    with pytest.raises(VlkitError, match=r"--out .*index.json: .*index.json is a file; expected a folder"):
        build_index(vlkit.load(clip_dir), clip_dir, photos, meta_path, precision="fp32", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("someone else's folder")
    with pytest.raises(VlkitError, match=r"--out .*other: a folder without index.json \(not an index\)"):
        build_index(vlkit.load(clip_dir), clip_dir, photos, tmp_path / "other", precision="fp32", progress=False)


def test_search_prints_each_hit_on_one_line_and_stops_quietly_at_a_closed_pipe(tmp_path, clip_dir, capsys, monkeypatch):
    from vlkit.index import cli as index_cli

    assert index_cli._shown("/p/a b.png") == "/p/a b.png"
    assert index_cli._shown("/p/two\nlines.png") == '"/p/two\\nlines.png"'
    assert index_cli._shown("/p/latin1_\udce9toile.png") == '"/p/latin1_\\udce9toile.png"'

    def closed(args, overrides):
        raise BrokenPipeError

    monkeypatch.setattr(index_cli, "cmd_search", closed)
    assert main(["search", "--index", str(tmp_path), "a star"]) == 141
    assert "error" not in capsys.readouterr().err


def test_an_image_query_that_is_a_folder_is_named(tmp_path):
    with pytest.raises(Exception, match="a folder, not an image file"):
        load_image(tmp_path)
