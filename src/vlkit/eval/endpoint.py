"""``vlkit eval caption|vqa|grounding|mcq --endpoint URL --model NAME``: evaluate any
OpenAI-compatible chat endpoint (GPT-4o, Claude or Gemini through their OpenAI-compatible APIs,
a vLLM server, ``vlkit serve``) with the same samples, prompts and metrics as a local model.

Each sample is one user message: its image as a ``data:`` URL (PNG) and the task's prompt.
Requests run ``concurrency`` at a time, each built (its image encoded) only when it is sent; a
429, a 5xx, a timeout or a dropped connection is retried with exponential backoff (honouring
``Retry-After``, in seconds or as a date); any other error, a host that does not resolve or a TLS
failure stops the run at once with the server's message (Ctrl+C too: no request is started
after it). Every answer is appended to a cache file as soon as it arrives, keyed by the
endpoint, the model's name and a hash of the exact request, so a run that is interrupted (or
re-run) sends only the requests it has no answer for; a run that takes answers from the cache
says so (another model served under the same name would need another ``--cache``). The key of
``--api-key-env`` is sent as a bearer token and never written or printed anywhere.

The HTTP client is the standard library's: one POST per sample needs no new dependency.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import io
import json
import math
import os
import queue
import random
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vlkit.data.images import BadSample
from vlkit.data.skips import Skips
from vlkit.errors import VlkitError
from vlkit.eval.generative import Sample, _write, load_samples, score
from vlkit.files import write_text_whole

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
CACHE_NAME = "endpoint_answers.jsonl"


class EndpointError(VlkitError):
    """The endpoint refused a request (or kept failing after every retry); names the sample and status."""


def chat_url(endpoint: str) -> str:
    """The chat-completions URL of ``endpoint``: an OpenAI base URL (``…/v1``) or the full route, its
    query (Azure's ``?api-version=``) kept."""
    if not endpoint.startswith(("http://", "https://")):
        raise VlkitError(f"--endpoint {endpoint!r}; expected an http(s) URL such as http://127.0.0.1:8000/v1")
    parts = urllib.parse.urlsplit(endpoint)
    path = parts.path.rstrip("/")
    path = path if path.endswith("/chat/completions") else path + "/chat/completions"
    return urllib.parse.urlunsplit(parts._replace(path=path, fragment=""))


def image_data_url(image) -> str:
    """A PIL image as a lossless PNG ``data:`` URL."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def request_body(model: str, prompt: str, image_url: str | None, max_tokens: int) -> dict:
    content = ([{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []) + [{"type": "text", "text": prompt}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}


def answer_text(reply, where: str) -> str:
    """``choices[0].message.content`` of a chat completion (a string, or a list of text parts)."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"{where}: the reply has no choices[0].message.content; got {json.dumps(reply)[:300]}") from None
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


class AnswerCache:
    """An append-only JSONL of ``{"key", "id", "answer"}``: answers survive an interrupted run.
    A line torn by a crash mid-write (the last one) is dropped; any other bad line is an error."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        try:  # before any request is paid for
            self.path.parent.mkdir(parents=True, exist_ok=True)
            open(self.path, "a", encoding="utf-8").close()
        except OSError as err:
            raise VlkitError(f"answer cache {self.path}: cannot be written ({err.strerror or err}); give --cache a file "
                             "path that can be") from None  # fmt: skip
        if self.path.stat().st_size == 0:
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.records[str(rec["key"])] = {"key": str(rec["key"]), "id": rec.get("id"), "answer": str(rec["answer"])}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                if n == len(lines):  # no newline after it: torn by a crash mid-write
                    self._rewrite()
                    break
                raise VlkitError(f"{self.path}, line {n}: not a cache record; expected "
                                 '{"key": ..., "id": ..., "answer": ...} (delete the file to start over)') from None  # fmt: skip

    def _rewrite(self) -> None:
        """The file without its torn line, replaced in one rename: a crash meanwhile leaves the old one."""
        write_text_whole(self.path, "".join(json.dumps(rec) + "\n" for rec in self.records.values()))

    def get(self, key: str) -> str | None:
        rec = self.records.get(key)
        return None if rec is None else rec["answer"]

    def put(self, key: str, sample_id: str, answer: str) -> None:
        with self._lock:
            self.records[key] = {"key": key, "id": sample_id, "answer": answer}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "id": sample_id, "answer": answer}) + "\n")
                f.flush()
                os.fsync(f.fileno())


@dataclass
class Endpoint:
    """One OpenAI-compatible chat endpoint; ``ask`` sends one request with retries."""

    url: str
    model: str
    api_key: str | None = None
    max_retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 120.0

    def __post_init__(self):
        self.url = chat_url(self.url)

    def cache_key(self, body: dict) -> str:
        blob = json.dumps({"url": self.url, "body": body}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _post(self, body: dict) -> tuple[int, dict | None, str, str | None]:
        """``(status, JSON reply or None, raw text, Retry-After)``; 0 for a network failure."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, json.dumps(body).encode("utf-8"), headers, method="POST")
        try:
            with _OPENER.open(req, timeout=self.timeout_s) as resp:
                status, raw, retry_after = resp.status, resp.read(), resp.headers.get("Retry-After")
        except urllib.error.HTTPError as err:
            if 300 <= err.code < 400:  # not followed: the request, and its key, go to the address given only
                return err.code, None, (f"redirected to {err.headers.get('Location')}; give the address it answers at "
                                        "as --endpoint"), None  # fmt: skip
            status, raw, retry_after = err.code, err.read(), err.headers.get("Retry-After")
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as err:
            # HTTPException: a reply cut short (IncompleteRead) or malformed, retried as a dropped connection;
            # a host that does not resolve, or TLS that fails, is not going to get better: -1, not retried
            reason = getattr(err, "reason", err)
            lasting = isinstance(reason, (socket.gaierror, ssl.SSLError))
            return -1 if lasting else 0, None, f"{type(err).__name__}: {reason}", None
        text = raw.decode("utf-8", errors="replace")
        try:
            return status, json.loads(text), text, retry_after
        except json.JSONDecodeError:
            return status, None, text, retry_after

    def ask(self, body: dict, sample_id: str, stop: threading.Event | None = None) -> str:
        """The answer text for one request, retrying 429/5xx/network failures with backoff; once
        ``stop`` is set no attempt starts and no wait goes on."""
        where = f"{self.url}, sample {sample_id!r}"
        stop = stop or threading.Event()
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                raise EndpointError(f"{where}: not asked: the run is stopping")
            status, reply, text, retry_after = self._post(body)
            if status == 200 and reply is not None:
                return answer_text(reply, where)
            if status == 200:  # not JSON: a reply cut short without a length is retried; anything else is not a completion
                if not text.lstrip().startswith("{"):
                    kind = "a stream of server-sent events" if text.lstrip().startswith("data:") else "not JSON"
                    raise EndpointError(f"{where}: HTTP 200 but the reply is {kind}, not a chat completion: {text[:200]!r}")
                status, text = 0, f"a reply cut short ({len(text)} characters of JSON)"
            retryable = status == 0 or status in RETRY_STATUS
            if not retryable or attempt == self.max_retries:
                error = reply.get("error") if isinstance(reply, dict) else None
                message = error.get("message") if isinstance(error, dict) else None
                tries = f" after {attempt + 1} attempts" if retryable else ""
                what = "connection failure" if status in (0, -1) else status
                raise EndpointError(f"{where}: HTTP {what}{tries}: {message or text[:300]}")
            stop.wait(self._delay(attempt, retry_after))
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                seconds = float(retry_after)
            except ValueError:
                seconds = _seconds_until(retry_after)
            if math.isfinite(seconds):
                return min(max(seconds, 0.0), self.max_backoff_s)
        return min(self.backoff_s * 2**attempt, self.max_backoff_s) * (0.5 + random.random() / 2)


def _seconds_until(http_date: str) -> float:
    """Seconds from now to an HTTP date (``Retry-After: Wed, 21 Oct 2026 07:28:00 GMT``); nan if it is none."""
    try:
        return email.utils.parsedate_to_datetime(http_date).timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError):
        return math.nan


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are answered as they come (an error), not followed: urllib would resend the request,
    with its Authorization header, to wherever the Location points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def default_cache(out: str | Path | None) -> Path:
    """The cache file: in the output folder, else in the user's cache folder."""
    if out is not None:
        return Path(out) / CACHE_NAME
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vlkit" / CACHE_NAME


def api_key_from_env(var: str | None) -> str | None:
    """The key in the environment variable ``var``, checked to fit a header (never shown in an error)."""
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        raise VlkitError(f"--api-key-env {var}: the environment variable {var} is not set (or empty); export it with the API key")
    if any(c.isspace() or not c.isprintable() for c in key):
        raise VlkitError(f"--api-key-env {var}: the key holds whitespace or a control character (a line ending read "
                         "from a file?); export it without")  # fmt: skip
    if not key.isascii():
        raise VlkitError(f"--api-key-env {var}: the key holds a character outside ASCII (a typographic quote pasted "
                         "with it?); API keys are ASCII")  # fmt: skip
    return key


def endpoint_predictions(endpoint: Endpoint, samples: list[Sample], cache: AnswerCache, max_new_tokens: int,
                         concurrency: int = 4, skips: Skips | None = None, progress: bool = True) -> tuple[dict[str, str], dict]:  # fmt: skip
    """``({sample id: answer}, counts)``: cached answers reused, the rest asked ``concurrency`` at a time.
    Each sample's request is built by the worker that sends it, so only ``concurrency`` images are
    held encoded. A sample whose image cannot be loaded stops the run, or with ``Skips("skip")`` is
    left out and recorded. A failure (or Ctrl+C) stops it at once: the workers start nothing more,
    and one waiting on a reply is left to it (its answer is cached if it comes before the exit)."""
    from tqdm import tqdm

    skips = skips if skips is not None else Skips()
    if concurrency < 1:
        raise VlkitError(f"--concurrency {concurrency}; expected a whole number of at least 1")
    todo: queue.Queue = queue.Queue()
    for s in samples:
        todo.put(s)
    done: queue.Queue = queue.Queue()
    stop = threading.Event()

    def answer(sample: Sample) -> tuple:
        try:
            url = image_data_url(sample.image()) if sample.image is not None else None
        except BadSample as err:
            return "bad", sample, err
        body = request_body(endpoint.model, sample.prompt, url, max_new_tokens)
        key = endpoint.cache_key(body)
        if (hit := cache.get(key)) is not None:
            return "cached", sample, hit
        reply = endpoint.ask(body, sample.id, stop)
        cache.put(key, sample.id, reply)  # at once, so a request in flight when the run stops is not paid twice
        return "asked", sample, reply

    def work() -> None:
        while not stop.is_set():
            try:
                sample = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put(answer(sample))
            except BaseException as err:  # noqa: BLE001 - handed to the caller, which stops the run
                stop.set()  # before the caller sees it: no worker starts another request meanwhile
                done.put(("failed", sample, err))

    for _ in range(min(concurrency, len(samples))):  # daemons: an exit does not wait for a reply in flight
        threading.Thread(target=work, name="vlkit-endpoint", daemon=True).start()
    answers: dict[str, str] = {}
    counts = {"cached": 0, "requested": 0}
    try:
        with tqdm(total=len(samples), desc="endpoint", unit="sample", disable=not progress) as bar:
            for _ in range(len(samples)):
                outcome, sample, value = done.get()
                if outcome == "failed":
                    raise value
                if outcome == "bad":
                    skips.reject(value, "bad image")
                else:
                    answers[sample.id] = value
                    counts["cached" if outcome == "cached" else "requested"] += 1
                bar.update(1)
    finally:
        stop.set()
    if counts["cached"]:
        print(f"{counts['cached']} of {len(answers)} answers came from the cache {cache.path} (keyed by the endpoint, the "
              f"model name {endpoint.model!r} and the request); if another model now answers as {endpoint.model!r}, give "
              "--cache another file", file=sys.stderr)  # fmt: skip
    return answers, counts


def run_endpoint_eval(task: str, data: str | Path, endpoint: str, model: str, out: str | Path | None = None,
                      api_key_env: str | None = None, concurrency: int = 4, cache: str | Path | None = None,
                      split: str | None = None, box_format: str = "norm1000", max_new_tokens: int = 32,
                      on_bad_sample: str = "error") -> dict:  # fmt: skip
    """Ask the endpoint every sample of ``task`` in ``data``, score the answers, write the report to ``out``
    (boxes read on the 0-999 grid unless ``box_format`` says otherwise, as for a local model)."""
    client = Endpoint(endpoint, model, api_key_from_env(api_key_env))
    skips = Skips(on_bad_sample)
    samples = load_samples(task, data, split, skips)
    cache_file = Path(cache) if cache is not None else default_cache(out)
    preds, counts = endpoint_predictions(client, samples, AnswerCache(cache_file), max_new_tokens, concurrency, skips)
    scored = [s for s in samples if s.id in preds]
    if not scored:
        raise VlkitError(f"{data}: every sample's image was bad and skipped (first: {skips.items[0]}); nothing to score")
    results, rows = score(task, scored, preds, client.url, box_format)
    results = {**results, "data": str(data), "endpoint": client.url, "model": model,
               "requests": {**counts, "cache": str(cache_file)}, "skipped": skips.to_dict()}  # fmt: skip
    if out is not None:
        _write(Path(out), results, rows, scored, skips)
    return results
