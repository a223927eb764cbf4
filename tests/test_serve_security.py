"""Each of ``vlkit serve``'s security rules, against a real server on 127.0.0.1: the API key on every
``/v1`` route, the body size limit, the image pixel limit, the ``max_tokens`` cap, local paths only
under ``--image-root`` (no ``..`` or symbolic link out), no URL fetched unless enabled (then bounded
in bytes and time), and no CORS unless an origin is named."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from contextlib import contextmanager

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("transformers")
import httpx  # noqa: E402

from vlkit.serve import ServeSettings, create_app, load_models  # noqa: E402
from vlkit.serve.errors import ApiError  # noqa: E402
from vlkit.serve.images import ImageFetcher, _pinned  # noqa: E402
from vlkit.serve.server import serving  # noqa: E402

from _serve_util import clip_folder, data_url, image_message, picture, png, vlm_folder  # noqa: E402

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return load_models([f"vlm={vlm_folder(root / 'vlm')}", f"clip={clip_folder(root / 'clip')}"])


def client(url: str, key: str = "unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def ask(c, messages=HI, **kw):
    return c.chat.completions.create(model="vlm", messages=messages, max_tokens=kw.pop("max_tokens", 4), temperature=0, **kw)


def test_api_key_guards_every_v1_route(models):
    with serving(create_app(models, ServeSettings(api_key="s3cret"))) as url:
        for key in ("unused", "s3cret-not", "S3CRET"):
            c = client(url, key)
            with pytest.raises(openai.AuthenticationError):
                ask(c)
            with pytest.raises(openai.AuthenticationError):
                c.embeddings.create(model="clip", input="a red circle")
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "vlm", "messages": HI})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = client(url, "s3cret")
        assert ask(ok).choices[0].message.content is not None
        assert ok.embeddings.create(model="clip", input="a red circle").data
        assert [m.id for m in ok.models.list()] == ["vlm", "clip"]
        assert httpx.get(f"{url}/health").status_code == 200  # the health check is open
    with serving(create_app(models, ServeSettings(api_key="clé"))) as url:  # a key beyond ASCII, sent as UTF-8
        for key, status in (("clé", 200), ("cle", 401), ("clé!", 401)):
            r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}".encode()})
            assert r.status_code == status, key


def test_body_size_limit_is_413(models):
    with serving(create_app(models, ServeSettings(max_body_bytes=20_000))) as url:
        c = client(url)
        big = data_url(png(picture(size=(300, 300))).ljust(30_000, b"\0"))
        with pytest.raises(openai.APIStatusError) as err:
            ask(c, image_message("What?", big))
        assert err.value.status_code == 413
        chunked = httpx.post(f"{url}/v1/embeddings", content=iter([b'{"model": "clip", "input": "', b"a" * 25_000, b'"}']),
                             headers={"content-type": "application/json"})  # fmt: skip
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
        assert ask(c).choices  # still serving


def test_image_pixel_limit_is_413(models):
    with serving(create_app(models, ServeSettings(max_image_pixels=100 * 100))) as url:
        c = client(url)
        with pytest.raises(openai.APIStatusError) as err:
            ask(c, image_message("What?", data_url(picture(size=(101, 100)))))
        assert err.value.status_code == 413 and "10100 pixels" in str(err.value)
        with pytest.raises(openai.APIStatusError) as err:
            c.embeddings.create(model="clip", input=[data_url(picture(size=(200, 200)))])
        assert err.value.status_code == 413
        assert ask(c, image_message("What?", data_url(picture(size=(100, 100))))).choices


def test_max_tokens_is_capped_by_the_server(models):
    with serving(create_app(models, ServeSettings(max_tokens_cap=3))) as url:
        r = ask(client(url), max_tokens=100)
        assert r.usage.completion_tokens <= 3


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    picture("red").save(root / "sub" / "red.png")
    picture("blue").save(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    return root


def test_local_paths_only_under_the_image_root(models, image_root):
    outside = image_root.parent / "outside.png"
    with serving(create_app(models, ServeSettings())) as url:
        with pytest.raises(openai.BadRequestError, match="--image-root"):
            ask(client(url), image_message("What?", str(image_root / "sub" / "red.png")))
    with serving(create_app(models, ServeSettings(image_root=image_root))) as url:
        c = client(url)
        inside = ask(c, image_message("What?", "sub/red.png")).choices[0].message.content
        assert ask(c, image_message("What?", str(image_root / "sub" / "red.png"))).choices[0].message.content == inside
        assert ask(c, image_message("What?", (image_root / "sub" / "red.png").as_uri())).choices[0].message.content == inside
        assert inside == ask(c, image_message("What?", data_url(picture("red")))).choices[0].message.content
        for bad in ("../outside.png", str(outside), outside.as_uri(), "sub/../../outside.png", "link.png"):
            with pytest.raises(openai.BadRequestError, match="outside the image root"):
                ask(c, image_message("What?", bad))
        with pytest.raises(openai.BadRequestError, match="no such image"):
            ask(c, image_message("What?", "sub/missing.png"))
        with pytest.raises(openai.BadRequestError, match="bad path"):  # it was a 500
            ask(c, image_message("What?", "sub/red.png\x00"))


class _Images(http.server.BaseHTTPRequestHandler):
    """/red.png: an image; /big.png: too many bytes; /slow.png: answers after 3 s; /drip.png: sends
    its bytes a few at a time, each within any read timeout, for 3 s in all."""

    requests: list[str] = []  # every path asked for, by any test's server

    def do_GET(self):
        _Images.requests.append(self.path)
        if self.path == "/slow.png":
            time.sleep(3)
        body = png(picture("red")) if self.path != "/big.png" else png(picture("red")).ljust(50_000, b"\0")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if self.path == "/drip.png":
                step = len(body) // 15 + 1
                for k in range(0, len(body), step):
                    self.wfile.write(body[k : k + step])
                    self.wfile.flush()
                    time.sleep(0.2)
            else:
                self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@contextmanager
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_no_url_is_fetched_unless_enabled_then_bounded(models):
    with image_server() as images:
        with serving(create_app(models, ServeSettings())) as url:
            with pytest.raises(openai.BadRequestError, match="fetches no URLs"):
                ask(client(url), image_message("What?", f"{images}/red.png"))
        with serving(create_app(models, ServeSettings(allow_remote_images=True))) as url:
            for host in (images, images.replace("127.0.0.1", "localhost"), "http://169.254.169.254", "http://[::1]:9"):
                with pytest.raises(openai.BadRequestError, match="private, loopback or reserved address"):
                    ask(client(url), image_message("What?", f"{host}/red.png"))  # the server's own network: refused
        settings = ServeSettings(allow_remote_images=True, allow_private_image_hosts=True, remote_image_bytes=20_000,
                                 remote_timeout_s=0.5)  # fmt: skip
        with serving(create_app(models, settings)) as url:
            c = client(url)
            fetched = ask(c, image_message("What?", f"{images}/red.png")).choices[0].message.content
            assert fetched == ask(c, image_message("What?", data_url(picture("red")))).choices[0].message.content
            with pytest.raises(openai.APIStatusError) as err:
                ask(c, image_message("What?", f"{images}/big.png"))
            assert err.value.status_code == 413
            with pytest.raises(openai.BadRequestError, match="took over"):
                ask(c, image_message("What?", f"{images}/slow.png"))
            with pytest.raises(openai.BadRequestError, match="took over"):  # the limit is the whole fetch's, not a read's
                ask(c, image_message("What?", f"{images}/drip.png"))
            with pytest.raises(openai.BadRequestError, match="scheme"):
                ask(c, image_message("What?", "ftp://127.0.0.1/red.png"))


def test_a_host_that_resolves_elsewhere_the_second_time_cannot_lead_the_fetch_in(monkeypatch):
    """DNS rebinding: the name first resolves to a public address (the check passes), then to the
    server's own loopback. The fetch must connect to the address that was checked, never look again."""
    real, lookups = socket.getaddrinfo, []

    def rebinding(host, *args, **kwargs):
        if host != "rebind.example":
            return real(host, *args, **kwargs)
        lookups.append(host)
        address = "93.184.216.34" if len(lookups) == 1 else "127.0.0.1"
        port = args[0] if args else kwargs.get("port")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port or 0)))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    fetcher = ImageFetcher(ServeSettings(allow_remote_images=True, remote_timeout_s=0.5))
    with image_server() as images:
        port = images.rpartition(":")[2]
        before = len(_Images.requests)
        with pytest.raises(ApiError) as err:  # the public address is not reachable from here: the fetch fails there
            fetcher.fetch(f"http://rebind.example:{port}/rebound.png", "messages[0].content[1]")
        assert err.value.status == 400 and "rebind.example" in str(err.value)
        assert "/rebound.png" not in _Images.requests[before:] and lookups == ["rebind.example"]


def test_a_pinned_url_keeps_the_host_name_for_the_header_and_the_certificate(monkeypatch):
    real = socket.getaddrinfo
    answers = {"example.com": (socket.AF_INET, ("93.184.216.34", 0)), "v6.example": (socket.AF_INET6, ("2606:4700::1111", 0, 0, 0))}
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: [(answers[host][0], socket.SOCK_STREAM, 6, "", answers[host][1])]
                        if host in answers else real(host, *a, **k))  # fmt: skip
    assert _pinned("https://me@example.com:8443/a.png?x=1", "w") == (
        "https://me@93.184.216.34:8443/a.png?x=1", {"Host": "example.com:8443"}, {"sni_hostname": "example.com"})
    assert _pinned("http://v6.example/a.png", "w") == ("http://[2606:4700::1111]/a.png", {"Host": "v6.example"}, {})


def test_no_cors_unless_an_origin_is_named(models):
    origin = "http://localhost:5173"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with serving(create_app(models, ServeSettings())) as url:
        r = httpx.get(f"{url}/v1/models", headers={"Origin": origin})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in httpx.options(f"{url}/v1/chat/completions", headers=preflight).headers
    with serving(create_app(models, ServeSettings(cors_origins=(origin,)))) as url:
        r = httpx.get(f"{url}/v1/models", headers={"Origin": origin})
        assert r.headers["access-control-allow-origin"] == origin
        pre = httpx.options(f"{url}/v1/chat/completions", headers=preflight)
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
        other = httpx.get(f"{url}/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with serving(create_app(models, ServeSettings(cors_origins=(origin,), max_body_bytes=1000))) as url:
        big = httpx.post(f"{url}/v1/embeddings", json={"model": "clip", "input": "a" * 2000}, headers={"Origin": origin})
        assert big.status_code == 413 and big.headers["access-control-allow-origin"] == origin  # a page can read it
