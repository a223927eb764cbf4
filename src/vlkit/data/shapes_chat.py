"""The shapes world as a vision-language model's conversations: captioning, VQA of every
question type, grounding as text, and multi-turn conversations mixing them; and the same
texts without images, to pre-train the shapes language model.

Boxes as text (Qwen-VL's convention): ``[x1, y1, x2, y2]``, integers on a 0–999 grid of the
image, ``v = floor(x / width · 1000)`` clipped to 999 (``y`` by the height); a grid value
``v`` reads back as ``v / 1000 · width`` pixels (the ``norm1000`` format of
:func:`vlkit.eval.metrics.boxes.parse_box`). The image's left/top edge is 0 whatever its
size in pixels, so the same text means the same place at any resolution.

Prompts are those of :mod:`vlkit.eval.generative` (captioning, VQA, grounding), so a
shapes VLM answers ``vlkit eval`` as it was trained. Splits: training conversations come
from the world's ``seed``; the held-out scenes from :data:`HELD_OUT_SEED`, a different
seed, so no training scene (nor its family of variants) is evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from vlkit.config import NonNegativeInt, PositiveInt, validate
from vlkit.data.conversations import ChatSample
from vlkit.data.shapes import NUMBER_WORDS, Scene, ShapesWorld
from vlkit.errors import ConfigError, VlkitError

CAPTION_PROMPT = "Describe the image."
VQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."
GROUNDING_PROMPT = "Give the bounding box of: {text}"
GRID = 1000
"""Box coordinates are integers in ``0 .. GRID - 1``."""
HELD_OUT_SEED = 1_000_003
"""The seed of the held-out (evaluation) world; training worlds use their own seed."""
QUESTION_TYPES = ("color", "shape", "count", "yesno", "relation")
BLIP2_QUESTION = "Question: {question} Short answer: {answer}"
"""A question as BLIP-2's zero-shot VQA prompt poses it, answered; half the LM's questions
take this form, so a frozen LM answers that prompt."""
KINDS = ("caption", "vqa", "grounding", "multi", "questions")
"""Conversation kinds: one caption, one VQA pair, one grounding pair, a multi-turn mix, or
several of the scene's questions as turns (the image's tokens paid once for many answers)."""


def box_text(box, width: float, height: float | None = None) -> str:
    """A pixel box ``(x0, y0, x1, y1)`` as ``[x1, y1, x2, y2]`` on the 0–999 grid."""
    height = width if height is None else height

    def q(v: float, size: float) -> int:
        return min(GRID - 1, max(0, math.floor(v / size * GRID)))

    x0, y0, x1, y1 = box
    return f"[{q(x0, width)}, {q(y0, height)}, {q(x1, width)}, {q(y1, height)}]"


def caption(scene: Scene) -> str:
    """The one caption the VLM learns to give: the objects from left to right, as the world's
    own captions word them (``a large red circle``; ``two shapes: a red circle and a blue star``)."""
    objs = sorted(scene.objects, key=lambda o: o.cx)
    if len(objs) == 1:
        return _a(objs[0].name())
    listed = ", ".join(_a(o.name()) for o in objs[:-1]) + f" and {_a(objs[-1].name())}"
    return f"{NUMBER_WORDS[len(objs)]} shapes: {listed}"


def _a(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _user(text: str, image: bool) -> dict:
    return {"role": "user", "content": f"<image>\n{text}" if image else text}


def _turns(pairs: list[tuple[str, str]]) -> list[dict]:
    """(prompt, answer) pairs → alternating messages, the image placeholder in the first."""
    out = []
    for k, (prompt, answer) in enumerate(pairs):
        out += [_user(prompt, k == 0), {"role": "assistant", "content": answer}]
    return out


def vqa_pairs(scene: Scene) -> list[tuple[str, str, str]]:
    """``(prompt, answer, type)`` for each of the scene's questions."""
    return [(VQA_PROMPT.format(question=q["question"]), q["answer"], q["type"]) for q in scene.vqa]


def grounding_pairs(scene: Scene) -> list[tuple[str, str, dict]]:
    """``(prompt, box text, referring record)`` for each of the scene's referring expressions."""
    size = scene.image_size
    return [(GROUNDING_PROMPT.format(text=r["text"]), box_text(r["box"], size), r) for r in scene.referring]


@dataclass
class ShapesChatConfig:
    """Which conversations: ``scenes`` scenes of the world (``seed``, ``image_size``, objects
    per scene), ``held_out`` for the evaluation world instead (:data:`HELD_OUT_SEED`).
    ``mix`` weights the kinds (:data:`KINDS`); a multi-turn conversation takes up to
    ``max_turns`` of the scene's caption, questions and referring expressions in a seeded order,
    a ``questions`` one up to ``max_turns`` of its questions alone."""

    scenes: PositiveInt = 20000
    seed: NonNegativeInt = 0
    held_out: bool = False
    image_size: PositiveInt = 64
    min_objects: PositiveInt = 1
    max_objects: PositiveInt = 3
    mix: dict[str, float] = field(default_factory=lambda: {"multi": 1.0})
    max_turns: PositiveInt = 6

    def __post_init__(self):
        validate(self)
        unknown = [k for k in self.mix if k not in KINDS]
        if unknown or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ConfigError(f"mix {self.mix}: expected non-negative weights of the kinds {KINDS}, not all 0", ("mix",))

    @property
    def world(self) -> ShapesWorld:
        seed = HELD_OUT_SEED if self.held_out else self.seed
        return ShapesWorld(self.image_size, self.min_objects, self.max_objects, seed)


class ShapesChat:
    """Random-access conversations about the world's scenes: ``chat[i]`` is a
    :class:`~vlkit.data.conversations.ChatSample` about scene ``i % scenes``, deterministic given ``i``. The epoch
    (``i // scenes``) varies which of a scene's questions a conversation asks."""

    def __init__(self, cfg: ShapesChatConfig):
        self.cfg = cfg
        self.world = cfg.world
        self.kinds = list(cfg.mix)
        weights = np.asarray([cfg.mix[k] for k in self.kinds], dtype=float)
        self.p = weights / weights.sum()

    def __len__(self) -> int:
        return self.cfg.scenes

    def __getitem__(self, i: int) -> ChatSample:
        epoch, index = divmod(int(i), self.cfg.scenes)
        scene = self.world.scene(index)
        rng = np.random.default_rng([self.world.seed, index, epoch, 7])
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.p))]
        pairs = self._pairs(scene, kind, rng)
        return ChatSample(f"shapes-{self.world.seed}-{index}-{epoch}", [scene.render()], _turns(pairs), "shapes_chat")

    def _pairs(self, scene: Scene, kind: str, rng: np.random.Generator) -> list[tuple[str, str]]:
        if kind == "caption":
            return [(CAPTION_PROMPT, caption(scene))]
        vqa = [(p, a) for p, a, _ in vqa_pairs(scene)]
        ground = [(p, a) for p, a, _ in grounding_pairs(scene)]
        if kind in ("vqa", "grounding"):
            pool = vqa if kind == "vqa" else ground
            return [pool[int(rng.integers(len(pool)))]]
        pool = vqa if kind == "questions" else [(CAPTION_PROMPT, caption(scene))] + vqa + ground
        return [pool[k] for k in rng.permutation(len(pool))[: self.cfg.max_turns]]


@dataclass
class EvalItem:
    """One held-out prompt: its scene index, the prompt, the true answer (or references, or
    the pixel box), and the question type where there is one."""

    index: int
    prompt: str
    target: object
    type: str = ""
    text: str = ""


def eval_vqa(world: ShapesWorld, n: int) -> list[EvalItem]:
    """``n`` held-out questions, the types in turn (color, shape, count, yes/no, relation), so
    each is a fifth; each from its own scene."""
    items, index = [], 0
    for k in range(n):
        kind = QUESTION_TYPES[k % len(QUESTION_TYPES)]
        for index in range(index, index + 1000):
            found = [(p, a) for p, a, t in vqa_pairs(world.scene(index)) if t == kind]
            if found:
                p, a = found[int(np.random.default_rng([world.seed, index, 5]).integers(len(found)))]
                items.append(EvalItem(index, p, a, kind, p.split("\n")[0]))
                break
        else:
            raise VlkitError(f"shapes world (seed {world.seed}): no {kind} question in 1000 scenes; "
                             f"relation questions need scenes of 2+ objects (max_objects={world.max_objects})")
        index += 1
    return items


def eval_captions(world: ShapesWorld, n: int) -> list[EvalItem]:
    """The first ``n`` held-out scenes with all their captions as references."""
    return [EvalItem(i, CAPTION_PROMPT, [c.text for c in world.scene(i).captions]) for i in range(n)]


def eval_grounding(world: ShapesWorld, n: int) -> list[EvalItem]:
    """``n`` held-out referring expressions, one per scene, each with its pixel box."""
    items = []
    for i in range(n):
        refs = world.scene(i).referring
        r = refs[int(world.rng(i).integers(len(refs)))]
        items.append(EvalItem(i, GROUNDING_PROMPT.format(text=r["text"]), list(r["box"]), text=r["text"]))
    return items


def lm_texts(world: ShapesWorld, n: int) -> Iterator[list[str]]:
    """The world's texts without images, for pre-training the language model, one list per
    scene: its captions first, then its questions with answers and its referring expressions
    with boxes, each list in a seeded order. Kept together, a scene's texts teach the LM to
    answer from what precedes a question, which is where a VLM puts the image."""
    for i in range(n):
        scene = world.scene(i)
        rng = np.random.default_rng([world.seed, i, 11])
        captions = [c.text for c in scene.captions] + [caption(scene)]
        asks = [(BLIP2_QUESTION if rng.random() < 0.5 else "{question} {answer}").format(**q) for q in scene.vqa]
        asks += [f"{r['text']}: {box_text(r['box'], scene.image_size)}" for r in scene.referring]
        yield [captions[k] for k in rng.permutation(len(captions))] + [asks[k] for k in rng.permutation(len(asks))]


def export_llava(chat: ShapesChat, count: int, out: str | Path) -> Path:
    """Write conversations ``0..count-1`` as a LLaVA JSON (``conversations.json``) with their
    images under ``images/``; returns the JSON's path."""
    from vlkit.data.formats.common import write_json

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        rec = chat[i]
        name = f"images/{rec.id}.png"
        rec.images[0].save(out / name)
        turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in rec.messages]
        records.append({"id": rec.id, "image": name, "conversations": turns})
    return write_json(out / "conversations.json", records)
