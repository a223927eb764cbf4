"""Generative tasks — caption, vqa, grounding, mcq — scored from a model's ``generate`` or
from a predictions file (``vlkit eval TASK --predictions FILE --data PATH``).

A model supports these tasks when it has::

    generate(images: list[PIL.Image.Image], prompts: list[str], max_new_tokens: int) -> list[str]

A loaded vision-language model (LLaVA) meets it through its processor (:func:`answerer`): each
prompt a user turn after its image, rendered by the model's template, batches left-padded. A
BLIP-2 model is asked its own prompts instead (:func:`blip2_prompt`: "a photo of" for captions,
"Question: {} Short answer:" for VQA), without a template.

Data per task (``--data``):

- caption: a Karpathy-layout COCO captions JSON, or a folder holding ``captions_karpathy.json``;
- vqa: a folder with VQAv2 ``*questions*.json`` and ``*annotations*.json`` (+ ``images/``);
- grounding: a RefCOCO-style folder (``refs.json``, ``instances.json``, ``images/``);
- mcq: an MMBench/MMMU-style TSV (option columns A, B, ...: letter answers) or a
  MathVista-style TSV (no option columns: numeric answers compared with a tolerance).

Predictions files: JSONL with one ``{"id": ..., "prediction": "..."}`` per line, or the
field's JSON result lists (``[{"image_id", "caption"}]`` for COCO, ``[{"question_id",
"answer"}]`` for VQAv2), or a JSON object ``{id: text}``. Ids are matched as strings.

Bad input: a predictions file that is empty, not UTF-8 or not JSON, a record whose id or
prediction has the wrong JSON type, duplicate ids and predictions for ids not in the data
raise an error naming the file and record (once bad data records were skipped, predictions for
ids the data no longer has are counted instead: ``predictions_without_data``). Bad data records and images that cannot be
loaded follow the bad-record rule of :mod:`vlkit.data.skips` (stop, or skip and list in
``skipped.jsonl``). Data records without a prediction are scored as an empty answer (wrong)
and counted (``missing_predictions``); empty predictions and unparseable answers and boxes
are counted in ``results.json``.

Each run writes ``results.json``, ``predictions.jsonl`` (per sample: prediction, targets,
scores) and ``report.md`` with PNG plots.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vlkit.data.formats.common import BadRecord, FormatError, read_json
from vlkit.data.skips import Skips
from vlkit.errors import VlkitError

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


def _image_loader(path: Path, where, record: str):
    """The sample's image, loaded when asked for; a failure names the data file and the record first."""
    from vlkit.data.images import load_record_image

    return lambda: load_record_image(path, where, record)


def load_samples(task: str, data: str | Path, split: str | None = None, skips: Skips | None = None) -> list[Sample]:
    """The samples of ``task`` in ``data``; ``split`` filters COCO/RefCOCO splits; bad records
    stop, or are skipped into ``skips`` (:mod:`vlkit.data.skips`)."""
    samples = _load_samples(task, Path(data), split, skips if skips is not None else Skips())
    if not samples:
        raise VlkitError(f"{data}: no {task} samples{f' in split {split!r}' if split else ''}")
    return samples


def _load_samples(task: str, data: Path, split: str | None, skips: Skips) -> list[Sample]:
    if task not in TASKS:
        raise VlkitError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == "caption":
        from vlkit.data.formats.coco import read_karpathy

        path = data if data.is_file() else _find(data, "captions_karpathy.json", "Karpathy captions JSON")
        recs = read_karpathy(path, split=split, skips=skips)
        return [Sample(str(r.id), CAPTION_PROMPT, {"references": r.captions}, _image_loader(r.image, path, f"image id {r.id}"))
                for r in recs]  # fmt: skip
    if task == "vqa":
        from vlkit.data.formats.vqav2 import read_vqav2

        q = _find(data, "*questions*.json", "VQAv2 questions JSON")
        a = _find(data, "*annotations*.json", "VQAv2 annotations JSON")
        recs = read_vqav2(q, a, skips=skips)
        return [
            Sample(str(r.question_id), VQA_PROMPT.format(question=r.question), {"answers": r.answers},
                   _image_loader(r.image, q, f"question_id {r.question_id}"), r.question_type or r.answer_type,
                   {"question": r.question, "answer_type": r.answer_type})
            for r in recs
        ]  # fmt: skip
    if task == "grounding":
        from vlkit.data.formats.refcoco import read_refcoco

        recs = read_refcoco(data, split=split, skips=skips)
        return [
            Sample(r.id, GROUNDING_PROMPT.format(text=r.text), {"box": list(r.box), "width": r.width, "height": r.height},
                   _image_loader(r.image, data, f"ref {r.id}"), meta={"text": r.text})
            for r in recs
        ]  # fmt: skip
    from vlkit.data.formats.tsv import iter_tsv

    path = data if data.is_file() else _find(data, "*.tsv", "benchmark TSV")
    out = []
    for row in iter_tsv(path, skips=skips):
        try:
            out.append(_tsv_sample(row, path))
        except BadRecord as err:
            skips.reject(err, "bad record")
    return out


def _tsv_sample(row, path: Path) -> Sample:
    """A benchmark TSV row (MMBench's multiple choice, or MathVista's numeric answer) as a sample."""
    where = f"line {row.line} (index {row.index})"
    opts = row.options
    if opts:
        if row.answer.strip().upper() not in opts:
            raise BadRecord(str(path), f"answer {row.answer!r}; expected one of the option letters {sorted(opts)}", where)
        text = "\n".join(f"{k}. {v}" for k, v in opts.items())
        q = (row.fields.get("hint", "") + "\n" + row.question).strip() if row.fields.get("hint") not in (None, "", "nan") else row.question
        target = {"answer": row.answer.strip().upper(), "options": opts}
        prompt = MCQ_PROMPT.format(question=q, options=text)
    else:
        target = {"answer": row.answer, "numeric": True, "precision": _precision(row.fields.get("precision", ""), path, where)}
        prompt = NUMERIC_PROMPT.format(question=row.question)
    return Sample(str(row.index), prompt, target, row.image, row.fields.get("category", "") or row.fields.get("question_type", ""))


def _precision(text: str, path: Path, where: str) -> int | None:
    """A MathVista ``precision`` field: decimal places to compare at (empty: compare as given)."""
    if text.strip() in ("", "nan"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value.is_integer() or value < 0:
        raise BadRecord(str(path), f"precision {text!r}; expected a whole number of decimal places (or empty)", where)
    return int(value)


# ---------------------------------------------------------------- predictions
_ID_KEYS = ("id", "question_id", "image_id", "index", "sample_id")
_TEXT_KEYS = ("prediction", "answer", "caption", "text", "response")


def _pick(rec: dict, keys, path: Path, record: str, what: str):
    for k in keys:
        if k in rec:
            return rec[k]
    raise FormatError(f"{path}, {record}: no {what} key; expected one of {list(keys)}")


class Predictions(dict):
    """``{id (as str): prediction}``, with ``where[id]``: the file and record it came from."""

    def __init__(self):
        super().__init__()
        self.where: dict[str, str] = {}


PREDICTIONS = 'JSON lines {"id": ..., "prediction": "..."}, a JSON list of such records, or a JSON object {id: prediction}'


def read_predictions(path: str | Path) -> Predictions:
    """The predictions of a JSONL or JSON file (see module doc). Any fault stops, naming the
    file and record: a prediction left out would silently score as wrong."""
    from vlkit.data.formats.common import check_type, iter_jsonl

    path = Path(path)
    items: list[tuple[str, object, object]] = []
    if path.suffix == ".jsonl":
        for line, rec in iter_jsonl(path, '{"id": ..., "prediction": "..."}'):
            record = f"line {line}"
            items.append((record, _pick(rec, _ID_KEYS, path, record, "id"), _pick(rec, _TEXT_KEYS, path, record, "prediction")))
    else:
        data = read_json(path, PREDICTIONS)
        check_type(data, (list, dict), path, "", "the file's content")
        if isinstance(data, dict):
            items = [(f"key {k!r}", k, v) for k, v in data.items()]
        else:
            for i, rec in enumerate(data):
                record = f"record {i}"
                check_type(rec, dict, path, record, "the record")
                items.append((record, _pick(rec, _ID_KEYS, path, record, "id"), _pick(rec, _TEXT_KEYS, path, record, "prediction")))
    if not items:
        raise FormatError(f"{path}: no predictions; expected {PREDICTIONS}")
    out = Predictions()
    for record, k, v in items:
        check_type(k, (str, int), path, record, "the id")
        if v is not None:
            check_type(v, (str, int, float), path, record, "the prediction")
        key = str(k)
        if key in out:
            raise FormatError(f"{path}, {record}: duplicate id {key!r} (first at {out.where[key]}); expected one prediction per id")
        out[key] = "" if v is None else str(v)
        out.where[key] = f"{path}, {record}"
    return out


# ---------------------------------------------------------------- scoring
def score(task: str, samples: list[Sample], predictions: dict[str, str], source: str = "", box_format: str = "pixels",
          skipped: bool = False) -> tuple[dict, list[dict]]:  # fmt: skip
    """``(results, per-sample rows)`` for predictions keyed by sample id (str). A prediction for an id
    the data does not have is an error, unless records were ``skipped`` as bad (their ids may be
    among them): then such predictions are left out and counted."""
    ids = {s.id for s in samples}
    if len(ids) != len(samples):
        raise FormatError("data: duplicate sample ids")
    extra = [k for k in predictions if k not in ids]
    if extra and not skipped:
        where = getattr(predictions, "where", {})
        first = f" (first at {where[extra[0]]})" if extra[0] in where else ""
        raise FormatError(
            f"{source or 'predictions'}: {len(extra)} prediction id(s) not in the data, e.g. {extra[:5]!r}{first}; "
            f"expected ids of the data's records (question_id / image id / ref_id:sent_id / index), e.g. {sorted(ids)[:3]!r}"
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
    if extra:
        results["counts"].update(predictions_without_data=len(extra), predictions_without_data_examples=extra[:5])
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
def _write(out: Path, results: dict, rows: list[dict], samples: list[Sample], skips: Skips) -> None:
    from vlkit.eval.report import write_task_report
    from vlkit.eval.tasks import write_skips

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
    write_skips(out, skips)
    write_task_report(out, results, rows, samples)


def score_predictions_file(task: str, predictions: str | Path, data: str | Path, out: str | Path | None = None,
                           split: str | None = None, box_format: str = "pixels", skips: Skips | None = None) -> dict:  # fmt: skip
    """``vlkit eval TASK --predictions FILE --data PATH [--split S] [--box-format F] --out DIR``."""
    skips = skips if skips is not None else Skips()
    samples = load_samples(task, data, split, skips)
    preds = read_predictions(predictions)
    results, rows = score(task, samples, preds, str(predictions), box_format, skipped=skips.total > 0)
    results = {**results, "data": str(data), "predictions_file": str(predictions), "skipped": skips.to_dict()}
    if out is not None:
        _write(Path(out), results, rows, samples, skips)
    return results


def answerer(model, template: str | None = None, **options):
    """``model`` as this module's contract wants it: a vision-language model (one with
    ``image_features``, whose own ``generate`` takes token ids and pixels) answers through its
    processor, in left-padded batches, with ``template`` and generation ``options``
    (:class:`~vlkit.models.llava_processor.LlavaAnswerer`); any other model is returned as it is."""
    if not hasattr(model, "image_features"):
        return model
    from vlkit.models.blip2 import Blip2

    if isinstance(model, Blip2):
        from vlkit.models.blip2_processor import Blip2Answerer

        if template is not None:
            raise VlkitError(f"BLIP-2 takes no conversation template (got {template!r}); it continues plain prompts")
        return Blip2Answerer(model, prompt_for=blip2_prompt, **options)
    from vlkit.models.llava_next import LlavaNext, LlavaNextProcessor
    from vlkit.models.llava_processor import LlavaAnswerer, LlavaProcessor

    processor = (LlavaNextProcessor if isinstance(model, LlavaNext) else LlavaProcessor).for_model(model, template)
    return LlavaAnswerer(model, processor, **options)


def blip2_prompt(prompt: str) -> str:
    """The prompt BLIP-2 is asked in place of one of this module's: the captioning prompt becomes
    its "a photo of", a VQA prompt its "Question: {} Short answer:"; any other prompt is kept."""
    from vlkit.models.blip2_processor import CAPTION_PROMPT as BLIP2_CAPTION
    from vlkit.models.blip2_processor import VQA_PROMPT as BLIP2_VQA

    if prompt == CAPTION_PROMPT:
        return BLIP2_CAPTION
    head, _, tail = VQA_PROMPT.partition("{question}")
    if len(prompt) > len(head) + len(tail) and prompt.startswith(head) and prompt.endswith(tail):
        return BLIP2_VQA.format(prompt[len(head) : len(prompt) - len(tail)])
    return prompt


def generate_predictions(model, samples: list[Sample], batch_size: int = 16, max_new_tokens: int = 32,
                         skips: Skips | None = None) -> dict[str, str]:  # fmt: skip
    """Run ``model.generate`` over the samples in batches with a progress bar (a loaded
    vision-language model through :func:`answerer`). An image that cannot be loaded stops, or
    (``Skips("skip")``) its sample is left out and recorded."""
    from tqdm import tqdm

    from vlkit.data.images import BadSample

    model = answerer(model)
    if not callable(getattr(model, "generate", None)):
        raise VlkitError(f"{type(model).__name__} has no generate(images, prompts, max_new_tokens) method, which "
                         "generative tasks need; give a generative model, or score a file with --predictions")  # fmt: skip
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
                skips.reject(err, "bad image")
        if batch:
            texts = model.generate(images, [s.prompt for s in batch], max_new_tokens=max_new_tokens)
            if len(texts) != len(batch):
                raise RuntimeError(f"generate returned {len(texts)} texts for {len(batch)} prompts")
            out.update({s.id: t for s, t in zip(batch, texts)})
        bar.update(len(samples[i : i + batch_size]))
    bar.close()
    return out


def run_generative(task: str, model, data: str | Path, out: str | Path | None = None, batch_size: int = 16,
                   split: str | None = None, box_format: str = "norm1000", max_new_tokens: int = 32,
                   skips: Skips | None = None) -> dict:  # fmt: skip
    """``vlkit eval TASK --model DIR --data PATH``: generate, score, write the report. Samples
    whose image was skipped are left out of the scores (and listed under ``skipped``). Boxes are
    read as vlkit's VLMs write them (``norm1000``, as ``vlkit ground`` reads them) unless told."""
    skips = skips if skips is not None else Skips()
    samples = load_samples(task, data, split, skips)
    preds = generate_predictions(model, samples, batch_size, max_new_tokens, skips)
    scored = [s for s in samples if s.id in preds]  # the others' images were skipped
    if not scored:
        raise VlkitError(f"{data}: every sample's image was bad and skipped (first: {skips.items[0]}); nothing to score")
    results, rows = score(task, scored, preds, "model", box_format)
    results = {**results, "data": str(data), "skipped": skips.to_dict()}
    if out is not None:
        _write(Path(out), results, rows, scored, skips)
    return results
