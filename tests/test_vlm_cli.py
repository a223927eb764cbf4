"""``vlkit caption``, ``vqa``, ``ground``, ``chat --image`` and ``eval TASK --model`` on a tiny random
LLaVA saved by transformers (CLIP tower, Llama LM, a ChatML tokenizer with ``<image>``): each
command's output is what the Python API gives for the same processed inputs (``model.generate``
on the processor's left-padded batch, decoded by hand here), batching and left padding change no
answer, ground parses and draws boxes, and bad input is named."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import vlkit  # noqa: E402
from vlkit.cli import main  # noqa: E402
from vlkit.eval.generative import CAPTION_PROMPT, GROUNDING_PROMPT, VQA_PROMPT, load_samples  # noqa: E402
from vlkit.models.llava_processor import LlavaAnswerer, LlavaProcessor  # noqa: E402
from vlkit.text.lm_tokenizer import LMTokenizer  # noqa: E402
from vlkit.vlm_cli import reply_box  # noqa: E402

from _lm_util import chatml_folder  # noqa: E402
from _llava_models import IMAGE_SIZE, edit_config, hf_model, save  # noqa: E402

NEW = 6
COLORS = ("red", "blue", "green")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The LLaVA folder: transformers' weights, a ChatML tokenizer whose ``<image>`` is the
    config's image token, CLIP preprocessing at the tower's 32 pixels."""
    text = dict(vocab_size=402, max_position_embeddings=256)  # room for ChatML's system turn and the eval prompts
    path = save(hf_model(text_overrides=text), tmp_path_factory.mktemp("vlm") / "llava")
    chatml_folder(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "image_token": "<image>"}))
    edit_config(path, image_token_index=LMTokenizer.from_folder(path).token_to_id("<image>"))
    transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return vlkit.load(folder)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three 64x48 images, a coloured rectangle on white each."""
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, color in enumerate(COLORS):
        img = Image.new("RGB", (64, 48), "white")
        ImageDraw.Draw(img).rectangle([4 + 8 * i, 8, 40, 30], fill=color)
        img.save(root / f"img{i}.png")
        paths.append(root / f"img{i}.png")
    return paths


def by_hand(model, batch: dict, new: int = NEW) -> list[str]:
    """``model.generate`` on a processed batch, each row cut at the first EOS (the folder's
    ``<|im_end|>``, also the template's end of turn), decoded without special tokens, stripped."""
    eos = model.generation_config.eos_ids
    assert model.tokenizer.id_to_token(eos[0]) == "<|im_end|>"
    rows = model.generate(**batch, max_new_tokens=new).tolist()
    return [model.tokenizer.decode(r[: next((i for i, t in enumerate(r) if t in eos), len(r))], skip_special_tokens=True).strip()
            for r in rows]  # fmt: skip


def reference(model, paths, prompts, new: int = NEW) -> list[str]:
    """The Python API's answers: each prompt a user turn after its image, one left-padded batch."""
    pil = [Image.open(p).convert("RGB") for p in paths]
    return by_hand(model, LlavaProcessor.for_model(model).prompt_batch(pil, prompts), new)


def run(argv, capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_caption_prints_the_python_api_captions_in_batches(folder, model, images, capsys):
    code, out, _ = run(["caption", "--model", folder, *images, "--batch-size", 2, "--max-new-tokens", NEW], capsys)
    assert code == 0
    lines = out.rstrip("\n").split("\n")
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]
    captions = [line.split("\t", 1)[1] for line in lines]
    assert captions == reference(model, images, [CAPTION_PROMPT] * 3)
    assert len(set(captions)) > 1 and any(captions)  # the pixels reach the model: different images, different text
    code, single, _ = run(["caption", "--model", folder, *images, "--batch-size", 1, "--max-new-tokens", NEW], capsys)
    assert code == 0 and single == out


def test_caption_takes_a_folder_and_a_prompt(folder, model, images, capsys):
    code, out, _ = run(["caption", "--model", folder, images[0].parent, "--prompt", "What is this?", "--max-new-tokens", NEW], capsys)
    assert code == 0
    assert [line.split("\t", 1)[1] for line in out.rstrip("\n").split("\n")] == reference(model, images, ["What is this?"] * 3)


def test_vqa_answers_each_question_as_it_would_alone(folder, model, images, capsys):
    questions = ["What color is the shape?", "How many shapes are there in this picture, and where are they?", "Why?"]
    code, out, _ = run(["vqa", "--model", folder, "--image", images[1], *questions, "--max-new-tokens", NEW], capsys)
    assert code == 0
    answers = out.rstrip("\n").split("\n")
    asked = [VQA_PROMPT.format(question=q) for q in questions]  # as `vlkit eval vqa` asks them
    assert answers == reference(model, [images[1]] * 3, asked)  # one left-padded batch
    assert answers == [reference(model, [images[1]], [q])[0] for q in asked]  # each alone: padding changes nothing


def test_ground_prints_the_reply_and_what_it_makes_of_it(folder, model, images, capsys, tmp_path):
    out_png = tmp_path / "boxed.png"
    code, out, err = run(["ground", "--model", folder, "--image", images[0], "the red box", "--out", out_png,
                          "--max-new-tokens", 12], capsys)  # fmt: skip
    (reply,) = reference(model, [images[0]], [GROUNDING_PROMPT.format(text="the red box")], 12)
    assert out.split("\n")[0] == f"reply: {reply}"
    box, problem = reply_box(reply, 64, 48)
    if box is None:  # a random model rarely writes four numbers: said so, nothing drawn, no traceback
        assert code == 1 and problem in err and not out_png.exists()
    else:
        assert code == 0 and f"box: [{box[0]}, {box[1]}, {box[2]}, {box[3]}]" in out and out_png.is_file()


def test_ground_draws_the_box_it_parses(folder, images, capsys, tmp_path, monkeypatch):
    """The model's reply replaced by a known box: the printed pixels and the drawn outline."""
    asked = []

    def answer(self, images, prompts, max_new_tokens=32, **options):
        asked.append(prompts)
        return ["<ref>the red box</ref><box>[100, 250, 600, 750]</box>"]

    monkeypatch.setattr(LlavaAnswerer, "generate", answer)
    out_png = tmp_path / "sub" / "boxed.png"
    code, out, _ = run(["ground", "--model", folder, "--image", images[1], "the blue box", "--out", out_png], capsys)
    assert code == 0 and asked == [[GROUNDING_PROMPT.format(text="the blue box")]]
    assert "box: [6, 12, 38, 36] (pixels of the 64x48 image" in out  # 100/1000·64 = 6.4, 250/1000·48 = 12, ...
    drawn, original = Image.open(out_png).convert("RGB"), Image.open(images[1]).convert("RGB")
    edges = [(6, 24), (37, 24), (20, 12), (20, 35), (6, 12), (37, 35)]
    assert all(drawn.getpixel(p) == (255, 0, 0) for p in edges)
    changed = {(x, y) for x in range(64) for y in range(48) if drawn.getpixel((x, y)) != original.getpixel((x, y))}
    outline = {(x, y) for x in range(6, 38) for y in range(12, 36) if x in (6, 37) or y in (12, 35)}
    assert changed == outline  # the outline, nothing else


@pytest.mark.parametrize("reply, problem", [
    ("a red box in the middle", "no box in the reply"),
    ("[100, 200, 1200, 300]", "off the image"),
    ("[-5, 200, 500, 300]", "off the image"),
    ("[0, 0, 1000, 1000]", "off the grid"),  # the grid is 0-999: 1000 was taken as the image's edge
    ("[0, 0, 500.5, 999]", "off the grid"),
    ("[500, 500, 400, 600]", "is empty"),
])  # fmt: skip
def test_replies_without_a_usable_box_are_said_so(folder, images, capsys, tmp_path, monkeypatch, reply, problem):
    monkeypatch.setattr(LlavaAnswerer, "generate", lambda self, images, prompts, max_new_tokens=32, **o: [reply])
    code, out, err = run(["ground", "--model", folder, "--image", images[0], "x", "--out", tmp_path / "b.png"], capsys)
    assert code == 1 and out == f"reply: {reply}\n" and problem in err and "expected [x1, y1, x2, y2]" in err
    assert not (tmp_path / "b.png").exists()


def test_qwen_vl_box_text_parses():
    assert reply_box("<box>(100,250),(600,750)</box>", 640, 480) == ((64, 120, 384, 360), "")
    assert reply_box("[0, 0, 999, 999]", 1000, 100) == ((0, 0, 999, 100), "")


def test_chat_with_an_image_answers_as_the_api(folder, model, images, capsys):
    code, out, _ = run(["chat", "--model", folder, "--image", images[2], "--prompt", "What is it?", "--max-new-tokens", NEW], capsys)
    assert code == 0 and out == reference(model, [images[2]], ["What is it?"])[0] + "\n"


def chat_reference(model, paths, messages) -> str:
    proc = LlavaProcessor.for_model(model)
    pil = [Image.open(p).convert("RGB") for p in paths]
    batch = proc.collate([proc.encode(messages, pil, add_generation_prompt=True)], "left")
    del batch["labels"]
    return by_hand(model, batch)[0]


def test_chat_puts_images_at_their_placeholders(folder, model, images, capsys):
    code, out, _ = run(["chat", "--model", folder, "--image", images[0], "--image", images[1], "--prompt",
                        "Compare <image> with <image>.", "--max-new-tokens", NEW], capsys)  # fmt: skip
    assert code == 0
    assert out == chat_reference(model, images[:2], [{"role": "user", "content": "Compare <image> with <image>."}]) + "\n"
    swapped = chat_reference(model, images[1::-1], [{"role": "user", "content": "Compare <image> with <image>."}])
    assert out != swapped + "\n"  # the images' order reaches the model


def test_chat_keeps_the_image_and_history_across_turns(folder, model, images, capsys, monkeypatch):
    code, out, err = run(["chat", "--model", folder, "--image", images[0], "--max-new-tokens", NEW], capsys,
                         stdin="Describe it.\nAnd now?\n/exit\nnever read\n", monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0 and err == "" and out.count("\n") == 2
    first, second = out.split("\n")[:2]
    history = [{"role": "user", "content": "<image>\nDescribe it."}]
    assert first == chat_reference(model, images[:1], history)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And now?"}]
    assert second == chat_reference(model, images[:1], history)


def test_chat_with_beams_prints_the_beam_answer(folder, model, images, capsys):
    code, out, _ = run(["chat", "--model", folder, "--image", images[0], "--prompt", "Hi", "--num-beams", 3,
                        "--max-new-tokens", NEW], capsys)  # fmt: skip
    batch = LlavaProcessor.for_model(model).prompt_batch([Image.open(images[0]).convert("RGB")], ["Hi"])
    rows = model.generate(**batch, max_new_tokens=NEW, num_beams=3).tolist()
    eos = model.generation_config.eos_ids
    expected = model.tokenizer.decode([t for t in rows[0] if t not in eos], skip_special_tokens=True).strip()
    assert code == 0 and out == expected + "\n"


@pytest.mark.parametrize("task, fmt", [("caption", "coco"), ("vqa", "vqav2"), ("grounding", "refcoco"), ("mcq", "mmbench")])
def test_eval_runs_a_loaded_vlm_in_left_padded_batches(folder, model, capsys, tmp_path, task, fmt):
    from vlkit.data.formats.shapes_export import export
    from vlkit.data.shapes import ShapesWorld

    data = tmp_path / fmt
    export(ShapesWorld(image_size=64, max_objects=2, seed=3), 2, data, fmt)
    samples = load_samples(task, data)[:6]
    code, out, err = run(["eval", task, "--model", folder, "--data", data, "--batch-size", 4, "--max-new-tokens", NEW,
                          "--out", tmp_path / "out"], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads(out[: out.rindex("}") + 1])["task"] == task
    rows = {r["id"]: r["prediction"] for r in map(json.loads, (tmp_path / "out" / "predictions.jsonl").read_text().splitlines())}
    alone = {s.id: by_hand(model, LlavaProcessor.for_model(model).prompt_batch([s.image()], [s.prompt]))[0] for s in samples}
    assert {k: rows[k] for k in alone} == alone  # batched with others (left-padded) = each sample alone
    first = LlavaProcessor.for_model(model).prompt_batch([s.image() for s in samples[:4]], [s.prompt for s in samples[:4]])
    assert bool((first["attention_mask"] == 0).any()) == (task != "caption")  # the first batch was padded (captions: one prompt)


def test_bad_images_are_named(folder, images, capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    for argv, match in [
        (["caption", "--model", folder, images[0], tmp_path / "missing.png"], "missing.png: file not found"),
        (["caption", "--model", folder, bad], "bad.png: corrupt or truncated image"),
        (["vqa", "--model", folder, "--image", tmp_path / "missing.png", "why?"], "missing.png: file not found"),
        (["ground", "--model", folder, "--image", bad, "x"], "bad.png: corrupt or truncated image"),
        (["chat", "--model", folder, "--image", bad, "--prompt", "hi"], "bad.png: corrupt or truncated image"),
    ]:
        code, out, err = run(argv, capsys)
        assert code == 2 and match in err and err.startswith("vlkit: error:") and "Traceback" not in err, (argv, err)


def test_placeholders_that_do_not_match_the_images_are_named(folder, images, capsys):
    code, _, err = run(["chat", "--model", folder, "--image", images[0], "--prompt", "<image> and <image>?"], capsys)
    assert code == 2 and "2 <image> placeholder(s) but 1 image(s)" in err
    code, _, err = run(["vqa", "--model", folder, "--image", images[0], "what is <image>?"], capsys)
    assert code == 2 and "2 <image> placeholder(s)" in err and "1 image(s)" in err


def test_commands_refuse_folders_that_are_not_vlms(images, capsys, tmp_path):
    from _lm_models import hf_model as lm_model

    lm = tmp_path / "lm"
    lm_model("llama").save_pretrained(lm)
    code, _, err = run(["caption", "--model", lm, images[0]], capsys)
    assert code == 2 and "holds a LlamaLM, not a vision-language model (LLaVA); caption needs one" in err
    code, _, err = run(["chat", "--model", lm, "--image", images[0], "--prompt", "hi"], capsys)
    assert code == 2 and "--image needs a vision-language model (LLaVA); this folder holds a LlamaLM" in err


def test_ground_refuses_a_bad_out_before_loading(folder, images, capsys, tmp_path):
    code, _, err = run(["ground", "--model", tmp_path / "no-model", "--image", images[0], "x", "--out", tmp_path], capsys)
    assert code == 2 and "is a folder; expected an image file name" in err
    code, _, err = run(["ground", "--model", tmp_path / "no-model", "--image", images[0], "x", "--out", tmp_path / "b.xyz"], capsys)
    assert code == 2 and "unknown image type '.xyz'" in err
    (tmp_path / "afile").write_text("not a folder")
    code, _, err = run(["ground", "--model", tmp_path / "no-model", "--image", images[0], "x", "--out", tmp_path / "afile" / "b.png"],
                       capsys)  # fmt: skip
    assert code == 2 and "afile is a file; expected a folder there" in err  # named before the (missing) model


def test_caption_of_a_folder_without_images_is_an_error(folder, capsys, tmp_path):
    code, _, err = run(["caption", "--model", folder, tmp_path], capsys)
    assert code == 2 and "vlkit: error: no images found" in err


def test_a_seed_repeats_sampled_captions(folder, images, capsys):
    argv = ["caption", "--model", folder, images[0], "--temperature", "1.5", "--max-new-tokens", NEW]
    first, again = (run([*argv, "--seed", 7], capsys)[1] for _ in range(2))
    assert first == again and first.strip()
    torch.manual_seed(0)  # leave the global generator in a fresh state for other tests


@given(st.lists(st.text(alphabet=" \nab", max_size=4), max_size=8))
def test_streamed_answers_are_stripped_as_whole_answers_are(pieces):
    from vlkit.chat import _stripped

    out = list(_stripped(iter(pieces)))
    assert "".join(out) == "".join(pieces).strip() and all(out)


@pytest.fixture(scope="module")
def next_folder(tmp_path_factory):
    """A LLaVA-NeXT folder (AnyRes tiles of the 32-pixel tower) with the ChatML tokenizer."""
    from _serve_util import next_vlm_folder

    return next_vlm_folder(tmp_path_factory.mktemp("vlm") / "llava_next")


def test_llava_next_answers_through_its_anyres_processor(next_folder, images, capsys, tmp_path):
    from vlkit.models.llava_next import LlavaNextProcessor

    model = vlkit.load(next_folder)
    tall = tmp_path / "tall.png"
    Image.open(images[0]).rotate(90, expand=True).save(tall)  # 48x64: another tiling than the 64x48 images
    paths = [images[0], tall]
    code, out, err = run(["caption", "--model", next_folder, *paths, "--batch-size", 2, "--max-new-tokens", NEW], capsys)
    assert code == 0, err
    proc = LlavaNextProcessor.for_model(model)
    pil = [Image.open(p).convert("RGB") for p in paths]
    batch = proc.prompt_batch(pil, [CAPTION_PROMPT] * 2)
    assert bool((batch["attention_mask"] == 0).any())  # the two tilings take different token counts: left padding
    assert [line.split("\t", 1)[1] for line in out.rstrip("\n").split("\n")] == by_hand(model, batch)
    code, out, err = run(["chat", "--model", next_folder, "--image", tall, "--prompt", "Hi", "--max-new-tokens", NEW], capsys)
    assert code == 0 and out == by_hand(model, proc.prompt_batch(pil[1:], ["Hi"]))[0] + "\n"
