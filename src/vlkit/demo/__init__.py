"""``vlkit demo``: train each system on the shapes world, evaluate it, write one report.

Each part is a module here with ``run(out, quick, overrides) -> (metrics, section)``,
``estimate(out, quick, overrides) -> (seconds, plan)`` and ``REQUIRES``, the earlier parts whose
folders under ``out`` it reads; a part that others require also has ``stand_in(folder, quick,
overrides)``, its model trained one step. Parts run in the order
of :data:`PARTS`; a prerequisite missing from ``out`` runs first. Each adds a section to
``report.md`` and a key to ``metrics.json``. Before any part runs, the demo says how long each
will take: each times its own training step on this machine, on one-step stand-ins for the
prerequisites not trained yet.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import torch

from vlkit.config import read, write_json
from vlkit.demo import blip2, clip, generation, lm, vlm
from vlkit.errors import ConfigError

PARTS = {"clip": clip, "lm": lm, "vlm": vlm, "blip2": blip2, "generation": generation}
"""The demo's parts in the order they run."""


def _done(out: Path, part: str) -> bool:
    """A part's model folder is complete once its config is written (folders are written whole)."""
    return (out / part / "config.json").is_file()


def _section(out: Path, part: str) -> Path:
    """A part's report section, kept so a later ``--parts`` run rebuilds the whole report."""
    return out / "sections" / f"{part}.md"


def plan(out: Path, parts: list[str]) -> list[str]:
    """The parts asked for plus any prerequisite whose folder ``out`` lacks, in run order."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"unknown demo part(s) {unknown}; expected some of {list(PARTS)}", ("parts",))
    wanted = set(parts)
    for name in reversed(list(PARTS)):
        if name in wanted:
            wanted |= {r for r in PARTS[name].REQUIRES if not _done(out, r)}
    return [name for name in PARTS if name in wanted]


def route(overrides: list[str], parts: list[str]) -> dict[str, list[str]]:
    """``--vlm.loop.steps=100`` reaches the vlm part as ``--loop.steps=100``."""
    routed = {p: [] for p in parts}
    for item in overrides:
        part, _, rest = item.removeprefix("--").partition(".")
        if part not in routed or not rest:
            raise ConfigError(f"demo override {item!r}: expected --PART.KEY=VALUE with PART one of the parts run, {parts}", (item,))
        routed[part].append(f"--{rest}")
    return routed


def _timing_folder(out: Path, tmp: Path, order: list[str], quick: bool, routed: dict[str, list[str]]) -> Path:
    """``out`` if every prerequisite of the parts is trained there, else ``tmp`` holding those
    that are (linked) and one-step stand-ins, built quietly, for those that are not."""
    needed = [r for r in PARTS if any(r in PARTS[p].REQUIRES for p in order)]
    if all(_done(out, r) for r in needed):
        return out
    for r in needed:
        if _done(out, r):
            (tmp / r).symlink_to((out / r).resolve(), target_is_directory=True)
        else:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                PARTS[r].stand_in(tmp / r, quick, routed.get(r, []))
    return tmp


def announce(out: Path, order: list[str], quick: bool, routed: dict[str, list[str]]) -> dict[str, float]:
    """Print, before any part trains, how long each part's training will take on this machine."""
    print(f"[demo] timing each part's training step on this machine: {', '.join(order)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = _timing_folder(out, Path(tmp), order, quick, routed)
        plans = {p: PARTS[p].estimate(folder, quick, routed[p]) for p in order}
    for p, (seconds, what) in plans.items():
        print(f"[demo] {p}: about {seconds / 60:.1f} min of training: {what}")
    total = sum(seconds for seconds, _ in plans.values())
    print(f"[demo] about {total / 60:.0f} min of training in all, plus each part's evaluation")
    return {p: seconds for p, (seconds, _) in plans.items()}


def run_demo(out: Path, quick: bool = False, parts: list[str] | tuple[str, ...] = tuple(PARTS), overrides: list[str] = ()) -> dict:
    out = Path(out)
    order = plan(out, list(parts))
    routed = route(list(overrides), order)
    out.mkdir(parents=True, exist_ok=True)
    estimates = announce(out, order, quick, routed)
    torch.manual_seed(0)  # after the estimates' random draws, so the parts train as they would without them
    metrics = read(out / "metrics.json") if (out / "metrics.json").is_file() else {}
    sections = {}
    for part in order:
        print(f"[demo] {part}: training, about {estimates[part] / 60:.1f} min")
        metrics[part], sections[part] = PARTS[part].run(out, quick, routed[part])
        _section(out, part).parent.mkdir(exist_ok=True)
        _section(out, part).write_text(sections[part])
        write_json(out / "metrics.json", metrics)  # a later part reads it (the VLM adds the LM's time); a crash keeps it
    mode = "quick mode (a first look; lower quality)" if quick else "full run"
    kept = [p for p in PARTS if _section(out, p).is_file()]
    header = f"# vlkit demo report\n\n{mode}; parts run now: {', '.join(order)}. Metrics are fractions in 0..1 unless named otherwise.\n\n"
    (out / "report.md").write_text(header + "\n".join(_section(out, p).read_text() for p in kept))
    print(f"wrote {out / 'report.md'} and {out / 'metrics.json'}")
    print(json.dumps({p: metrics[p] for p in order}, indent=2))
    return metrics
