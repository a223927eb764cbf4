"""``vlkit eval TASK``: run a task on a model and data, write ``results.json`` and predictions.

``TASKS`` maps a task name to its runner ``(model, data, out, batch_size, precision) -> dict``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import vlkit
from vlkit.config import write_json
from vlkit.data.formats.common import FormatError, iter_jsonl
from vlkit.data.images import load_image
from vlkit.eval.embed import embed_images, embed_texts
from vlkit.eval.retrieval import retrieval
from vlkit.eval.zeroshot import classification_metrics, classifier_weights


def _shapes_world(model):
    from vlkit.data.shapes import ShapesWorld

    return ShapesWorld(image_size=model.processor.output_size)


def _image_batches(model, paths: list[Path], batch_size: int):
    for i in range(0, len(paths), batch_size):
        yield model.processor.batch([load_image(p) for p in paths[i : i + batch_size]])


def _read_json(path: Path, expected: str):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected {expected}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON ({err.msg} at line {err.lineno})") from None


def image_folder(root: Path) -> tuple[list[Path], torch.Tensor, list[str], list[str]]:
    """An ImageFolder with ``classnames.json`` and ``templates.json`` (CLIP_benchmark style):
    class subfolders in sorted order are the labels."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class subfolders")
    names = _read_json(root / "classnames.json", "a JSON list of class names, one per subfolder")
    if not isinstance(names, list) or len(names) != len(classes):
        raise ValueError(f"{root / 'classnames.json'}: expected {len(classes)} names (one per subfolder), got {names!r:.80}")
    templates = _read_json(root / "templates.json", 'a JSON list of prompts with "{c}"')
    if not isinstance(templates, list) or not all(isinstance(t, str) and "{c}" in t for t in templates):
        raise ValueError(f"{root / 'templates.json'}: expected a list of strings containing {{c}}")
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(q for q in (root / c).iterdir() if q.is_file())
        paths += files
        labels += [k] * len(files)
    return paths, torch.tensor(labels), names, templates


def _embedding_report(out: Path, task: str, results: dict, plots: list[tuple[str, str]]) -> None:
    """``report.md`` for zero-shot and retrieval: the metrics table and the plots."""
    from vlkit.eval.report import _table

    scalars = {k: v for k, v in results.items() if isinstance(v, float)}
    md = [f"# Evaluation: {task}", "", _table(scalars), ""]
    for title, name in plots:
        md += [f"## {title}", "", f"![{title}]({name})", ""]
    (out / "report.md").write_text("\n".join(md))


def eval_zeroshot(model, data: str, out: Path | None, batch_size: int, precision: str) -> dict:
    if data == "shapes":
        from vlkit.eval import shapes

        singles = shapes.zeroshot_split(_shapes_world(model))
        paths, labels = None, torch.tensor([s.label for s in singles])
        names, templates = shapes.class_prompts(), shapes.TEMPLATES
        feats = embed_images(model, shapes.pixels(model, singles, batch_size), precision)
    else:
        paths, labels, names, templates = image_folder(Path(data))
        feats = embed_images(model, _image_batches(model, paths, batch_size), precision, progress=True)
    weights = classifier_weights(model, names, templates, precision)
    logits = 100.0 * feats @ weights.T
    res = classification_metrics(logits, labels, len(names))
    results = {f"zeroshot_{k}": v for k, v in res.items() if k != "confusion"}
    if out is not None:
        pred = logits.argmax(dim=-1).tolist()
        with open(out / "predictions.jsonl", "w") as f:
            for i, (y, k) in enumerate(zip(labels.tolist(), pred)):
                image = str(paths[i]) if paths is not None else f"shapes:{i}"
                f.write(json.dumps({"image": image, "label": names[y], "prediction": names[k]}) + "\n")
        from vlkit.eval.report import plot_confusion

        fig = plot_confusion(res["confusion"].tolist(), names, out / "confusion.png", "zero-shot confusion (rows: truth)")
        _embedding_report(out, "zeroshot", results, [("Confusion matrix", fig)])
    return results


def eval_retrieval(model, data: str, out: Path | None, batch_size: int, precision: str) -> dict:
    if data == "shapes":
        from vlkit.eval import shapes

        scenes, captions = shapes.retrieval_split(_shapes_world(model))
        names = [f"shapes:{i}" for i in range(len(scenes))]
        texts = [c.text for c in captions]
        positives = shapes.truth_matrix(scenes, captions)
        image_feats = embed_images(model, shapes.pixels(model, scenes, batch_size), precision)
    else:
        root = Path(data)
        records = _read_jsonl(root / "captions.jsonl")
        paths = [root / r["image"] for r in records]
        names = [str(p) for p in paths]
        texts, owner = [], []
        for i, r in enumerate(records):
            texts += r["captions"]
            owner += [i] * len(r["captions"])
        positives = torch.zeros(len(paths), len(texts), dtype=torch.bool)
        positives[torch.tensor(owner), torch.arange(len(texts))] = True
        image_feats = embed_images(model, _image_batches(model, paths, batch_size), precision, progress=True)
    text_feats = embed_texts(model, texts, batch_size, precision, progress=data != "shapes")
    results = retrieval(image_feats, text_feats, positives)
    if out is not None:
        top = (text_feats @ image_feats.T).topk(min(5, len(names)), dim=1).indices.tolist()
        with open(out / "predictions.jsonl", "w") as f:
            for q, ranked in enumerate(top):
                hit = bool(positives[ranked[0], q])
                f.write(json.dumps({"text": texts[q], "top5_images": [names[i] for i in ranked], "top1_correct": hit}) + "\n")
        from vlkit.eval.report import plot_recall_curves

        curves = {d: {k: results[f"{d}_r{k}"] for k in (1, 5, 10)} for d in ("i2t", "t2i")}
        fig = plot_recall_curves(curves, out / "recall.png", "retrieval recall@K")
        _embedding_report(out, "retrieval", results, [("Recall@K", fig)])
    return results


def _read_jsonl(path: Path) -> list[dict]:
    """``captions.jsonl`` records, each checked; errors name the file and line."""
    records = []
    for n, rec in iter_jsonl(path, 'lines of {"image": path, "captions": [...]}'):
        if not isinstance(rec.get("image"), str) or not isinstance(rec.get("captions"), list):
            raise FormatError(f"{path}, line {n}: expected {{\"image\": str, \"captions\": [str, ...]}}")
        records.append(rec)
    return records


TASKS = {"zeroshot": eval_zeroshot, "retrieval": eval_retrieval}
GENERATIVE_TASKS = ("caption", "vqa", "grounding", "mcq")
"""Tasks for any model with ``generate(images, prompts, max_new_tokens)``; see ``eval.generative``."""


def run_eval(
    task: str,
    model_path: str | None,
    data: str,
    out: str | None,
    batch_size: int = 256,
    precision: str = "auto",
    predictions: str | None = None,
    **generative_options,
) -> dict:
    """Run ``task`` and write ``results.json`` (and predictions, a report) to ``out``.

    With ``predictions`` a generative task scores that file instead of running a model.
    """
    if task not in TASKS and task not in GENERATIVE_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS) + list(GENERATIVE_TASKS)}")
    if task in GENERATIVE_TASKS:
        from vlkit.eval.generative import run_generative, score_predictions_file

        if predictions is not None:
            return score_predictions_file(task, predictions, data, out, **generative_options)
        if model_path is None:
            raise ValueError(f"eval {task}: give --model or --predictions")
        return run_generative(task, vlkit.load(model_path), data, out, batch_size=batch_size, **generative_options)
    if model_path is None:
        raise ValueError(f"eval {task}: --model is required")
    model = vlkit.load(model_path)
    out_dir = Path(out) if out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = TASKS[task](model, data, out_dir, batch_size, precision)
    if out_dir is not None:
        write_json(out_dir / "results.json", {"task": task, "model": str(model_path), "data": data, **results})
    return results
