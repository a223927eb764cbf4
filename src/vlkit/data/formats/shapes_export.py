"""The shapes world written out in each standard dataset format, so that every reader is
tested end to end on the same data (and users can see what each format looks like).

``export(world_or_seed, n, out, fmt)`` writes scenes ``0..n-1`` of the world to ``out``:

========== ==================================================================
coco       ``captions_karpathy.json`` + ``images/`` (Karpathy split layout)
vqav2      ``questions.json``, ``annotations.json`` + ``images/``
llava      ``conversations.json`` + ``images/`` (captioning + VQA turns)
refcoco    ``refs.json``, ``instances.json`` + ``images/``
imagefolder class folders + ``classnames.json``, ``templates.json`` (single objects)
mmbench    ``mmbench.tsv``: color/shape/count multiple choice, base64 images
mathvista  ``mathvista.tsv``: free-form count questions, base64 images
shards     ``shards/shapes-%06d.tar`` WebDataset (png + json with all annotations)
========== ==================================================================

``out`` is written whole, with a ``shapes_export.json`` summary: it must be new, empty or an
earlier export, which is replaced (a smaller re-export never leaves stale images or shards).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlkit.data.shapes import CLASS_NAMES, COLOR_NAMES, SHAPES, TEMPLATES, ShapesWorld, class_prompts
from vlkit.errors import VlkitError
from vlkit.files import atomic_folder

MANIFEST = "shapes_export.json"

FORMATS = ("coco", "vqav2", "llava", "refcoco", "imagefolder", "mmbench", "mathvista", "shards")
ANSWER_TYPES = {"yesno": "yes/no", "relation": "yes/no", "count": "number", "color": "other", "shape": "other"}


def _world(world_or_seed) -> ShapesWorld:
    return world_or_seed if isinstance(world_or_seed, ShapesWorld) else ShapesWorld(seed=int(world_or_seed))


def image_filename(i: int) -> str:
    return f"shapes_{i:012d}.png"


def _save_images(scenes, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(scenes):
        p = folder / image_filename(i)
        s.render().save(p)
        paths.append(p)
    return paths


def mcq_options(correct: str, pool, rng: np.random.Generator, k: int = 4) -> tuple[list[str], str]:
    """``k`` options including ``correct`` in a seeded order; returns (options, answer letter)."""
    others = [v for v in pool if v != correct]
    chosen = [str(v) for v in rng.choice(others, size=min(k - 1, len(others)), replace=False)] + [correct]
    order = [chosen[j] for j in rng.permutation(len(chosen))]
    return order, "ABCDEFGHIJ"[order.index(correct)]


def export(world_or_seed, n: int, out: str | Path, fmt: str, split: str = "test") -> dict:
    """Write ``n`` scenes in ``fmt`` to the folder ``out``, whole; returns a summary (files
    written, record counts), also in ``out/shapes_export.json``."""
    if fmt not in FORMATS:
        raise VlkitError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if n < 1:
        raise VlkitError(f"n must be at least 1, got {n}")
    world = _world(world_or_seed)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise VlkitError(f"{out}: exists and is not an earlier shapes export (no {MANIFEST}); expected a new or empty folder")
    summary: dict = {}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        summary.update(globals()[f"_export_{fmt}"](world, n, tmp, split))
        summary["files"] = [str(out / Path(f).relative_to(tmp)) for f in summary["files"]]
        (tmp / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n")

    atomic_folder(out, write)
    return summary


def _export_coco(world, n, out, split):
    from vlkit.data.formats.coco import CaptionRecord, write_karpathy

    scenes = [world.scene(i) for i in range(n)]
    paths = _save_images(scenes, out / "images")
    recs = [CaptionRecord(i, p, [c.text for c in s.captions], split) for i, (s, p) in enumerate(zip(scenes, paths))]
    path = write_karpathy(out / "captions_karpathy.json", recs, image_root=out)
    return {"format": "coco", "files": [str(path)], "images": n, "captions": sum(len(r.captions) for r in recs)}


def _vqa_records(world, n, out):
    from vlkit.data.formats.vqav2 import VQARecord

    scenes = [world.scene(i) for i in range(n)]
    paths = _save_images(scenes, out / "images")
    recs = []
    for i, (s, p) in enumerate(zip(scenes, paths)):
        for k, qa in enumerate(s.vqa):
            recs.append(VQARecord(i * 100 + k, i, p, qa["question"], [qa["answer"]] * 10, qa["type"], ANSWER_TYPES.get(qa["type"], "other")))
    return scenes, paths, recs


def _export_vqav2(world, n, out, split):
    """Ten identical human answers per question (the world knows the one true answer)."""
    from vlkit.data.formats.vqav2 import write_vqav2

    _, _, recs = _vqa_records(world, n, out)
    write_vqav2(out / "questions.json", out / "annotations.json", recs)
    return {"format": "vqav2", "files": [str(out / "questions.json"), str(out / "annotations.json")], "images": n, "questions": len(recs)}


def _export_llava(world, n, out, split):
    from vlkit.data.formats.llava import Conversation, write_llava

    scenes = [world.scene(i) for i in range(n)]
    paths = _save_images(scenes, out / "images")
    convs = []
    for i, (s, p) in enumerate(zip(scenes, paths)):
        turns = [("Describe the image.", s.captions[0].text)] + [(qa["question"], qa["answer"]) for qa in s.vqa]
        convs.append(Conversation(f"shapes-{i}", p, turns))
    path = write_llava(out / "conversations.json", convs, image_root=out)
    return {"format": "llava", "files": [str(path)], "images": n, "conversations": len(convs)}


def _export_refcoco(world, n, out, split):
    from vlkit.data.formats.refcoco import write_refcoco

    scenes = [world.scene(i) for i in range(n)]
    _save_images(scenes, out / "images")
    images, anns, refs = [], [], []
    for i, s in enumerate(scenes):
        images.append({"id": i, "file_name": image_filename(i), "width": s.image_size, "height": s.image_size})
        for k, o in enumerate(s.objects):
            x0, y0, x1, y1 = (round(v, 2) for v in o.box)
            ann_id = i * 100 + k
            anns.append({"id": ann_id, "image_id": i, "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                         "category_id": o.label + 1, "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0})  # fmt: skip
            sents = [r["text"] for r in s.referring if r["object"] == k]
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": i, "split": split, "category_id": o.label + 1,
                         "sentences": [{"sent": t, "sent_id": j, "tokens": t.split()} for j, t in enumerate(sents)]})  # fmt: skip
    cats = [{"id": k + 1, "name": name} for k, name in enumerate(CLASS_NAMES)]
    write_refcoco(out, images, anns, refs, cats)
    return {"format": "refcoco", "files": [str(out / "refs.json"), str(out / "instances.json")], "images": n,
            "refs": len(refs), "sentences": sum(len(r["sentences"]) for r in refs)}  # fmt: skip


def _export_imagefolder(world, n, out, split):
    from vlkit.data.formats.imagefolder import class_folder, write_imagefolder_meta

    for i in range(n):
        s = world.single(i)
        folder = out / class_folder(s.label, CLASS_NAMES[s.label])
        folder.mkdir(parents=True, exist_ok=True)
        s.render().save(folder / image_filename(i))
    for k, name in enumerate(CLASS_NAMES):  # every class has a folder, even if empty
        (out / class_folder(k, name)).mkdir(exist_ok=True)
    write_imagefolder_meta(out, class_prompts(), TEMPLATES)
    return {"format": "imagefolder", "files": [str(out / "classnames.json"), str(out / "templates.json")], "images": n, "classes": len(CLASS_NAMES)}


def _export_mmbench(world, n, out, split):
    from vlkit.data.formats.tsv import write_tsv

    rows = []
    pools = {"color": COLOR_NAMES, "shape": SHAPES, "count": [str(v) for v in range(0, 7)]}
    for i in range(n):
        s = world.scene(i)
        img = s.render()
        for k, qa in enumerate(s.vqa):
            if qa["type"] not in pools:
                continue
            rng = np.random.default_rng([world.seed, i, k, 11])
            opts, letter = mcq_options(qa["answer"], pools[qa["type"]], rng)
            rows.append({"index": i * 100 + k, "image": img, "question": qa["question"], "hint": "",
                         **dict(zip("ABCD", opts)), "answer": letter, "category": qa["type"],
                         "l2-category": "perception", "split": split})  # fmt: skip
    cols = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split"]
    path = write_tsv(out / "mmbench.tsv", rows, cols)
    return {"format": "mmbench", "files": [str(path)], "images": n, "questions": len(rows)}


def _export_mathvista(world, n, out, split):
    from vlkit.data.formats.tsv import write_tsv

    rows = []
    for i in range(n):
        s = world.scene(i)
        img = s.render()
        for k, qa in enumerate(s.vqa):
            if qa["type"] == "count":
                rows.append({"index": i * 100 + k, "image": img, "question": qa["question"], "answer": qa["answer"],
                             "question_type": "free_form", "answer_type": "integer", "precision": ""})  # fmt: skip
    cols = ["index", "image", "question", "answer", "question_type", "answer_type", "precision"]
    path = write_tsv(out / "mathvista.tsv", rows, cols)
    return {"format": "mathvista", "files": [str(path)], "images": n, "questions": len(rows)}


def _export_shards(world, n, out, split):
    from vlkit.data.formats.shards import write_shards

    def samples():
        for i in range(n):
            s = world.scene(i)
            yield {"__key__": f"shapes-{i:08d}", "png": s.render(), "json": {"id": i, **s.to_dict()}}

    files = write_shards(samples(), out / "shards", maxcount=max(1, min(1000, n // 4 or 1)))
    return {"format": "shards", "files": [str(f) for f in files], "images": n}
