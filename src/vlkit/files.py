"""Output folders written whole: a command's output goes to a temporary sibling folder and is
renamed into place once complete, so a crash never leaves half a folder and a rerun never
mixes old files with new ones."""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from pathlib import Path

from vlkit.errors import VlkitError


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def check_file_path(path: Path, flag: str = "--out", folder: bool = False) -> Path:
    """Refuse, before any work, a path that cannot be made: a file where one of its folders must be
    (or, with ``folder``, where the path itself must be a folder). Returns the nearest folder that
    exists, in which it would be made."""
    path = Path(path)
    for parent in [path] * folder + list(path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise VlkitError(f"{flag} {path}: {parent} is a file; expected a folder there (or a path that can be one)")
            return parent
    return Path(".")


def write_text_whole(path: Path, text: str) -> None:
    """Write the file ``path`` through a synced temporary sibling renamed over it: a kill leaves
    the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def recover(target: Path) -> None:
    """Undo what a process killed inside :func:`atomic_folder` left beside ``target``: with
    ``target`` gone between the two renames, its old copy is put back; hidden leftovers of killed
    writes are removed."""
    target = Path(target)
    name = glob.escape(target.name)
    olds = sorted(target.parent.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        olds.pop().rename(target)
    for stale in olds + list(target.parent.glob(f".{name}.tmp-*")):
        _remove(stale)


def _remove(path: Path) -> None:
    """Remove a folder, or a link (to a folder or not) without following it."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def atomic_folder(target: Path, write) -> None:
    """Call ``write(tmp)`` on a fresh temporary folder, then move it to ``target`` in one rename
    (replacing an old ``target`` only after the new one is complete; a kill between that and the
    old one's removal is undone by :func:`recover`, which every write starts with)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            try:
                tmp.rename(target)
            except OSError:
                old.rename(target)  # put the old one back: a failed write leaves it as it was
                raise
            _remove(old)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
