"""Which model made an index: its name, width and a probe embedding, so a search with another
model is refused instead of returning confident nonsense.

The probe is the model's own embedding of a fixed synthetic image (and a fixed text): two
models agree on it only if they compute the same function, whatever folder or layout they were
loaded from, so a copied or converted checkpoint still matches and a retrained one does not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlkit.errors import VlkitError

PROBE_TEXT = "a photo of a red star"
MATCH = 0.99
"""Cosine between probe embeddings above which two models count as the same."""


def probe_image(size: int = 97) -> Image.Image:
    """A fixed, deterministic RGB pattern (gradients and a checker) that any model can embed."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    checker = ((np.floor(x * 6) + np.floor(y * 6)) % 2).astype(np.float32)
    rgb = np.stack([x, y, 0.3 + 0.7 * checker * (1 - x)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


@dataclass
class ModelIdentity:
    name: str
    path: str
    width: int
    probe_image: list[float]
    probe_text: list[float] | None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "ModelIdentity":
        try:
            return cls(str(raw["name"]), str(raw["path"]), int(raw["width"]), [float(v) for v in raw["probe_image"]],
                       None if raw.get("probe_text") is None else [float(v) for v in raw["probe_text"]])  # fmt: skip
        except (KeyError, TypeError, ValueError) as err:
            raise VlkitError(f"{where}: 'model' entry is malformed ({type(err).__name__}: {err}); expected name, path, "
                             "width, probe_image (a list of numbers) and probe_text") from None  # fmt: skip


@torch.no_grad()
def identify(model, path: str | Path) -> ModelIdentity:
    """The identity of a loaded embedding model (one with ``encode_image`` and a processor)."""
    if not callable(getattr(model, "encode_image", None)):
        raise VlkitError(f"{path}: a {type(model).__name__} has no encode_image; a photo index needs an image-text "
                         "embedding model such as CLIP or SigLIP")  # fmt: skip
    device = next(model.parameters()).device
    image = F.normalize(model.encode_image(model.processor.batch([probe_image()]).to(device)).float(), dim=-1)[0]
    text = None
    if getattr(model, "tokenizer", None) and callable(getattr(model, "encode_text", None)):
        tokens = model.tokenizer([PROBE_TEXT])
        feats = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        text = F.normalize(feats.float(), dim=-1)[0].cpu().tolist()
    resolved = Path(path).resolve()
    return ModelIdentity(resolved.name, str(resolved), int(image.numel()), image.cpu().tolist(), text)


def _cosine(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


_ADVICE = "Search with the model that made the index, or build a new index with this model (another --out, or delete this one)"


def check_same(made_by: ModelIdentity, query: ModelIdentity, index: str) -> None:
    """Refuse ``query`` unless it is the model that made the index (same width, same probe embeddings)."""
    if query.width != made_by.width:
        raise VlkitError(f"{index}: made by model {made_by.name!r} ({made_by.path}) with {made_by.width}-wide embeddings; "
                         f"the query model {query.name!r} ({query.path}) gives {query.width}-wide ones. {_ADVICE}")  # fmt: skip
    same = _cosine(made_by.probe_image, query.probe_image) >= MATCH
    if same and made_by.probe_text is not None and query.probe_text is not None:
        same = _cosine(made_by.probe_text, query.probe_text) >= MATCH
    if not same:
        raise VlkitError(f"{index}: made by model {made_by.name!r} ({made_by.path}); the query model {query.name!r} "
                         f"({query.path}) has the same width ({query.width}) but embeds differently (another checkpoint). "
                         f"{_ADVICE}")  # fmt: skip
