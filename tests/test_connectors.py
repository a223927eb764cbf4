"""Connectors: shapes and token counts for every kind, each against a written-out reference or
transformers on the same weights, and their errors."""

from __future__ import annotations

import pytest
import torch

from vlkit.connectors import CONNECTORS, build_connector
from vlkit.errors import ConfigError, VlkitError

DV, DLM = 16, 24


def test_registry_is_explicit():
    assert {"linear", "mlp"} <= set(CONNECTORS)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_token_wise_kinds_keep_the_count(kind):
    connector = build_connector(kind, DV, DLM)
    tokens = torch.randn(2, 7, DV, requires_grad=True)
    out = connector(tokens)
    assert out.shape == (2, 7, DLM) and connector.num_tokens(7) == 7
    out.square().sum().backward()
    assert tokens.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())


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
