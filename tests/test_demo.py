"""The demo's orchestration: part order, prerequisites and per-part overrides (fake parts, no training)."""

import json
from types import SimpleNamespace

import pytest

import vlkit.demo as demo
from vlkit.errors import ConfigError


def _part(name, requires, calls, events):
    def run(out, quick, overrides):
        done = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
        events.append(("metrics before", name, sorted(done)))
        (out / name).mkdir(exist_ok=True)
        (out / name / "config.json").write_text("{}")
        calls.append((name, overrides))
        events.append(("run", name))
        return {"score": len(calls)}, f"## {name}\n"

    def estimate(out, quick, overrides):
        events.append(("estimate", name, sorted(r for r in requires if (out / r / "config.json").is_file())))
        return 90.0, f"the {name} plan"

    def stand_in(folder, quick, overrides):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        print("noise a stand-in's training prints")
        events.append(("stand_in", name))

    return SimpleNamespace(REQUIRES=requires, run=run, estimate=estimate, stand_in=stand_in)


@pytest.fixture
def events():
    return []


@pytest.fixture
def parts(monkeypatch, events):
    calls = []
    fake = {n: _part(n, r, calls, events) for n, r in (("clip", ()), ("lm", ()), ("vlm", ("clip", "lm")))}
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


def test_every_part_is_timed_before_any_trains_on_stand_ins_for_prerequisites_not_trained(tmp_path, parts, events, capsys):
    demo.run_demo(tmp_path, parts=["vlm"])
    runs = [e for e in events if e[0] == "metrics before"]
    assert [e for e in events if e not in runs] == [
        ("stand_in", "clip"), ("stand_in", "lm"), ("estimate", "clip", []), ("estimate", "lm", []),
        ("estimate", "vlm", ["clip", "lm"]), ("run", "clip"), ("run", "lm"), ("run", "vlm")]  # fmt: skip
    # each part finds the metrics of the parts before it written (the VLM adds the LM's training time to its own)
    assert runs == [("metrics before", "clip", []), ("metrics before", "lm", ["clip"]), ("metrics before", "vlm", ["clip", "lm"])]
    out = capsys.readouterr().out
    assert "noise" not in out
    assert out.index("[demo] vlm: about 1.5 min of training: the vlm plan") < out.index("[demo] clip: training")
    assert "about 4 min of training in all" in out


def test_trained_prerequisites_are_timed_as_they_are(tmp_path, parts, events):
    demo.run_demo(tmp_path, parts=["clip"])
    events.clear()
    demo.run_demo(tmp_path, parts=["vlm"])
    timed = [e for e in events if e[0] != "metrics before"]
    assert timed == [("stand_in", "lm"), ("estimate", "lm", []), ("estimate", "vlm", ["clip", "lm"]), ("run", "lm"), ("run", "vlm")]
    events.clear()
    demo.run_demo(tmp_path, parts=["vlm"])
    assert [e for e in events if e[0] != "metrics before"] == [("estimate", "vlm", ["clip", "lm"]), ("run", "vlm")]
