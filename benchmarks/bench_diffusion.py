"""Training cost of the text-to-image recipe against the CLIP recipe, measured in the same run.

On a shared machine wall-clock times move with the load; the ratio of two recipes' step times,
timed alternately in one process, does not (much). The CLIP recipe's time on an idle 2-core
machine is known (benchmarks/RESULTS.md), so the ratio gives the diffusion recipe's.

    OMP_NUM_THREADS=1 python benchmarks/bench_diffusion.py --rounds 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vlkit.config import read
from vlkit.data.pairs import Collate, ShapesPairs
from vlkit.data.shapes import ShapesWorld
from vlkit.models.clip import CLIP
from vlkit.precision import autocast
from vlkit.train.checkpoint import save_model
from vlkit.train.clip import build_tokenizer, load_recipe as clip_recipe, shapes_processor, shapes_world
from vlkit.train.diffusion import ShapesCaptions, build_model, load_recipe as diffusion_recipe
from vlkit.train.loop import param_groups

RECIPES = Path(__file__).resolve().parent.parent / "src" / "vlkit" / "recipes"


def step_timer(model, batch: dict, precision: str):
    """A function that runs one optimizer step of ``model`` on ``batch`` and returns its seconds."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)

    def step() -> float:
        t = time.perf_counter()
        with autocast(precision, "cpu"):
            loss = model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of --steps steps each")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--clip-seconds", type=float, default=493.0,
                    help="the CLIP recipe's training time on an idle 2-core machine (RESULTS.md: 493 s)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="for both recipes (default: each recipe's own)")
    args = ap.parse_args()
    torch.manual_seed(0)
    c = clip_recipe(read(RECIPES / "clip_shapes.yaml"))
    tok = build_tokenizer(c.data, c.model.text.context_length)
    c.model.text.vocab_size, c.model.text.eot_token_id = tok.vocab_size, None
    clip = CLIP(c.model)
    clip.tokenizer, clip.processor = tok, shapes_processor(c.data.image_size)
    families = c.loop.batch_size // c.data.group_size
    pairs = ShapesPairs(shapes_world(c.data), clip.processor, families, c.data.group_size)
    clip_batch = Collate(tok)([pairs[i] for i in range(families)])
    clip_batch.pop("skipped")
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp) / "clip", clip, "clip")
        d = diffusion_recipe(read(RECIPES / "diffusion_shapes.yaml"), [f"--text_encoder={Path(tmp) / 'clip'}"])
        model = build_model(d)
    world = ShapesWorld(d.data.image_size, d.data.min_objects, d.data.max_objects, d.data.seed)
    captions = ShapesCaptions(world, shapes_processor(d.data.image_size), d.loop.batch_size)
    t2i_batch = Collate(model.tokenizer)([captions[i] for i in range(d.loop.batch_size)])
    t2i_batch.pop("skipped")
    timers = {"clip": step_timer(clip, clip_batch, args.precision or c.loop.precision),
              "diffusion": step_timer(model, t2i_batch, args.precision or d.loop.precision)}
    for t in timers.values():
        t()  # warm-up
    best = {k: float("inf") for k in timers}
    for _ in range(args.rounds):
        for k, t in timers.items():
            best[k] = min(best[k], min(t() for _ in range(args.steps)))
    ratio = best["diffusion"] / best["clip"]
    steps = {"clip": c.loop.steps, "diffusion": d.loop.steps}
    for k in timers:
        print(f"{k:9s} {best[k]:.3f} s/step (batch {clip_batch['pixel_values'].shape[0] if k == 'clip' else d.loop.batch_size}), "
              f"{steps[k]} steps: {best[k] * steps[k] / 60:.1f} min here")  # fmt: skip
    whole = ratio * steps["diffusion"] / steps["clip"]
    print(f"diffusion step / clip step: {ratio:.2f}; the diffusion recipe costs {whole:.2f}x the CLIP recipe, "
          f"{whole * args.clip_seconds / 60:.1f} min at the CLIP recipe's {args.clip_seconds:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
