"""The contrastive losses under torch.distributed: two CPU processes (gloo) each holding half of
a global batch give the single-process loss and, after DDP's gradient averaging, its gradients."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vlkit.losses import clip_loss, siglip_loss

WORLD_SIZE = 2
BATCH = 8
DIM_IN, DIM_OUT = 6, 5


def make_problem():
    """A global batch of inputs and two tiny linear towers producing features, seeded."""
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(BATCH, DIM_IN, generator=g), torch.randn(BATCH, DIM_IN, generator=g)
    image_tower, text_tower = torch.nn.Linear(DIM_IN, DIM_OUT), torch.nn.Linear(DIM_IN, DIM_OUT)
    with torch.no_grad():
        for p in [*image_tower.parameters(), *text_tower.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g))
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    bias = torch.nn.Parameter(torch.tensor(-2.0))
    return images, texts, image_tower, text_tower, scale, bias


def loss_and_grads(kind: str, images: torch.Tensor, texts: torch.Tensor, problem) -> dict[str, torch.Tensor]:
    """The loss on ``images``/``texts`` with gradients w.r.t. every parameter and both inputs."""
    _, _, image_tower, text_tower, scale, bias = problem
    images, texts = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    image_features = F.normalize(image_tower(images), dim=-1)
    text_features = F.normalize(text_tower(texts), dim=-1)
    if kind == "softmax":
        loss = clip_loss(image_features, text_features, scale.exp())
    else:
        loss = siglip_loss(image_features, text_features, scale.exp(), bias)
    params = {"scale": scale, "bias": bias}
    params |= {f"image.{k}": v for k, v in image_tower.named_parameters()}
    params |= {f"text.{k}": v for k, v in text_tower.named_parameters()}
    for p in params.values():
        p.grad = None
    loss.backward()
    out = {"loss": loss.detach(), "images.grad": images.grad, "texts.grad": texts.grad}
    for name, p in params.items():
        out[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return out


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        problem = make_problem()
        images, texts = problem[0], problem[1]
        half = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        for kind in ("softmax", "sigmoid"):
            result = loss_and_grads(kind, images[half], texts[half], problem)
            gathered = {}
            for name, value in result.items():
                value = value.clone()
                if name.endswith("images.grad") or name.endswith("texts.grad"):
                    parts = [torch.empty_like(value) for _ in range(WORLD_SIZE)]
                    dist.all_gather(parts, value)
                    gathered[name] = torch.cat(parts) / WORLD_SIZE
                else:  # the loss and parameter gradients, averaged as DDP averages them
                    dist.all_reduce(value)
                    gathered[name] = value / WORLD_SIZE
            if rank == 0:
                save_file({k: v.contiguous() for k, v in gathered.items()}, str(Path(out_dir) / f"{kind}.safetensors"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # gloo's threads can abort the interpreter's teardown ("terminate called without an
    # active exception"); the results are written, so leave without running it.
    os._exit(0)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD_SIZE, join=True)
    return {kind: load_file(str(out / f"{kind}.safetensors")) for kind in ("softmax", "sigmoid")}


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_two_ranks_match_one_process(two_rank_results, kind):
    problem = make_problem()
    single = loss_and_grads(kind, problem[0], problem[1], problem)
    assert not dist.is_initialized()
    distributed = two_rank_results[kind]
    assert distributed.keys() == single.keys()
    for name, value in single.items():
        assert value.abs().sum() > 0 or name == "bias", f"{name}: zero gradient proves nothing"
        torch.testing.assert_close(distributed[name], value, atol=1e-5, rtol=1e-5, msg=f"{kind} {name}")


def test_local_loss_alone_is_not_the_global_loss():
    """Each half scored only against itself differs from the global loss (what gathering fixes)."""
    problem = make_problem()
    images, texts = problem[0], problem[1]
    whole = loss_and_grads("softmax", images, texts, problem)["loss"]
    halves = [loss_and_grads("softmax", images[s], texts[s], problem)["loss"] for s in (slice(0, 4), slice(4, 8))]
    assert not torch.allclose(sum(halves) / 2, whole, atol=1e-3)


def test_single_process_losses_never_initialise_torch_distributed():
    features = F.normalize(torch.randn(4, 3), dim=-1)
    clip_loss(features, features, torch.tensor(10.0))
    siglip_loss(features, features, torch.tensor(10.0), torch.tensor(-5.0))
    assert not dist.is_initialized()
