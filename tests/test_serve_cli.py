"""``vlkit serve`` from the command line: it starts on the port given, serves the named models (the
chat model from an engine process of its own) and stops on SIGTERM, its engine process with it; a folder that holds no servable model, or a name given twice, is refused before
anything listens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from vlkit.cli import main  # noqa: E402

from _serve_util import clip_folder, lm_folder  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux's /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
        except OSError:
            pass
    return out


def test_serve_starts_serves_and_stops(tmp_path):
    clip, lm = clip_folder(tmp_path / "clip"), lm_folder(tmp_path / "lm")
    port = free_port()
    env = {**os.environ, "VLKIT_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vlkit.cli", "serve", "--model", f"tower={clip}", "--model", f"lm={lm}",
                             "--port", str(port), "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    engines = []
    try:
        deadline, health = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health is not None and health.status_code == 200, proc.stdout.read().decode() if proc.poll() is not None else ""
        key = {"Authorization": "Bearer k"}
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=key).json()
        assert [m["id"] for m in models["data"]] == ["tower", "lm"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # the key came from VLKIT_API_KEY
        body = {"model": "lm", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=key, timeout=60).json()
        assert 1 <= answer["usage"]["completion_tokens"] <= 4
        engines = children(proc.pid)
        assert engines  # the LM's engine process
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal it caught
    assert b"Traceback" not in proc.stdout.read()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in engines) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in engines)  # the engine process stopped with the server


def test_bad_model_folders_are_refused(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    clip = clip_folder(tmp_path / "clip")
    assert main(["serve", "--model", str(clip), "--model", str(clip)]) == 2
    assert "name it" in capsys.readouterr().err
    assert main(["serve", "--model", str(clip), "--image-root", str(tmp_path / "nowhere")]) == 2
    assert "--image-root" in capsys.readouterr().err


def test_an_empty_or_padded_api_key_is_refused(tmp_path, capsys, monkeypatch):
    """A key no client can send (empty, as an unset shell variable gives, or padded) would leave /v1
    open or closed to all: refused before the models load."""
    clip = tmp_path / "no-model-needed"
    for key, said in (("", "--api-key is empty"), ("  ", "--api-key is empty"), (" k ", "padded with whitespace")):
        assert main(["serve", "--model", str(clip), "--api-key", key]) == 2
        assert said in capsys.readouterr().err
    monkeypatch.setenv("VLKIT_API_KEY", "")
    assert main(["serve", "--model", str(clip)]) == 2
    assert "$VLKIT_API_KEY is empty" in capsys.readouterr().err


def test_ctrl_c_ends_a_command_with_one_line(monkeypatch, capsys):
    import vlkit.serve.cli

    def interrupted(args, overrides):
        raise KeyboardInterrupt

    monkeypatch.setattr(vlkit.serve.cli, "cmd_serve", interrupted)  # what Ctrl+C in any command raises
    assert main(["serve", "--model", "x"]) == 130
    assert capsys.readouterr().err == "vlkit: interrupted\n"
