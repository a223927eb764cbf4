"""Text-to-image diffusion: training through the loop (exact resume with the EMA), guided and
seeded sampling, the commands and their bad input, with tiny random CLIPs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vlkit
from _diffusion_util import CONTEXT, TINY, tiny_clip
from vlkit.cli import main
from vlkit.data.pairs import Collate
from vlkit.data.shapes import BACKGROUND, ShapesWorld
from vlkit.errors import VlkitError
from vlkit.models.diffusion import TextToImage
from vlkit.train.checkpoint import latest_checkpoint
from vlkit.train.clip import shapes_processor
from vlkit.train.diffusion import ShapesCaptions, WeightedCollate, load_recipe, train_diffusion


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def train(out: Path, clip_dir: Path, *extra: str) -> int:
    return main(["train", "diffusion", "--out", str(out), f"--text_encoder={clip_dir}", *TINY, *extra])


@pytest.fixture(scope="module")
def run(clip_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("t2i") / "run"
    assert train(out, clip_dir) == 0
    return out


@pytest.fixture(scope="module")
def model(run) -> TextToImage:
    return vlkit.load(run)


def test_trained_folder_loads_with_the_frozen_clip_text_tower(run, model, clip_dir):
    assert isinstance(model, TextToImage)
    clip = vlkit.load(clip_dir)
    for k, v in clip.text.state_dict().items():
        torch.testing.assert_close(model.text.state_dict()[k], v, rtol=0, atol=0)  # frozen: unchanged by training
    assert model.tokenizer.vocab_size == clip.tokenizer.vocab_size
    assert model.cfg.text_source == str(clip_dir.resolve())
    assert int(model.ema_updates) == 3
    assert any(not torch.equal(e, p) for e, p in zip(model.ema.parameters(), model.unet.parameters()))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


def test_resume_is_exact_including_the_ema(clip_dir, tmp_path):
    recipe = lambda: load_recipe({}, [f"--text_encoder={clip_dir}", *TINY, "--loop.steps=4"])  # noqa: E731
    train_diffusion(recipe(), tmp_path / "straight")
    train_diffusion(recipe(), tmp_path / "resumed", stop_at=2)
    train_diffusion(recipe(), tmp_path / "resumed", resume=True)
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "resumed") / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a) and "ema_updates" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_training_loss_is_the_weighted_mean_squared_error(model):
    """The loss, recomputed from the same draws: per-row MSE against v, weighted by min-SNR-γ."""
    m = copy.deepcopy(model).train()
    m.cfg.snr_gamma = 2.0
    x0 = torch.rand(6, 3, m.cfg.image_size, m.cfg.image_size) * 2 - 1
    tok = m.tokenize(["a red circle"] * 6)
    torch.manual_seed(5)
    loss = m(x0, tok["input_ids"], tok["attention_mask"])
    torch.manual_seed(5)
    t = torch.randint(0, m.cfg.schedule.num_train_timesteps, (6,))
    noise, drop = torch.randn_like(x0), torch.rand(6) < m.cfg.cond_drop
    context, mask, pooled = m.encode_text(tok["input_ids"], tok["attention_mask"])
    out = m.unet(m.schedule.add_noise(x0, noise, t), t, context, mask, pooled, drop)
    a = m.schedule.alphas_cumprod[t]
    on_x0 = a / (1 - a) + 1
    per_row = (out - (a.sqrt()[:, None, None, None] * noise - (1 - a).sqrt()[:, None, None, None] * x0)).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(loss, (per_row * on_x0.clamp(max=2.0) / on_x0).mean())


def test_pixel_weights_give_each_image_a_weighted_mean(model):
    """With ``pixel_weights`` the per-row error is Σ w e² / Σ w over pixels (channels averaged);
    uniform weights give the plain loss back."""
    m = copy.deepcopy(model).train()
    size = m.cfg.image_size
    x0 = torch.rand(4, 3, size, size) * 2 - 1
    tok = m.tokenize(["a red circle"] * 4)
    weights = 1 + 3 * (torch.rand(4, size, size) < 0.2).float()
    losses = {}
    for name, w in {"plain": None, "uniform": torch.full((4, size, size), 2.5), "weighted": weights}.items():
        torch.manual_seed(7)
        losses[name] = m(x0, tok["input_ids"], tok["attention_mask"], pixel_weights=w)
    torch.manual_seed(7)
    t = torch.randint(0, m.cfg.schedule.num_train_timesteps, (4,))
    noise, drop = torch.randn_like(x0), torch.rand(4) < m.cfg.cond_drop
    context, mask, pooled = m.encode_text(tok["input_ids"], tok["attention_mask"])
    out = m.unet(m.schedule.add_noise(x0, noise, t), t, context, mask, pooled, drop)
    err = (out - m.schedule.target(x0, noise, t)).pow(2).mean(1)
    per_row = (err * weights).sum((1, 2)) / weights.sum((1, 2))
    torch.testing.assert_close(losses["weighted"], (per_row * m.schedule.loss_weight(t, m.cfg.snr_gamma)).mean())
    torch.testing.assert_close(losses["uniform"], losses["plain"])
    assert not torch.isclose(losses["weighted"], losses["plain"])


def test_object_weight_marks_exactly_the_objects_pixels(clip_dir, tmp_path):
    """Each pixel of the rendered scene off the background weighs ``1 + object_weight``, every
    background pixel 1; the collate stacks the weights and training runs with them."""
    world = ShapesWorld(16, 1, 2, 0)
    data = ShapesCaptions(world, shapes_processor(16), 4, object_weight=3.0)
    batch = WeightedCollate(vlkit.load(clip_dir).tokenizer)([data[i] for i in range(4)])
    assert batch["pixel_weights"].shape == (4, 16, 16) and batch["pixel_values"].shape == (4, 3, 16, 16)
    for i in range(4):
        image = np.asarray(world.scene(i).render())
        objects = (image != BACKGROUND).any(-1)
        assert 0 < objects.sum() < objects.size
        expected = torch.from_numpy(np.where(objects, 4.0, 1.0)).float()
        torch.testing.assert_close(batch["pixel_weights"][i], expected, rtol=0, atol=0)
    assert "pixel_weights" not in Collate(vlkit.load(clip_dir).tokenizer)([ShapesCaptions(world, shapes_processor(16), 4)[0]])
    assert train(tmp_path / "weighted", clip_dir, "--data.object_weight=1") == 0


def test_ema_update_warms_up_then_decays_at_the_configured_rate(model):
    m = TextToImage(model.cfg)
    p, e = next(m.unet.parameters()), next(m.ema.parameters())
    with torch.no_grad():
        p.fill_(1.0), e.fill_(0.0)
    m.update_ema()  # n = 1: decay (1 + 1) / (10 + 1)
    torch.testing.assert_close(e, torch.full_like(e, 1 - 2 / 11))
    m.ema_updates.fill_(100_000)
    with torch.no_grad():
        e.fill_(0.0)
    m.update_ema()
    torch.testing.assert_close(e, torch.full_like(e, 1 - m.cfg.ema_decay))


def test_sampling_is_seeded_and_each_image_independent_of_its_batch(model):
    prompts = ["a red circle", "a blue square to the left of a green star", "a large white diamond"]
    a = model.generate(prompts, guidance=3.0, steps=4, seed=5)
    assert a.shape == (3, 3, 16, 16) and a.abs().max() <= 1
    torch.testing.assert_close(model.generate(prompts, guidance=3.0, steps=4, seed=5), a, rtol=0, atol=0)
    alone = model.generate([prompts[2]], guidance=3.0, steps=4, seed=7)  # image 2 of seed 5 starts from seed 7's noise
    torch.testing.assert_close(alone[0], a[2], rtol=1e-5, atol=1e-5)  # also: the longer prompt's padding is masked
    assert not torch.allclose(model.generate(prompts, guidance=3.0, steps=4, seed=6), a)
    noisy = model.generate(prompts[:2], steps=3, eta=1.0, seed=2)  # DDIM's eta noise comes from each image's seed too
    torch.testing.assert_close(model.generate(prompts[1:2], steps=3, eta=1.0, seed=3)[0], noisy[1], rtol=1e-5, atol=1e-5)


def test_guidance_mixes_the_unconditional_and_conditional_predictions(model):
    torch.manual_seed(0)
    net, x, t = model.ema, torch.randn(2, 3, 16, 16), 40
    with torch.no_grad():  # a non-zero output layer, so the prediction depends on the input
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens = model.tokenize(["a red circle", "two shapes: a blue star and a white square"])
    context, mask, pooled = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    ts = torch.full((2,), t)
    with torch.no_grad():
        cond = net(x, ts, context, mask, pooled)
        uncond = net(x, ts, context, mask, pooled, drop=torch.ones(2, dtype=torch.bool))
        other = net(x, ts, context.flip(0), mask.flip(0), pooled.flip(0), drop=torch.ones(2, dtype=torch.bool))
        guided = model._guided(net, x, t, context, mask, pooled, 4.0)
        plain = model._guided(net, x, t, context, mask, pooled, 1.0)
    torch.testing.assert_close(uncond, other)  # a dropped condition is the null one, whatever the prompt
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain, cond)


def test_bad_prompts_and_settings_are_named(model):
    with pytest.raises(VlkitError, match="prompt 1 is empty"):
        model.generate(["a red circle", "  "], steps=2)
    with pytest.raises(VlkitError, match="no prompts"):
        model.generate([], steps=2)
    for guidance in (-1, float("nan"), float("inf")):  # NaN and inf drew black images
        with pytest.raises(VlkitError, match="guidance must be a finite number of at least 0"):
            model.generate(["a red circle"], guidance=guidance, steps=2)
    with pytest.raises(VlkitError, match="eta must be a finite number of at least 0"):
        model.generate(["a red circle"], eta=float("nan"), steps=2)
    with pytest.raises(VlkitError, match="steps must be at least 1"):
        model.generate(["a red circle"], steps=0)
    long = " ".join(["a red circle"] * 12)
    with pytest.warns(UserWarning, match=f"longer than the text tower's {CONTEXT} tokens; truncated"):
        out = model.generate([long], steps=2)
    assert out.shape == (1, 3, 16, 16)


def test_generate_command_writes_a_grid(run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", str(run), "a red circle", "a blue star", "-n", "3", "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 18 + 2, 2 * 18 + 2)  # 3 columns, 2 rows of 16-pixel images, 2 pixels apart
    assert "wrote" in capsys.readouterr().out


def test_generate_command_warns_of_truncation(run, tmp_path, capsys):
    long = " ".join(["a red circle"] * 12)
    assert main(["generate", "--model", str(run), long, "-n", "1", "--steps", "1", "--out", str(tmp_path / "g.png")]) == 0
    assert "vlkit: warning: prompt" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["", "-n", "1"], "prompt 0 is empty"),
        (["a red circle", "--guidance", "-0.5"], "guidance must be a finite number of at least 0"),
        (["a red circle", "--guidance", "nan"], "guidance must be a finite number of at least 0"),
        (["a red circle", "--out", "afile/grid.png"], "afile is a file; expected a folder there"),
        (["a red circle", "--out", "grid.txt"], "ending in .png or .jpg"),
    ],
)
def test_generate_command_bad_input(run, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    assert main(["generate", "--model", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err


@pytest.mark.parametrize("flag, value", [("-n", "0"), ("-n", "-2"), ("--steps", "0")])
def test_generate_command_refuses_counts_below_one(run, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(run), "a red circle", flag, value])
    assert exc.value.code == 2 and "expected a whole number of at least 1" in capsys.readouterr().err


def test_a_folder_that_is_not_a_diffusion_model_is_refused(clip_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(clip_dir), "a red circle", "--out", str(tmp_path / "g.png")]) == 2
    assert "not a text-to-image diffusion model" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nothing"), "a red circle", "--out", str(tmp_path / "g.png")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_training_needs_an_existing_clip(tmp_path, capsys):
    assert train(tmp_path / "run", tmp_path / "no_clip") == 2
    assert "text_encoder" in capsys.readouterr().err


def test_eval_generation_writes_metrics_and_a_grid(run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "generation", "--model", str(run), "--samples", "4", "--steps", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("color_accuracy", "shape_accuracy", "attribute_accuracy", "relation_both_present"):
        assert 0 <= results[key] <= 1
    assert results["attribute_accuracy"] <= min(results["color_accuracy"], results["shape_accuracy"])
    assert 0 <= results["clip_score"] <= 100
    assert Image.open(out / "samples.png").size[0] == 8 * 18 + 2
    assert len((out / "prompts.txt").read_text().splitlines()) == 4 + 40
    assert results["seed"] == 0
    other = tmp_path / "validation"
    assert main(["eval", "generation", "--model", str(run), "--samples", "4", "--steps", "2", "--noise-seed", "7", "--out", str(other)]) == 0
    assert json.loads((other / "results.json").read_text())["seed"] == 7
    assert (other / "prompts.txt").read_text() == (out / "prompts.txt").read_text()
    assert Image.open(other / "samples.png").tobytes() != Image.open(out / "samples.png").tobytes()


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_sampling_with_an_oracle_denoiser_returns_the_data_point(model, monkeypatch, prediction):
    """With the exact prediction for a one-image data set, DDIM from pure noise lands on that image:
    each step reads the prediction at the timestep it was made for, and the last reaches ᾱ = 1."""
    cfg = copy.deepcopy(model.cfg)
    cfg.schedule.prediction_type = prediction
    m = TextToImage(cfg)
    m.tokenizer = model.tokenizer
    x0 = torch.rand(1, 3, 16, 16) * 1.6 - 0.8
    ac = m.schedule.alphas_cumprod

    def oracle(net, x, t, *args):
        eps = (x - ac[t].sqrt() * x0) / (1 - ac[t]).sqrt()
        return eps if prediction == "epsilon" else ac[t].sqrt() * eps - (1 - ac[t]).sqrt() * x0

    monkeypatch.setattr(m, "_guided", oracle)
    torch.testing.assert_close(m.generate(["a red circle"], steps=7, seed=1), x0, rtol=0, atol=1e-4)
