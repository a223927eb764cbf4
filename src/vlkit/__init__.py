"""vlkit: vision-language models, end to end, in one small PyTorch codebase."""

__version__ = "0.1.0"

from vlkit.loading import load  # noqa: E402

__all__ = ["load", "__version__"]
