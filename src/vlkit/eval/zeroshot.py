"""Zero-shot classification: class names × prompt templates, averaged and renormalised."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlkit.errors import VlkitError
from vlkit.eval.embed import embed_texts


def classifier_weights(model, classnames: list[str], templates: list[str], precision: str = "fp32") -> torch.Tensor:
    """``[C, D]``: per class, the mean of its normalised prompt embeddings, renormalised."""
    if not classnames or not templates:
        raise VlkitError(f"zero-shot needs at least one class name and one template, got {len(classnames)} and {len(templates)}")
    prompts = [t.format(c=c) for c in classnames for t in templates]
    feats = embed_texts(model, prompts, precision=precision).view(len(classnames), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1, top-5, mean per-class recall and the confusion matrix (rows = true class)."""
    if labels.numel() == 0:
        raise VlkitError("classification metrics need at least one labelled image, got none")
    if logits.shape != (labels.shape[0], num_classes):
        raise VlkitError(f"logits of shape {tuple(logits.shape)}; expected {(labels.shape[0], num_classes)} (images × classes)")
    k = min(5, num_classes)
    topk = logits.topk(k, dim=-1).indices
    pred = topk[:, 0]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(dim=1)
    present = support > 0
    recall = confusion.diag()[present].float() / support[present].float()
    return {
        "top1": (pred == labels).float().mean().item(),
        "top5": (topk == labels[:, None]).any(dim=-1).float().mean().item(),
        "mean_per_class_recall": recall.mean().item(),
        "confusion": confusion,
    }


def zeroshot(model, image_features: torch.Tensor, labels: torch.Tensor, classnames: list[str], templates: list[str]) -> dict:
    """Classify normalised image features ``[N, D]`` against prompt-averaged class weights."""
    weights = classifier_weights(model, classnames, templates)
    logits = 100.0 * image_features @ weights.T
    return classification_metrics(logits, labels, len(classnames))
