"""Export the shapes world to files in the standard dataset formats, so every loader is tested
end to end on the same data.

``export_shapes(out, n)`` writes::

    out/
      shapes_export.json          what was written (the summary returned)
      classification/             an ImageFolder of single-object scenes, balanced over the 40 classes
        blue_circle/000007.png ...
        classnames.json           prompt-ready class names ("a blue circle"), in the sorted
                                  order of the class folders (ImageFolder's label order)
        templates.json            the zero-shot prompt templates ("a photo of {c}", ...)
      captions/                   a caption folder (what :class:`~vlkit.data.pairs.CaptionFolder` reads)
        images/000000.png ...     scenes of 1 to ``max_objects`` objects
        captions.jsonl            {"image": "images/000000.png", "captions": [...]} per line
        scenes.jsonl              {"image": ..., **Scene.to_dict()}: boxes, VQA, referring expressions

The output is a pure function of the arguments. It is written whole
(:func:`vlkit.files.atomic_folder`), so an interrupted export leaves no partial dataset behind.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlkit.data.shapes import CLASS_NAMES, Scene, ShapesWorld
from vlkit.data.shapes import TEMPLATES
from vlkit.files import atomic_folder

MANIFEST = "shapes_export.json"


def class_dir(label: int) -> str:
    """Folder name of a class: ``"red star"`` → ``"red_star"``."""
    return CLASS_NAMES[label].replace(" ", "_")


def _prompt_name(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _save_png(scene: Scene, path: Path) -> None:
    scene.render().save(path, format="PNG")


def _write_classification(root: Path, world: ShapesWorld, n: int, width: int) -> dict:
    """``n`` single-object images, image ``i`` of class ``i mod 40`` (all classes once n ≥ 40)."""
    folders = sorted(class_dir(k) for k in range(len(CLASS_NAMES)))
    for name in folders:
        (root / name).mkdir(parents=True)
    for i in range(n):
        label = i % len(CLASS_NAMES)
        _save_png(world.single(i, label=label), root / class_dir(label) / f"{i:0{width}d}.png")
    names = [_prompt_name(f.replace("_", " ")) for f in folders]
    (root / "classnames.json").write_text(json.dumps(names, indent=1) + "\n")
    (root / "templates.json").write_text(json.dumps(TEMPLATES, indent=1) + "\n")
    return {"path": str(root), "images": n, "classes": len(folders)}


def _write_captions(root: Path, world: ShapesWorld, n: int, width: int) -> dict:
    images = root / "images"
    images.mkdir(parents=True)
    n_captions = 0
    with open(root / "captions.jsonl", "w", encoding="utf-8") as captions, open(root / "scenes.jsonl", "w", encoding="utf-8") as scenes:
        for i in range(n):
            scene = world.scene(i)
            rel = f"images/{i:0{width}d}.png"
            _save_png(scene, root / rel)
            texts = [c.text for c in scene.captions]
            n_captions += len(texts)
            captions.write(json.dumps({"image": rel, "captions": texts}) + "\n")
            scenes.write(json.dumps({"image": rel, **scene.to_dict()}) + "\n")
    return {"path": str(root), "images": n, "captions": n_captions}


def export_shapes(out: str | Path, n: int, image_size: int = 64, seed: int = 0, max_objects: int = 3) -> dict:
    """Write ``n`` classification images and ``n`` captioned scenes under ``out``; returns a
    JSON-ready summary (counts and paths). ``out`` must be empty, absent, or an earlier export
    (which is replaced)."""
    out = Path(out)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {max_objects}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise FileExistsError(f"{out}: exists and is not an earlier shapes export; choose an empty or new folder")
    width = max(6, len(str(n - 1)))
    summary = {
        "root": str(out),
        "n": n,
        "image_size": image_size,
        "seed": seed,
        "max_objects": max_objects,
    }

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        summary["classification"] = _write_classification(
            tmp / "classification", ShapesWorld(image_size, 1, 1, seed), n, width
        )
        summary["captions"] = _write_captions(tmp / "captions", ShapesWorld(image_size, 1, max_objects, seed), n, width)
        for part in ("classification", "captions"):
            summary[part]["path"] = str(out / part)
        (tmp / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n")

    atomic_folder(out, write)
    return summary
