"""What a generation does: the fields of transformers' ``GenerationConfig`` that vlkit's engine
supports, with the same defaults, read from a model folder's ``generation_config.json``."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from vlkit.config import field_types
from vlkit.errors import VlkitError

EarlyStopping = typing.Union[bool, str]


@dataclass
class GenerationConfig:
    """Defaults are transformers' (``top_k=50``, ...), so a folder's ``generation_config.json``
    means here what it means there. The length: ``max_new_tokens`` when set, else ``max_length``
    (prompt + new tokens) when set, else 20 new tokens (transformers' default ``max_length=20``
    means the same). Sampling fields act only with ``do_sample``."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: str | list[str] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> "GenerationConfig":
        """Read ``generation_config.json``: unknown keys (``transformers_version``, ...) are ignored,
        ``null`` keeps the default, a bad type or value is a :class:`VlkitError` naming file and key."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as err:
            raise VlkitError(f"{path}: cannot read the generation config ({err.strerror})") from err
        except json.JSONDecodeError as err:
            raise VlkitError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise VlkitError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        return cls().updated(values, where=str(path))

    def save(self, folder: str | Path) -> None:
        """Write ``folder/generation_config.json`` with the values that differ from the defaults, as
        transformers does."""
        defaults = GenerationConfig()
        values = {k: v for k, v in dataclasses.asdict(self).items() if v != getattr(defaults, k)}
        (Path(folder) / "generation_config.json").write_text(json.dumps(values, indent=2) + "\n")

    def updated(self, values: dict, where: str = "generate()") -> "GenerationConfig":
        """A copy with ``values`` set (each checked), then the whole checked; ``where`` names the
        source (a file, or the call) in errors."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise VlkitError(f"{where}: unknown generation option(s) {unknown}; expected some of {sorted(fields)}")
        hints = field_types(type(self))
        checked = {k: _coerce(hints[k], v, f"{where}: {k}") for k, v in values.items()}
        cfg = dataclasses.replace(self, **checked)
        cfg.check(where)
        return cfg

    @property
    def eos_ids(self) -> list[int]:
        """The EOS ids as a list (empty when none)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def stops(self) -> list[str]:
        """The stop strings as a list (empty when none)."""
        if self.stop_strings is None:
            return []
        return [self.stop_strings] if isinstance(self.stop_strings, str) else list(self.stop_strings)

    def check(self, where: str = "generate()") -> None:
        """Refuse values no generation can use, naming the key, the value and what was expected."""

        def bad(key: str, expected: str) -> VlkitError:
            return VlkitError(f"{where}: {key}={getattr(self, key)!r}; expected {expected}")

        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise bad("max_new_tokens", "a positive number of tokens to generate")
        if self.max_length is not None and self.max_length <= 0:
            raise bad("max_length", "a positive total length (prompt + new tokens)")
        if self.min_new_tokens < 0:
            raise bad("min_new_tokens", "0 or more")
        if self.do_sample and not self.temperature > 0:
            raise bad("temperature", "a temperature > 0 when sampling (do_sample=False for greedy decoding)")
        if self.top_k < 0:
            raise bad("top_k", "0 (off) or a positive number of tokens")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "a probability mass in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise bad("min_p", "a fraction in [0, 1] of the top token's probability")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "a factor > 0 (1.0 is off)")
        if self.no_repeat_ngram_size < 0:
            raise bad("no_repeat_ngram_size", "0 (off) or an n-gram size")
        if self.num_beams < 1:
            raise bad("num_beams", "1 or more beams")
        if self.early_stopping not in (True, False, "never"):
            raise bad("early_stopping", 'True, False or "never"')
        if self.num_return_sequences < 1:
            raise bad("num_return_sequences", "1 or more")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise VlkitError(
                f"{where}: num_return_sequences={self.num_return_sequences} is more than num_beams="
                f"{self.num_beams}; beam search returns at most one sequence per beam"
            )
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences != 1:
            raise bad("num_return_sequences", "1 for greedy decoding (sample or use beams for more)")
        if any(i < 0 for i in self.eos_ids):
            raise bad("eos_token_id", "token ids >= 0")
        for key in ("pad_token_id", "bos_token_id"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise bad(key, "a token id >= 0")
        if any(not s for s in self.stops):
            raise bad("stop_strings", "non-empty strings")


def _coerce(tp, value, where: str):
    """``value`` as the annotated type ``tp`` (ints may stand for floats; nothing else converts)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        for option in options:
            try:
                return _coerce(option, value, where)
            except VlkitError:
                continue
        raise VlkitError(f"{where}={value!r}; expected {' or '.join(_name(o) for o in options)}")
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise VlkitError(f"{where}={value!r}; expected {_name(tp)}")
        return [_coerce(item, v, where) for v in value]
    if tp is str and isinstance(value, str):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise VlkitError(f"{where}={value!r}; expected {_name(tp)}")


def _name(tp) -> str:
    if typing.get_origin(tp) is list:
        return f"a list of {_name(typing.get_args(tp)[0])}s".replace(" an ", " ").replace(" a ", " ")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]
