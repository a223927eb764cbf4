"""The ViT, the text tower and CLIP: shapes, pooling, masks, checkpointing, freezing, reloading."""

from __future__ import annotations

import math

import pytest
import torch

import vlkit
import vlkit.nn.transformer as transformer_module
from vlkit.data.pairs import Collate, ShapesPairs
from vlkit.data.shapes import ShapesWorld
from vlkit.models.clip import CLIP, CLIPConfig
from vlkit.text.encoder import TextConfig, TextEncoder
from vlkit.text.tokenizer import word_level
from vlkit.train.checkpoint import save_model
from vlkit.train.clip import shapes_processor, shapes_vocabulary
from vlkit.train.loop import LoopConfig, OptimConfig, fit
from vlkit.vision.vit import ViT, ViTConfig

WIDTH = 32


def vit(**overrides) -> ViT:
    torch.manual_seed(0)
    cfg = {"image_size": 32, "patch_size": 8, "width": WIDTH, "depth": 2, "num_heads": 2, "act": "gelu"}
    return ViT(ViTConfig(**{**cfg, **overrides})).eval()


@pytest.mark.parametrize("height, width", [(32, 32), (48, 48), (64, 32), (16, 24)])
def test_vit_gives_one_token_per_patch_at_any_resolution(height, width):
    model = vit()
    out = model(torch.randn(2, 3, height, width))
    n_patches = (height // 8) * (width // 8)
    assert out.tokens.shape == (2, 1 + n_patches, WIDTH)
    assert out.pooled.shape == (2, WIDTH)
    assert torch.isfinite(out.tokens).all()


@pytest.mark.parametrize("overrides", [{}, {"patch_bias": True}, {"stem_channels": (4, 8), "stem_norm": True}])
@pytest.mark.parametrize("height, width", [(32, 32), (35, 41)])
def test_patch_embedding_as_a_matmul_equals_the_convolution(overrides, height, width):
    model = vit(**overrides).double()
    x = model.stem(torch.randn(2, 3, height, width, dtype=torch.float64))
    conv = model.patch_embed(x)
    tokens, gh, gw = model.patch_tokens(x)
    assert (gh, gw) == conv.shape[-2:]
    torch.testing.assert_close(tokens, conv.flatten(2).transpose(1, 2), atol=1e-12, rtol=1e-12)


def test_position_embeddings_interpolate_rows_as_rows_and_keep_the_class_position():
    model = vit()
    assert model.position_embedding(4, 4) is model.pos_embed
    with torch.no_grad():  # positions that depend on the row only
        rows = torch.arange(4.0).repeat_interleave(4)
        model.pos_embed[0, 1:] = rows[:, None].expand(16, WIDTH)
    pos = model.position_embedding(8, 4)
    assert pos.shape == (1, 1 + 32, WIDTH)
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])
    grid = pos[0, 1:, 0].reshape(8, 4)
    torch.testing.assert_close(grid, grid[:, :1].expand(8, 4))  # constant along each row
    assert (grid[1:, 0] >= grid[:-1, 0]).all() and grid[-1, 0] > grid[0, 0]  # increasing down the rows


@pytest.mark.parametrize("final_norm", ["pooled", "all"])
def test_vit_returns_every_hidden_state(final_norm):
    model = vit(depth=3, final_norm=final_norm)
    pixels = torch.randn(2, 3, 32, 32)
    out = model(pixels, output_hidden_states=True)
    assert len(out.hidden_states) == 3 + 1
    x = model.embed(pixels)
    torch.testing.assert_close(out.hidden_states[0], x)
    for block, state in zip(model.transformer.blocks, out.hidden_states[1:]):
        x = block(x)
        torch.testing.assert_close(state, x)
    last = out.hidden_states[-1]
    torch.testing.assert_close(out.tokens, last if final_norm == "pooled" else model.norm(last))
    assert model(pixels).hidden_states is None


def test_cls_pooling_takes_the_normalised_class_token():
    model = vit(pool="cls")
    out = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out.pooled, model.norm(out.tokens[:, 0]))


def test_mean_pooling_averages_patch_tokens_only():
    model = vit(pool="mean", final_norm="all", num_registers=2)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 1 + 2 + 16, WIDTH)
    torch.testing.assert_close(out.pooled, out.tokens[:, 3:].mean(dim=1))
    assert not torch.allclose(out.pooled, out.tokens.mean(dim=1))


def test_map_pooling_attends_over_tokens_in_any_order():
    model = vit(pool="map", class_token=False, final_norm="all")
    out = model(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 16, WIDTH) and out.pooled.shape == (2, WIDTH)
    shuffled = out.tokens[:, torch.randperm(16)]
    torch.testing.assert_close(model.pool(shuffled), out.pooled, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.pooled, out.tokens.mean(dim=1), atol=1e-3)


def test_stem_norm_normalises_each_image_on_its_own():
    """The stem's GroupNorm uses no batch statistics: an image embeds the same alone or in a
    batch, and each normalised map has zero mean and unit variance."""
    model = vit(patch_size=8, stem_channels=(8, 16), stem_norm=True)
    norms = [m for m in model.stem if isinstance(m, torch.nn.GroupNorm)]
    assert [n.num_channels for n in norms] == [8, 16]
    x = torch.randn(3, 3, 32, 32) * torch.tensor([1.0, 5.0, 0.2])[:, None, None, None]
    seen = []
    norms[1].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        batched = model(x).pooled
        alone = model(x[1:2]).pooled
    assert torch.allclose(batched[1:2], alone, atol=1e-5)
    out = seen[0].flatten(1)
    assert torch.allclose(out.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out.var(1, unbiased=False), torch.ones(3), atol=1e-3)


def test_invalid_pooling_is_refused():
    with pytest.raises(ValueError, match="pool"):
        ViTConfig(pool="max")
    with pytest.raises(ValueError, match="class_token"):
        ViTConfig(pool="cls", class_token=False)


# --- text tower --------------------------------------------------------------------------

WORDS = "a an red blue green star circle square on the left of right big small".split()
SHORT, LONG = "a red star", "a big blue circle on the left of a small green square"


def text_encoder(**overrides):
    torch.manual_seed(0)
    tokenizer = word_level(WORDS, 16)
    cfg = {"vocab_size": tokenizer.vocab_size, "context_length": 16, "width": WIDTH, "depth": 2, "num_heads": 2}
    cfg |= {"act": "gelu", "eot_token_id": tokenizer.token_id("[EOS]")}
    return TextEncoder(TextConfig(**{**cfg, **overrides})).eval(), tokenizer


def test_eot_pooling_takes_the_end_of_text_token():
    encoder, tokenizer = text_encoder()
    batch = tokenizer([SHORT, LONG])
    out = encoder(**batch)
    eot = [len(SHORT.split()) + 1, len(LONG.split()) + 1]
    assert batch["input_ids"][0, eot[0]] == tokenizer.token_id("[EOS]")
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(2), eot])


def test_eot_pooling_by_highest_id_when_no_eot_id_is_set():
    encoder, _ = text_encoder(eot_token_id=None, vocab_size=50)
    ids = torch.tensor([[1, 7, 49, 0, 0], [1, 49, 3, 2, 0]])
    out = encoder(ids)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(2), torch.tensor([2, 1])])


def test_last_pooling_takes_the_last_position():
    encoder, tokenizer = text_encoder(pool="last")
    out = encoder(**tokenizer([SHORT, LONG]))
    torch.testing.assert_close(out.pooled, out.tokens[:, -1])


@pytest.mark.parametrize("causal", [True, False])
def test_padding_does_not_change_eot_features(causal):
    encoder, tokenizer = text_encoder(causal=causal)
    alone = encoder(**tokenizer([SHORT])).pooled[0]
    padded_batch = tokenizer([SHORT, LONG])
    assert padded_batch["attention_mask"][0].sum() < padded_batch["attention_mask"].shape[1], "SHORT must be padded"
    padded = encoder(**padded_batch).pooled[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    unmasked = encoder(padded_batch["input_ids"]).pooled[0]
    if causal:  # causal attention never sees the padding after the end-of-text token
        torch.testing.assert_close(unmasked, alone, atol=1e-5, rtol=1e-5)
    else:  # bidirectional attention does, unless the mask hides it
        assert not torch.allclose(unmasked, alone, atol=1e-4)


def assert_same_values_and_gradients(full, rows_only, params):
    """``rows_only()`` must equal ``full()`` and give every parameter the same gradient (in float64,
    so that only a real difference, not summation order, can fail it)."""
    expected, got = full(), rows_only()
    assert expected.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    weights = torch.randn_like(expected)
    g_full = torch.autograd.grad((full() * weights).sum(), params)
    g_rows = torch.autograd.grad((rows_only() * weights).sum(), params)
    for a, b in zip(g_rows, g_full):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("overrides", [{}, {"final_norm": "all"}, {"num_registers": 2}, {"pool": "mean"}, {"pool": "map"}])
def test_vit_pooled_computes_only_the_pooled_row_with_the_same_result(overrides):
    model = vit(depth=3, **overrides).double()
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    params = list(model.parameters())
    assert_same_values_and_gradients(lambda: model(pixels).pooled, lambda: model.pooled(pixels), params)


def test_vit_pooled_skips_the_last_blocks_other_rows(monkeypatch):
    model = vit(depth=2)
    seen = []
    monkeypatch.setattr(model.transformer.blocks[-1].mlp, "forward", lambda x: seen.append(x.shape) or x)
    model.pooled(torch.randn(3, 3, 32, 32))
    assert seen == [(3, 1, WIDTH)]


@pytest.mark.parametrize("overrides", [{}, {"causal": False}, {"pool": "last"}, {"padding_mask": False}])
@pytest.mark.parametrize("masked", [True, False])
def test_text_pooled_computes_only_the_pooled_row_with_the_same_result(overrides, masked):
    encoder, tokenizer = text_encoder(**overrides)
    encoder.double()
    batch = tokenizer([SHORT, LONG, "a star"])
    mask = batch["attention_mask"] if masked else None
    params = list(encoder.parameters())
    assert_same_values_and_gradients(
        lambda: encoder(batch["input_ids"], mask).pooled, lambda: encoder.pooled(batch["input_ids"], mask), params
    )


@pytest.mark.parametrize("masked", [True, False])
def test_causal_text_pooled_stops_at_the_last_end_of_text(masked, monkeypatch):
    encoder, tokenizer = text_encoder()
    encoder.double()
    batch = tokenizer([SHORT, "a star"])
    ids = torch.nn.functional.pad(batch["input_ids"], (0, 16 - batch["input_ids"].shape[1]))  # padded to 16, as CLIP's 77
    mask = torch.nn.functional.pad(batch["attention_mask"], (0, 16 - batch["input_ids"].shape[1])) if masked else None
    lengths = []
    block = encoder.transformer.blocks[0]
    monkeypatch.setattr(block, "forward", lambda x, *a, real=block.forward, **k: lengths.append(x.shape[1]) or real(x, *a, **k))
    got = encoder.pooled(ids, mask)
    assert lengths == [len(SHORT.split()) + 2]
    torch.testing.assert_close(got, encoder(ids, mask).pooled, atol=1e-10, rtol=1e-10)


# --- CLIP -----------------------------------------------------------------------------------


def tiny_clip(tokenizer=None, **overrides) -> CLIP:
    torch.manual_seed(0)
    tokenizer = tokenizer or word_level(WORDS, 16)
    cfg = CLIPConfig(
        vision=ViTConfig(image_size=32, patch_size=8, width=WIDTH, depth=2, num_heads=2, act="gelu"),
        text=TextConfig(
            vocab_size=tokenizer.vocab_size,
            context_length=16,
            width=WIDTH,
            depth=2,
            num_heads=2,
            act="gelu",
            eot_token_id=tokenizer.token_id("[EOS]"),
        ),
        embed_dim=16,
        **overrides,
    )
    model = CLIP(cfg)
    model.tokenizer = tokenizer
    model.processor = shapes_processor(32)
    return model


def clip_batch(model: CLIP, n: int = 4) -> dict:
    texts = [SHORT, LONG, "a green circle", "the blue square"][:n]
    return {"pixel_values": torch.randn(n, 3, 32, 32), **model.tokenizer(texts)}


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_clip_loss_is_finite_and_positive(loss):
    model = tiny_clip(loss=loss, logit_bias_init=-10.0 if loss == "sigmoid" else None)
    value = model(**clip_batch(model))
    assert value.ndim == 0 and torch.isfinite(value) and value > 0
    value.backward()
    assert model.logit_scale.grad is not None and torch.isfinite(model.logit_scale.grad)


def test_logit_scale_is_clamped_to_its_range():
    model = tiny_clip()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0


def grads(model: CLIP, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    model = tiny_clip().train()
    batch = clip_batch(model)
    plain = grads(model, batch)
    calls = []
    real = transformer_module.checkpoint
    monkeypatch.setattr(transformer_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = True
    checkpointed = grads(model, batch)
    assert len(calls) == 4  # two blocks in each tower
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_freezing_a_tower_keeps_its_weights_through_training(tmp_path):
    world = ShapesWorld(image_size=32, seed=0)
    tokenizer = word_level(shapes_vocabulary(world, n=200), 24)
    model = tiny_clip(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = ShapesPairs(world, model.processor, length=16)
    loop = LoopConfig(steps=2, batch_size=4, precision="fp32", freeze=["vision"], log_every=1)
    fit(model, dataset, Collate(tokenizer), loop, OptimConfig(lr=1e-2, warmup_steps=1), tmp_path, "clip")
    after = model.state_dict()
    vision = [k for k in before if k.startswith("vision.")]
    others = [k for k in before if not k.startswith("vision.")]
    assert vision and all(torch.equal(after[k], before[k]) for k in vision)
    assert not any(p.requires_grad for p in model.vision.parameters())
    changed = [k for k in others if not torch.equal(after[k], before[k])]
    assert "text.token_embed.weight" in changed and "vision_proj.weight" in changed


def test_freezing_an_unknown_module_is_named(tmp_path):
    model = tiny_clip()
    with pytest.raises(ValueError, match="'visoin'"):
        fit(model, [], Collate(model.tokenizer), LoopConfig(steps=1, batch_size=2, freeze=["visoin"]), OptimConfig(), tmp_path, "clip")


def test_saved_clip_reloads_with_identical_embeddings(tmp_path):
    model = tiny_clip().eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    save_model(tmp_path, model, "clip")
    loaded = vlkit.load(tmp_path)
    assert not loaded.training
    assert loaded.cfg == model.cfg and loaded.processor == model.processor
    pixels = torch.randn(3, 3, 32, 32)
    texts = [SHORT, LONG, "a green circle"]
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(loaded.embed_texts(texts), model.embed_texts(texts))
        assert torch.equal(loaded.logit_scale, model.logit_scale)
    assert torch.equal(loaded.tokenizer(texts)["input_ids"], model.tokenizer(texts)["input_ids"])
