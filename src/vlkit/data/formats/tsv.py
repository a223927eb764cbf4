"""The TSV-with-base64-images layout of MMBench, MMMU and MathVista (VLMEvalKit's files).

One row per question, tab-separated with a header; ``image`` holds the base64-encoded
image bytes (PNG/JPEG). Multiple choice: ``index, image, question, hint, A, B, C, D,
[E ...], answer (a letter), category, l2-category, split``. Free-form (MathVista):
``index, image, question, answer, question_type, answer_type, precision``. Quoting follows
pandas' default (fields with tabs, quotes or newlines are double-quoted), so files written
by pandas read here and the other way round.

:func:`iter_tsv` streams rows (images are decoded only when asked), naming the file and
line of any malformed row.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image

from vlkit.data.formats.common import BadRecord, FormatError, Skips, no_records, not_utf8
from vlkit.data.images import BadSample, decode_image

OPTION_LETTERS = "ABCDEFGHIJ"
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class TSVRow:
    index: str
    line: int
    fields: dict = field(repr=False)
    path: Path | None = None

    @property
    def question(self) -> str:
        return self.fields.get("question", "")

    @property
    def answer(self) -> str:
        return self.fields.get("answer", "")

    @property
    def options(self) -> dict[str, str]:
        """Non-empty option columns A, B, ... in order."""
        return {k: self.fields[k] for k in OPTION_LETTERS if self.fields.get(k, "") not in ("", None, "nan")}

    def image(self) -> Image.Image:
        """The row's image, decoded; a :class:`BadSample` naming the file and row when it cannot be."""
        data = self.fields.get("image", "")
        where, record = str(self.path), f"line {self.line} (index {self.index})"
        if not data:
            raise BadSample(where, "empty 'image' field; expected base64 image bytes", record)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadSample(where, f"'image' is not valid base64 ({err})", record) from None
        return decode_image(raw, where, record=record)


def encode_image(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_tsv(path: str | Path, rows: Iterable[dict], columns: list[str]) -> Path:
    """Write dict rows (missing keys empty); ``image`` values may be PIL images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            vals = []
            for c in columns:
                v = r.get(c, "")
                if isinstance(v, Image.Image):
                    v = encode_image(v)
                vals.append("" if v is None else str(v))
            w.writerow(vals)
    return path


TSV = "a benchmark TSV (a header row, then one tab-separated row per question)"


def iter_tsv(path: str | Path, required: Iterable[str] = ("index", "question", "answer"), skips: Skips | None = None) -> Iterator[TSVRow]:
    """Stream the rows of a benchmark TSV. A row with the wrong number of fields is a bad
    record (:class:`BadRecord`, or skipped under ``skips``); duplicate ``index`` values, text
    that is not UTF-8 and a file without rows raise :class:`FormatError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected {TSV}")
    skips = skips if skips is not None else Skips()
    seen = set()
    with open(path, encoding="utf-8-sig", newline="") as f:  # pandas' to_csv(encoding="utf-8-sig") starts with a BOM
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader, None)
            if header is None:
                raise FormatError(f"{path}: empty file; expected a header row")
            missing = [c for c in required if c not in header]
            if missing:
                raise FormatError(f"{path}: header lacks column(s) {missing}; has {header}")
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    skips.reject(BadRecord(str(path), f"{len(row)} fields; expected {len(header)} ({', '.join(header)})", f"line {line}"), "bad record")
                    continue
                rec = dict(zip(header, row))
                idx = rec.get("index", str(line))
                if idx in seen:
                    raise FormatError(f"{path}, line {line}: duplicate index {idx!r}; expected each index once")
                seen.add(idx)
                yield TSVRow(idx, line, rec, path)
        except csv.Error as err:
            raise FormatError(f"{path}, line {reader.line_num}: malformed TSV ({err})") from None
        except UnicodeDecodeError:
            raise not_utf8(path, TSV) from None
    if not seen:
        raise no_records(path, TSV, skips)


def read_tsv(path: str | Path, required: Iterable[str] = ("index", "question", "answer"), skips: Skips | None = None) -> list[TSVRow]:
    return list(iter_tsv(path, required, skips))
