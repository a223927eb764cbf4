"""Photo index: a folder's image embeddings, searched exactly or with FAISS (see :mod:`.photos`)."""

from vlkit.index.photos import PhotoIndex, build_index
from vlkit.index.search import Hit, Searcher

__all__ = ["Hit", "PhotoIndex", "Searcher", "build_index"]
