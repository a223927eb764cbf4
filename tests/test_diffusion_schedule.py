"""The noise schedule and the DDIM step give diffusers' numbers for the same config and model output."""

import pytest
import torch

from vlkit.errors import VlkitError
from vlkit.models.diffusion_schedule import NoiseSchedule, ScheduleConfig

diffusers = pytest.importorskip("diffusers")

CONFIGS = [
    dict(beta_schedule="linear", prediction_type="epsilon", timestep_spacing="leading", steps_offset=1),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
         timestep_spacing="linspace", clip_sample=False, set_alpha_to_one=False),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="leading",
         num_train_timesteps=300, clip_sample_range=0.8),
]  # fmt: skip


@pytest.mark.parametrize("kw", CONFIGS)
def test_training_side_matches_ddpm_scheduler(kw):
    ours = NoiseSchedule(ScheduleConfig(**kw))
    ref = diffusers.DDPMScheduler(**{k: v for k, v in kw.items() if k != "set_alpha_to_one"})
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 3, 8, 8, generator=g)
    t = torch.tensor([0, 7, 150, 299, ours.cfg.num_train_timesteps - 1])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    want = noise if kw["prediction_type"] == "epsilon" else ref.get_velocity(x0, noise, t)
    torch.testing.assert_close(ours.target(x0, noise, t), want)


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("steps", [1, 7, 50])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_timesteps_and_step_match_ddim_scheduler(kw, steps, eta):
    ours, ref = NoiseSchedule(ScheduleConfig(**kw)), diffusers.DDIMScheduler(**kw)
    ref.set_timesteps(steps)
    assert ours.timesteps(steps) == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(2, 3, 8, 8, generator=g)
    for t in ours.timesteps(steps):
        output = 2.0 * torch.randn(2, 3, 8, 8, generator=g)  # large enough that clip_sample clamps some of x0
        noise = torch.randn(2, 3, 8, 8, generator=g)
        prev, x0 = ours.step(output, t, x, steps, eta=eta, noise=noise)
        want = ref.step(output, t, x, eta=eta, variance_noise=noise)
        torch.testing.assert_close(x0, want.pred_original_sample)
        torch.testing.assert_close(prev, want.prev_sample)
        x = prev


def test_bad_step_counts_are_named():
    s = NoiseSchedule(ScheduleConfig(num_train_timesteps=100))
    for steps in (0, -3, 101):
        with pytest.raises(VlkitError, match="sampling steps"):
            s.timesteps(steps)
    with pytest.raises(VlkitError, match="noise"):
        s.step(torch.zeros(1, 3, 4, 4), 50, torch.zeros(1, 3, 4, 4), 10, eta=0.5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_weight_caps_the_x0_weight_at_gamma(prediction):
    s = NoiseSchedule(ScheduleConfig(prediction_type=prediction))
    t = torch.arange(0, 1000, 37)
    a = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod[t]
    on_x0 = a / (1 - a) + (1.0 if prediction == "v_prediction" else 0.0)  # what an ε/v loss weighs x0's error by
    torch.testing.assert_close(s.loss_weight(t, 5.0), torch.minimum(on_x0, torch.tensor(5.0)) / on_x0)
    assert s.loss_weight(t, 0.0).eq(1).all()
    noisy = on_x0 <= 5
    assert noisy.any() and (~noisy).any()
    assert s.loss_weight(t, 5.0)[noisy].eq(1).all() and s.loss_weight(t, 5.0)[~noisy].lt(1).all()
