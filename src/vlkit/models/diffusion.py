"""Text-to-image diffusion: a small UNet denoiser conditioned on a frozen CLIP text tower.

The text tower's token states reach every attention level of the UNet through cross attention
(``vlkit.nn.Attention`` with ``context_dim``), as in Stable Diffusion; its pooled (end-of-text)
state joins the timestep embedding, as in Imagen and SDXL, which gives every block the
prompt's gist, colour and shape, cheaply. Classifier-free guidance: training replaces the
condition by a learned null context with probability ``cond_drop``; sampling mixes the two
predictions, ``u + g (c - u)``.

Why a UNet and not a DiT: on a CPU budget of minutes, convolutions' locality and weight
sharing learn clean edges and flat fills from few samples, and attention runs only at the
coarse levels, where there are few positions; a DiT must learn locality from data and
attends over every patch at every layer. The UNet first folds ``patch`` × ``patch`` pixels
into channels (space to depth, as "simple diffusion" does), so a 64-pixel image is worked on
as a coarser grid (patch 4: 16×16, 16× less compute), still exact pixels out (depth to space at
the end). The noisy input, folded, also goes straight to the output convolution: at low noise
the prediction is mostly the per-pixel noise itself, which a linear path carries exactly and a
deep path through ``channels[0]`` features learns slowly (measured: without it, a model 500
steps in still left half the noise's variance in its estimate at t = 50, and speckled samples).

Why v-prediction (``ScheduleConfig.prediction_type``; ε is one key away): with the cosine
schedule the noisiest steps are almost pure noise, where ε is easy to predict but says
nothing about the image, and x0 = (x - √(1-ᾱ)ε)/√ᾱ blows up its error by 1/√ᾱ; v = √ᾱ ε -
√(1-ᾱ) x0 moves smoothly from ε to -x0, so every step trains and few-step DDIM sampling is
stable (Salimans & Ho 2022).

Nothing here is tied to pixels: a latent model sets ``unet.in_channels`` and ``image_size``
to its latent's, and puts an autoencoder around :meth:`TextToImage.forward` and
:meth:`TextToImage.generate`'s output.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vlkit.config import Fraction, NonNegativeFloat, NonNegativeInt, PositiveInt, validate
from vlkit.errors import ConfigError, VlkitError
from vlkit.models.diffusion_schedule import NoiseSchedule, ScheduleConfig
from vlkit.nn.attention import Attention
from vlkit.nn.mlp import MLP
from vlkit.text.encoder import TextConfig, TextEncoder


@dataclass
class UNetConfig:
    """``channels`` per resolution level (each level halves the grid); ``attention_levels`` are
    the levels with self and cross attention (the middle always has them)."""

    in_channels: PositiveInt = 3
    patch: PositiveInt = 2
    channels: list[PositiveInt] = field(default_factory=lambda: [64, 128, 128])
    blocks: PositiveInt = 1
    attention_levels: list[NonNegativeInt] = field(default_factory=lambda: [1, 2])
    num_heads: PositiveInt = 4
    norm_groups: PositiveInt = 8

    def __post_init__(self):
        validate(self)
        if not self.channels:
            raise ConfigError("unet.channels is empty; expected one width per resolution level", ("channels",))
        if bad := [c for c in self.channels if c % self.norm_groups or c % self.num_heads]:
            raise ConfigError(f"unet.channels {bad} must be multiples of norm_groups {self.norm_groups} and num_heads {self.num_heads}",
                              ("channels",))  # fmt: skip
        if bad := [lv for lv in self.attention_levels if lv >= len(self.channels)]:
            raise ConfigError(f"unet.attention_levels {bad} name levels beyond the {len(self.channels)} in unet.channels",
                              ("attention_levels",))  # fmt: skip


@dataclass
class DiffusionConfig:
    """``text`` is the frozen tower's config (set from the CLIP it comes from); ``text_source``
    records that CLIP's folder, where evaluation finds its scorer by default. ``snr_gamma`` > 0
    weighs the loss by min-SNR-γ (:meth:`NoiseSchedule.loss_weight`); 0 is DDPM's plain MSE."""

    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    image_size: PositiveInt = 64
    cond_drop: Fraction = 0.1
    ema_decay: Fraction = 0.999
    snr_gamma: NonNegativeFloat = 0.0
    text_source: str = ""

    def __post_init__(self):
        validate(self)
        grid = self.image_size / self.unet.patch / 2 ** (len(self.unet.channels) - 1)
        if grid != int(grid):
            raise ConfigError(
                f"image_size {self.image_size} does not divide into unet.patch {self.unet.patch} × "
                f"2^{len(self.unet.channels) - 1} (one halving per level after the first)",
                ("image_size", "unet.patch", "unet.channels"),
            )


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features ``[B, dim]`` of integer timesteps (cos | sin, periods up to 10⁴)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, the timestep/text embedding as a scale and shift (FiLM), then
    GroupNorm → SiLU → conv; the second conv starts at zero so a new block is the identity."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class AttentionBlock(nn.Module):
    """A transformer block over the grid's positions: self attention, cross attention to the
    text tokens (padding masked), MLP; each pre-LayerNorm and residual."""

    def __init__(self, dim: int, num_heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2, self.cross = nn.LayerNorm(dim), Attention(dim, num_heads, context_dim=context_dim)
        self.norm3, self.mlp = nn.LayerNorm(dim), MLP(dim, 4 * dim, "gelu")

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm1(t))
        t = t + self.cross(self.norm2(t), mask=mask, context=context)
        t = t + self.mlp(self.norm3(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """One resolution level's blocks: residual blocks, each followed by attention if the level has it."""

    def __init__(self, cin: int, cout: int, n: int, emb_dim: int, cfg: UNetConfig, context_dim: int, attention: bool):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, emb_dim, cfg.norm_groups) for i in range(n))
        self.attn = nn.ModuleList(AttentionBlock(cout, cfg.num_heads, context_dim) for _ in range(n)) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            x = res(x, emb)
            if self.attn is not None:
                x = self.attn[i](x, context, mask)
        return x


class UNet(nn.Module):
    """The denoiser: ``(x_t [B,C,H,W], t [B], text tokens [B,L,D], mask [B,L], pooled [B,D])`` →
    the prediction ``[B,C,H,W]``; ``drop`` ``[B]`` marks rows whose condition is replaced by the
    learned null context (classifier-free guidance)."""

    def __init__(self, cfg: UNetConfig, context_dim: int):
        super().__init__()
        self.cfg = cfg
        ch, n, p = cfg.channels, cfg.blocks, cfg.patch
        emb_dim = 4 * ch[0]
        self.time = nn.Sequential(nn.Linear(ch[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.pooled = nn.Linear(context_dim, emb_dim)
        self.null_context = nn.Parameter(torch.zeros(1, 1, context_dim))
        self.stem = nn.Conv2d(cfg.in_channels * p * p, ch[0], 3, padding=1)
        levels = range(len(ch))
        attn = set(cfg.attention_levels)
        self.down = nn.ModuleList(Level(ch[max(i - 1, 0)], ch[i], n, emb_dim, cfg, context_dim, i in attn) for i in levels)
        self.downsample = nn.ModuleList(nn.Conv2d(ch[i], ch[i], 3, stride=2, padding=1) for i in levels[:-1])
        self.mid = Level(ch[-1], ch[-1], 2, emb_dim, cfg, context_dim, True)
        self.up = nn.ModuleList(Level(ch[min(i + 1, len(ch) - 1)] + ch[i], ch[i], n, emb_dim, cfg, context_dim, i in attn) for i in levels)
        self.upsample = nn.ModuleList(nn.Conv2d(ch[i], ch[i], 3, padding=1) for i in levels[1:])
        self.out_norm = nn.GroupNorm(cfg.norm_groups, ch[0])
        self.out = nn.Conv2d(ch[0] + cfg.in_channels * p * p, cfg.in_channels * p * p, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor,
        pooled: torch.Tensor,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if drop is not None:
            null = self.null_context.to(context.dtype)
            context = torch.where(drop[:, None, None], null, context)
            pooled = torch.where(drop[:, None], null[:, 0], pooled)
            mask = mask | drop[:, None]
        attn_mask = mask[:, None, None, :]
        emb = self.time(timestep_embedding(t, self.cfg.channels[0]).to(x.dtype)) + self.pooled(pooled)
        folded = F.pixel_unshuffle(x, self.cfg.patch)
        h = self.stem(folded)
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, emb, context, attn_mask)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb, context, attn_mask)
        for i in reversed(range(len(self.up))):
            h = self.up[i](torch.cat([h, skips[i]], dim=1), emb, context, attn_mask)
            if i > 0:
                h = self.upsample[i - 1](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return F.pixel_shuffle(self.out(torch.cat([F.silu(self.out_norm(h)), folded], dim=1)), self.cfg.patch)


class TextToImage(nn.Module):
    """The frozen text tower, the trained denoiser ``unet``, its EMA copy ``ema`` (what sampling
    uses) and the noise schedule. ``forward`` is the DDPM training loss; ``generate`` samples
    with DDIM and classifier-free guidance. The EMA and its update count live in the state dict,
    so a checkpoint restores them exactly."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(cfg.text).requires_grad_(False)
        self.unet = UNet(cfg.unet, cfg.text.width)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.schedule = NoiseSchedule(cfg.schedule)
        self.tokenizer = None

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The frozen tower's token states ``[B,L,D]``, the padding mask ``[B,L]`` (bool) and the pooled state ``[B,D]``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.text(input_ids, attention_mask)
        return out.tokens, attention_mask.bool(), out.pooled

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of one DDPM training step: random timesteps and noise, the condition dropped
        with probability ``cond_drop``, squared error against ε or v averaged over each image's
        pixels, weighted by ``pixel_weights`` ``[B,H,W]`` if given (a weighted mean per image)."""
        context, mask, pooled = self.encode_text(input_ids, attention_mask)
        b, device = pixel_values.shape[0], pixel_values.device
        t = torch.randint(0, self.cfg.schedule.num_train_timesteps, (b,), device=device)
        noise = torch.randn_like(pixel_values)
        drop = torch.rand(b, device=device) < self.cfg.cond_drop
        x_t = self.schedule.add_noise(pixel_values, noise, t)
        out = self.unet(x_t, t, context, mask, pooled, drop)
        err = (out.float() - self.schedule.target(pixel_values, noise, t).float()).pow(2).mean(1)
        if pixel_weights is None:
            err = err.flatten(1).mean(1)
        else:
            err = (err * pixel_weights).flatten(1).sum(1) / pixel_weights.flatten(1).sum(1)
        return (err * self.schedule.loss_weight(t, self.cfg.snr_gamma)).mean()

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move the EMA toward the weights just trained, by ``1 - decay`` with the decay warmed up
        as ``(1 + n) / (10 + n)`` over the first updates, so a short run's EMA is not its start."""
        self.ema_updates += 1
        n = int(self.ema_updates)
        decay = min(self.cfg.ema_decay, (1 + n) / (10 + n))
        for e, p in zip(self.ema.parameters(), self.unet.parameters()):
            e.lerp_(p.detach(), 1 - decay)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids for the prompts; an empty prompt is an error, one longer than the text
        tower's context is truncated with a warning."""
        if self.tokenizer is None:
            raise VlkitError("this diffusion model has no tokenizer attached; load it with vlkit.load")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise VlkitError("no prompts given; expected at least one")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise VlkitError(f"prompt {i} is empty ({p!r}); expected a description of the image")
        limit = self.cfg.text.context_length
        for p in prompts:
            if self.tokenizer.tok.encode(p).overflowing:
                warnings.warn(f"prompt {p[:60]!r}... is longer than the text tower's {limit} tokens; truncated to its first {limit}",
                              stacklevel=3)  # fmt: skip
        return self.tokenizer(prompts)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        guidance: float = 4.0,
        steps: int = 50,
        seed: int = 0,
        eta: float = 0.0,
        use_ema: bool = True,
        batch_size: int = 64,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images ``[N, C, H, W]`` in [-1, 1], one per prompt, by ``steps`` DDIM steps with guidance
        scale ``guidance`` (1: the conditional prediction alone, 0: unconditional). Image ``i``
        starts from the noise of seed ``seed + i``, so it is the same whatever the batch."""
        if not 0 <= guidance < math.inf:  # NaN fails too
            raise VlkitError(f"guidance must be a finite number of at least 0 (1 = no guidance), got {guidance}")
        if steps <= 0:
            raise VlkitError(f"steps must be at least 1, got {steps}")
        if not 0 <= eta < math.inf:
            raise VlkitError(f"eta must be a finite number of at least 0, got {eta}")
        tokens = self.tokenize(prompts)
        net = self.ema if use_ema else self.unet
        n = len(tokens["input_ids"])
        timesteps = self.schedule.timesteps(steps)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        shape = (self.cfg.unet.in_channels, self.cfg.image_size, self.cfg.image_size)
        device = self.unet.null_context.device
        out = []
        bar = tqdm(total=steps * math.ceil(n / batch_size), desc="sample", unit="step", disable=not progress, dynamic_ncols=True)
        for lo in range(0, n, batch_size):
            rows = slice(lo, min(lo + batch_size, n))
            context, mask, pooled = self.encode_text(tokens["input_ids"][rows].to(device), tokens["attention_mask"][rows].to(device))
            x = torch.stack([torch.randn(shape, generator=g) for g in gens[rows]]).to(device)
            for t in timesteps:
                output = self._guided(net, x, t, context, mask, pooled, guidance)
                noise = torch.stack([torch.randn(shape, generator=g) for g in gens[rows]]).to(device) if eta > 0 else None
                x, _ = self.schedule.step(output, t, x, steps, eta=eta, noise=noise)
                bar.update(1)
            out.append(x.clamp(-1, 1).cpu())
        bar.close()
        return torch.cat(out)

    def _guided(self, net: UNet, x, t: int, context, mask, pooled, guidance: float) -> torch.Tensor:
        """``u + g (c - u)`` from one batched forward of the unconditional and conditional rows."""
        b = x.shape[0]
        ts = torch.full((b,), t, device=x.device, dtype=torch.long)
        if guidance == 1:
            return net(x, ts, context, mask, pooled)
        drop = torch.arange(2 * b, device=x.device) < b
        both = net(x.repeat(2, 1, 1, 1), ts.repeat(2), context.repeat(2, 1, 1), mask.repeat(2, 1), pooled.repeat(2, 1), drop)
        uncond, cond = both.chunk(2)
        return uncond + guidance * (cond - uncond)
