"""Where the shapes VLM's binding fails: in the tower's tokens, or in learning to read them.

    python benchmarks/binding_probe.py --model runs/vlm/stage2/model [--scenes 12000] [--merge 2]

On scenes of several objects a colour question names one object by its shape ("what color is the
star?"), so the answer needs the visual token that holds the star. Three probes on a LLaVA model's
visual features (the tower's selected layer, as the connector receives them), each trained on the
training world and scored on held-out scenes, by object count:

- read: one cross-attention read whose query is the named shape (colour) names the object's colour
  (shape), 3000 steps at batch 256: is the binding there to be read?
- relation: two such reads (each object named by colour and shape, each token with a learned place)
  and the relation give yes or no, as the relation questions ask.
- plateau: a 2-layer causal transformer from scratch over [visual tokens merged --merge x --merge as
  the recipe's pixel shuffle does; "what color is the SHAPE ?"] answering at the last position, at
  batch 32, the demo VLM's batch, scored every --every steps: how many examples it needs before
  it reads the named object. This is the LM's situation in miniature.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import vlkit
from vlkit.connectors.pixel_shuffle import space_to_depth
from vlkit.data.shapes import COLOR_NAMES, OPPOSITE, RELATIONS, SHAPES, ShapesWorld, holds
from vlkit.data.shapes_chat import HELD_OUT_SEED
from vlkit.errors import VlkitError
from vlkit.models.llava_processor import LlavaProcessor

WIDTH = 64


@torch.no_grad()
def features(model, world: ShapesWorld, n: int) -> tuple[torch.Tensor, list]:
    """``[n, tokens, D]`` visual features of scenes ``0..n-1``, per-channel standardised by the caller, and the scenes."""
    image = LlavaProcessor.for_model(model).image_processor
    out, scenes = [], []
    for start in range(0, n, 256):
        batch = [world.scene(i) for i in range(start, min(n, start + 256))]
        out.append(model.vision_features(torch.stack([image(s.render()) for s in batch])))
        scenes += batch
    return torch.cat(out), scenes


def attribute_items(scenes: list, asked: str) -> tuple[list[int], list[int], list[int], list[int]]:
    """(scene, query, answer, objects) for each object whose other attribute is unique in its scene:
    ``asked="color"`` queries by shape and answers the colour, ``"shape"`` the reverse."""
    key, names = ("shape", SHAPES) if asked == "color" else ("color", COLOR_NAMES)
    answers = COLOR_NAMES if asked == "color" else SHAPES
    rows = []
    for k, s in enumerate(scenes):
        for o in s.objects:
            if sum(getattr(p, key) == getattr(o, key) for p in s.objects) == 1:
                rows.append((k, names.index(getattr(o, key)), answers.index(getattr(o, asked)), len(s.objects)))
    return tuple(map(list, zip(*rows)))


def relation_items(scenes: list) -> tuple[list, ...]:
    """(scene, object a, object b, relation, yes, objects): each relation that holds, and its opposite."""
    rows = []
    for k, s in enumerate(scenes):
        for a in s.objects:
            for b in s.objects:
                for rel in RELATIONS:
                    if a is not b and holds(rel, a, b, s.image_size):
                        for r, yes in ((rel, 1), (OPPOSITE[rel], 0)):
                            rows.append((k, a.label, b.label, RELATIONS.index(r), yes, len(s.objects)))
    return tuple(map(list, zip(*rows)))


class Read(nn.Module):
    """One cross-attention read over the tokens with a learned query per name."""

    def __init__(self, dim: int, names: int):
        super().__init__()
        self.query = nn.Embedding(names, WIDTH)
        self.key = nn.Linear(dim, WIDTH)
        self.value = nn.Linear(dim, WIDTH)

    def forward(self, x: torch.Tensor, name: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.key(x) @ self.query(name)[:, :, None] / WIDTH**0.5, dim=1)
        return (weights * self.value(x)).sum(1)


class AttributeProbe(nn.Module):
    def __init__(self, dim: int, names: int, answers: int):
        super().__init__()
        self.read = Read(dim, names)
        self.head = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, answers))

    def forward(self, x, name):
        return self.head(self.read(x, name))


class RelationProbe(nn.Module):
    def __init__(self, dim: int, tokens: int):
        super().__init__()
        self.place = nn.Parameter(torch.randn(tokens, dim) * 0.5)
        self.read = Read(dim, len(COLOR_NAMES) * len(SHAPES))
        self.relation = nn.Embedding(len(RELATIONS), WIDTH)
        self.head = nn.Sequential(nn.Linear(3 * WIDTH, 128), nn.GELU(), nn.Linear(128, 2))

    def forward(self, x, a, b, rel):
        x = x + self.place
        return self.head(torch.cat([self.read(x, a), self.read(x, b), self.relation(rel)], -1))


class Plateau(nn.Module):
    """A 2-layer causal transformer over [visual tokens; what color is the SHAPE ?] → the colour."""

    def __init__(self, dim: int, width: int = 128):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, width))
        self.words = nn.Embedding(5 + len(SHAPES), width)  # what, color, is, the, ?, then the shapes
        self.place = nn.Embedding(64, width)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(width, 4, 3 * width, 0.0, batch_first=True, norm_first=True) for _ in range(2))
        self.head = nn.Linear(width, len(COLOR_NAMES))

    def forward(self, x, shape):
        words = torch.tensor([0, 1, 2, 3, 0, 4]).repeat(len(shape), 1)
        words[:, 4] = 5 + shape
        seq = torch.cat([self.project(x), self.words(words)], 1)
        seq = seq + self.place.weight[: seq.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(seq.shape[1])
        for layer in self.layers:
            seq = layer(seq, src_mask=mask, is_causal=True)
        return self.head(seq[:, -1])


def fit(probe: nn.Module, inputs: list[torch.Tensor], target: torch.Tensor, steps: int, batch: int, lr: float,
        score=None, every: int = 0) -> None:  # fmt: skip
    """Adam on random batches; ``score(step)`` every ``every`` steps."""
    opt = torch.optim.AdamW(probe.parameters(), lr)
    for step in range(1, steps + 1):
        pick = torch.randint(len(target), (batch,))
        loss = F.cross_entropy(probe(*(t[pick] for t in inputs)), target[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if every and step % every == 0:
            score(step)


@torch.no_grad()
def by_objects(probe: nn.Module, inputs: list[torch.Tensor], target: torch.Tensor, objects) -> dict[int, float]:
    right = (probe(*inputs).argmax(-1) == target).numpy()
    objects = np.asarray(objects)
    return {n: float(right[objects == n].mean()) for n in sorted(set(objects.tolist()))}


def row(name: str, acc: dict[int, float]) -> str:
    """A table row; a count with no items (no relation in a one-object scene) shows a dash."""
    return f"| {name} | " + " | ".join(f"{acc[n]:.3f}" if n in acc else "—" for n in (1, 2, 3)) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a LLaVA model folder (the shapes VLM)")
    ap.add_argument("--scenes", type=int, default=12000, help="training scenes; 2000 held-out scenes are scored")
    ap.add_argument("--merge", type=int, default=2, help="the plateau probe's tokens: tower tokens merged f x f")
    ap.add_argument("--plateau-steps", type=int, default=4000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = vlkit.load(args.model).eval()
    train_x, train_s = features(model, ShapesWorld(seed=0), args.scenes)
    test_x, test_s = features(model, ShapesWorld(seed=HELD_OUT_SEED), 2000)
    mean, std = train_x.mean((0, 1)), train_x.std((0, 1)) + 1e-5
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    dim, tokens = train_x.shape[-1], train_x.shape[1]
    try:  # the connector's own merge, which refuses a grid it cannot take
        train_m, test_m = space_to_depth(train_x, args.merge), space_to_depth(test_x, args.merge)
    except VlkitError as e:
        raise SystemExit(f"--merge {args.merge}: {e}") from None
    print(f"{args.model}: {tokens} visual tokens of {dim} channels; {args.scenes} training scenes, 2000 held-out\n")
    print("| probe | 1 object | 2 objects | 3 objects |\n|---|---|---|---|")
    for asked in ("color", "shape"):
        k, q, y, _ = attribute_items(train_s, asked)
        tk, tq, ty, tn = attribute_items(test_s, asked)
        names, answers = (len(SHAPES), len(COLOR_NAMES)) if asked == "color" else (len(COLOR_NAMES), len(SHAPES))
        probe = AttributeProbe(dim, names, answers)
        fit(probe, [train_x[k], torch.tensor(q)], torch.tensor(y), 3000, 256, 2e-3)
        print(row(f"read: {asked} of the object named by its {'shape' if asked == 'color' else 'colour'}",
                  by_objects(probe, [test_x[tk], torch.tensor(tq)], torch.tensor(ty), tn)), flush=True)  # fmt: skip
    k, a, b, r, y, _ = relation_items(train_s)
    tk, ta, tb, tr, ty, tn = relation_items(test_s)
    probe = RelationProbe(dim, tokens)
    fit(probe, [train_x[k], torch.tensor(a), torch.tensor(b), torch.tensor(r)], torch.tensor(y), 3000, 256, 2e-3)
    test = [test_x[tk], torch.tensor(ta), torch.tensor(tb), torch.tensor(tr)]
    print(row("relation of two named objects (yes/no)", by_objects(probe, test, torch.tensor(ty), tn)), flush=True)
    print(f"\nplateau: 2-layer causal transformer from scratch, tokens merged {args.merge}x{args.merge}, batch 32, lr 1e-3\n")
    print("| step | examples | 1 object | 2 objects | 3 objects |\n|---|---|---|---|---|")
    k, q, y, _ = attribute_items(train_s, "color")
    tk, tq, ty, tn = attribute_items(test_s, "color")
    plateau = Plateau(train_m.shape[-1])
    test = [test_m[tk], torch.tensor(tq)]

    def score(step: int) -> None:
        acc = by_objects(plateau, test, torch.tensor(ty), tn)
        print(f"| {step} | {step * 32:,} | " + " | ".join(f"{acc[n]:.3f}" for n in (1, 2, 3)) + " |", flush=True)

    fit(plateau, [train_m[k], torch.tensor(q)], torch.tensor(y), args.plateau_steps, 32, 1e-3, score, args.every)
    print(f"\n{(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
