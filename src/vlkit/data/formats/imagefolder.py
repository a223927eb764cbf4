"""ImageFolder with ``classnames.json`` and ``templates.json`` (CLIP_benchmark style).

``root/<class folder>/<image>``; the class folders in sorted order are the labels;
``classnames.json`` lists one readable name per folder (same order) and
``templates.json`` the prompts, each with ``{c}``.
"""

from __future__ import annotations

from pathlib import Path

from vlkit.data.formats.common import FormatError, read_json, write_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def write_imagefolder_meta(root: str | Path, classnames: list[str], templates: list[str]) -> None:
    root = Path(root)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"templates {bad!r} lack the class placeholder {{c}}")
    write_json(root / "classnames.json", list(classnames))
    write_json(root / "templates.json", list(templates))


def class_folder(k: int, name: str) -> str:
    """A folder name that sorts in label order: ``"007_red_star"``."""
    return f"{k:03d}_{name.replace(' ', '_')}"


def read_imagefolder(root: str | Path) -> tuple[list[Path], list[int], list[str], list[str]]:
    """``(image paths, labels, classnames, templates)``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder; expected an ImageFolder with class subfolders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FormatError(f"{root}: no class subfolders")
    names = read_json(root / "classnames.json", "a JSON list of class names, one per subfolder")
    if not isinstance(names, list) or len(names) != len(classes) or not all(isinstance(n, str) for n in names):
        raise FormatError(f"{root / 'classnames.json'}: expected {len(classes)} names (one per subfolder), got {names!r:.80}")
    templates = read_json(root / "templates.json", 'a JSON list of prompts with "{c}"')
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and "{c}" in t for t in templates):
        raise FormatError(f"{root / 'templates.json'}: expected a non-empty list of strings containing {{c}}")
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(q for q in (root / c).iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [k] * len(files)
    return paths, labels, names, templates
