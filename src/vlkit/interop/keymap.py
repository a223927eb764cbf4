"""Explicit key maps: each vlkit parameter is built from named checkpoint tensors by one of a few
transforms, and the same rules run backwards to export. Loading fills a model built on the meta
device, one tensor at a time, so a checkpoint is never held twice in memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vlkit.interop.weights import CheckpointError, WeightReader

KINDS = ("copy", "view", "T", "cat", "rows", "zeros")


@dataclass(frozen=True)
class Rule:
    """vlkit ``target`` ← checkpoint ``sources``.

    ``kind``: "copy" (same shape), "view" (same numbers, checkpoint shape ``shape``), "T"
    (transposed matrix), "cat" (sources stacked on dim 0, e.g. q|k|v; ``splits`` gives their row
    counts when they differ, e.g. grouped-query k and v narrower than q), "rows" (rows
    ``rows[0]:rows[1]`` of one source of shape ``shape``, e.g. q out of a packed q|k|v), "zeros"
    (absent from the checkpoint layout, e.g. a bias it does not have; must be zero to export).
    """

    target: str
    sources: tuple[str, ...]
    kind: str = "copy"
    shape: tuple[int, ...] | None = None
    rows: tuple[int, int] | None = None
    splits: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Rule kind must be one of {KINDS}, got {self.kind!r}")


def copy(target: str, source: str) -> Rule:
    return Rule(target, (source,))


def view(target: str, source: str, shape: tuple[int, ...]) -> Rule:
    return Rule(target, (source,), "view", tuple(shape))


def transposed(target: str, source: str) -> Rule:
    return Rule(target, (source,), "T")


def cat(target: str, *sources: str, splits: tuple[int, ...] | None = None) -> Rule:
    """``sources`` stacked on dim 0: equal parts, or ``splits`` rows each."""
    if splits is not None and len(splits) != len(sources):
        raise ValueError(f"cat {target!r}: {len(sources)} sources but {len(splits)} splits")
    return Rule(target, tuple(sources), "cat", splits=None if splits is None else tuple(splits))


def rows(target: str, source: str, start: int, stop: int, shape: tuple[int, ...]) -> Rule:
    return Rule(target, (source,), "rows", tuple(shape), (start, stop))


def zeros(target: str) -> Rule:
    return Rule(target, (), "zeros")


def source_shapes(rule: Rule, target_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shape each source tensor must have for ``rule`` to give ``target_shape``."""
    if rule.kind == "copy":
        return [target_shape]
    if rule.kind in ("view", "rows"):
        return [rule.shape]
    if rule.kind == "T":
        return [tuple(reversed(target_shape))]
    if rule.kind == "cat":
        n = len(rule.sources)
        splits = rule.splits or (target_shape[0] // n,) * n
        return [(s, *target_shape[1:]) for s in splits]
    return []


def _build(rule: Rule, tensors: list[torch.Tensor], target_shape) -> torch.Tensor:
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "view":
        return tensors[0].reshape(target_shape)
    if rule.kind == "T":
        return tensors[0].T.contiguous()
    if rule.kind == "cat":
        return torch.cat(tensors, dim=0)
    if rule.kind == "rows":
        return tensors[0][rule.rows[0] : rule.rows[1]].clone()
    return torch.zeros(target_shape)


def check_rules(rules: list[Rule], expected: dict[str, torch.Tensor], layout: str) -> None:
    """The map must name every parameter of the model exactly once (a bug here is vlkit's, not the file's)."""
    targets = [r.target for r in rules]
    missing = sorted(set(expected) - set(targets))
    extra = sorted(set(targets) - set(expected))
    if missing or extra or len(targets) != len(set(targets)):
        raise RuntimeError(f"vlkit's {layout} key map is out of step with the model: unmapped {missing}, unknown {extra}")


def _limited(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_into(
    build: Callable[[], torch.nn.Module],
    rules: list[Rule],
    reader: WeightReader,
    layout: str,
    ignore: Callable[[str], bool] = lambda key: False,
    dtype: torch.dtype | None = torch.float32,
) -> torch.nn.Module:
    """Build the model on the meta device and fill it from ``reader`` by ``rules``, or raise
    :class:`CheckpointError` naming the file, the keys at fault and what was expected."""
    with torch.device("meta"):
        model = build()
    expected = {k: v for k, v in model.state_dict().items()}
    check_rules(rules, expected, layout)
    where = reader.describe()
    wanted = list(dict.fromkeys(s for r in rules for s in r.sources))
    missing = [k for k in wanted if k not in reader]
    if missing:
        raise CheckpointError(
            f"{where}: missing key(s) {_limited(missing)}; a {layout} checkpoint with this config.json has "
            f"{len(wanted)} tensors, e.g. {_limited(wanted, 4)}"
        )
    used = set(wanted)
    unexpected = [k for k in reader.keys() if k not in used and not ignore(k)]
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected key(s) {_limited(unexpected)}; the {layout} layout for this config.json does "
            "not use them (does config.json describe this checkpoint?)"
        )
    state: dict[str, torch.Tensor] = {}
    for rule in rules:
        target_shape = tuple(expected[rule.target].shape)
        tensors = []
        for source, shape in zip(rule.sources, source_shapes(rule, target_shape)):
            t = reader.get(source)
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(
                    f"{reader.file(source)}: tensor {source!r} has shape {tuple(t.shape)}; expected {tuple(shape)} "
                    f"(for vlkit parameter {rule.target!r}, from the sizes in config.json)"
                )
            tensors.append(t)
        value = _build(rule, tensors, target_shape)
        del tensors
        want_dtype = dtype or (value.dtype if value.is_floating_point() else expected[rule.target].dtype)
        state[rule.target] = value.to(want_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def export_state(model: torch.nn.Module, rules: list[Rule], layout: str) -> dict[str, torch.Tensor]:
    """Run the rules backwards: the model's parameters under the checkpoint layout's names."""
    params = dict(model.state_dict())
    check_rules(rules, params, layout)
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for rule in rules:
        t = params[rule.target].detach().cpu()
        if rule.kind == "copy":
            parts = [t]
        elif rule.kind == "view":
            parts = [t.reshape(rule.shape)]
        elif rule.kind == "T":
            parts = [t.T]
        elif rule.kind == "cat":
            parts = list(t.split(list(rule.splits), dim=0)) if rule.splits else list(t.chunk(len(rule.sources), dim=0))
        elif rule.kind == "rows":
            pieces.setdefault(rule.sources[0], []).append((rule.rows[0], t))
            continue
        else:
            if t.count_nonzero():
                raise ValueError(f"cannot export to {layout}: {rule.target!r} is not zero and the layout has no place for it")
            parts = []
        for name, part in zip(rule.sources, parts):
            out[name] = part.contiguous().clone()
    for name, parts in pieces.items():
        out[name] = torch.cat([t for _, t in sorted(parts, key=lambda item: item[0])], dim=0)
    return out
