"""``vlkit serve``: an OpenAI-compatible HTTP API (chat completions with images, embeddings), the
photo search and the web page (see :mod:`vlkit.serve.app`). Its names are imported on first use:
FastAPI is an optional extra (``vlkit[serve]``), and the command line registers ``vlkit serve``
through this package whether or not it is installed."""

from importlib import import_module

_HOMES = {"create_app": "vlkit.serve.app", "load_models": "vlkit.serve.models", "ServeSettings": "vlkit.serve.settings"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'vlkit.serve' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
