"""The decoding loop keeps the speed contract: one cache for prompt + new tokens, allocated once;
the prefill asks only for the last logits; each step feeds one token per row at its own position;
no forward after the last token; the loop stops when every row has ended."""

from __future__ import annotations

import torch

from vlkit.lm import LlamaConfig, LlamaLM
from vlkit.lm.generate import _AllEnded, generate


class Spy(LlamaLM):
    """A tiny Llama that records how generation calls it."""

    def __init__(self):
        super().__init__(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=64))
        self.calls, self.caches = [], []

    def new_cache(self, batch, max_length, dtype=None, device=None):
        self.caches.append((batch, max_length))
        return super().new_cache(batch, max_length, dtype, device)

    def forward(self, **kwargs):
        ids, pos = kwargs.get("input_ids"), kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        self.calls.append((tuple(ids.shape), kwargs["logits_to_keep"], None if pos is None else pos.tolist(),
                           None if mask is None else tuple(mask.shape)))
        return super().forward(**kwargs)


def test_one_cache_last_logits_one_token_per_step():
    torch.manual_seed(0)
    lm = Spy().eval()
    ids = torch.randint(3, 40, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    generate(lm, ids, mask, max_new_tokens=5)
    assert lm.caches == [(2, 11)]
    assert lm.calls[0] == ((2, 6), 1, None, (2, 6))
    assert [c[0] for c in lm.calls[1:]] == [(2, 1)] * 4  # no forward after the 5th token
    assert [c[2] for c in lm.calls[1:]] == [[[4 + s], [6 + s]] for s in range(4)]  # each row's own position
    assert [c[3] for c in lm.calls[1:]] == [(2, 7 + s) for s in range(4)]
    assert all(c[1] == 1 for c in lm.calls)


def test_no_mask_is_passed_when_no_row_is_padded():
    lm = Spy().eval()
    generate(lm, torch.randint(3, 40, (2, 6)), torch.ones(2, 6, dtype=torch.long), max_new_tokens=3)
    assert all(c[3] is None for c in lm.calls)


def test_the_loop_stops_when_every_row_has_ended():
    torch.manual_seed(0)
    lm = Spy().eval()
    ids = torch.randint(3, 40, (2, 6))
    free = generate(lm, ids, max_new_tokens=12)
    eos = [int(free[0, 2]), int(free[1, 4])]
    lm.calls.clear()
    out = generate(lm, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    ends = [min(i for i, t in enumerate(row) if t in eos) for row in free.tolist()]
    assert out.shape[1] == max(ends) + 1 and len(lm.calls) == max(ends) + 1
    for row, end in zip(out.tolist(), ends):
        assert row[end] in eos and all(t == 0 for t in row[end + 1 :])


def test_the_lazy_end_check_answers_one_step_late():
    """On a GPU the loop reads whether every row has ended one step late (no stall) and keeps the
    same steps: the step it reports at is the first whose tokens are all padding."""
    rows = [[True, True], [True, False], [False, False], [False, False]]
    now, late = _AllEnded(torch.device("cpu")), _AllEnded(torch.device("cpu"), lazy=True)
    assert [now(torch.tensor(r), step) for step, r in enumerate(rows)] == [None, None, 3, 4]
    assert [late(torch.tensor(r), step) for step, r in enumerate(rows)] == [None, None, None, 3]
