"""Scoring a text-to-image model with the shapes CLIP: CLIP score, attribute accuracy of
single-object prompts and object presence in two-object prompts with a relation.

- CLIP score: ``100 · max(cos(image, prompt), 0)`` averaged (torchmetrics' ``CLIPScore``).
- Colour / shape / both: the CLIP's zero-shot classifier over the 40 colour × shape classes
  (the templates of its own benchmark) reads each image; its class's colour and shape are
  compared with the prompt's.
- Presence, for "A <relation> B": the classifier reads each slot of the two-object caption
  "A and B" with the other slot held fixed (which of the 40 classes best completes "X and B"?);
  the image has both objects when both slots read back A and B.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlkit.data.shapes import CLASS_NAMES, RELATIONS, SHAPES, SIZES, TEMPLATES, ShapesWorld, class_prompts
from vlkit.errors import VlkitError
from vlkit.eval.zeroshot import classifier_weights
from vlkit.files import atomic_folder

EVAL_SEED = 1_000_013
"""The seed of the prompt sets: scenes no training run draws."""

GUIDANCE = 2.0
"""The default guidance scale of ``vlkit generate``, ``vlkit eval generation`` and the demo: the best
attribute accuracy (colour and shape both right) on validation noise (``--noise-seed 50000``, 200
prompts) in both runs of the shapes recipe measured: guidance 2 / 3 gave 0.700 / 0.675 and 0.675 / 0.620
(benchmarks/RESULTS.md); stronger guidance draws fewer empty images but distorts shapes."""
STEPS = 25
ETA = 1.0
"""DDIM with DDPM's fresh noise: on the same validation samples (guidance 2) it scored better than
deterministic DDIM (colour 0.930 vs 0.905, shape 0.725 vs 0.680)."""


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[N, 3, H, W]`` in [-1, 1] → PIL images."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: list[Image.Image], cols: int, pad: int = 2) -> Image.Image:
    """Images in rows of ``cols``, ``pad`` pixels apart on a grey canvas."""
    if not images:
        raise VlkitError("an image grid needs at least one image")
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (90, 90, 90))
    for k, im in enumerate(images):
        grid.paste(im, (pad + (k % cols) * (w + pad), pad + (k // cols) * (h + pad)))
    return grid


def _article(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def single_prompts(n: int, seed: int = EVAL_SEED) -> list[tuple[str, int]]:
    """``n`` prompts "a large green star" with their class (cycling through the 40 classes, sizes by seed)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(CLASS_NAMES))
    out = []
    for k in range(n):
        label = int(order[k % len(order)])
        size = SIZES[int(rng.integers(2))]
        out.append((_article(f"{size} {CLASS_NAMES[label]}"), label))
    return out


def relation_prompts(n: int, seed: int = EVAL_SEED) -> list[tuple[str, int, int]]:
    """``n`` prompts "a red circle to the left of a blue square" with the two objects' classes."""
    rng = np.random.default_rng([seed, 2])
    out = []
    for _ in range(n):
        a, b = (int(v) for v in rng.choice(len(CLASS_NAMES), size=2, replace=False))
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        said = f"to the {rel}" if rel in ("left of", "right of") else rel
        out.append((f"{_article(CLASS_NAMES[a])} {said} {_article(CLASS_NAMES[b])}", a, b))
    return out


class ShapesJudge:
    """The shapes CLIP as a judge of generated images (see the module docstring)."""

    def __init__(self, clip):
        if not hasattr(clip, "encode_image") or not hasattr(clip, "embed_texts"):
            raise VlkitError(f"the scorer must be a CLIP with both towers, got a {type(clip).__name__}")
        self.clip = clip
        self.classes = classifier_weights(clip, class_prompts(), TEMPLATES)
        self._pairs = None

    @torch.no_grad()
    def embed(self, images: list[Image.Image], batch_size: int = 200) -> torch.Tensor:
        feats = [self.clip.encode_image(self.clip.processor.batch(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return F.normalize(torch.cat(feats), dim=-1)

    def clip_scores(self, feats: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[N]`` 100 × cosine with the prompt, floored at 0."""
        return (100 * (feats * self.clip.embed_texts(prompts)).sum(-1)).clamp(min=0)

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        """The 40-class zero-shot prediction of each image."""
        return (feats @ self.classes.T).argmax(-1)

    @torch.no_grad()
    def present(self, feats: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """``[N]`` whether both objects of each pair read back from the image, slot by slot."""
        if self._pairs is None:  # "X and Y" for every two classes: [40, 40, D]
            names = [_article(c) for c in CLASS_NAMES]
            texts = [f"{x} and {y}" for x in names for y in names]
            self._pairs = self.clip.embed_texts(texts).view(len(names), len(names), -1)
        out = []
        for f, (a, b) in zip(feats, pairs):
            first, second = self._pairs[:, b] @ f, self._pairs[a, :] @ f
            first[b], second[a] = -math.inf, -math.inf  # the scene's two objects differ
            out.append(bool(first.argmax() == a and second.argmax() == b))
        return torch.tensor(out)

def evaluate(model, judge: ShapesJudge, n_single: int = 200, n_relation: int = 40, guidance: float = GUIDANCE,
             steps: int = STEPS, seed: int = 0, eta: float = ETA, progress: bool = False) -> dict:  # fmt: skip
    """Generate for ``n_single`` single-object and ``n_relation`` two-object prompts and score them;
    returns the metrics and, under ``"images"``, the generated images with their prompts."""
    if n_single < 1 or n_relation < 0:
        raise VlkitError(f"evaluation needs at least one single-object prompt and no negative count, got {n_single} and {n_relation}")
    singles, relations = single_prompts(n_single), relation_prompts(n_relation)
    prompts = [p for p, _ in singles] + [p for p, _, _ in relations]
    images = to_pil(model.generate(prompts, guidance=guidance, steps=steps, seed=seed, eta=eta, progress=progress))
    feats = judge.embed(images)
    scores = judge.clip_scores(feats, prompts)
    pred = judge.classify(feats[:n_single])
    labels = torch.tensor([c for _, c in singles])
    color = (pred // len(SHAPES)) == (labels // len(SHAPES))
    shape = (pred % len(SHAPES)) == (labels % len(SHAPES))
    metrics = {
        "clip_score": scores.mean().item(),
        "clip_score_single": scores[:n_single].mean().item(),
        "color_accuracy": color.float().mean().item(),
        "shape_accuracy": shape.float().mean().item(),
        "attribute_accuracy": (color & shape).float().mean().item(),
    }
    if relations:
        both = judge.present(feats[n_single:], [(a, b) for _, a, b in relations])
        metrics["clip_score_relation"] = scores[n_single:].mean().item()
        metrics["relation_both_present"] = both.float().mean().item()
    metrics.update({"n_single": n_single, "n_relation": n_relation, "guidance": guidance, "steps": steps, "eta": eta, "seed": seed})
    return {**metrics, "images": list(zip(prompts, images))}


def reference_check(judge: ShapesJudge, n: int = 200) -> dict:
    """The judge on rendered (not generated) held-out scenes, under the names :func:`evaluate`
    uses: the ceiling each metric can reach. ``one_object_both_present``: how often a one-object
    scene is wrongly judged to hold two named objects."""
    world = ShapesWorld(64, 1, 1, EVAL_SEED)
    prompts = single_prompts(n)
    singles = [world.single(i, label) for i, (_, label) in enumerate(prompts)]
    feats = judge.embed([s.render() for s in singles])
    pred, labels = judge.classify(feats), torch.tensor([s.label for s in singles])
    color = (pred // len(SHAPES)) == (labels // len(SHAPES))
    shape = (pred % len(SHAPES)) == (labels % len(SHAPES))
    wrong_pairs = [(s.label, (s.label + 7) % len(CLASS_NAMES)) for s in singles]
    pairs_world = ShapesWorld(64, 2, 2, EVAL_SEED + 1)
    two = [s for i in range(n) if len((s := pairs_world.scene(i)).objects) == 2]
    two_feats = judge.embed([s.render() for s in two])
    return {
        "clip_score": judge.clip_scores(feats, [p for p, _ in prompts]).mean().item(),
        "color_accuracy": color.float().mean().item(),
        "shape_accuracy": shape.float().mean().item(),
        "attribute_accuracy": (color & shape).float().mean().item(),
        "relation_both_present": judge.present(two_feats, [(s.objects[0].label, s.objects[1].label) for s in two]).float().mean().item(),
        "one_object_both_present": judge.present(feats, wrong_pairs).float().mean().item(),
    }


def write_results(out: Path, results: dict, cols: int = 8) -> Path:
    """``out/results.json`` (metrics) and ``out/samples.png`` (the first 64 images with their prompts listed in ``prompts.txt``)."""
    from vlkit.config import write_json

    shown = results["images"][:64]

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        write_json(tmp / "results.json", {k: v for k, v in results.items() if k != "images"})
        image_grid([im for _, im in shown], cols).save(tmp / "samples.png")
        (tmp / "prompts.txt").write_text("".join(f"{p}\n" for p, _ in shown))

    atomic_folder(Path(out), write)
    return Path(out)



def load_diffusion(path: str | Path, device: str = "cpu"):
    """The text-to-image model in a model or run folder; any other folder is refused by name."""
    from vlkit.interop.common import read_json
    from vlkit.loading import load, resolve
    from vlkit.models.diffusion import TextToImage

    try:
        folder = resolve(path)
    except FileNotFoundError as err:
        raise VlkitError(f"{err}; expected a text-to-image model (vlkit train diffusion --out DIR)") from None
    config = folder / "config.json"
    kind = read_json(config).get("model_type") if config.is_file() else "an OpenCLIP model"
    if kind != "vlkit_diffusion":
        raise VlkitError(f"{folder}: holds {kind!r}, not a text-to-image diffusion model (model_type 'vlkit_diffusion'); "
                         "train one with vlkit train diffusion --out DIR")  # fmt: skip
    model = load(folder, device=device)
    if not isinstance(model, TextToImage):
        raise VlkitError(f"{folder}: loaded a {type(model).__name__}, not a text-to-image model")
    return model
