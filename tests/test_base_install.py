"""The command line on the README's plain install (``pip install -e .``, no extras): the optional
packages are hidden from a fresh interpreter, which must still build every command, run one, and
say what to install for the one that needs an extra."""

from __future__ import annotations

import subprocess
import sys

EXTRAS = ["fastapi", "uvicorn", "httpx", "openai", "uvloop", "httptools", "faiss", "transformers", "peft", "diffusers",
          "skimage", "pycocoevalcap", "hypothesis", "websocket"]  # fmt: skip

HIDE = f"""
import sys
class Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden: a plain install)", name=name)
sys.meta_path.insert(0, Hidden())
from vlkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def vlkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE, *args], capture_output=True, text=True, timeout=300)


def test_every_command_builds_without_the_extras():
    run = vlkit("--help")
    assert run.returncode == 0, run.stderr
    for command in ("demo", "serve", "index", "data"):
        assert command in run.stdout


def test_a_command_runs_without_the_extras(tmp_path):
    run = vlkit("data", "shapes", "--out", str(tmp_path / "shapes"), "-n", "4")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "shapes" / "captions" / "captions.jsonl").exists()


def test_serve_says_which_extra_it_needs():
    run = vlkit("serve", "--model", "nowhere")
    assert run.returncode != 0
    assert "pip install 'vlkit[serve]'" in run.stderr + run.stdout
