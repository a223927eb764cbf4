"""The demo's text-to-image part: train the diffusion model on the demo CLIP's frozen text tower,
score it with that CLIP at guidance 1 and at the chosen guidance, and draw both side by side."""

from __future__ import annotations

from pathlib import Path

import torch

import vlkit
from vlkit.config import apply_overrides, read, to_dict
from vlkit.demo.folders import publish
from vlkit.demo.timing import step_seconds
from vlkit.eval.generation import (
    ETA, GUIDANCE, STEPS, ShapesJudge, evaluate, image_grid, reference_check, relation_prompts, single_prompts, to_pil,
)
from vlkit.train.diffusion import build_model, load_recipe, train_diffusion, training_data

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
REQUIRES: tuple[str, ...] = ("clip",)
SHOWN = 4
"""Images per prompt and guidance in the report's grid."""


def diffusion_recipe(out: Path, quick: bool, overrides: list[str]):
    data = read(RECIPES / "diffusion_shapes.yaml")
    data = apply_overrides(data, [f"text_encoder={out / 'clip'}"] + (["loop.steps=300", "optim.warmup_steps=40"] if quick else []))
    return load_recipe(data, overrides, RECIPES / "diffusion_shapes.yaml")


def _estimate_step_seconds(recipe) -> float:
    """Time two training steps of the recipe's model on this machine (after one warm-up)."""
    model = build_model(load_recipe(to_dict(recipe)))
    data, collate = training_data(recipe.data, model.tokenizer, recipe.loop.batch_size)
    batch = collate([data[i] for i in range(recipe.loop.batch_size)])
    batch.pop("skipped")
    return step_seconds(lambda: model(**batch), recipe.loop.precision)


def _grid(model, prompts: list[str], guidance: float):
    """One row per prompt: ``SHOWN`` images at guidance 1, then the same seeds at ``guidance``."""
    rows = [p for p in prompts for _ in range(SHOWN)]
    plain = to_pil(model.generate(rows, guidance=1.0, steps=STEPS, eta=ETA, seed=0))
    guided = to_pil(model.generate(rows, guidance=guidance, steps=STEPS, eta=ETA, seed=0))
    cells = []
    for r in range(len(prompts)):
        cells += plain[r * SHOWN : (r + 1) * SHOWN] + guided[r * SHOWN : (r + 1) * SHOWN]
    return image_grid(cells, 2 * SHOWN)


def _prompt_counts(quick: bool) -> tuple[int, int]:
    """How many single-object and relation prompts the evaluation samples."""
    return (40, 10) if quick else (200, 40)


def estimate(out: Path, quick: bool, overrides: list[str]) -> tuple[float, str]:
    """Seconds of training on this machine, and what the part will do."""
    recipe = diffusion_recipe(out, quick, overrides)
    prompts = sum(_prompt_counts(quick))
    return _estimate_step_seconds(recipe) * recipe.loop.steps, (
        f"{recipe.loop.steps} steps × {recipe.loop.batch_size} images, then sampling {prompts} prompts twice "
        f"(guidance 1 and {GUIDANCE}) to score them")


def run(out: Path, quick: bool, overrides: list[str]) -> tuple[dict, str]:
    recipe = diffusion_recipe(out, quick, overrides)
    n_single, n_relation = _prompt_counts(quick)
    run_dir = out / "generation"
    summary = train_diffusion(recipe, run_dir)
    publish(Path(summary["checkpoint"]), run_dir)
    model = vlkit.load(run_dir)
    judge = ShapesJudge(vlkit.load(out / "clip"))
    torch.manual_seed(0)
    results = {g: evaluate(model, judge, n_single, n_relation, guidance=g, steps=STEPS, eta=ETA, progress=True) for g in (1.0, GUIDANCE)}
    ceiling = reference_check(judge, n_single)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    prompts = [p for p, _ in single_prompts(6)] + [p for p, _, _ in relation_prompts(2)]
    _grid(model, prompts, GUIDANCE).save(figures / "generation_grid.png")
    keys = ("clip_score", "color_accuracy", "shape_accuracy", "attribute_accuracy", "relation_both_present")
    best = results[GUIDANCE]
    metrics = {k: best[k] for k in keys} | {f"{k}_guidance1": results[1.0][k] for k in keys}
    metrics |= {"guidance": GUIDANCE, "train_seconds": summary["train_seconds"]}
    table = [f"| {k} | {results[1.0][k]:.3f} | {best[k]:.3f} | {ceiling[k]:.3f} |" for k in keys]
    section = "\n".join(
        [
            "## Text-to-image generation on the shapes world",
            "",
            f"A pixel-space UNet ({sum(p.numel() for p in model.unet.parameters()) / 1e6:.1f}M parameters) conditioned on the demo "
            f"CLIP's frozen text tower, trained {recipe.loop.steps} steps of {recipe.loop.batch_size} images "
            f"({summary['train_seconds'] / 60:.1f} min); sampled with {STEPS} DDIM steps (eta {ETA:g}) from its EMA weights. Run folder: `generation/`.",
            "",
            f"| metric | guidance 1 | guidance {GUIDANCE:g} | rendered scenes (the judge's ceiling) |",
            "|---|---|---|---|",
            *table,
            "",
            f"Scored by the demo CLIP over {n_single} single-object prompts (\"a large green star\"; colour and shape read by its "
            f"zero-shot classifier) and {n_relation} two-object prompts with a relation (both objects present: each slot of "
            "\"A and B\" read back with the other held fixed). CLIP score: 100 × cosine, floored at 0, over all prompts.",
            "",
            f"Each row: one prompt; left {SHOWN} images at guidance 1, right the same seeds at guidance {GUIDANCE:g}.",
            "",
            *[f"{i + 1}. {p}" for i, p in enumerate(prompts)],
            "",
            "![generated images](figures/generation_grid.png)",
            "",
        ]
    )
    return metrics, section

