"""Multiple-choice and numeric answers from free text, deterministically.

Harnesses for MMMU and MMBench fall back to a *random* option when they cannot parse a
model's answer, which makes scores noisy and flattering. :func:`extract_choice` never
guesses: it returns ``None`` when the text does not name exactly one option, and callers
count that as wrong and report how many there were.

Rules, first that applies wins (letters are the option keys, e.g. A-D):

1. The whole answer is a letter, optionally bracketed or followed by ``.``, ``)`` or ``:``
   ("B", "(B)", "B.", "b)").
2. An explicit statement: "answer is B", "answer: (B)", "option B", "choice B",
   "correct answer is B." (case-insensitive for these keywords; the letter must stand alone).
   If several such statements name different letters, the last one wins (models restate
   their final answer last).
3. The answer starts with a marked letter: "B. a red circle", "(B) because ...", "B) ...",
   "B: ...". A bare leading "A" followed by a space is the article, not an option.
4. Exactly one distinct marked letter ("(C)", "C)", "C.") appears anywhere.
5. Option texts: the options whose text appears in the answer (case-insensitive, on word
   boundaries), dropping any whose text is contained in another matched option's text;
   exactly one must remain.

Otherwise ``None``.

:func:`extract_number` and :func:`numeric_match` do the same for free-form numeric answers
(MathVista style): the last number in the text, compared with a tolerance or at the
answer's stated precision.
"""

from __future__ import annotations

import math
import re

_MARK = r"[\(\[]?\s*([A-Z])\s*[\)\]\.:]"


def _letters_re(letters: str) -> str:
    return "[" + re.escape(letters) + "]"


def extract_choice(text: str, options: dict[str, str] | list[str] | None = None, letters: str | None = None) -> str | None:
    """The option letter ``text`` chooses, or ``None`` when it names none or several.

    ``options``: ``{"A": "red", "B": "blue"}`` or a list (lettered A, B, ... in order); used
    for rule 5 and to know the valid letters. ``letters``: the valid letters when no
    option texts are given (default "ABCD").
    """
    if isinstance(options, list):
        options = {chr(ord("A") + i): o for i, o in enumerate(options)}
    if letters is None:
        letters = "".join(sorted(options)) if options else "ABCD"
    letters = letters.upper()
    if text is None:
        return None
    s = text.strip()
    if not s:
        return None
    L = _letters_re(letters)
    # 1. the whole answer is a letter
    m = re.fullmatch(rf"[\(\[]?\s*({L})\s*[\)\]\.:]?", s, flags=re.IGNORECASE)
    if m:
        return m.group(1).upper()
    # 2. explicit statements
    stated = re.findall(
        rf"(?:answer\s*(?:is|:)?|option|choice)\s*(?:is\s*)?:?\s*[\(\[]?\s*({L})(?![A-Za-z0-9])",
        s,
        flags=re.IGNORECASE,
    )
    stated = [x.upper() for x in stated]
    if stated:
        return stated[-1]
    # 3. a marked letter at the start
    m = re.match(rf"[\(\[]\s*({L})\s*[\)\]]|({L})\s*[\)\.:](?![A-Za-z0-9])", s)
    if m:
        return (m.group(1) or m.group(2)).upper()
    # 4. exactly one distinct marked letter anywhere
    marked = set(re.findall(rf"(?<![A-Za-z0-9])[\(\[]\s*({L})\s*[\)\]]", s))
    marked |= set(re.findall(rf"(?<![A-Za-z0-9])({L})[\)](?![A-Za-z0-9])", s))
    if len(marked) == 1:
        return marked.pop()
    if len(marked) > 1:
        return None
    # 5. option texts
    if options:
        low = " ".join(s.lower().split())
        hits = {
            k: " ".join(str(v).lower().split())
            for k, v in options.items()
            if str(v).strip() and re.search(rf"(?<!\w){re.escape(' '.join(str(v).lower().split()))}(?!\w)", low)
        }
        kept = [k for k, v in hits.items() if not any(v != w and v in w for w in hits.values())]
        if len(kept) == 1:
            return kept[0]
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+")


def extract_number(text: str) -> float | None:
    """The last number in ``text`` ("1,234.5", "-3", ".5", "3/4"), or ``None``."""
    if text is None:
        return None
    found = [t for t in _NUMBER.findall(str(text)) if re.search(r"\d", t)]
    if not found:
        return None
    tok = found[-1].replace(",", "")
    try:
        if "/" in tok:
            num, den = tok.split("/")
            return float(num) / float(den) if float(den) != 0 else None
        return float(tok)
    except ValueError:
        return None


def numeric_match(
    prediction: str, answer: float | str, precision: int | None = None, rel_tol: float = 0.0, abs_tol: float = 1e-6
) -> bool | None:
    """Whether the number in ``prediction`` equals ``answer``: rounded to ``precision``
    decimals when given (MathVista's float answers), else within ``max(abs_tol,
    rel_tol·|answer|)``. ``None`` when the prediction holds no number (count it wrong)."""
    got = extract_number(prediction)
    if got is None:
        return None
    want = float(answer) if not isinstance(answer, str) else extract_number(answer)
    if want is None:
        raise ValueError(f"numeric_match: reference answer {answer!r} is not a number")
    if precision is not None:
        return round(got, precision) == round(want, precision)
    return math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol)
