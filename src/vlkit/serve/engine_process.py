"""A chat model's engine in a process of its own. In one process the engine thread and the HTTP
handling share one GIL: a small model's steps last microseconds, so the engine holds it nearly all
the time and the requests' parsing, image decoding and templating wait (one core busy of two).
Here the server process builds prompts and the child only generates.

The child is a fresh interpreter (``python -c``, calling :func:`main`: safe with CUDA and with
OpenMP's threads, and it imports nothing of the caller's script) that loads the model from its
folder and runs an :class:`~vlkit.serve.engine.Engine`. Over a socket pair, as plain data (numbers,
strings, lists, dicts, tensors as dtype, shape and bytes), pickled and unpickled with every class and
function refused, so a message can run no code: jobs go in as (key, prompt, config, n, seed, strip,
stream), events come back as the engine delivers them. :class:`EngineProcess` has the thread
engine's interface (``submit``, ``cancel``, ``health``, ``close``). A child whose parent has gone
sees the socket close and exits."""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from vlkit.errors import VlkitError
from vlkit.lm.generation_config import GenerationConfig
from vlkit.models.llava_processor import ProcessedSample
from vlkit.serve.cpus import bind
from vlkit.serve.engine import Engine, Job
from vlkit.serve.models import ChatModel, Prompt

log = logging.getLogger("vlkit.serve")


class EngineProcess:
    """Runs ``served``'s model (a :class:`vlkit.serve.models.ChatModel`, loaded from ``served.path``
    onto ``device``) in a child process with ``threads`` torch threads, bound to ``cpus`` when given
    (:mod:`vlkit.serve.cpus`); waits up to ``start_timeout`` seconds for it to load."""

    def __init__(self, served, max_batch: int = 16, device: str = "cpu", threads: int | None = None,
                 start_timeout: float = 600.0, cpus: list[int] | None = None):  # fmt: skip
        mine, child = socket.socketpair()
        self.cpus = cpus
        cmd = [sys.executable, "-c", "from vlkit.serve.engine_process import main; main()", str(child.fileno()), served.name,
               str(served.path), device, str(max_batch), str(threads or 0), ",".join(map(str, cpus or ()))]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # imports as this process does
        self.process = subprocess.Popen(cmd, pass_fds=[child.fileno()], env=env)
        child.close()
        self.conn = Connection(mine.detach())
        self.jobs: dict[int, Job] = {}
        self.keys, self.health_asks = itertools.count(), itertools.count()
        self.send_lock, self.health_lock = threading.Lock(), threading.Lock()
        self.health_ask, self.health_reply = -1, None
        self.health_ready = threading.Event()
        self.down: str | None = None  # why the engine cannot answer: it was closed, or it died
        if not self.conn.poll(start_timeout):
            self.close(0)
            raise VlkitError(f"{served.path}: the engine process did not load the model within {start_timeout:.0f} s")
        try:
            message = _recv(self.conn)
        except (EOFError, OSError):
            message = ("failed", f"it exited (code {self.process.wait()}) before it was ready; its output above says why")
        if message[0] != "ready":
            self.close()
            raise VlkitError(f"{served.path}: the engine process could not load the model: {message[1]}")
        self.reader = threading.Thread(target=self._read, name=f"vlkit-engine-reader-{served.name}", daemon=True)
        self.reader.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; if the child is down (or goes down meanwhile) it fails at once, exactly once."""
        job.key = next(self.keys)
        message = _pack(("submit", job.key, _prompt_data(job.prompt), dataclasses.asdict(job.config), job.n, job.seed,
                         job.strip, job.stream))  # fmt: skip
        self.jobs[job.key] = job
        if self.down is None:
            self._send_bytes(message)
        if self.down is not None and self.jobs.pop(job.key, None) is not None:  # the reader did not fail it: fail it here
            job.deliver(("error", self.down))

    def cancel(self, job: Job) -> None:
        job.cancel()
        if self.jobs.pop(job.key, None) is not None:
            self._send(("cancel", job.key))

    def health(self, timeout: float = 10.0) -> dict:
        """The child engine's counts and statistics, asked for now (each ask numbered, so a late
        answer to an earlier one is not taken for this one's)."""
        late = {"down": f"the engine process did not answer within {timeout:.0f} s"}
        if self.down is not None:
            return {"down": self.down}
        if not self.health_lock.acquire(timeout=timeout):
            return late
        try:
            self.health_ready.clear()
            self.health_ask = next(self.health_asks)
            self._send(("health", self.health_ask))
            return {**self.health_reply, "cpus": self.cpus} if self.health_ready.wait(timeout) else late
        finally:
            self.health_lock.release()

    def close(self, timeout: float = 10.0) -> None:
        self.down = "the engine process was stopped"
        self._send(("stop",))
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        reader = getattr(self, "reader", None)
        if reader is not None:
            reader.join(timeout)  # it sees the socket close and fails what is still open
        self.conn.close()

    def _send(self, message: tuple) -> None:
        self._send_bytes(_pack(message))

    def _send_bytes(self, data: bytes) -> None:
        try:
            with self.send_lock:
                self.conn.send_bytes(data)
        except (OSError, ValueError):  # the child is gone: the reader fails the open jobs
            pass

    def _read(self) -> None:
        """Deliver the child's events to their jobs until the socket closes; then fail what is open."""
        while True:
            try:
                message = _recv(self.conn)
            except (EOFError, OSError):
                break
            try:
                self._dispatch(message)
            except Exception:  # noqa: BLE001 - a reader that died would leave every request waiting
                log.exception("the engine process's message %r could not be delivered", message[:2])
                self.process.kill()
                break
        if self.down is None:
            try:
                code = self.process.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            self.down = f"the engine process exited (code {code})"
            log.error("%s; its %d open requests fail", self.down, len(self.jobs))
        while True:  # popped one at a time: a job that submit() adds meanwhile fails there or here, once
            try:
                _, job = self.jobs.popitem()
            except KeyError:
                break
            job.deliver(("error", self.down))

    def _dispatch(self, message: tuple) -> None:
        if message[0] == "health":
            if message[1] == self.health_ask:
                self.health_reply = message[2]
                self.health_ready.set()
            return
        _, key, event = message
        job = self.jobs.get(key)
        if job is None:  # cancelled meanwhile
            return
        if job.closes(event):
            self.jobs.pop(key, None)
        job.deliver(event)


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any class or function a message names is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"the engine's messages carry plain data only, not {module}.{name}")


def _pack(message: tuple) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _send(conn: Connection, message: tuple) -> None:
    conn.send_bytes(_pack(message))


def _recv(conn: Connection) -> tuple:
    return _PlainUnpickler(io.BytesIO(conn.recv_bytes())).load()


def _tensor_data(t: torch.Tensor) -> dict:
    t = t.detach().cpu().contiguous()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "bytes": t.view(-1).view(torch.uint8).numpy().tobytes()}


def _tensor(data: dict) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data["bytes"]), dtype=torch.uint8)
    return raw.view(getattr(torch, data["dtype"])).reshape(data["shape"])


def _prompt_data(prompt: Prompt) -> dict:
    """A prompt as plain data: its ids and, for a VLM, the processed sample the engine collates."""
    sample = prompt.sample
    if sample is None:
        return {"ids": list(prompt.ids), "sample": None}
    return {"ids": list(prompt.ids), "sample": {"input_ids": list(sample.input_ids), "labels": list(sample.labels),
            "images": {k: _tensor_data(v) for k, v in sample.images.items()}, "num_images": sample.num_images,
            "sample": sample.sample}}  # fmt: skip


def _prompt(data: dict) -> Prompt:
    if data["sample"] is None:
        return Prompt(data["ids"])
    sample = ProcessedSample(**{**data["sample"], "images": {k: _tensor(v) for k, v in data["sample"]["images"].items()}})
    return Prompt(data["ids"], sample.images, sample)


def _child(conn: Connection, name: str, folder: str, device: str, max_batch: int, threads: int,
           cpus: list[int] | None = None) -> None:  # fmt: skip
    """The child: every thread bound to ``cpus`` (before the model loads), load, say ready (or why not), then
    serve the socket's messages until "stop". Ctrl+C and SIGTERM reach the whole process group; the
    child leaves stopping to the server, which finishes its open requests first."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    bind(cpus)

    import vlkit

    try:
        if threads:
            torch.set_num_threads(threads)
        served = ChatModel(name, Path(folder), vlkit.load(folder, device=device))
        engine = Engine(served, max_batch)
    except Exception as err:  # noqa: BLE001 - the parent reports it
        _send(conn, ("failed", f"{type(err).__name__}: {err}"))
        return
    lock, jobs = threading.Lock(), {}

    def send(message: tuple) -> None:
        try:
            with lock:
                _send(conn, message)
        except (OSError, ValueError):  # the parent is gone
            pass

    def deliverer(key: int):
        def deliver(event: tuple) -> None:
            job = jobs.get(key)  # None once cancelled
            if job is not None and job.closes(event):
                jobs.pop(key, None)
            send(("event", key, event))

        return deliver

    send(("ready",))
    while True:
        try:
            message = _recv(conn)
        except (EOFError, OSError):
            break
        if message[0] == "submit":
            _, key, prompt, config, n, seed, strip, stream = message
            job = Job(_prompt(prompt), GenerationConfig(**config), n, deliverer(key), seed=seed, strip=strip, stream=stream)
            jobs[key] = job
            engine.submit(job)
        elif message[0] == "cancel":
            job = jobs.pop(message[1], None)
            if job is not None:
                job.cancel()
        elif message[0] == "health":
            send(("health", message[1], engine.health()))
        elif message[0] == "stop":
            break
    engine.close()


def main() -> None:
    """The child's entry point: ``FD NAME FOLDER DEVICE MAX_BATCH THREADS CPUS`` in ``sys.argv`` (CPUS:
    comma-separated, or empty for no binding)."""
    fd, name, folder, device, max_batch, threads, cpus = sys.argv[1:]
    _child(Connection(int(fd)), name, folder, device, int(max_batch), int(threads), [int(c) for c in cpus.split(",") if c])
