"""The files that travel with a language model's weights: its tokenizer (``tokenizer.json`` and
friends) and its generation defaults (``generation_config.json``), read onto a loaded model and
written back with an exported one."""

from __future__ import annotations

from pathlib import Path

from vlkit.errors import CheckpointError, Missing
from vlkit.lm.generation_config import GenerationConfig
from vlkit.text.lm_tokenizer import LMTokenizer

MODEL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def attach_lm_files(model, folder: str | Path) -> None:
    """Set ``model.tokenizer`` and ``model.generation_config`` from ``folder``: both are read and
    checked before either is set, so a refused folder leaves the model as it was.

    A folder without ``tokenizer.json`` gives :class:`vlkit.errors.Missing` (the first use names the
    folder and the file); a tokenizer with ids past the embedding matrix is refused. Without
    ``generation_config.json`` the defaults take the model config's token ids, as transformers does."""
    folder = Path(folder)
    tokenizer = read_tokenizer(folder)
    if tokenizer:
        check_vocabulary(tokenizer, model.config.vocab_size, folder)
    generation_config = read_generation_config(folder, model.config)
    model.tokenizer = tokenizer
    model.generation_config = generation_config


def read_tokenizer(folder: Path) -> LMTokenizer | Missing:
    if not (folder / "tokenizer.json").is_file():
        return Missing(folder, "tokenizer.json", "tokenizer")
    return LMTokenizer.from_folder(folder)


def check_vocabulary(tokenizer: LMTokenizer, embedding_rows: int, folder: Path) -> None:
    """Every id the tokenizer can produce needs a row of the embedding matrix (more rows are fine:
    checkpoints often pad the matrix to a multiple of 64)."""
    if tokenizer.vocab_size > embedding_rows:
        raise CheckpointError(
            f"{folder / 'tokenizer.json'} (with tokenizer_config.json's added tokens) has ids up to "
            f"{tokenizer.vocab_size - 1}, a vocabulary of {tokenizer.vocab_size}, but the model's embedding matrix "
            f"has {embedding_rows} rows (vocab_size in {folder / 'config.json'}); the tokenizer does not belong to "
            "these weights"
        )


def read_generation_config(folder: Path, model_config) -> GenerationConfig:
    path = folder / "generation_config.json"
    if path.is_file():
        return GenerationConfig.from_file(path)
    ids = {k: getattr(model_config, k) for k in MODEL_TOKEN_IDS if getattr(model_config, k, None) is not None}
    return GenerationConfig().updated(ids, where=str(folder / "config.json"))


def write_lm_files(model, folder: str | Path) -> None:
    """Write ``model``'s tokenizer (when it has one) and generation defaults into ``folder``, as
    transformers does: ``generation_config.json`` holds the values that differ from the defaults."""
    if getattr(model, "tokenizer", None):  # None, or Missing
        model.tokenizer.save(folder)
    if getattr(model, "generation_config", None):
        model.generation_config.save(folder)
