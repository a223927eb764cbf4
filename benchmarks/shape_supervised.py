"""Diagnostic: how fast can the shapes recipe's ViT learn shape? Train it *supervised* on
single-object images and print held-out shape accuracy every 100 steps.

    python benchmarks/shape_supervised.py [--steps 400] [--labels shape|class] [--set model.vision.stem_norm=false]

``--labels shape`` trains a 5-way shape classifier; ``class`` the 40 color-and-shape classes
the zero-shot benchmark uses (shape must then be learned apart from color, as in CLIP).
Compare with the zero-shot accuracy of contrastive training (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vlkit.config import apply_overrides, read
from vlkit.data.shapes import CLASS_NAMES, SHAPES, ShapesWorld
from vlkit.demo import RECIPES
from vlkit.train.clip import load_recipe, shapes_processor
from vlkit.vision.vit import ViT


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--labels", choices=("shape", "class"), default="shape")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of recipes/clip_shapes.yaml")
    args = ap.parse_args()
    torch.manual_seed(0)
    vit = ViT(load_recipe(apply_overrides(read(RECIPES / "clip_shapes.yaml"), args.set)).model.vision)
    names = SHAPES if args.labels == "shape" else CLASS_NAMES
    head = torch.nn.Linear(vit.cfg.width, len(names))
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.1)
    train, test, proc = ShapesWorld(seed=0), ShapesWorld(seed=99), shapes_processor(64)

    def label(scene) -> int:
        o = scene.objects[0]
        return names.index(o.shape if args.labels == "shape" else f"{o.color} {o.shape}")

    held = [test.single(i) for i in range(500)]
    tx = proc.batch([s.render() for s in held])
    ty = torch.tensor([SHAPES.index(s.objects[0].shape) for s in held])
    t0 = time.perf_counter()
    for step in range(args.steps):
        scenes = [train.single(step * args.batch + j) for j in range(args.batch)]
        x = proc.batch([s.render() for s in scenes])
        loss = F.cross_entropy(head(vit(x).pooled), torch.tensor([label(s) for s in scenes]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            with torch.no_grad():
                predicted = [names[k].split()[-1] for k in head(vit(tx).pooled).argmax(-1).tolist()]
            acc = (torch.tensor([SHAPES.index(p) for p in predicted]) == ty).float().mean().item()
            print(f"step {step + 1}  samples {(step + 1) * args.batch}  loss {loss.item():.3f}  "
                  f"held-out shape accuracy {acc:.3f}  {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
