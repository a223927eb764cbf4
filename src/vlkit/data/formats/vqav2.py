"""VQAv2: a questions JSON and an annotations JSON, images named by COCO id.

Questions: ``{"questions": [{"image_id", "question", "question_id"}]}``.
Annotations: ``{"annotations": [{"question_id", "image_id", "question_type",
"answer_type", "multiple_choice_answer", "answers": [{"answer", "answer_confidence",
"answer_id"} × 10]}]}``. Images: ``image_dir / f"{prefix}{image_id:012d}.{ext}"`` (COCO's
``COCO_val2014_`` prefix). Results: ``[{"question_id", "answer"}]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from vlkit.data.formats.common import FormatError, check_unique, require, write_json
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
) -> Iterator[VQARecord]:
    """Questions joined with their annotations (answers empty when ``annotations`` is None).

    The questions are held; the annotations (the large file, ~300 MB) are streamed, so
    records come in the annotations' order (the questions' order in the official files).
    Image files are ``image_dir / f"{prefix}{image_id:012d}.{ext}"``; when ``prefix``/``ext``
    are not given they are inferred from the file of the first question's image (COCO's
    ``COCO_val2014_``/``jpg`` when the folder does not exist)."""
    questions = Path(questions)
    qs = _read_questions(questions)
    root = Path(image_dir) if image_dir is not None else questions.parent / "images"
    if (prefix is None or ext is None) and qs:
        prefix, ext = _infer_naming(root, qs[0]["image_id"], prefix, ext)
    if annotations is None:
        yield from (_record(q, root / image_name(q["image_id"], prefix, ext)) for q in qs)
        return
    annotations = Path(annotations)
    index = {q["question_id"]: i for i, q in enumerate(qs)}
    seen, orphan = set(), []
    for i, a in enumerate(iter_json_array(annotations, "annotations", ANNOTATIONS)):
        where = f"{annotations}, annotations[{i}]"
        require(a, {"question_id": (int, str), "answers": list}, where)
        if a["question_id"] in seen:
            raise FormatError(f"{where}: duplicate question_id {a['question_id']!r}; expected one annotation per question")
        seen.add(a["question_id"])
        answers = _answers(a["answers"], where)
        if a["question_id"] not in index:
            orphan.append(a["question_id"])
            continue
        q = qs[index[a["question_id"]]]
        yield _record(q, root / image_name(q["image_id"], prefix, ext), answers, a)
    if orphan:
        raise FormatError(f"{annotations}: annotations for question_id {orphan[:5]!r} not in {questions}")
    for i, q in enumerate(qs):
        if q["question_id"] not in seen:
            raise FormatError(f"{questions}, questions[{i}]: question_id {q['question_id']!r} has no annotation in {annotations}")


def read_vqav2(
    questions: str | Path,
    annotations: str | Path | None = None,
    image_dir: str | Path | None = None,
    prefix: str | None = None,
    ext: str | None = None,
) -> list[VQARecord]:
    """All records of :func:`iter_vqav2` as a list."""
    return list(iter_vqav2(questions, annotations, image_dir, prefix, ext))


def _read_questions(path: Path) -> list[dict]:
    """The questions, checked, with unique ids; held whole because the join looks them up."""
    qs = []
    for i, q in enumerate(iter_json_array(path, "questions", QUESTIONS)):
        require(q, {"question_id": (int, str), "image_id": (int, str), "question": str}, f"{path}, questions[{i}]")
        qs.append(q)
    check_unique([q["question_id"] for q in qs], "question_id", str(path))
    return qs


def _answers(raw: list, where: str) -> list[str]:
    """The human answers of one annotation, checked."""
    answers = []
    for j, x in enumerate(raw):
        if not (isinstance(x, dict) and isinstance(x.get("answer"), str)):
            raise FormatError(f"{where}.answers[{j}]: expected {{'answer': str, ...}}")
        answers.append(x["answer"])
    if not answers:
        raise FormatError(f"{where}: no answers; expected the human answers (10 in VQAv2)")
    return answers


def _record(q: dict, image: Path, answers: list[str] | None = None, a: dict | None = None) -> VQARecord:
    """A question with its answers and the annotation's question/answer types (empty without one)."""
    a = a or {}
    return VQARecord(q["question_id"], q["image_id"], image, q["question"], answers or [], a.get("question_type", ""), a.get("answer_type", ""))


def _infer_naming(root: Path, image_id, prefix, ext) -> tuple[str, str]:
    stem = f"{int(image_id):012d}" if isinstance(image_id, int) else str(image_id)
    found = sorted(root.glob(f"*{stem}.*")) if root.is_dir() else []
    if found:
        name = found[0].name
        return (prefix if prefix is not None else name[: name.index(stem)]), (ext if ext is not None else name.rsplit(".", 1)[1])
    return (prefix if prefix is not None else "COCO_val2014_"), (ext if ext is not None else "jpg")


def write_results(path: str | Path, answers: dict) -> Path:
    return write_json(path, [{"question_id": k, "answer": v} for k, v in answers.items()])
