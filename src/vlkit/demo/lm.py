"""The demo's language model part: pre-train the shapes LM (a small Llama and its tokenizer)
on the shapes world's texts, then measure it on held-out scenes' texts."""

from __future__ import annotations

import math
from pathlib import Path

import torch

import vlkit
from vlkit.config import apply_overrides, read, to_dict
from vlkit.data.shapes_chat import HELD_OUT_SEED, lm_texts
from vlkit.demo.timing import step_seconds
from vlkit.lm.generate import generate_text
from vlkit.losses import causal_lm_loss
from vlkit.report import draw_loss
from vlkit.train.lm import CausalLM, PackedBlocks, load_recipe, pack, shapes_world, train_lm

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
REQUIRES: tuple[str, ...] = ()
PROMPTS = ("a red circle to the", "how many objects are there?", "is there a blue star?", "the large green square:")


def lm_recipe(quick: bool, overrides: list[str]):
    data = read(RECIPES / "lm_shapes.yaml")
    if quick:
        data = apply_overrides(data, ["loop.steps=40", "optim.warmup_steps=5", "data.scenes=1000"])
    return load_recipe(data, overrides, RECIPES / "lm_shapes.yaml")


def _estimate_step_seconds(recipe) -> float:
    """Time two training steps of the recipe's model (after one warm-up) on random blocks."""
    cfg = load_recipe(to_dict(recipe)).model
    cfg.vocab_size = recipe.data.vocab_size
    model = CausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (recipe.loop.batch_size, recipe.data.block_size))
    return step_seconds(lambda: model(ids, ids), recipe.loop.precision)


@torch.no_grad()
def held_out_loss(model, recipe, scenes: int = 300) -> float:
    """Mean next-token loss on the texts of held-out scenes (the evaluation world's seed)."""
    data = load_recipe(to_dict(recipe), [f"data.seed={HELD_OUT_SEED}"]).data
    ids = pack(list(lm_texts(shapes_world(data), scenes)), model.tokenizer, 0)
    blocks = PackedBlocks(ids, recipe.data.block_size).blocks[:64]
    losses = [causal_lm_loss(model(input_ids=b).logits, b).item() for b in blocks.split(16)]
    return sum(losses) / len(losses)


def estimate(out: Path, quick: bool, overrides: list[str]) -> tuple[float, str]:
    """Seconds of training on this machine, and what the part will do."""
    recipe = lm_recipe(quick, overrides)
    per_step = _estimate_step_seconds(recipe)
    return per_step * recipe.loop.steps, (f"{recipe.loop.steps} steps × {recipe.loop.batch_size} blocks of "
                                          f"{recipe.data.block_size} tokens, plus ~0.5 min building the texts and tokenizer")


def stand_in(folder: Path, quick: bool, overrides: list[str]) -> None:
    """The part's model trained one step on a few scenes' texts: what later parts' estimates build
    on before it has run."""
    train_lm(lm_recipe(quick, [*overrides, "--loop.steps=1", "--optim.warmup_steps=0", "--data.scenes=200"]), folder)


def run(out: Path, quick: bool, overrides: list[str]) -> tuple[dict, str]:
    recipe = lm_recipe(quick, overrides)
    run_dir = out / "lm"
    summary = train_lm(recipe, run_dir)
    model = vlkit.load(run_dir)
    loss = held_out_loss(model, recipe)
    tok = model.tokenizer
    samples = [(p, generate_text(model, tok, **tok(p), generation_config=model.generation_config, max_new_tokens=24)[0])
               for p in PROMPTS]  # fmt: skip
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    draw_loss(run_dir / "metrics.jsonl", figures / "lm_loss.png")
    params = sum(p.numel() for p in model.parameters())
    metrics = {"held_out_loss": loss, "held_out_perplexity": math.exp(loss), "vocab_size": tok.vocab_size,
               "parameters": params, "tokens": summary["tokens"], "train_seconds": summary["train_seconds"]}  # fmt: skip
    cfg = model.config
    section = "\n".join([
        "## The shapes language model",
        "",
        f"A Llama of {params / 1e6:.2f} M parameters ({cfg.num_hidden_layers} layers, width {cfg.hidden_size}) pre-trained "
        f"from scratch for {recipe.loop.steps} steps of {recipe.loop.batch_size} × {recipe.data.block_size} tokens "
        f"({summary['train_seconds'] / 60:.1f} min) on {summary['tokens']:,} tokens of shapes texts: captions, questions "
        "with their answers, referring expressions with their boxes. Its byte-level BPE tokenizer "
        f"({tok.vocab_size} ids, digits one by one, `<image>` and ChatML role tokens) was trained on the same texts. "
        "Model folder: `lm/`.",
        "",
        f"Held-out texts (another seed's scenes): next-token loss {loss:.3f}, perplexity {math.exp(loss):.2f}.",
        "",
        "| prompt | greedy continuation |",
        "|---|---|",
        *[f"| {p} | {c.strip()} |" for p, c in samples],
        "",
        "![loss](figures/lm_loss.png)",
        "",
    ])  # fmt: skip
    return metrics, section
