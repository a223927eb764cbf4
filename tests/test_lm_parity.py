"""Language models loaded from transformers folders give transformers' logits (fp32, within 1e-4) on a
left-padded batch of three prompts, for every family and rope scaling; cached decoding (prefill, then
token by token) gives the full forward's logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402
import vlkit.nn.linear as fast  # noqa: E402
from vlkit.lm import LlamaLM, OPTLM  # noqa: E402

from _lm_models import hf_logits, hf_model, padded_batch, real, save  # noqa: E402

TOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-mha-head_dim": ("llama", dict(num_key_value_heads=4, head_dim=32)),
    "llama3-rope": ("llama", dict(rope_parameters={**LLAMA3, "rope_theta": 500000.0}, head_dim=32)),
    "linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # positions reach 10, past max_position_embeddings=8: the dynamic base is in play
    "dynamic-rope": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8)),
    "qwen2": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", dict(sliding_window=16)),
    "opt": ("opt", {}),
    "opt-untied": ("opt", dict(tie_word_embeddings=False)),
    "opt-post-ln-proj": ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=32)),
    "opt-no-bias-no-affine": ("opt", dict(enable_bias=False, layer_norm_elementwise_affine=False)),
}


@pytest.fixture(scope="module")
def batch():
    return padded_batch()


@pytest.mark.parametrize("onednn", [False, True], ids=["f.linear", "onednn"])
@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_logits_match_transformers_on_left_padded_batch(tmp_path, batch, name, onednn, monkeypatch):
    """Through ``F.linear``, and through oneDNN (which tiny weights skip unless told to take them)."""
    if onednn and fast._ONEDNN is None:
        pytest.skip("torch has no oneDNN linear on this CPU")
    monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", 0 if onednn else 2**62)
    family, overrides = VARIANTS[name]
    hf = hf_model(family, **overrides)
    model = vlkit.load(save(hf, tmp_path))
    assert isinstance(model, OPTLM if family == "opt" else LlamaLM)
    ids, mask = batch
    ref = hf_logits(hf, ids, mask)
    out = model(input_ids=ids, attention_mask=mask).logits
    assert out.shape == ref.shape
    assert (real(out, mask) - real(ref, mask)).abs().max().item() <= TOL
    assert torch.isfinite(out).all()


@torch.no_grad()
def test_legacy_rope_keys_read_like_rope_parameters(tmp_path, batch):
    """An older folder's ``rope_theta`` + ``rope_scaling`` (``type`` key) means what transformers 5's
    ``rope_parameters`` means."""
    import json

    hf = hf_model("llama", rope_parameters={**LLAMA3, "rope_theta": 500000.0}, head_dim=32)
    folder = save(hf, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    cfg["rope_scaling"] = params
    (folder / "config.json").write_text(json.dumps(cfg))
    model = vlkit.load(folder)
    assert model.cfg.rope.type == "llama3" and model.cfg.rope.theta == 500000.0
    ids, mask = batch
    assert (real(model(input_ids=ids, attention_mask=mask).logits, mask) - real(hf_logits(hf, ids, mask), mask)).abs().max() <= TOL


@pytest.mark.parametrize("family", ["llama", "opt"])
@torch.no_grad()
def test_padded_rows_equal_rows_alone(tmp_path, batch, family):
    """Left padding changes nothing: each padded row's logits are those of the prompt alone (OPT's
    learned absolute positions make this a test of positions following the mask)."""
    model = vlkit.load(save(hf_model(family), tmp_path))
    ids, mask = batch
    out = model(input_ids=ids, attention_mask=mask).logits
    for row in range(ids.shape[0]):
        keep = mask[row].bool()
        alone = model(input_ids=ids[row : row + 1, keep]).logits[0]
        assert (out[row, keep] - alone).abs().max().item() <= TOL


@pytest.mark.parametrize("lengths", [(11, 7, 3), (11, 11, 11)], ids=["padded", "unpadded"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "opt", "opt-post-ln-proj"])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(tmp_path, name, lengths):
    """Prefill the first 5 positions into a static cache, then feed one token at a time with the
    growing attention mask: the logits are the full forward's (and transformers')."""
    family, overrides = VARIANTS[name]
    hf = hf_model(family, **overrides)
    model = vlkit.load(save(hf, tmp_path))
    ids, mask = padded_batch(lengths)
    full = model(input_ids=ids, attention_mask=mask).logits
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 2)
    steps = [model(input_ids=ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits]
    assert cache.length == 5
    for t in range(5, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
        assert out.cache is cache
        steps.append(out.logits)
    assert cache.length == ids.shape[1]
    cached = torch.cat(steps, dim=1)
    assert (real(cached, mask) - real(full, mask)).abs().max().item() <= TOL
    assert (real(cached, mask) - real(hf_logits(hf, ids, mask), mask)).abs().max().item() <= TOL


@torch.no_grad()
def test_inputs_embeds_and_logits_to_keep(tmp_path, batch):
    """``inputs_embeds=lm.embed(ids)`` is ``input_ids=ids``; ``logits_to_keep=k`` gives the last k positions."""
    model = vlkit.load(save(hf_model("opt", do_layer_norm_before=False, word_embed_proj_dim=32), tmp_path))
    ids, mask = batch
    full = model(input_ids=ids, attention_mask=mask).logits
    embeds = model.embed(ids)
    assert embeds.shape == (*ids.shape, 32)
    from_embeds = model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1).logits
    assert from_embeds.shape == (ids.shape[0], 1, model.config.vocab_size)
    assert (from_embeds - full[:, -1:]).abs().max().item() <= TOL  # same numbers; a 1-row matmul rounds differently


@torch.no_grad()
def test_cache_reorder_keeps_rows(tmp_path, batch):
    """``reorder`` (beam search) permutes the cached rows: decoding the permuted batch continues each row."""
    model = vlkit.load(save(hf_model("llama"), tmp_path))
    ids, mask = batch
    full = model(input_ids=ids, attention_mask=mask).logits
    cache = model.new_cache(3, ids.shape[1])
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], cache=cache)
    order = torch.tensor([2, 0, 1])
    cache.reorder(order)
    last = model(input_ids=ids[order, -1:], attention_mask=mask[order], cache=cache).logits
    assert (last[:, 0] - full[order, -1]).abs().max().item() <= TOL
    cache.reorder(torch.tensor([1]))  # keep one row (the old row 0)
    assert cache.batch == 1 and cache.keys.shape[1] == 1


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_chunked_prefill_equals_full_forward(tmp_path, padded):
    """Several new tokens on top of a filled cache (queries later than position 0 of the keys)."""
    model = vlkit.load(save(hf_model("llama"), tmp_path))
    ids, mask = padded_batch((11, 7, 3) if padded else (11, 11, 11))
    full = model(input_ids=ids, attention_mask=mask if padded else None).logits
    cache = model.new_cache(3, 11)
    first = model(input_ids=ids[:, :4], attention_mask=mask[:, :4] if padded else None, cache=cache).logits
    rest = model(input_ids=ids[:, 4:], attention_mask=mask if padded else None, cache=cache).logits
    assert (real(torch.cat([first, rest], 1), mask) - real(full, mask)).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_training_gradients_finite_and_checkpointing_exact(tmp_path, family, monkeypatch):
    """A training step on a left-padded batch: finite gradients (no fully masked attention row), and
    gradient checkpointing (each layer recomputed in backward) gives the same gradients."""
    import vlkit.lm.decoder as decoder

    calls = []
    monkeypatch.setattr(decoder, "checkpoint", lambda *a, **k: calls.append(1) or torch.utils.checkpoint.checkpoint(*a, **k))
    model = vlkit.load(save(hf_model(family), tmp_path)).train()
    ids, mask = padded_batch()

    def grads():
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        keep = mask[:, 1:].bool()
        torch.nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep]).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads()
    assert all(torch.isfinite(g).all() for g in plain.values())
    model.gradient_checkpointing = True
    checkpointed = grads()
    assert len(calls) == model.cfg.num_hidden_layers
    assert max((plain[k] - checkpointed[k]).abs().max().item() for k in plain) <= 1e-6
