"""vlkit's score processors give the distribution transformers' logits processors give (within
1e-6, the same tokens removed), alone and chained in generate's order, on random scores and on
the boundary cases (top-p mass reached exactly, ties at the top-k threshold)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.generation import logits_process as hf  # noqa: E402

from vlkit.lm import logits as ours  # noqa: E402
from vlkit.lm.generation_config import GenerationConfig  # noqa: E402

V = 60


def cases(seed: int = 0, n: int = 12):
    """(history [4, T] with left padding, pad_start [4], scores [4, V]) at several scales."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        history = torch.randint(0, V, (4, 10 + i), generator=g)
        pad_start = torch.tensor([0, 3, 1, 7])
        scale = [0.1, 1.0, 5.0, 30.0][i % 4]
        scores = torch.randn(4, V, generator=g) * scale
        scores[0, :5] = scores[0, 5]  # a tie
        yield history, pad_start, scores


def assert_same(got: torch.Tensor, expected: torch.Tensor):
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got.softmax(-1), expected.softmax(-1), atol=1e-6, rtol=0)
    finite = torch.isfinite(expected)
    assert torch.allclose(got[finite], expected[finite], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("t", [0.3, 0.7, 1.6])
def test_temperature(t):
    for _, _, s in cases():
        assert_same(ours.temperature(s, t), hf.TemperatureLogitsWarper(t)(None, s.clone()))


@pytest.mark.parametrize("k,keep", [(1, 1), (5, 1), (5, 8), (V + 10, 1)])
def test_top_k(k, keep):
    for h, _, s in cases():
        assert_same(ours.top_k(s, k, keep), hf.TopKLogitsWarper(k, min_tokens_to_keep=keep)(h, s.clone()))


@pytest.mark.parametrize("p,keep", [(0.05, 1), (0.5, 1), (0.9, 3), (0.999, 1)])
def test_top_p(p, keep):
    for h, _, s in cases():
        assert_same(ours.top_p(s, p, keep), hf.TopPLogitsWarper(p, min_tokens_to_keep=keep)(h, s.clone()))


def test_top_p_keeps_the_set_that_reaches_the_mass_exactly():
    """Probabilities 1/2, 1/4, 1/8, 1/8 with p = 3/4: the two best tokens reach it, the rest go."""
    s = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    got = ours.top_p(s, 0.75)
    assert_same(got, hf.TopPLogitsWarper(0.75)(None, s.clone()))
    assert torch.isfinite(got).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("m,keep", [(0.0, 1), (0.05, 1), (0.3, 1), (0.9, 4), (1.0, 1)])
def test_min_p(m, keep):
    for h, _, s in cases():
        assert_same(ours.min_p(s, m, keep), hf.MinPLogitsWarper(m, min_tokens_to_keep=keep)(h, s.clone()))


@pytest.mark.parametrize("penalty", [0.6, 1.3, 2.0])
def test_repetition_penalty_skips_left_padding(penalty):
    for h, start, s in cases():
        ref = hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=start.clone())
        assert_same(ours.repetition_penalty(s, h, penalty, start), ref(h, s.clone()))
        assert_same(ours.repetition_penalty(s, h, penalty), hf.RepetitionPenaltyLogitsProcessor(penalty)(h, s.clone()))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram(n):
    g = torch.Generator().manual_seed(1)
    for _, _, s in cases():
        h = torch.randint(0, 6, (4, 25), generator=g)  # a small alphabet, so n-grams repeat
        assert_same(ours.ban_repeated_ngrams(s, h, n), hf.NoRepeatNGramLogitsProcessor(n)(h, s.clone()))


def test_min_new_tokens_bans_every_eos_until_enough_are_out():
    eos = [4, 9]
    for step in (0, 2, 3, 5):
        for h, _, s in cases():
            prompt = h.shape[1] - step  # `step` tokens of the history are new
            ref = hf.MinNewTokensLengthLogitsProcessor(prompt, 3, eos)(h, s.clone())
            (chain,) = ours.processors(GenerationConfig(min_new_tokens=3, eos_token_id=eos), None, s.device)
            assert_same(chain(h, s, step), ref)


@pytest.mark.parametrize("beams", [1, 3])
def test_the_chain_matches_transformers_in_order(beams):
    """generate's processors in generate's order: penalty, n-gram ban, EOS ban, temperature,
    top-k, top-p, min-p (beams keep one token more than there are EOS ids)."""
    cfg = GenerationConfig(do_sample=True, temperature=0.8, top_k=25, top_p=0.8, min_p=0.02, repetition_penalty=1.2,
                           no_repeat_ngram_size=2, min_new_tokens=30, eos_token_id=[1, 2], num_beams=beams)
    keep = 3 if beams > 1 else 1
    for h, start, s in cases(seed=3):
        ref = hf.LogitsProcessorList([
            hf.RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=start.clone()),
            hf.NoRepeatNGramLogitsProcessor(2),
            hf.MinNewTokensLengthLogitsProcessor(h.shape[1], 30, [1, 2]),
            hf.TemperatureLogitsWarper(0.8),
            hf.TopKLogitsWarper(25, min_tokens_to_keep=keep),
            hf.TopPLogitsWarper(0.8, min_tokens_to_keep=keep),
            hf.MinPLogitsWarper(0.02, min_tokens_to_keep=keep),
        ])(h, s.clone())
        got = s
        for f in ours.processors(cfg, start, s.device):
            got = f(h, got, 0)
        assert_same(got, ref)
        assert torch.isinf(got[:, [1, 2]]).all()


def test_processors_are_off_by_default_and_for_greedy():
    assert ours.processors(GenerationConfig(), None, torch.device("cpu")) == []
    assert ours.processors(GenerationConfig(temperature=0.5, top_k=3, top_p=0.5), None, torch.device("cpu")) == []
