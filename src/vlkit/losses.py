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


LOSS_REDUCTIONS = ("token", "answer")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "token") -> torch.Tensor:
    """Cross entropy of each position's logits against the next label, labels of -100 skipped,
    in fp32. ``reduction`` "token": the mean over supervised tokens (transformers'
    ``ForCausalLMLoss``); "answer": the mean over answers (runs of consecutive supervised labels)
    of each answer's mean, so a one-word answer counts as much as a 20-token box or caption."""
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise VlkitError(f"labels have shape {tuple(labels.shape)}; expected {tuple(logits.shape[:2])} like input_ids")
    targets = _targets(labels.to(logits.device))
    if reduction == "token":
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    supervised = targets != IGNORE_INDEX
    losses = F.cross_entropy(logits.float()[supervised], targets[supervised], reduction="none")
    answer = _answer_starts(supervised).flatten().cumsum(0)[supervised.flatten()] - 1  # each supervised token's answer
    if len(answer) == 0:
        return logits.sum() * 0.0
    sums = torch.zeros(int(answer[-1]) + 1, device=losses.device).index_add_(0, answer, losses)
    return (sums / torch.bincount(answer)).mean()


def _targets(labels: torch.Tensor) -> torch.Tensor:
    """Each position's next label (the last position's: none)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def _answer_starts(supervised: torch.Tensor) -> torch.Tensor:
    """Where each run of supervised targets (an answer) begins."""
    return supervised & ~F.pad(supervised, (1, 0), value=False)[:, :-1]


def loss_units(labels: torch.Tensor, reduction: str = "token") -> int:
    """What :func:`causal_lm_loss` averages over for ``labels``: its supervised tokens ("token") or
    answers ("answer"). Rows split into parts give the whole's loss as the parts' losses weighted by
    their shares of these."""
    supervised = _targets(labels) != IGNORE_INDEX
    return int((supervised if reduction == "token" else _answer_starts(supervised)).sum())


def global_rows(n: int, device=None) -> torch.Tensor:
    """Where this rank's ``n`` rows sit in a batch gathered by :func:`gather_with_grad`."""
    return torch.arange(n, device=device) + n * _rank()


def max_query_similarity(query_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``[I, M, E]`` query embeddings × ``[T, E]`` text embeddings → ``[I, T]``: each image's best
    query for each text (BLIP-2's image-text similarity; cosines when both are L2-normalised)."""
    return torch.einsum("ime,te->imt", query_features, text_features).max(dim=1).values


def qformer_itc_loss(
    query_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BLIP-2's image-text contrastive loss: symmetric cross entropy over :func:`max_query_similarity`
    times ``logit_scale`` (1 / temperature), this rank's rows against every rank's (gathered with gradient, so the
    loss equals one process holding the whole batch). Returns ``(loss, sim_i2t, sim_t2i)``, the
    similarities ``[B, world·B]`` of this rank's images and texts against all texts and images."""
    all_queries, all_texts = gather_with_grad(query_features), gather_with_grad(text_features)
    labels = global_rows(query_features.shape[0], query_features.device)
    sim_i2t = logit_scale * max_query_similarity(query_features, all_texts)
    sim_t2i = logit_scale * max_query_similarity(all_queries, text_features).T
    loss = (F.cross_entropy(sim_i2t, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, labels, label_smoothing=label_smoothing)) / 2  # fmt: skip
    return loss, sim_i2t, sim_t2i


@torch.no_grad()
def hard_negatives(similarity: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One column per row ``[B]``, drawn from ``softmax(similarity)`` over the columns that are not
    ``positives`` (BLIP-2's ITM negatives: likely-looking but wrong). A row whose softmax left all
    its mass on positives draws uniformly among its negatives."""
    negatives = ~positives
    if not bool(negatives.any(dim=1).all()):
        raise VlkitError("a row has no negative to draw (every column is a positive); ITM needs at least two different pairs in the batch")
    weights = similarity.float().softmax(dim=1).masked_fill(positives, 0.0)
    empty = weights.sum(dim=1) == 0
    weights[empty] = negatives[empty].float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_loss(logits: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """Image-text matching: cross entropy of two-way logits ``[N, 2]`` against ``matched`` ``[N]``
    (class 1 = the text describes the image)."""
    return F.cross_entropy(logits.float(), matched.long())
