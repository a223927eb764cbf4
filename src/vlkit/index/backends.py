"""Nearest-neighbour search over L2-normalised embeddings: exact (a matrix product) while the
index is small, a FAISS inverted-file index (IVF-Flat, inner product) beyond ``EXACT_MAX`` vectors.

Exact search reads every vector per query, which stays interactive to about a hundred
thousand 512-wide vectors. Past that, IVF scans ``nprobe`` of ``sqrt(N)`` k-means cells per
query. IVF rather than HNSW by default because it builds some 30× faster on a CPU (an index is
rebuilt when the folder changes) at the same recall on clustered, photo-like embeddings;
HNSW stays available (``--kind hnsw``). ``benchmarks/bench_index.py`` measures all three.
FAISS is an optional extra (``vlkit[index]``), imported only when an approximate index is
built or loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlkit.errors import VlkitError

EXACT_MAX = 100_000
"""Indexes up to this many vectors are searched exactly; larger ones with FAISS IVF (``choose_kind``)."""
KINDS = ("auto", "exact", "hnsw", "ivf")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 256
IVF_NPROBE = 32
FAISS_FILE = "faiss.index"


def choose_kind(count: int, kind: str = "auto") -> str:
    """The backend for an index of ``count`` vectors: ``kind`` itself unless it is "auto"."""
    if kind not in KINDS:
        raise VlkitError(f"index kind {kind!r}; expected one of {list(KINDS)}")
    if kind != "auto":
        return kind
    return "exact" if count <= EXACT_MAX else "ivf"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise VlkitError("an approximate photo index needs FAISS: pip install 'vlkit[index]' (faiss-cpu)") from None
    return faiss


class ExactSearch:
    """Every vector scored against the query: the reference the approximate index is measured by."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)``, each ``[Q, min(k, N)]``, best first."""
        k = min(k, len(self.vectors))
        scores = queries @ self.vectors.T
        if k < scores.shape[1]:
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)

    def save(self, folder: Path) -> None:
        """Nothing beyond the embeddings themselves."""


class HNSWSearch:
    """FAISS ``IndexHNSWFlat`` with inner product (cosine on unit vectors)."""

    kind = "hnsw"

    def __init__(self, index, ef_search: int = HNSW_EF_SEARCH):
        self.index = index
        self.index.hnsw.efSearch = ef_search

    @classmethod
    def build(cls, vectors: np.ndarray, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION) -> "HNSWSearch":
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index)

    @classmethod
    def load(cls, path: Path, count: int) -> "HNSWSearch":
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise VlkitError(f"{path}: not a readable FAISS index ({str(err).splitlines()[0]}); rebuild it with vlkit index") from None
        if index.ntotal != count:
            raise VlkitError(f"{path}: holds {index.ntotal} vectors; expected {count}, as many as the index's files")
        try:
            return cls(index)
        except AttributeError:
            raise VlkitError(f"{path}: a FAISS {type(index).__name__}; index.json says kind {cls.kind!r}") from None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.index.ntotal)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        keep = rows >= 0  # HNSW may return fewer than k; FAISS pads with -1
        if not keep.all():
            n = int(keep.sum(axis=1).min())
            scores, rows = scores[:, :n], rows[:, :n]
        return scores, rows

    def save(self, folder: Path) -> None:
        _faiss().write_index(self.index, str(folder / FAISS_FILE))


class IVFSearch(HNSWSearch):
    """FAISS ``IndexIVFFlat`` (inner product): ``sqrt(N)`` k-means cells, ``nprobe`` of them
    scanned per query. Builds far faster than HNSW, which matters when an index is rebuilt."""

    kind = "ivf"

    def __init__(self, index, nprobe: int = IVF_NPROBE):
        self.index = index
        self.index.nprobe = nprobe

    @classmethod
    def build(cls, vectors: np.ndarray, nlist: int | None = None, seed: int = 0) -> "IVFSearch":
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        nlist = nlist or max(1, int(np.sqrt(len(vectors))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(vectors.shape[1]), vectors.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(len(vectors), min(len(vectors), 40 * nlist), replace=False)
        index.train(vectors[np.sort(sample)])
        index.add(vectors)
        return cls(index)


SEARCHERS = {"hnsw": HNSWSearch, "ivf": IVFSearch}


def build(vectors: np.ndarray, kind: str):
    """A searcher of ``kind`` ("exact", "hnsw" or "ivf") over ``vectors`` ``[N, D]``."""
    return ExactSearch(vectors) if kind == "exact" else SEARCHERS[kind].build(vectors)


def load(folder: Path, vectors: np.ndarray, kind: str):
    """The searcher an index folder holds: exact over ``vectors``, or its saved FAISS index."""
    if kind == "exact":
        return ExactSearch(vectors)
    if kind in SEARCHERS:
        return SEARCHERS[kind].load(folder / FAISS_FILE, len(vectors))
    raise VlkitError(f"{folder}: index kind {kind!r}; expected one of {['exact', *SEARCHERS]}")
