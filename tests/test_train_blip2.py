"""`vlkit train blip2 --stage 1|2`: stage 1 trains the Q-Former under a frozen CLIP tower (ITC+ITM+ITG)
and its folder retrieves by ITC then ITM (`vlkit eval retrieval`); stage 2 starts from stage 1's
Q-Former with a frozen LM, supervising only the caption; re-ranking against a direct computation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vlkit
from _vlm_train_util import lm_folder
from vlkit.cli import main
from vlkit.errors import ConfigError
from vlkit.eval.retrieval import rerank
from vlkit.losses import IGNORE_INDEX
from vlkit.models.blip2 import Blip2
from vlkit.models.blip2_processor import Blip2Processor
from vlkit.models.blip2_qformer import Blip2QFormer
from vlkit.train.blip2 import CaptionLMCollate, build_stage2, load_recipe, train_blip2

QFORMER = {"width": 32, "depth": 2, "num_heads": 4, "mlp_dim": 64, "num_queries": 4, "max_positions": 24, "dropout": 0.0}


def clip_folder(folder):
    """A tiny vlkit CLIP over 32-pixel images (3 layers), with its preprocessing."""
    from vlkit.models.clip import CLIP, CLIPConfig
    from vlkit.text.encoder import TextConfig
    from vlkit.train.checkpoint import save_model
    from vlkit.vision.preprocess import ImageProcessor
    from vlkit.vision.vit import ViTConfig

    torch.manual_seed(0)
    model = CLIP(CLIPConfig(vision=ViTConfig(image_size=32, patch_size=8, width=32, depth=3, num_heads=4),
                            text=TextConfig(vocab_size=50, width=32, depth=1, num_heads=4, context_length=16), embed_dim=16))
    model.processor = ImageProcessor(size=32, crop_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    save_model(folder, model, "clip")
    return folder


def stage1_recipe(clip, steps: int = 2, **model) -> dict:
    return {"model": {"vision": str(clip), "qformer": QFORMER, "embed_dim": 16, **model},
            "data": {"image_size": 32, "group_size": 2}, "optim": {"warmup_steps": 1},
            "loop": {"steps": steps, "batch_size": 8, "log_every": 1}}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2")
    clip = clip_folder(root / "clip")
    (root / "s1.json").write_text(json.dumps(stage1_recipe(clip)))
    assert main(["train", "blip2", "--stage", "1", "--recipe", str(root / "s1.json"), "--out", str(root / "s1")]) == 0
    return {"root": root, "clip": clip, "stage1": root / "s1", "lm": lm_folder(root / "lmf")}


def test_stage1_trains_the_qformer_under_the_frozen_clip_tower(parts):
    model = vlkit.load(parts["stage1"])
    assert isinstance(model, Blip2QFormer)
    clip = load_file(str(parts["clip"] / "model.safetensors"))
    ours = model.state_dict()
    tower = [k for k in ours if k.startswith("vision.")]
    assert tower and all(torch.equal(ours[k], clip[k]) for k in tower)  # frozen: the CLIP's tower, bit for bit
    assert model.tokenizer.token_id("[DEC]") == model.cfg.dec_token_id and model.cfg.eos_token_id == model.tokenizer.token_id("[EOS]")
    fresh = Blip2QFormer(model.cfg)
    torch.manual_seed(0)
    moved = [k for k in ours if k.startswith("qformer.layers.0") and not torch.equal(ours[k], fresh.state_dict()[k])]
    assert moved
    log = [json.loads(line) for line in (parts["stage1"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    for r in log:  # the three objectives apart, which add up to the loss (one micro-batch a step)
        assert r["loss"] == pytest.approx(r["loss_itc"] + r["loss_itm"] + r["loss_itg"], rel=1e-5)


def test_vision_drop_last_reads_an_earlier_layer(parts, tmp_path):
    recipe = load_recipe(1, stage1_recipe(parts["clip"], steps=1, vision_drop_last=1))
    train_blip2(1, recipe, tmp_path / "run")
    assert vlkit.load(tmp_path / "run").cfg.vision.depth == 2


def test_eval_retrieval_ranks_by_itc_then_itm(parts, tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "data"), "-n", "12", "--image-size", "32"]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "retrieval", "--model", str(parts["stage1"]), "--data", str(tmp_path / "data" / "captions"),
                 "--out", str(out), "--batch-size", "7"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["counts"]["images"] == 12
    for key in ("t2i_r1", "t2i_r1_itc", "i2t_r5", "i2t_r5_itc"):
        assert 0.0 <= results[key] <= 1.0, key
    assert (out / "predictions.jsonl").is_file()


def test_rerank_rescores_the_top_k_and_ranks_the_rest_below():
    itc = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    itm = torch.tensor([[5.0, -1.0, 2.0, 9.0], [0.0, -3.0, 4.0, 9.0]])
    got = rerank(itc, 2, lambda q, g: itm[q, g], batch_size=3)
    inf = float("-inf")
    want = torch.tensor([[5.9, inf, 2.5, inf], [inf, -2.2, 4.7, inf]])
    assert torch.allclose(got, want)


def test_stage2_starts_from_stage1_with_the_lm_frozen(parts, tmp_path):
    data = {"model": {"init_from": str(parts["stage1"]), "lm": str(parts["lm"])}, "data": {"image_size": 32, "group_size": 2},
            "optim": {"warmup_steps": 1}, "loop": {"steps": 2, "batch_size": 8}}
    recipe = load_recipe(2, data)
    model = build_stage2(recipe)
    first = vlkit.load(parts["stage1"])
    assert isinstance(model, Blip2) and not model.cfg.qformer.text
    start = model.qformer.state_dict()
    assert all(torch.equal(v, first.qformer.state_dict()[k]) for k, v in start.items())
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"qformer", "language_projection"}
    summary = train_blip2(2, recipe, tmp_path / "s2")
    assert summary["trainable_params"] == sum(p.numel() for p in [*model.qformer.parameters(), *model.language_projection.parameters()])
    after = vlkit.load(tmp_path / "s2")
    lm_before = load_file(str(parts["lm"] / "model.safetensors"))
    assert all(torch.equal(after.lm.state_dict()[k], v) for k, v in lm_before.items())
    assert any(not torch.equal(after.qformer.state_dict()[k], v) for k, v in start.items())


def test_stage2_supervises_only_the_caption_and_eos(parts):
    lm = vlkit.load(parts["lm"])
    tok = lm.tokenizer
    image = tok.token_to_id("<image>")
    collate = CaptionLMCollate(Blip2Processor(None, tok, 3, image, 64), "a photo of")
    pixels = torch.zeros(3, 32, 32)
    batch = collate([[(pixels, "a red circle")], [(pixels, "two shapes")]])
    prompt = tok.encode("a photo of")
    caption = tok.encode(" a red circle", add_special_tokens=False) + [tok.eos_token_id]
    row = batch["input_ids"][0].tolist()
    assert row[: 3 + len(prompt) + len(caption)] == [image] * 3 + prompt + caption
    labels = batch["labels"][0].tolist()
    assert labels[: 3 + len(prompt)] == [IGNORE_INDEX] * (3 + len(prompt))
    assert labels[3 + len(prompt) : 3 + len(prompt) + len(caption)] == caption
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_stage2_refuses_a_folder_that_is_not_stage1(parts):
    with pytest.raises(ConfigError, match="model.init_from.*expected a BLIP-2 stage-1"):
        build_stage2(load_recipe(2, {"model": {"init_from": str(parts["clip"]), "lm": str(parts["lm"])}, "data": {"image_size": 32}}))
    with pytest.raises(ConfigError, match="model.lm"):
        build_stage2(load_recipe(2, {"model": {"init_from": str(parts["stage1"]), "lm": str(parts["clip"])}, "data": {"image_size": 32}}))
    with pytest.raises(ConfigError, match="model.vision"):
        load_recipe(1, {})
    with pytest.raises(ConfigError, match="image_size"):
        from vlkit.train.blip2 import build_stage1

        build_stage1(load_recipe(1, {**stage1_recipe(parts["clip"]), "data": {"image_size": 64}}))
