"""The web page of ``vlkit serve`` in a real headless Chromium (Debian's ``chromium`` package),
driven over the Chrome DevTools protocol: it loads with no external resources, a text search shows
the index's ranked thumbnails (the same ranking as ``Searcher.search``), clicking one attaches
the image to the chat, and the answer streams into the chat pane equal to the API's own answer
to the same request. Screenshots are saved in the test's temporary folder."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("transformers")
websocket = pytest.importorskip("websocket", reason="websocket-client (a dev dependency) drives Chromium")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium); the web page test needs a real browser",
                allow_module_level=True)

import vlkit  # noqa: E402
from vlkit.index import Searcher, build_index  # noqa: E402
from vlkit.index.photos import PhotoIndex  # noqa: E402
from vlkit.serve import ServeSettings, create_app, load_models  # noqa: E402
from vlkit.serve.server import serving  # noqa: E402

from _index_util import shapes_images, tiny_clip  # noqa: E402
from _serve_util import data_url, vlm_folder  # noqa: E402

TIMEOUT = 120.0


class Browser:
    """Headless Chromium and one page, over the DevTools protocol (a websocket of JSON commands)."""

    def __init__(self, folder):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = open(folder / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             f"--remote-debugging-port={port}", f"--user-data-dir={folder / 'profile'}", "--window-size=1280,860",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=self.log)  # fmt: skip
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start; see {folder / 'chromium.log'}")
            time.sleep(0.2)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=TIMEOUT, suppress_origin=True)
        self.next_id = 0
        self.console: list[str] = []
        self.call("Runtime.enable")
        self.call("Page.enable")

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(msg["params"]["exceptionDetails"])[:500])
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait(self, expression: str, what: str, timeout: float = TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        state = self.js("document.querySelector('#chat-log').outerHTML.slice(-1500)")
        raise AssertionError(f"timed out waiting for {what} ({expression}); page errors: {self.console}; chat: {state}")

    def click(self, selector: str):
        """A real mouse click at the element's centre."""
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")  # fmt: skip
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type(self, selector: str, text: str):
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path):
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self):
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path)
    yield b
    b.close()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return json.load(r)


def _stream_pieces(url: str, body: dict) -> list[str]:
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"},
                                 method="POST")  # fmt: skip
    pieces = []
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    pieces.append(delta)
    return pieces


def test_search_then_chat_in_a_real_browser(tmp_path, browser):
    photos = tmp_path / "photos"
    shapes_images(photos, n=8)
    clip = tiny_clip(tmp_path / "clip")
    build_index(vlkit.load(clip), clip, photos, tmp_path / "index", precision="fp32", progress=False)
    searcher = Searcher(PhotoIndex.load(tmp_path / "index"), vlkit.load(clip), clip)
    models = load_models([f"vlm={vlm_folder(tmp_path / 'vlm')}"])
    with serving(create_app(models, ServeSettings(max_tokens_cap=12), searcher)) as url:
        browser.call("Page.navigate", url=url + "/")
        browser.wait("document.readyState === 'complete' && document.querySelector('#model-select').options.length > 0",
                     "the page and its model list")  # fmt: skip
        assert browser.js("document.querySelector('#model-select').value") == "vlm"
        resources = browser.js("performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(r.startswith(url + "/") for r in resources), resources  # nothing from elsewhere

        # search: the thumbnails appear in the index's own ranking
        browser.js("document.querySelector('#search-k').value = '4'")
        browser.type("#search-input", "a red star")
        browser.click("#search-go")
        browser.wait("document.querySelectorAll('#search-results .result').length === 4", "4 search results")
        browser.wait("[...document.querySelectorAll('#search-results img')].every(i => i.complete && i.naturalWidth > 0)",
                     "the thumbnails to load")  # fmt: skip
        shown = browser.js("[...document.querySelectorAll('#search-results .result')].map(r => r.dataset.path)")
        assert shown == [h.path for h in searcher.search("a red star", k=4)]
        assert "4 of 8 images (exact search, model clip)" in browser.js("document.querySelector('#search-info').textContent")
        browser.screenshot(tmp_path / "search.png")

        # click a thumbnail: its image is attached to the chat with a question
        browser.click("#search-results .result")
        browser.wait("!document.querySelector('#attachment').hidden && "
                     "document.querySelector('#attachment-preview').src.startsWith('data:image/png;base64,')",
                     "the clicked image attached to the chat")  # fmt: skip
        assert browser.js("document.querySelector('#chat-input').value") == "Describe this image."
        attached = browser.js("document.querySelector('#attachment-preview').src")
        assert attached == data_url((photos / shown[0]).read_bytes())  # the full image, not the thumbnail

        # chat: the answer streams into the pane and equals the API's answer to the same request
        browser.js("window.__sent = []; const f = window.fetch;"
                   "window.fetch = (u, o) => { window.__sent.push([String(u), o && o.body]); return f(u, o); }")
        browser.click("#chat-send")
        browser.wait("!!document.querySelector('#chat-log .msg.assistant.done')", "the streamed answer")
        answer = browser.js("document.querySelector('#chat-log .msg.assistant .text').textContent")
        assert browser.js("!!document.querySelector('#chat-log .msg.assistant.error')") is False, answer
        body = {"model": "vlm", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": attached}}, {"type": "text", "text": "Describe this image."}]}]}
        expected = _post(url + "/v1/chat/completions", body)["choices"][0]["message"]["content"]
        assert answer == expected and answer
        sent = browser.js("window.__sent")
        assert [u for u, _ in sent] == ["v1/chat/completions"] and json.loads(sent[0][1]) == {**body, "stream": True}
        pieces = _stream_pieces(url + "/v1/chat/completions", body)
        assert len(pieces) > 1 and "".join(pieces) == answer  # the page joined the server-sent chunks
        assert browser.js("document.querySelector('#chat-log .msg.user img').src") == attached
        browser.screenshot(tmp_path / "chat.png")

        # attach a file through the file picker, then remove it
        doc = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=doc, selector="#chat-attach")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(photos / shown[1])])
        browser.wait("!document.querySelector('#attachment').hidden", "the picked file attached")
        browser.click("#attachment-remove")
        assert browser.js("document.querySelector('#attachment').hidden") is True
    assert not browser.console, browser.console
    for name in ("search.png", "chat.png"):
        assert (tmp_path / name).stat().st_size > 5000
