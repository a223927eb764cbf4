"""Image↔text retrieval recall@K, batched over a positives mask (no per-sample Python loop)."""

from __future__ import annotations

import torch

from vlkit.errors import VlkitError


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """``scores`` ``[Q, G]`` query × gallery; ``positives`` boolean ``[Q, G]``. A query is a hit
    at K when any positive ranks within the top K (ties broken against the query)."""
    if positives.shape != scores.shape:
        raise VlkitError(f"positives {tuple(positives.shape)} and scores {tuple(scores.shape)} differ in shape")
    if 0 in scores.shape:
        raise VlkitError(f"recall@K needs at least one query and one gallery item, got scores of shape {tuple(scores.shape)}")
    best_pos = scores.masked_fill(~positives, float("-inf")).max(dim=1).values
    rank = (scores > best_pos[:, None]).sum(dim=1) + (scores == best_pos[:, None]).logical_and(~positives).sum(dim=1)
    has_pos = positives.any(dim=1)
    return {k: ((rank < k) & has_pos).float().mean().item() for k in ks}


def retrieval(image_features: torch.Tensor, text_features: torch.Tensor, positives: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """``positives[i, t]``: text t correctly describes image i. Returns i2t and t2i R@K."""
    sim = image_features @ text_features.T
    i2t = recall_at_k(sim, positives, ks)
    t2i = recall_at_k(sim.T, positives.T, ks)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}
