"""Diagnostic: can the shapes recipe's ViT learn shape at all? Train it *supervised* on
single-object shape labels and print held-out shape accuracy every 100 steps.

    python benchmarks/shape_supervised.py [--steps 400]

Compare with the zero-shot shape accuracy of contrastive training (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vlkit.config import read
from vlkit.data.shapes import SHAPES, ShapesWorld
from vlkit.demo import RECIPES
from vlkit.train.clip import load_recipe, shapes_processor
from vlkit.vision.vit import ViT


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    vit = ViT(load_recipe(read(RECIPES / "clip_shapes.yaml")).model.vision)
    head = torch.nn.Linear(vit.cfg.width, len(SHAPES))
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.1)
    train, test, proc = ShapesWorld(seed=0), ShapesWorld(seed=99), shapes_processor(64)
    held = [test.single(i) for i in range(500)]
    tx = proc.batch([s.render() for s in held])
    ty = torch.tensor([SHAPES.index(s.objects[0].shape) for s in held])
    t0 = time.perf_counter()
    for step in range(args.steps):
        scenes = [train.single(step * args.batch + j) for j in range(args.batch)]
        x = proc.batch([s.render() for s in scenes])
        y = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
        loss = F.cross_entropy(head(vit(x).pooled), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            with torch.no_grad():
                acc = (head(vit(tx).pooled).argmax(-1) == ty).float().mean().item()
            print(f"step {step + 1}  samples {(step + 1) * args.batch}  loss {loss.item():.3f}  "
                  f"held-out shape accuracy {acc:.3f}  {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
