"""The diffusion noise schedule: DDPM's forward process (noising, training targets) and the DDIM
sampling step. The maths follows diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` to the number
(``tests/test_diffusion_schedule.py`` checks it), so a config here means what it means there."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch

from vlkit.config import Bound, OneOf, PositiveFloat, PositiveInt, validate
from vlkit.errors import VlkitError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class ScheduleConfig:
    """diffusers' scheduler config keys and defaults, except where a pixel-space model on a small
    budget is better served: the cosine schedule (``squaredcos_cap_v2``: noise spread evenly over
    the steps instead of spent mostly at high noise for small images), v-prediction (see
    :mod:`vlkit.models.diffusion`) and ``trailing`` spacing, whose first DDIM step starts at the
    last training timestep, pure noise, as sampling must."""

    num_train_timesteps: PositiveInt = 1000
    beta_start: PositiveFloat = 0.0001
    beta_end: PositiveFloat = 0.02
    beta_schedule: Annotated[str, OneOf(BETA_SCHEDULES)] = "squaredcos_cap_v2"
    prediction_type: Annotated[str, OneOf(PREDICTIONS)] = "v_prediction"
    clip_sample: bool = True
    clip_sample_range: Annotated[float, Bound(0, low_open=True)] = 1.0
    set_alpha_to_one: bool = True
    steps_offset: Annotated[int, Bound(0)] = 0
    timestep_spacing: Annotated[str, OneOf(SPACINGS)] = "trailing"

    def __post_init__(self):
        validate(self)


def betas_for(cfg: ScheduleConfig) -> torch.Tensor:
    """``[T]`` float32 betas of the named schedule (diffusers' formulas and dtypes)."""
    t = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, t, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, t, dtype=torch.float32) ** 2

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999) for i in range(t)], dtype=torch.float32)


class NoiseSchedule:
    """``alphas_cumprod`` (ᾱ) and what follows from it: ``add_noise`` and ``target`` for training,
    ``timesteps`` and ``step`` (DDIM) for sampling."""

    def __init__(self, cfg: ScheduleConfig):
        self.cfg = cfg
        with torch.device("cpu"):  # real numbers even while a model is built on the meta device
            self.betas = betas_for(cfg)
            self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
            self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def _alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ at timesteps ``t`` ``[B]``, shaped to broadcast over ``like`` ``[B, ...]``."""
        a = self.alphas_cumprod.to(like.device)[t.to(like.device)].to(like.dtype)
        return a.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample of q(x_t | x_0): ``√ᾱ x0 + √(1-ᾱ) ε``."""
        a = self._alpha(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model learns to output: ε, or v = ``√ᾱ ε - √(1-ᾱ) x0``."""
        if self.cfg.prediction_type == "epsilon":
            return noise
        a = self._alpha(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def loss_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Per-row weights ``[B]`` that cap each timestep's loss, as a loss on x0, at ``gamma``
        (min-SNR-γ, Hang et al. 2023, with the weight ``SNR + 1`` that v-prediction puts on x0):
        the low-noise steps stop dominating; the noisy ones keep weight 1. 0 weighs all alike."""
        if gamma == 0:
            return torch.ones(t.shape, device=t.device)
        a = self.alphas_cumprod.to(t.device)[t]
        w = a / (1 - a) + (1 if self.cfg.prediction_type == "v_prediction" else 0)
        return w.clamp(max=gamma) / w

    def timesteps(self, steps: int) -> list[int]:
        """The DDIM sampler's timesteps, from noisiest down, spaced as ``timestep_spacing`` says."""
        total = self.cfg.num_train_timesteps
        if not 1 <= steps <= total:
            raise VlkitError(f"sampling steps must be between 1 and the {total} training timesteps, got {steps}")
        if self.cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, total - 1, steps).round()[::-1]
        elif self.cfg.timestep_spacing == "leading":
            ts = (np.arange(steps) * (total // steps))[::-1] + self.cfg.steps_offset
        else:
            ts = np.round(np.arange(total, 0, -total / steps)) - 1
        return [int(t) for t in ts]

    def step(
        self, output: torch.Tensor, t: int, x: torch.Tensor, steps: int, eta: float = 0.0, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from ``x`` at timestep ``t`` (of a ``steps``-step run) to the previous one;
        returns ``(x_prev, predicted x0)``. ``eta`` > 0 adds that fraction of DDPM's noise, drawn
        by the caller (``noise``, shaped like ``x``) so that seeded sampling stays reproducible.
        As diffusers does, the previous timestep is ``t - T // steps`` and the direction to x_t
        uses the model's ε before ``clip_sample`` clamps x0."""
        prev = t - self.cfg.num_train_timesteps // steps
        a = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        b = 1 - a
        if self.cfg.prediction_type == "epsilon":
            eps = output
            x0 = (x - b.sqrt() * output) / a.sqrt()
        else:
            x0 = a.sqrt() * x - b.sqrt() * output
            eps = a.sqrt() * output + b.sqrt() * x
        if self.cfg.clip_sample:
            x0 = x0.clamp(-self.cfg.clip_sample_range, self.cfg.clip_sample_range)
        std = eta * ((1 - a_prev) / b * (1 - a / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
        if eta > 0:
            if noise is None:
                raise VlkitError("a DDIM step with eta > 0 needs its noise (a tensor shaped like the sample)")
            x_prev = x_prev + std * noise
        return x_prev, x0
