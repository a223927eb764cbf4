"""Distributed set-up from torchrun's environment (a single process never touches
torch.distributed), FSDP2 sharding, and whole state dicts for checkpoints however a model is spread."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from vlkit.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def is_main_process() -> bool:
    """A single process, or torchrun's rank 0: the one that reports a run (every rank trains it)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup() -> World:
    """Join the process group when launched by torchrun with more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(rank, world_size, local_rank)


def teardown(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


PARALLEL = ("ddp", "fsdp")
"""How a multi-process run spreads the model: DDP keeps a whole copy per rank; FSDP2 shards the
parameters, gradients and optimizer state over the ranks (for models that do not fit one device)."""


def shard(model: torch.nn.Module) -> None:
    """FSDP2 (``fully_shard``) in place: each layer of every layer stack (``nn.ModuleList``: the
    transformer blocks) its own unit, gathered only while it runs, then the root for the rest.
    The optimizer must be built afterwards, on the sharded parameters. FSDP2 cannot shard scalar
    parameters (CLIP's temperature): such a model is refused by name (DDP trains it)."""
    from torch.distributed.fsdp import fully_shard

    if scalars := [name for name, p in model.named_parameters() if p.ndim == 0]:
        raise ConfigError(f"loop.parallel: FSDP2 cannot shard the scalar parameter(s) {scalars} of the "
                          f"{type(model).__name__}; train it with loop.parallel=ddp", ("loop.parallel",))

    for stack in [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]:
        for block in stack:
            if any(True for _ in block.parameters()):
                fully_shard(block)
    fully_shard(model)


def is_sharded(model: torch.nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def local_gradients(wrapped: torch.nn.Module):
    """Accumulate gradients without syncing them (all micro-batches of a step but the last):
    DDP's ``no_sync``, FSDP2's gradient sync switched off."""
    if is_sharded(wrapped):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        with wrapped.no_sync():
            yield


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``(model state dict, optimizer state dict)`` whole, as an unsharded model gives them
    (optimizer parameters by index), so a checkpoint reads the same however it was trained.
    A sharded model gathers them onto the main rank (the others get empty dicts): every rank
    must call this."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_full_options())
    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not by_name:
        return weights, {}
    index = {name: i for i, name in enumerate(_names(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return weights, {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict) -> None:
    """Load what :func:`full_state` gave (every rank passes the whole state; a sharded model keeps
    its own shards of it)."""
    if not is_sharded(model):
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=whole)
    names = _names(model, optimizer)
    if len(names) != sum(len(g["params"]) for g in optim_state["param_groups"]):
        raise ValueError(f"the optimizer state holds {sum(len(g['params']) for g in optim_state['param_groups'])} "
                         f"parameters; this model's optimizer has {len(names)}")
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]
    state = {names[int(i)]: s for i, s in optim_state["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=whole)


def _names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters' names in the model, in ``optimizer.state_dict()``'s index order."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
