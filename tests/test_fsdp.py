"""The training loop on two CPU processes (gloo): with ``loop.parallel=fsdp`` (FSDP2 shards every
decoder layer and the root) and with DDP, two optimizer steps with gradient accumulation give the
weights and optimizer state of one process training on the same global batches; an FSDP run
stopped after one step and resumed from its checkpoint ends there too. Each rank draws its own
random numbers (diffusion's noise), and a resumed run draws on each rank what it would have."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vlkit.errors import ConfigError
from vlkit.lm import LlamaConfig, LlamaLM
from vlkit.nn.lora import LoraConfig, add_lora
from vlkit.train.distributed import World, shard
from vlkit.train.loop import LoopConfig, OptimConfig, fit

WORLD_SIZE = 2
RUNS = ("ddp", "fsdp", "fsdp-resumed", "fsdp-lora")
LORA = LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])


class CausalLM(nn.Module):
    """A tiny Llama whose forward gives the next-token loss (every row the same length, so the
    mean of the ranks' losses is the global batch's)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
        self.lm = LlamaLM(self.cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=input_ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 61, (24, 10), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.ids[k % len(self.ids)]


def collate(rows):
    return {"input_ids": torch.stack(rows)}


def loop(parallel: str = "ddp") -> LoopConfig:
    return LoopConfig(steps=2, batch_size=8, grad_accum=2, precision="fp32", parallel=parallel, log_every=1)


OPTIM = OptimConfig(lr=3e-2, warmup_steps=0, grad_clip=0.5)


def train(out: Path, parallel: str = "ddp", world: World = World(), lora: bool = False, **kwargs) -> nn.Module:
    """Two steps into ``out``; with ``lora`` only adapters train (frozen and trained parameters
    share each FSDP unit)."""
    model = CausalLM()
    if lora:
        model.requires_grad_(False)
        add_lora(model, LORA)
    fit(model, Tokens(), collate, loop(parallel), OPTIM, out, "llama", world=world, **kwargs)
    return model


class Draws(CausalLM):
    """The tiny LM whose loss also draws random numbers, as a diffusion model's noise; it keeps them."""

    def __init__(self):
        super().__init__()
        self.drawn: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(input_ids.shape[0])
        self.drawn.append(noise)
        return super().forward(input_ids) + noise.mean() * 1e-3


def draws(out: Path, world: World, run: str, name: str, **kwargs) -> None:
    """Train :class:`Draws` into ``out / run`` and save what this rank drew as ``name``."""
    model = Draws()
    fit(model, Tokens(), collate, loop(), OPTIM, out / run, "llama", world=world, **kwargs)
    save_file({"drawn": torch.cat(model.drawn)}, str(out / f"{name}-rank{world.rank}.safetensors"))


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        out, world = Path(out_dir), World(rank, WORLD_SIZE, rank)
        train(out / "ddp", world=world)
        model = train(out / "fsdp", "fsdp", world)
        weight = model.lm.layers[0].attn.qkv.weight
        if rank == 0:  # evidence that the parameters were sharded, not replicated
            (out / "sharding.json").write_text(json.dumps({"type": type(weight).__name__, "global": list(weight.shape),
                                                           "local": list(weight.to_local().shape)}))
        train(out / "fsdp-resumed", "fsdp", world, stop_at=1)
        train(out / "fsdp-resumed", "fsdp", world, resume=True)
        train(out / "fsdp-lora", "fsdp", world, lora=True)
        draws(out, world, "draws", "draws")
        draws(out, world, "draws-resumed", "draws-stopped", stop_at=1)
        draws(out, world, "draws-resumed", "draws-resumed", resume=True)
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown; the results are written


def checkpoint(run: Path) -> tuple[dict, dict]:
    step = run / "checkpoints" / "step_00000002"
    return load_file(str(step / "model.safetensors")), load_file(str(step / "training_state" / "state.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(worker, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD_SIZE, join=True)
    train(out / "single")
    train(out / "single-lora", lora=True)
    return out


@pytest.mark.parametrize("run", RUNS)
def test_two_ranks_take_the_single_process_steps(runs, run):
    want_weights, want_state = checkpoint(runs / ("single-lora" if run.endswith("lora") else "single"))
    weights, state = checkpoint(runs / run)
    initial = CausalLM().state_dict()
    moved = {k: (want_weights[k] - initial[k]).abs().max() if k in initial else want_weights[k].abs().max() for k in want_weights}
    assert max(moved.values()) > 1e-2, "the steps must move the weights"
    if run.endswith("lora"):
        assert all(moved[k] == 0 for k in initial) and any("lora_B" in k and moved[k] > 0 for k in moved)
    ranks = {k for k in state if k.startswith("state.rng_ranks.")}  # rank 1's random stream: not in a single process
    assert weights.keys() == want_weights.keys() and state.keys() - ranks == want_state.keys() and ranks
    for key, value in want_weights.items():
        torch.testing.assert_close(weights[key], value, atol=2e-5, rtol=1e-4, msg=f"{run}: weight {key}")
    optimizer = [k for k in want_state if k.startswith("state.optimizer.")]
    assert any(k.endswith("exp_avg_sq") for k in optimizer)
    for key in optimizer:
        torch.testing.assert_close(state[key], want_state[key], atol=2e-5, rtol=1e-4, msg=f"{run}: optimizer state {key}")


def test_fsdp_shards_the_parameters(runs):
    seen = json.loads((runs / "sharding.json").read_text())
    assert seen == {"type": "DTensor", "global": [64, 32], "local": [32, 32]}


def test_scalar_parameters_are_refused_by_name():
    """FSDP2 cannot shard a 0-d parameter (CLIP's logit_scale); the loop says so before touching torch.distributed."""
    model = CausalLM()
    model.logit_scale = nn.Parameter(torch.tensor(2.0))
    with pytest.raises(ConfigError, match=r"loop.parallel: FSDP2 cannot shard the scalar parameter\(s\) \['logit_scale'\]"):
        shard(model)
    assert not dist.is_initialized()


def test_ranks_draw_their_own_random_numbers_and_resume_them(runs):
    """Rank 1 must not repeat rank 0's noise on its half of the batch; a run stopped after step 1 and
    resumed draws in step 2, on each rank, what the unbroken run drew."""
    drawn = {(name, r): load_file(str(runs / f"{name}-rank{r}.safetensors"))["drawn"]
             for name in ("draws", "draws-stopped", "draws-resumed") for r in range(WORLD_SIZE)}  # fmt: skip
    assert drawn["draws", 0].shape == (8,)  # 2 steps × 2 micro-batches × 2 rows
    assert (drawn["draws", 0] - drawn["draws", 1]).abs().min() > 0
    for r in range(WORLD_SIZE):
        torch.testing.assert_close(drawn["draws-stopped", r], drawn["draws", r][:4], rtol=0, atol=0)
        torch.testing.assert_close(drawn["draws-resumed", r], drawn["draws", r][4:], rtol=0, atol=0)
