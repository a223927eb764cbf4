"""The shapes world: a seeded, procedurally generated image-text world that exercises every task.

Each scene is addressable by ``(seed, index)``, so datasets are random-access, splits are
disjoint by seed and nothing needs to be stored. Every caption carries its meaning
(:class:`Caption`), so retrieval can check whether a retrieved image is truly described.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

from vlkit.errors import VlkitError

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
BACKGROUND = (28, 28, 32)
CLASS_NAMES = tuple(f"{c} {s}" for c in COLOR_NAMES for s in SHAPES)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
"""Each relation's opposite: the relation questions' "no" asks it."""


@dataclass(frozen=True)
class Obj:
    """One object: what it is and where (center and half-extent in pixels)."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    r: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Tight box ``(x0, y0, x1, y1)`` of the drawn shape."""
        if self.shape == "star":
            pts = _star_points(self.cx, self.cy, self.r)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            return (min(xs), min(ys), max(xs), max(ys))
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)

    @property
    def label(self) -> int:
        return class_index(self.color, self.shape)

    def name(self, with_size: bool = False) -> str:
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Ref:
    """A description of an object; ``None`` attributes match anything."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None

    def matches(self, obj: Obj) -> bool:
        return all(
            want is None or want == got
            for want, got in ((self.shape, obj.shape), (self.color, obj.color), (self.size, obj.size))
        )


@dataclass(frozen=True)
class Caption:
    """A caption and its meaning: distinct objects matching ``refs``, an optional relation
    ``(i, relation, j)`` between two of them, and optionally the exact object count."""

    text: str
    refs: tuple[Ref, ...] = ()
    relation: tuple[int, str, int] | None = None
    count: int | None = None

    def describes(self, scene: "Scene") -> bool:
        """Whether the caption is true of ``scene``."""
        if self.count is not None and len(scene.objects) != self.count:
            return False
        for chosen in itertools.permutations(scene.objects, len(self.refs)):
            if not all(ref.matches(o) for ref, o in zip(self.refs, chosen)):
                continue
            if self.relation is None:
                return True
            i, rel, j = self.relation
            if holds(rel, chosen[i], chosen[j], scene.image_size):
                return True
        return False


@dataclass
class Scene:
    image_size: int
    objects: list[Obj]
    captions: list[Caption] = field(default_factory=list)
    vqa: list[dict] = field(default_factory=list)
    referring: list[dict] = field(default_factory=list)

    @property
    def label(self) -> int | None:
        """Class index (color × shape) for single-object scenes, else ``None``."""
        return self.objects[0].label if len(self.objects) == 1 else None

    def render(self) -> Image.Image:
        return render(self.objects, self.image_size)

    def to_dict(self) -> dict:
        """A JSON-ready record of the scene and its annotations."""
        return {
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "box": [round(v, 2) for v in o.box]}
                for o in self.objects
            ],
            "captions": [c.text for c in self.captions],
            "vqa": self.vqa,
            "referring": self.referring,
            "label": self.label,
        }


def class_index(color: str, shape: str) -> int:
    return COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(shape)


def holds(relation: str, a: Obj, b: Obj, image_size: int) -> bool:
    """Spatial relation of a to b by centers, with a margin so that it is unambiguous."""
    margin = 0.08 * image_size
    return {
        "left of": a.cx + margin < b.cx,
        "right of": a.cx > b.cx + margin,
        "above": a.cy + margin < b.cy,
        "below": a.cy > b.cy + margin,
    }[relation]


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def _outline(o: Obj) -> list[tuple[float, float]] | None:
    """Polygon of the shape, or ``None`` for the circle (drawn as an ellipse)."""
    cx, cy, r = o.cx, o.cy, o.r
    return {
        "circle": None,
        "square": [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)],
        "triangle": [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)],
        "diamond": [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)],
        "star": _star_points(cx, cy, r),
    }[o.shape]


def render(objects: list[Obj], image_size: int) -> Image.Image:
    """Draw the objects on the plain background."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        fill = COLORS[o.color]
        poly = _outline(o)
        if poly is None:
            draw.ellipse((o.cx - o.r, o.cy - o.r, o.cx + o.r, o.cy + o.r), fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return img


@dataclass(frozen=True)
class ShapesWorld:
    """A deterministic generator of scenes: ``world.scene(i)`` is the same for the same seed.

    ``sizes`` are object diameters as fractions of the image side (small, large).
    """

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    seed: int = 0
    sizes: tuple[float, float] = (0.25, 0.4)

    def __post_init__(self):
        """Settings no scene can be drawn with are named here, not deep in the sampling."""
        if not 1 <= self.min_objects <= self.max_objects:
            raise VlkitError(f"shapes world: min_objects {self.min_objects}, max_objects {self.max_objects}; expected 1 <= min_objects <= max_objects")
        bad = [s for s in self.sizes if not 0 < s < 1]
        if len(self.sizes) != 2 or bad:
            raise VlkitError(f"shapes world: object sizes {tuple(self.sizes)}; expected two fractions of the image side, each between 0 and 1")
        need = math.ceil(2 / (1 - max(self.sizes)))
        if self.image_size < need:
            raise VlkitError(f"shapes world: image_size {self.image_size} leaves no room for objects of {max(self.sizes)} of the side; "
                             f"expected at least {need} pixels")  # fmt: skip

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def scene(self, index: int) -> Scene:
        rng = self.rng(index)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        return annotate(self.place(rng, n), self.image_size, rng)

    def place(self, rng: np.random.Generator, n: int, kinds: list[int] | None = None) -> list[Obj]:
        """Sample ``n`` objects with distinct (color, shape) and no overlap; fewer if crowded.
        ``kinds`` fixes the objects' classes instead of drawing them."""
        objects: list[Obj] = []
        if kinds is None:
            kinds = rng.permutation(len(CLASS_NAMES))
        for kind in kinds[:n]:
            color, shape = COLOR_NAMES[kind // len(SHAPES)], SHAPES[kind % len(SHAPES)]
            size_i = int(rng.integers(2))
            r = self.sizes[size_i] * self.image_size / 2
            for _ in range(64):
                cx, cy = rng.uniform(r + 1, self.image_size - r - 1, size=2)
                cand = Obj(shape, color, SIZES[size_i], float(cx), float(cy), r)
                if all(not _overlap(cand, o, gap=2.0) for o in objects):
                    objects.append(cand)
                    break
        if not objects:
            raise RuntimeError(f"could not place any object in a {self.image_size}px image")
        return objects

    def single(self, index: int, label: int | None = None) -> Scene:
        """A single-object scene (the classification split); of class ``label`` if given."""
        if label is not None and not 0 <= label < len(CLASS_NAMES):
            raise ValueError(f"label must be in [0, {len(CLASS_NAMES)}), got {label}")
        rng = self.rng(index)
        return annotate(self.place(rng, 1, None if label is None else [label]), self.image_size, rng)

    def variant(self, scene: Scene, index: int, kind: str | None = None) -> Scene:
        """A hard negative of ``scene``: one object's shape or color changed, or two objects'
        looks swapped (which changes the relations). Shape changes never cause overlaps."""
        rng = np.random.default_rng([self.seed, index, 1])
        objs = list(scene.objects)
        if kind is None:
            kinds = ["shape", "color"] + (["swap"] if len(objs) > 1 else [])
            kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "swap" and len(objs) > 1:
            i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
            a, b = objs[i], objs[j]
            objs[i], objs[j] = replace(a, color=b.color, shape=b.shape), replace(b, color=a.color, shape=a.shape)
            return annotate(objs, self.image_size, rng)
        attr = "color" if kind in ("color", "swap") else "shape"
        i = int(rng.integers(len(objs)))
        return annotate(_recolor_or_reshape(objs, i, attr, rng, 1)[0], self.image_size, rng)

    def family(self, scene: Scene, index: int, size: int) -> list[Scene]:
        """``scene`` and ``size - 1`` hard negatives: the same object drawn in other shapes, and
        one variant in color or placement, so shape alone tells most of them apart."""
        if size <= 1:
            return [scene]
        rng = np.random.default_rng([self.seed, index, 2])
        objs = list(scene.objects)
        i = int(rng.integers(len(objs)))
        members = [scene] + [annotate(o, self.image_size, rng) for o in _recolor_or_reshape(objs, i, "shape", rng, size - 2)]
        other = "swap" if len(objs) > 1 and rng.random() < 0.5 else "color"
        members.append(self.variant(scene, index, other))
        return members[:size]


def _recolor_or_reshape(objs: list[Obj], i: int, attr: str, rng: np.random.Generator, n: int) -> list[list[Obj]]:
    """Up to ``n`` copies of ``objs`` with object ``i``'s ``attr`` set to distinct new values,
    keeping (color, shape) pairs unique within the scene."""
    taken = {(o.color, o.shape) for k, o in enumerate(objs) if k != i}
    pool = SHAPES if attr == "shape" else COLOR_NAMES
    out = []
    for v in rng.permutation([v for v in pool if v != getattr(objs[i], attr)]):
        new = replace(objs[i], **{attr: str(v)})
        if (new.color, new.shape) not in taken:
            out.append(objs[:i] + [new] + objs[i + 1 :])
        if len(out) == n:
            break
    return out or [list(objs)]


def _overlap(a: Obj, b: Obj, gap: float) -> bool:
    """Whether the objects' full squares (whatever their shape) come closer than ``gap``."""
    return abs(a.cx - b.cx) < a.r + b.r + gap and abs(a.cy - b.cy) < a.r + b.r + gap


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(o: Obj, with_size: bool) -> str:
    name = o.name(with_size)
    return f"{_article(name)} {name}"


def _ref(o: Obj, with_size: bool) -> Ref:
    return Ref(o.shape, o.color, o.size if with_size else None)


def annotate(objects: list[Obj], image_size: int, rng: np.random.Generator) -> Scene:
    """Build a scene's captions, VQA pairs and referring expressions from its objects."""
    scene = Scene(image_size, objects)
    scene.captions = _captions(scene, rng)
    scene.vqa = _vqa(scene, rng)
    scene.referring = _referring(scene)
    return scene


def _pairs_with_relation(scene: Scene) -> list[tuple[int, str, int]]:
    return [
        (i, rel, j)
        for i, j in itertools.permutations(range(len(scene.objects)), 2)
        for rel in RELATIONS
        if holds(rel, scene.objects[i], scene.objects[j], scene.image_size)
    ]


def _captions(scene: Scene, rng: np.random.Generator) -> list[Caption]:
    objs = scene.objects
    n = len(objs)
    caps: list[Caption] = []
    if n == 1:
        o = objs[0]
        caps += [
            Caption(_describe(o, True), (_ref(o, True),), count=1),
            Caption(_describe(o, False), (_ref(o, False),), count=1),
            Caption(f"a photo of {_describe(o, False)}", (_ref(o, False),), count=1),
            Caption(f"a single {o.name()} on a dark background", (_ref(o, False),), count=1),
        ]
    else:
        order = [objs[k] for k in rng.permutation(n)]
        listed = ", ".join(_describe(o, False) for o in order[:-1]) + f" and {_describe(order[-1], False)}"
        caps.append(Caption(listed, tuple(_ref(o, False) for o in order), count=n))
        caps.append(
            Caption(f"{NUMBER_WORDS[n]} shapes: {listed}", tuple(_ref(o, False) for o in order), count=n)
        )
        sized = " and ".join(_describe(o, True) for o in order)
        caps.append(Caption(sized, tuple(_ref(o, True) for o in order)))
        rels = _pairs_with_relation(scene)
        for k in rng.permutation(len(rels))[:2]:
            i, rel, j = rels[k]
            a, b = objs[i], objs[j]
            text = f"{_describe(a, False)} {'to the ' + rel if rel in ('left of', 'right of') else rel} {_describe(b, False)}"
            caps.append(Caption(text, (_ref(a, False), _ref(b, False)), relation=(0, rel, 1)))
    caps.append(Caption(f"{NUMBER_WORDS[n]} object{'s' if n > 1 else ''}", count=n))
    return caps


def _unique(objs: list[Obj], attr: str, value: str) -> bool:
    return sum(getattr(o, attr) == value for o in objs) == 1


def _vqa(scene: Scene, rng: np.random.Generator) -> list[dict]:
    objs = scene.objects
    qa = []
    for o in objs:
        if _unique(objs, "shape", o.shape):
            qa.append({"question": f"what color is the {o.shape}?", "answer": o.color, "type": "color"})
        if _unique(objs, "color", o.color):
            qa.append({"question": f"what shape is the {o.color} object?", "answer": o.shape, "type": "shape"})
    qa.append({"question": "how many objects are there?", "answer": str(len(objs)), "type": "count"})
    color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
    qa.append(
        {
            "question": f"how many {color} objects are there?",
            "answer": str(sum(o.color == color for o in objs)),
            "type": "count",
        }
    )
    present = objs[int(rng.integers(len(objs)))]
    qa.append({"question": f"is there {_describe(present, False)}?", "answer": "yes", "type": "yesno"})
    present_labels = {o.label for o in objs}
    absent = [k for k in range(len(CLASS_NAMES)) if k not in present_labels]
    kind = absent[int(rng.integers(len(absent)))]
    name = CLASS_NAMES[kind]
    qa.append({"question": f"is there {_article(name)} {name}?", "answer": "no", "type": "yesno"})
    rels = _pairs_with_relation(scene)
    if rels:
        i, rel, j = rels[int(rng.integers(len(rels)))]
        a, b = objs[i], objs[j]
        qa.append(
            {"question": f"is the {a.name()} {rel} the {b.name()}?", "answer": "yes", "type": "relation"}
        )
        opposite = OPPOSITE[rel]
        qa.append(
            {"question": f"is the {a.name()} {opposite} the {b.name()}?", "answer": "no", "type": "relation"}
        )
    return qa


def _referring(scene: Scene) -> list[dict]:
    objs = scene.objects
    out = []
    for k, o in enumerate(objs):
        exprs = [f"the {o.name()}", f"the {o.name(True)}"]
        if _unique(objs, "color", o.color):
            exprs.append(f"the {o.color} object")
        if _unique(objs, "shape", o.shape):
            exprs.append(f"the {o.shape}")
        if len(objs) > 1:
            xs = sorted(range(len(objs)), key=lambda m: objs[m].cx)
            if k == xs[0] and holds("left of", o, objs[xs[1]], scene.image_size):
                exprs.append("the leftmost object")
            if k == xs[-1] and holds("right of", o, objs[xs[-2]], scene.image_size):
                exprs.append("the rightmost object")
        box = [round(v, 2) for v in o.box]
        out += [{"text": e, "box": box, "object": k} for e in exprs]
    return out


# Zero-shot prompt templates for the 40 classes (evaluation and the ImageFolder export use them).
TEMPLATES = ["{c}", "a photo of {c}", "a single {c} on a dark background"]


def class_prompts() -> list[str]:
    """Class names with their article ("an orange star"), for the templates above."""
    return [f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in CLASS_NAMES]
