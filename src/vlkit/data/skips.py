"""The one rule for a bad record, whichever command reads it (training, evaluation, packing),
and the record of the records it skipped.

A bad record is one that cannot be used: malformed JSON on its line, a key missing or of the
wrong type, no caption, an image path outside the dataset folder, an image that is missing,
corrupt, truncated or too large. ``on_bad_sample="error"`` (the default) stops at the first
with its error; ``"skip"`` leaves it out and keeps ``(source, record, reason)``, which
:meth:`Skips.write` puts in ``skipped.jsonl``. Blank lines, hidden files and folders, and files
that are not images in a class folder are not records: they are passed over. Faults of a
whole file (missing, not UTF-8, not JSON, duplicate ids, no records at all) always stop.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlkit.errors import VlkitError

ON_BAD_SAMPLE = ("error", "skip")
SKIPPED_FILE = "skipped.jsonl"
EXAMPLES = 5


@dataclass(frozen=True)
class Skip:
    """One skipped record: the file (or shard) holding it, which record (``"line 3"``,
    ``"images[4]"``; empty for an image file of its own), why, and the full message."""

    source: str
    record: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.source}, {self.record}" if self.record else self.source
        return f"{where}: {self.detail or self.reason}"


def check_rule(value, key: str = "on_bad_sample") -> str:
    """``value`` if it is a rule this module knows, else a :class:`VlkitError` naming ``key``."""
    if value not in ON_BAD_SAMPLE:
        raise VlkitError(f"{key} must be one of {list(ON_BAD_SAMPLE)}, got {value!r}")
    return value


@dataclass
class Skips:
    """Applies the rule to bad records and keeps every skipped one (:class:`Skip`), with counts
    by reason. ``Skips()`` stops at the first bad record; ``Skips("skip")`` skips them. (The
    counts may cover more than ``items``: a shard stream's workers share only their counts.)"""

    on_bad_sample: str = "error"
    counts: Counter = field(default_factory=Counter)
    items: list[Skip] = field(default_factory=list)

    def __post_init__(self):
        check_rule(self.on_bad_sample)

    def add(self, reason: str, source, record: str = "", detail: str = "") -> Skip:
        """Record a skip the caller decided on."""
        skip = Skip(str(source), record, reason, detail)
        self.extend([skip])
        return skip

    def extend(self, skips) -> None:
        """Record skips made elsewhere (a DataLoader worker's, carried in its batches)."""
        for skip in skips:
            self.counts[skip.reason] += 1
            self.items.append(skip)

    def reject(self, err: VlkitError, reason: str, source=None, record: str | None = None) -> None:
        """Apply the rule to the bad record ``err`` describes: raise it, or skip and record it.
        ``source``/``record`` default to the error's own (:class:`~vlkit.data.images.BadSample`)."""
        if self.on_bad_sample == "error":
            raise err
        source = source if source is not None else getattr(err, "where", "")
        record = record if record is not None else getattr(err, "record", "")
        self.add(reason, source, record, getattr(err, "problem", str(err)))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def examples(self) -> dict[str, list[str]]:
        """A few skipped records per reason, for a summary."""
        out: dict[str, list[str]] = {}
        for skip in self.items:
            if len(out.setdefault(skip.reason, [])) < EXAMPLES:
                out[skip.reason].append(str(skip))
        return out

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}

    def write(self, folder: str | Path) -> Path:
        """Every skipped record as a line of ``folder/skipped.jsonl``; returns its path."""
        path = Path(folder) / SKIPPED_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for skip in self.items:
                f.write(json.dumps(asdict(skip)) + "\n")
        return path
