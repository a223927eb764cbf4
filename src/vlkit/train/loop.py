"""The training loop, written once for every model whose ``forward(**batch)`` returns a loss.

Batches are chosen by step (``batch_indices``), and the checkpoint holds the model,
optimizer, schedule, step and RNG states, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlkit.config import (
    Bound,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    OneOf,
    PositiveFloat,
    PositiveInt,
    flatten,
    read,
    validate,
    write_json,
)
from vlkit.data.skips import SKIPPED_FILE, Skip
from vlkit.errors import CheckpointError, ConfigError, VlkitError
from vlkit.files import write_text_whole
from vlkit.precision import PRECISIONS, autocast
from vlkit.train.checkpoint import latest_checkpoint, load_state, save_checkpoint, weight_mismatches
from vlkit.train.distributed import PARALLEL, World, full_state, is_sharded, load_full_state, local_gradients, shard
from vlkit.train.schedule import make_scheduler


Beta = Annotated[float, Bound(0, 1, high_open=True)]


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay; decay is not applied to gains, biases,
    embeddings' positions or temperatures (parameters with fewer than 2 dimensions).
    ``grad_clip`` 0 turns clipping off."""

    lr: PositiveFloat = 5e-4
    weight_decay: NonNegativeFloat = 0.1
    betas: tuple[Beta, Beta] = (0.9, 0.98)
    eps: PositiveFloat = 1e-6
    warmup_steps: NonNegativeInt = 100
    min_lr_ratio: Fraction = 0.0
    grad_clip: NonNegativeFloat = 1.0

    def __post_init__(self):
        validate(self)


@dataclass
class LoopConfig:
    """``batch_size`` is the global batch per optimizer step (split over ranks and
    ``grad_accum`` micro-batches); ``freeze`` names submodules to keep fixed (LiT: ["vision"]),
    for the whole run or, with ``unfreeze_at``, until that step. ``save_every`` 0 saves only
    at the end. ``parallel``: under torchrun, "ddp" replicates the model on every rank, "fsdp"
    shards it (FSDP2, per transformer block) for models that do not fit one device; checkpoints
    are the same either way."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 256
    grad_accum: PositiveInt = 1
    precision: Annotated[str, OneOf(PRECISIONS)] = "auto"
    grad_checkpointing: bool = False
    parallel: Annotated[str, OneOf(PARALLEL)] = "ddp"
    freeze: list[str] = field(default_factory=list)
    unfreeze_at: PositiveInt | None = None
    seed: NonNegativeInt = 0
    log_every: PositiveInt = 10
    save_every: NonNegativeInt = 0
    keep_checkpoints: PositiveInt = 2
    num_workers: NonNegativeInt = 0

    def __post_init__(self):
        validate(self)
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}", ("batch_size", "grad_accum")
            )


class StepSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches in order from ``start_step``; the schedule is a pure
    function of the step, so resuming needs only the step number. Each epoch is a seeded
    permutation unless ``shuffle`` is off (procedural data is random already). It stops
    before ``end_step`` (default ``cfg.steps``)."""

    def __init__(
        self, n: int, cfg: LoopConfig, world: World, start_step: int, shuffle: bool = True, end_step: int | None = None
    ):
        self.n, self.cfg, self.world, self.start, self.shuffle = n, cfg, world, start_step, shuffle
        self.end = cfg.steps if end_step is None else end_step
        self.micro = cfg.batch_size // (cfg.grad_accum * world.world_size)
        if self.micro * cfg.grad_accum * world.world_size != cfg.batch_size:
            raise ConfigError(
                f"loop.batch_size {cfg.batch_size} is not divisible by loop.grad_accum {cfg.grad_accum} × world size {world.world_size}",
                ("loop.batch_size", "loop.grad_accum"),
            )
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.cfg.grad_accum

    def __iter__(self):
        b, w = self.cfg.batch_size, self.world
        for step in range(self.start, self.end):
            for a in range(self.cfg.grad_accum):
                first = step * b + (a * w.world_size + w.rank) * self.micro
                yield [self.index(k) for k in range(first, first + self.micro)]

    def index(self, k: int) -> int:
        """The ``k``-th sample of the run as ``epoch · n + position``; datasets take it modulo
        their length and may use the epoch (to vary captions, say)."""
        epoch, pos = divmod(k, self.n)
        return epoch * self.n + (int(self._perm(epoch)[pos]) if self.shuffle else pos)


def param_groups(model: torch.nn.Module, weight_decay: float, lrs: dict[str, float] | None = None) -> list[dict]:
    """Decayed and undecayed groups; ``lrs`` maps submodule names to their own learning rate, so
    each named module gets its two groups (``"name"``: the module), first (the logged lr is the
    first group's), and the rest keep the default."""
    lrs = lrs or {}
    for name in lrs:
        _submodule(model, name, "lrs")
    groups: dict[tuple[str, bool], list] = {}
    for key, p in model.named_parameters():
        owner = next((n for n in lrs if key.startswith(n + ".")), "")
        groups.setdefault((owner, p.ndim >= 2), []).append(p)
    out = []
    for owner in [*lrs, ""]:
        for decayed in (True, False):
            group = {"params": groups.get((owner, decayed), []), "weight_decay": weight_decay if decayed else 0.0}
            if owner:
                group.update(name=owner, lr=lrs[owner])
            if group["params"] or not owner:
                out.append(group)
    return out


def _submodule(model: torch.nn.Module, name: str, key: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"{key}: {name!r}: the model has no such submodule", (key,)) from None


def freeze(model: torch.nn.Module, names: list[str], frozen: bool = True) -> None:
    """Stop (or restart) gradients of the named submodules and put them in eval (or train) mode;
    the optimizer skips them meanwhile."""
    for name in names:
        module = _submodule(model, name, "loop.freeze")
        module.requires_grad_(not frozen)
        module.train(not frozen)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_rank(seed: int, world: World) -> None:
    """Give each rank its own random stream (noise, dropout, masks), so that ranks do not draw
    the same numbers for different samples; rank 0's is the single-process run's."""
    if world.rank:
        torch.manual_seed(int(np.random.SeedSequence([seed, world.rank]).generate_state(1)[0]))


def _rng_states(world: World) -> list[dict]:
    """Every rank's RNG state, rank 0's first (gathered onto every rank: all must call this)."""
    if not world.distributed:
        return [_rng_state()]
    import torch.distributed as dist

    states: list[dict | None] = [None] * world.world_size
    dist.all_gather_object(states, _rng_state())
    return states


@dataclass
class Progress:
    """How far a run has got; saved in every checkpoint so a resumed run carries it on."""

    step: int = 0
    skipped: int = 0
    elapsed: float = 0.0


def _optimizer(model: torch.nn.Module, optim: OptimConfig, steps: int, lrs: dict[str, float] | None = None):
    groups = param_groups(model, optim.weight_decay, lrs)
    fused = not is_sharded(model)  # one kernel over all parameters: ~3x faster than the per-tensor loop on a CPU
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused)
    return optimizer, make_scheduler(optimizer, optim.warmup_steps, steps, optim.min_lr_ratio)


def _start(run_dir: Path, resume: bool, model: torch.nn.Module, optimizer, scheduler, recipe: dict | None, world: World) -> Progress:
    """Where the run starts: the latest checkpoint when resuming (said so when there is none),
    else step 0 (said so when the folder holds an earlier run, which this one replaces)."""
    if not resume:
        if world.is_main and (run_dir / "checkpoints" / "latest").exists():
            print(f"{run_dir}: holds an earlier run; starting a fresh one, whose first checkpoint replaces it (--resume continues it instead)")
        return Progress()
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        if world.is_main:
            print(f"{run_dir}: no checkpoint to resume from; starting a fresh run")
        return Progress()
    return _restore(ckpt, model, optimizer, scheduler, run_dir / "recipe.json", recipe, world)


def _restore(ckpt: Path, model: torch.nn.Module, optimizer, scheduler, recipe_file: Path, recipe: dict | None,
             world: World) -> Progress:
    """Load a checkpoint into the model, optimizer, schedule and RNG, once its weights are seen
    to fit the model (nothing is changed when they do not). Each rank takes back its own random
    stream; a rank the checkpoint has none for (a run resumed on more processes) starts a new one."""
    if problems := weight_mismatches(ckpt, model):
        raise CheckpointError(
            f"{ckpt / 'model.safetensors'}: does not fit the model this recipe builds: {'; '.join(problems)}. "
            f"{_recipe_change(recipe_file, recipe)}Resume with the run's recipe, or train into a new --out."
        )
    if kept := [c for c in _changes(recipe_file, recipe) or [] if c[0].endswith("lr") or c[0] in _OPTIMIZER_KEYS]:
        raise CheckpointError(f"{ckpt}: a resumed run keeps the learning rates and optimizer settings it was saved with, but "
                              f"the recipe changes {_shown(kept)}; resume with the run's, or start a new run from it (init_from)")
    from safetensors.torch import load_file

    try:
        state = load_state(ckpt / "training_state")
        load_full_state(model, optimizer, load_file(str(ckpt / "model.safetensors")), state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ranks = [state["rng"], *state.get("rng_ranks", [])]
        if world.rank < len(ranks):
            _set_rng_state(ranks[world.rank])
        else:
            _seed_rank(int(state["step"]), world)
        return Progress(int(state["step"]), int(state["skipped"]), float(state["elapsed"]))
    except CheckpointError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{ckpt}: cannot resume from it ({type(err).__name__}: {err}). "
                              f"{_recipe_change(recipe_file, recipe)}") from None


_OPTIMIZER_KEYS = ("optim.weight_decay", "optim.betas", "optim.eps")
"""Recipe keys (with every ``*lr``) a resumed optimizer's saved parameter groups hold: a change would be recorded but not used."""


def _changes(recipe_file: Path, recipe: dict | None) -> list[tuple[str, object, object]] | None:
    """``(key, before, now)`` for each key in which ``recipe`` differs from the run's saved recipe, the
    model's keys first; None when there is no saved recipe to read ([] for no recipe given)."""
    if recipe is None:
        return []
    try:
        before = flatten(read(recipe_file))
    except (VlkitError, OSError):
        return None
    now = flatten(recipe)
    keys = sorted(set(before) | set(now), key=lambda k: (not k.startswith("model."), k))
    return [(k, before.get(k, "(unset)"), now.get(k, "(unset)")) for k in keys if before.get(k) != now.get(k)]


def _shown(changes: list[tuple[str, object, object]]) -> str:
    """``key before → now, ...``."""
    return ", ".join(f"{k} {a!r} → {b!r}" for k, a, b in changes)


def _recipe_change(recipe_file: Path, recipe: dict | None) -> str:
    """The keys in which ``recipe`` differs from the run's saved recipe, as a sentence."""
    if recipe is None:
        return ""
    changed = _changes(recipe_file, recipe)
    if changed is None:
        return "The recipe differs from the one the run was trained with. "
    if not changed:
        return f"{recipe_file} holds the same recipe, so the checkpoint was written by another one. "
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    return f"The recipe differs from {recipe_file} in {_shown(changed[:6])}{more}. "


def _training_state(optimizer_state: dict, scheduler, progress: Progress, rng: list[dict]) -> dict:
    """What a resume needs besides the weights; ``rng``: every rank's RNG state, rank 0's first."""
    return {
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng[0],
        "rng_ranks": rng[1:],
        "step": progress.step,
        "skipped": progress.skipped,
        "elapsed": progress.elapsed,
    }


def _wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel under torchrun; the model itself otherwise (or when FSDP has sharded it)."""
    if not world.distributed or is_sharded(model):
        return model
    # a model whose batches may leave trained parameters out (a VLM's text-only batch skips its connector) says so
    unused = getattr(model, "ddp_find_unused_parameters", False)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                     find_unused_parameters=unused)


def _keep_steps(path: Path, last: int) -> None:
    """Drop the JSON lines of ``path`` logged past step ``last`` (and a line torn by a kill),
    rewriting it by a rename."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)

    def step(line: str) -> float:
        try:
            return json.loads(line)["step"] if line.endswith("\n") else float("inf")
        except (json.JSONDecodeError, KeyError, TypeError):
            return float("inf")

    kept = [line for line in lines if step(line) <= last]
    if len(kept) < len(lines):
        write_text_whole(path, "".join(kept))


class MetricsLog:
    """The progress bar and ``metrics.jsonl``: a record every ``log_every`` steps, with the
    samples/s of the steps since the last one, and the parts of a loss made of several
    (``loss_itc`` ..., from a model's ``last_losses``: its last micro-batch on the main rank).
    Only the main rank writes. A fresh run that ``replaces`` an earlier one in its folder logs
    beside the earlier run's files until :meth:`commit` (its first checkpoint) puts them in place."""

    def __init__(self, run_dir: Path, loop: LoopConfig, world: World, start: int, replaces: bool = False):
        self.every, self.on = loop.log_every, world.is_main
        final = (run_dir / "metrics.jsonl", run_dir / SKIPPED_FILE)
        aside = tuple(p.with_name(f".{p.name}.new") for p in final)
        self.pending = list(zip(aside, final)) if replaces else []
        self.path, self.skips = aside if replaces else final
        if self.on:
            for path in aside:  # a replacing run's, killed before its first checkpoint
                path.unlink(missing_ok=True)
            for path in final:
                if start:  # a run stopped after its checkpoint logged steps this one logs again
                    _keep_steps(path, start)
                elif not replaces:  # no checkpoint: what is there belongs to no run
                    path.unlink(missing_ok=True)
        self.bar = tqdm(total=loop.steps, initial=start, disable=not self.on, desc="train", unit="step", dynamic_ncols=True)
        self.window_t, self.window_n = time.perf_counter(), 0

    def samples(self, n: int) -> None:
        self.window_n += n

    def commit(self) -> None:
        """The run's first checkpoint is saved: its logs take the place of the earlier run's."""
        if self.on:
            for new, final in self.pending:
                if new.exists():
                    os.replace(new, final)
                else:
                    final.unlink(missing_ok=True)
        if self.pending:
            self.path, self.skips = (final for _, final in self.pending)
            self.pending = []

    def skipped(self, step: int, skips: list[Skip]) -> None:
        """One line per skipped sample in ``skipped.jsonl`` as it happens: the step (0: before
        training, as the data was read), the file and record, and the reason."""
        if self.on and skips:
            with open(self.skips, "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"step": step, **dataclasses.asdict(skip)}) + "\n" for skip in skips)

    def step(self, model: torch.nn.Module, progress: Progress, loss: float, lr: float, last: bool) -> None:
        if self.on and (progress.step % self.every == 0 or last):
            now = time.perf_counter()
            rate = self.window_n / max(now - self.window_t, 1e-9)
            record = {"step": progress.step, "loss": loss, "lr": lr, "samples_per_s": rate,
                      "elapsed_s": progress.elapsed, "skipped": progress.skipped}  # fmt: skip
            if hasattr(model, "logit_scale"):
                record["logit_scale"] = float(model.logit_scale.detach().exp())
            record |= {f"loss_{part}": value for part, value in getattr(model, "last_losses", {}).items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{rate:.0f}")
            self.window_t, self.window_n = now, 0
        self.bar.update(1)


@torch.enable_grad()
def fit(
    model: torch.nn.Module,
    dataset: Dataset,
    collate: Callable,
    loop: LoopConfig,
    optim: OptimConfig,
    run_dir: Path,
    model_type: str,
    world: World = World(),
    resume: bool = False,
    device: torch.device | str = "cpu",
    after_step: Callable[[torch.nn.Module], None] | None = None,
    stop_at: int | None = None,
    recipe: dict | None = None,
    lrs: dict[str, float] | None = None,
    read_skips: Sequence[Skip] = (),
    exports: Sequence[str] = (),
) -> dict:
    """Train ``model`` for ``loop.steps`` optimizer steps; returns a summary dict.

    ``model(**batch)`` returns the loss, or an output with a ``.loss``. ``lrs`` gives named
    submodules their own peak learning rate (see :func:`param_groups`); the schedule scales each.

    ``stop_at`` ends the run early after that step, with a checkpoint, as if it were
    interrupted there: the schedule still spans ``loop.steps``, so ``resume`` continues it.
    ``recipe`` is written to the run's ``recipe.json`` once the run has started (after a
    resumed checkpoint has loaded), so a failed resume leaves the run folder as it was.
    ``read_skips``: records the data's reader skipped before training, listed first in
    ``skipped.jsonl`` (as step 0) with those skipped as batches are read. ``exports``: folders of
    the run that its trainer writes when it finishes (a VLM's merged ``model/``); each checkpoint
    removes them first, so that a run folder never offers one older than its newest checkpoint.
    """
    device, run_dir = torch.device(device), Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise VlkitError(f"{run_dir}: is a file; the run folder (--out) must be a folder")
    torch.manual_seed(loop.seed)
    if loop.grad_checkpointing:
        for m in model.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True
    model.to(device).train()
    if loop.parallel == "fsdp" and world.distributed:
        shard(model)
    optimizer, scheduler = _optimizer(model, optim, loop.steps, lrs)
    progress = _start(run_dir, resume, model, optimizer, scheduler, recipe, world)
    if progress.step == 0:
        _seed_rank(loop.seed, world)
    start, elapsed_before = progress.step, progress.elapsed
    if start > loop.steps:
        raise ConfigError(
            f"{run_dir}: the run is at step {start}, beyond loop.steps={loop.steps}; set --loop.steps above it to continue",
            ("loop.steps",),
        )
    freeze(model, loop.freeze, frozen=loop.unfreeze_at is None or start < loop.unfreeze_at)
    if len(dataset) == 0:
        raise VlkitError("the training data holds no samples")
    end = loop.steps if stop_at is None else min(stop_at, loop.steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    replaces = start == 0 and (run_dir / "checkpoints" / "latest").exists()  # kept until this run's first checkpoint
    if recipe is not None and world.is_main and not replaces:
        write_json(run_dir / "recipe.json", recipe)
    if start >= end:  # a resumed run that has already got there
        return {"steps": start, "samples": 0, "train_seconds": progress.elapsed, "skipped": progress.skipped,
                "checkpoint": str(latest_checkpoint(run_dir))}  # fmt: skip
    wrapped = _wrap(model, world, device)
    sampler = StepSampler(len(dataset), loop, world, start, shuffle=getattr(dataset, "shuffle", True), end_step=end)
    # its own generator: a loader draws its workers' base seed when iterated, which from the global RNG
    # would shift a resumed run's random stream (noise, dropout) by one draw against an unbroken run's
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=loop.num_workers,
                        generator=torch.Generator().manual_seed(loop.seed + start))  # fmt: skip
    log = MetricsLog(run_dir, loop, world, start, replaces)
    if start == 0:
        log.skipped(0, list(read_skips))
    t0, seen, skipped_before, micro, loss_sum = time.perf_counter(), 0, progress.skipped, 0, 0.0

    def check_trained() -> None:
        """Refuse to go on, or to save, once every sample read so far was skipped."""
        if seen == 0 and (progress.skipped - skipped_before >= len(dataset) or progress.step == end):
            steps = f"step {start + 1}" if progress.step == start + 1 else f"steps {start + 1}-{progress.step}"
            raise VlkitError(
                f"every sample read in {steps} was skipped as bad ({progress.skipped - skipped_before} skipped, "
                f"listed in {log.skips}); nothing was trained, so no checkpoint was saved"
            )

    def save() -> Path | None:
        check_trained()
        weights, optimizer_state = full_state(model, optimizer)  # every rank: FSDP gathers onto the main one
        rng, saved = _rng_states(world), None
        if world.is_main:
            for name in exports:  # renamed away in one step, then removed: never left half there
                stale = run_dir / f".{name}.stale"
                if (run_dir / name).exists():
                    os.replace(run_dir / name, stale)
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                elif stale.exists():
                    stale.unlink()
            state = _training_state(optimizer_state, scheduler, progress, rng)
            saved = save_checkpoint(run_dir, progress.step, model, model_type, state, loop.keep_checkpoints, weights)
            if log.pending and recipe is not None:
                write_json(run_dir / "recipe.json", recipe)
            log.commit()
        world.barrier()  # no rank reads the run folder (a resume, a next stage) before the checkpoint is there
        return saved

    try:
        for batch in loader:
            skips = batch.pop("skipped", [])
            progress.skipped += len(skips)
            log.skipped(progress.step + 1, skips)
            rows = batch.pop("rows", None)  # the samples a split batch's parts came from
            parts = batch_parts(batch)
            if parts:
                sync = micro == loop.grad_accum - 1  # the step's last micro-batch
                parts = [({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in part.items()}, weight)
                         for part, weight in parts]  # fmt: skip
                loss_sum += _backward(wrapped, parts, loop, device, sync, world.distributed)
                n = rows or sum(part["input_ids" if "input_ids" in part else "pixel_values"].shape[0] for part, _ in parts)
                seen += n * world.world_size
                log.samples(n * world.world_size)
            micro += 1
            if micro < loop.grad_accum:
                continue
            _optimizer_step(model, optimizer, scheduler, optim.grad_clip, after_step)
            progress.step, micro = progress.step + 1, 0
            check_trained()
            if progress.step == loop.unfreeze_at and loop.freeze:
                freeze(model, loop.freeze, frozen=False)
                wrapped = _wrap(model, world, device)
            progress.elapsed = elapsed_before + time.perf_counter() - t0
            log.step(model, progress, loss_sum, scheduler.get_last_lr()[0], progress.step == end)
            loss_sum = 0.0
            if loop.save_every and progress.step % loop.save_every == 0 and progress.step < end:
                save()
    finally:
        log.bar.close()
    final = save()
    return {"steps": progress.step, "samples": seen, "train_seconds": progress.elapsed, "skipped": progress.skipped,
            "checkpoint": str(final) if final else None}  # fmt: skip


def batch_parts(batch: dict) -> list[tuple[dict, float]]:
    """A collated batch as ``(part, weight)`` pairs: the parts a collate split it into (``batch["parts"]``,
    popped), else the batch whole; none for an empty one."""
    parts = batch.pop("parts", None)
    return parts if parts is not None else [(batch, 1.0)] if batch else []


def _backward(wrapped: torch.nn.Module, parts: list[tuple[dict, float]], loop: LoopConfig, device: torch.device,
              sync: bool, distributed: bool) -> float:  # fmt: skip
    """Forward and backward one micro-batch, part by part (each loss times its weight: a collate that
    splits a batch by length weighs each part by its share of the batch's loss); DDP and FSDP sync
    gradients only on the last part of a step (``sync``: this micro-batch is its last)."""
    total = 0.0
    for i, (part, weight) in enumerate(parts):
        local = distributed and not (sync and i == len(parts) - 1)
        with local_gradients(wrapped) if local else contextlib.nullcontext():
            with autocast(loop.precision, device):
                out = wrapped(**part)
                loss = getattr(out, "loss", out) * weight / loop.grad_accum
            loss.backward()
        total += loss.item()
    return total


def _optimizer_step(model: torch.nn.Module, optimizer, scheduler, grad_clip: float, after_step) -> None:
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if after_step is not None:
        after_step(model)
