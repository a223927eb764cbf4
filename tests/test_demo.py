"""The demo's orchestration: part order, prerequisites and per-part overrides (fake parts, no training)."""

from types import SimpleNamespace

import pytest

import vlkit.demo as demo
from vlkit.errors import ConfigError


def _part(name, requires, calls):
    def run(out, quick, overrides):
        (out / name).mkdir(exist_ok=True)
        (out / name / "config.json").write_text("{}")
        calls.append((name, overrides))
        return {"score": len(calls)}, f"## {name}\n"

    return SimpleNamespace(REQUIRES=requires, run=run)


@pytest.fixture
def parts(monkeypatch):
    calls = []
    fake = {"clip": _part("clip", (), calls), "lm": _part("lm", (), calls), "vlm": _part("vlm", ("clip", "lm"), calls)}
    monkeypatch.setattr(demo, "PARTS", fake)
    return calls


def test_missing_prerequisites_run_first_in_order(tmp_path, parts):
    demo.run_demo(tmp_path, parts=["vlm"], overrides=["--vlm.loop.steps=7"])
    assert parts == [("clip", []), ("lm", []), ("vlm", ["--loop.steps=7"])]


def test_prerequisites_already_in_out_are_reused_and_the_report_keeps_every_section(tmp_path, parts):
    demo.run_demo(tmp_path, parts=["clip", "lm"])
    parts.clear()
    metrics = demo.run_demo(tmp_path, parts=["vlm"])
    assert parts == [("vlm", [])]
    assert set(metrics) == {"clip", "lm", "vlm"}
    report = (tmp_path / "report.md").read_text()
    assert report.index("## clip") < report.index("## lm") < report.index("## vlm")


def test_an_override_must_name_a_part_that_runs(tmp_path, parts):
    with pytest.raises(ConfigError, match="--PART.KEY=VALUE"):
        demo.run_demo(tmp_path, parts=["clip"], overrides=["--loop.steps=3"])
    with pytest.raises(ConfigError, match="unknown demo part"):
        demo.run_demo(tmp_path, parts=["clop"])
