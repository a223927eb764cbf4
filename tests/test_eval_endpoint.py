"""``vlkit eval TASK --endpoint URL --model NAME``: each sample sent to an OpenAI-compatible chat
endpoint (a stub HTTP server on 127.0.0.1 here) with its image as a data: URL, 429/5xx retried,
concurrency bounded, answers cached so an interrupted run does not ask twice, and the answers
scored exactly as a predictions file with the same answers would be."""

from __future__ import annotations

import base64
import email.utils
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from vlkit.cli import main
from vlkit.data.formats.shapes_export import export
from vlkit.data.shapes import ShapesWorld
from vlkit.errors import VlkitError
from vlkit.eval.endpoint import AnswerCache, Endpoint, EndpointError, chat_url, run_endpoint_eval
from vlkit.eval.generative import load_samples, score


def answer_for(prompt: str) -> str:
    """The stub model's deterministic answer: right for some questions, wrong for others."""
    if "color" in prompt:
        return "red"
    if "how many" in prompt:
        return "2"
    return "yes" if "is there" in prompt else "circle"


class Stub:
    """A scripted chat endpoint: ``script`` gives the status of each request in turn (then 200);
    also "cut" (a 200 whose body stops short of its Content-Length), "cut-unsized" (a 200 without a
    length, closed mid-JSON), "html" and "sse" (200s that are not a JSON completion), "nan" (a 429
    with Retry-After: nan) and ("redirect", URL) (a 302 to URL). ``on_request()`` runs as each
    request arrives."""

    def __init__(self, script=(), delay: float = 0.0, on_request=None):
        self.script = list(script)
        self.on_request = on_request
        self.delay = delay
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if stub.on_request is not None:
                    stub.on_request()
                with stub.lock:
                    stub.requests.append(body)
                    stub.headers.append(dict(self.headers))
                    status = stub.script.pop(0) if stub.script else 200
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                time.sleep(stub.delay)
                with stub.lock:
                    stub.in_flight -= 1
                if isinstance(status, tuple):  # ("redirect", url)
                    self.send_response(302)
                    self.send_header("Location", status[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if status in ("html", "sse", "cut-unsized"):  # a 200 that is not one JSON completion
                    data = {"html": b"<html>hello</html>", "sse": b'data: {"choices": []}\n\n',
                            "cut-unsized": b'{"id": "x", "choices": [{"index"'}[status]  # fmt: skip
                    self.send_response(200)
                    self.end_headers()  # no Content-Length: the reply ends where the connection does
                    self.wfile.write(data)
                    self.close_connection = True
                    return
                how, status = status, {"cut": 200, "nan": 429}.get(status, status)
                if status == 200:
                    prompt = body["messages"][0]["content"][-1]["text"]
                    reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": answer_for(prompt)},
                                          "finish_reason": "stop"}]}  # fmt: skip
                else:
                    reply = {"error": {"message": f"scripted {status}", "type": "test", "code": status}}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "nan" if how == "nan" else "0")
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if how == "cut" else data)
                if how == "cut":
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_factory():
    made = []

    def make(*args, **kwargs):
        made.append(Stub(*args, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa")
    export(ShapesWorld(image_size=48, seed=0), 2, out, "vqav2")
    return out


@pytest.fixture(autouse=True)
def no_backoff_waits(monkeypatch):
    """Retries without the waits (the delays themselves are checked in test_backoff_delays)."""
    from vlkit.eval import endpoint

    monkeypatch.setattr(endpoint.Endpoint, "_delay", lambda self, attempt, retry_after: 0.0)


REAL_DELAY = Endpoint._delay  # before the fixture replaces it


def test_backoff_delays():
    delay = REAL_DELAY
    e = Endpoint("http://h/v1", "m", backoff_s=1.0, max_backoff_s=10.0)
    waits = [delay(e, a, None) for a in range(6)]
    assert all(0.5 * min(2**a, 10) <= w <= min(2**a, 10) for a, w in enumerate(waits))
    assert delay(e, 0, "3") == 3.0 and delay(e, 0, "999") == 10.0 and 0.5 <= delay(e, 0, "soon") <= 1.0


def test_retries_429_and_5xx_then_scores_like_a_predictions_file(tmp_path, vqa_data, stub_factory, monkeypatch):
    stub = stub_factory(script=[429, 503, 500])
    monkeypatch.setenv("MY_KEY", "sk-test-123")
    res = run_endpoint_eval("vqa", vqa_data, stub.url, "stub-vlm", tmp_path / "out", api_key_env="MY_KEY", concurrency=1)
    samples = load_samples("vqa", vqa_data)
    assert len(stub.requests) == len(samples) + 3  # three failures retried
    expected, _ = score("vqa", samples, {s.id: answer_for(s.prompt) for s in samples})
    assert res["accuracy"] == pytest.approx(expected["accuracy"]) and 0 < res["accuracy"] < 1
    assert res["requests"]["requested"] == len(samples) and res["requests"]["cached"] == 0
    assert all(h["Authorization"] == "Bearer sk-test-123" for h in stub.headers)
    body = stub.requests[-1]
    assert body["model"] == "stub-vlm" and body["max_tokens"] == 32 and body["temperature"] == 0
    image_part, text_part = body["messages"][0]["content"]
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and text_part["text"] in {s.prompt for s in samples}
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    first = next(s for s in samples if s.prompt == text_part["text"])
    assert sent.convert("RGB").tobytes() == first.image().tobytes()  # the sample's own pixels
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["accuracy"] == res["accuracy"] and "sk-test-123" not in (tmp_path / "out").joinpath(
        "endpoint_answers.jsonl").read_text()


def test_interrupted_run_resumes_without_asking_twice(tmp_path, vqa_data, stub_factory):
    samples = load_samples("vqa", vqa_data)
    failing = stub_factory(script=[200] * 5 + [400])
    with pytest.raises(EndpointError, match=r"sample '\d+': HTTP 400: scripted 400"):
        run_endpoint_eval("vqa", vqa_data, failing.url, "stub-vlm", tmp_path / "out", concurrency=1)
    cache = tmp_path / "out" / "endpoint_answers.jsonl"
    first_run = len(failing.requests)
    assert len(cache.read_text().splitlines()) == first_run - 1 >= 5  # every answer that arrived is kept
    with open(cache, "a") as f:
        f.write('{"key": "torn')  # a crash mid-append
    res = run_endpoint_eval("vqa", vqa_data, failing.url, "stub-vlm", tmp_path / "out", concurrency=2)
    assert res["requests"] == {"cached": first_run - 1, "requested": len(samples) - first_run + 1, "cache": str(cache)}
    assert len(failing.requests) == len(samples) + 1  # each sample asked once, plus the refused request
    again = run_endpoint_eval("vqa", vqa_data, failing.url, "stub-vlm", tmp_path / "out")
    assert again["requests"]["requested"] == 0 and again["accuracy"] == res["accuracy"]
    other_model = run_endpoint_eval("vqa", vqa_data, failing.url, "another-model", tmp_path / "out")
    assert other_model["requests"]["requested"] == len(samples)  # the cache is keyed by the request, model included


def test_a_cut_reply_is_retried_and_a_redirect_is_not_followed(tmp_path, vqa_data, stub_factory):
    samples = load_samples("vqa", vqa_data)
    flaky = stub_factory(script=["cut", "cut", 503])  # a reply cut short used to stop the run with a traceback
    res = run_endpoint_eval("vqa", vqa_data, flaky.url, "m", tmp_path / "a", concurrency=1)
    assert res["requests"]["requested"] == len(samples) and len(flaky.requests) == len(samples) + 3
    elsewhere = stub_factory()
    moved = stub_factory(script=[("redirect", f"{elsewhere.url}/chat/completions")])
    with pytest.raises(EndpointError, match=r"HTTP 302: redirected to http://127.0.0.1:\d+/v1/chat/completions; give the address"):
        run_endpoint_eval("vqa", vqa_data, moved.url, "m", tmp_path / "b", concurrency=1)
    assert not elsewhere.requests  # urllib used to resend it there, key and all, and take its answer


def test_retry_after_that_is_not_a_number_falls_back_to_backoff():
    e = Endpoint("http://h/v1", "m", backoff_s=1.0, max_backoff_s=10.0)
    for value in ("nan", "inf", "-inf", "soon"):
        assert 0.5 <= REAL_DELAY(e, 0, value) <= 1.0  # nan used to reach time.sleep and raise


def test_a_torn_cache_is_repaired_by_a_rename(tmp_path, monkeypatch):
    cache = tmp_path / "c.jsonl"
    cache.write_text('{"key": "a", "id": "1", "answer": "x"}\n{"key": "b", "id": "2", "answer": "y"}\n{"key": "to')
    kept = cache.read_text()

    def crash(*args):
        raise KeyboardInterrupt("killed mid-rewrite")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        AnswerCache(cache)
    assert cache.read_text() == kept  # the rewrite used to empty the file first: every answer lost
    monkeypatch.undo()
    assert AnswerCache(cache).records.keys() == {"a", "b"} and not cache.read_text().endswith("to")


def test_concurrency_is_bounded(tmp_path, vqa_data, stub_factory):
    stub = stub_factory(delay=0.15)
    run_endpoint_eval("vqa", vqa_data, stub.url, "m", tmp_path / "out", concurrency=3)
    assert stub.max_in_flight == 3


def test_endpoint_errors_are_named(tmp_path, vqa_data, stub_factory, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(VlkitError, match="NO_SUCH_KEY is not set"):
        run_endpoint_eval("vqa", vqa_data, "http://127.0.0.1:9/v1", "m", api_key_env="NO_SUCH_KEY")
    with pytest.raises(VlkitError, match="expected an http"):
        run_endpoint_eval("vqa", vqa_data, "127.0.0.1:8000", "m")
    down = stub_factory(script=[503] * 10)
    with pytest.raises(EndpointError, match="HTTP 503 after 7 attempts: scripted 503"):
        run_endpoint_eval("vqa", vqa_data, down.url, "m", tmp_path / "out", concurrency=1)
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    with pytest.raises(EndpointError, match="connection failure after 7 attempts"):
        run_endpoint_eval("vqa", vqa_data, f"http://127.0.0.1:{closed}/v1", "m", tmp_path / "o2", concurrency=1)
    assert chat_url("http://h/v1/") == "http://h/v1/chat/completions" == chat_url("http://h/v1/chat/completions")
    (tmp_path / "bad.jsonl").write_text('{"key": "a", "answer": "x"}\nnot json\n{"key": "b", "answer": "y"}\n')
    with pytest.raises(VlkitError, match="bad.jsonl, line 2: not a cache record"):
        AnswerCache(tmp_path / "bad.jsonl")


def test_cli_eval_endpoint(tmp_path, vqa_data, stub_factory, capsys):
    stub = stub_factory(script=[429])
    code = main(["eval", "vqa", "--endpoint", stub.url, "--model", "stub-vlm", "--data", str(vqa_data),
                 "--out", str(tmp_path / "out"), "--concurrency", "2"])  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["endpoint"] == stub.url + "/chat/completions" and results["counts"]["samples"] == len(load_samples("vqa", vqa_data))
    assert (tmp_path / "out" / "report.md").is_file()
    capsys.readouterr()
    assert main(["eval", "zeroshot", "--endpoint", stub.url, "--model", "m"]) == 2
    assert "evaluates caption, vqa, grounding or mcq" in capsys.readouterr().err


@pytest.mark.slow  # ~80 s on the shared 2-core machine: a tiny LLaVA built, served and asked 16 times
def test_against_vlkit_serve(tmp_path):
    """The endpoint evaluation against ``vlkit serve`` itself on 127.0.0.1: each prediction is the
    server's own answer to that sample's request, and a re-run asks nothing."""
    pytest.importorskip("fastapi")
    pytest.importorskip("transformers")
    from vlkit.eval.endpoint import image_data_url, request_body
    from vlkit.serve import ServeSettings, create_app, load_models
    from vlkit.serve.server import serving

    from _serve_util import vlm_folder

    models = load_models([f"vlm={vlm_folder(tmp_path / 'vlm')}"])
    vqa_data = tmp_path / "vqa"
    export(ShapesWorld(image_size=48, seed=1), 1, vqa_data, "vqav2")
    samples = load_samples("vqa", vqa_data)
    with serving(create_app(models, ServeSettings(max_tokens_cap=8))) as url:
        res = run_endpoint_eval("vqa", vqa_data, url + "/v1", "vlm", tmp_path / "out", concurrency=3, max_new_tokens=8)
        assert res["requests"]["requested"] == res["counts"]["samples"] == len(load_samples("vqa", vqa_data))
        rows = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").open()}
        client = Endpoint(url + "/v1", "vlm")
        for s in samples:
            direct = client.ask(request_body("vlm", s.prompt, image_data_url(s.image()), 8), s.id)
            assert rows[s.id]["prediction"] == direct
        again = run_endpoint_eval("vqa", vqa_data, url + "/v1", "vlm", tmp_path / "out", max_new_tokens=8)
    assert again["requests"]["requested"] == 0 and again["accuracy"] == res["accuracy"]


def test_a_key_that_cannot_be_a_header_is_named_without_showing_it(vqa_data, monkeypatch):
    for key, what in (("sk-SECRET-1\r", "whitespace or a control character"), ("sk-SECRET\u2019-2", "a character outside ASCII")):
        monkeypatch.setenv("MY_KEY", key)
        with pytest.raises(VlkitError, match=f"--api-key-env MY_KEY: the key holds {what}") as err:
            run_endpoint_eval("vqa", vqa_data, "http://127.0.0.1:9/v1", "m", api_key_env="MY_KEY")
        assert "SECRET" not in str(err.value)


def test_a_failure_stops_the_run_at_once(tmp_path, vqa_data, stub_factory):
    """The other worker's request is retried no more once one sample has failed (it went on to its
    seventh attempt, and the run waited for it)."""
    stub = stub_factory(script=[400] + [503] * 30, delay=0.05)
    start = time.perf_counter()
    with pytest.raises(EndpointError, match="HTTP 400"):
        run_endpoint_eval("vqa", vqa_data, stub.url, "m", tmp_path / "out", concurrency=2)
    assert len(stub.requests) <= 3 and time.perf_counter() - start < 2


def test_requests_are_built_as_they_are_sent(tmp_path, vqa_data, stub_factory, monkeypatch):
    """Only the requests in flight hold an encoded image: the first goes out before the rest are encoded."""
    from vlkit.eval import endpoint

    encoded, seen = [], []
    original = endpoint.image_data_url
    monkeypatch.setattr(endpoint, "image_data_url", lambda image: encoded.append(1) or original(image))
    stub = stub_factory(on_request=lambda: seen.append(len(encoded)))
    run_endpoint_eval("vqa", vqa_data, stub.url, "m", tmp_path / "out", concurrency=2)
    assert len(seen) == len(load_samples("vqa", vqa_data)) > 4 and seen[0] <= 2


def test_answers_from_the_cache_are_said_to_be(tmp_path, vqa_data, stub_factory, capfd):
    stub = stub_factory()
    run_endpoint_eval("vqa", vqa_data, stub.url, "vlm", tmp_path / "out")
    assert "from the cache" not in capfd.readouterr().err
    run_endpoint_eval("vqa", vqa_data, stub.url, "vlm", tmp_path / "out")
    assert "answers came from the cache" in capfd.readouterr().err


def test_replies_that_are_not_a_completion(tmp_path, vqa_data, stub_factory):
    for mode, message in (("html", "the reply is not JSON"), ("sse", "a stream of server-sent events")):
        with pytest.raises(EndpointError, match=f"HTTP 200 but {message}|HTTP 200 but the reply is {message}"):
            run_endpoint_eval("vqa", vqa_data, stub_factory(script=[mode]).url, "m", tmp_path / mode, concurrency=1)
    cut = stub_factory(script=["cut-unsized", "cut-unsized"])  # a reply cut short without a length: retried
    res = run_endpoint_eval("vqa", vqa_data, cut.url, "m", tmp_path / "cut", concurrency=1)
    assert res["requests"]["requested"] == len(cut.requests) - 2


def test_urls_dates_hosts_and_caches(tmp_path, vqa_data, stub_factory, capsys):
    azure = "https://r.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01"
    assert chat_url(azure) == azure
    assert chat_url("http://h/v1?api-version=x") == "http://h/v1/chat/completions?api-version=x"
    e = Endpoint("http://h/v1", "m", max_backoff_s=60.0)
    soon = email.utils.formatdate(time.time() + 6, usegmt=True)
    assert 4 <= REAL_DELAY(e, 0, soon) <= 6 and REAL_DELAY(e, 0, email.utils.formatdate(time.time() - 60, usegmt=True)) == 0
    with pytest.raises(EndpointError, match=r"connection failure: URLError") as err:  # no retries: it will not resolve
        run_endpoint_eval("vqa", vqa_data, "http://no-such-host.invalid/v1", "m", tmp_path / "o", concurrency=1)
    assert "attempts" not in str(err.value)
    stub = stub_factory()
    (tmp_path / "adir").mkdir()
    with pytest.raises(VlkitError, match="answer cache .*adir: cannot be written"):
        run_endpoint_eval("vqa", vqa_data, stub.url, "m", cache=tmp_path / "adir")
    assert not stub.requests  # found before any request was paid for
    assert main(["eval", "generation", "--endpoint", stub.url, "--model", "m"]) == 2
    assert "evaluates caption, vqa, grounding or mcq" in capsys.readouterr().err
