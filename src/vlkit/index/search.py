"""Search a photo index by text or by image with the model that made it; the logic behind
``vlkit search`` and the server's ``POST /v1/search`` (which returns thumbnails as data URLs)."""

from __future__ import annotations

import base64
import io
import mimetypes
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vlkit.data.images import BadSample, load_image
from vlkit.errors import VlkitError
from vlkit.index.photos import PhotoIndex

MAX_K = 100
THUMBNAILS_CACHED = 512


@dataclass(frozen=True)
class Hit:
    path: str  # relative to the indexed folder
    score: float


class Searcher:
    """A loaded index and its model, checked to be the one that made it."""

    def __init__(self, index: PhotoIndex, model, model_path: str | Path):
        index.check_model(model, model_path)
        self.index = index
        self.model = model
        self._paths = {f.path for f in index.files}
        self._thumbs: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, index: str | Path, model: str | Path | None = None) -> "Searcher":
        """The index folder with the model it records (or ``model``, a folder, which must be the same model)."""
        from vlkit.loading import load

        idx = PhotoIndex.load(index)
        path = Path(model) if model is not None else Path(idx.model.path)
        if model is None and not path.exists():
            raise VlkitError(f"{index}: made by the model at {path}, which is gone; give its new place with --model")
        return cls(idx, load(path), path)

    @torch.no_grad()
    def query_vector(self, query: str | None = None, image: Image.Image | None = None) -> torch.Tensor:
        """The L2-normalised embedding ``[1, D]`` of a text or an image query (exactly one)."""
        if (query is None or not str(query).strip()) == (image is None):
            raise VlkitError("a search takes a non-empty text query or an image (exactly one of the two)")
        device = next(self.model.parameters()).device
        if image is not None:
            if not isinstance(image, Image.Image):
                raise VlkitError(f"an image query is a PIL image, got a {type(image).__name__}")
            feats = self.model.encode_image(self.model.processor.batch([image]).to(device))
        else:
            if not getattr(self.model, "tokenizer", None):
                raise VlkitError(f"{self.index.model.path}: the model has no tokenizer, so it cannot embed a text query")
            tokens = self.model.tokenizer([str(query)])
            feats = self.model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return F.normalize(feats.float(), dim=-1).cpu()

    def search(self, query: str | None = None, image: Image.Image | None = None, k: int = 10) -> list[Hit]:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise VlkitError(f"k = {k!r}; expected a whole number from 1 to {MAX_K}")
        hits = self.index.search_vectors(self.query_vector(query, image).numpy(), k)[0]
        return [Hit(p, s) for p, s in hits]

    def search_json(self, query: str | None = None, image: Image.Image | None = None, k: int = 10, thumbnail_px: int = 128) -> dict:
        """The body of ``POST /v1/search``: the index's size, kind and model, and the ranked hits
        with thumbnails as ``data:`` URLs (an image unreadable since indexing gets ``null``)."""
        hits = self.search(query, image, k)
        return {
            "object": "search.results",
            "index": {"size": len(self.index), "kind": self.index.kind, "model": self.index.model.name},
            "results": [{"path": h.path, "score": round(h.score, 6), "thumbnail": self.thumbnail(h.path, thumbnail_px)} for h in hits],
        }

    def resolve(self, rel_path: str) -> Path:
        """The file of an indexed image; anything not in the index is refused (no path escapes)."""
        if rel_path not in self._paths:
            raise VlkitError(f"{rel_path!r} is not an image of the index {self.index.folder}")
        return self.index.images / rel_path

    def thumbnail(self, rel_path: str, px: int = 128) -> str | None:
        key = (rel_path, px)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        try:
            image = load_image(self.resolve(rel_path))
        except BadSample:
            return None
        image.thumbnail((px, px))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        with self._lock:
            self._thumbs[key] = url
            while len(self._thumbs) > THUMBNAILS_CACHED:
                self._thumbs.popitem(last=False)
        return url

    def image_bytes(self, rel_path: str) -> tuple[bytes, str]:
        """``(the file's bytes, its MIME type)`` for an indexed image (``GET /v1/search/image``)."""
        path = self.resolve(rel_path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise VlkitError(f"{path}: cannot be read ({err.strerror}); re-run vlkit index") from None
        return data, mimetypes.guess_type(path.name)[0] or "application/octet-stream"
