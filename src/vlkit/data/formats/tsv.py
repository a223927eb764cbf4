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

from vlkit.data.formats.common import FormatError
from vlkit.data.images import BadSample, to_rgb

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
        data = self.fields.get("image", "")
        where = f"{self.path}, line {self.line} (index {self.index})"
        if not data:
            raise BadSample(where, "empty 'image' field; expected base64 image bytes")
        try:
            raw = base64.b64decode(data, validate=True)
            with Image.open(io.BytesIO(raw)) as img:
                img.load()
                return to_rgb(img)
        except (binascii.Error, ValueError) as err:
            raise BadSample(where, f"'image' is not valid base64 ({err})") from None
        except OSError as err:
            raise BadSample(where, f"'image' does not decode as an image ({err})") from None


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


def iter_tsv(path: str | Path, required: Iterable[str] = ("index", "question", "answer")) -> Iterator[TSVRow]:
    """Stream the rows of a benchmark TSV. Duplicate ``index`` values and rows with the
    wrong number of fields raise :class:`FormatError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected a benchmark TSV")
    seen = set()
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise FormatError(f"{path}: empty file; expected a header row") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise FormatError(f"{path}: header lacks column(s) {missing}; has {header}")
        try:
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise FormatError(f"{path}, line {line}: {len(row)} fields; expected {len(header)} ({', '.join(header)})")
                rec = dict(zip(header, row))
                idx = rec.get("index", str(line))
                if idx in seen:
                    raise FormatError(f"{path}, line {line}: duplicate index {idx!r}; expected each index once")
                seen.add(idx)
                yield TSVRow(idx, line, rec, path)
        except csv.Error as err:
            raise FormatError(f"{path}, line {reader.line_num}: malformed TSV ({err})") from None


def read_tsv(path: str | Path, required: Iterable[str] = ("index", "question", "answer")) -> list[TSVRow]:
    return list(iter_tsv(path, required))
