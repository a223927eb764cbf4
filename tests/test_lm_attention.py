"""The one Attention's options against written-out references: grouped-query heads, cross attention
from a context of another width, rotary positions (transformers' tables and rotation), and a KV
cache slot (incremental equals full)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlkit.nn.attention import Attention, sdpa
from vlkit.nn.rope import RopeConfig, Rotary, apply_rotary

TOL = 1e-5


def reference(q, k, v, mask=None):
    """softmax(q kᵀ / √d + mask) v, heads ``[B, H, N, d]``; ``mask`` boolean (True = attend)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def heads(x, n):
    b, t, _ = x.shape
    return x.view(b, t, n, -1).transpose(1, 2)


def merge(x):
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def random_attention(seed=0, **kwargs) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(**kwargs)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn.eval()


@torch.no_grad()
def test_grouped_query_heads_share_key_value_heads():
    """8 query heads over 2 key/value heads: query head ``i`` reads key/value head ``i // 4``."""
    attn = random_attention(dim=32, num_heads=8, num_kv_heads=2, head_dim=6, bias=True, out_bias=False)
    assert attn.qkv.weight.shape == (8 * 6 + 2 * 2 * 6, 32) and attn.proj.bias is None
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).split([48, 12, 12], dim=-1)
    q, k, v = heads(q, 8), heads(k, 2).repeat_interleave(4, dim=1), heads(v, 2).repeat_interleave(4, dim=1)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    want = attn.proj(merge(reference(q, k, v, causal)))
    assert (attn(x, causal=True) - want).abs().max() <= TOL
    rows = torch.tensor([4, 2])  # attend(): the queries at those rows only
    got = attn.attend(x[torch.arange(2), rows][:, None], x, mask=(torch.arange(5) <= rows[:, None])[:, None, None])
    assert (got[:, 0] - want[torch.arange(2), rows]).abs().max() <= TOL


@torch.no_grad()
def test_cross_attention_reads_a_context_of_another_width():
    """Queries from ``x`` (width 32), keys and values from a context of width 48 and another length,
    with a padding mask over the context."""
    attn = random_attention(dim=32, num_heads=4, context_dim=48)
    assert set(dict(attn.named_parameters())) == {"q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias"}
    x, context = torch.randn(2, 3, 32), torch.randn(2, 7, 48)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 5:] = False
    mask = keep[:, None, None, :]
    k, v = attn.kv(context).chunk(2, dim=-1)
    want = attn.proj(merge(reference(heads(attn.q(x), 4), heads(k, 4), heads(v, 4), mask)))
    got = attn(x, mask, context=context)
    assert got.shape == (2, 3, 32)
    assert (got - want).abs().max() <= TOL
    # the masked context positions are really ignored
    context[1, 5:] = 100.0
    assert (attn(x, mask, context=context) - got).abs().max() <= TOL


def transformers_llama():
    return pytest.importorskip("transformers.models.llama.modeling_llama")


@pytest.mark.parametrize("rope", [
    dict(rope_type="default", rope_theta=10000.0),
    dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
    dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=16),
])
@torch.no_grad()
def test_rotary_tables_and_rotation_match_transformers(rope):
    """cos/sin for positions past ``max_position_embeddings`` (so dynamic scaling acts), and the
    rotate-half rotation, are transformers' to the bit."""
    hf = transformers_llama()
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=20, rope_parameters=dict(rope))
    positions = torch.tensor([[0, 1, 2, 3, 29], [5, 9, 17, 21, 40]])
    hf_cos, hf_sin = hf.LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), positions)
    ours = RopeConfig(type=rope["rope_type"], theta=rope["rope_theta"], factor=rope.get("factor", 1.0),
                      original_max_position_embeddings=rope.get("original_max_position_embeddings"),
                      low_freq_factor=rope.get("low_freq_factor", 1.0), high_freq_factor=rope.get("high_freq_factor", 4.0))
    cos, sin = Rotary(ours, 32, 20).tables(positions, torch.float32)
    assert torch.equal(cos[:, :, 0], hf_cos)
    x = torch.randn(2, 5, 3, 32)  # [B, n, heads, head_dim]
    want, _ = hf.apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), hf_cos, hf_sin)
    assert torch.equal(apply_rotary(x, cos, sin), want.transpose(1, 2))


class ListSlot:
    """The smallest cache slot: keeps every key/value it is given."""

    def __init__(self):
        self.k = self.v = None

    def attend(self, q, k, v, mask, causal, gqa):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return sdpa(q, self.k, self.v, mask, causal, gqa)


@torch.no_grad()
def test_cache_slot_decoding_equals_full_causal_attention():
    attn = random_attention(dim=32, num_heads=4, num_kv_heads=2, bias=False)
    rotary = Rotary(RopeConfig(), 8, 64)
    x = torch.randn(1, 6, 32)
    full = attn(x, causal=True, rope=rotary.tables(torch.arange(6)[None], x.dtype))
    slot = ListSlot()
    parts = [attn(x[:, :3], causal=True, rope=rotary.tables(torch.arange(3)[None], x.dtype), cache=slot)]
    for t in range(3, 6):
        parts.append(attn(x[:, t : t + 1], rope=rotary.tables(torch.tensor([[t]]), x.dtype), cache=slot))
    assert slot.k.shape == (1, 2, 6, 8)
    assert (torch.cat(parts, dim=1) - full).abs().max() <= TOL


@torch.no_grad()
def test_vit_self_attention_unchanged():
    """The ViT/text towers' call (no options) is plain multi-head attention over one fused q|k|v."""
    attn = random_attention(dim=24, num_heads=3)
    x = torch.randn(2, 4, 24)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    want = attn.proj(merge(F.scaled_dot_product_attention(heads(q, 3), heads(k, 3), heads(v, 3))))
    assert (attn(x) - want).abs().max() <= TOL


def test_cpu_bf16_training_attention_runs_in_fp32():
    """Under bf16 autocast on a CPU, a training forward computes the attention weights in fp32
    (PyTorch's bf16 CPU backward is several times slower): outputs and gradients follow an fp32
    computation from the same bf16 q/k/v, closer than bf16 attention gets; inference stays bf16."""
    torch.manual_seed(0)
    attn = Attention(64, 4)
    x = torch.randn(2, 24, 64, requires_grad=True)
    mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    mask[1, ..., 18:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, mask)
    qkv = F.linear(x.bfloat16(), attn.qkv.weight.bfloat16(), attn.qkv.bias.bfloat16()).view(2, 24, 12, 16).transpose(1, 2)
    q, k, v = qkv.split(4, dim=1)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16()
    low = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = F.linear(exact.transpose(1, 2).reshape(2, 24, 64), attn.proj.weight.bfloat16(), attn.proj.bias.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)
    assert not torch.equal(exact, low)  # the test can tell the two apart
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        inference = attn(x, mask)
    lowered = F.linear(low.transpose(1, 2).reshape(2, 24, 64), attn.proj.weight.bfloat16(), attn.proj.bias.bfloat16())
    assert torch.equal(inference, lowered)
