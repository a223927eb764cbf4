"""Generative tasks — caption, vqa, grounding, mcq — scored from a model's ``generate`` or
from a predictions file (``vlkit eval TASK --predictions FILE --data PATH``).

A model supports these tasks when it has::

    generate(images: list[PIL.Image.Image], prompts: list[str], max_new_tokens: int) -> list[str]

Data per task (``--data``):

- caption: a Karpathy-layout COCO captions JSON, or a folder holding ``captions_karpathy.json``;
- vqa: a folder with VQAv2 ``*questions*.json`` and ``*annotations*.json`` (+ ``images/``);
- grounding: a RefCOCO-style folder (``refs.json``, ``instances.json``, ``images/``);
- mcq: an MMBench/MMMU-style TSV (option columns A, B, ...: letter answers) or a
  MathVista-style TSV (no option columns: numeric answers compared with a tolerance).

Predictions files: JSONL with one ``{"id": ..., "prediction": "..."}`` per line, or the
field's JSON result lists (``[{"image_id", "caption"}]`` for COCO, ``[{"question_id",
"answer"}]`` for VQAv2), or a JSON object ``{id: text}``. Ids are matched as strings.

Bad input: malformed records, duplicate ids and predictions for ids not in the data raise
an error naming the file and record. Data records without a prediction are scored as an
empty answer (wrong) and counted (``missing_predictions``); empty predictions, unparseable
answers and boxes, and images that cannot be loaded are counted in ``results.json``.

Each run writes ``results.json``, ``predictions.jsonl`` (per sample: prediction, targets,
scores) and ``report.md`` with PNG plots.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vlkit.data.formats.common import FormatError, Skips, read_json

TASKS = ("caption", "vqa", "grounding", "mcq")
CAPTION_PROMPT = "Describe the image."
VQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."
GROUNDING_PROMPT = "Give the bounding box of: {text}"
MCQ_PROMPT = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."
NUMERIC_PROMPT = "{question}\nAnswer with a number."


@dataclass
class Sample:
    id: str
    prompt: str
    target: dict
    image: Callable | None = None  # () -> PIL image (may raise BadSample)
    group: str = ""  # question type / category, for per-group accuracy
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- data
def _find(folder: Path, pattern: str, what: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder}: expected exactly one {what} ({pattern}), found {[p.name for p in found]}")
    return found[0]


def _image_loader(path: Path):
    from vlkit.data.images import load_image

    return lambda: load_image(path)


def load_samples(task: str, data: str | Path, split: str | None = None) -> list[Sample]:
    """The samples of ``task`` in ``data``; ``split`` filters COCO/RefCOCO splits."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    data = Path(data)
    if task == "caption":
        from vlkit.data.formats.coco import read_karpathy

        path = data if data.is_file() else _find(data, "captions_karpathy.json", "Karpathy captions JSON")
        recs = read_karpathy(path, split=split)
        return [Sample(str(r.id), CAPTION_PROMPT, {"references": r.captions}, _image_loader(r.image)) for r in recs]
    if task == "vqa":
        from vlkit.data.formats.vqav2 import read_vqav2

        q = _find(data, "*questions*.json", "VQAv2 questions JSON")
        a = _find(data, "*annotations*.json", "VQAv2 annotations JSON")
        recs = read_vqav2(q, a)
        return [
            Sample(str(r.question_id), VQA_PROMPT.format(question=r.question), {"answers": r.answers},
                   _image_loader(r.image), r.question_type or r.answer_type, {"question": r.question, "answer_type": r.answer_type})
            for r in recs
        ]  # fmt: skip
    if task == "grounding":
        from vlkit.data.formats.refcoco import read_refcoco

        recs = read_refcoco(data, split=split)
        return [
            Sample(r.id, GROUNDING_PROMPT.format(text=r.text), {"box": list(r.box), "width": r.width, "height": r.height},
                   _image_loader(r.image), meta={"text": r.text})
            for r in recs
        ]  # fmt: skip
    from vlkit.data.formats.tsv import iter_tsv

    path = data if data.is_file() else _find(data, "*.tsv", "benchmark TSV")
    out = []
    for row in iter_tsv(path):
        opts = row.options
        if opts:
            if row.answer.strip().upper() not in opts:
                raise FormatError(f"{path}, line {row.line} (index {row.index}): answer {row.answer!r}; expected one of the option letters {sorted(opts)}")
            text = "\n".join(f"{k}. {v}" for k, v in opts.items())
            q = (row.fields.get("hint", "") + "\n" + row.question).strip() if row.fields.get("hint") not in (None, "", "nan") else row.question
            target = {"answer": row.answer.strip().upper(), "options": opts}
            prompt = MCQ_PROMPT.format(question=q, options=text)
        else:
            prec = row.fields.get("precision", "")
            target = {"answer": row.answer, "numeric": True, "precision": int(float(prec)) if prec not in ("", "nan") else None}
            prompt = NUMERIC_PROMPT.format(question=row.question)
        out.append(Sample(str(row.index), prompt, target, row.image, row.fields.get("category", "") or row.fields.get("question_type", "")))
    return out


# ---------------------------------------------------------------- predictions
_ID_KEYS = ("id", "question_id", "image_id", "index", "sample_id")
_TEXT_KEYS = ("prediction", "answer", "caption", "text", "response")


def _pick(rec: dict, keys, where: str, what: str):
    for k in keys:
        if k in rec:
            return rec[k]
    raise FormatError(f"{where}: no {what} key; expected one of {list(keys)}")


def read_predictions(path: str | Path) -> dict[str, str]:
    """``{id (as str): prediction}`` from a JSONL or JSON predictions file (see module doc)."""
    from vlkit.data.formats.common import iter_jsonl

    path = Path(path)
    items: list[tuple[str, object, object]] = []
    if path.suffix == ".jsonl":
        for line, rec in iter_jsonl(path, '{"id": ..., "prediction": "..."}'):
            where = f"{path}, line {line}"
            items.append((where, _pick(rec, _ID_KEYS, where, "id"), _pick(rec, _TEXT_KEYS, where, "prediction")))
    else:
        data = read_json(path, 'a JSON list of {"id", "prediction"} records or an object {id: prediction}')
        if isinstance(data, dict):
            items = [(f"{path}, key {k!r}", k, v) for k, v in data.items()]
        elif isinstance(data, list):
            for i, rec in enumerate(data):
                where = f"{path}, record {i}"
                if not isinstance(rec, dict):
                    raise FormatError(f"{where}: a {type(rec).__name__}; expected an object")
                items.append((where, _pick(rec, _ID_KEYS, where, "id"), _pick(rec, _TEXT_KEYS, where, "prediction")))
        else:
            raise FormatError(f"{path}: a {type(data).__name__}; expected a list or an object")
    out: dict[str, str] = {}
    for where, k, v in items:
        if v is None:
            v = ""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise FormatError(f"{where}: prediction is {type(v).__name__}; expected a string")
        key = str(k)
        if key in out:
            raise FormatError(f"{where}: duplicate id {key!r}; expected one prediction per id")
        out[key] = v
    return out


# ---------------------------------------------------------------- scoring
def score(task: str, samples: list[Sample], predictions: dict[str, str], source: str = "", box_format: str = "pixels") -> tuple[dict, list[dict]]:
    """``(results, per-sample rows)`` for predictions keyed by sample id (str)."""
    ids = {s.id for s in samples}
    if len(ids) != len(samples):
        raise FormatError("data: duplicate sample ids")
    extra = [k for k in predictions if k not in ids]
    if extra:
        raise FormatError(
            f"{source or 'predictions'}: {len(extra)} prediction id(s) not in the data, e.g. {extra[:5]!r}; "
            "expected ids of the data's records (question_id / image id / ref_id:sent_id / index)"
        )
    missing = [s.id for s in samples if s.id not in predictions]
    preds = {s.id: predictions.get(s.id, "") for s in samples}
    counts = {
        "samples": len(samples),
        "missing_predictions": len(missing),
        "empty_predictions": sum(1 for s in samples if s.id in predictions and not predictions[s.id].strip()),
    }
    results, rows = globals()[f"_score_{task}"](samples, preds, box_format)
    results = {"task": task, **results, "counts": {**counts, **results.pop("counts", {})}}
    if missing:
        results["counts"]["missing_examples"] = missing[:5]
    return results, rows


def _per_group(samples, values) -> dict:
    groups = defaultdict(list)
    for s, v in zip(samples, values):
        groups[s.group or "all"].append(v)
    return {g: sum(v) / len(v) for g, v in sorted(groups.items())}


def _score_caption(samples, preds, box_format):
    from vlkit.eval.metrics import caption_metrics

    refs = {s.id: s.target["references"] for s in samples}
    corpus, per = caption_metrics(preds, refs)
    rows = [{"id": s.id, "prediction": preds[s.id], "references": refs[s.id], **per[s.id]} for s in samples]
    return {**corpus}, rows


def _score_vqa(samples, preds, box_format):
    from vlkit.eval.metrics import normalize_answer, vqa_accuracy

    accs = [vqa_accuracy(preds[s.id], s.target["answers"]) for s in samples]
    rows = [{"id": s.id, "question": s.meta.get("question", ""), "prediction": preds[s.id], "normalized": normalize_answer(preds[s.id]),
             "answers": s.target["answers"], "type": s.group, "accuracy": a} for s, a in zip(samples, accs)]  # fmt: skip
    by_answer = defaultdict(list)
    for s, a in zip(samples, accs):
        by_answer[s.meta.get("answer_type") or "all"].append(a)
    return {
        "accuracy": sum(accs) / len(accs) if accs else 0.0,
        "accuracy_per_question_type": _per_group(samples, accs),
        "accuracy_per_answer_type": {k: sum(v) / len(v) for k, v in sorted(by_answer.items())},
    }, rows


def _score_grounding(samples, preds, box_format):
    from vlkit.eval.metrics import grounding_accuracy, parse_box

    boxes, targets = [], []
    for s in samples:
        w, h = s.target["width"] or 1, s.target["height"] or 1
        boxes.append(parse_box(preds[s.id], box_format, w, h))
        targets.append(s.target["box"])
    g = grounding_accuracy(boxes, targets)
    rows = [{"id": s.id, "text": s.meta.get("text", ""), "prediction": preds[s.id], "box": list(b) if b else None,
             "target": t, "iou": i, "hit": i >= 0.5} for s, b, t, i in zip(samples, boxes, targets, g["ious"])]  # fmt: skip
    return {"acc@0.5": g["acc@0.5"], "mean_iou": g["mean_iou"], "box_format": box_format, "counts": {"unparsed_boxes": g["unparsed"]}}, rows


def _score_mcq(samples, preds, box_format):
    from vlkit.eval.metrics import extract_choice, extract_number, numeric_match

    correct, rows, unparsed = [], [], 0
    for s in samples:
        t, p = s.target, preds[s.id]
        if t.get("numeric"):
            ok = numeric_match(p, t["answer"], precision=t.get("precision"), rel_tol=1e-6)
            parsed = extract_number(p)
        else:
            parsed = extract_choice(p, t["options"])
            ok = None if parsed is None else parsed == t["answer"]
        unparsed += ok is None
        correct.append(1.0 if ok else 0.0)
        rows.append({"id": s.id, "kind": "numeric" if t.get("numeric") else "choice", "prediction": p, "parsed": parsed,
                     "answer": t["answer"], "category": s.group, "correct": bool(ok)})  # fmt: skip
    return {
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "accuracy_per_category": _per_group(samples, correct),
        "counts": {"unparsed_answers": unparsed},
        "unparsed_policy": "an answer naming no single option (or no number) is wrong; never a random choice",
    }, rows


# ---------------------------------------------------------------- runs
def _write(out: Path, results: dict, rows: list[dict], samples: list[Sample]) -> None:
    from vlkit.eval.report import write_task_report

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
    write_task_report(out, results, rows, samples)


def score_predictions_file(task: str, predictions: str | Path, data: str | Path, out: str | Path | None = None,
                           split: str | None = None, box_format: str = "pixels") -> dict:  # fmt: skip
    """``vlkit eval TASK --predictions FILE --data PATH [--split S] [--box-format F] --out DIR``."""
    samples = load_samples(task, data, split)
    preds = read_predictions(predictions)
    results, rows = score(task, samples, preds, str(predictions), box_format)
    results = {**results, "data": str(data), "predictions_file": str(predictions)}
    if out is not None:
        _write(Path(out), results, rows, samples)
    return results


def generate_predictions(model, samples: list[Sample], batch_size: int = 16, max_new_tokens: int = 32, skips: Skips | None = None) -> dict[str, str]:
    """Run ``model.generate`` over the samples in batches with a progress bar; images that
    cannot be loaded are skipped and counted in ``skips`` (and scored as missing)."""
    from tqdm import tqdm

    from vlkit.data.images import BadSample

    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"{type(model).__name__} has no generate(images, prompts, max_new_tokens) method; it cannot run generative tasks")
    skips = skips if skips is not None else Skips()
    out: dict[str, str] = {}
    bar = tqdm(total=len(samples), desc="generate", unit="sample")
    for i in range(0, len(samples), batch_size):
        batch, images = [], []
        for s in samples[i : i + batch_size]:
            try:
                images.append(s.image())
                batch.append(s)
            except BadSample as err:
                skips.add("bad image", str(err))
        if batch:
            texts = model.generate(images, [s.prompt for s in batch], max_new_tokens=max_new_tokens)
            if len(texts) != len(batch):
                raise RuntimeError(f"generate returned {len(texts)} texts for {len(batch)} prompts")
            out.update({s.id: t for s, t in zip(batch, texts)})
        bar.update(len(samples[i : i + batch_size]))
    bar.close()
    return out


def run_generative(task: str, model, data: str | Path, out: str | Path | None = None, batch_size: int = 16,
                   split: str | None = None, box_format: str = "pixels", max_new_tokens: int = 32) -> dict:  # fmt: skip
    """``vlkit eval TASK --model DIR --data PATH``: generate, score, write the report."""
    samples = load_samples(task, data, split)
    skips = Skips()
    preds = generate_predictions(model, samples, batch_size, max_new_tokens, skips)
    results, rows = score(task, samples, preds, "model", box_format)
    results = {**results, "data": str(data), "skipped": skips.to_dict()}
    if out is not None:
        _write(Path(out), results, rows, samples)
    return results
