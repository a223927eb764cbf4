"""ImageFolder with ``classnames.json`` and ``templates.json`` (CLIP_benchmark style).

``root/<class folder>/<image>``; the class folders in sorted order are the labels;
``classnames.json`` lists one readable name per folder (same order) and
``templates.json`` the prompts, each with ``{c}``. Hidden folders and files (``.ipynb_checkpoints``,
``._x.png``), files that are not images and folders inside class folders are not records:
they are passed over.
"""

from __future__ import annotations

from pathlib import Path

from vlkit.data.formats.common import FormatError, no_records, read_json, write_json
from vlkit.data.images import IMAGE_SUFFIXES


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


IMAGEFOLDER = "an ImageFolder: class subfolders of images, classnames.json and templates.json"


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def read_imagefolder(root: str | Path) -> tuple[list[Path], list[int], list[str], list[str]]:
    """``(image paths, labels, classnames, templates)``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder; expected {IMAGEFOLDER}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise FormatError(f"{root}: no class subfolders; expected {IMAGEFOLDER}")
    names = read_json(root / "classnames.json", "a JSON list of class names, one per subfolder")
    if not isinstance(names, list) or len(names) != len(classes) or not all(isinstance(n, str) and n.strip() for n in names):
        raise FormatError(f"{root / 'classnames.json'}: expected a list of {len(classes)} non-empty strings (one per subfolder: "
                          f"{', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}), got {names!r:.80}")  # fmt: skip
    templates = read_json(root / "templates.json", 'a JSON list of prompts with "{c}"')
    if not isinstance(templates, list) or not templates:
        raise FormatError(f"{root / 'templates.json'}: {templates!r:.80}; expected a non-empty list of strings containing {{c}}")
    for i, t in enumerate(templates):
        _check_template(t, root / "templates.json", i)
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(q for q in (root / c).iterdir() if q.is_file() and _visible(q) and q.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [k] * len(files)
    if not paths:
        raise no_records(root, f"image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class subfolders")
    return paths, labels, names, templates


def _check_template(t, path: Path, i: int) -> None:
    """A prompt template must be a string that ``t.format(c=name)`` fills, with ``{c}`` in it."""
    try:
        ok = isinstance(t, str) and "{c}" in t and t.format(c="x") is not None
    except (KeyError, IndexError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise FormatError(f"{path}, item {i}: template {t!r:.80}; expected a string with {{c}} and no other "
                          "braces (write {{ and }} for literal ones)")  # fmt: skip
