"""The language models' linear layers run inference through oneDNN (vlkit.nn.linear): the same
results as ``F.linear`` up to rounding, the same parameters and keys, and training (gradients,
autocast) exactly ``nn.Linear``'s path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vlkit
import vlkit.nn.linear as fast
from vlkit.lm.llama import LlamaConfig, LlamaLM
from vlkit.lm.opt import OPTConfig, OPTLM
from vlkit.nn import Block
from vlkit.nn.linear import Linear, linear, use_onednn
from vlkit.train.checkpoint import save_model

needs_onednn = pytest.mark.skipif(fast._ONEDNN is None, reason="torch has no oneDNN linear on this CPU")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach oneDNN, which takes every size here (tiny test weights and single rows too)."""
    seen = []
    real = fast._ONEDNN
    monkeypatch.setattr(fast, "ONEDNN_MIN_WEIGHT", 0)
    monkeypatch.setattr(fast, "_matvec", "onednn")

    def spy(*args):
        seen.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(fast, "_ONEDNN", spy)
    return seen


def _inputs():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "one row": r(1, 1, 48),
        "batch": r(3, 5, 48),
        "last position of a longer sequence (a strided view)": r(2, 7, 48)[:, -1:],
        "transposed": r(48, 4).t(),
        "1-d": r(48),
        "no rows": r(0, 1, 48),
    }


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", list(_inputs()))
def test_linear_equals_f_linear_through_onednn(name, bias, calls):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 48, generator=g), (torch.randn(40, generator=g) if bias else None)
    x = _inputs()[name]
    with torch.inference_mode():
        got = linear(x, w, b)
    want = F.linear(x, w, b)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


@needs_onednn
def test_onednn_only_where_exact(calls):
    """oneDNN for fp32 CPU inference; gradients, autocast, other dtypes and layers left off go the
    usual way (the oneDNN op has no backward, and autocast would cast)."""
    layer = Linear(16, 8)
    x = torch.randn(2, 16)
    with torch.no_grad():
        layer(x)
    assert not calls, "a layer with onednn off must be nn.Linear"
    layer.onednn = True
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer(x)
    assert len(calls) == 2
    y = layer(x)
    assert y.requires_grad and len(calls) == 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    with torch.no_grad():
        layer.double()(x.double())
    assert len(calls) == 2


@needs_onednn
def test_small_weights_stay_with_f_linear(monkeypatch):
    """oneDNN's fixed cost per call loses to MKL below ``ONEDNN_MIN_WEIGHT`` elements."""
    seen = []
    real = fast._ONEDNN
    monkeypatch.setattr(fast, "_matvec", "onednn")
    monkeypatch.setattr(fast, "_ONEDNN", lambda *args: seen.append(1) or real(*args))
    small, large = torch.randn(8, fast.ONEDNN_MIN_WEIGHT // 8 - 1), torch.randn(8, fast.ONEDNN_MIN_WEIGHT // 8)
    with torch.inference_mode():
        linear(torch.randn(1, small.shape[1]), small)
        assert not seen
        linear(torch.randn(1, large.shape[1]), large)
        assert seen


@needs_onednn
@pytest.mark.parametrize("way", ["mkl", "onednn", "blocked"])
def test_single_rows_go_the_way_measured_fastest(monkeypatch, calls, way):
    """A single row (a batch-1 decode step) goes to oneDNN, with the plain weight or its blocked copy,
    only where that was measured fastest; several rows always read the blocked copy; either way the
    result is ``F.linear``'s up to rounding."""
    monkeypatch.setattr(fast, "_matvec", way)
    w = torch.randn(40, 48)
    with torch.inference_mode():
        for x in (torch.randn(1, 1, 48), torch.randn(48), torch.randn(1, 7, 48)[:, -1:]):
            torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        assert len(calls) == (0 if way == "mkl" else 3)
        assert (w in fast._packs) == (way == "blocked" and fast._REORDER is not None)
        linear(torch.randn(2, 1, 48), w)
    assert len(calls) == (1 if way == "mkl" else 4)
    assert (w in fast._packs) == (fast._REORDER is not None)


@needs_onednn
def test_the_mat_vec_choice_is_measured_once(monkeypatch):
    measured, real = [], fast.fastest_matvec
    assert real(256, 64, 2, 3) in {"mkl", "onednn", "blocked"}
    monkeypatch.setattr(fast, "_matvec", None)
    monkeypatch.setattr(fast, "fastest_matvec", lambda: measured.append(1) or "mkl")
    w = torch.randn(8, fast.ONEDNN_MIN_WEIGHT // 8)
    with torch.inference_mode():
        for _ in range(3):
            linear(torch.randn(1, w.shape[1]), w)
    assert measured == [1] and fast._matvec == "mkl"


@needs_onednn
def test_the_blocked_copy_follows_the_weight(calls):
    """oneDNN reads a blocked copy of each weight, kept beside it; an in-place update or a new tensor
    renews it, and turning the fast path off frees it."""
    layer = use_onednn(Linear(48, 40))
    x = torch.randn(3, 48)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.weight.add_(1.0)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    layer.weight.data = torch.randn(40, 48)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert len(calls) == 3
    if fast._REORDER is not None:
        assert fast.packed(layer.weight).is_mkldnn and layer.weight in fast._packs
        use_onednn(layer, False)
        assert layer.weight not in fast._packs


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 8, 49])
def test_the_blocked_copy_serves_any_row_count(rows, calls, monkeypatch):
    monkeypatch.setattr(fast, "_matvec", "blocked")
    w, b = torch.randn(40, 48), torch.randn(40)
    x = torch.randn(rows, 48)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


def _llama() -> LlamaLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, qkv_bias=True, family="qwen2")
    return LlamaLM(cfg)


def _opt() -> OPTLM:
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTLM(cfg)


@pytest.mark.parametrize("build", [_llama, _opt], ids=["llama", "opt"])
def test_language_models_switch_every_linear_on(build):
    lm = build()
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Linear) and m.onednn for m in linears)
    assert not any(m.onednn for m in Block(32, 4).modules() if isinstance(m, Linear)), "the towers keep nn.Linear"


@needs_onednn
@pytest.mark.parametrize("build", [_llama, _opt], ids=["llama", "opt"])
def test_training_is_nn_linear_exactly_and_inference_agrees(build, calls):
    lm = build()
    plain = use_onednn(copy.deepcopy(lm), False)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    out, ref = lm(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.equal(out, ref)
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), q in zip(lm.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert not calls
    with torch.inference_mode():
        fast_logits = lm(input_ids=ids).logits
    assert calls, "inference did not go through oneDNN"
    torch.testing.assert_close(fast_logits, ref.detach(), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("build", [_llama, _opt], ids=["llama", "opt"])
def test_inference_after_a_training_step_sees_the_new_weights(build, calls):
    """Evaluate, train a step, evaluate again (as a training loop does): the second evaluation reads the
    updated weights, not the blocked copies the first one made."""
    lm = build()
    plain = use_onednn(copy.deepcopy(lm), False)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        lm(input_ids=ids)
    for model in (lm, plain):
        model(input_ids=ids).logits.square().mean().backward()
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    with torch.inference_mode():
        torch.testing.assert_close(lm(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_state_dict_and_a_save_load_round_trip_are_unchanged(tmp_path):
    lm = _llama().eval()
    state = lm.state_dict()
    assert "layers.0.attn.qkv.weight" in state and "lm_head.weight" in state
    assert all(t.is_contiguous() for t in state.values())
    save_model(tmp_path / "m", lm, "llama")
    back = vlkit.load(tmp_path / "m")
    assert all(m.onednn for m in back.modules() if isinstance(m, Linear)), "a loaded model keeps the fast path"
    for key, t in back.state_dict().items():
        assert torch.equal(t, state[key]), key
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(back(input_ids=ids).logits, lm(input_ids=ids).logits)
