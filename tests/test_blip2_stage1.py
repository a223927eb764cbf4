"""BLIP-2 stage 1: the three objectives against direct computations on a tiny batch, the attention
patterns as the model uses them, ITC under two ranks, captions through the one generation loop, and
parity with transformers' Blip2ForImageTextRetrieval (ITC and ITM scores) from save_pretrained folders."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vlkit.connectors.qformer import QFormerConfig
from vlkit.errors import CheckpointError, VlkitError
from vlkit.eval.retrieval import itc_itm_retrieval
from vlkit.losses import hard_negatives, qformer_itc_loss
from vlkit.models.blip2_qformer import Blip2QFormer, Blip2QFormerConfig
from vlkit.vision.vit import ViTConfig

from _interop_util import max_diff, perturb

M, W, DV, VOCAB, DEC, EOS, PAD = 4, 32, 24, 40, 3, 2, 0


def tiny(**kw) -> Blip2QFormer:
    torch.manual_seed(0)
    cfg = Blip2QFormerConfig(
        vision=ViTConfig(image_size=16, patch_size=8, width=DV, depth=2, num_heads=2),
        qformer=QFormerConfig(width=W, depth=2, num_heads=4, mlp_dim=64, num_queries=M, context_dim=DV, text=True,
                              vocab_size=VOCAB, max_positions=12, dropout=0.0),
        embed_dim=16, dec_token_id=DEC, eos_token_id=EOS, **kw,
    )
    return perturb(Blip2QFormer(cfg), scale=0.3)


def batch(seed: int = 0, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(b, 3, 16, 16, generator=g)
    ids = torch.randint(4, VOCAB, (b, 6), generator=g)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = PAD
    return pixels, ids, mask


def direct_itc(model, pixels, ids, mask, smoothing: float) -> torch.Tensor:
    """ITC written out: each image's best query cosine with each text's [CLS], times 1/temperature,
    cross entropy both ways with label smoothing, from features computed apart."""
    q = model.encode_image(pixels)
    t = model.encode_text(ids, mask)
    scale = model.logit_scale.exp().item()
    b = len(ids)
    sim = torch.tensor([[max(float(q[i, m] @ t[j]) for m in range(M)) * scale for j in range(b)] for i in range(b)])

    def ce(logits_row, target):
        logp = logits_row - torch.logsumexp(logits_row, 0)
        return -(1 - smoothing) * logp[target] - smoothing * logp.mean()

    i2t = sum(ce(sim[i], i) for i in range(b)) / b
    t2i = sum(ce(sim[:, j], j) for j in range(b)) / b
    return (i2t + t2i) / 2


def direct_itg(model, pixels, ids, mask) -> torch.Tensor:
    """ITG written out: [DEC] first, mean over real tokens t >= 1 of -log p(token t | logits at t-1)."""
    dec = ids.clone()
    dec[:, 0] = DEC
    logits = model.itg_logits(model.image_tokens(pixels), dec, mask)
    terms = [-torch.log_softmax(logits[i, t - 1], 0)[dec[i, t]] for i in range(len(ids)) for t in range(1, ids.shape[1]) if mask[i, t]]
    return torch.stack(terms).mean()


def direct_itm(model, pixels, ids, mask, generator) -> torch.Tensor:
    """ITM written out: negatives drawn (same generator, same order: images for texts, then texts
    for images) from exp(sim) over the non-matching columns; logits = mean over queries of the head."""
    tokens = model.image_tokens(pixels)
    q, t = model.encode_image(pixels), model.encode_text(ids, mask)
    scale = model.logit_scale.exp()
    b = len(ids)
    sim = torch.stack([torch.stack([(q[i] @ t[j]).max() * scale for j in range(b)]) for i in range(b)])
    same = [[bool((ids[i][mask[i] == 1].tolist() == ids[j][mask[j] == 1].tolist())) for j in range(b)] for i in range(b)]

    def draw(rows):
        weights = torch.tensor([[0.0 if same[r][c] else math.exp(float(rows[r, c]) - float(rows[r].max())) for c in range(b)] for r in range(b)])
        return torch.multinomial(weights / weights.sum(1, keepdim=True), 1, generator=generator).squeeze(1)

    neg_image = draw(sim.T)  # for each text: an image
    neg_text = draw(sim)  # for each image: a text
    pairs = [(i, i, 1) for i in range(b)] + [(int(neg_image[i]), i, 0) for i in range(b)] + [(i, int(neg_text[i]), 0) for i in range(b)]
    losses = []
    for img, txt, label in pairs:
        out = model.qformer.encode(tokens[img : img + 1], ids[txt : txt + 1], "itm", text_mask=mask[txt : txt + 1])
        logits = model.itm_head(out.queries[0]).mean(0)
        losses.append(-torch.log_softmax(logits, 0)[label])
    return torch.stack(losses).mean()


@torch.no_grad()
def test_the_three_losses_match_direct_computations():
    model = tiny().eval()
    pixels, ids, mask = batch()
    model(pixels, ids, mask, generator=torch.Generator().manual_seed(5))
    got = model.last_losses
    assert got["itc"] == pytest.approx(float(direct_itc(model, pixels, ids, mask, 0.1)), abs=1e-5)
    assert got["itg"] == pytest.approx(float(direct_itg(model, pixels, ids, mask)), abs=1e-5)
    assert got["itm"] == pytest.approx(float(direct_itm(model, pixels, ids, mask, torch.Generator().manual_seed(5))), abs=1e-5)


@torch.no_grad()
def test_itm_treats_identical_texts_as_positives(monkeypatch):
    from vlkit.models import blip2_qformer

    seen = []
    monkeypatch.setattr(blip2_qformer, "hard_negatives", lambda sim, pos, g: seen.append(pos) or hard_negatives(sim, pos, g))
    model = tiny().eval()
    pixels, ids, mask = batch()
    ids[3], mask[3] = ids[0], mask[0]  # image 3's caption is image 0's
    model(pixels, ids, mask)
    want = torch.eye(4, dtype=torch.bool)
    want[0, 3] = want[3, 0] = True
    assert len(seen) == 2 and all(torch.equal(pos, want) for pos in seen)


def test_hard_negatives_follow_the_softmax_over_negatives():
    sim = torch.tensor([[3.0, 1.0, 0.0, 2.0], [0.5, 4.0, 0.5, -1.0]])
    positives = torch.tensor([[True, False, False, False], [False, True, False, False]])
    draws = hard_negatives(sim.repeat(4000, 1), positives.repeat(4000, 1), torch.Generator().manual_seed(0)).view(4000, 2)
    for r in range(2):
        want = sim[r].masked_fill(positives[r], float("-inf")).softmax(0)
        freq = torch.bincount(draws[:, r], minlength=4).float() / 4000
        assert freq[positives[r]].sum() == 0
        assert max_diff(freq, want) < 0.03
    with pytest.raises(VlkitError, match="no negative"):
        hard_negatives(sim[:1, :1], positives[:1, :1])
    # all mass on the positive (softmax underflow): uniform over the negatives
    assert set(hard_negatives(torch.tensor([[1e4, 0.0, 0.0]]).expand(50, -1), torch.tensor([[True, False, False]]).expand(50, -1),
                              torch.Generator().manual_seed(1)).tolist()) == {1, 2}


@torch.no_grad()
def test_queries_ignore_the_text_in_itc_and_itg_and_read_it_in_itm():
    model = tiny().eval()
    pixels, ids, mask = batch()
    other = ids.clone()
    other[:, 1:] = (other[:, 1:] + 7) % (VOCAB - 4) + 4
    tokens = model.image_tokens(pixels)
    alone = model.qformer(tokens)
    for pattern, sees_text in (("itc", False), ("itg", False), ("itm", True)):
        a = model.qformer.encode(tokens, ids, pattern, text_mask=mask).queries
        b = model.qformer.encode(tokens, other, pattern, text_mask=mask).queries
        assert (max_diff(a, b) > 1e-3) == sees_text, pattern
        if not sees_text:
            assert max_diff(a, alone) < 1e-5, pattern
    # ITM's logits move with the text; ITC's image side cannot (encode_image takes no text)
    assert max_diff(model.itm_scores(tokens, ids, mask), model.itm_scores(tokens, other, mask)) > 1e-3


@torch.no_grad()
def test_retrieval_rescores_the_itc_top_k_by_itm_log_odds_plus_the_itc_logit():
    model = tiny().eval()
    pixels, ids, mask = batch()
    texts = [str(i) for i in range(len(ids))]
    model.tokenizer = lambda names: {"input_ids": ids[[int(n) for n in names]], "attention_mask": mask[[int(n) for n in names]]}
    tokens = model.image_tokens(pixels)
    positives = torch.eye(len(ids), dtype=torch.bool)
    _, got = itc_itm_retrieval(model, tokens, texts, positives, k=2)
    cos = model.similarity(model.encode_image(pixels), model.encode_text(ids, mask)).T  # [texts, images]
    itc = cos * model.logit_scale.exp()
    assert model.logit_scale.exp() > 2  # the ITC term's scale shows
    want = torch.full_like(itc, float("-inf"))
    for t in range(len(ids)):
        for i in itc[t].topk(2).indices.tolist():
            logits = model.itm_head(model.qformer.encode(tokens[i : i + 1], ids[t : t + 1], "itm", text_mask=mask[t : t + 1]).queries[0]).mean(0)
            want[t, i] = logits[1] - logits[0] + itc[t, i]
    assert torch.allclose(got, want, atol=1e-5)
    # the same vector added to both rows of the head moves each match logit, not the log-odds
    model.itm_head.weight += torch.randn(W)
    assert torch.allclose(itc_itm_retrieval(model, tokens, texts, positives, k=2)[1], want, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("t", [1, 3])
def test_itg_output_at_t_does_not_depend_on_later_tokens(t):
    model = tiny().eval()
    pixels, ids, _ = batch()
    ids[:, 0] = DEC
    later = ids.clone()
    later[:, t + 1 :] = (later[:, t + 1 :] + 5) % (VOCAB - 4) + 4
    tokens = model.image_tokens(pixels)
    a, b = model.itg_logits(tokens, ids), model.itg_logits(tokens, later)
    assert max_diff(a[:, : t + 1], b[:, : t + 1]) < 1e-6
    assert max_diff(a[:, t + 1 :], b[:, t + 1 :]) > 1e-3
    assert max_diff(a, model.itg_logits(model.image_tokens(torch.randn_like(pixels)), ids)) > 1e-3  # it sees the image


def test_training_reaches_every_trainable_part_and_not_the_frozen_tower():
    model = tiny(itc_label_smoothing=0.0).train()
    model.vision.requires_grad_(False)
    pixels, ids, mask = batch()
    model(pixels, ids, mask).backward()
    for name, p in model.named_parameters():
        if name.startswith("vision."):
            assert p.grad is None, name
        elif "text_mlp" in name and name.startswith("qformer.layers.1.") or name.endswith("embed_norm.bias"):
            continue
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.logit_scale.grad.abs() > 0


def test_temperature_is_clamped_after_a_step():
    model = tiny()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_temperature()
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.001, rel=1e-5)


class _WordTokenizer:
    """Stands in for the tokenizer: ids → space-joined numbers, special ids dropped."""

    class tok:
        @staticmethod
        def decode_batch(rows, skip_special_tokens=True):
            return [" ".join(str(i) for i in row if i not in (PAD, DEC, EOS)) for row in rows]


@torch.no_grad()
def test_captions_come_from_the_generation_loop_and_equal_a_hand_written_greedy_loop():
    model = tiny().eval()
    model.tokenizer = _WordTokenizer
    pixels = batch()[0][:2]
    tokens = model.image_tokens(pixels)
    want = []
    for i in range(len(pixels)):
        seq = [DEC]
        for _ in range(4):
            nxt = int(model.itg_logits(tokens[i : i + 1], torch.tensor([seq]))[0, -1].argmax())
            if nxt == EOS:
                break
            seq.append(nxt)
        want.append(" ".join(str(t) for t in seq[1:]))
    assert model.caption(pixels, max_new_tokens=4) == want
    beams = model.caption(pixels, max_new_tokens=4, num_beams=2)
    assert len(beams) == len(pixels) and all(isinstance(c, str) for c in beams)


def test_bad_input_is_named():
    model = tiny().eval()
    pixels, ids, mask = batch()
    with pytest.raises(VlkitError, match="takes 16x16"):
        model.encode_image(torch.randn(1, 3, 24, 24))
    with pytest.raises(VlkitError, match="12 positions"):
        model.encode_text(torch.ones(1, 13, dtype=torch.long))
    with pytest.raises(VlkitError, match="outside this model's vocabulary"):
        model.encode_text(torch.full((1, 3), VOCAB))
    with pytest.raises(VlkitError, match="no ITG head"):
        tiny(decoder=False).itg_logits(model.image_tokens(pixels), ids)
    with pytest.raises(ValueError, match="context_dim"):
        Blip2QFormerConfig(vision=ViTConfig(width=64, num_heads=4), qformer=QFormerConfig(context_dim=32, width=32, num_heads=4, text=True))
    with pytest.raises(ValueError, match="text path"):
        Blip2QFormerConfig(qformer=QFormerConfig(text=False))


# --- ITC under two ranks -----------------------------------------------------------------------

WORLD = 2


def _itc_problem():
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(6, 3, 5, generator=g)
    texts = torch.randn(6, 5, generator=g)
    return queries, texts


def _itc_loss_and_grads(queries, texts):
    queries, texts = queries.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    scale = torch.tensor(math.log(10.0)).requires_grad_(True)
    loss, sim_i2t, sim_t2i = qformer_itc_loss(F.normalize(queries, dim=-1), F.normalize(texts, dim=-1), scale.exp(), 0.1)
    loss.backward()
    return {"loss": loss.detach(), "queries.grad": queries.grad, "texts.grad": texts.grad, "scale.grad": scale.grad,
            "sim_i2t": sim_i2t.detach(), "sim_t2i": sim_t2i.detach()}


def _itc_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        queries, texts = _itc_problem()
        half = slice(rank * 3, rank * 3 + 3)
        result = _itc_loss_and_grads(queries[half], texts[half])
        out = {}
        for name, value in result.items():
            value = value.contiguous()
            if name in ("loss", "scale.grad"):  # averaged over ranks, as DDP averages
                dist.all_reduce(value)
                out[name] = value / WORLD
            else:  # each rank's rows, stacked (input gradients scaled as DDP's averaging scales them)
                parts = [torch.empty_like(value) for _ in range(WORLD)]
                dist.all_gather(parts, value)
                out[name] = torch.cat(parts) / (WORLD if name.endswith(".grad") else 1)
        if rank == 0:
            save_file(out, str(Path(out_dir) / "itc.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_itc_under_two_ranks_equals_one_process(tmp_path):
    mp.spawn(_itc_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    two = load_file(str(tmp_path / "itc.safetensors"))
    one = _itc_loss_and_grads(*_itc_problem())
    for name, value in one.items():
        assert value.abs().sum() > 0, name
        torch.testing.assert_close(two[name], value, atol=1e-5, rtol=1e-5, msg=name)


def _model_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Each rank runs the stage-1 model's forward on its half of the batch."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = tiny().eval()
        pixels, ids, mask = batch()
        half = slice(rank * 2, rank * 2 + 2)
        from vlkit.models import blip2_qformer

        drawn = []
        real = blip2_qformer.hard_negatives
        blip2_qformer.hard_negatives = lambda sim, pos, g: drawn.append(out := real(sim, pos, g)) or out
        model(pixels[half], ids[half], mask[half], generator=torch.Generator().manual_seed(rank))
        itc = torch.tensor([model.last_losses["itc"]])
        dist.all_reduce(itc)
        result = {"itc": itc / WORLD, "drawn": torch.cat(drawn), "itm": torch.tensor([model.last_losses["itm"]])}
        parts = {k: [torch.empty_like(v) for _ in range(WORLD)] for k, v in result.items()}
        for k, v in result.items():
            dist.all_gather(parts[k], v)
        if rank == 0:
            save_file({k: torch.cat(v) for k, v in parts.items()}, str(Path(out_dir) / "model.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_the_model_under_two_ranks_scores_itc_over_the_whole_batch_and_draws_negatives_from_it(tmp_path):
    mp.spawn(_model_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    two = load_file(str(tmp_path / "model.safetensors"))
    model = tiny().eval()
    with torch.no_grad():
        model(*batch())
    assert two["itc"][0].item() == pytest.approx(model.last_losses["itc"], abs=1e-5)
    assert torch.isfinite(two["itm"]).all()
    # rank 0 owns rows 0-1 of the gathered batch, rank 1 rows 2-3: each draws some negatives from the other's rows
    rank0, rank1 = set(two["drawn"][:4].tolist()), set(two["drawn"][4:].tolist())
    assert rank0 & {2, 3} and rank1 & {0, 1} and (rank0 | rank1) <= {0, 1, 2, 3}


# --- transformers Blip2ForImageTextRetrieval ------------------------------------------------------


@pytest.fixture(scope="module")
def retrieval_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("blip2_itm")
    torch.manual_seed(0)
    cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=DV, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8),
        qformer_config=dict(hidden_size=W, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=DV,
                            vocab_size=VOCAB, max_position_embeddings=20, use_qformer_text_input=True),
        num_query_tokens=M, image_text_hidden_size=16,
    )
    hf = perturb(transformers.Blip2ForImageTextRetrieval(cfg))
    hf.save_pretrained(folder)
    return hf, folder


def _load(folder):
    import vlkit

    return vlkit.load(folder)


@torch.no_grad()
def test_itc_and_itm_scores_match_transformers(retrieval_folder):
    hf, folder = retrieval_folder
    with pytest.warns(UserWarning, match="tokenizer.json"):
        ours = _load(folder)
    assert isinstance(ours, Blip2QFormer) and ours.itg_head is None
    pixels, ids, mask = batch(b=3)
    want_itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image
    got_itc = ours.similarity(ours.encode_image(pixels), ours.encode_text(ids, mask))
    assert got_itc.shape == (3, 3)
    assert max_diff(got_itc, want_itc) < 1e-5
    want_itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True).logits_per_image
    tokens = ours.image_tokens(pixels)
    assert max_diff(ours.itm_logits(tokens, ids, mask), want_itm) < 1e-5
    assert max_diff(ours.itm_scores(tokens, ids, mask), want_itm[:, 1] - want_itm[:, 0]) < 1e-5
    assert max_diff(want_itm[0], want_itm[1]) > 1e-4  # the pairs differ, so a swapped row would show


def test_retrieval_folder_with_another_query_count_is_refused(retrieval_folder):
    _, folder = retrieval_folder
    raw = json.loads((folder / "config.json").read_text())
    from vlkit.interop import hf_qformer

    with pytest.raises(CheckpointError, match="query_tokens"):
        hf_qformer.load_retrieval(folder, {**raw, "num_query_tokens": M + 1})
