"""Evaluation reports: ``report.md`` with PNG plots (matplotlib, Agg backend).

Plots: recall@K curves (retrieval), confusion matrices (zero-shot, multiple choice),
accuracy per question type or category, score histograms, and example images with their
predictions (boxes drawn for grounding).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def plot_bars(values: dict[str, float], path: Path, title: str, ylabel: str = "accuracy") -> str:
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(values) + 2), 3.2))
    ax.bar(list(values), list(values.values()), color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45 if len(values) > 6 else 0)
    return _save(fig, path)


def plot_hist(values: list[float], path: Path, title: str, xlabel: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(values, bins=20, color="#55a868")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(title)
    return _save(fig, path)


def plot_recall_curves(curves: dict[str, dict[int, float]], path: Path, title: str = "recall@K") -> str:
    """``curves``: ``{"i2t": {1: r1, 5: r5, ...}, "t2i": {...}}``."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, pts in curves.items():
        ks = sorted(pts)
        ax.plot(ks, [pts[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("K")
    ax.set_ylabel("recall")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_confusion(matrix, labels: list[str], path: Path, title: str = "confusion (rows: truth)", normalise: bool = False) -> str:
    """Counts (written in the cells when there are few classes) or, with ``normalise``, the
    fraction of each true class (rows) given each prediction."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    if normalise:
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * m.shape[1] + 2), max(3.5, 0.25 * m.shape[0] + 1.5)))
    ax.imshow(m, cmap="Blues", **({"vmin": 0, "vmax": 1} if normalise else {}))
    ax.set_xticks(range(m.shape[1]), labels[: m.shape[1]] if len(labels) >= m.shape[1] else list(range(m.shape[1])), rotation=90, fontsize=7)
    ax.set_yticks(range(m.shape[0]), labels[: m.shape[0]], fontsize=7)
    if m.shape[0] <= 12:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if m[i, j]:
                    ax.text(j, i, f"{m[i, j]:.2f}" if normalise else f"{int(m[i, j])}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title)
    return _save(fig, path)


def plot_examples(samples, rows, path: Path, task: str, k: int = 8) -> tuple[str | None, int]:
    """A grid of example images with prediction and target; returns (file, images that
    could not be loaded)."""
    from vlkit.data.images import BadSample

    shown, failed = [], 0
    stride = max(1, len(samples) // k)  # spread over the set, not the first image's questions
    for s, r in list(zip(samples, rows))[::stride]:
        if len(shown) >= k:
            break
        if s.image is None:
            continue
        try:
            shown.append((s.image(), r))
        except (BadSample, OSError):
            failed += 1
    if not shown:
        return None, failed
    cols = min(4, len(shown))
    nrows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, r) in zip(axes.flat, shown):
        ax.imshow(img)
        if task == "grounding":
            for box, color in ((r.get("target"), "lime"), (r.get("box"), "red")):
                if box:
                    x0, y0, x1, y1 = box
                    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=color, lw=1.5))
            text = f"{r.get('text', '')}\nIoU {r['iou']:.2f}"
        elif task == "caption":
            text = f"pred: {r['prediction']}\nref: {r['references'][0]}\nCIDEr {r['cider']:.2f}"
        elif task == "vqa":
            text = f"{r.get('question', '')}\npred: {r['prediction']} | gt: {r['answers'][0]}\nacc {r['accuracy']:.2f}"
        else:
            text = f"pred: {r['prediction'][:40]} → {r['parsed']}\nanswer: {r['answer']} {'✓' if r['correct'] else '✗'}"
        ax.set_title(text, fontsize=7, wrap=True)
    return _save(fig, path), failed


def _table(d: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for k, v in d.items():
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def write_task_report(out: Path, results: dict, rows: list[dict], samples) -> Path:
    """``report.md`` and its PNGs for a generative task's results."""
    out = Path(out)
    task = results["task"]
    scalars = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and k not in ("task",)}
    md = [f"# Evaluation: {task}", "", _table(scalars), "", "## Counts", "", "```", json.dumps(results.get("counts", {}), indent=2), "```", ""]
    plots = []
    if task == "caption":
        plots.append(("CIDEr-D per image", plot_hist([r["cider"] for r in rows], out / "cider_hist.png", "CIDEr-D per image", "CIDEr-D")))
    elif task == "vqa":
        plots.append(("Accuracy per question type", plot_bars(results["accuracy_per_question_type"], out / "accuracy_per_type.png", "VQA accuracy per question type")))
    elif task == "grounding":
        plots.append(("IoU per expression", plot_hist([r["iou"] for r in rows], out / "iou_hist.png", "IoU with the target box", "IoU")))
    elif task == "mcq":
        plots.append(("Accuracy per category", plot_bars(results["accuracy_per_category"], out / "accuracy_per_category.png", "accuracy per category")))
        letter_rows = [r for r in rows if r.get("kind") == "choice"]
        if letter_rows:
            letters = sorted({r["answer"] for r in letter_rows} | {r["parsed"] for r in letter_rows if r["parsed"]})
            cols = letters + ["unparsed"]
            m = [[0] * len(cols) for _ in letters]
            for r in letter_rows:
                m[letters.index(r["answer"])][cols.index(r["parsed"]) if r["parsed"] in letters else len(letters)] += 1
            fig_name = plot_confusion(m, cols, out / "confusion.png", "chosen option (columns) vs answer (rows)")
            plots.append(("Chosen option vs answer", fig_name))
    examples, failed = plot_examples(samples, rows, out / "examples.png", task)
    if examples:
        plots.append(("Examples", examples))
    for title, name in plots:
        md += [f"## {title}", "", f"![{title}]({name})", ""]
    if failed:
        md += [f"{failed} example image(s) could not be loaded and were left out of the examples.", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
