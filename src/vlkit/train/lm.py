"""Pre-train a causal language model (a Llama) from a recipe: on the shapes world's texts or
on any JSONL of ``{"text": ...}`` lines, through the one training loop.

Texts are tokenised (BOS text EOS), shuffled by the seed, concatenated and cut into blocks
of ``data.block_size`` tokens, so every batch is full and nothing is padding. The tokenizer
is trained on the texts (:func:`vlkit.text.train_tokenizer.train_tokenizer`) unless
``data.tokenizer`` names a model folder to take it from. The run folder ends up a vlkit LM
folder (``config.json``, weights, tokenizer, ``generation_config.json``) next to its
``checkpoints/`` and ``metrics.jsonl``: ``vlkit.load(out)`` reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from vlkit.config import NonNegativeInt, OneOf, PositiveInt, build, key_rows, key_table, to_dict, validate
from vlkit.data.formats.common import BadRecord, iter_jsonl
from vlkit.data.shapes import ShapesWorld
from vlkit.data.shapes_chat import ShapesChat, ShapesChatConfig, lm_texts
from vlkit.data.skips import ON_BAD_SAMPLE, Skips
from vlkit.errors import ConfigError, VlkitError
from vlkit.lm.generation_config import GenerationConfig
from vlkit.lm.llama import LlamaConfig, LlamaLM
from vlkit.losses import causal_lm_loss
from vlkit.text.lm_tokenizer import LMTokenizer
from vlkit.text.train_tokenizer import ROLE_TOKENS, train_tokenizer
from vlkit.train.checkpoint import save_model
from vlkit.train.distributed import is_main_process, setup, teardown
from vlkit.train.loop import LoopConfig, OptimConfig, fit

SHAPES = "shapes"
TEXT_JSONL = 'one JSON object per line with a string "text"'


def _small_llama() -> LlamaConfig:
    return LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                       max_position_embeddings=512, tie_word_embeddings=True)


@dataclass
class LMDataConfig:
    """``source``: "shapes" (the world's texts, from ``scenes`` scenes of world ``seed``) or a
    JSONL file of ``{"text": ...}`` lines. ``tokenizer``: a folder holding a tokenizer to use;
    empty trains one on the texts (``vocab_size`` ids at most). ``block_size``: tokens per
    training sequence."""

    source: str = SHAPES
    scenes: PositiveInt = 20000
    seed: NonNegativeInt = 0
    image_size: PositiveInt = 64
    tokenizer: str = ""
    vocab_size: PositiveInt = 1024
    block_size: PositiveInt = 128
    on_bad_sample: Annotated[str, OneOf(ON_BAD_SAMPLE)] = "error"

    def __post_init__(self):
        validate(self)


@dataclass
class LMRecipe:
    model: LlamaConfig = field(default_factory=_small_llama)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=50))
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=500, batch_size=32, log_every=20))

    def __post_init__(self):
        validate(self)
        if self.data.block_size > self.model.max_position_embeddings:
            raise ConfigError(f"data.block_size {self.data.block_size} is longer than model.max_position_embeddings "
                              f"{self.model.max_position_embeddings}", ("data.block_size", "model.max_position_embeddings"))


DERIVED = {
    "model.vocab_size": "the tokenizer",
    "model.bos_token_id": "the tokenizer",
    "model.eos_token_id": "the tokenizer",
    "model.pad_token_id": "the tokenizer",
}
"""Recipe keys that training sets itself, from what."""


def load_recipe(data: dict, overrides: list[str] = (), source: str | Path | None = None) -> LMRecipe:
    return build(LMRecipe, data, list(overrides), f"{source}: recipe" if source else "recipe", DERIVED)


class CausalLM(LlamaLM):
    """A :class:`LlamaLM` whose ``forward(input_ids, labels)`` is the next-token loss, the
    contract of :func:`vlkit.train.loop.fit`; its weights and config are the LM's, so its
    checkpoints load as a plain LlamaLM."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return causal_lm_loss(super().forward(input_ids=input_ids, attention_mask=attention_mask).logits, labels)


class PackedBlocks(Dataset):
    """Token ids cut into blocks of ``block_size``; item ``i`` is block ``i`` modulo their number."""

    def __init__(self, ids: np.ndarray, block_size: int):
        self.blocks = torch.from_numpy(ids[: len(ids) // block_size * block_size].astype(np.int64)).view(-1, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i % len(self.blocks)]


def collate_blocks(blocks: list[torch.Tensor]) -> dict:
    ids = torch.stack(blocks)
    return {"input_ids": ids, "labels": ids}


def read_texts(path: str | Path, skips: Skips) -> list[str]:
    """The ``text`` of each line of a JSONL file; a line that is not such an object is a bad
    record (stops, or is skipped and counted in ``skips``)."""
    texts = []
    for line, rec in iter_jsonl(path, TEXT_JSONL, skips):
        text = rec.get("text")
        if not isinstance(text, str) or not text.strip():
            found = "no 'text' key" if "text" not in rec else f"'text' is {type(text).__name__ if not isinstance(text, str) else 'empty'}"
            skips.reject(BadRecord(str(path), f"{found}; expected {TEXT_JSONL}", f"line {line}"), "bad record")
            continue
        texts.append(text)
    if not texts:
        raise VlkitError(f"{path}: no usable text lines ({skips.total} bad); expected {TEXT_JSONL}")
    return texts


def shapes_world(data: LMDataConfig) -> ShapesWorld:
    return ShapesWorld(image_size=data.image_size, seed=data.seed)


def corpus(data: LMDataConfig, skips: Skips) -> list[list[str]]:
    """The texts in groups that pre-training keeps together and in order: a shapes scene's
    texts, or a JSONL line alone."""
    if data.source == SHAPES:
        return list(lm_texts(shapes_world(data), data.scenes))
    if not Path(data.source).is_file():
        raise ConfigError(f"data.source {data.source!r}: no such file; expected {SHAPES!r} (the shapes world's texts) "
                          f"or a JSONL file ({TEXT_JSONL})", ("data.source",))
    return [[text] for text in read_texts(data.source, skips)]


def tokenizer_corpus(data: LMDataConfig, groups: list[list[str]]) -> Iterable[str]:
    """The texts, and for the shapes world also its VLM conversations' prompts and the chat
    roles, so every word the VLM will read is a token of its own."""
    yield from (text for group in groups for text in group)
    if data.source == SHAPES:
        chat = ShapesChat(ShapesChatConfig(scenes=500, seed=data.seed, image_size=data.image_size))
        for i in range(len(chat)):
            yield from (m["content"].replace("<image>\n", "") for m in chat[i].messages)
        yield from ["user", "assistant", "system"] * 2


def build_tokenizer(data: LMDataConfig, groups: list[list[str]]) -> LMTokenizer:
    if data.tokenizer:
        return LMTokenizer.from_folder(data.tokenizer)
    return train_tokenizer(tokenizer_corpus(data, groups), data.vocab_size)


def pack(groups: list[list[str]], tokenizer: LMTokenizer, seed: int) -> np.ndarray:
    """BOS text EOS for each text, concatenated: the groups in a seeded order, each group's
    texts together and in their own order."""
    if tokenizer.eos_token_id is None:
        raise VlkitError(f"{tokenizer.origin}: no EOS token; pre-training separates texts with it")
    order = np.random.default_rng(seed).permutation(len(groups))
    encoded = tokenizer.backend.encode_batch([text for k in order for text in groups[k]], add_special_tokens=True)
    eos = tokenizer.eos_token_id
    return np.fromiter((i for e in encoded for i in (*e.ids, eos)), dtype=np.int64)


def generation_config(tokenizer: LMTokenizer) -> GenerationConfig:
    """Greedy, stopping at EOS or at the end of a chat turn."""
    stops = [i for i in (tokenizer.eos_token_id, tokenizer.token_to_id(ROLE_TOKENS[1])) if i is not None]
    return GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            max_new_tokens=64)


def _save_final(model: LlamaLM, out: Path) -> None:
    """The model folder's files into the run folder, ``config.json`` last (its presence means
    the folder is complete)."""
    tmp = out / f".model.tmp-{os.getpid()}"
    save_model(tmp, model, "llama")
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(f, out / f.name)
    tmp.rmdir()


def train_lm(recipe: LMRecipe, out: str | Path, resume: bool = False, stop_at: int | None = None) -> dict:
    """Train per the recipe into the run folder ``out``; returns the training summary (with
    ``skipped``, the bad text lines, each listed in ``skipped.jsonl``)."""
    out = Path(out)
    world = setup()
    try:
        torch.manual_seed(recipe.loop.seed)
        skips = Skips(recipe.data.on_bad_sample)
        groups = corpus(recipe.data, skips)
        tokenizer = build_tokenizer(recipe.data, groups)
        ids = pack(groups, tokenizer, recipe.data.seed)
        dataset = PackedBlocks(ids, recipe.data.block_size)
        if len(dataset) == 0:
            raise VlkitError(f"the texts give {len(ids)} tokens, less than one block of data.block_size "
                             f"{recipe.data.block_size}; give more text or a smaller block")
        cfg = recipe.model
        cfg.vocab_size = tokenizer.vocab_size
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        model = CausalLM(cfg)
        model.tokenizer = tokenizer
        model.generation_config = generation_config(tokenizer)
        device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        summary = fit(model, dataset, collate_blocks, recipe.loop, recipe.optim, out, "llama", world=world, resume=resume,
                      device=device, stop_at=stop_at, recipe=to_dict(recipe),
                      exports=("config.json", "model.safetensors"))  # the final model: stale once a checkpoint is newer
        if world.is_main:
            if skips.total:
                skips.write(out)
            if summary["steps"] == recipe.loop.steps:
                _save_final(model, out)
        summary.update(skipped=skips.total, tokens=int(len(ids)), blocks=len(dataset))
        return summary
    finally:
        teardown(world)



def recipe_help() -> str:
    """Every recipe key with its default and type (the ``train lm --help`` epilog)."""
    return "\n".join([
        "recipe overrides:",
        "  Any recipe key can be set on the command line as --key=value; it overrides the --recipe file,",
        "  which overrides the defaults below. Values are read as YAML: --loop.steps=200, --data.source=texts.jsonl,",
        "  --data.tokenizer=runs/lm (take that folder's tokenizer instead of training one).",
        "",
        "recipe keys and their defaults:",
        *key_table(key_rows(LMRecipe, DERIVED)),
    ])  # fmt: skip


def cmd_train_lm(args, overrides: list[str]) -> int:
    """``vlkit train lm --recipe R --out DIR [--resume] [--key=value ...]``."""
    from vlkit.config import read

    recipe = load_recipe(read(args.recipe) if args.recipe else {}, overrides, args.recipe)
    summary = train_lm(recipe, args.out, resume=args.resume)
    if not is_main_process():
        return 0
    print(json.dumps(summary))
    extra = f"; skipped.jsonl ({summary['skipped']} bad lines)" if summary["skipped"] else ""
    print(f"wrote {args.out}: the language model (vlkit.load reads it: weights, tokenizer, generation_config.json), "
          f"checkpoints, metrics.jsonl, recipe.json{extra}")
    return 0
