"""The demo's VLM part: a LLaVA-style shapes VLM from the demo's CLIP tower and shapes LM,
trained in two stages (align the connector on captions, then instruction-tune: mostly on
referring expressions first, then on conversations mixing captioning, VQA and grounding),
evaluated on held-out scenes.

Evaluation (held-out world, :data:`vlkit.data.shapes_chat.HELD_OUT_SEED`): VQA exact match
(answers normalised as VQAv2 does) over 1000 questions, a fifth of each type; caption
CIDEr-D on 500 images against all of each scene's captions; grounding Acc@IoU≥0.5 on 500
referring expressions, the answer's ``[x1, y1, x2, y2]`` read on the 0–999 grid.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

import vlkit
from vlkit.boxes import parse_box
from vlkit.config import apply_overrides, read
from vlkit.data.shapes_chat import QUESTION_TYPES, ShapesChatConfig, eval_captions, eval_grounding, eval_vqa
from vlkit.demo.folders import publish
from vlkit.demo.timing import step_seconds
from vlkit.eval.generative import answerer
from vlkit.eval.metrics import accuracy_by_type, cider_scores, grounding_accuracy, normalize_answer
from vlkit.report import draw_loss
from vlkit.train.vlm import MODEL_DIR, load_recipe, train_vlm

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
REQUIRES: tuple[str, ...] = ("clip", "lm")
SIZES = {"vqa": 1000, "caption": 500, "grounding": 500}
QUICK_SIZES = {"vqa": 200, "caption": 100, "grounding": 100}

RUNS = {"stage1": None, "grounding": "stage1", "stage2": "grounding"}
"""The training runs in order (recipe ``llava_shapes_<run>.yaml``, folder ``vlm/<run>``), each with
the run it starts from: stage 2 is two runs, mostly boxes and then the mix."""
QUICK_STEPS = {"stage1": 15, "grounding": 15, "stage2": 60}


def split_overrides(overrides: list[str], runs=("stage1", "stage2")) -> dict[str, list[str]]:
    """``--RUN.KEY=V`` reaches that run only (``--stage2.loop.steps=100``); others every run."""
    out = {run: [] for run in runs}
    for item in overrides:
        text = item.removeprefix("--")
        run = next((r for r in runs if text.startswith(f"{r}.")), None)
        if run is None:
            for name in runs:
                out[name].append(item)
        else:
            out[run].append("--" + text.removeprefix(f"{run}."))
    return out


def run_recipe(run: str, out: Path, quick: bool, overrides: list[str]):
    """The recipe of one of :data:`RUNS`, on the demo's tower and LM, starting from its run before."""
    path = RECIPES / f"llava_shapes_{run}.yaml"
    data = apply_overrides(read(path), [f"model.vision={out / 'clip'}", f"model.lm={out / 'lm'}"])
    if RUNS[run] is not None:
        data = apply_overrides(data, [f"init_from={out / 'vlm' / RUNS[run]}"])
    if quick:
        data = apply_overrides(data, [f"loop.steps={QUICK_STEPS[run]}", "optim.warmup_steps=5"])
    return load_recipe(data, overrides, path)


def _estimate_step_seconds(recipe) -> float:
    """Time two training steps (after one warm-up) of the recipe's model on its own data: batches of
    random samples, as training draws them (the first samples may be shorter), built inside the timing."""
    from vlkit.data.conversations import ConversationCollate, ConversationDataset
    from vlkit.data.formats.common import Skips
    from vlkit.train.loop import batch_parts, freeze
    from vlkit.train.vlm import build_model, build_processor, build_source, plan_training

    model = build_model(recipe)
    frozen, _ = plan_training(model, recipe)
    model.train()
    freeze(model, frozen)
    processor = build_processor(model, recipe)
    n = recipe.loop.batch_size
    data = ConversationDataset(build_source(recipe.data, Skips()), processor, model.lm.max_length, n, bucket_window=0)
    collate, draw = ConversationCollate(processor, recipe.train.loss, recipe.data.length_groups), random.Random(0)

    def loss():
        batch = collate([data[draw.randrange(len(data))] for _ in range(n)])
        batch.pop("skipped")
        return sum(model(**part).loss * weight for part, weight in batch_parts(batch))  # the parts training runs

    return step_seconds(loss, recipe.loop.precision)


# ---------------------------------------------------------------- evaluation
def _generate(answer, world, items, max_new_tokens: int, batch: int = 50) -> list[str]:
    out = []
    for k in range(0, len(items), batch):
        chunk = items[k : k + batch]
        images = [world.scene(it.index).render() for it in chunk]
        out += answer.generate(images, [it.prompt for it in chunk], max_new_tokens=max_new_tokens)
    return out


@torch.no_grad()
def evaluate(model, world, sizes: dict[str, int] = SIZES) -> tuple[dict, dict]:
    """``(metrics, examples)`` of a shapes VLM on the held-out ``world``: VQA exact match (all and
    per type), caption CIDEr-D, grounding Acc@0.5 and mean IoU; ``examples`` per task for the report."""
    answer = answerer(model)
    size = world.image_size
    vqa = eval_vqa(world, sizes["vqa"])
    preds = _generate(answer, world, vqa, 6)
    right = [normalize_answer(p) == normalize_answer(q.target) for p, q in zip(preds, vqa)]
    caps = eval_captions(world, sizes["caption"])
    cap_preds = _generate(answer, world, caps, 48)
    cider, per = cider_scores({str(i): p for i, p in enumerate(cap_preds)}, {str(i): c.target for i, c in enumerate(caps)})
    ground = eval_grounding(world, sizes["grounding"])
    box_texts = _generate(answer, world, ground, 24)
    boxes = [parse_box(t, "norm1000", size, size) for t in box_texts]
    g = grounding_accuracy(boxes, [it.target for it in ground])
    metrics = {
        "vqa_accuracy": sum(right) / len(right),
        "vqa_by_type": accuracy_by_type(right, [q.type for q in vqa], QUESTION_TYPES),
        "caption_cider": cider,
        "grounding_acc50": g["acc@0.5"],
        "grounding_mean_iou": g["mean_iou"],
        "grounding_unparsed": g["unparsed"],
    }
    examples = {
        "vqa": [(q, p, ok) for q, p, ok in zip(vqa, preds, right)],
        "caption": [(c, p, per[str(i)]) for i, (c, p) in enumerate(zip(caps, cap_preds))],
        "grounding": [(it, t, b, iou) for it, t, b, iou in zip(ground, box_texts, boxes, g["ious"])],
    }
    return metrics, examples


def draw_examples(world, examples: dict, out: Path, per_task: int = 6) -> None:
    """A page of held-out examples: VQA (question, answer, truth), captions, and grounding with
    the true box (green) and the predicted one (red, dashed)."""
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, per_task, figsize=(2.3 * per_task, 3 * 2.9), dpi=110)
    vqa = examples["vqa"][:: max(1, len(examples["vqa"]) // per_task)][:per_task]
    caps = examples["caption"][:per_task]
    ground = examples["grounding"][:per_task]
    for ax, (q, pred, ok) in zip(axes[0], vqa):
        ax.imshow(world.scene(q.index).render())
        ax.set_title(f"{_wrap(q.text)}\n→ {_wrap(pred)} (true {q.target})", fontsize=7, color="green" if ok else "red")
    for ax, (c, pred, score) in zip(axes[1], caps):
        ax.imshow(world.scene(c.index).render())
        ax.set_title(f"{_wrap(pred)}\nCIDEr-D {score:.2f}", fontsize=7)
    for ax, (it, text, box, iou) in zip(axes[2], ground):
        ax.imshow(world.scene(it.index).render())
        x0, y0, x1, y1 = it.target
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
        if box is not None:
            ax.add_patch(patches.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                           edgecolor="red", linewidth=1.5, linestyle="--"))  # fmt: skip
        ax.set_title(f"{_wrap(it.text)}\n{_wrap(text)} IoU {iou:.2f}", fontsize=7, color="green" if iou >= 0.5 else "red")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("held-out scenes: VQA (top), captions (middle), grounding (bottom: true box green, predicted red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _mix(recipe) -> str:
    """A shapes recipe's task mix as shares: ``grounding 75%, vqa 25%``."""
    mix = recipe.data.shapes.mix
    return ", ".join(f"{task} {share / sum(mix.values()):.0%}" for task, share in mix.items())


def _wrap(text: str, width: int = 30) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in text)  # an untrained model's bytes
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])


# ---------------------------------------------------------------- the part
def _recipes(out: Path, quick: bool, overrides: list[str]) -> dict:
    per_run = split_overrides(overrides, tuple(RUNS))
    return {r: run_recipe(r, out, quick, per_run[r]) for r in RUNS}


def estimate(out: Path, quick: bool, overrides: list[str]) -> tuple[float, str]:
    """Seconds of training on this machine, and what the part will do."""
    recipes = _recipes(out, quick, overrides)
    seconds = {r: _estimate_step_seconds(recipes[r]) * recipes[r].loop.steps for r in RUNS}
    plan = ", ".join(f"{r} {recipes[r].loop.steps} steps ({seconds[r] / 60:.1f} min)" for r in RUNS)
    return sum(seconds.values()), f"{plan}, then ~2 min of evaluation"


def run(out: Path, quick: bool, overrides: list[str]) -> tuple[dict, str]:
    recipes = _recipes(out, quick, overrides)
    root = out / "vlm"
    summaries = {r: train_vlm(recipes[r], root / r) for r in RUNS}
    last = list(RUNS)[-1]
    publish(root / last / MODEL_DIR, root)
    model = vlkit.load(root)
    world = ShapesChatConfig(held_out=True, image_size=recipes[last].data.shapes.image_size).world
    t = time.perf_counter()
    metrics, examples = evaluate(model, world, QUICK_SIZES if quick else SIZES)
    eval_seconds = time.perf_counter() - t
    train_seconds = sum(s["train_seconds"] for s in summaries.values())
    metrics.update(train_seconds=train_seconds, **{f"{r}_seconds": summaries[r]["train_seconds"] for r in RUNS},
                   eval_seconds=eval_seconds, trainable_stage2=summaries[last]["trainable"],
                   parameters=summaries[last]["parameters"])  # fmt: skip
    lm_metrics = out / "metrics.json"
    if lm_metrics.is_file() and "lm" in read(lm_metrics):
        metrics["train_seconds_with_lm"] = train_seconds + read(lm_metrics)["lm"]["train_seconds"]
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for r in RUNS:
        draw_loss(root / r / "metrics.jsonl", figures / f"vlm_{r}_loss.png")
    draw_examples(world, examples, figures / "vlm_examples.png")
    return metrics, _section(metrics, recipes, summaries, model, quick)


def _section(m: dict, recipes: dict, summaries: dict, model, quick: bool) -> str:
    r2 = recipes["stage2"]
    n = QUICK_SIZES if quick else SIZES
    tower = "frozen" if r2.train.vision_lr is None else f"trained at lr {r2.train.vision_lr}"

    def steps(run: str) -> str:
        return f"{recipes[run].loop.steps} steps of {recipes[run].loop.batch_size} ({m[f'{run}_seconds'] / 60:.1f} min)"

    return "\n".join([
        "## The shapes VLM (LLaVA-style, two stages)",
        "",
        f"The demo's CLIP tower (frozen in stage 1) and shapes LM joined by a {r2.model.connector} connector "
        f"({model.num_image_tokens()} visual tokens per image). Stage 1: the connector alone on captions, "
        f"{steps('stage1')}. Stage 2: connector and LM (train.lm={r2.train.lm}; tower {tower}) first mostly on "
        f"referring expressions (mix {_mix(recipes['grounding'])}), {steps('grounding')}, then on single-turn "
        f"captioning, VQA and grounding and short multi-turn conversations (mix {_mix(r2)}), {steps('stage2')}; "
        f"{summaries['stage2']['trainable']:,} trainable parameters. Model folder: `vlm/`.",
        "",
        "Held-out scenes (another seed). Boxes are text, `[x1, y1, x2, y2]` on a 0–999 grid of the image.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| VQA exact match ({n['vqa']} questions) | {m['vqa_accuracy']:.3f} |",
        *[f"| &nbsp; {t} | {v:.3f} |" for t, v in m["vqa_by_type"].items()],
        f"| caption CIDEr-D ({n['caption']} images) | {m['caption_cider']:.3f} |",
        f"| grounding Acc@0.5 ({n['grounding']} expressions) | {m['grounding_acc50']:.3f} |",
        f"| grounding mean IoU | {m['grounding_mean_iou']:.3f} |",
        f"| training time, both stages | {m['train_seconds'] / 60:.1f} min |",
        *([f"| training time with the LM's pre-training | {m['train_seconds_with_lm'] / 60:.1f} min |"]
          if "train_seconds_with_lm" in m else []),
        "",
        "![examples](figures/vlm_examples.png)",
        "",
        " ".join(f"![{r} loss](figures/vlm_{r}_loss.png)" for r in RUNS),
        "",
    ])  # fmt: skip
