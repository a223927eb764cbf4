"""``vlkit serve``: an OpenAI-compatible HTTP API (chat completions with images, embeddings), the
photo search and the web page (see :mod:`vlkit.serve.app`)."""

from vlkit.serve.app import create_app
from vlkit.serve.models import load_models
from vlkit.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "load_models"]
