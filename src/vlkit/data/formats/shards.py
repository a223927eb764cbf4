"""WebDataset tar shards: packing a dataset into shards and streaming them back.

A sample is the files of one key in a tar: ``{key}.png`` (or .jpg/.jpeg/.webp) with the
image bytes and ``{key}.json`` with its annotations (captions, VQA pairs, boxes, label).

- :func:`write_shards` / :func:`pack` write shards of ``maxcount`` samples
  (``vlkit data pack SRC --out shards/``); :func:`pack` reads any vlkit-readable source
  (a COCO Karpathy JSON, a LLaVA JSON, an ImageFolder, a ``captions.jsonl`` folder),
  decodes each image to check it and stores its bytes unchanged (PNG, JPEG, WebP; other
  types re-encoded as PNG). The output folder is written whole (an earlier pack is
  replaced, never mixed in); bad records follow :mod:`vlkit.data.skips`, and the skipped
  ones are listed in the pack's ``skipped.jsonl``.
- :class:`ShardStream` streams samples with a shuffle buffer, optional resampling of
  shards (endless, for training), split by node (``torch.distributed`` rank) and by
  DataLoader worker. Bad samples (corrupt images, malformed JSON, unreadable tar members)
  follow the same rule; skipped ones are counted in :attr:`ShardStream.skips`: counts from
  the DataLoader's workers add up in shared memory, so the training process sees them
  (each rank its own).
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

from vlkit.data.formats.common import FormatError, no_records
from vlkit.data.images import BadSample, decode_image, for_record
from vlkit.data.skips import SKIPPED_FILE, Skip, Skips
from vlkit.errors import VlkitError
from vlkit.files import atomic_folder

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
PACK_MANIFEST = "pack.json"
SOURCES = ("a Karpathy captions JSON, a LLaVA JSON, an ImageFolder (with classnames.json), a captions.jsonl or "
           "a folder with captions.jsonl or captions_karpathy.json")  # fmt: skip
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


def _source_records(src: Path, skips: Skips, allow_outside: bool) -> Iterator[tuple[str, Path, dict, tuple | None]]:
    """``(key, image path, annotations, (data file, record) naming the image or None where the
    image is the record)`` from a dataset folder or file of a known format, streamed so a large
    JSON is never held whole."""
    if src.is_file() and src.suffix == ".json":
        top = _first_char(src)
        if top == "{":
            from vlkit.data.formats.coco import iter_karpathy

            for r in iter_karpathy(src, skips=skips, allow_outside_paths=allow_outside):
                yield f"coco-{r.id}", r.image, {"id": r.id, "captions": r.captions, "split": r.split}, (src, f"image id {r.id}")
            return
        if top == "[":
            from vlkit.data.formats.llava import iter_llava

            for c in iter_llava(src, skips=skips, allow_outside_paths=allow_outside):
                if c.image is None:
                    skips.add("no image", src, f"id {c.id!r}", "a conversation without an image; shards hold image samples")
                    continue
                if len(c.images) > 1:
                    skips.add("several images", src, f"id {c.id!r}", f"{len(c.images)} images; shards hold one image per sample")
                    continue
                yield f"llava-{c.id}", c.image, {"id": c.id, "conversations": [list(t) for t in c.turns]}, (src, f"id {c.id!r}")
            return
        raise FormatError(f"{src}: not a Karpathy captions JSON or a LLaVA conversation list")
    if src.is_file() and src.name == "captions.jsonl":
        yield from _source_records(src.parent, skips, allow_outside)
        return
    if src.is_dir() and (src / "captions_karpathy.json").is_file():
        yield from _source_records(src / "captions_karpathy.json", skips, allow_outside)
        return
    if src.is_dir() and (src / "classnames.json").is_file():
        from vlkit.data.formats.imagefolder import read_imagefolder

        paths, labels, names, _ = read_imagefolder(src)
        for i, (p, y) in enumerate(zip(paths, labels)):
            yield f"img-{i:08d}", p, {"id": i, "label": y, "classname": names[y]}, None
        return
    if src.is_dir() and (src / "captions.jsonl").is_file():
        from vlkit.data.formats.captions import iter_captions

        for r in iter_captions(src, skips, allow_outside):
            yield f"cap-{r.id:08d}", r.image, {"captions": r.captions, **r.meta}, (src / "captions.jsonl", f"line {r.id}")
        return
    raise FormatError(f"{src}: unrecognised source; expected {SOURCES}")


def _first_char(path: Path) -> str:
    """The first non-whitespace character of a text file, which tells an object from a list."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while chunk := f.read(4096):
            if chunk.strip():
                return chunk.lstrip()[0]
    return ""


def _image_entry(path: Path) -> tuple[str, bytes]:
    """``(extension, bytes)`` of a checked image file: fully decoded once (a truncated or corrupt
    one is a :class:`BadSample`), its bytes kept, or re-encoded as PNG for other types."""
    if not path.is_file():
        raise BadSample(str(path), "file not found")
    data = path.read_bytes()
    image = decode_image(data, str(path))
    ext = path.suffix.lower().lstrip(".")
    if ext in IMAGE_KEYS:
        return ext, data
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "png", buf.getvalue()


def pack(src: str | Path, out: str | Path, maxcount: int = 1000, prefix: str = "data", on_bad_sample: str = "error",
         allow_outside_paths: bool = False) -> dict:  # fmt: skip
    """Pack a dataset into shards in the folder ``out``, written whole: a new or empty folder,
    or an earlier pack, which is replaced. Each image is decoded to check it. Bad records
    stop the pack (``on_bad_sample="error"``) or are skipped and listed, with their file and
    reason, in ``out/skipped.jsonl`` (``"skip"``). Returns the summary also in ``out/pack.json``."""
    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PACK_MANIFEST).is_file())):
        raise VlkitError(f"{out}: exists and is not an earlier pack (no {PACK_MANIFEST}); expected a new or empty folder, "
                         "or a pack to replace")  # fmt: skip
    if not src.exists():
        raise FileNotFoundError(f"{src}: not found; expected {SOURCES}")
    skips = Skips(on_bad_sample)
    summary: dict = {}

    def samples(counter: list[int]):
        for key, path, meta, record in _source_records(src, skips, allow_outside_paths):
            try:
                ext, data = _image_entry(path)
            except BadSample as err:
                skips.reject(err if record is None else for_record(err, *record), "bad image")
                continue
            counter[0] += 1
            yield {"__key__": key, ext: data, "json": meta}

    def write(tmp: Path) -> None:
        counter = [0]
        files = write_shards(samples(counter), tmp, maxcount=maxcount, prefix=prefix)
        if not counter[0]:
            raise no_records(src, "records with readable images", skips)
        skips.write(tmp)
        summary.update(source=str(src), shards=[str(out / f.name) for f in files], samples=counter[0],
                       skipped={**skips.to_dict(), "file": str(out / SKIPPED_FILE)})  # fmt: skip
        (tmp / PACK_MANIFEST).write_text(json.dumps(summary, indent=2))

    atomic_folder(out, write)
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
                 split_by_worker: bool = True, decode_images: bool = True, on_bad_sample: str = "error"):  # fmt: skip
        self.urls = expand_urls(urls)
        if not self.urls:
            raise FileNotFoundError(f"{urls}: no shards")
        self.shuffle, self.resample, self.seed, self.epoch = shuffle, resample, seed, 0
        self.split_by_node, self.split_by_worker, self.decode_images = split_by_node, split_by_worker, decode_images
        self._rule = Skips(on_bad_sample)  # applies the rule; the skips it keeps are this process's own
        self._counts = multiprocessing.RawArray("q", SKIP_ROWS * len(SKIP_REASONS))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def skips(self) -> Skips:
        """Bad samples skipped so far by this process and its DataLoader workers; the listed
        ones are this process's own (a worker's stay in the worker), the counts cover all."""
        n = len(SKIP_REASONS)
        counts = Counter({r: total for k, r in enumerate(SKIP_REASONS) if (total := sum(self._counts[k::n]))})
        return Skips("skip", counts, list(self._rule.items))

    def _bad(self, reason: str, url, key, problem: str) -> None:
        """Apply the rule to a bad sample: raise, or count it in this process's row of the
        shared counts (workers past 64 share rows) and keep it."""
        err = BadSample(str(url), problem, f"key {key}" if key is not None else "")
        if self._rule.on_bad_sample == "error":
            raise err
        info = get_worker_info()
        row = 0 if info is None else 1 + info.id % (SKIP_ROWS - 1)
        self._counts[row * len(SKIP_REASONS) + SKIP_REASONS.index(reason)] += 1
        self._rule.items.append(Skip(err.where, err.record, reason, problem))

    def _handler(self, exn) -> bool:
        """webdataset's handler for a tar it cannot read (it appends the shard's url to the args)."""
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and ".tar" in a), "a shard")
        self._bad("unreadable tar member", url, None, f"{type(exn).__name__}: {exn}"[:200])
        return True

    def _decode(self, samples):
        for s in samples:
            key, url = s.get("__key__"), s.get("__url__")
            try:
                meta = json.loads(s["json"]) if "json" in s else {}
            except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                self._bad("malformed json", url, key, f"malformed JSON ({err})")
                continue
            if not isinstance(meta, dict):
                self._bad("malformed json", url, key, f"annotations are a {type(meta).__name__}; expected a JSON object")
                continue
            ext = next((k for k in IMAGE_KEYS if k in s), None)
            if ext is None:
                self._bad("no image", url, key, f"no image member; expected one of {', '.join(IMAGE_KEYS)}")
                continue
            image = s[ext]
            if self.decode_images:
                try:
                    image = decode_image(s[ext], str(url), record=f"key {key}")
                except BadSample as err:
                    self._bad("corrupt image", url, key, err.problem)
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
