"""The connectors compared on the shapes VLM: each trains the same runs as the demo (stage 1,
then stage 2's mostly-boxes run and its mix: the demo's recipes, the same tower, LM, data, steps and
seed) and is scored on the same held-out scenes.

    python benchmarks/connectors.py --clip out/clip --lm out/lm --out runs/connectors \
        [--kinds linear mlp perceiver pixel_shuffle qformer] [--stage1-steps 60] [--grounding-steps 600] \
        [--stage2-steps 500] [--quick]

Prints one table: visual tokens per image, trainable parameters (stage 2), training seconds
(every run), VQA exact match by type, colour and shape on scenes of several objects (which
object a question names matters only there), caption CIDEr-D and grounding Acc@0.5; and writes it
to ``OUT/connectors.md`` with every run's metrics in ``OUT/connectors.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import vlkit
from vlkit.config import read
from vlkit.data.shapes_chat import QUESTION_TYPES, ShapesChatConfig
from vlkit.demo.vlm import QUICK_SIZES, RECIPES, RUNS, SIZES, evaluate
from vlkit.train.vlm import MODEL_DIR, load_recipe, train_vlm

OPTIONS = {
    "linear": {},
    "mlp": {},
    "perceiver": {"num_latents": 16, "depth": 2, "num_heads": 4},
    "pixel_shuffle": {"factor": 2},
    "qformer": {"width": 128, "depth": 2, "num_heads": 4, "mlp_dim": 256, "num_queries": 16, "dropout": 0.0},
}
"""Each kind's options: small enough for the shapes VLM's budget; perceiver and Q-Former keep 16 visual tokens."""


def recipe(name: str, kind: str, args, run: Path):
    """The demo's recipe of run ``name`` with connector ``kind``, starting from its run before."""
    data = read(RECIPES / f"llava_shapes_{name}.yaml")
    sets = [f"--model.vision={args.clip}", f"--model.lm={args.lm}", f"--model.connector={kind}",
            f"--model.connector_options={json.dumps(OPTIONS[kind])}", f"--loop.steps={getattr(args, f'{name}_steps')}"]  # fmt: skip
    if RUNS[name] is not None:
        sets.append(f"--init_from={run / RUNS[name]}")
    return load_recipe(data, sets)  # checked against the recipe's schema: the options replace the recipe's, not merge


def measure(kind: str, args) -> dict:
    run = Path(args.out) / kind
    summaries = {name: train_vlm(recipe(name, kind, args, run), run / name) for name in RUNS}
    model = vlkit.load(run / "stage2" / MODEL_DIR)
    world = ShapesChatConfig(held_out=True).world
    metrics, examples = evaluate(model, world, QUICK_SIZES if args.quick else SIZES)
    return {"kind": kind, "visual_tokens": model.num_image_tokens(), "trainable": summaries["stage2"]["trainable"],
            "connector_parameters": sum(p.numel() for p in model.connector.parameters()),
            "seconds": sum(s["train_seconds"] for s in summaries.values()), "binding": binding(examples["vqa"], world),
            **metrics}  # fmt: skip


def binding(vqa: list, world) -> float:
    """Colour and shape accuracy on scenes of several objects, where the answer depends on which
    object the question names (on one-object scenes it is the only colour or shape there)."""
    right = [ok for q, _, ok in vqa if q.type in ("color", "shape") and len(world.scene(q.index).objects) > 1]
    return sum(right) / max(len(right), 1)


def table(rows: list[dict]) -> str:
    head = ["connector", "visual tokens", "connector params", "trainable (stage 2)", "train s", "VQA",
            *QUESTION_TYPES, "colour/shape, 2-3 objects", "CIDEr-D", "grounding@0.5"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["kind"], r["visual_tokens"], f"{r['connector_parameters']:,}", f"{r['trainable']:,}", f"{r['seconds']:.0f}",
                 f"{r['vqa_accuracy']:.3f}", *[f"{r['vqa_by_type'].get(t, 0.0):.3f}" for t in QUESTION_TYPES],
                 f"{r['binding']:.3f}", f"{r['caption_cider']:.3f}", f"{r['grounding_acc50']:.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", required=True, help="the demo's CLIP folder (vision tower)")
    ap.add_argument("--lm", required=True, help="the shapes LM folder")
    ap.add_argument("--out", required=True, help="folder for the runs and the table")
    ap.add_argument("--kinds", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    ap.add_argument("--stage1-steps", type=int, default=60)
    ap.add_argument("--grounding-steps", type=int, default=600, help="stage 2's first run, mostly on referring expressions")
    ap.add_argument("--stage2-steps", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="evaluate on 200/100/100 held-out prompts instead of 1000/500/500")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = []
    for kind in args.kinds:
        rows.append(measure(kind, args))
        print(table(rows))
    text = (f"{table(rows)}\n\nSame budget each: stage 1 {args.stage1_steps} steps, stage 2 {args.grounding_steps} steps "
            f"mostly of boxes, then {args.stage2_steps} of the mix "
            f"(the demo's recipes otherwise); load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
            f"{(time.perf_counter() - t0) / 60:.0f} min in all.\n")  # fmt: skip
    (out / "connectors.md").write_text(text)
    (out / "connectors.json").write_text(json.dumps(rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()
