"""The demo's CLIP part: train a CLIP from scratch on the shapes world, then zero-shot and retrieval."""

from __future__ import annotations

from pathlib import Path

import vlkit
from vlkit.config import apply_overrides, read, to_dict
from vlkit.data.shapes import CLASS_NAMES, TEMPLATES
from vlkit.demo.folders import publish
from vlkit.demo.timing import step_seconds
from vlkit.eval import shapes as shapes_eval
from vlkit.eval.report import plot_confusion
from vlkit.report import draw_loss, draw_retrieval
from vlkit.train.clip import load_recipe, shapes_world, train_clip

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
REQUIRES: tuple[str, ...] = ()


def _estimate_step_seconds(recipe) -> float:
    """Time two training steps of the recipe's model on this machine (after one warm-up)."""
    from vlkit.data.pairs import Collate, ShapesPairs
    from vlkit.models.clip import CLIP
    from vlkit.train.clip import build_tokenizer, shapes_processor

    tok = build_tokenizer(recipe.data, recipe.model.text.context_length)
    cfg = load_recipe(to_dict(recipe)).model
    cfg.text.vocab_size, cfg.text.eot_token_id = tok.vocab_size, None
    model = CLIP(cfg)
    groups = recipe.loop.batch_size // recipe.data.group_size
    data = ShapesPairs(shapes_world(recipe.data), shapes_processor(recipe.data.image_size), groups, recipe.data.group_size)
    batch = Collate(tok)([data[i] for i in range(groups)])
    batch.pop("skipped")
    return step_seconds(lambda: model(**batch), recipe.loop.precision)


def clip_recipe(quick: bool, overrides: list[str]):
    data = read(RECIPES / "clip_shapes.yaml")
    if quick:
        data = apply_overrides(data, ["loop.steps=150", "optim.warmup_steps=20"])
    return load_recipe(data, overrides, RECIPES / "clip_shapes.yaml")


def estimate(out: Path, quick: bool, overrides: list[str]) -> tuple[float, str]:
    """Seconds of training on this machine, and what the part will do."""
    recipe = clip_recipe(quick, overrides)
    per_step = _estimate_step_seconds(recipe)
    return per_step * recipe.loop.steps, (f"{recipe.loop.steps} steps × {recipe.loop.batch_size} samples "
                                          f"({recipe.loop.batch_size / per_step:.0f} samples/s), then ~1 min of evaluation")


def _train(recipe, run: Path) -> dict:
    summary = train_clip(recipe, run)
    publish(Path(summary["checkpoint"]), run)
    return summary


def stand_in(folder: Path, quick: bool, overrides: list[str]) -> None:
    """The part's model trained one step: what later parts' estimates build on before it has run."""
    _train(clip_recipe(quick, [*overrides, "--loop.steps=1", "--optim.warmup_steps=0"]), folder)


def run(out: Path, quick: bool, overrides: list[str]) -> tuple[dict, str]:
    recipe = clip_recipe(quick, overrides)
    run = out / "clip"
    summary = _train(recipe, run)
    model = vlkit.load(run)
    print("[clip] evaluating on 1000 held-out single-object images and 1000 held-out captions")
    res = shapes_eval.evaluate(model, shapes_world(recipe.data))
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    draw_loss(run / "metrics.jsonl", figures / "clip_loss.png")
    recall = res["zeroshot_mean_per_class_recall"]
    plot_confusion(res["confusion"].tolist(), list(CLASS_NAMES), figures / "clip_confusion.png",
                   f"zero-shot confusion, row-normalised (mean per-class recall {recall:.2f})", normalise=True)  # fmt: skip
    draw_retrieval(res["scenes"], res["captions"], res["similarity"], res["truth"], figures / "clip_retrieval.png")
    metrics = {k: v for k, v in res.items() if isinstance(v, float)}
    metrics["train_seconds"] = summary["train_seconds"]
    metrics["samples"] = summary["samples"]
    section = "\n".join(
        [
            "## CLIP on the shapes world",
            "",
            f"Trained from scratch: {recipe.loop.steps} steps of {recipe.loop.batch_size} image-text pairs "
            f"({summary['samples']} samples, {summary['train_seconds'] / 60:.1f} min). Model folder: `clip/`.",
            "",
            "| metric | value |",
            "|---|---|",
            *[f"| {k} | {v:.3f} |" for k, v in metrics.items() if k not in ("train_seconds", "samples")],
            "",
            "Zero-shot: 1000 held-out single-object images, 40 classes (color × shape), prompts averaged over "
            f"{len(TEMPLATES)} templates. Retrieval: 1000 held-out 1–3-object scenes with one caption "
            "each; a retrieved image counts as correct when the caption is true of its scene. `relation_mirror_acc`: 400 "
            "held-out captions that put one object left or right of another, scored higher on their scene than on the "
            "scene mirrored (chance 0.5).",
            "",
            "![loss](figures/clip_loss.png)",
            "",
            "![text-to-image retrieval](figures/clip_retrieval.png)",
            "",
            "![zero-shot confusion](figures/clip_confusion.png)",
            "",
        ]
    )
    return metrics, section
