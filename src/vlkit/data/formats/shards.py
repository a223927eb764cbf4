"""WebDataset tar shards: packing a dataset into shards and streaming them back.

A sample is the files of one key in a tar: ``{key}.png`` (or .jpg/.jpeg/.webp) with the
image bytes and ``{key}.json`` with its annotations (captions, VQA pairs, boxes, label).

- :func:`write_shards` / :func:`pack` write shards of ``maxcount`` samples
  (``vlkit data pack SRC --out shards/``); :func:`pack` reads any vlkit-readable source
  (a COCO Karpathy JSON, a LLaVA JSON, an ImageFolder, a ``captions.jsonl`` folder),
  copies each image's bytes unchanged and counts the samples it had to skip.
- :class:`ShardStream` streams samples with a shuffle buffer, optional resampling of
  shards (endless, for training), split by node (``torch.distributed`` rank) and by
  DataLoader worker, and skip-and-count of bad samples (corrupt images, malformed JSON,
  unreadable tar members) in :attr:`ShardStream.skips`: counts from the DataLoader's
  workers add up in shared memory, so the training process sees them (each rank its own).
"""

from __future__ import annotations

import glob
import io
import json
import multiprocessing
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from vlkit.data.formats.common import FormatError, Skips, iter_jsonl
from vlkit.data.images import to_rgb

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
SKIP_REASONS = ("unreadable tar member", "malformed json", "no image", "corrupt image")
SKIP_ROWS = 65  # one row of counts for the main process and each of 64 DataLoader workers: no locks needed


def write_shards(samples: Iterable[dict], out_dir: str | Path, maxcount: int = 1000, prefix: str = "shapes", maxsize: float = 3e9) -> list[Path]:
    """Write samples (``{"__key__", "png"|"jpg": PIL image or bytes, "json": dict}``) to
    ``out_dir/{prefix}-%06d.tar``; returns the shard paths."""
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0) as sink:
        for s in samples:
            rec = dict(s)
            for k in IMAGE_KEYS:
                if isinstance(rec.get(k), Image.Image):
                    buf = io.BytesIO()
                    rec[k].save(buf, format="PNG" if k == "png" else "JPEG")
                    rec[k] = buf.getvalue()
            if isinstance(rec.get("json"), (dict, list)):
                rec["json"] = json.dumps(rec["json"]).encode("utf-8")
            sink.write(rec)
    return sorted(out_dir.glob(f"{prefix}-*.tar"))


def _source_records(src: Path, skips: Skips) -> Iterator[tuple[str, Path, dict]]:
    """``(key, image path, annotations)`` from a dataset folder or file of a known format,
    streamed so a large JSON is never held whole."""
    if src.is_file() and src.suffix == ".json":
        top = _first_char(src)
        if top == "{":
            from vlkit.data.formats.coco import iter_karpathy

            for r in iter_karpathy(src):
                yield f"coco-{r.id}", r.image, {"id": r.id, "captions": r.captions, "split": r.split}
            return
        if top == "[":
            from vlkit.data.formats.llava import iter_llava

            for c in iter_llava(src):
                if c.image is None:
                    skips.add("no image", f"{src}, id {c.id}")
                    continue
                yield f"llava-{c.id}", c.image, {"id": c.id, "conversations": [list(t) for t in c.turns]}
            return
        raise FormatError(f"{src}: not a Karpathy captions JSON or a LLaVA conversation list")
    if src.is_dir() and (src / "captions_karpathy.json").is_file():
        yield from _source_records(src / "captions_karpathy.json", skips)
        return
    if src.is_dir() and (src / "classnames.json").is_file():
        from vlkit.data.formats.imagefolder import read_imagefolder

        paths, labels, names, _ = read_imagefolder(src)
        for i, (p, y) in enumerate(zip(paths, labels)):
            yield f"img-{i:08d}", p, {"id": i, "label": y, "classname": names[y]}
        return
    if src.is_dir() and (src / "captions.jsonl").is_file():
        for line, r in iter_jsonl(src / "captions.jsonl", '{"image": path, "captions": [...]}'):
            if not isinstance(r.get("image"), str):
                raise FormatError(f"{src / 'captions.jsonl'}, line {line}: expected an 'image' path")
            yield f"cap-{line:08d}", src / r["image"], {k: v for k, v in r.items() if k != "image"}
        return
    raise FormatError(
        f"{src}: unrecognised source; expected a Karpathy captions JSON, a LLaVA JSON, an ImageFolder "
        "(with classnames.json) or a folder with captions.jsonl or captions_karpathy.json"
    )


def _first_char(path: Path) -> str:
    """The first non-whitespace character of a text file, which tells an object from a list."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while chunk := f.read(4096):
            if chunk.strip():
                return chunk.lstrip()[0]
    return ""


def pack(src: str | Path, out: str | Path, maxcount: int = 1000, prefix: str = "data") -> dict:
    """Pack a dataset into shards; missing or unreadable images are skipped and counted."""
    src, out = Path(src), Path(out)
    skips = Skips()
    n = 0

    def samples():
        nonlocal n
        for key, path, meta in _source_records(src, skips):
            ext = path.suffix.lower().lstrip(".")
            if ext not in IMAGE_KEYS:
                skips.add("unsupported image type", str(path))
                continue
            try:
                data = path.read_bytes()
            except OSError:
                skips.add("missing image", str(path))
                continue
            n += 1
            yield {"__key__": key, ext: data, "json": meta}

    files = write_shards(samples(), out, maxcount=maxcount, prefix=prefix)
    summary = {"source": str(src), "shards": [str(f) for f in files], "samples": n, "skipped": skips.to_dict()}
    (out / "pack.json").write_text(json.dumps(summary, indent=2))
    return summary


def expand_urls(spec: str | Path | list) -> list[str]:
    """A list, a glob ("shards/*.tar"), brace notation ("s-{000000..000009}.tar") or a folder."""
    if isinstance(spec, (list, tuple)):
        return [str(s) for s in spec]
    spec = str(spec)
    if Path(spec).is_dir():
        return sorted(str(p) for p in Path(spec).glob("*.tar"))
    if "{" in spec:
        import braceexpand

        return list(braceexpand.braceexpand(spec))
    found = sorted(glob.glob(spec))
    if not found:
        raise FileNotFoundError(f"{spec}: no shards match")
    return found


class ShardStream(IterableDataset):
    """An iterable dataset of decoded samples ``{"key", "url", "image": PIL RGB, "json": dict}``.

    ``shuffle``: buffer size (0 = file order). ``resample``: draw shards with replacement
    forever (training); otherwise one pass. Shards are split by node (``RANK``/``WORLD_SIZE``
    or ``torch.distributed``) and by DataLoader worker unless turned off. Bad samples are
    skipped and counted in ``skips``. Call :meth:`set_epoch` before each pass for a new
    shuffle order (the same seed and epoch give the same order).
    """

    def __init__(self, urls, shuffle: int = 1000, resample: bool = False, seed: int = 0, split_by_node: bool = True,
                 split_by_worker: bool = True, decode_images: bool = True):  # fmt: skip
        self.urls = expand_urls(urls)
        if not self.urls:
            raise FileNotFoundError(f"{urls}: no shards")
        self.shuffle, self.resample, self.seed, self.epoch = shuffle, resample, seed, 0
        self.split_by_node, self.split_by_worker, self.decode_images = split_by_node, split_by_worker, decode_images
        self._examples = Skips()
        self._counts = multiprocessing.RawArray("q", SKIP_ROWS * len(SKIP_REASONS))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def skips(self) -> Skips:
        """Bad samples skipped so far by this process and its DataLoader workers; the examples
        are this process's own (a worker's stay in the worker)."""
        n = len(SKIP_REASONS)
        counts = Counter({r: total for k, r in enumerate(SKIP_REASONS) if (total := sum(self._counts[k::n]))})
        return Skips(counts, self._examples.examples)

    def _skip(self, reason: str, where: str) -> None:
        """Count a bad sample in this process's row of the shared counts (workers past 64 share rows)."""
        info = get_worker_info()
        row = 0 if info is None else 1 + info.id % (SKIP_ROWS - 1)
        self._counts[row * len(SKIP_REASONS) + SKIP_REASONS.index(reason)] += 1
        self._examples.add(reason, where)

    def _handler(self, exn) -> bool:
        self._skip("unreadable tar member", f"{type(exn).__name__}: {exn}"[:200])
        return True

    def _decode(self, samples):
        for s in samples:
            key, url = s.get("__key__"), s.get("__url__")
            where = f"{url}, key {key}"
            try:
                meta = json.loads(s["json"]) if "json" in s else {}
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                self._skip("malformed json", f"{where}: {err}")
                continue
            ext = next((k for k in IMAGE_KEYS if k in s), None)
            if ext is None:
                self._skip("no image", where)
                continue
            image = s[ext]
            if self.decode_images:
                try:
                    with Image.open(io.BytesIO(s[ext])) as img:
                        img.load()
                        image = to_rgb(img)
                except OSError as err:
                    self._skip("corrupt image", f"{where}: {err}")
                    continue
            yield {"key": key, "url": url, "image": image, "json": meta}

    def pipeline(self):
        import webdataset as wds

        seed = self.seed * 1_000_003 + self.epoch
        stages = [wds.ResampledShards(self.urls, seed=seed) if self.resample else wds.SimpleShardList(self.urls)]
        if not self.resample and self.split_by_node:
            ranks = wds.utils.pytorch_worker_info()[1]
            if ranks > len(self.urls):
                raise ValueError(f"{len(self.urls)} shards for {ranks} ranks: a rank would get none and stall distributed "
                                 f"training; pack into at least {ranks} shards or stream with resample=True")  # fmt: skip
        if not self.resample:
            if self.split_by_node:
                stages.append(wds.split_by_node)
            if self.split_by_worker:
                stages.append(wds.split_by_worker)
        stages.append(wds.tarfile_to_samples(handler=self._handler))
        if self.shuffle:
            stages.append(wds.shuffle(self.shuffle, seed=seed))
        stages.append(self._decode)
        return wds.DataPipeline(*stages)

    def __iter__(self):
        return iter(self.pipeline())
