"""Train a LLaVA-style VLM from a recipe, in LLaVA's two stages, through the one loop.

Stage 1 (align): only the connector trains, on captions rendered by the ``plain`` template; the
vision tower and the language model are frozen (eval mode, no gradients). Stage 2 (instruct):
the connector and the language model (fully, by LoRA, or not at all), the tower frozen or at its
own learning rate, on conversations; ``init_from`` names the run it starts from (stage 1's, or an
earlier stage-2 run's: a curriculum is runs in a chain), whose model must be the one this recipe
builds. The run folder holds the loop's checkpoints (``vlkit.load(out)`` reads the newest) and,
at the end, ``model/``: the trained model as a vlkit LLaVA folder (LoRA merged into it) and, with
LoRA, ``adapter/``: the adapters in peft's layout.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Sequence

import torch

from vlkit.config import NonNegativeInt, OneOf, PositiveFloat, PositiveInt, build, key_rows, key_table, from_dict, to_dict, validate
from vlkit.connectors import CONNECTORS, build_connector
from vlkit.data.conversations import ChatSample, ConversationCollate, ConversationDataset, LlavaSource
from vlkit.data.formats.common import Skips
from vlkit.data.shapes_chat import ShapesChat, ShapesChatConfig
from vlkit.data.skips import ON_BAD_SAMPLE, SKIPPED_FILE
from vlkit.errors import CheckpointError, ConfigError, VlkitError
from vlkit.files import atomic_folder
from vlkit.lm.llama import LlamaLM
from vlkit.losses import LOSS_REDUCTIONS
from vlkit.models.llava import Llava, LlavaConfig
from vlkit.models.llava_processor import LlavaProcessor
from vlkit.nn.lora import LoraConfig, add_lora, merge_lora
from vlkit.text.conversation import encode_conversation, image_token_id
from vlkit.train.checkpoint import latest_checkpoint, run_lora, run_recipe_file, save_model
from vlkit.train.distributed import setup, teardown
from vlkit.train.loop import LoopConfig, OptimConfig, fit, freeze
from vlkit.train.vision_tower import pretrained_vision_tower
from vlkit.vision.preprocess import ImageProcessor
from vlkit.vision.vit import ViT, ViTConfig

SHAPES = "shapes"
"""The one named data source: the shapes world's conversations (:mod:`vlkit.data.shapes_chat`)."""
MODEL_DIR, ADAPTER_DIR = "model", "adapter"


@dataclass
class VlmModelConfig:
    """``vision``: a folder ``vlkit.load`` reads whose model is a ViT or has one as ``.vision`` (a
    vlkit or transformers CLIP, SigLIP, a vision encoder); or, when empty, a random tower of
    ``vision_config`` (tests, benchmarks). ``lm``: a vlkit or transformers Llama-family folder
    with a tokenizer that has an ``<image>`` token. The connector and feature selection are
    :class:`~vlkit.models.llava.LlavaConfig`'s."""

    vision: str = ""
    vision_config: ViTConfig | None = None
    lm: str = ""
    connector: Annotated[str, OneOf(tuple(CONNECTORS))] = "mlp"
    connector_options: dict = field(default_factory=dict)
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: Annotated[str, OneOf(("default", "full"))] = "default"

    def __post_init__(self):
        validate(self)


@dataclass
class VlmDataConfig:
    """``source``: a LLaVA conversation JSON (images under ``image_folder``, default the JSON's
    folder), or "shapes": the shapes world's conversations as the ``shapes`` section sets them
    (``vlkit.data.shapes_chat.ShapesChatConfig``; ignored for a JSON). ``template``: stage 2's conversation template
    (null: the tokenizer's chat template, else llava_v1); another one that renders other ids is saved
    with the model (``tokenizer_config.json``'s ``vlkit_template``), which inference then uses; stage 1
    always uses "plain". ``max_length``: tokens per sample (null: the LM's context); longer samples
    are cut where no image or answer token is lost, else skipped. ``bucket_window``: micro-batches
    per length-sorting window (0: random batches). ``length_groups``: each micro-batch runs as this
    many parts of its samples sorted by length, each padded to its own longest, with the whole
    micro-batch's gradient (:class:`~vlkit.data.conversations.ConversationCollate`)."""

    source: str = ""
    image_folder: str | None = None
    shapes: ShapesChatConfig = field(default_factory=ShapesChatConfig)
    template: str | None = None
    max_length: PositiveInt | None = None
    bucket_window: NonNegativeInt = 16
    length_groups: PositiveInt = 1
    on_bad_sample: Annotated[str, OneOf(ON_BAD_SAMPLE)] = "error"
    allow_outside_paths: bool = False

    def __post_init__(self):
        validate(self)


LM_MODES = ("full", "lora", "frozen")


@dataclass
class VlmTrainConfig:
    """What trains, at which peak learning rate (null: ``optim.lr``). ``lm``: "full", "lora" (the
    ``lora`` section) or "frozen"; ``vision_lr`` null keeps the tower frozen. The connector always trains.
    ``loss``: "token" averages the loss over answer tokens (LLaVA's); "answer" over answers, so
    one-word answers are not drowned by long captions and boxes in a mixed batch."""

    connector_lr: PositiveFloat | None = None
    lm: Annotated[str, OneOf(LM_MODES)] = "frozen"
    lm_lr: PositiveFloat | None = None
    vision_lr: PositiveFloat | None = None
    loss: Annotated[str, OneOf(LOSS_REDUCTIONS)] = "token"


@dataclass
class VlmRecipe:
    stage: Annotated[int, OneOf((1, 2))] = 1
    init_from: str | None = None
    model: VlmModelConfig = field(default_factory=VlmModelConfig)
    data: VlmDataConfig = field(default_factory=VlmDataConfig)
    train: VlmTrainConfig = field(default_factory=VlmTrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        validate(self)
        m = self.model
        if bool(m.vision) == (m.vision_config is not None):
            raise ConfigError("set exactly one of model.vision (a folder) and model.vision_config (a random tower), got "
                              f"vision={m.vision!r}, vision_config={'set' if m.vision_config else None}",
                              ("model.vision", "model.vision_config"))  # fmt: skip
        if not m.lm:
            raise ConfigError("model.lm: expected the folder of a language model (with its tokenizer)", ("model.lm",))
        if not self.data.source:
            raise ConfigError(f"data.source: expected a LLaVA conversation JSON or {SHAPES!r}", ("data.source",))
        if self.stage == 1 and (self.train.lm != "frozen" or self.train.vision_lr is not None):
            raise ConfigError(f"stage 1 trains only the connector; got train.lm={self.train.lm!r}, "
                              f"train.vision_lr={self.train.vision_lr} (expected 'frozen' and null)", ("train.lm", "train.vision_lr"))  # fmt: skip
        if self.stage == 1 and self.init_from is not None:
            raise ConfigError("init_from names stage 1's run for stage 2; stage 1 starts from the tower and the LM",
                              ("init_from", "stage"))  # fmt: skip
        if self.loop.unfreeze_at is not None:
            raise ConfigError("loop.unfreeze_at: VLM training sets what trains by train.lm and train.vision_lr",
                              ("loop.unfreeze_at",))  # fmt: skip
        if any(name == "connector" or name.startswith("connector.") for name in self.loop.freeze):
            raise ConfigError(f"loop.freeze {self.loop.freeze}: the connector always trains (every stage trains it); "
                              "freeze the LM by train.lm, the tower by train.vision_lr", ("loop.freeze",))  # fmt: skip
        if self.loop.parallel == "fsdp" and self.data.length_groups > 1:
            raise ConfigError(f"data.length_groups {self.data.length_groups} under loop.parallel fsdp: every forward "
                              "gathers the sharded weights on all ranks together, and a rank's parts depend on its own "
                              "samples (skips, short batches); expected 1", ("data.length_groups", "loop.parallel"))  # fmt: skip


# ---------------------------------------------------------------- the model
def _vision_tower(cfg: VlmModelConfig) -> tuple[ViT, ImageProcessor]:
    if cfg.vision_config is not None:
        size = cfg.vision_config.image_size
        return ViT(cfg.vision_config), ImageProcessor(size=size, crop_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return pretrained_vision_tower(cfg.vision)


def _language_model(cfg: VlmModelConfig) -> LlamaLM:
    from vlkit.loading import load

    lm = load(cfg.lm)
    if not isinstance(lm, LlamaLM):
        raise ConfigError(f"model.lm {cfg.lm!r}: a {type(lm).__name__}; LLaVA takes a Llama-family language model", ("model.lm",))
    if not getattr(lm, "tokenizer", None):
        raise ConfigError(f"model.lm {cfg.lm!r}: no tokenizer.json; training needs the LM's tokenizer", ("model.lm",))
    return lm


def build_model(recipe: VlmRecipe) -> Llava:
    """The LLaVA this recipe describes: the tower and the LM from their folders (or a random
    tower), a fresh connector (seeded by ``loop.seed``); tokenizer, generation defaults and image
    preprocessing attached."""
    m = recipe.model
    torch.manual_seed(recipe.loop.seed)  # a random tower, then the connector, are the same in every run of the recipe
    tower, processor = _vision_tower(m)
    lm = _language_model(m)
    try:
        image_id = image_token_id(lm.tokenizer)
    except VlkitError as err:
        raise ConfigError(f"model.lm {m.lm!r}: {err}", ("model.lm",)) from None
    try:
        cfg = LlavaConfig(vision=tower.cfg, lm=lm.cfg, connector=m.connector, connector_options=dict(m.connector_options),
                          vision_feature_layer=m.vision_feature_layer,
                          vision_feature_select_strategy=m.vision_feature_select_strategy, image_token_id=image_id)
    except ValueError as err:
        raise ConfigError(f"model: {err}", ("model",)) from None
    with torch.device("meta"):
        model = Llava(cfg)
    model.vision, model.lm = tower, lm
    dim = cfg.vision.width * len(cfg.feature_layers)
    model.connector = build_connector(cfg.connector, dim, cfg.lm.hidden_size, **cfg.connector_options)
    model.tokenizer, model.generation_config, model.processor = lm.tokenizer, lm.generation_config, processor
    if recipe.stage == 2:  # saved with the model's tokenizer: inference then prompts as training did
        model.tokenizer.trained_template = trained_template(model.tokenizer, recipe)
    return model


def init_folder(init_from: str | Path) -> Path:
    """The model folder of a finished run (its ``model/``), a run's newest checkpoint, or a model folder."""
    from vlkit.loading import resolve

    path = Path(init_from)
    if (path / MODEL_DIR / "config.json").is_file():
        return path / MODEL_DIR
    try:
        return resolve(path)
    except FileNotFoundError as err:
        raise ConfigError(f"init_from: {err}; expected the folder of stage 1's run (or an earlier stage-2 run)",
                          ("init_from",)) from None


def _with_option_defaults(cfg: dict) -> dict:
    """``cfg`` with its connector's options completed by their defaults, so that an option left out
    and the same option given at its default build the same model."""
    config_class = CONNECTORS[cfg["connector"]][0]
    return {**cfg, "connector_options": to_dict(from_dict(config_class, cfg["connector_options"], "connector_options"))}


def check_init(folder: Path, cfg: LlavaConfig) -> None:
    """Stage 1's model config against the one this recipe builds: the first difference is an
    error naming both values and the recipe key that sets it."""
    from vlkit.config import read

    raw = read(folder / "config.json")
    if raw.get("model_type") != "vlkit_llava":
        raise CheckpointError(f"init_from: {folder / 'config.json'} holds a {raw.get('model_type')!r} model; "
                              "expected a vlkit LLaVA (stage 1's run)")  # fmt: skip
    raw.pop("model_type")
    there = _with_option_defaults(to_dict(from_dict(LlavaConfig, raw, str(folder / "config.json"))))
    here = _with_option_defaults(to_dict(cfg))
    keys = {"vision": "the tower of model.vision", "lm": "the LM of model.lm", "connector": "model.connector",
            "connector_options": "model.connector_options", "vision_feature_layer": "model.vision_feature_layer",
            "vision_feature_select_strategy": "model.vision_feature_select_strategy",
            "image_token_id": "the tokenizer of model.lm"}  # fmt: skip
    for key, what in keys.items():
        a, b = there.get(key), here.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            key, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
        raise CheckpointError(f"init_from {folder}: its {key} is {json.dumps(a)} but this recipe builds "
                              f"{json.dumps(b)} ({what}); stage 2 must build the model stage 1 trained")


def load_init(model: Llava, init_from: str) -> Path:
    """The init run's weights (all of them) into ``model``, once its config is seen to match."""
    from safetensors.torch import load_file

    folder = init_folder(init_from)
    check_init(folder, model.cfg)
    weights = load_file(str(folder / "model.safetensors"))
    lora = run_lora(folder)  # a LoRA run's checkpoint: its adapters merged first
    if lora is not None:
        add_lora(model.lm, lora)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"init_from {folder}: model.safetensors lacks {missing[:5]} / has {unexpected[:5]} "
                              "beyond this model's weights")  # fmt: skip
    if lora is not None:
        merge_lora(model.lm)
    return folder


def init_notes(folder: Path, recipe: VlmRecipe) -> list[str]:
    """A line for each of ``model.lm`` and ``model.vision`` that names other weights than the init
    run started from: the init run's weights are the ones trained on (the recipe's folders give the configs)."""
    try:
        before = json.loads(run_recipe_file(folder).read_text()).get("model", {})
    except (OSError, ValueError):
        return []
    now = to_dict(recipe.model)
    return [f"note: model.{key} is {now[key]!r}, but {folder} started from {before[key]!r}; its weights are the ones "
            "trained on here" for key in ("lm", "vision") if before.get(key) and now.get(key) and before[key] != now[key]]


# ---------------------------------------------------------------- what trains
def plan_training(model: Llava, recipe: VlmRecipe) -> tuple[list[str], dict[str, float]]:
    """``(frozen submodules, learning rate per trained submodule)``; with LoRA, the adapters are
    added to the LM and its base weights stop taking gradients (the LM stays in train mode)."""
    t, lr = recipe.train, recipe.optim.lr
    frozen, lrs = [], {"connector": t.connector_lr or lr}
    if t.vision_lr is None:
        frozen.append("vision")
    else:
        lrs["vision"] = t.vision_lr
    if t.lm == "frozen":
        frozen.append("lm")
    else:
        lrs["lm"] = t.lm_lr or lr
    if t.lm == "lora":
        model.lm.requires_grad_(False)
        torch.manual_seed(recipe.loop.seed + 1)
        add_lora(model.lm, recipe.lora)
    return frozen, lrs


def trainable_counts(model: Llava) -> dict[str, int]:
    """Parameters that take gradients, per part and in all."""
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters() if p.requires_grad)
              for name in ("vision", "connector", "lm")}  # fmt: skip
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


# ---------------------------------------------------------------- data
def build_source(data: VlmDataConfig, skips: Skips) -> Sequence[ChatSample]:
    if data.source == SHAPES:
        return ShapesChat(data.shapes)
    path = Path(data.source)
    if not path.is_file():
        raise ConfigError(f"data.source {data.source!r}: no such file; expected a LLaVA conversation JSON or {SHAPES!r}",
                          ("data.source",))  # fmt: skip
    return LlavaSource(path, data.image_folder, skips, data.allow_outside_paths)


def build_processor(model: Llava, recipe: VlmRecipe) -> LlavaProcessor:
    """Stage 1 renders captions with "plain"; stage 2 with ``data.template``. The image-token count
    is a number, so the processor pickles into DataLoader workers."""
    template = "plain" if recipe.stage == 1 else recipe.data.template
    try:
        return LlavaProcessor(model.processor, model.tokenizer, model.num_image_tokens(), template)
    except VlkitError as err:
        raise ConfigError(f"data.template: {err}", ("data.template",)) from None


def trained_template(tokenizer, recipe: VlmRecipe) -> str | None:
    """The template to record with a stage-2 model (None: none to record): ``data.template`` where it
    renders a conversation, or a prompt, as other ids than the template inference would otherwise
    take (the tokenizer's chat template, else ``llava_v1``)."""
    default = "chat_template" if tokenizer.chat_template is not None else "llava_v1"
    if recipe.stage == 1 or recipe.data.template in (None, default):
        return None
    chat = [{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "A shape."},
            {"role": "user", "content": "And its colour?"}, {"role": "assistant", "content": "Red."}]  # fmt: skip

    def ids(template: str) -> tuple:
        whole = encode_conversation(chat, tokenizer, template, image_counts=[1])
        prompt = encode_conversation(chat[:1], tokenizer, template, add_generation_prompt=True, image_counts=[1])
        return whole.input_ids, whole.labels, prompt.input_ids

    try:
        return None if ids(recipe.data.template) == ids(default) else recipe.data.template
    except VlkitError:
        return recipe.data.template


def images_only_reason(recipe: VlmRecipe, world) -> str:
    """Why samples without images are left out of this run ("" when they are not)."""
    if recipe.train.lm == "frozen":
        return "only the connector (and tower) train, which text alone does not reach"
    if recipe.loop.parallel == "fsdp" and world.distributed:
        return "under FSDP every rank runs the sharded tower at every step"
    return ""


# ---------------------------------------------------------------- the run
def train_vlm(recipe: VlmRecipe, out: str | Path, resume: bool = False, stop_at: int | None = None) -> dict:
    """Train per the recipe into the run folder ``out``; returns the loop's summary with the
    trainable parameter counts and, once finished, the ``model`` (and ``adapter``) folders."""
    out = Path(out)
    world = setup()
    try:
        model = build_model(recipe)
        if recipe.init_from is not None:
            source_folder = load_init(model, recipe.init_from)
            if world.is_main:
                print(f"stage 2 starts from {source_folder}")
                for note in init_notes(source_folder, recipe):
                    print(note)
        frozen, lrs = plan_training(model, recipe)
        frozen = sorted(set(recipe.loop.freeze) | set(frozen))  # what the loop keeps frozen, counted below
        freeze(model, frozen)
        model.ddp_find_unused_parameters = True  # a batch without images leaves the connector (and tower) out
        counts = trainable_counts(model)
        trained = sum(v for k, v in counts.items() if k != "total")
        if world.is_main:
            parts = ", ".join(f"{k} {counts[k]:,}" for k in ("connector", "lm", "vision"))
            print(f"trainable parameters: {trained:,} of {counts['total']:,} ({parts}; lm: {recipe.train.lm})")
        skips = Skips(recipe.data.on_bad_sample)
        source = build_source(recipe.data, skips)
        if skips.total and world.is_main:
            print(f"skipped {skips.total} bad records while indexing the data: {skips.examples}")
        processor = build_processor(model, recipe)
        max_length = recipe.data.max_length or model.lm.max_length
        if max_length > model.lm.max_length:
            raise ConfigError(f"data.max_length {max_length} exceeds the language model's {model.lm.max_length} positions "
                              f"(model.lm {recipe.model.lm!r})", ("data.max_length",))  # fmt: skip
        loop = LoopConfig(**{**to_dict(recipe.loop), "freeze": frozen})
        micro = loop.batch_size // (loop.grad_accum * world.world_size)
        why = images_only_reason(recipe, world)
        dataset = ConversationDataset(source, processor, max_length, micro, recipe.data.on_bad_sample,
                                      recipe.data.bucket_window, loop.seed, images_only=bool(why))  # fmt: skip
        if (padding := dataset.planned_padding()) and world.is_main:
            print(f"batches bucketed by length: {padding[0]:.0%} of their positions are padding (random batches: {padding[1]:.0%})")
        if dataset.left_out and world.is_main:
            print(f"left out {dataset.left_out} records without images: {why}")
        device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        summary = fit(model, dataset, ConversationCollate(processor, recipe.train.loss, recipe.data.length_groups), loop, recipe.optim, out, "llava", world=world,
                      resume=resume, device=device, stop_at=stop_at, recipe=to_dict(recipe), lrs=lrs, read_skips=skips.items,
                      exports=(MODEL_DIR, ADAPTER_DIR))  # fmt: skip
        summary.update(trainable=trained, parameters=counts["total"], skipped_records=skips.total)
        if summary["steps"] == recipe.loop.steps and world.is_main:
            summary.update(save_final(recipe, out))
        if summary["skipped"] and world.is_main:
            print(f"skipped {summary['skipped']} bad samples, each listed with its file and reason in {out / SKIPPED_FILE}")
        return summary
    finally:
        teardown(world)


def save_final(recipe: VlmRecipe, out: Path) -> dict:
    """``out/model``: the run's last checkpoint as a vlkit LLaVA folder (what ``fit`` saved, whole
    even when the model was sharded); with LoRA the adapters are merged into it and also written
    to ``out/adapter`` in peft's layout."""
    checkpoint = latest_checkpoint(out)
    if recipe.train.lm != "lora":
        atomic_folder(out / MODEL_DIR, lambda tmp: _copy_model_files(checkpoint, tmp))
        return {"model": str(out / MODEL_DIR)}
    from safetensors.torch import load_file

    from vlkit.interop.peft import save_adapter

    final = build_model(recipe)
    plan_training(final, recipe)
    final.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    adapter = save_adapter(final.lm, recipe.lora, out / ADAPTER_DIR, overwrite=True)
    merge_lora(final.lm)
    atomic_folder(out / MODEL_DIR, lambda tmp: save_model(tmp, final.eval(), "llava"))
    return {"model": str(out / MODEL_DIR), "adapter": str(adapter)}


def _copy_model_files(checkpoint: Path, folder: Path) -> None:
    folder.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.is_file():
            shutil.copy2(path, folder / path.name)


# ---------------------------------------------------------------- recipes
def recipe_help() -> str:
    """Every recipe key with its default and type (the ``train vlm --help`` epilog)."""
    return "\n".join([
        "recipe overrides:",
        "  Any recipe key can be set on the command line as --key=value; it overrides the --recipe file,",
        "  which overrides the defaults below. Values are read as YAML: --loop.steps=200, --train.lm=lora,",
        "  --train.vision_lr=1e-5, --lora.target_modules=[q_proj,v_proj], --init_from=runs/stage1.",
        "  model.vision (a folder) or model.vision_config (a random tower: a mapping of ViTConfig keys),",
        "  model.lm and data.source are required. Stage 1 trains the connector only (train.lm=frozen).",
        "",
        "recipe keys and their defaults:",
        *key_table(key_rows(VlmRecipe)),
    ])  # fmt: skip


def load_recipe(data: dict, overrides: list[str] = (), source: str | Path | None = None) -> VlmRecipe:
    """A recipe from a dict (the contents of the recipe file ``source``) and ``--key=value``
    overrides; errors name the file too."""
    return build(VlmRecipe, data, list(overrides), f"{source}: recipe" if source else "recipe")
