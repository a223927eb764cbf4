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


def rerank(itc: torch.Tensor, k: int, pair_scores, batch_size: int = 256) -> torch.Tensor:
    """Scores ``[Q, G]`` after re-scoring: each query's top ``k`` items by ``itc`` get
    ``pair_scores(queries, items) + itc``, every other item ``-inf``, so it ranks below them.
    ``pair_scores`` takes index tensors and returns one score per pair."""
    k = min(k, itc.shape[1])
    top = itc.topk(k, dim=1)
    queries = torch.arange(itc.shape[0], device=itc.device).repeat_interleave(k)
    items = top.indices.flatten()
    scores = torch.cat([pair_scores(queries[i : i + batch_size], items[i : i + batch_size]).float()
                        for i in range(0, len(items), batch_size)])  # fmt: skip
    out = torch.full_like(itc, float("-inf"))
    return out.scatter_(1, top.indices, scores.view(-1, k) + top.values)


@torch.no_grad()
def image_tokens(model, pixel_batches, precision: str = "fp32", progress: bool = False, total: int | None = None) -> torch.Tensor:
    """BLIP-2 stage 1: the vision tower's tokens ``[N, tokens, width]`` of every image, which both ITC
    (through the queries) and ITM (with each candidate text) read."""
    from tqdm import tqdm

    from vlkit.precision import autocast

    device = next(model.parameters()).device
    out = []
    for pixels in tqdm(pixel_batches, desc="images", disable=not progress, total=total, unit="batch"):
        with autocast(precision, device):
            out.append(model.image_tokens(pixels.to(device)).float())
    if not out:
        raise VlkitError("image_tokens got no image batches; expected at least one [B,3,H,W] pixel tensor")
    return torch.cat(out)


@torch.no_grad()
def itc_itm_retrieval(model, tokens: torch.Tensor, texts: list[str], positives: torch.Tensor, k: int = 16,
                      batch_size: int = 256) -> tuple[dict, torch.Tensor]:  # fmt: skip
    """BLIP-2's retrieval: ITC ranks; each query's top ``k`` is re-scored by ITM's match log-odds plus
    the ITC logit, each on the scale its loss trained (:func:`rerank`; LAVIS's match logit plus plain
    cosine scored below ITC alone on a shapes split, this rule on none: benchmarks/RESULTS.md).
    Returns the recalls after ITM (``i2t_r1`` ...), by ITC alone (``i2t_r1_itc`` ...), and the
    text→image scores ``[T, I]`` after ITM."""
    ids = model.tokenizer(texts)
    device = next(model.parameters()).device
    input_ids, mask = ids["input_ids"].to(device), ids["attention_mask"].to(device)
    image_feats = torch.cat([model.image_features(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)])
    text_feats = torch.cat([model.encode_text(input_ids[i : i + batch_size], mask[i : i + batch_size])
                            for i in range(0, len(texts), batch_size)])  # fmt: skip
    itc = model.itc_logits(image_feats, text_feats)

    def pairs(images: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        return model.itm_scores(tokens[images], input_ids[text_rows], mask[text_rows])

    i2t = rerank(itc, k, pairs, batch_size)
    t2i = rerank(itc.T, k, lambda t, i: pairs(i, t), batch_size)
    results = {}
    for direction, scores, pos in (("i2t", itc, positives), ("t2i", itc.T, positives.T)):
        results |= {f"{direction}_r{n}_itc": v for n, v in recall_at_k(scores, pos).items()}
    results |= {f"i2t_r{n}": v for n, v in recall_at_k(i2t, positives).items()}
    results |= {f"t2i_r{n}": v for n, v in recall_at_k(t2i, positives.T).items()}
    return results, t2i
