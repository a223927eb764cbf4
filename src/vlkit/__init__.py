"""vlkit: vision-language models, end to end, in one small PyTorch codebase."""

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def __getattr__(name: str):
    """``vlkit.load``, imported on first use: ``import vlkit`` (and so every command, and its
    --help) starts without importing torch, and Ctrl+C before a command's work begins is a plain
    interruption."""
    if name == "load":
        from vlkit.loading import load

        return load
    raise AttributeError(f"module 'vlkit' has no attribute {name!r}")
