"""A demo part's model folder: the trained model's files copied to the part's folder, which
is how a later ``--parts`` run knows the part is done (see :func:`vlkit.demo._done`)."""

from __future__ import annotations

import shutil
from pathlib import Path


def publish(model_dir: Path, target: Path) -> None:
    """The model's files (not its training state) into ``target``, ``config.json`` last."""
    for f in sorted((p for p in Path(model_dir).iterdir() if p.is_file()), key=lambda p: p.name == "config.json"):
        shutil.copy2(f, target / f.name)
