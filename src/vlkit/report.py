"""Figures of the demo's training report (matplotlib, written as PNG); confusion matrices
are drawn by :func:`vlkit.eval.report.plot_confusion`."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def draw_loss(metrics_jsonl: Path, out: Path) -> None:
    """Training loss (and throughput) against step from a run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    rate = np.median([r["samples_per_s"] for r in rows[1:]] or [rows[0]["samples_per_s"]])
    ax.set_title(f"training loss (median {rate:.0f} samples/s)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def draw_retrieval(scenes, captions, similarity: torch.Tensor, truth: torch.Tensor, out: Path, rows: int = 6, k: int = 5) -> None:
    """For a few text queries, the top-k retrieved images; green frame = caption true of the image."""
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.7 * (k + 1) + 1.5, 1.8 * rows), dpi=110,
                             gridspec_kw={"width_ratios": [2.2] + [1] * k})
    picks = np.linspace(0, len(captions) - 1, rows).astype(int)
    for r, q in enumerate(picks):
        text_ax = axes[r, 0]
        text_ax.axis("off")
        text_ax.text(0, 0.5, _wrap(captions[q].text), va="center", fontsize=8)
        top = similarity[q].topk(k).indices.tolist()
        for c, idx in enumerate(top):
            ax = axes[r, c + 1]
            ax.imshow(scenes[idx].render())
            ax.set_xticks([])
            ax.set_yticks([])
            ok = bool(truth[idx, q])
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if ok else "red")
                spine.set_linewidth(3)
    fig.suptitle("text → image retrieval: top 5 (green: the caption is true of the image)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _wrap(text: str, width: int = 28) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])
