"""The photo search routes and the web page of ``vlkit serve`` on a real server: ``POST /v1/search``
returns the index's ranking (``vlkit.index.Searcher``'s) with thumbnails, by text or by image,
``GET /v1/search/image`` only the indexed files, both behind the API key; without ``--index``
they are 404; the page is served at ``/``."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from vlkit.serve import ServeSettings, create_app, load_models  # noqa: E402
from vlkit.serve.server import serving  # noqa: E402

from _serve_util import clip_folder, data_url, picture  # noqa: E402

COLORS = ("red", "blue", "green", "white")


@pytest.fixture(scope="module")
def searcher(tmp_path_factory):
    from vlkit.index import Searcher, build_index

    import vlkit

    root = tmp_path_factory.mktemp("search")
    clip = clip_folder(root / "clip")
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, color in enumerate(COLORS):
        picture(color).save(photos / ("sub" if i % 2 else "") / f"{color}.png")
    build_index(vlkit.load(clip), clip, photos, root / "index", progress=False)
    return Searcher.open(root / "index", clip)


@pytest.fixture(scope="module")
def models(searcher):
    return load_models([f"clip={searcher.index.model.path}"])


def test_search_by_text_and_by_image(models, searcher):
    with serving(create_app(models, ServeSettings(api_key="k"), searcher)) as url:
        auth = {"Authorization": "Bearer k"}
        r = httpx.post(f"{url}/v1/search", json={"query": "a red circle", "k": 3}, headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "search.results" and body["index"]["size"] == len(COLORS)
        want = [h.path for h in searcher.search("a red circle", k=3)]
        assert [h["path"] for h in body["results"]] == want
        assert all(h["thumbnail"].startswith("data:image/jpeg;base64,") for h in body["results"])
        by_image = httpx.post(f"{url}/v1/search", json={"image": data_url(picture("blue")), "k": 2}, headers=auth).json()
        assert [h["path"] for h in by_image["results"]] == [h.path for h in searcher.search(image=picture("blue"), k=2)]
        path = want[0]
        image = httpx.get(f"{url}/v1/search/image", params={"path": path}, headers=auth)
        assert image.status_code == 200 and image.content == (searcher.index.images / path).read_bytes()
        assert image.headers["content-type"] == "image/png"
        for bad in ("../clip/config.json", "missing.png", "/etc/passwd"):
            assert httpx.get(f"{url}/v1/search/image", params={"path": bad}, headers=auth).status_code == 404
        for body in ({"query": ""}, {}, {"query": "a", "k": 0}, {"query": "a", "k": 1000}):
            r = httpx.post(f"{url}/v1/search", json=body, headers=auth)
            assert r.status_code == 400 and r.json()["error"]["message"], body
        assert httpx.post(f"{url}/v1/search", json={"query": "a red circle"}).status_code == 401
        assert httpx.get(f"{url}/v1/search/image", params={"path": path}).status_code == 401


def test_without_an_index_search_is_404(models):
    with serving(create_app(models)) as url:
        r = httpx.post(f"{url}/v1/search", json={"query": "a red circle"})
        assert r.status_code == 404 and "--index" in r.json()["error"]["message"]


def test_the_web_page_is_served_at_the_root(models):
    with serving(create_app(models)) as url:
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<html" in page.text.lower()
        assert httpx.get(f"{url}/app.js").status_code == 200
        assert httpx.get(f"{url}/static/app.js").status_code == 200
        cards = httpx.get(f"{url}/v1/models").json()["data"]
        assert cards[0]["kind"] == "embedding"
