"""`vlkit train vlm` under DDP: two CPU processes (gloo) run the same loop; frozen parts stay as
loaded, the trained parts move, and batches without images (which leave the connector unused on
a rank) do not stall the gradient sync."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from _vlm_train_util import RECORDS, llava_folder, lm_folder, recipe

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, r: dict, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(WORLD_SIZE), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from vlkit.train.vlm import load_recipe, train_vlm

    train_vlm(load_recipe(r), out)


def run(r: dict, out) -> None:
    mp.spawn(worker, args=(_free_port(), r, str(out)), nprocs=WORLD_SIZE, join=True)


def latest(run_dir) -> dict[str, torch.Tensor]:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))


@pytest.mark.slow
def test_both_stages_train_under_ddp(tmp_path):
    lm = lm_folder(tmp_path / "lmf")
    data = llava_folder(tmp_path / "data", [*RECORDS, *[{**RECORDS[2], "id": f"text{k}"} for k in range(4)]])
    stage1 = recipe(lm, data, stage=1, steps=2, loop={"batch_size": 4}, data={"bucket_window": 0})
    run(stage1, tmp_path / "s1")
    first = latest(tmp_path / "s1")
    start = load_file(str(lm / "model.safetensors"))
    assert all(torch.equal(first[f"lm.{k}"], v) for k, v in start.items())
    stage2 = recipe(lm, data, stage=2, steps=3, init_from=str(tmp_path / "s1"), loop={"batch_size": 4},
                    data={"bucket_window": 2})  # text-only records fill whole micro-batches on a rank
    run(stage2, tmp_path / "s2")
    second = latest(tmp_path / "s2")
    assert any(not torch.equal(second[k], first[k]) for k in first if k.startswith("lm."))
    assert all(torch.equal(second[k], first[k]) for k in first if k.startswith("vision."))
    assert (tmp_path / "s2" / "model" / "config.json").is_file()
