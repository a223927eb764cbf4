"""The step-wise decoding batch a server drives (``vlkit.lm.batching.DecodingBatch``): rows that join
at different steps, with different prompts, lengths and options, leave when they end and give
the tokens ``generate`` gives each prompt alone; the joined cache keeps every row's own positions."""

from __future__ import annotations

import pytest
import torch

from vlkit.errors import VlkitError
from vlkit.lm import LlamaConfig, LlamaLM
from vlkit.lm.batching import DecodingBatch
from vlkit.lm.cache import KVCache
from vlkit.lm.generate import generate, resolve_config
from vlkit.text.lm_tokenizer import left_pad

VOCAB = 97


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = LlamaLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def solo(lm, ids, **options) -> list[int]:
    return generate(lm, ids, **options)[0].tolist()


def run(batch: DecodingBatch, joins: dict[int, list], limit: int = 200, how: str = "add") -> dict:
    """Step the batch; at step ``s`` the rows of ``joins[s]`` (key, ids, options) join: one group
    each through :meth:`~DecodingBatch.add`, or (``how="join"``) all in one left-padded group
    through :meth:`~DecodingBatch.join`, prefilled by the step's forward; returns each key's
    tokens and finish reason."""
    out: dict = {}
    for s in range(limit):
        group = []
        for key, ids, options in joins.get(s, []):
            gen = torch.Generator().manual_seed(options.pop("seed")) if "seed" in options else None
            group.append((key, resolve_config(batch.lm, None, **options), ids, gen))
            out[key] = ([], None)
        if group and how == "add":
            for key, cfg, ids, gen in group:
                batch.add([key], [cfg], ids, generators=[gen])
        elif group:
            padded = left_pad([ids[0].tolist() for _, _, ids, _ in group], 0)
            batch.join([k for k, *_ in group], [c for _, c, *_ in group], padded["input_ids"], padded["attention_mask"],
                       generators=[g for *_, g in group])  # fmt: skip
        for key, token, finish in batch.step():
            out[key][0].append(token)
            out[key] = (out[key][0], finish)
        if not batch and s > max(joins):
            break
    return out


@pytest.mark.parametrize("how", ["add", "join", "join unpacked"])
def test_rows_joining_at_different_steps_match_solo_generation(lm, how, monkeypatch):
    if how == "join unpacked":  # every joining group prefilled on its own, after the running rows' forward
        monkeypatch.setattr("vlkit.lm.batching.PACK_LIMIT", 0)
    eos = 5
    joins = {
        0: [("a", prompt(9, 1), dict(max_new_tokens=12))],
        3: [("b", prompt(4, 2), dict(max_new_tokens=20)), ("c", prompt(15, 3), dict(max_new_tokens=6, eos_token_id=eos))],
        4: [("d", prompt(30, 4), dict(max_new_tokens=9, repetition_penalty=1.3))],
        15: [("e", prompt(2, 5), dict(max_new_tokens=7, no_repeat_ngram_size=2))],
    }
    expected = {key: solo(lm, ids, **{k: v for k, v in opts.items()}) for group in joins.values() for key, ids, opts in group}
    got = run(DecodingBatch(lm), {s: [(k, i, dict(o)) for k, i, o in g] for s, g in joins.items()}, how=how.split()[0])
    for key, (tokens, finish) in got.items():
        want = expected[key]
        if eos in want and key == "c":
            want = want[: want.index(eos) + 1]
        assert tokens == want, key
        assert finish == ("stop" if tokens[-1] == eos and key == "c" else "length")


@pytest.mark.parametrize("how", ["add", "join"])
def test_sampled_rows_with_a_seed_repeat_whatever_joins_beside_them(lm, how):
    opts = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.8, seed=7)
    alone = run(DecodingBatch(lm), {0: [("s", prompt(6, 9), dict(opts))]})["s"][0]
    crowded = run(DecodingBatch(lm), {0: [("x", prompt(12, 1), dict(max_new_tokens=20))],
                                      2: [("s", prompt(6, 9), dict(opts)), ("y", prompt(3, 2), dict(opts, seed=1))]},
                  how=how)  # fmt: skip
    assert crowded["s"][0] == alone
    assert crowded["y"][0] != alone


def test_stop_strings_end_a_row(lm):
    class Digits:
        """Decodes id i as the text of i and a space, so a stop string is a number."""

        def decode(self, ids, skip_special_tokens=True):
            return "".join(f"{i} " for i in ids)

    ref = solo(lm, prompt(8, 3), max_new_tokens=16)
    stop = f"{ref[4]} "
    got = run(DecodingBatch(lm, Digits()), {0: [("r", prompt(8, 3), dict(max_new_tokens=16, stop_strings=[stop]))]})["r"]
    assert got == (ref[: ref.index(ref[4]) + 1], "stop")


def test_a_joining_group_packs_with_the_running_rows_and_its_dropped_rows_never_run(lm):
    """Groups of left-padded prompts (ids, or embeddings as a VLM gives) join while rows run: each
    row's tokens are solo generate's; a joining row dropped before its step never runs."""
    batch = DecodingBatch(lm)
    specs = {"a": (9, 12), "b": (4, 20), "c": (15, 6), "d": (30, 9), "e": (2, 7), "f": (6, 5)}
    ids = {k: prompt(w, i) for i, (k, (w, _)) in enumerate(specs.items())}
    cfg = {k: resolve_config(lm, None, max_new_tokens=n) for k, (_, n) in specs.items()}
    joins = {0: ["a"], 2: ["b", "c", "x"], 5: ["d", "e"], 6: ["f"]}
    ids["x"], cfg["x"] = prompt(7, 99), resolve_config(lm, None, max_new_tokens=4)
    got, packed = {k: [] for k in ids}, 0
    for s in range(60):
        if s in joins:
            padded = left_pad([ids[k][0].tolist() for k in joins[s]], 0)
            embeds = lm.embed(padded["input_ids"]) if s == 5 else None
            batch.join(joins[s], [cfg[k] for k in joins[s]], padded["input_ids"], padded["attention_mask"], embeds)
            packed += batch._packs(batch.joining)
            if s == 2:
                batch.drop(["x"])
                assert "x" not in batch.keys and len(batch) == 3
        for key, token, _ in batch.step():
            got[key].append(token)
    assert packed == 3 and not batch and got.pop("x") == []  # the first group joins an empty batch: a plain prefill
    assert batch.joins == {"packed": 3, "apart": 1}
    for k in got:
        assert got[k] == solo(lm, ids[k], max_new_tokens=specs[k][1]), k


def test_a_joining_group_whose_prefill_fails_is_named_and_the_running_rows_go_on(lm, monkeypatch):
    batch = DecodingBatch(lm)
    batch.add(["a"], [resolve_config(lm, None, max_new_tokens=12)], prompt(9, 1))
    got = [t for _, t, _ in batch.step()]
    real = batch.lm

    def failing(self, *args, **kwargs):  # every forward of more than one token fails: the group's prefill
        if (kwargs.get("inputs_embeds") if kwargs.get("input_ids") is None else kwargs["input_ids"]).shape[1] > 1:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    batch.lm = type("Failing", (), {"__call__": failing, "__getattr__": lambda self, name: getattr(real, name)})()
    batch.join(["b", "c"], [resolve_config(lm, None, max_new_tokens=5)] * 2, torch.cat([prompt(4, 2), prompt(4, 3)]))
    got += [t for _, t, _ in batch.step()]
    assert batch.join_error is not None and batch.join_error[0] == ["b", "c"] and "out of memory" in str(batch.join_error[1])
    assert batch.keys == ["a"]
    batch.lm = real
    while batch:
        got += [t for _, t, _ in batch.step()]
    assert got == solo(lm, prompt(9, 1), max_new_tokens=12)


def test_dropped_rows_leave_and_others_go_on(lm):
    batch = DecodingBatch(lm)
    for key, seed in (("a", 1), ("b", 2)):
        batch.add([key], [resolve_config(lm, None, max_new_tokens=10)], prompt(5 + seed, seed))
    first = batch.step()
    batch.drop(["a"])
    assert batch.keys == ["b"]
    rest = [first[1][1]]
    while batch:
        rest += [t for _, t, _ in batch.step()]
    assert rest == solo(lm, prompt(7, 2), max_new_tokens=10)


def test_picked_tokens_wait_for_advance_and_follow_the_rows(lm):
    """step() is pick() then advance(): between the two a row can be dropped and a group join, and
    every other row still gives solo generate's tokens; picking twice without a forward is refused."""
    batch = DecodingBatch(lm)
    for key, seed in (("a", 1), ("b", 2), ("c", 3)):
        batch.add([key], [resolve_config(lm, None, max_new_tokens=8)], prompt(4 + seed, seed))
    tokens = {key: [token] for key, token, _ in batch.pick()}
    with pytest.raises(VlkitError, match="advance"):
        batch.pick()
    batch.drop(["a"])  # the first row leaves: the last row's picked token moves with it
    batch.join(["d"], [resolve_config(lm, None, max_new_tokens=5)], prompt(6, 4))
    batch.advance()
    tokens["d"] = []
    while batch:
        for key, token, _ in batch.step():
            tokens[key].append(token)
    for key, (n, seed, new) in {"b": (6, 2, 8), "c": (7, 3, 8), "d": (6, 4, 5)}.items():
        assert tokens[key] == solo(lm, prompt(n, seed), max_new_tokens=new), key


def test_unused_columns_are_dropped_when_a_group_joins(lm):
    batch = DecodingBatch(lm)
    batch.add(["long"], [resolve_config(lm, None, max_new_tokens=3)], prompt(40, 1))
    batch.add(["short"], [resolve_config(lm, None, max_new_tokens=30)], prompt(3, 2))
    while "long" in batch.keys:
        batch.step()
    batch.add(["late"], [resolve_config(lm, None, max_new_tokens=5)], prompt(4, 3))
    assert batch.cache.length < 40  # the long prompt's columns went with it
    tokens = {k: [] for k in batch.keys}
    while batch:
        for key, token, _ in batch.step():
            tokens[key].append(token)
    assert tokens["late"] == solo(lm, prompt(4, 3), max_new_tokens=5)


def test_a_group_that_does_not_fit_is_refused(lm):
    batch = DecodingBatch(lm)
    batch.add(["a"], [resolve_config(lm, None, max_new_tokens=60)], prompt(30, 1))
    assert not batch.fits(40, 10)
    with pytest.raises(VlkitError, match="do not fit"):
        batch.add(["b"], [resolve_config(lm, None, max_new_tokens=10)], prompt(40, 2))
    assert batch.keys == ["a"]


def test_joined_cache_right_aligns_rows():
    a = KVCache(1, 1, 1, 8, 2)
    b = KVCache(1, 2, 1, 8, 2)
    a.keys[..., :5, :] = 1.0
    a.length = 5
    b.keys[..., :3, :] = 2.0
    b.length = 3
    j = KVCache.joined([(a, 1), (b, 0)], 6)
    assert j.length == 4 and j.batch == 3 and j.max_length == 6
    assert j.keys[0, 0, 0, :4, 0].tolist() == [1, 1, 1, 1]
    assert j.keys[0, 1, 0, :4, 0].tolist() == [0, 2, 2, 2]


def test_shift_moves_columns_in_place_left_and_right():
    from vlkit.lm.batching import _shift

    for start, end, by in ((10, 33, -10), (3, 12, -1), (8, 26, 2), (0, 9, 7), (5, 6, -5)):
        keys, values = torch.randn(2, 3, 2, 40, 4), torch.randn(2, 3, 2, 40, 4)
        want = keys.clone(), values.clone()
        for w, b in zip(want, (keys, values)):
            w[:, :2, :, start + by : end + by] = b[:, :2, :, start:end]
        _shift((keys, values), 2, start, end, by)
        assert torch.equal(keys, want[0]) and torch.equal(values, want[1]), (start, end, by)


def test_rows_joining_and_leaving_reuse_the_buffers_and_match_solo_generation(lm):
    """A group fills the buffers; later rows join where rows left, the running rows' columns move
    left (unused ones dropped, in several blocks) and right (a wider prompt joins), a row is
    dropped: no buffer is allocated again, no running row's cache is copied out, and every row
    gives solo generate's tokens."""
    first = [("a", 30, 3), ("b", 12, 14), ("c", 20, 6), ("d", 8, 20)]
    joins = {3: ("p", 5, 10), 6: ("q", 28, 6), 10: ("r", 3, 5)}
    spec = {k: (w, n) for k, w, n in first + list(joins.values())}
    ids = {k: prompt(w, i + 10) for i, (k, (w, _)) in enumerate(spec.items())}
    cfg = {k: resolve_config(lm, None, max_new_tokens=n) for k, (_, n) in spec.items()}
    batch = DecodingBatch(lm)
    padded = torch.zeros(4, 30, dtype=torch.long)
    mask = torch.zeros(4, 30, dtype=torch.long)
    for i, (k, w, _) in enumerate(first):
        padded[i, 30 - w :], mask[i, 30 - w :] = ids[k][0], 1
    batch.add([k for k, _, _ in first], [cfg[k] for k, _, _ in first], padded, mask)
    buffers = batch.keys_buffer.data_ptr(), batch.values_buffer.data_ptr()
    got = {k: [] for k in spec}
    s, widths = 0, []
    while batch or s <= max(joins):
        if s in joins:
            k = joins[s][0]
            before = batch.cache.length - batch._first_used()
            batch.add([k], [cfg[k]], ids[k])
            widths.append((before, batch.cache.length))
        if s == 9:
            batch.drop(["d"])
        for key, token, _ in batch.step():
            got[key].append(token)
        s += 1
    assert (batch.keys_buffer.data_ptr(), batch.values_buffer.data_ptr()) == buffers
    assert widths[1][1] == 28 + 0 and widths[1][0] < 28  # q's prompt was wider than the rows running
    for k in spec:
        want = solo(lm, ids[k], max_new_tokens=spec[k][1])
        assert got[k] == (want[: len(got[k])] if k == "d" else want), k
    assert len(got["d"]) == 9
