"""The linear layer vlkit's blocks build: ``nn.Linear`` (same parameters, same keys) that a model can
switch to oneDNN's matmul for inference on an x86 CPU. There, in fp32, oneDNN runs a language model's
matmuls up to twice as fast as the MKL path ``F.linear`` takes (on AMD EPYCs, a decode step's mat-vecs
and the prefill's GEMMs alike; ``benchmarks/RESULTS.md``), with the same fp32 arithmetic (its own
summation order: results differ from ``F.linear`` by rounding, ~1e-6 relative). Below
``ONEDNN_MIN_WEIGHT`` elements its fixed cost per call (~11 µs against MKL's ~3) outweighs that,
so small matrices stay with ``F.linear``. Single rows (a batch-1 decode step) go whichever way
:func:`fastest_matvec` measures fastest on this CPU (on the Intel Xeon measured, MKL's mat-vec won).

oneDNN reads each weight in its own blocked layout (:func:`packed`), made once per weight and kept
beside it while the weight lives (about as much memory again): given the plain layout, it
re-lays the weight out on every call of more than one row, which made an 8-row step read the weights
at half the speed of one row."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


def _onednn_matmul():
    """oneDNN's linear op where torch was built with it on an x86 CPU (AVX2 or better), else None."""
    if not torch.backends.mkldnn.is_available() or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    packet = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    return None if packet is None else packet.default


_ONEDNN = _onednn_matmul()
_REORDER = None if _ONEDNN is None else getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)

PACK_ROWS = 8
"""The row count oneDNN picks a weight's blocked layout for. On an AMD EPYC (AVX2) that layout beat the
plain one by 1.05x for one row, 1.6-1.7x for 2 and 8 rows, 1.1-1.2x for 49 and 392 (RESULTS.md, session 17)."""

_packs: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""weight → ((its version, its data pointer), oneDNN's blocked copy)."""


def packed(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of ``weight`` (the weight itself where torch cannot make one), made on
    first use and again once the weight changed, in place or by a new tensor; freed with the weight.
    (A tensor made under ``inference_mode`` has no version counter: only a new tensor renews its copy.)"""
    if _REORDER is None:
        return weight
    key = (-1 if weight.is_inference() else weight._version, weight.data_ptr())
    hit = _packs.get(weight)
    if hit is None or hit[0] != key:
        hit = _packs[weight] = (key, _REORDER(weight.detach(), PACK_ROWS))
    return hit[1]


ONEDNN_MIN_WEIGHT = 2**17
"""The smallest weight (elements; 0.5 MB in fp32) worth oneDNN's call: measured break-even ~256x256."""


_matvec: str | None = None
"""How single rows go on this CPU: ``"mkl"`` (``F.linear``), ``"onednn"`` (the plain weight) or ``"blocked"``
(the blocked copy); measured on first use by :func:`fastest_matvec`."""


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's linear with no fused activation (the op's trailing arguments)."""
    return _ONEDNN(x, weight, bias, "none", [], "")


def fastest_matvec(rows: int = 4096, cols: int = 1024, weights: int = 4, rounds: int = 15) -> str:
    """The fastest mat-vec on this CPU (a key of :data:`_matvec`). Each round times every way once on the
    same ``weights`` matrices in turn (16 MB each by default), as a decode step streams its layers; the
    medians of the rounds decide. oneDNN's beat MKL's by ~1.6x on the AMD EPYCs measured and lost by ~15%
    on Intel Xeons with AMX, whose MKL mat-vec is fast; the blocked copy beat the plain weight by ~5% on an
    AVX2 EPYC (2026-12-04) and lost on an AVX-512 one (session 4). A best-of-5 on one repeated 64 MB weight
    picked oneDNN in 7 of 20 tries on a Xeon with AMX, where that made a 150M model's decode step 27.6 ms
    against 23.6 ms with MKL's; this measure picked MKL in 20 of 20 (session 30, benchmarks/RESULTS.md)."""
    mats = [torch.empty(rows, cols).uniform_(-1, 1) for _ in range(weights)]
    x = torch.ones(1, cols)
    ways = {"mkl": lambda k: F.linear(x, mats[k]), "onednn": lambda k: _onednn(x, mats[k])}
    if _REORDER is not None:
        blocked = [_REORDER(w, PACK_ROWS) for w in mats]
        ways["blocked"] = lambda k: _onednn(x, blocked[k])
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            for k in range(weights):
                way(k)
            times[name].append(time.perf_counter() - start)
    return min(times, key=lambda name: statistics.median(times[name]))


def _single_row_way() -> str:
    """The measured way for single rows, measured the first time it is asked for."""
    global _matvec
    if _matvec is None:
        _matvec = fastest_matvec()
    return _matvec


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where that is exact and pays: fp32 on a CPU
    with oneDNN, no gradient recorded (the op has no backward), no autocast (which would cast),
    a weight of at least ``ONEDNN_MIN_WEIGHT`` elements. Several rows read the weight's blocked copy;
    a single row goes the way measured fastest here (:func:`fastest_matvec`)."""
    if (
        _ONEDNN is not None
        and weight.numel() >= ONEDNN_MIN_WEIGHT
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    ):
        way = "blocked" if x.numel() > x.shape[-1] else _single_row_way()
        if way != "mkl":
            return _onednn(x, packed(weight) if way == "blocked" else weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward goes through :func:`linear` once ``onednn`` is set (see
    :func:`use_onednn`); off, it is ``nn.Linear`` exactly."""

    onednn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            return linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def rows(self, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """Output features ``start:stop`` alone, ``self(x)[..., start:stop]`` without computing the
        others (a fused q|k|v layer's queries for a few rows, say); LoRA layers add their update."""
        return F.linear(x, self.weight[start:stop], None if self.bias is None else self.bias[start:stop])


def use_onednn(module: nn.Module, on: bool = True) -> nn.Module:
    """Set (or clear) ``onednn`` on every :class:`Linear` inside ``module``; clearing also frees the
    blocked copies of the module's weights. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.onednn = on
    if not on:
        for p in module.parameters():
            _packs.pop(p, None)
    return module
