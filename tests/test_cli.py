"""The command line end to end on a small shapes export: data → train → eval → embed."""

from __future__ import annotations

import json

import numpy as np
import pytest

import vlkit.demo as demo
from vlkit.cli import main

TINY = [
    "--model.vision.width=32", "--model.vision.depth=1", "--model.vision.num_heads=2", "--model.vision.patch_size=16",
    "--model.vision.stem_channels=[8]", "--model.text.width=32", "--model.text.depth=1", "--model.text.num_heads=2",
    "--model.embed_dim=32", "--loop.steps=2", "--loop.batch_size=8", "--optim.warmup_steps=1",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["data", "shapes", "--out", str(root / "data"), "-n", "60"]) == 0
    run = root / "run"
    code = main(["train", "clip", "--recipe", "recipes/clip_shapes.yaml", "--out", str(run),
                 f"--data.source={root / 'data' / 'captions'}", *TINY])
    assert code == 0
    return root


def test_train_writes_a_loadable_run(workspace):
    run = workspace / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == 2
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert {p.name for p in (run / "checkpoints" / latest).iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "training_state"
    }


def test_eval_zeroshot_and_retrieval_write_results(workspace):
    out = workspace / "eval"
    assert main(["eval", "zeroshot", "--model", str(workspace / "run"), "--data",
                 str(workspace / "data" / "classification"), "--out", str(out / "zs"), "--precision", "fp32"]) == 0
    zs = json.loads((out / "zs" / "results.json").read_text())
    assert 0.0 <= zs["zeroshot_top1"] <= zs["zeroshot_top5"] <= 1.0
    assert len((out / "zs" / "predictions.jsonl").read_text().splitlines()) == 60
    assert main(["eval", "retrieval", "--model", str(workspace / "run"), "--data",
                 str(workspace / "data" / "captions"), "--out", str(out / "rt")]) == 0
    rt = json.loads((out / "rt" / "results.json").read_text())
    assert rt["i2t_r1"] <= rt["i2t_r5"] <= rt["i2t_r10"] and rt["t2i_r1"] <= rt["t2i_r10"]
    rows = [json.loads(line) for line in (out / "rt" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == sum(len(json.loads(r)["captions"]) for r in
                            (workspace / "data" / "captions" / "captions.jsonl").read_text().splitlines())
    assert sum(r["top1_correct"] for r in rows) / len(rows) == pytest.approx(rt["t2i_r1"])
    for task, png in (("zs", "confusion.png"), ("rt", "recall.png")):
        assert png in (out / task / "report.md").read_text() and (out / task / png).stat().st_size > 1000


def test_embed_images_and_texts(workspace, tmp_path):
    images = workspace / "data" / "captions" / "images"
    assert main(["embed", "--model", str(workspace / "run"), "--images", str(images), "--out", str(tmp_path / "i.npy")]) == 0
    assert main(["embed", "--model", str(workspace / "run"), "--texts", "a red star", "two objects",
                 "--out", str(tmp_path / "t.npy")]) == 0
    emb_i, emb_t = np.load(tmp_path / "i.npy"), np.load(tmp_path / "t.npy")
    assert emb_i.shape == (60, 32) and emb_t.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(emb_t, axis=1), 1.0, rtol=1e-5)


def test_a_folder_of_images_passes_over_hidden_files_as_the_index_does(workspace, tmp_path):
    import shutil

    source = sorted((workspace / "data" / "captions" / "images").iterdir())[0]
    folder = tmp_path / "photos"
    for name in ("a.png", "sub/b.png", ".hidden.png", ".cache/c.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / name)
    assert main(["embed", "--model", str(workspace / "run"), "--images", str(folder), "--out", str(tmp_path / "i.npy")]) == 0
    assert np.load(tmp_path / "i.npy").shape == (2, 32)


def test_bad_override_is_a_clear_error(workspace, capsys):
    code = main(["train", "clip", "--recipe", "recipes/clip_shapes.yaml", "--out", str(workspace / "bad"),
                 "--model.vision.nonsense=3"])
    assert code == 2
    assert "nonsense" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out  # every part's time, measured on stand-ins, before the first trains
    assert all(printed.index(f"[demo] {p}: about ") < printed.index("[demo] clip: training") for p in demo.PARTS)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("zeroshot_top1", "t2i_r1", "i2t_r1", "train_seconds"):
        assert key in metrics["clip"]
    for key in ("zeroshot_top1", "t2i_r1", "i2t_r1"):
        assert 0.0 <= metrics["clip"][key] <= 1.0
    assert all(demo.plan(out, [p]) == [p] for p in demo.PARTS)  # every part left a folder a later --parts run reuses
    report = (out / "report.md").read_text()
    for png in ("clip_loss.png", "clip_retrieval.png", "clip_confusion.png"):
        assert (out / "figures" / png).stat().st_size > 1000 and png in report
