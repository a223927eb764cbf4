"""Run the app with uvicorn: in the foreground (``vlkit serve``) or on a background thread bound to
a free port of 127.0.0.1 (tests, benchmarks and notebooks), bounded in start-up and stop time."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from vlkit.errors import VlkitError


def _config(app, host: str, port: int, log_level: str):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.Server(_config(app, host, port, log_level)).run()


@contextmanager
def serving(app, start_timeout: float = 30.0, stop_timeout: float = 15.0, log_level: str = "warning"):
    """``with serving(app) as url:`` the app on ``http://127.0.0.1:PORT`` (a free port) on a
    daemon thread; stopped, and its thread joined, on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(_config(app, "127.0.0.1", port, log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vlkit-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise VlkitError(f"the server did not start on 127.0.0.1:{port} within {start_timeout} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(stop_timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(stop_timeout)
        sock.close()
