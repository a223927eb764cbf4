"""`vlkit train vlm` under torchrun: two CPU processes (gloo) run the same loop. Under DDP frozen
parts stay as loaded, the trained parts move, and batches without images (which leave the
connector unused on a rank) do not stall the gradient sync; under FSDP a step equals DDP's, and
text-only records are left out (every rank must run the sharded tower)."""

from __future__ import annotations

import json
import os
import socket
import sys

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
    # gloo's threads can abort the interpreter's teardown ("terminate called without an active exception",
    # seen once in CI as SIGABRT after the run had finished); the run is written, so leave without it
    os._exit(0)


def run(r: dict, out) -> None:
    mp.spawn(worker, args=(_free_port(), r, str(out)), nprocs=WORLD_SIZE, join=True)


def cli_worker(rank: int, port: int, recipe_file: str, out: str) -> None:
    """``vlkit train vlm`` as torchrun runs it on each rank."""
    os.environ.update(WORLD_SIZE=str(WORLD_SIZE), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from vlkit.cli import main

    main(["train", "vlm", "--recipe", recipe_file, "--out", out])
    sys.stdout.flush()  # os._exit (see worker) drops what is buffered
    os._exit(0)


def latest(run_dir) -> dict[str, torch.Tensor]:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))


TEXT_ONLY = [{**RECORDS[2], "id": f"text{k}"} for k in range(4)]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    lm = lm_folder(root / "lmf")
    data = llava_folder(root / "data", [*RECORDS, *TEXT_ONLY])
    run(recipe(lm, data, stage=1, steps=2, loop={"batch_size": 4}, data={"bucket_window": 0}), root / "s1")
    return root, lm, data


@pytest.mark.slow
def test_both_stages_train_under_ddp(stage1):
    root, lm, data = stage1
    first = latest(root / "s1")
    start = load_file(str(lm / "model.safetensors"))
    assert all(torch.equal(first[f"lm.{k}"], v) for k, v in start.items())
    stage2 = recipe(lm, data, stage=2, steps=3, init_from=str(root / "s1"), loop={"batch_size": 4},
                    data={"bucket_window": 2})  # text-only records fill whole micro-batches on a rank
    run(stage2, root / "s2")
    second = latest(root / "s2")
    assert any(not torch.equal(second[k], first[k]) for k in first if k.startswith("lm."))
    assert all(torch.equal(second[k], first[k]) for k in first if k.startswith("vision."))
    assert (root / "s2" / "model" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("lm_mode", ["full", "lora"])
def test_fsdp_steps_equal_ddp_steps(stage1, tmp_path, lm_mode):
    root, lm, _ = stage1
    images = llava_folder(tmp_path / "data", [r for r in RECORDS if "image" in r], repeat=2)
    r = recipe(lm, images, stage=2, steps=2, init_from=str(root / "s1"), loop={"batch_size": 4, "parallel": "fsdp"},
               train={"lm": lm_mode})
    run(r, tmp_path / "fsdp")
    r["loop"]["parallel"] = "ddp"
    run(r, tmp_path / "ddp")
    a, b = latest(tmp_path / "fsdp"), latest(tmp_path / "ddp")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # measured 2.5e-7
    assert (tmp_path / "fsdp" / "model" / "config.json").is_file()


@pytest.mark.slow
def test_fsdp_leaves_text_only_records_out(stage1, tmp_path, capfd):
    root, lm, data = stage1
    run(recipe(lm, data, stage=2, steps=2, init_from=str(root / "s1"), loop={"batch_size": 4, "parallel": "fsdp"}),
        tmp_path / "fsdp")
    assert "left out 5 records without images: under FSDP every rank runs the sharded tower" in capfd.readouterr().out
    assert (tmp_path / "fsdp" / "model" / "config.json").is_file()


@pytest.mark.slow
def test_length_groups_under_ddp_take_the_whole_batchs_steps(stage1, tmp_path):
    """Each rank runs its micro-batch as length-sorted parts and syncs on the last: the steps are those
    of whole micro-batches."""
    root, lm, _ = stage1
    images = llava_folder(tmp_path / "data", [r for r in RECORDS if "image" in r], repeat=2)
    r = recipe(lm, images, stage=2, steps=2, init_from=str(root / "s1"), loop={"batch_size": 8}, data={"bucket_window": 0},
               train={"loss": "answer"})  # fmt: skip
    run(r, tmp_path / "whole")
    r["data"]["length_groups"] = 2
    run(r, tmp_path / "parts")
    a, b = latest(tmp_path / "whole"), latest(tmp_path / "parts")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert any(not torch.equal(a[k], v) for k, v in latest(root / "s1").items() if k.startswith("lm."))


@pytest.mark.slow
def test_the_command_under_torchrun_reports_once(stage1, tmp_path, capfd):
    """Every rank trains; only rank 0 prints the run's summary and what it wrote."""
    root, lm, data = stage1
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(recipe(lm, data, stage=2, steps=2, init_from=str(root / "s1"), loop={"batch_size": 4})))
    mp.spawn(cli_worker, args=(_free_port(), str(recipe_file), str(tmp_path / "run")), nprocs=WORLD_SIZE, join=True)
    out = capfd.readouterr().out
    summaries = [line for line in out.splitlines() if line.startswith('{"steps": 2')]
    assert len(summaries) == 1 and json.loads(summaries[0])["checkpoint"] is not None
    assert out.count(f"wrote {tmp_path / 'run'}: the model at") == 1
