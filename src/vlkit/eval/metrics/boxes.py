"""Grounding accuracy: Acc@IoU≥threshold over boxes parsed from answers (see :mod:`vlkit.boxes`)."""

from __future__ import annotations

from vlkit.boxes import iou


def grounding_accuracy(predicted: list, targets: list, threshold: float = 0.5) -> dict:
    """Acc@threshold and mean IoU; a ``None`` prediction (unparseable) is a miss with IoU 0."""
    if len(predicted) != len(targets):
        raise ValueError(f"grounding_accuracy: {len(predicted)} predictions for {len(targets)} targets")
    ious = [iou(p, t) if p is not None else 0.0 for p, t in zip(predicted, targets)]
    n = len(ious)
    return {
        f"acc@{threshold:g}": sum(v >= threshold for v in ious) / n if n else 0.0,
        "mean_iou": sum(ious) / n if n else 0.0,
        "unparsed": sum(p is None for p in predicted),
        "ious": ious,
    }
