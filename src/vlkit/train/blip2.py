"""Train BLIP-2 in its two stages through the one loop, on image-caption pairs (the shapes world or
a ``captions.jsonl`` folder, :mod:`vlkit.data.pairs`).

Stage 1: a frozen vision tower (from a CLIP or vision-encoder folder) under a fresh Q-Former with its
text path, trained by ITC + ITM + ITG (:class:`~vlkit.models.blip2_qformer.Blip2QFormer`).
Stage 2: stage 1's tower and Q-Former (its query side; the text path is left behind), a fresh
linear projection and a frozen decoder LM (:class:`~vlkit.models.blip2.Blip2`); the Q-Former and the
projection learn to caption through the LM, prompted by ``data.prompt``, whose tokens (like the
image tokens) carry no loss.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlkit.config import Fraction, NonNegativeInt, PositiveFloat, PositiveInt, build, key_rows, key_table, to_dict, validate
from vlkit.connectors.qformer import QFormerConfig
from vlkit.data.pairs import Collate, Skipped
from vlkit.data.skips import SKIPPED_FILE
from vlkit.errors import ConfigError, VlkitError
from vlkit.models.blip2 import LANGUAGE_MODELS, Blip2, Blip2Config, vision_tower
from vlkit.models.blip2_processor import Blip2Processor
from vlkit.models.blip2_qformer import Blip2QFormer, Blip2QFormerConfig
from vlkit.text.tokenizer import Tokenizer
from vlkit.train.clip import SHAPES, DataConfig, build_dataset, build_tokenizer, shapes_processor
from vlkit.train.distributed import is_main_process, setup, teardown
from vlkit.train.loop import LoopConfig, OptimConfig, fit
from vlkit.train.vision_tower import pretrained_vision_tower
from vlkit.vision.preprocess import ImageProcessor
from vlkit.vision.vit import ViT, ViTConfig

DEC = "[DEC]"
"""The token that starts ITG's text in place of ``[CLS]`` (the word-level tokenizer's ``[BOS]``)."""


@dataclass
class Stage1Model:
    """``vision``: a folder ``vlkit.load`` reads whose model is a ViT or has one as ``.vision`` (a
    CLIP, a vision encoder), frozen; or, when empty, a random tower of ``vision_config`` (tests).
    ``vision_drop_last``: leave out the tower's last layers (1: read the second-to-last, as LAVIS).
    The Q-Former's ``context_dim``, ``vocab_size``, ``pad_token_id`` and ``text`` are set by training."""

    vision: str = ""
    vision_config: ViTConfig | None = None
    vision_drop_last: NonNegativeInt = 0
    qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(text=True))
    embed_dim: PositiveInt = 256
    temperature: PositiveFloat = 0.07
    itc_label_smoothing: Fraction = 0.1

    def __post_init__(self):
        validate(self)
        if not self.vision and self.vision_config is None:
            raise ConfigError("model.vision: give a CLIP or vision-encoder folder (or model.vision_config for a random tower)",
                              ("model.vision",))  # fmt: skip


@dataclass
class Stage1Recipe:
    model: Stage1Model = field(default_factory=Stage1Model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        validate(self)
        _check_batch(self.data, self.loop)


@dataclass
class Stage2Model:
    """``init_from``: stage 1's run or model folder (its tower and Q-Former). ``lm``: a vlkit or
    transformers OPT or Llama-family folder whose tokenizer has an ``<image>`` token; frozen."""

    init_from: str = ""
    lm: str = ""

    def __post_init__(self):
        validate(self)
        for key in ("init_from", "lm"):
            if not getattr(self, key):
                raise ConfigError(f"model.{key}: required for stage 2", (f"model.{key}",))


@dataclass
class Stage2Data(DataConfig):
    """Stage 1's data keys, and ``prompt``: the text before each caption (no loss on it), the
    prompt BLIP-2 captions with."""

    prompt: str = "a photo of"


@dataclass
class Stage2Recipe:
    model: Stage2Model = field(default_factory=Stage2Model)
    data: Stage2Data = field(default_factory=Stage2Data)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        validate(self)
        _check_batch(self.data, self.loop)


RECIPES = {1: Stage1Recipe, 2: Stage2Recipe}
DERIVED = {
    "model.qformer.context_dim": "the vision tower's width",
    "model.qformer.vocab_size": "the tokenizer built from the training captions",
    "model.qformer.pad_token_id": "the tokenizer",
    "model.qformer.text": "stage 1 (always true)",
}
"""Recipe keys that training sets itself, from what."""


def _check_batch(data: DataConfig, loop: LoopConfig) -> None:
    if data.source == SHAPES and loop.batch_size % data.group_size:
        raise ConfigError(f"loop.batch_size {loop.batch_size} must be a multiple of data.group_size {data.group_size} "
                          "(shapes scenes come in families of that many)", ("loop.batch_size", "data.group_size"))  # fmt: skip


def _family_loop(data: DataConfig, loop: LoopConfig) -> LoopConfig:
    """The loop counts dataset items: on the shapes world an item is a family of ``group_size`` pairs."""
    if data.source == SHAPES and data.group_size > 1:
        return LoopConfig(**{**to_dict(loop), "batch_size": loop.batch_size // data.group_size})
    return loop


# ---------------------------------------------------------------- stage 1
def vision_from(model: Stage1Model) -> tuple[ViT, ImageProcessor]:
    """The frozen tower (its last ``vision_drop_last`` layers left out) and its preprocessing."""
    if model.vision:
        tower, processor = pretrained_vision_tower(model.vision)
    else:
        tower, processor = ViT(model.vision_config), shapes_processor(model.vision_config.image_size)
    keep = tower.cfg.depth - model.vision_drop_last
    if keep < 1:
        raise ConfigError(f"model.vision_drop_last {model.vision_drop_last} leaves none of the tower's {tower.cfg.depth} layers",
                          ("model.vision_drop_last",))  # fmt: skip
    cfg = dataclasses.replace(tower.cfg, depth=keep)
    bare = vision_tower(cfg)
    state = {k: v for k, v in tower.state_dict().items() if k in bare.state_dict()}
    bare.load_state_dict(state)
    return bare, processor


def qformer_tokenizer(data: DataConfig, context_length: int) -> Tokenizer:
    """The word-level caption tokenizer (``[BOS]`` serves as ``[CLS]``) with ``[DEC]`` added."""
    tok = build_tokenizer(data, context_length)
    tok.tok.add_special_tokens([DEC])
    return tok


def build_stage1(recipe: Stage1Recipe) -> Blip2QFormer:
    """The stage-1 model: the recipe's tower (frozen), a fresh Q-Former seeded by ``loop.seed``."""
    m = recipe.model
    torch.manual_seed(recipe.loop.seed)
    tower, processor = vision_from(m)
    if tower.cfg.image_size != recipe.data.image_size:
        raise ConfigError(f"data.image_size {recipe.data.image_size} differs from the vision tower's {tower.cfg.image_size}",
                          ("data.image_size",))  # fmt: skip
    tok = qformer_tokenizer(recipe.data, m.qformer.max_positions)
    q = dataclasses.replace(m.qformer, context_dim=tower.cfg.width, vocab_size=tok.vocab_size, text=True, pad_token_id=tok.token_id("[PAD]"))
    try:
        cfg = Blip2QFormerConfig(vision=tower.cfg, qformer=q, embed_dim=m.embed_dim, temperature=m.temperature,
                                 itc_label_smoothing=m.itc_label_smoothing, dec_token_id=tok.token_id(DEC),
                                 eos_token_id=tok.token_id("[EOS]"))  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"model: {err}", ("model",)) from None
    model = Blip2QFormer(cfg)
    model.vision = tower
    model.vision.requires_grad_(False)
    model.tokenizer, model.processor = tok, processor
    return model


class FixedLengthCollate(Collate):
    """Pads every batch to the tokenizer's context length, so every rank's texts gather (ITM draws
    negatives from the whole batch)."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(Tokenizer(tokenizer.tok, tokenizer.context_length, pad_to_max=True))


def train_stage1(recipe: Stage1Recipe, out: str | Path, resume: bool = False, stop_at: int | None = None) -> dict:
    """Stage 1 into the run folder ``out``; returns the loop's summary and the trainable parameter count."""
    out = Path(out)
    world = setup()
    try:
        model = build_stage1(recipe)
        dataset = build_dataset(recipe, model.processor)
        collate = FixedLengthCollate(model.tokenizer) if world.distributed else Collate(model.tokenizer)
        loop = _family_loop(recipe.data, recipe.loop)
        loop.freeze = sorted(set(loop.freeze) | {"vision"})
        device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        summary = fit(model, dataset, collate, loop, recipe.optim, out, "blip2_qformer", world=world, resume=resume,
                      device=device, after_step=Blip2QFormer.clamp_temperature, stop_at=stop_at, recipe=to_dict(recipe))  # fmt: skip
        _say_skips(summary, out, world)
        return {**summary, "trainable_params": trainable_params(model)}
    finally:
        teardown(world)


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _say_skips(summary: dict, out: Path, world) -> None:
    if summary["skipped"] and world.is_main:
        print(f"skipped {summary['skipped']} bad samples, each listed with its file and reason in {out / SKIPPED_FILE}")


# ---------------------------------------------------------------- stage 2
def stage1_model(init_from: str) -> Blip2QFormer:
    from vlkit.loading import load

    try:
        model = load(init_from)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ConfigError(f"model.init_from {init_from!r}: {err}", ("model.init_from",)) from None
    if not isinstance(model, Blip2QFormer):
        raise ConfigError(f"model.init_from {init_from!r}: a {type(model).__name__}; expected a BLIP-2 stage-1 run or model folder",
                          ("model.init_from",))  # fmt: skip
    return model


def language_model(path: str):
    from vlkit.loading import load
    from vlkit.text.conversation import image_token_id

    lm = load(path)
    kinds = {cls: name for name, (_, cls) in LANGUAGE_MODELS.items()}
    if type(lm) not in kinds:
        raise ConfigError(f"model.lm {path!r}: a {type(lm).__name__}; BLIP-2 takes an OPT or Llama-family LM", ("model.lm",))
    if not getattr(lm, "tokenizer", None):
        raise ConfigError(f"model.lm {path!r}: no tokenizer; training needs the LM's tokenizer", ("model.lm",))
    try:
        image_id = image_token_id(lm.tokenizer)
    except VlkitError as err:
        raise ConfigError(f"model.lm {path!r}: {err}", ("model.lm",)) from None
    return lm, kinds[type(lm)], image_id


def build_stage2(recipe: Stage2Recipe) -> Blip2:
    """Stage 1's tower and Q-Former (query side), a fresh projection (seeded by ``loop.seed``) and
    the frozen LM, with the LM's tokenizer and generation defaults and stage 1's preprocessing."""
    first = stage1_model(recipe.model.init_from)
    lm, lm_type, image_id = language_model(recipe.model.lm)
    qcfg = dataclasses.replace(first.cfg.qformer, text=False)
    cfg = Blip2Config(vision=first.cfg.vision, qformer=qcfg, lm=lm.cfg, lm_type=lm_type, image_token_id=image_id)
    torch.manual_seed(recipe.loop.seed)
    with torch.device("meta"):
        model = Blip2(cfg)
    model.vision, model.lm = first.vision, lm
    model.qformer = type(model.qformer)(qcfg)
    queries = {k: v for k, v in first.qformer.state_dict().items() if k in model.qformer.state_dict()}
    model.qformer.load_state_dict(queries, strict=True)
    model.language_projection = torch.nn.Linear(qcfg.width, lm.cfg.hidden_size)
    for part in model.frozen_parts():
        part.requires_grad_(False)
    model.tokenizer, model.generation_config, model.processor = lm.tokenizer, lm.generation_config, first.processor
    return model


class CaptionLMCollate:
    """Image-caption items → BLIP-2 batches by :meth:`Blip2Processor.training_text
    <vlkit.models.blip2_processor.Blip2Processor.training_text>`: the image tokens, the prompt, the
    caption and EOS, labels on the caption and EOS only; the pixels come preprocessed."""

    def __init__(self, processor: Blip2Processor, prompt: str):
        self.processor, self.prompt = processor, prompt

    def __call__(self, items: list) -> dict:
        skipped = [it.skip for it in items if isinstance(it, Skipped)]
        flat = [pair for it in items if not isinstance(it, Skipped) for pair in it]
        batch: dict = {"skipped": skipped}
        if flat:
            batch |= self.processor.training_text([self.prompt] * len(flat), [caption for _, caption in flat])
            batch["pixel_values"] = torch.stack([img for img, _ in flat])
        return batch


def train_stage2(recipe: Stage2Recipe, out: str | Path, resume: bool = False, stop_at: int | None = None) -> dict:
    out = Path(out)
    world = setup()
    try:
        model = build_stage2(recipe)
        dataset = build_dataset(recipe, model.processor)
        collate = CaptionLMCollate(Blip2Processor.for_model(model), recipe.data.prompt)
        device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        summary = fit(model, dataset, collate, _family_loop(recipe.data, recipe.loop), recipe.optim, out, "blip2", world=world,
                      resume=resume, device=device, stop_at=stop_at, recipe=to_dict(recipe))  # fmt: skip
        _say_skips(summary, out, world)
        return {**summary, "trainable_params": trainable_params(model)}
    finally:
        teardown(world)


# ---------------------------------------------------------------- recipes
def train_blip2(stage: int, recipe, out: str | Path, resume: bool = False, stop_at: int | None = None) -> dict:
    return (train_stage1 if stage == 1 else train_stage2)(recipe, out, resume, stop_at)


def load_recipe(stage: int, data: dict, overrides: list[str] = (), source: str | Path | None = None):
    """Stage ``stage``'s recipe from a dict (the recipe file ``source``) and ``--key=value`` overrides."""
    if stage not in RECIPES:
        raise ConfigError(f"--stage {stage}: BLIP-2 trains in stages 1 and 2", ("stage",))
    return build(RECIPES[stage], data, list(overrides), f"{source}: recipe" if source else "recipe", DERIVED if stage == 1 else None)


def recipe_help() -> str:
    """Every recipe key of both stages with its default (the ``train blip2 --help`` epilog)."""
    lines = ["recipe overrides: any key below as --key=value; it overrides the --recipe file, which overrides the defaults."]
    for stage, cls in RECIPES.items():
        rows = key_rows(cls, DERIVED if stage == 1 else None)
        lines += ["", f"--stage {stage} recipe keys and their defaults:", *key_table(rows)]
    return "\n".join(lines)


def cmd_train_blip2(args, overrides: list[str]) -> int:
    """``vlkit train blip2 --stage 1|2 --recipe R --out DIR``."""
    from vlkit.config import read

    recipe = load_recipe(args.stage, read(args.recipe) if args.recipe else {}, overrides, args.recipe)
    summary = train_blip2(args.stage, recipe, args.out, resume=args.resume)
    if not is_main_process():
        return 0
    print(json.dumps(summary))
    print(f"wrote {args.out}: BLIP-2 stage {args.stage} ({summary['trainable_params']} trainable parameters), checkpoints, "
          f"metrics.jsonl, recipe.json; vlkit.load({str(args.out)!r}) loads the newest checkpoint")
    return 0
