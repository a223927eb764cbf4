"""vlkit's own error type: every error a user can cause by a bad file, record, key or argument
is a :class:`VlkitError` whose message names the file, record or key and says what was expected."""

from __future__ import annotations


class VlkitError(ValueError):
    """Bad input named in the message. A ``ValueError`` so callers that caught those still do."""


class ConfigError(VlkitError):
    """A config, recipe or ``--key=value`` override with an unknown key or a value of the wrong
    type or range. ``keys`` are the dotted paths at fault (without the root name), where known."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = keys


class CheckpointError(VlkitError):
    """A checkpoint that cannot be loaded exactly; the message names the file and the key."""


class MissingPart(VlkitError):
    """A model folder lacks a file that a use of the model needs (``tokenizer.json``, ...)."""


class Missing:
    """Stands in for a part a model folder lacks (a tokenizer, the image preprocessing): the
    model loads, and the first use of the part raises :class:`MissingPart` naming the folder
    and the file it wanted."""

    def __init__(self, folder, filename: str, part: str):
        self._message = f"{folder}: no {filename}; this model folder has no {part}, which this use needs"

    def __bool__(self) -> bool:
        return False

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingPart(self._message)

    def __call__(self, *args, **kwargs):
        raise MissingPart(self._message)

    def __repr__(self) -> str:
        return f"Missing({self._message!r})"
