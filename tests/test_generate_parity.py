"""vlkit's generation engine against transformers ``generate`` on the same tiny random Llama
(saved by ``save_pretrained``, loaded by vlkit): greedy, beam search, EOS ids, stop strings,
repetition penalty, n-gram ban and ``min_new_tokens`` pick the same tokens; sampling draws the
same tokens from the same seed."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402
from vlkit.lm.generate import generate, generate_text  # noqa: E402
from vlkit.lm.stopping import trim_stop_strings  # noqa: E402

from _lm_util import sentencepiece_folder  # noqa: E402

PAD = 3  # not 0: transformers fills finished beams with `pad_token_id or eos`, which skips a pad id of 0
NEW = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, vlkit model, transformers tokenizer, folder) on one saved folder."""
    folder = sentencepiece_folder(tmp_path_factory.mktemp("llama"))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.06, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(folder)
    ours = vlkit.load(folder).eval()
    return ref, ours, tok, folder


@pytest.fixture(scope="module")
def batch(models):
    """Three prompts of 5, 11 and 8 tokens, left-padded."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, 500, (n,), generator=g).tolist() for n in (5, 11, 8)]
    ids = torch.tensor([[PAD] * (11 - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (11 - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def reference(ref, ids, mask, **kwargs) -> torch.Tensor:
    """transformers' new tokens."""
    kwargs.setdefault("pad_token_id", PAD)
    out = ref.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return out[:, ids.shape[1] :]


def test_greedy_matches_transformers(models, batch):
    ref, ours, _, _ = models
    expected = reference(ref, *batch, max_new_tokens=NEW, do_sample=False)
    got = generate(ours, *batch, max_new_tokens=NEW, pad_token_id=PAD)
    assert got.shape == (3, NEW)
    assert torch.equal(got, expected)


def test_prefill_from_embeddings_gives_the_same_tokens(models, batch):
    """A VLM prefills embeddings; with the ids alongside, the penalties see the same history."""
    ours = models[1]
    ids, mask = batch
    embeds = ours.embed(ids)
    with_ids = generate(ours, ids, mask, max_new_tokens=12, pad_token_id=PAD, repetition_penalty=1.3)
    with_embeds = generate(ours, ids, mask, inputs_embeds=embeds, max_new_tokens=12, pad_token_id=PAD,
                           repetition_penalty=1.3)
    assert torch.equal(with_ids, with_embeds)
    assert torch.equal(generate(ours, None, mask, inputs_embeds=embeds, max_new_tokens=12, pad_token_id=PAD),
                       generate(ours, ids, mask, max_new_tokens=12, pad_token_id=PAD))


def test_beam_search_matches_transformers(models, batch):
    """4 beams, 2 returned, no EOS: every hypothesis runs to the end."""
    ref, ours, _, _ = models
    for early_stopping in (False, True, "never"):
        kwargs = dict(max_new_tokens=NEW, num_beams=4, num_return_sequences=2, length_penalty=0.6,
                      early_stopping=early_stopping)
        expected = reference(ref, *batch, do_sample=False, **kwargs)
        got = generate(ours, *batch, pad_token_id=PAD, **kwargs)
        assert got.shape == (6, NEW)
        assert torch.equal(got, expected), early_stopping


def eos_ids_that_occur(ref, ids, mask) -> list[int]:
    """Two token ids that greedy decoding emits early in different rows, so rows end at different steps."""
    free = reference(ref, ids, mask, max_new_tokens=NEW, do_sample=False)
    first = int(free[0, 4])
    second = next(int(t) for t in free[2, 9:] if int(t) != first)
    return [first, second]


def test_eos_ends_each_row_where_transformers_does(models, batch):
    ref, ours, _, _ = models
    eos = eos_ids_that_occur(ref, *batch)
    for ids in (eos, eos[:1]):
        expected = reference(ref, *batch, max_new_tokens=NEW, do_sample=False, eos_token_id=ids)
        got = generate(ours, *batch, max_new_tokens=NEW, eos_token_id=ids, pad_token_id=PAD)
        assert torch.equal(got, expected)
        assert (got == PAD).any(), "a row should have ended early"


def test_beam_search_with_eos_matches_transformers(models, batch):
    """EOS ids the beams often pick, so hypotheses of many lengths compete and the length penalty
    decides between them."""
    ref, ours, _, _ = models
    free = reference(ref, *batch, max_new_tokens=NEW, do_sample=False, num_beams=4, num_return_sequences=4)
    values, counts = free.unique(return_counts=True)
    eos = values[counts.argsort(descending=True)][:2].tolist()
    lengths = set()
    for length_penalty, early_stopping in ((0.6, False), (2.0, False), (2.0, True), (-0.5, "never"), (2.0, "never")):
        kwargs = dict(max_new_tokens=NEW, num_beams=4, num_return_sequences=2, length_penalty=length_penalty,
                      early_stopping=early_stopping, eos_token_id=eos)
        expected = reference(ref, *batch, do_sample=False, **kwargs)
        got = generate(ours, *batch, pad_token_id=PAD, **kwargs)
        assert torch.equal(got, expected), kwargs
        lengths |= {int((row != PAD).sum()) for row in got}
    assert len(lengths) > 3, "hypotheses should end at several lengths"


def stop_strings_from(texts: list[str]) -> list[str]:
    """Two stop strings from the middle of two rows' texts (3 and 2 visible ASCII characters in a
    row where a row has them, else fewer: the tokenizer is trained afresh by each run, and a row of
    the random model's text may hold mostly undecodable bytes)."""
    visible = lambda part: part.isascii() and part.isprintable() and not any(c.isspace() for c in part)  # noqa: E731
    stops = []
    for text in texts:
        for n in range(3 - len(stops), 0, -1):
            found = [i for i in range(1, len(text) - n + 1) if visible(text[i : i + n])]
            if found:
                i = next((i for i in found if i >= len(text) // 3), found[0])
                stops.append(text[i : i + n])
                break
        if len(stops) == 2:
            return stops
    raise AssertionError(f"too few rows with visible text in {texts!r}")


def test_stop_strings_end_each_row_where_transformers_does(models, batch):
    ref, ours, tok, _ = models
    free = reference(ref, *batch, max_new_tokens=NEW, do_sample=False)
    full = [tok.decode(r, skip_special_tokens=True) for r in free.tolist()]
    stops = stop_strings_from(full)
    expected = reference(ref, *batch, max_new_tokens=NEW, do_sample=False, stop_strings=stops, tokenizer=tok,
                         eos_token_id=PAD)
    got = generate(ours, *batch, max_new_tokens=NEW, stop_strings=stops, tokenizer=tok, eos_token_id=PAD,
                   pad_token_id=PAD)
    assert torch.equal(got, expected)
    assert got.shape[1] < NEW or (got == PAD).any(), "a row should have stopped early"
    texts = generate_text(ours, tok, *batch, max_new_tokens=NEW, stop_strings=stops, eos_token_id=PAD,
                          pad_token_id=PAD)
    assert texts == [trim_stop_strings(f, stops) for f in full]
    assert sum(t != f for t, f in zip(texts, full)) >= 2
    beams = dict(max_new_tokens=16, num_beams=3, num_return_sequences=2, stop_strings=stops[1:], eos_token_id=PAD)
    assert torch.equal(generate(ours, *batch, tokenizer=tok, pad_token_id=PAD, **beams),
                       reference(ref, *batch, do_sample=False, tokenizer=tok, **beams))


def test_penalties_match_transformers(models, batch):
    ref, ours, _, _ = models
    for kwargs in (dict(repetition_penalty=1.8), dict(repetition_penalty=0.7), dict(no_repeat_ngram_size=2),
                   dict(min_new_tokens=10, eos_token_id=eos_ids_that_occur(ref, *batch))):
        expected = reference(ref, *batch, max_new_tokens=NEW, do_sample=False, **kwargs)
        got = generate(ours, *batch, max_new_tokens=NEW, pad_token_id=PAD, **kwargs)
        assert torch.equal(got, expected), kwargs


def test_beam_search_with_penalties_matches_transformers(models, batch):
    ref, ours, _, _ = models
    kwargs = dict(max_new_tokens=16, num_beams=3, num_return_sequences=3, repetition_penalty=1.4,
                  no_repeat_ngram_size=3)
    assert torch.equal(generate(ours, *batch, pad_token_id=PAD, **kwargs),
                       reference(ref, *batch, do_sample=False, **kwargs))


def test_sampling_draws_what_transformers_draws_from_the_same_seed(models, batch):
    """Without a generator both draw from torch's global one: the same seed, the same tokens."""
    ref, ours, _, _ = models
    kwargs = dict(max_new_tokens=NEW, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05,
                  repetition_penalty=1.1, num_return_sequences=2)
    torch.manual_seed(123)
    expected = reference(ref, *batch, **kwargs)
    torch.manual_seed(123)
    got = generate(ours, *batch, pad_token_id=PAD, **kwargs)
    assert got.shape == (6, NEW)
    assert torch.equal(got, expected)


def test_the_same_generator_seed_gives_the_same_samples(models, batch):
    ours = models[1]
    draw = lambda seed: generate(ours, *batch, max_new_tokens=NEW, pad_token_id=PAD, do_sample=True,  # noqa: E731
                                 temperature=1.5, generator=torch.Generator().manual_seed(seed))
    first = draw(7)
    assert torch.equal(first, draw(7))
    assert not torch.equal(first, draw(8))


def test_beam_sampling_draws_what_transformers_draws(models, batch):
    ref, ours, _, _ = models
    kwargs = dict(max_new_tokens=16, do_sample=True, num_beams=3, num_return_sequences=2, temperature=1.3, top_k=30,
                  length_penalty=1.5)
    torch.manual_seed(7)
    expected = reference(ref, *batch, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(generate(ours, *batch, pad_token_id=PAD, **kwargs), expected)


def test_the_folders_generation_config_gives_the_defaults(models, batch, tmp_path):
    """generation_config.json read by the loader: generate() without options does what transformers
    does with the same folder; arguments override it."""
    import shutil

    ref, _, _, folder = models
    eos = eos_ids_that_occur(ref, *batch)
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    transformers.GenerationConfig(max_new_tokens=9, eos_token_id=eos, pad_token_id=PAD, repetition_penalty=1.3,
                                  no_repeat_ngram_size=2).save_pretrained(copy)
    ref2, ours2 = transformers.LlamaForCausalLM.from_pretrained(copy).eval(), vlkit.load(copy).eval()
    assert ours2.generation_config.max_new_tokens == 9
    expected = ref2.generate(input_ids=batch[0], attention_mask=batch[1])[:, batch[0].shape[1] :]
    assert torch.equal(generate(ours2, *batch), expected)
    assert generate(ours2, *batch, max_new_tokens=3, eos_token_id=None).shape == (3, 3)


def test_opt_greedy_and_beams_match_transformers(batch, tmp_path):
    """OPT (BLIP-2's language model: learned positions offset by 2) answers through the same loop."""
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(
        vocab_size=520, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, init_std=0.06, bos_token_id=None, eos_token_id=None,
        pad_token_id=PAD,
    )  # fmt: skip
    ref = transformers.OPTForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = vlkit.load(tmp_path).eval()
    beams = dict(max_new_tokens=16, num_beams=4, num_return_sequences=2, length_penalty=0.6)
    for kwargs in (dict(max_new_tokens=24), beams):
        expected = reference(ref, *batch, do_sample=False, **kwargs)
        assert torch.equal(generate(ours, *batch, pad_token_id=PAD, **kwargs), expected), kwargs
