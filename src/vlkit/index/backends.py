"""Nearest-neighbour search over L2-normalised embeddings: exact (a matrix product) while the
index is small, FAISS beyond ``EXACT_MAX`` vectors.

Exact search reads every vector (2 KiB at width 512) per query, which stays interactive to about
a hundred thousand vectors. Past that the default is ``pq``: a SIMD scan of 4-bit product-quantizer
codes (one code per two dimensions: 128 bytes a vector at width 512) on every thread, whose best
candidates are re-scored exactly. It is still a full scan, but one that needs no neighbourhood
structure in the data: on 1M isotropic vectors (no clusters, the worst case) it reaches recall@10
0.97 in 8 ms a query on two threads where IVF, scanning a quarter of its cells, finds 0.48 of the true
neighbours (``benchmarks/bench_index.py``, benchmarks/RESULTS.md). RaBitQ codes (``rabitq``, the
previous default), IVF-Flat (``ivf``, scans ``nprobe`` of ``sqrt(N)`` k-means cells, sub-linear,
good when embeddings cluster) and HNSW (``hnsw``, slow to build) stay available by name. FAISS is
an optional extra (``vlkit[index]``), imported only when an approximate index is built or loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlkit.errors import VlkitError

EXACT_MAX = 100_000
"""Indexes up to this many vectors are searched exactly; larger ones with PQ codes (``choose_kind``)."""
KINDS = ("auto", "exact", "pq", "rabitq", "ivf", "hnsw")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 256
IVF_NPROBE = 32
RABITQ_BITS = 2
PQ_LISTS = 16
"""The PQ index's k-means lists, all scanned: they let one query's scan run on up to this many threads."""
TRAIN_ROWS = 65_536
"""Vectors sampled to train the codes (16 centroids per sub-quantizer need few)."""
SHORTLIST = 30
"""The code scans re-score their best ``k × SHORTLIST`` candidates exactly (recall@10 0.97 on 1M isotropic)."""
FAISS_FILE = "faiss.index"


def choose_kind(count: int, kind: str = "auto") -> str:
    """The backend for an index of ``count`` vectors: ``kind`` itself unless it is "auto"."""
    if kind not in KINDS:
        raise VlkitError(f"index kind {kind!r}; expected one of {list(KINDS)}")
    if kind != "auto":
        return kind
    return "exact" if count <= EXACT_MAX else "pq"


def require_faiss() -> None:
    """Refuse now, with the fix, where FAISS is missing (an approximate index will need it)."""
    _faiss()


def _faiss():
    try:
        import faiss
    except ImportError:
        raise VlkitError("an approximate photo index needs FAISS: pip install 'vlkit[index]' (faiss-cpu)") from None
    return faiss


def _read(path: Path, count: int):
    """A saved FAISS index, checked to hold ``count`` vectors."""
    try:
        index = _faiss().read_index(str(path))
    except RuntimeError as err:
        raise VlkitError(f"{path}: not a readable FAISS index ({str(err).splitlines()[0]}); rebuild it with vlkit index") from None
    if index.ntotal != count:
        raise VlkitError(f"{path}: holds {index.ntotal} vectors; expected {count}, as many as the index's files")
    return index


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
    def load(cls, path: Path, vectors: np.ndarray) -> "HNSWSearch":
        index = _read(path, len(vectors))
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


def _training_rows(vectors: np.ndarray, seed: int) -> np.ndarray:
    """Up to ``TRAIN_ROWS`` sampled vectors, repeated up to 1024 rows when the index is tiny
    (FAISS's k-means wants 39 points for each of a code book's 16 entries)."""
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), min(len(vectors), TRAIN_ROWS), replace=False))
    return np.ascontiguousarray(np.resize(vectors[rows], (max(len(rows), 1024), vectors.shape[1])))


class ShortlistSearch:
    """A FAISS scan of compact codes whose best ``k × shortlist`` candidates are re-scored exactly
    against the index's own float vectors, so the scores returned are exact inner products."""

    kind = ""
    faiss_type = ""

    def __init__(self, index, vectors: np.ndarray, shortlist: int = SHORTLIST):
        self.index, self.vectors, self.shortlist = index, vectors, shortlist

    @classmethod
    def load(cls, path: Path, vectors: np.ndarray) -> "ShortlistSearch":
        index = _read(path, len(vectors))
        if not isinstance(index, getattr(_faiss(), cls.faiss_type)):
            raise VlkitError(f"{path}: a FAISS {type(index).__name__}; index.json says kind {cls.kind!r}")
        return cls(index, vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.vectors))
        candidates = self.index.search(queries, min(len(self.vectors), k * self.shortlist))[1]
        scores, rows = [], []
        for query, found in zip(queries, candidates):
            found = found[found >= 0]  # FAISS pads a short answer with -1
            exact = self.vectors[found] @ query
            top = np.argsort(-exact, kind="stable")[:k]
            scores.append(exact[top])
            rows.append(found[top])
        n = min(len(r) for r in rows)
        return np.stack([s[:n] for s in scores]), np.stack([r[:n] for r in rows])

    def save(self, folder: Path) -> None:
        """The codes only: the float vectors re-ranked against are the index's own embeddings."""
        _faiss().write_index(self.index, str(folder / FAISS_FILE))


class PQSearch(ShortlistSearch):
    """Every vector scanned as 4-bit product-quantizer codes, one per two dimensions (FAISS
    ``IndexIVFPQFastScan``: a SIMD scan of 16-entry look-up tables), then the shortlist re-scored.

    The ``PQ_LISTS`` k-means lists are all scanned, so recall needs no neighbourhood structure in
    the data; they code each vector's residual from its list's centre (finer where embeddings
    cluster) and split one query's scan across threads (FAISS ``implem`` 14, over lists).
    """

    kind = "pq"
    faiss_type = "IndexIVFPQFastScan"

    def __init__(self, index, vectors: np.ndarray, shortlist: int = SHORTLIST):
        super().__init__(index, vectors, shortlist)
        index.nprobe = index.nlist
        index.implem = 14

    @classmethod
    def build(cls, vectors: np.ndarray, lists: int = PQ_LISTS, seed: int = 0) -> "PQSearch":
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = vectors.shape
        lists = max(1, min(lists, n // 256))  # a list's centre needs a few hundred vectors to train
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQFastScan(quantizer, d, lists, d // 2 if d % 2 == 0 else d, 4, faiss.METRIC_INNER_PRODUCT)
        index.train(_training_rows(vectors, seed))
        index.add(vectors)
        return cls(index, vectors)


class RaBitQSearch(ShortlistSearch):
    """Every vector scanned as a ``bits``-per-dimension RaBitQ code (FAISS
    ``IndexRaBitQFastScan``: a 1-bit SIMD scan, the extra bits for its best candidates) on one
    thread, then the shortlist re-scored: ~150 bytes a vector, 3x slower than ``pq`` at equal recall."""

    kind = "rabitq"
    faiss_type = "IndexRaBitQFastScan"

    @classmethod
    def build(cls, vectors: np.ndarray, bits: int = RABITQ_BITS, seed: int = 0) -> "RaBitQSearch":
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.IndexRaBitQFastScan(vectors.shape[1], faiss.METRIC_INNER_PRODUCT, 32, bits)
        index.train(_training_rows(vectors, seed))  # RaBitQ codes are taken relative to the data's centroid
        index.add(vectors)
        return cls(index, vectors)


SEARCHERS = {"pq": PQSearch, "rabitq": RaBitQSearch, "ivf": IVFSearch, "hnsw": HNSWSearch}


def build(vectors: np.ndarray, kind: str):
    """A searcher of ``kind`` ("exact", "pq", "rabitq", "ivf" or "hnsw") over ``vectors`` ``[N, D]``."""
    return ExactSearch(vectors) if kind == "exact" else SEARCHERS[kind].build(vectors)


def load(folder: Path, vectors: np.ndarray, kind: str):
    """The searcher an index folder holds: exact over ``vectors``, or its saved FAISS index."""
    if kind == "exact":
        return ExactSearch(vectors)
    if kind in SEARCHERS:
        return SEARCHERS[kind].load(folder / FAISS_FILE, vectors)
    raise VlkitError(f"{folder}: index kind {kind!r}; expected one of {['exact', *SEARCHERS]}")
