"""The BLIP-2 Q-Former: parity with transformers (query, text and joint paths, loaded through the
key map from ``save_pretrained`` folders), the three attention patterns, the connector contract,
export back to transformers, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vlkit.connectors.qformer import PATTERNS, QFormer, QFormerConfig, joint_mask
from vlkit.errors import CheckpointError, VlkitError
from vlkit.interop import hf_qformer
from vlkit.interop import keymap as km
from vlkit.interop.weights import WeightReader

from _interop_util import max_diff, perturb

transformers = pytest.importorskip("transformers")

M, D, DV, VOCAB = 6, 32, 48, 99
QFORMER = dict(hidden_size=D, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=DV,
               cross_attention_frequency=2, vocab_size=VOCAB, max_position_embeddings=40)


def reference_mask(pattern: str, m: int, text_mask: torch.Tensor) -> torch.Tensor:
    """The three patterns written out entry by entry, as LAVIS builds them: ITC keeps queries and
    text apart, ITM lets all see all, ITG lets text see every query and the text up to itself while
    queries see only queries; padded text is never a key."""
    b, t = text_mask.shape
    out = torch.zeros(b, 1, m + t, m + t, dtype=torch.bool)
    for i in range(b):
        for r in range(m + t):
            for c in range(m + t):
                if c >= m and not text_mask[i, c - m]:
                    continue
                r_query, c_query = r < m, c < m
                if pattern == "itm":
                    ok = True
                elif pattern == "itc":
                    ok = r_query == c_query
                else:
                    ok = c_query or (not r_query and c <= r)
                out[i, 0, r, c] = ok
    return out


def _bare_folder(tmp_path):
    """A tiny ``Blip2QFormerModel`` (no text path) saved by transformers, plus a file holding the
    query tokens, which BLIP-2 keeps beside the Q-Former rather than in it."""
    torch.manual_seed(0)
    cfg = transformers.Blip2QFormerConfig(**QFORMER)
    hf = perturb(transformers.Blip2QFormerModel(cfg))
    hf.save_pretrained(tmp_path)
    queries = torch.randn(1, M, D)
    save_file({"query_tokens": queries}, str(tmp_path / "queries.safetensors"))
    weights = WeightReader.open(tmp_path / "model.safetensors")
    files = {k: weights.file(k) for k in weights.keys()} | {"query_tokens": tmp_path / "queries.safetensors"}
    return hf, queries, WeightReader(files), json.loads((tmp_path / "config.json").read_text())


def test_query_path_matches_transformers_blip2_qformer_model(tmp_path):
    hf, queries, reader, raw = _bare_folder(tmp_path)
    cfg = hf_qformer.model_config(raw, "config.json", num_queries=M)
    assert not cfg.text and not cfg.image_norm
    ours = km.load_into(lambda: QFormer(cfg), hf_qformer.rules(cfg, qformer=""), reader, "Blip2QFormerModel")
    image = torch.randn(3, 11, DV)
    image_mask = torch.ones(3, 11, dtype=torch.long)
    image_mask[1, 7:] = 0
    with torch.no_grad():
        want = hf(query_embeds=queries.expand(3, -1, -1), encoder_hidden_states=image).last_hidden_state
        got = ours(image)
        want_masked = hf(query_embeds=queries.expand(3, -1, -1), encoder_hidden_states=image,
                         encoder_attention_mask=image_mask).last_hidden_state
        got_masked = ours(image, image_mask=image_mask)
    assert got.shape == (3, M, D)
    assert max_diff(got, want) < 1e-5
    assert max_diff(got_masked, want_masked) < 1e-5
    assert max_diff(got_masked[1], got[1]) > 1e-3  # the mask mattered


def test_export_loads_into_transformers_with_the_same_outputs(tmp_path):
    hf, queries, reader, raw = _bare_folder(tmp_path)
    cfg = hf_qformer.model_config(raw, "config.json", num_queries=M)
    rules = hf_qformer.rules(cfg, qformer="")
    torch.manual_seed(1)
    ours = perturb(QFormer(cfg), seed=3)
    state = km.export_state(ours, rules, "Blip2QFormerModel")
    query_tokens = state.pop("query_tokens")
    fresh = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**QFORMER)).eval()
    fresh.load_state_dict(state, strict=True)
    image = torch.randn(2, 9, DV)
    with torch.no_grad():
        want = fresh(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state
        assert max_diff(ours(image), want) < 1e-5


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    """A tiny ``Blip2ForImageTextRetrieval`` (text path on) and vlkit's Q-Former loaded from its
    folder with the BLIP-2 roots: ``qformer.``, ``embeddings.``, ``query_tokens`` and the image
    features' LayerNorm ``vision_model.post_layernorm``."""
    folder = tmp_path_factory.mktemp("blip2_retrieval")
    torch.manual_seed(0)
    cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=DV, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8),
        qformer_config=dict(QFORMER, use_qformer_text_input=True), num_query_tokens=M, image_text_hidden_size=16,
    )
    hf = perturb(transformers.Blip2ForImageTextRetrieval(cfg))
    hf.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    qcfg = hf_qformer.model_config(raw["qformer_config"], "config.json", num_queries=raw["num_query_tokens"],
                                   image_norm_eps=raw["vision_config"]["layer_norm_eps"])
    assert qcfg.text and qcfg.image_norm
    rules = hf_qformer.rules(qcfg, target="")
    used = {s for r in rules for s in r.sources}
    reader = WeightReader.open(folder / "model.safetensors")
    ours = km.load_into(lambda: QFormer(qcfg), rules, reader, "Blip2ForImageTextRetrieval", ignore=lambda k: k not in used)
    return hf, ours


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(3, 5, DV, generator=g)
    ids = torch.randint(1, VOCAB, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 6:] = 0
    return image, ids, mask


def _hf_joint(hf, image, ids, attention_mask):
    """transformers' Q-Former over [queries; text] as its retrieval model runs it."""
    queries = hf.query_tokens.expand(image.shape[0], -1, -1)
    embeds = hf.embeddings(input_ids=ids, query_embeds=queries)
    return hf.qformer(query_embeds=embeds, query_length=M, attention_mask=attention_mask,
                      encoder_hidden_states=hf.vision_model.post_layernorm(image),
                      encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long)).last_hidden_state


def test_retrieval_folder_query_and_text_paths_match_transformers(retrieval):
    hf, ours = retrieval
    image, ids, mask = _batch()
    with torch.no_grad():
        want_q = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1),
                            encoder_hidden_states=hf.vision_model.post_layernorm(image)).last_hidden_state
        want_t = hf.qformer(query_embeds=hf.embeddings(input_ids=ids), query_length=0, attention_mask=mask).last_hidden_state
        assert max_diff(ours(image), want_q) < 1e-5
        assert max_diff(ours.encode_text(ids, mask), want_t) < 1e-5


def test_itm_matches_transformers_image_text_matching_pass(retrieval):
    hf, ours = retrieval
    image, ids, mask = _batch()
    with torch.no_grad():
        want = _hf_joint(hf, image, ids, torch.cat([torch.ones(3, M, dtype=torch.long), mask], dim=1))
        got = ours.encode(image, ids, "itm", text_mask=mask)
    assert max_diff(torch.cat([got.queries, got.text], dim=1), want) < 1e-5


@pytest.mark.parametrize("pattern", ["itc", "itg"])
def test_itc_and_itg_match_transformers_under_the_written_out_mask(retrieval, pattern):
    hf, ours = retrieval
    image, ids, mask = _batch()
    with torch.no_grad():
        want = _hf_joint(hf, image, ids, reference_mask(pattern, M, mask))
        got = ours.encode(image, ids, pattern, text_mask=mask)
    assert max_diff(torch.cat([got.queries, got.text], dim=1), want) < 1e-5


@pytest.mark.parametrize("pattern", PATTERNS)
def test_joint_mask_is_the_written_out_pattern(pattern):
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.equal(joint_mask(pattern, 3, mask), reference_mask(pattern, 3, mask))


def _tiny(text: bool = True, **kw) -> QFormer:
    torch.manual_seed(0)
    sizes = dict(width=D, depth=3, num_heads=4, mlp_dim=64, num_queries=M, context_dim=DV, vocab_size=VOCAB, max_positions=16)
    cfg = QFormerConfig(**{**sizes, "dropout": 0.0, **kw}, text=text)
    return perturb(QFormer(cfg), scale=0.2)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_query_outputs_see_text_only_under_itm(pattern):
    model = _tiny()
    image, ids, mask = _batch()
    other = (ids + 13) % (VOCAB - 1) + 1
    with torch.no_grad():
        a = model.encode(image, ids, pattern, text_mask=mask).queries
        b = model.encode(image, other, pattern, text_mask=mask).queries
        alone = model(image)
    if pattern == "itm":
        assert max_diff(a, b) > 1e-3
    else:
        assert max_diff(a, b) < 1e-6
        assert max_diff(a, alone) < 1e-5


def test_itc_pattern_is_two_separate_passes():
    model = _tiny()
    image, ids, mask = _batch()
    with torch.no_grad():
        joint = model.encode(image, ids, "itc", text_mask=mask)
        assert max_diff(joint.queries, model(image)) < 1e-5
        assert max_diff(joint.text, model.encode_text(ids, mask)) < 1e-5


@pytest.mark.parametrize("t", [0, 3, 5])
def test_itg_text_does_not_see_later_tokens(t):
    model = _tiny()
    image, ids, _ = _batch()
    later = ids.clone()
    later[:, t + 1 :] = (later[:, t + 1 :] + 7) % (VOCAB - 1) + 1
    with torch.no_grad():
        a = model.encode(image, ids, "itg").text
        b = model.encode(image, later, "itg").text
        bi_a = model.encode(image, ids, "itm").text
        bi_b = model.encode(image, later, "itm").text
    assert max_diff(a[:, : t + 1], b[:, : t + 1]) < 1e-6
    assert max_diff(a[:, t + 1 :], b[:, t + 1 :]) > 1e-3
    assert max_diff(bi_a[:, : t + 1], bi_b[:, : t + 1]) > 1e-3  # bidirectional text does see them


def test_itg_text_sees_the_image_through_the_queries():
    model = _tiny()
    image, ids, _ = _batch()
    with torch.no_grad():
        a = model.encode(image, ids, "itg").text
        b = model.encode(torch.randn(image.shape), ids, "itg").text
    assert max_diff(a, b) > 1e-3


def test_padded_text_is_never_attended():
    model = _tiny()
    image, ids, mask = _batch()
    other = ids.clone()
    other[mask == 0] = 1
    keep = mask.bool()
    with torch.no_grad():
        for pattern in PATTERNS:
            a, b = model.encode(image, ids, pattern, text_mask=mask), model.encode(image, other, pattern, text_mask=mask)
            assert max_diff(a.queries, b.queries) < 1e-6
            assert max_diff(a.text[keep], b.text[keep]) < 1e-6
        assert max_diff(model.encode_text(ids, mask)[keep], model.encode_text(other, mask)[keep]) < 1e-6


@pytest.mark.parametrize("n", [1, 5, 17])
def test_connector_gives_num_queries_tokens_whatever_the_image_token_count(n):
    model = _tiny(text=False)
    out = model(torch.randn(2, n, DV))
    assert out.shape == (2, model.num_tokens(n), D) == (2, M, D)
    assert not hasattr(model, "word_embed") and model.layers[0].text_mlp is None


def test_training_reaches_queries_image_norm_and_both_feed_forwards():
    model = _tiny(dropout=0.1).train()
    image, ids, mask = _batch()
    out = model.encode(image, ids, "itg", text_mask=mask)
    (out.queries.square().mean() + out.text.square().mean()).backward()
    for name in ("query_tokens", "image_norm.weight", "word_embed.weight", "layers.0.query_mlp.fc1.weight",
                 "layers.0.text_mlp.fc1.weight", "layers.0.cross.kv.weight", "layers.2.cross.q.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert max_diff(model(image), model(image)) > 0  # dropout is on in training


def test_cross_attention_layers_follow_the_frequency():
    cfg = QFormerConfig(width=D, depth=5, num_heads=4, mlp_dim=64, num_queries=M, context_dim=DV, cross_attention_every=2)
    assert [layer.cross is not None for layer in QFormer(cfg).layers] == [True, False, True, False, True]


def test_bad_input_is_named():
    model = _tiny()
    image, ids, mask = _batch()
    with pytest.raises(VlkitError, match="context_dim"):
        model(torch.randn(2, 5, DV + 1))
    with pytest.raises(VlkitError, match="16 positions"):
        model.encode_text(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(VlkitError, match="pattern 'causal'"):
        model.encode(image, ids, "causal")
    with pytest.raises(VlkitError, match="3 rows but input_ids has 2"):
        model.encode(image, ids[:2], "itm")
    with pytest.raises(VlkitError, match="text_mask has shape"):
        model.encode_text(ids, mask[:, :3])
    with pytest.raises(VlkitError, match="no tokens"):
        model.encode_text(ids, torch.zeros_like(mask))
    with pytest.raises(VlkitError, match="image_mask has shape"):
        model(image, image_mask=torch.ones(3, 4))
    with pytest.raises(VlkitError, match="no text path"):
        _tiny(text=False).encode_text(ids)
    with pytest.raises(ValueError, match="divisible"):
        QFormerConfig(width=30, num_heads=4)


def test_checkpoint_with_another_query_count_is_refused(tmp_path):
    _, _, reader, raw = _bare_folder(tmp_path)
    cfg = hf_qformer.model_config(raw, "config.json", num_queries=M + 2)
    with pytest.raises(CheckpointError, match="query_tokens.*expected \\(1, 8, 32\\)"):
        km.load_into(lambda: QFormer(cfg), hf_qformer.rules(cfg, qformer=""), reader, "Blip2QFormerModel")
