"""The shapes VLM's evaluation scores what it should: an oracle that answers from the scene
gets every VQA type and grounding right and the CIDEr-D ceiling; a model that answers wrongly
gets zero; predictions are matched to their own images and prompts."""

from __future__ import annotations

import json

import pytest

from vlkit.data.shapes_chat import ShapesChatConfig, box_text, caption, eval_captions, eval_grounding, eval_vqa
from vlkit.demo.vlm import RUNS, evaluate, run_recipe, split_overrides

SIZES = {"vqa": 25, "caption": 10, "grounding": 10}


class Oracle:
    """Answers each (image, prompt) from the held-out world's annotations."""

    def __init__(self, world, wrong: bool = False):
        self.answers = {}
        for it in eval_vqa(world, SIZES["vqa"]):
            self.answers[(world.scene(it.index).render().tobytes(), it.prompt)] = "xyz" if wrong else it.target
        for it in eval_captions(world, SIZES["caption"]):
            self.answers[(world.scene(it.index).render().tobytes(), it.prompt)] = "zzz" if wrong else caption(world.scene(it.index))
        for it in eval_grounding(world, SIZES["grounding"]):
            box = [0, 0, 1, 1] if wrong else it.target
            self.answers[(world.scene(it.index).render().tobytes(), it.prompt)] = box_text(box, world.image_size)
        self.calls = 0

    def generate(self, images, prompts, max_new_tokens):
        self.calls += 1
        return [self.answers[(im.tobytes(), p)] for im, p in zip(images, prompts)]


@pytest.fixture(scope="module")
def world():
    return ShapesChatConfig(held_out=True).world


def test_oracle_scores_full_marks(world):
    metrics, examples = evaluate(Oracle(world), world, SIZES)
    assert metrics["vqa_accuracy"] == 1.0
    assert set(metrics["vqa_by_type"]) == {"color", "shape", "count", "yesno", "relation"}
    assert all(v == 1.0 for v in metrics["vqa_by_type"].values())
    assert metrics["grounding_acc50"] == 1.0 and metrics["grounding_unparsed"] == 0
    assert metrics["caption_cider"] > 2.0
    assert len(examples["vqa"]) == 25 and len(examples["grounding"]) == 10


def test_wrong_answers_score_zero(world):
    metrics, _ = evaluate(Oracle(world, wrong=True), world, SIZES)
    assert metrics["vqa_accuracy"] == 0.0 and metrics["grounding_acc50"] == 0.0
    assert metrics["caption_cider"] < 0.05


def test_overrides_reach_their_stage():
    got = split_overrides(["--stage1.loop.steps=5", "--stage2.train.lm=lora", "--loop.batch_size=8"])
    assert got == {"stage1": ["--loop.steps=5", "--loop.batch_size=8"], "stage2": ["--train.lm=lora", "--loop.batch_size=8"]}
    got = split_overrides(["--grounding.loop.steps=7", "loop.seed=3"], tuple(RUNS))
    assert got == {"stage1": ["loop.seed=3"], "grounding": ["--loop.steps=7", "loop.seed=3"], "stage2": ["loop.seed=3"]}


def test_each_run_starts_from_the_one_before(tmp_path):
    """Stage 2 is mostly boxes, then the mix: each recipe's init_from names the run before it."""
    recipes = {run: run_recipe(run, tmp_path, False, []) for run in RUNS}
    assert recipes["stage1"].init_from is None and recipes["stage1"].stage == 1
    assert recipes["grounding"].init_from == str(tmp_path / "vlm" / "stage1")
    assert recipes["stage2"].init_from == str(tmp_path / "vlm" / "grounding")
    assert max(recipes["grounding"].data.shapes.mix, key=recipes["grounding"].data.shapes.mix.get) == "grounding"
    assert len(recipes["stage2"].data.shapes.mix) > 2
    assert recipes["grounding"].model == recipes["stage2"].model, "the chain trains one model"
    quick = run_recipe("grounding", tmp_path, True, ["--loop.steps=4"])
    assert quick.loop.steps == 4, "an override wins over quick mode's steps"


@pytest.mark.slow
def test_lm_and_vlm_parts_end_to_end(tmp_path):
    from vlkit.demo import lm, vlm
    from vlkit.models.clip import CLIPConfig
    from vlkit.text.encoder import TextConfig
    from vlkit.train.clip import CLIPRecipe, DataConfig, train_clip
    from vlkit.train.loop import LoopConfig, OptimConfig
    from vlkit.vision.vit import ViTConfig

    clip = CLIPRecipe(model=CLIPConfig(vision=ViTConfig(image_size=64, patch_size=16, width=32, depth=2, num_heads=2),
                                       text=TextConfig(context_length=24, width=32, depth=1, num_heads=2), embed_dim=32),
                      data=DataConfig(source="shapes"), optim=OptimConfig(warmup_steps=1),
                      loop=LoopConfig(steps=2, batch_size=8, log_every=1))  # fmt: skip
    train_clip(clip, tmp_path / "clip")
    tiny_lm = ["--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=1",
               "--model.num_attention_heads=2", "--data.scenes=100", "--loop.steps=3", "--loop.batch_size=4"]  # fmt: skip
    lm_metrics, lm_section = lm.run(tmp_path, True, tiny_lm)
    assert (tmp_path / "lm" / "config.json").is_file() and lm_metrics["held_out_perplexity"] > 1
    assert "## The shapes language model" in lm_section
    (tmp_path / "metrics.json").write_text(json.dumps({"lm": lm_metrics}))  # as run_demo leaves it after the LM part
    metrics, section = vlm.run(tmp_path, True, ["--stage1.loop.steps=2", "--grounding.loop.steps=2", "--stage2.loop.steps=2",
                                                "--loop.batch_size=4"])  # fmt: skip
    assert (tmp_path / "vlm" / "config.json").is_file() and (tmp_path / "figures" / "vlm_examples.png").is_file()
    assert all((tmp_path / "figures" / f"vlm_{run}_loss.png").is_file() for run in RUNS) and metrics["grounding_seconds"] > 0
    assert set(metrics["vqa_by_type"]) == {"color", "shape", "count", "yesno", "relation"}
    assert all(0 <= metrics[k] <= 1 for k in ("vqa_accuracy", "grounding_acc50")) and metrics["caption_cider"] >= 0
    assert metrics["train_seconds"] > 0 and "| VQA exact match (200 questions)" in section
    assert metrics["train_seconds_with_lm"] == metrics["train_seconds"] + lm_metrics["train_seconds"]
    assert "| training time with the LM's pre-training |" in section
    assert "first mostly on referring expressions (mix grounding 75%, vqa 25%), 2 steps of 4" in section
