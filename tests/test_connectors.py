"""Connectors: shapes and token counts for every kind, each against a written-out reference or
transformers on the same weights, composition with vlkit's vision towers and LMs, and errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from vlkit.connectors import CONNECTORS, Connector, build_connector
from vlkit.connectors.perceiver import PerceiverConnector
from vlkit.connectors.pixel_shuffle import space_to_depth
from vlkit.errors import ConfigError, VlkitError

DV, DLM = 16, 24
SMALL = {
    "linear": {},
    "mlp": {},
    "perceiver": {"num_latents": 5, "depth": 2, "num_heads": 2, "max_frames": 3},
    "pixel_shuffle": {"factor": 2},
    "qformer": {"width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32, "num_queries": 4, "dropout": 0.0},
}
"""Options that keep each kind tiny; every registered kind must have an entry."""


def test_registry_is_explicit():
    assert set(CONNECTORS) == set(SMALL) == {"linear", "mlp", "perceiver", "pixel_shuffle", "qformer"}
    for config_cls, module_cls in CONNECTORS.values():
        assert dataclasses.is_dataclass(config_cls) and issubclass(module_cls, Connector)


@pytest.mark.parametrize("kind", sorted(CONNECTORS))
def test_shapes_token_counts_and_gradients(kind):
    torch.manual_seed(0)
    connector = build_connector(kind, DV, DLM, **SMALL[kind])
    tokens = torch.randn(2, 16, DV, requires_grad=True)
    out = connector(tokens)
    assert out.shape == (2, connector.num_tokens(16), DLM)
    out.square().sum().backward()
    assert tokens.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())


@pytest.mark.parametrize(("kind", "counts"), [("linear", (16, 64)), ("mlp", (16, 64)), ("perceiver", (5, 5)), ("pixel_shuffle", (4, 16)), ("qformer", (4, 4))])
def test_token_counts_at_two_resolutions(kind, counts):
    """M = N for linear and mlp, N / r² for pixel shuffle, and fixed for the perceiver and Q-Former."""
    connector = build_connector(kind, DV, DLM, **SMALL[kind])
    for n, m in zip((16, 64), counts):
        assert connector.num_tokens(n) == m
        assert connector(torch.randn(1, n, DV)).shape == (1, m, DLM)


@pytest.mark.parametrize("kind", sorted(CONNECTORS))
@pytest.mark.parametrize("lm_family", ["llama", "opt"])
def test_any_connector_joins_a_vlkit_vision_tower_to_a_vlkit_lm(kind, lm_family):
    """ViT's second-to-last layer (class token dropped) → connector → the LM's input embeddings,
    visual tokens before the text; gradients reach the vision tower."""
    from vlkit.lm.llama import LlamaConfig, LlamaLM
    from vlkit.lm.opt import OPTConfig, OPTLM
    from vlkit.vision.vit import ViT, ViTConfig

    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=32, patch_size=8, width=DV, depth=2, num_heads=2))
    if lm_family == "llama":
        lm = LlamaLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2))
    else:
        lm = OPTLM(OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=2,
                             word_embed_proj_dim=DLM))
    ids = torch.randint(0, 50, (2, 3))
    text = lm.embed(ids)
    connector = build_connector(kind, DV, text.shape[-1], **SMALL[kind])
    features = vit(torch.randn(2, 3, 32, 32), output_hidden_states=True).hidden_states[-2][:, 1:]
    visual = connector(features)
    logits = lm(inputs_embeds=torch.cat([visual, text], dim=1)).logits
    assert logits.shape == (2, connector.num_tokens(16) + 3, 50)
    logits.sum().backward()
    assert vit.patch_embed.weight.grad.abs().sum() > 0


def test_linear_is_one_layer_named_as_transformers():
    connector = build_connector("linear", DV, DLM, bias=False)
    assert set(connector.state_dict()) == {"linear_1.weight"}
    tokens = torch.randn(1, 3, DV)
    torch.testing.assert_close(connector(tokens), tokens @ connector.linear_1.weight.T)


@pytest.mark.parametrize(("act", "bias"), [("gelu", True), ("silu", False)])
def test_mlp_matches_transformers_llava_projector(act, bias):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=DV, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(hidden_size=DLM, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2),
        projector_hidden_act=act,
        multimodal_projector_bias=bias,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    reference = LlavaMultiModalProjector(config).eval()
    ours = build_connector("mlp", DV, DLM, act=act, bias=bias)
    ours.load_state_dict(reference.state_dict())  # strict: the same names and shapes
    tokens = torch.randn(2, 9, DV)
    torch.testing.assert_close(ours(tokens), reference(tokens), rtol=0, atol=0)


def test_mlp_hidden_width_option():
    connector = build_connector("mlp", DV, DLM, hidden=40)
    assert connector.linear_1.weight.shape == (40, DV) and connector.linear_2.weight.shape == (DLM, 40)


def test_unknown_kind_and_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"unknown connector 'mpl'.*'linear'"):
        build_connector("mpl", DV, DLM)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['depth'\]"):
        build_connector("mlp", DV, DLM, depth=2)
    with pytest.raises(ConfigError, match=r"mlp connector options\.act"):
        build_connector("mlp", DV, DLM, act="swish")
    with pytest.raises(VlkitError, match="lm_dim must be a positive integer"):
        build_connector("linear", DV, 0)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_wrong_token_width_names_the_shape(kind):
    connector = build_connector(kind, DV, DLM)
    with pytest.raises(VlkitError, match=rf"{kind} connector: expected vision tokens \[B, N, D\] with D = 16, got shape \[2, 5, 8\]"):
        connector(torch.randn(2, 5, 8))


def _layer_norm(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _reference_perceiver(connector: PerceiverConnector, frames: torch.Tensor) -> torch.Tensor:
    """Flamingo's resampler written out: time embeddings per frame, frames flattened, then per
    layer softmax(q·kᵀ/√d)·v with q from the normed latents and k, v from [normed media; normed
    latents], a residual feed-forward; a final norm and the projection."""
    b, t, n, d = frames.shape
    media = (frames + connector.time[:t]).reshape(b, t * n, d)
    latents = connector.latents.unsqueeze(0).expand(b, -1, -1)
    for layer in connector.layers:
        attn, h = layer.attn, layer.attn.num_heads
        hd = attn.head_dim
        normed = _layer_norm(latents, layer.norm_latents)
        context = torch.cat([_layer_norm(media, layer.norm_media), normed], dim=1)
        w_k, w_v = attn.kv.weight.split(h * hd)
        q = (normed @ attn.q.weight.T).reshape(b, -1, h, hd)
        k = (context @ w_k.T).reshape(b, -1, h, hd)
        v = (context @ w_v.T).reshape(b, -1, h, hd)
        weights = torch.einsum("bmhe,bjhe->bhmj", q, k).div(math.sqrt(hd)).softmax(dim=-1)
        mixed = torch.einsum("bhmj,bjhe->bmhe", weights, v).reshape(b, -1, h * hd)
        latents = latents + mixed @ attn.proj.weight.T
        hidden = F.gelu(_layer_norm(latents, layer.norm_ff) @ layer.ff.fc1.weight.T)
        latents = latents + hidden @ layer.ff.fc2.weight.T
    return _layer_norm(latents, connector.norm) @ connector.proj.weight.T + connector.proj.bias


def test_perceiver_matches_a_written_out_reference():
    torch.manual_seed(0)
    connector = build_connector("perceiver", DV, DLM, num_latents=3, depth=2, num_heads=2, head_dim=6, max_frames=2)
    frames = torch.randn(2, 2, 4, DV)
    with torch.no_grad():
        expected = _reference_perceiver(connector, frames)
        torch.testing.assert_close(connector(frames), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(connector(frames[:, 0]), _reference_perceiver(connector, frames[:, :1]), rtol=1e-5, atol=1e-5)


def test_perceiver_frames_are_told_apart_only_by_time_embeddings():
    """Without time embeddings the resampler sees a bag of tokens: swapping two frames changes
    nothing. With them, it does."""
    torch.manual_seed(0)
    frames = torch.randn(1, 2, 4, DV)
    swapped = frames.flip(1)
    plain = build_connector("perceiver", DV, DLM, num_latents=3, depth=1, num_heads=2)
    timed = build_connector("perceiver", DV, DLM, num_latents=3, depth=1, num_heads=2, max_frames=2)
    with torch.no_grad():
        torch.testing.assert_close(plain(frames), plain(swapped))
        assert not torch.allclose(timed(frames), timed(swapped), atol=1e-4)


def test_perceiver_bad_input():
    connector = build_connector("perceiver", DV, DLM, **SMALL["perceiver"])
    with pytest.raises(VlkitError, match="4 frames, but time embeddings exist for max_frames = 3"):
        connector(torch.randn(1, 4, 4, DV))
    with pytest.raises(VlkitError, match=r"\[B, N, D\] or \[B, T, N, D\] with D = 16, got shape \[4, 16\]"):
        connector(torch.randn(4, DV))
    with pytest.raises(VlkitError, match="vision width 16 is not divisible by num_heads 3; set head_dim"):
        build_connector("perceiver", DV, DLM, num_heads=3)


def _reference_space_to_depth(tokens: torch.Tensor, r: int) -> torch.Tensor:
    """Token by token: output (i, j) of the s×s grid is the r×r block at rows i·r.., columns j·r..,
    its tokens concatenated row by row."""
    b, n, d = tokens.shape
    side = math.isqrt(n)
    s = side // r
    out = torch.empty(b, s * s, r * r * d)
    for i in range(s):
        for j in range(s):
            for u in range(r):
                for v in range(r):
                    out[:, i * s + j, (u * r + v) * d : (u * r + v + 1) * d] = tokens[:, (i * r + u) * side + j * r + v]
    return out


def _depth_to_space(tokens: torch.Tensor, r: int) -> torch.Tensor:
    """The inverse: ``[B, N/r², D·r²]`` back to the ``[B, N, D]`` row-major grid."""
    b, m, rd = tokens.shape
    s, d = math.isqrt(m), rd // (r * r)
    return tokens.reshape(b, s, s, r, r, d).permute(0, 1, 3, 2, 4, 5).reshape(b, s * s * r * r, d)


@pytest.mark.parametrize(("n", "r"), [(16, 2), (36, 3), (64, 4), (9, 1)])
def test_space_to_depth_against_reference_and_inverse(n, r):
    tokens = torch.randn(2, n, 5)
    out = space_to_depth(tokens, r)
    torch.testing.assert_close(out, _reference_space_to_depth(tokens, r), rtol=0, atol=0)
    torch.testing.assert_close(_depth_to_space(out, r), tokens, rtol=0, atol=0)


def test_pixel_shuffle_matches_transformers_idefics3_connector():
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    config = Idefics3Config(vision_config={"hidden_size": DV}, text_config={"hidden_size": DLM, "num_attention_heads": 2}, scale_factor=2)
    torch.manual_seed(0)
    reference = Idefics3Connector(config).eval()
    ours = build_connector("pixel_shuffle", DV, DLM, factor=2)
    ours.proj.load_state_dict(reference.modality_projection.proj.state_dict())
    tokens = torch.randn(2, 36, DV)
    torch.testing.assert_close(ours(tokens), reference(tokens), rtol=0, atol=0)


def test_pixel_shuffle_names_n_and_r_when_the_grid_does_not_fit():
    connector = build_connector("pixel_shuffle", DV, DLM, factor=4)
    with pytest.raises(VlkitError, match=r"N = 17 tokens is not a square grid .*r = 4"):
        connector(torch.randn(1, 17, DV))
    with pytest.raises(VlkitError, match=r"6×6 grid of N = 36 tokens is not divisible by r = 4"):
        connector(torch.randn(1, 36, DV))
    with pytest.raises(VlkitError, match=r"N = 50 tokens is not a square grid"):
        connector.num_tokens(50)


def test_qformer_connector_is_the_qformer_then_a_projection_to_the_lm():
    """The one Q-Former (its context width set to the vision width), then ``language_projection``."""
    torch.manual_seed(0)
    connector = build_connector("qformer", DV, DLM, **SMALL["qformer"]).eval()
    assert connector.qformer.cfg.context_dim == DV
    tokens = torch.randn(2, 9, DV)
    with torch.no_grad():
        expected = connector.qformer(tokens) @ connector.language_projection.weight.T + connector.language_projection.bias
        torch.testing.assert_close(connector(tokens), expected)
