"""The demo's BLIP-2 part: stage 1 (ITC + ITM + ITG) under the demo's shapes CLIP tower, then stage 2
through the demo's shapes LM, both frozen; text→image retrieval by ITC and after ITM re-ranking,
captions (through the LM, and by the Q-Former alone) and zero-shot VQA on held-out scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import vlkit
from vlkit.config import apply_overrides, read
from vlkit.data.shapes import ShapesWorld
from vlkit.data.shapes_chat import QUESTION_TYPES
from vlkit.demo.folders import publish
from vlkit.demo.timing import step_seconds
from vlkit.demo.vlm import split_overrides
from vlkit.eval import shapes as shapes_eval
from vlkit.eval.metrics.cider import cider
from vlkit.eval.metrics import accuracy_by_type, normalize_answer
from vlkit.eval.retrieval import image_tokens, itc_itm_retrieval
from vlkit.models.blip2_processor import CAPTION_PROMPT, Blip2Answerer
from vlkit.train.blip2 import load_recipe, train_blip2

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
REQUIRES: tuple[str, ...] = ("clip", "lm")
HELD_OUT_SEED = 1_000_003
"""Scenes for captions and VQA that no training run draws."""
SIZES = {"retrieval": 1000, "caption": 300, "vqa": 500}
QUICK_SIZES = {"retrieval": 200, "caption": 50, "vqa": 100}


def stage_recipe(stage: int, out: Path, quick: bool, overrides: list[str]):
    path = RECIPES / f"blip2_shapes_stage{stage}.yaml"
    paths = [f"model.vision={out / 'clip'}"] if stage == 1 else [f"model.init_from={out / 'blip2' / 'stage1'}", f"model.lm={out / 'lm'}"]
    data = apply_overrides(read(path), paths)
    if quick:
        data = apply_overrides(data, ["loop.steps=30", "optim.warmup_steps=5"])
    return load_recipe(stage, data, overrides, path)


def _estimate_step_seconds(recipe) -> float:
    """Time two stage-1 training steps (after one warm-up) on the recipe's data."""
    from vlkit.data.pairs import Collate
    from vlkit.train.blip2 import build_stage1
    from vlkit.train.clip import build_dataset

    model = build_stage1(recipe).train()
    data = build_dataset(recipe, model.processor)
    families = recipe.loop.batch_size // recipe.data.group_size
    batch = Collate(model.tokenizer)([data[i] for i in range(families)])
    batch.pop("skipped")
    return step_seconds(lambda: model(**batch), recipe.loop.precision)


@torch.no_grad()
def evaluate_stage1(model, image_size: int, n: int) -> dict:
    """Retrieval on the shapes benchmark's held-out split: ITC, then ITM on each text's top 16; and
    left/right relations against the mirrored scene (:func:`~vlkit.eval.shapes.mirror_split`) by each."""
    world = ShapesWorld(image_size)
    scenes, captions = shapes_eval.retrieval_split(world, n)
    tokens = image_tokens(model, shapes_eval.pixels(model, scenes))
    results = itc_itm_retrieval(model, tokens, [c.text for c in captions], shapes_eval.truth_matrix(scenes, captions))[0]
    sided, mirrors, sided_captions = shapes_eval.mirror_split(world, n // 2)
    ids = model.tokenizer([c.text for c in sided_captions])
    text = model.encode_text(ids["input_ids"], ids["attention_mask"])
    itc, itm = [], []
    for group in (sided, mirrors):
        group_tokens = image_tokens(model, shapes_eval.pixels(model, group))
        itc.append(model.similarity(model.image_features(group_tokens), text).diagonal())
        itm.append(model.itm_scores(group_tokens, ids["input_ids"], ids["attention_mask"]))
    return results | {"relation_mirror_itc": shapes_eval.mirror_accuracy(*itc), "relation_mirror_itm": shapes_eval.mirror_accuracy(*itm)}


@torch.no_grad()
def evaluate_stage2(model, qformer_model, image_size: int, sizes: dict) -> tuple[dict, list[dict]]:
    """CIDEr-D of captions through the LM (prompt "a photo of") and by the Q-Former alone (ITG), and
    zero-shot VQA accuracy (prompt "Question: {} Short answer:"; exact match after VQA's answer
    normalisation, as one answer per question gives VQA's 3-annotator rule nothing to count) on held-out scenes."""
    world = ShapesWorld(image_size, seed=HELD_OUT_SEED)
    scenes = [world.scene(i) for i in range(max(sizes["caption"], sizes["vqa"]))]
    answerer = Blip2Answerer(model)
    refs = {i: [c.text for c in s.captions] for i, s in enumerate(scenes[: sizes["caption"]])}
    lm_caps, itg_caps = {}, {}
    for start in range(0, len(refs), 50):
        part = scenes[start : min(start + 50, len(refs))]
        images = [s.render() for s in part]
        lm_caps |= dict(zip(range(start, start + len(part)), answerer.generate(images, [CAPTION_PROMPT] * len(part), max_new_tokens=24)))
        itg_caps |= dict(zip(range(start, start + len(part)), qformer_model.caption(qformer_model.processor.batch(images), max_new_tokens=24)))
    rng = np.random.default_rng(HELD_OUT_SEED)
    questions = [(s, s.vqa[int(rng.integers(len(s.vqa)))]) for s in scenes[: sizes["vqa"]]]
    answers = []
    for start in range(0, len(questions), 50):
        part = questions[start : start + 50]
        prompts = [Blip2Answerer.question_prompt(q["question"]) for _, q in part]
        answers += answerer.generate([s.render() for s, _ in part], prompts, max_new_tokens=8)
    right = [normalize_answer(a) == normalize_answer(q["answer"]) for a, (_, q) in zip(answers, questions)]
    by_type = accuracy_by_type(right, [q["type"] for _, q in questions], QUESTION_TYPES)
    metrics = {"caption_cider": cider(lm_caps, refs), "caption_cider_itg": cider(itg_caps, refs), "vqa_accuracy": sum(right) / len(right),
               **{f"vqa_{t}": v for t, v in by_type.items()}}
    examples = [{"scene": scenes[i], "caption": lm_caps[i], "itg": itg_caps[i], "question": questions[i][1]["question"],
                 "answer": answers[i], "truth": questions[i][1]["answer"]} for i in range(4)]  # fmt: skip
    return metrics, examples


def _recipes(out: Path, quick: bool, overrides: list[str]) -> dict:
    per_stage = split_overrides(overrides)
    return {s: stage_recipe(s, out, quick, per_stage[f"stage{s}"]) for s in (1, 2)}


def estimate(out: Path, quick: bool, overrides: list[str]) -> tuple[float, str]:
    """Seconds of training on this machine, and what the part will do."""
    recipes = _recipes(out, quick, overrides)
    steps = recipes[1].loop.steps + recipes[2].loop.steps
    return _estimate_step_seconds(recipes[1]) * steps, (
        f"stage 1 {recipes[1].loop.steps} steps, stage 2 {recipes[2].loop.steps} steps (stage 1's step time measured, "
        "stage 2's assumed alike), then a few minutes of evaluation")


def run(out: Path, quick: bool, overrides: list[str]) -> tuple[dict, str]:
    recipes = _recipes(out, quick, overrides)
    root = out / "blip2"
    runs = {s: root / f"stage{s}" for s in (1, 2)}
    summaries = {1: train_blip2(1, recipes[1], runs[1])}
    first = vlkit.load(runs[1])
    sizes = QUICK_SIZES if quick else SIZES
    print(f"[blip2] stage 1: retrieval on {sizes['retrieval']} held-out scenes (ITC, then ITM on the top 16)")
    retrieval = evaluate_stage1(first, recipes[1].data.image_size, sizes["retrieval"])
    summaries[2] = train_blip2(2, recipes[2], runs[2])
    model = vlkit.load(runs[2])
    print(f"[blip2] stage 2: captions of {sizes['caption']} and zero-shot VQA on {sizes['vqa']} held-out scenes")
    generative, examples = evaluate_stage2(model, first, recipes[1].data.image_size, sizes)
    publish(Path(summaries[2]["checkpoint"]), root)
    metrics = {"t2i_r1_itc": retrieval["t2i_r1_itc"], "t2i_r1": retrieval["t2i_r1"], **generative,
               "trainable_params": summaries[1]["trainable_params"] + summaries[2]["trainable_params"],
               "train_seconds": summaries[1]["train_seconds"] + summaries[2]["train_seconds"],
               "stage1_seconds": summaries[1]["train_seconds"], "stage2_seconds": summaries[2]["train_seconds"],
               **{k: v for k, v in retrieval.items() if k not in ("t2i_r1_itc", "t2i_r1")}}  # fmt: skip
    return metrics, _section(out, metrics, examples, recipes, sizes)


def _section(out: Path, metrics: dict, examples: list[dict], recipes: dict, sizes: dict) -> str:
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ex in enumerate(examples):
        name = f"blip2_example_{i}.png"
        ex["scene"].render().resize((128, 128)).save(figures / name)
        rows.append(f"| ![scene](figures/{name}) | {ex['caption']} | {ex['itg']} | {ex['question']} → {ex['answer']} (truth: {ex['truth']}) |")
    shown = [k for k in metrics if k not in ("train_seconds", "stage1_seconds", "stage2_seconds", "trainable_params")]
    return "\n".join([
        "## BLIP-2 on the shapes world",
        "",
        f"Stage 1: {recipes[1].loop.steps} steps of {recipes[1].loop.batch_size} pairs, ITC + ITM + ITG under the demo's CLIP tower "
        f"(frozen); stage 2: {recipes[2].loop.steps} steps of {recipes[2].loop.batch_size} captions through the demo's LM (frozen). "
        f"{metrics['trainable_params']:,} trainable parameters; {metrics['train_seconds'] / 60:.1f} min of training. "
        "Model folders: `blip2/stage1/` (retrieval, Q-Former captions) and `blip2/` (captions and VQA through the LM).",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {metrics[k]:.3f} |" for k in shown],
        "",
        f"Retrieval: {sizes['retrieval']} held-out scenes with one caption each (a caption is correct for every scene it is "
        "true of); `t2i_r1_itc` ranks by ITC alone, `t2i_r1` after ITM re-scores each text's top 16 (ITM's match "
        "log-odds plus the ITC logit). `relation_mirror_itc` "
        f"/ `_itm`: {sizes['retrieval'] // 2} held-out captions that put one object left or right of another, scored higher on "
        "their scene than on the scene mirrored (chance 0.5). Captions: CIDEr-D of "
        f"{sizes['caption']} held-out scenes against all their captions, through the LM (prompt \"a photo of\") and by the "
        f"Q-Former's ITG head alone (`caption_cider_itg`). VQA: {sizes['vqa']} held-out questions, zero-shot "
        "(\"Question: {} Short answer:\"); the model never trained on questions.",
        "",
        "| image | caption (LM) | caption (Q-Former alone) | VQA |",
        "|---|---|---|---|",
        *rows,
        "",
    ])
