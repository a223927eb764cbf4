"""``vlkit eval TASK``: run a task on a model and data, write ``results.json`` and predictions.

``TASKS`` maps a task name to its runner ``(model, data, out, batch_size, precision, skips) -> dict``.

Bad records and images follow the one rule of :mod:`vlkit.data.skips`, as in training:
``on_bad_sample="error"`` (the default) stops at the first with an error naming the file
and record; ``"skip"`` leaves it out, counts it in ``results.json`` (``skipped``) and lists
it in ``skipped.jsonl``. ``captions.jsonl`` records are checked as training checks them
(a record without captions, or with a blank one, is bad).

Retrieval over a ``captions.jsonl`` folder scores each image once: an image listed in
several records is merged into one gallery item holding the captions of all of them, and a
caption repeated for the same image is kept once (both counted in ``counts``), so a listed-
twice image no longer competes with itself. A caption text listed for several images is
correct for each of them, as identical texts cannot be told apart (the shapes benchmark's
truth check does the same for vague captions such as "two objects").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import vlkit
from vlkit.config import write_json
from vlkit.data.formats.captions import INDEX, iter_captions
from vlkit.data.formats.common import no_records
from vlkit.data.images import BadSample, for_record, load_image
from vlkit.data.skips import SKIPPED_FILE, Skips
from vlkit.data.shapes import TEMPLATES, class_prompts
from vlkit.errors import VlkitError
from vlkit.eval.embed import embed_images, embed_texts
from vlkit.eval.retrieval import image_tokens, itc_itm_retrieval, retrieval
from vlkit.eval.zeroshot import classification_metrics, classifier_weights

DATA_NAMES = {"shapes": "the bundled shapes world, generated on the fly"}
"""``--data`` values that name a built-in dataset (zeroshot and retrieval) instead of a path."""

DATA_PATHS = {
    "zeroshot": "an ImageFolder with classnames.json and templates.json (vlkit data shapes --out D writes D/classification)",
    "retrieval": "a folder with captions.jsonl (vlkit data shapes --out D writes D/captions)",
    "caption": "a Karpathy-layout COCO captions JSON or a folder holding captions_karpathy.json (vlkit data shapes --format coco)",
    "vqa": "a folder with VQAv2 *questions*.json and *annotations*.json (vlkit data shapes --format vqav2)",
    "grounding": "a RefCOCO folder with refs.json and instances.json (vlkit data shapes --format refcoco)",
    "mcq": "an MMBench- or MathVista-style TSV, or a folder holding one (vlkit data shapes --format mmbench / mathvista)",
}


def check_data(task: str, data: str) -> None:
    """``data`` must name a built-in dataset this task has, or an existing file or folder."""
    names = DATA_NAMES if task in TASKS else {}
    if data in names or Path(data).exists():
        return
    takes = "; ".join([f"the name {k!r} ({v})" for k, v in names.items()] + [f"a path: {DATA_PATHS[task]}"])
    if data in DATA_NAMES:
        raise VlkitError(f"--data {data!r} names a dataset only {' and '.join(TASKS)} have built in; eval {task} takes {takes}")
    raise VlkitError(f"--data {data!r}: no such dataset name, file or folder; eval {task} takes {takes}")


def _shapes_world(model):
    from vlkit.data.shapes import ShapesWorld

    return ShapesWorld(image_size=model.processor.output_size)


def _image_batches(model, paths: list[Path], batch_size: int, skips: Skips, kept: list[int], source,
                   records: list[str] | None):  # fmt: skip
    """Pixel batches of the images that load; the indices of those are appended to ``kept``,
    the others go through the bad-record rule (named as ``records[j]`` of ``source`` when the
    images come from records of a data file; else each image is its own record)."""
    for i in range(0, len(paths), batch_size):
        images = []
        for j in range(i, min(i + batch_size, len(paths))):
            try:
                images.append(load_image(paths[j]))
            except BadSample as err:
                skips.reject(err if records is None else for_record(err, source, records[j]), "bad image")
                continue
            kept.append(j)
        if images:
            yield model.processor.batch(images)


def _embed_image_files(model, paths: list[Path], batch_size: int, precision: str, skips: Skips, source,
                       embed=embed_images, records: list[str] | None = None) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """``(features of the images that load, their indices)``; an error when none does."""
    kept: list[int] = []
    bad_before = skips.total
    batches = _image_batches(model, paths, batch_size, skips, kept, source, records)
    try:
        feats = embed(model, batches, precision, progress=True, total=(len(paths) + batch_size - 1) // batch_size)
    except VlkitError:
        if skips.total - bad_before < len(paths):
            raise
        raise no_records(source, "images that load", skips) from None
    return feats, kept


def _embedding_report(out: Path, task: str, results: dict, plots: list[tuple[str, str]]) -> None:
    """``report.md`` for zero-shot and retrieval: the metrics table and the plots."""
    from vlkit.eval.report import _table

    scalars = {k: v for k, v in results.items() if isinstance(v, float)}
    md = [f"# Evaluation: {task}", "", _table(scalars), ""]
    for title, name in plots:
        md += [f"## {title}", "", f"![{title}]({name})", ""]
    (out / "report.md").write_text("\n".join(md))


def eval_zeroshot(model, data: str, out: Path | None, batch_size: int, precision: str, skips: Skips | None = None) -> dict:
    skips = skips if skips is not None else Skips()
    if data == "shapes":
        from vlkit.eval import shapes

        singles = shapes.zeroshot_split(_shapes_world(model))
        paths, labels = None, torch.tensor([s.label for s in singles])
        names, templates = class_prompts(), TEMPLATES
        feats = embed_images(model, shapes.pixels(model, singles, batch_size), precision)
    else:
        from vlkit.data.formats.imagefolder import read_imagefolder

        paths, all_labels, names, templates = read_imagefolder(data)
        feats, kept = _embed_image_files(model, paths, batch_size, precision, skips, data)
        paths, labels = [paths[i] for i in kept], torch.tensor([all_labels[i] for i in kept])
    weights = classifier_weights(model, names, templates, precision)
    logits = 100.0 * feats @ weights.T
    res = classification_metrics(logits, labels, len(names))
    results = {f"zeroshot_{k}": v for k, v in res.items() if k != "confusion"}
    results["counts"] = {"images": len(labels), "classes": len(names)}
    if out is not None:
        pred = logits.argmax(dim=-1).tolist()
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for i, (y, k) in enumerate(zip(labels.tolist(), pred)):
                image = str(paths[i]) if paths is not None else f"shapes:{i}"
                f.write(json.dumps({"image": image, "label": names[y], "prediction": names[k]}) + "\n")
        from vlkit.eval.report import plot_confusion

        fig = plot_confusion(res["confusion"].tolist(), names, out / "confusion.png", "zero-shot confusion (rows: truth)")
        _embedding_report(out, "zeroshot", results, [("Confusion matrix", fig)])
    return results


def caption_gallery(root: Path, skips: Skips | None = None) -> tuple[list[Path], list[list[str]], dict, list[str]]:
    """``(image paths, captions per image, counts, the first record naming each image)`` from
    ``root/captions.jsonl`` (records checked as training checks them,
    :func:`~vlkit.data.formats.captions.iter_captions`): each image once, with the distinct captions
    of every record that lists it (see the module doc)."""
    root = Path(root)
    if not (root / INDEX).is_file() and (root / "captions" / INDEX).is_file():
        raise FileNotFoundError(f"{root / INDEX}: missing; {root / 'captions'} holds one (--data {root / 'captions'}?)")
    index: dict[str, int] = {}
    paths: list[Path] = []
    captions: list[list[str]] = []
    records: list[str] = []
    merged = repeated = 0
    for rec in iter_captions(root, skips):
        key = os.path.normpath(rec.image)
        if key in index:
            merged += 1
            own = captions[index[key]]
        else:
            index[key] = len(paths)
            paths.append(rec.image)
            records.append(f"line {rec.id}")
            own = []
            captions.append(own)
        for c in rec.captions:
            if c in own:
                repeated += 1
            else:
                own.append(c)
    return paths, captions, {"merged_duplicate_images": merged, "repeated_captions_dropped": repeated}, records


def eval_retrieval(model, data: str, out: Path | None, batch_size: int, precision: str, skips: Skips | None = None) -> dict:
    skips = skips if skips is not None else Skips()
    counts: dict = {}
    blip2 = hasattr(model, "itm_scores")  # BLIP-2 stage 1: ITC ranks, ITM re-scores the top k (both read image tokens)
    embed = image_tokens if blip2 else embed_images
    if data == "shapes":
        from vlkit.eval import shapes

        scenes, captions = shapes.retrieval_split(_shapes_world(model))
        names = [f"shapes:{i}" for i in range(len(scenes))]
        texts = [c.text for c in captions]
        positives = shapes.truth_matrix(scenes, captions)
        image_feats = embed(model, shapes.pixels(model, scenes, batch_size), precision)
    else:
        paths, per_image, counts, records = caption_gallery(Path(data), skips)
        image_feats, kept = _embed_image_files(model, paths, batch_size, precision, skips, Path(data) / INDEX, embed, records)
        names = [str(paths[i]) for i in kept]
        per_image = [per_image[i] for i in kept]
        texts = [t for caps in per_image for t in caps]
        owners: dict[str, set[int]] = {}
        for i, caps in enumerate(per_image):
            for t in caps:
                owners.setdefault(t, set()).add(i)
        positives = torch.zeros(len(names), len(texts), dtype=torch.bool)
        for q, t in enumerate(texts):
            positives[sorted(owners[t]), q] = True
        counts = {"images": len(names), "captions": len(texts), **counts,
                  "captions_shared_by_several_images": sum(len(v) > 1 for v in owners.values())}  # fmt: skip
    if blip2:
        results, text_to_image = itc_itm_retrieval(model, image_feats, texts, positives, batch_size=batch_size)
    else:
        text_feats = embed_texts(model, texts, batch_size, precision, progress=data != "shapes")
        results, text_to_image = retrieval(image_feats, text_feats, positives), text_feats @ image_feats.T
    if counts:
        results["counts"] = counts
    if out is not None:
        top = text_to_image.topk(min(5, len(names)), dim=1).indices.tolist()
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for q, ranked in enumerate(top):
                hit = bool(positives[ranked[0], q])
                f.write(json.dumps({"text": texts[q], "top5_images": [names[i] for i in ranked], "top1_correct": hit}) + "\n")
        from vlkit.eval.report import plot_recall_curves

        curves = {d: {k: results[f"{d}_r{k}"] for k in (1, 5, 10)} for d in ("i2t", "t2i")}
        fig = plot_recall_curves(curves, out / "recall.png", "retrieval recall@K")
        _embedding_report(out, "retrieval", results, [("Recall@K", fig)])
    return results


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
    on_bad_sample: str = "error",
    **generative_options,
) -> dict:
    """Run ``task`` and write ``results.json`` (and predictions, a report, ``skipped.jsonl``
    when records were skipped) to ``out``.

    With ``predictions`` a generative task scores that file instead of running a model.
    """
    if task not in TASKS and task not in GENERATIVE_TASKS:
        raise VlkitError(f"unknown task {task!r}; expected one of {sorted(TASKS) + list(GENERATIVE_TASKS)}")
    if batch_size < 1:
        raise VlkitError(f"batch size {batch_size}; expected a whole number of at least 1")
    check_data(task, data)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise VlkitError(f"--out {out}: is a file; expected a folder for results.json, predictions.jsonl and report.md")
    skips = Skips(on_bad_sample)
    if task in GENERATIVE_TASKS:
        from vlkit.eval.generative import run_generative, score_predictions_file

        if predictions is not None:
            return score_predictions_file(task, predictions, data, out, skips=skips, **generative_options)
        if model_path is None:
            raise VlkitError(f"eval {task}: give --model or --predictions")
        return run_generative(task, vlkit.load(model_path), data, out, batch_size=batch_size, skips=skips, **generative_options)
    if model_path is None:
        raise VlkitError(f"eval {task}: --model is required")
    model = vlkit.load(model_path)
    out_dir = Path(out) if out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = TASKS[task](model, data, out_dir, batch_size, precision, skips)
    results["skipped"] = skips.to_dict()
    if out_dir is not None:
        write_skips(out_dir, skips)
        write_json(out_dir / "results.json", {"task": task, "model": str(model_path), "data": data, **results})
    return results


def write_skips(out: Path, skips: Skips) -> None:
    """``skipped.jsonl`` when records were skipped; an old one from an earlier run is removed."""
    if skips.total:
        skips.write(out)
    else:
        (out / SKIPPED_FILE).unlink(missing_ok=True)
