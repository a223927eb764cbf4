"""LoRA (Hu et al. 2021) on vlkit's :class:`~vlkit.nn.linear.Linear`: ``y = W x + s · B A x`` with
``A`` ``[r, in]``, ``B`` ``[out, r]`` and ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``),
as ``peft`` computes it, so adapters trained here load in ``peft`` (:mod:`vlkit.interop.peft`).

vlkit fuses q|k|v and gate|up into one matmul; peft adapts transformers' separate ``q_proj``,
``k_proj``, ... each with its own ``A``. So a fused layer is adapted per *part*: each part (a
block of output rows) gets its own ``A`` and ``B``, and target names reach parts as transformers
names them (``q_proj``, ``v_proj``, ``gate_proj``, ...) as well as whole layers by vlkit's names
(``attn.qkv``, ``mlp.down``). The base weight keeps its key, so a LoRA model still loads its
base checkpoint; the adapters add ``<layer>.lora_A``/``<layer>.lora_B`` (parts stacked)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import Bound, PositiveFloat, PositiveInt, validate
from vlkit.errors import ConfigError, VlkitError
from vlkit.nn.attention import Attention
from vlkit.nn.linear import Linear
from vlkit.nn.mlp import GatedMLP


@dataclass
class LoraConfig:
    """``target_modules``: suffixes of module names (dot-separated, as peft matches them), either
    parts by transformers' names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``,
    ``up_proj``, ``down_proj``) or whole vlkit layers (``qkv``, ``attn.proj``, ``fc1``). The
    default is peft's for Llama. ``rslora`` scales by ``alpha / sqrt(r)`` instead of ``alpha / r``."""

    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Annotated[float, Bound(0, 1, high_open=True)] = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rslora: bool = False

    def __post_init__(self):
        validate(self)
        if not self.target_modules or any(not t or t.startswith(".") or t.endswith(".") for t in self.target_modules):
            raise ConfigError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}",
                              ("target_modules",))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclass(frozen=True)
class Part:
    """Rows ``start:stop`` of a layer's output, adapted as the module named ``name`` (a path)."""

    name: str
    start: int
    stop: int


def _parts(parent: nn.Module, child: str, layer: Linear, path: str) -> list[Part]:
    """The parts of ``layer`` (``parent.child``), named as transformers' separate projections
    where vlkit fuses them; a layer vlkit does not fuse is one part, named both ways."""
    base = path.rpartition(".")[0]
    at = (lambda name: f"{base}.{name}" if base else name)
    if isinstance(parent, Attention):
        q, kv = parent.q_size, parent.kv_size
        split = {"qkv": [("q_proj", q), ("k_proj", kv), ("v_proj", kv)], "q": [("q_proj", q)],
                 "kv": [("k_proj", kv), ("v_proj", kv)], "proj": [("o_proj", layer.out_features)]}.get(child)
    elif isinstance(parent, GatedMLP):
        h = parent.hidden
        split = {"gate_up": [("gate_proj", h), ("up_proj", h)], "down": [("down_proj", layer.out_features)]}.get(child)
    else:
        split = None
    if split is None:
        return [Part(path, 0, layer.out_features)]
    parts, start = [], 0
    for name, rows in split:
        parts.append(Part(at(name), start, start + rows))
        start += rows
    return parts


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


class LoraLinear(Linear):
    """A :class:`Linear` over a linear layer's own ``weight``/``bias`` (oneDNN switch included) plus
    low-rank updates on some of its parts: ``lora_A`` stacks each part's ``A`` (``[parts·r, in]``,
    one matmul for all), ``lora_B`` each part's ``B`` by rows (``[Σ part rows, r]``)."""

    def __init__(self, base: Linear, parts: list[Part], r: int, scaling: float, dropout: float):
        # base's own parameters, not copies, so an optimizer or a tied reference keeps them
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias, self.onednn = base.weight, base.bias, getattr(base, "onednn", False)
        self.base_type = type(base)
        self.parts, self.r, self.scaling = tuple(parts), r, scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(len(parts) * r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(sum(p.stop - p.start for p in parts), r, dtype=w.dtype, device=w.device))
        for a in self.lora_A.data.split(r):  # peft's init: each A as nn.Linear's default, B zero
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def part_weights(self) -> list[tuple[Part, torch.Tensor, torch.Tensor]]:
        """``(part, A [r, in], B [rows, r])`` for each adapted part."""
        out, row = [], 0
        for i, part in enumerate(self.parts):
            rows = part.stop - part.start
            out.append((part, self.lora_A[i * self.r : (i + 1) * self.r], self.lora_B[row : row + rows]))
            row += rows
        return out

    def delta(self) -> torch.Tensor:
        """``s · B A`` as a full ``[out, in]`` fp32 matrix (zero rows where no part is adapted)."""
        d = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        for part, a, b in self.part_weights():
            d[part.start : part.stop] = (b.float() @ a.float()) * self.scaling
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if len(self.parts) == 1 and self.parts[0].stop - self.parts[0].start == self.out_features:
            return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        return self._update(y, x, 0)

    def rows(self, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        return self._update(super().rows(x, start, stop), x, start)

    def _update(self, y: torch.Tensor, x: torch.Tensor, start: int) -> torch.Tensor:
        """Add each part's update to ``y``, output features ``start:start + y.shape[-1]`` of ``x``'s."""
        stop, low = start + y.shape[-1], F.linear(self.lora_dropout(x), self.lora_A)
        for i, (part, _, b) in enumerate(self.part_weights()):
            lo, hi = max(part.start, start), min(part.stop, stop)
            if lo < hi:
                update = F.linear(low[..., i * self.r : (i + 1) * self.r], b[lo - part.start : hi - part.start])
                y[..., lo - start : hi - start] += update * self.scaling
        return y

    def extra_repr(self) -> str:
        names = ", ".join(p.name.rpartition(".")[2] for p in self.parts)
        return f"{super().extra_repr()}, lora r={self.r} on {names}"


def _linears(module: nn.Module):
    """``(path, parent, child name, layer)`` for every linear layer (LoRA or not) inside ``module``."""
    for path, parent in module.named_modules():
        for child, layer in parent.named_children():
            if isinstance(layer, nn.Linear):
                yield (f"{path}.{child}" if path else child), parent, child, layer


def add_lora(module: nn.Module, cfg: LoraConfig) -> list[str]:
    """Replace, in place, each linear layer (vlkit's or ``nn.Linear``) of ``module`` that has a part
    or whole named by ``cfg.target_modules`` by a :class:`LoraLinear` adapting those parts; returns
    the adapted parts' names (nothing changes when a target matches nothing). Gradients are left as they are: freeze the base first (``requires_grad_(False)``)
    to train only the adapters, whose parameters are created trainable."""
    plan, seen = [], set()
    for path, parent, child, layer in _linears(module):
        if isinstance(layer, LoraLinear):
            raise VlkitError(f"{path}: already has LoRA adapters; merge_lora first to add new ones")
        whole = [t for t in cfg.target_modules if _matches(path, t)]
        named = [(p, [t for t in cfg.target_modules if _matches(p.name, t)]) for p in _parts(parent, child, layer, path)]
        chosen = [p for p, targets in named if whole or targets]
        seen.update(whole, *(targets for _, targets in named))
        if chosen:
            plan.append((parent, child, layer, chosen))
    if not plan:
        raise VlkitError(f"LoRA target_modules {cfg.target_modules} match no linear layer of the {type(module).__name__}; "
                         f"its linear layers include {_some_names(module)}")
    if unused := [t for t in cfg.target_modules if t not in seen]:
        raise VlkitError(f"LoRA target_modules {unused} match no linear layer of the {type(module).__name__} "
                         f"(the others do); its linear layers include {_some_names(module)}")
    for parent, child, layer, chosen in plan:
        setattr(parent, child, LoraLinear(layer, chosen, cfg.r, cfg.scaling, cfg.dropout))
    return [p.name for *_, chosen in plan for p in chosen]


def _some_names(module: nn.Module, n: int = 8) -> str:
    names = []
    for path, parent, child, layer in _linears(module):
        names += [p.name for p in _parts(parent, child, layer, path)]
        if len(names) >= n:
            break
    return ", ".join(names[:n]) or "none"


def linear_parts(module: nn.Module) -> dict[str, list[Part]]:
    """Every linear layer's path and its parts (what ``target_modules`` can name)."""
    return {path: _parts(parent, child, layer, path) for path, parent, child, layer in _linears(module)}


def lora_layers(module: nn.Module) -> dict[str, LoraLinear]:
    """The LoRA layers inside ``module`` by path."""
    return {path: layer for path, _, _, layer in _linears(module) if isinstance(layer, LoraLinear)}


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (every ``lora_A`` and ``lora_B``): what a LoRA run optimises."""
    return [p for layer in lora_layers(module).values() for p in (layer.lora_A, layer.lora_B)]


@torch.no_grad()
def merge_lora(module: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and put the plain layers back (their class, the same
    weight and bias parameters, oneDNN switch kept); returns the merged layers' paths."""
    merged = []
    for path, parent, child, layer in list(_linears(module)):
        if isinstance(layer, LoraLinear):
            layer.weight += layer.delta().to(layer.weight.dtype)
            plain = layer.base_type(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight, plain.bias = layer.weight, layer.bias
            if isinstance(plain, Linear):
                plain.onednn = layer.onednn
            setattr(parent, child, plain)
            merged.append(path)
    return merged
