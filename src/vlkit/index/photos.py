"""A photo index: the embeddings of every image under a folder, kept up to date incrementally.

``vlkit index --model CLIPDIR --images FOLDER --out INDEX`` writes the folder ``INDEX``:

- ``index.json``: the images folder, the model that made the index (:mod:`.identity`), the
  search backend (``exact``, or FAISS ``pq`` / ``rabitq`` / ``ivf`` / ``hnsw``, chosen by size, :mod:`.backends`), counts, and the
  unreadable files (with their size and modification time, so an unchanged bad file is not
  read again);
- ``files.jsonl``: one ``{"path", "size", "mtime_ns"}`` per row of ``embeddings.npy``
  (paths relative to the images folder, sorted);
- ``embeddings.npy``: ``[N, D]`` float32, L2-normalised;
- ``faiss.index``: the FAISS index, for indexes above ``backends.EXACT_MAX`` vectors.

Re-running on the same folder embeds only files that are new or whose size or modification
time changed, and drops files that are gone. The folder is written whole by
:func:`vlkit.files.atomic_folder`, so a crash mid-run leaves the previous index as it was; what
was embedded is written every ``SAVE_EVERY_S`` seconds and when the run is interrupted (Ctrl+C),
so a re-run goes on from there. One run at a time updates an index (a lock file beside it).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlkit.data.images import BadSample, image_files, load_image
from vlkit.data.skips import Skips
from vlkit.errors import VlkitError
from vlkit.files import atomic_folder, check_file_path, recover
from vlkit.index import backends
from vlkit.index.identity import ModelIdentity, check_same, identify
from vlkit.precision import autocast

FORMAT = "vlkit-photo-index"
VERSION = 1
META_FILE = "index.json"
FILES_FILE = "files.jsonl"
VECTORS_FILE = "embeddings.npy"
SAVE_EVERY_S = 300.0  # a long run writes what it has embedded this often, so a crash loses at most this much


@dataclass(frozen=True)
class FileStamp:
    """An image file as the index last saw it: path relative to the images folder, size, mtime."""

    path: str
    size: int
    mtime_ns: int


def scan(images: Path) -> list[FileStamp]:
    """Every image file under ``images`` (hidden files and folders passed over), sorted by path."""
    if not images.is_dir():
        raise VlkitError(f"--images {images}: no such folder; expected a folder of images")
    found = []
    for full in image_files(images):
        try:
            st = full.stat()
        except OSError:
            try:  # a link to nothing: kept, so that embedding it counts it unreadable
                st = full.lstat()
            except OSError:  # removed while scanning
                continue
        found.append(FileStamp(full.relative_to(images).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(found, key=lambda f: f.path)


class PhotoIndex:
    """A loaded index folder: rows ``files[i]`` ↔ ``vectors[i]``, searched by ``backend``."""

    def __init__(self, folder: Path, meta: dict, files: list[FileStamp], vectors: np.ndarray, backend):
        self.folder = Path(folder)
        self.meta = meta
        self.files = files
        self.vectors = vectors
        self.backend = backend
        self.model = ModelIdentity.from_dict(meta["model"], str(self.folder / META_FILE))

    @property
    def images(self) -> Path:
        return Path(self.meta["images"])

    @property
    def kind(self) -> str:
        return self.backend.kind

    def __len__(self) -> int:
        return len(self.files)

    @classmethod
    def load(cls, folder: str | Path, option: str = "--index") -> "PhotoIndex":
        """The index in ``folder``; errors name it as ``option`` (the flag that gave it)."""
        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            what = ("a file" if folder.is_file() else "no such folder" if not folder.exists()
                    else f"a folder without {META_FILE} (not an index)")  # fmt: skip
            raise VlkitError(f"{option} {folder}: {what}; expected a folder written by vlkit index")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise VlkitError(f"{meta_path}: not valid JSON ({err}); expected the index description vlkit index writes") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise VlkitError(f"{meta_path}: not a vlkit photo index (format {meta.get('format') if isinstance(meta, dict) else None!r}; "
                             f"expected {FORMAT!r})")  # fmt: skip
        if meta.get("version") != VERSION:
            raise VlkitError(f"{meta_path}: index version {meta.get('version')!r}; this vlkit reads version {VERSION}")
        _check_meta(meta, meta_path)
        model = ModelIdentity.from_dict(meta.get("model") if isinstance(meta.get("model"), dict) else {}, str(meta_path))
        files = _read_files(folder / FILES_FILE)
        vectors = _read_vectors(folder / VECTORS_FILE, len(files), model.width)
        return cls(folder, meta, files, vectors, backends.load(folder, vectors, meta.get("kind")))

    def search_vectors(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """For each query row, up to ``k`` ``(path relative to the images folder, score)``, best first."""
        if not len(self.files):
            return [[] for _ in range(len(queries))]
        scores, rows = self.backend.search(np.asarray(queries, dtype=np.float32), k)
        return [[(self.files[r].path, float(s)) for s, r in zip(srow, rrow)] for srow, rrow in zip(scores, rows)]

    def check_model(self, model, path: str | Path) -> None:
        """Refuse a query model other than the one that made the index (:func:`.identity.check_same`)."""
        check_same(self.model, identify(model, path), str(self.folder))


def _check_meta(meta: dict, path: Path) -> None:
    """``images`` a folder name, ``unreadable`` a list of ``{"path", "size", "mtime_ns", ...}``."""
    if not isinstance(meta.get("images"), str):
        raise VlkitError(f"{path}: 'images' is {meta.get('images')!r}; expected the indexed folder's path")
    bad = meta.get("unreadable", [])
    stamp = lambda b: isinstance(b, dict) and isinstance(b.get("path"), str) and all(  # noqa: E731
        isinstance(b.get(k), int) for k in ("size", "mtime_ns"))
    if not isinstance(bad, list) or not all(stamp(b) for b in bad):
        raise VlkitError(f"{path}: 'unreadable' is {bad!r:.100}; expected a list of "
                         '{"path": ..., "size": ..., "mtime_ns": ...}')  # fmt: skip


def _read_files(path: Path) -> list[FileStamp]:
    if not path.is_file():
        raise VlkitError(f"{path}: missing; the index folder is incomplete (rebuild it with vlkit index)")
    files = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as err:
            raise VlkitError(f"{path}: not UTF-8 text ({err}); expected the JSON lines vlkit index writes") from None
    for line_no, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            files.append(FileStamp(str(rec["path"]), int(rec["size"]), int(rec["mtime_ns"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise VlkitError(f"{path}, line {line_no}: {type(err).__name__}: {err}; expected "
                             '{"path": ..., "size": ..., "mtime_ns": ...}') from None  # fmt: skip
    return files


def _read_vectors(path: Path, rows: int, width: int) -> np.ndarray:
    if not path.is_file():
        raise VlkitError(f"{path}: missing; the index folder is incomplete (rebuild it with vlkit index)")
    try:
        vectors = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise VlkitError(f"{path}: not a readable .npy array ({err})") from None
    if vectors.dtype != np.float32 or vectors.shape != (rows, width):
        raise VlkitError(f"{path}: {vectors.dtype} array of shape {vectors.shape}; expected float32 ({rows}, {width}) "
                         f"to match {FILES_FILE} and the model width")  # fmt: skip
    return vectors


def embed_batches(model, images: Path, stamps: list[FileStamp], skips: Skips, batch_size: int = 32,
                  precision: str = "auto", workers: int = 4, progress: bool = True):  # fmt: skip
    """Yield ``(the files of a batch that loaded, their L2-normalised embeddings [n, D])``, batch by
    batch; the others go to ``skips``. Images are decoded and preprocessed by a small thread pool
    while the model runs."""
    device = next(model.parameters()).device

    def prepare(stamp: FileStamp):
        try:
            return model.processor(load_image(images / stamp.path))
        except BadSample as err:
            return err

    with tqdm(total=len(stamps), desc="embed", unit="img", disable=not progress) as bar, ThreadPoolExecutor(max(1, workers)) as pool:
        for i in range(0, len(stamps), batch_size):
            chunk = stamps[i : i + batch_size]
            kept, pixels = [], []
            for stamp, item in zip(chunk, pool.map(prepare, chunk)):
                if isinstance(item, BadSample):
                    skips.reject(item, "unreadable image", source=stamp.path, record="")
                else:
                    pixels.append(item)
                    kept.append(stamp)
            if pixels:
                with torch.no_grad(), autocast(precision, device):
                    feats = model.encode_image(torch.stack(pixels).to(device))
                yield kept, F.normalize(feats.float(), dim=-1).cpu().numpy()
            bar.update(len(chunk))


def build_index(model, model_path: str | Path, images: str | Path, out: str | Path, kind: str = "auto",
                batch_size: int = 32, precision: str = "auto", progress: bool = True) -> dict:  # fmt: skip
    """Create or update the index ``out`` of the folder ``images`` with ``model``; returns the summary."""
    images = Path(images).resolve()
    out = _output(Path(out), images)
    identity = identify(model, model_path)
    backends.choose_kind(0, kind)  # check the name before any work
    with _lock(out):
        recover(out)  # a run killed while replacing the index: its previous copy, and its embeddings, come back
        old = _previous(out, images, identity)
        current = scan(images)
        t0 = time.perf_counter()
        known = {f.path: i for i, f in enumerate(old.files)} if old else {}
        old_bad = {(b["path"], b["size"], b["mtime_ns"]): b for b in (old.meta["unreadable"] if old else [])}
        reuse, todo, still_bad = [], [], []
        for stamp in current:
            i = known.get(stamp.path)
            if i is not None and old.files[i] == stamp:
                reuse.append(i)
            elif (stamp.path, stamp.size, stamp.mtime_ns) in old_bad:
                still_bad.append(old_bad[(stamp.path, stamp.size, stamp.mtime_ns)])
            else:
                todo.append(stamp)
        if backends.choose_kind(len(reuse) + len(todo), kind) != "exact":
            backends.require_faiss()  # before hours of embedding, not after
        run = _Run(out, images, identity, kind, old, {s.path for s in current}, still_bad, {s.path: s for s in todo})
        last_save = time.monotonic()
        try:
            for files, vectors in embed_batches(model, images, todo, run.skips, batch_size, precision, progress=progress):
                run.add(files, vectors)
                if time.monotonic() - last_save > SAVE_EVERY_S:
                    run.write(complete=False)
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            run.write(complete=False)  # what was embedded stays: a re-run goes on from there
            raise
        embed_s = time.perf_counter() - t0
        summary = run.write(complete=True, embed_s=embed_s)
    return summary


class _Run:
    """An update in progress: the previous index, what this run has embedded and found unreadable
    so far, and how to write the index as it stands (partly done, or complete)."""

    def __init__(self, out: Path, images: Path, identity: ModelIdentity, kind: str, old: "PhotoIndex | None",
                 present: set[str], still_bad: list[dict], todo: dict[str, FileStamp]):  # fmt: skip
        self.out, self.images, self.identity, self.kind, self.old = out, images, identity, kind, old
        self.present, self.still_bad, self.todo = present, still_bad, todo
        self.skips = Skips("skip")
        self.files: list[FileStamp] = []
        self.vectors: list[np.ndarray] = []

    def add(self, files: list[FileStamp], vectors: np.ndarray) -> None:
        self.files += files
        self.vectors.append(vectors)

    def write(self, complete: bool, embed_s: float = 0.0) -> dict:
        """Write the index: the previous rows of files still there and not yet embedded again (a
        changed file's old row stays until its new one replaces it), then this run's."""
        old, width = self.old, self.identity.width
        done = {f.path for f in self.files} | {s.source for s in self.skips.items}
        keep = [i for i, f in enumerate(old.files) if f.path in self.present and f.path not in done] if old else []
        files = [old.files[i] for i in keep] + self.files
        vectors = np.concatenate([old.vectors[keep] if old else np.zeros((0, width), np.float32), *self.vectors])
        order = sorted(range(len(files)), key=lambda r: files[r].path)
        files, vectors = [files[r] for r in order], np.ascontiguousarray(vectors[order], dtype=np.float32)
        bad = self.still_bad + [{"path": s.source, "size": self.todo[s.source].size, "mtime_ns": self.todo[s.source].mtime_ns,
                                 "problem": s.detail} for s in self.skips.items]  # fmt: skip
        chosen = backends.choose_kind(len(files), self.kind) if files else "exact"
        same_rows = old is not None and not self.files and not self.skips.items and len(keep) == len(old.files)
        backend = old.backend if same_rows and old.kind == chosen else backends.build(vectors, chosen)
        if not files:
            reason = "no images: exact search"
        elif self.kind == "auto":
            reason = (f"{len(files)} vectors {'<=' if chosen == 'exact' else '>'} {backends.EXACT_MAX}: "
                      f"{'exact search' if chosen == 'exact' else 'approximate search (FAISS PQ fast scan, exact re-ranking)'}")  # fmt: skip
        else:
            reason = f"--kind {self.kind}"
        known = {f.path for f in old.files} if old else set()
        changed = sum(f.path in known for f in self.files)
        summary = {
            "images": len(files), "new": len(self.files) - changed, "changed": changed, "unchanged": len(keep),
            "removed": len(known - self.present), "unreadable": len(bad), "unreadable_new": len(self.skips.items),
            "kind": chosen, "kind_reason": reason, "embed_seconds": round(embed_s, 3),
            "images_per_second": round(len(self.todo) / embed_s, 2) if self.todo and embed_s > 0 else None,
            "complete": complete,
        }  # fmt: skip
        meta = {"format": FORMAT, "version": VERSION, "images": str(self.images), "model": self.identity.to_dict(),
                "kind": chosen, "count": len(files), "unreadable": bad,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "last_run": {k: v for k, v in summary.items() if k not in ("kind", "images")}}  # fmt: skip

        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            with open(tmp / FILES_FILE, "w", encoding="utf-8") as f:
                for stamp in files:
                    f.write(json.dumps({"path": stamp.path, "size": stamp.size, "mtime_ns": stamp.mtime_ns}) + "\n")
            np.save(tmp / VECTORS_FILE, vectors)
            backend.save(tmp)

        atomic_folder(self.out, write)
        return summary


def _output(out: Path, images: Path) -> Path:
    """The index folder ``--out`` names (through a link to it), checked before any work: not the
    images folder or one holding it (replacing it would delete the photos), and creatable."""
    real = out.resolve()
    if real == images or images.is_relative_to(real):
        raise VlkitError(f"--out {out}: {'is' if real == images else 'holds'} the images folder {images}; the index is "
                         "written whole in its own folder, which would replace the photos. Give another --out "
                         "(a folder inside the images folder is fine: it is not indexed)")  # fmt: skip
    existing = check_file_path(real, "--out", folder=True)
    if not os.access(existing, os.W_OK):
        raise VlkitError(f"--out {out}: cannot write in {existing}")
    return real


@contextlib.contextmanager
def _lock(out: Path):
    """Hold the lock of the index ``out`` (a hidden file beside it) while this run updates it; a
    second run is refused at once, as two would each replace the other's work."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_file = out.parent / f".{out.name}.lock"
    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VlkitError(f"--out {out}: another vlkit index is updating it (it holds {lock_file}); "
                             "let it finish, then run again") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _previous(out: Path, images: Path, identity: ModelIdentity) -> PhotoIndex | None:
    """The index already at ``out``, to update; refused when it indexes another folder or model."""
    if not out.exists():
        return None
    if out.is_dir() and not any(out.iterdir()):
        return None
    old = PhotoIndex.load(out, "--out")
    if Path(old.meta["images"]) != images:
        raise VlkitError(f"--out {out}: indexes the folder {old.meta['images']}, not {images}; give another --out "
                         "(one index per folder)")  # fmt: skip
    check_same(old.model, identity, str(out))
    return old
