"""VQAv2: a questions JSON and an annotations JSON, images named by COCO id.

Questions: ``{"questions": [{"image_id", "question", "question_id"}]}``.
Annotations: ``{"annotations": [{"question_id", "image_id", "question_type",
"answer_type", "multiple_choice_answer", "answers": [{"answer", "answer_confidence",
"answer_id"} × 10]}]}``. Images: ``image_dir / f"{prefix}{image_id:012d}.{ext}"`` (COCO's
``COCO_val2014_`` prefix). Results: ``[{"question_id", "answer"}]``.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from vlkit.data.formats.common import BadRecord, FormatError, Skips, check_unique, image_path, no_records, optional, require, write_json
from vlkit.data.formats.json_stream import iter_json_array


@dataclass
class VQARecord:
    question_id: int | str
    image_id: int | str
    image: Path
    question: str
    answers: list[str]
    question_type: str = ""
    answer_type: str = ""


def image_name(image_id, prefix: str = "COCO_val2014_", ext: str = "jpg") -> str:
    return f"{prefix}{int(image_id):012d}.{ext}" if isinstance(image_id, int) else f"{prefix}{image_id}.{ext}"


def write_vqav2(questions: str | Path, annotations: str | Path, records: Iterable[VQARecord]) -> None:
    records = list(records)
    write_json(
        questions,
        {"task_type": "Open-Ended", "data_type": "mscoco",
         "questions": [{"image_id": r.image_id, "question": r.question, "question_id": r.question_id} for r in records]},
    )  # fmt: skip
    anns = []
    for r in records:
        anns.append(
            {
                "question_id": r.question_id,
                "image_id": r.image_id,
                "question_type": r.question_type,
                "answer_type": r.answer_type,
                "multiple_choice_answer": max(set(r.answers), key=r.answers.count),
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(r.answers)],
            }
        )
    write_json(annotations, {"annotations": anns})


QUESTIONS = 'a VQAv2 questions JSON ({"questions": [...]})'
ANNOTATIONS = 'a VQAv2 annotations JSON ({"annotations": [...]})'


def iter_vqav2(
    questions: str | Path,
    annotations: str | Path | None = None,
    image_dir: str | Path | None = None,
    prefix: str | None = None,
    ext: str | None = None,
    skips: Skips | None = None,
    allow_outside_paths: bool = False,
) -> Iterator[VQARecord]:
    """Questions joined with their annotations (answers empty when ``annotations`` is None).

    The questions are held; the annotations (the large file, ~300 MB) are streamed, so
    records come in the annotations' order (the questions' order in the official files).
    Image files are ``image_dir / f"{prefix}{image_id:012d}.{ext}"``; when ``prefix``/``ext``
    are not given they are inferred from the file of the first question's image (COCO's
    ``COCO_val2014_``/``jpg`` when the folder does not exist). A bad question or annotation
    raises :class:`BadRecord`, or is skipped with its pair under ``skips``."""
    questions = Path(questions)
    skips = skips if skips is not None else Skips()
    root = Path(image_dir) if image_dir is not None else questions.parent / "images"
    qs, dropped = _read_questions(questions, skips)
    if (prefix is None or ext is None) and qs:
        prefix, ext = _infer_naming(root, qs[0][1]["image_id"], prefix, ext)

    def image(i: int, q: dict) -> Path:
        return image_path(root, image_name(q["image_id"], prefix, ext), questions, f"questions[{i}]", allow_outside_paths)

    n = 0
    if annotations is None:
        for i, q in qs:
            try:
                rec = _record(q, image(i, q))
            except BadRecord as err:
                skips.reject(err, "bad record")
                continue
            n += 1
            yield rec
        if not n:
            raise no_records(questions, QUESTIONS, skips)
        return
    annotations = Path(annotations)
    index = {q["question_id"]: (i, q) for i, q in qs}
    seen = set()
    for k, a in enumerate(iter_json_array(annotations, "annotations", ANNOTATIONS)):
        record = f"annotations[{k}]"
        try:
            require(a, {"question_id": (int, str), "answers": list}, annotations, record)
            if a["question_id"] in seen:
                raise FormatError(f"{annotations}, {record}: duplicate question_id {a['question_id']!r}; expected one annotation per question")
            seen.add(a["question_id"])
            if a["question_id"] in dropped:
                continue  # its question was bad and skipped
            if a["question_id"] not in index:
                raise BadRecord(str(annotations), f"question_id {a['question_id']!r} is not in {questions}", record)
            i, q = index[a["question_id"]]
            rec = _record(q, image(i, q), _answers(a["answers"], annotations, record), _types(a, annotations, record))
        except BadRecord as err:
            skips.reject(err, "bad record")
            if isinstance(a, dict) and isinstance(a.get("question_id"), (int, str)) and a["question_id"] in index:
                seen.add(a["question_id"])  # its question goes with it
            continue
        n += 1
        yield rec
    for i, q in qs:
        if q["question_id"] not in seen:
            skips.reject(BadRecord(str(questions), f"question_id {q['question_id']!r} has no annotation in {annotations}", f"questions[{i}]"), "bad record")
    if not n:
        raise no_records(questions, f"{QUESTIONS} with answers in {annotations}", skips)


def read_vqav2(
    questions: str | Path,
    annotations: str | Path | None = None,
    image_dir: str | Path | None = None,
    prefix: str | None = None,
    ext: str | None = None,
    skips: Skips | None = None,
    allow_outside_paths: bool = False,
) -> list[VQARecord]:
    """All records of :func:`iter_vqav2` as a list."""
    return list(iter_vqav2(questions, annotations, image_dir, prefix, ext, skips, allow_outside_paths))


def _read_questions(path: Path, skips: Skips) -> tuple[list[tuple[int, dict]], set]:
    """``(index, question)`` pairs, checked, with unique ids, held whole because the join looks
    them up; and the ids of bad questions that were skipped (their annotations are dropped)."""
    qs, dropped = [], set()
    for i, q in enumerate(iter_json_array(path, "questions", QUESTIONS)):
        try:
            require(q, {"question_id": (int, str), "image_id": (int, str), "question": str}, path, f"questions[{i}]")
            if not q["question"].strip():
                raise BadRecord(str(path), "a blank question; expected the question's text", f"questions[{i}]")
        except BadRecord as err:
            skips.reject(err, "bad record")
            if isinstance(q, dict) and isinstance(q.get("question_id"), (int, str)):
                dropped.add(q["question_id"])
            continue
        qs.append((i, q))
    check_unique([q["question_id"] for _, q in qs], "question_id", str(path))
    return qs, dropped


def _answers(raw: list, path: Path, record: str) -> list[str]:
    """The human answers of one annotation, checked."""
    answers = []
    for j, x in enumerate(raw):
        if not (isinstance(x, dict) and isinstance(x.get("answer"), str)):
            raise BadRecord(str(path), f"answers[{j}] is {x!r:.60}; expected {{'answer': str, ...}}", record)
        answers.append(x["answer"])
    if not answers:
        raise BadRecord(str(path), "no answers; expected the human answers (10 in VQAv2)", record)
    return answers


def _types(a: dict, path: Path, record: str) -> tuple[str, str]:
    """The annotation's question and answer types (empty when absent)."""
    return optional(a, "question_type", str, "", path, record), optional(a, "answer_type", str, "", path, record)


def _record(q: dict, image: Path, answers: list[str] | None = None, types: tuple[str, str] = ("", "")) -> VQARecord:
    """A question with its answers and the annotation's question/answer types."""
    return VQARecord(q["question_id"], q["image_id"], image, q["question"], answers or [], *types)


def _infer_naming(root: Path, image_id, prefix, ext) -> tuple[str, str]:
    stem = f"{int(image_id):012d}" if isinstance(image_id, int) else str(image_id)
    found = sorted(root.glob(f"*{glob.escape(stem)}.*")) if root.is_dir() and stem and "/" not in stem else []
    if found:
        name = found[0].name
        return (prefix if prefix is not None else name[: name.index(stem)]), (ext if ext is not None else name.rsplit(".", 1)[1])
    return (prefix if prefix is not None else "COCO_val2014_"), (ext if ext is not None else "jpg")


def write_results(path: str | Path, answers: dict) -> Path:
    return write_json(path, [{"question_id": k, "answer": v} for k, v in answers.items()])
