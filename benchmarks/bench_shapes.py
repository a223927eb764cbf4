"""Shapes-world generation speed on one core, next to the training step it must keep up with.

Prints scenes/s for generating (objects, captions, VQA, referring expressions), rendering,
and the full training sample path (families of hard negatives, telling captions,
preprocessing to tensors), all on one thread.

    python benchmarks/bench_shapes.py [--n 2000]
"""

from __future__ import annotations

import argparse
import time

import torch

from vlkit.data.pairs import ShapesPairs
from vlkit.data.shapes import ShapesWorld
from vlkit.train.clip import shapes_processor


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = ShapesWorld()
    pairs = ShapesPairs(world, shapes_processor(64), args.n, group_size=4)
    print(f"scene (generate + annotate): {rate(world.scene, args.n):8.0f} scenes/s")
    print(f"scene + render 64 px       : {rate(lambda i: world.scene(i).render(), args.n):8.0f} images/s")
    print(f"training samples (families): {4 * rate(pairs.__getitem__, args.n // 4):8.0f} samples/s")


if __name__ == "__main__":
    main()
