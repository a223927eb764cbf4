"""caption / vqa / grounding / mcq: scoring prediction files and running a `generate` model on
the shapes exports, with results.json, predictions.jsonl and the report written."""

import json

import pytest

from vlkit.boxes import format_box
from vlkit.data.formats.common import FormatError
from vlkit.data.images import BadSample
from vlkit.data.skips import Skips
from vlkit.errors import VlkitError
from vlkit.data.formats.shapes_export import export
from vlkit.eval.generative import load_samples, read_predictions, run_generative, score_predictions_file

N = 8
DATA = {"caption": ("coco", ""), "vqa": ("vqav2", ""), "grounding": ("refcoco", ""), "mcq": ("mmbench", "mmbench.tsv")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    out = {}
    for task, (fmt, file) in DATA.items():
        export(3, N, root / fmt, fmt)
        out[task] = root / fmt / file if file else root / fmt
    export(3, N, root / "mathvista", "mathvista")
    out["numeric"] = root / "mathvista"
    return out


def oracle(sample, task):
    t = sample.target
    return {"caption": lambda: t["references"][0], "vqa": lambda: t["answers"][0].upper() + ".",
            "grounding": lambda: str(t["box"]), "mcq": lambda: f"The answer is ({t['answer']})"}[task]()  # fmt: skip


def write_jsonl(path, preds):
    path.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in preds.items()))
    return path


@pytest.mark.parametrize("task", list(DATA))
def test_perfect_predictions_score_perfectly(task, data, tmp_path):
    samples = load_samples(task, data[task])
    preds = write_jsonl(tmp_path / "p.jsonl", {s.id: oracle(s, task) for s in samples})
    res = score_predictions_file(task, preds, data[task], tmp_path / "out")
    key = {"caption": "bleu1", "vqa": "accuracy", "grounding": "acc@0.5", "mcq": "accuracy"}[task]
    assert res[key] == pytest.approx(1.0, abs=1e-6)
    assert res["counts"]["samples"] == len(samples) and res["counts"]["missing_predictions"] == 0
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written[key] == pytest.approx(res[key])
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in samples]
    report = (tmp_path / "out" / "report.md").read_text()
    for png in [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (tmp_path / "out" / png).stat().st_size > 1000
    assert "examples.png" in report


def test_wrong_missing_empty_and_unparsed_are_counted(data, tmp_path):
    samples = load_samples("mcq", data["mcq"])
    preds = {s.id: oracle(s, "mcq") for s in samples}
    ids = [s.id for s in samples]
    del preds[ids[0]]  # missing -> wrong
    preds[ids[1]] = ""  # empty -> wrong
    preds[ids[2]] = "I am not sure"  # unparsed -> wrong, never a random guess
    wrong = next(k for k in "ABCD" if k != samples[3].target["answer"])
    preds[ids[3]] = wrong
    res = score_predictions_file("mcq", write_jsonl(tmp_path / "p.jsonl", preds), data["mcq"])
    assert res["accuracy"] == pytest.approx((len(samples) - 4) / len(samples))
    c = res["counts"]
    # unparsed counts every answer that names no option: the missing, the empty and the vague one
    assert (c["missing_predictions"], c["empty_predictions"], c["unparsed_answers"]) == (1, 1, 3)


def test_numeric_answers(data, tmp_path):
    samples = load_samples("mcq", data["numeric"])
    preds = {s.id: f"There are {s.target['answer']} of them." for s in samples}
    preds[samples[0].id] = "many"
    res = score_predictions_file("mcq", write_jsonl(tmp_path / "p.jsonl", preds), data["numeric"])
    assert res["accuracy"] == pytest.approx((len(samples) - 1) / len(samples))
    assert res["counts"]["unparsed_answers"] == 1


def test_vqa_per_type_and_coco_result_format(data, tmp_path):
    samples = load_samples("vqa", data["vqa"])
    # VQAv2 result format: [{"question_id", "answer"}]; wrong on every count question
    results = [{"question_id": int(s.id), "answer": "99" if s.group == "count" else oracle(s, "vqa")} for s in samples]
    p = tmp_path / "r.json"
    p.write_text(json.dumps(results))
    res = score_predictions_file("vqa", p, data["vqa"])
    assert res["accuracy_per_question_type"]["count"] == 0.0
    assert all(v == 1.0 for k, v in res["accuracy_per_question_type"].items() if k != "count")


def test_caption_partial_predictions_lower_scores(data, tmp_path):
    samples = load_samples("caption", data["caption"])
    preds = {s.id: s.target["references"][-1] for s in samples}  # "N objects": a weak caption
    res = score_predictions_file("caption", write_jsonl(tmp_path / "p.jsonl", preds), data["caption"])
    assert 0 < res["cider"] < 5 and res["bleu4"] < 1


def test_bad_prediction_files(data, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "0", "prediction": "a"}\n{"id": "0", "prediction": "b"}\n')
    with pytest.raises(FormatError, match=r"p\.jsonl, line 2: duplicate id '0'"):
        read_predictions(p)
    p.write_text('{"id": "0", "prediction": "a"}\n{"id": 1, "prediction": \n')
    with pytest.raises(FormatError, match=r"p\.jsonl, line 2: malformed JSON"):
        read_predictions(p)
    p.write_text('{"id": "0", "text": ["a"]}\n')
    with pytest.raises(FormatError, match=r"line 1: the prediction is a JSON array \(\['a'\]\); expected string"):
        read_predictions(p)
    p.write_text('{"id": "no-such-id", "prediction": "a"}\n')
    with pytest.raises(FormatError, match=r"p\.jsonl: 1 prediction id\(s\) not in the data, e.g. \['no-such-id'\]"):
        score_predictions_file("caption", p, data["caption"])


class FakeVLM:
    """Answers given in sample order (a stand-in until a generative model lands)."""

    def __init__(self, samples, answer):
        self.queue = [(s.prompt, answer(s)) for s in samples]
        self.calls = []

    def generate(self, images, prompts, max_new_tokens=32):
        self.calls.append(len(prompts))
        assert all(im.size == (64, 64) for im in images)
        out = []
        while len(out) < len(prompts):
            prompt, answer = self.queue.pop(0)
            if prompt == prompts[len(out)]:
                out.append(answer)
        return out


@pytest.mark.parametrize("task", ["vqa", "grounding"])
def test_generate_interface_end_to_end(task, data, tmp_path):
    samples = load_samples(task, data[task])
    # a model answers boxes on the 0-999 grid (vlkit's convention, the default for models)
    grid = lambda s: format_box(s.target["box"], "norm1000", s.target["width"], s.target["height"])  # noqa: E731
    model = FakeVLM(samples, grid if task == "grounding" else lambda s: oracle(s, task))
    res = run_generative(task, model, str(data[task]), tmp_path, batch_size=16)
    assert res["acc@0.5" if task == "grounding" else "accuracy"] == pytest.approx(1.0)
    assert max(model.calls) <= 16 and sum(model.calls) == len(samples)
    assert (tmp_path / "report.md").is_file() and res["skipped"]["total"] == 0


def test_generate_skips_and_counts_missing_images(data, tmp_path):
    import shutil

    folder = tmp_path / "coco"
    shutil.copytree(data["caption"], folder)
    (folder / "images" / "shapes_000000000002.png").unlink()
    samples = load_samples("caption", folder)
    with pytest.raises(BadSample, match=r"captions_karpathy.json, image id 2: image .*shapes_000000000002.png: file not found"):
        run_generative("caption", FakeVLM(samples, lambda s: "a shape"), folder, batch_size=3)
    model = FakeVLM(samples, lambda s: "a shape")
    res = run_generative("caption", model, folder, tmp_path / "out", batch_size=3, skips=Skips("skip"))
    assert res["skipped"]["by_reason"] == {"bad image": 1} and "shapes_000000000002.png" in res["skipped"]["examples"]["bad image"][0]
    assert res["counts"]["samples"] == len(samples) - 1 and res["counts"]["missing_predictions"] == 0  # left out, not scored
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["reason"], s["source"], s["record"]) for s in skipped] == [("bad image", str(folder / "captions_karpathy.json"), "image id 2")]
    assert skipped[0]["detail"].endswith("shapes_000000000002.png: file not found")


def test_model_without_generate_is_refused(data):
    with pytest.raises(VlkitError, match="object has no generate.*or score a file with --predictions"):
        run_generative("caption", object(), data["caption"])
