"""Contrastive losses (softmax InfoNCE and sigmoid) with exact distributed gathering, and the
next-token loss of language models and VLMs.

Under ``torch.distributed`` each rank all-gathers the other ranks' features *with gradient*
and computes only its own rows against the global batch ("local loss"), so the loss and
gradients equal those of one process holding the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlkit.errors import VlkitError

IGNORE_INDEX = -100
"""The label of a position no loss is computed at (prompts, images, padding), as transformers uses."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather with gradient: every rank's loss uses the gathered rows, so the backward
    sums every rank's gradient of them and hands each rank the rows it contributed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0; gradients flow back to each rank's part."""
    if not _distributed():
        return x
    return _GatherWithGrad.apply(x)


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric InfoNCE over ``scale · I · Tᵀ`` (features L2-normalised by the caller).

    Each rank's rows are scored against all ranks' columns; the mean over ranks' losses
    (DDP averages gradients) equals the single-process loss.
    """
    all_images, all_texts = gather_with_grad(image_features), gather_with_grad(text_features)
    n = image_features.shape[0]
    labels = torch.arange(n, device=image_features.device) + n * _rank()
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    return (
        F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    ) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """SigLIP: ``-Σ logsigmoid(z ⊙ (s·I·Tᵀ + b)) / n``, z = +1 on matching pairs, −1 elsewhere.

    Each rank scores its images against all texts; other ranks' texts are negatives only.
    """
    all_texts = gather_with_grad(text_features)
    n = image_features.shape[0]
    logits = logit_scale * image_features @ all_texts.T + logit_bias
    z = -torch.ones_like(logits)
    cols = torch.arange(n, device=logits.device) + n * _rank()
    z[torch.arange(n, device=logits.device), cols] = 1.0
    return -F.logsigmoid(z * logits).sum() / n


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of each position's logits against the next label, labels of -100
    skipped, in fp32 (transformers' ``ForCausalLMLoss``)."""
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise VlkitError(f"labels have shape {tuple(labels.shape)}; expected {tuple(logits.shape[:2])} like input_ids")
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
