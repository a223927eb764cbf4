"""BLIP-2 (stage 2) loaded from transformers folders gives transformers' logits (within 1e-4) and greedy
tokens on a left-padded batch made by transformers' own ``Blip2Processor`` (OPT and Llama LMs,
``Blip2ForConditionalGeneration`` and ``Blip2Model``), its loss on vlkit's training batches; vlkit's
processor makes transformers' inputs; the answerer, the commands and ``vlkit eval`` answer with
BLIP-2's prompts; stage-2 training reaches only the Q-Former and the projection; native folders and
exports round-trip; bad input is named."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlkit  # noqa: E402
from vlkit.errors import CheckpointError, VlkitError  # noqa: E402
from vlkit.eval.generative import CAPTION_PROMPT, VQA_PROMPT, answerer, blip2_prompt  # noqa: E402
from vlkit.models.blip2 import Blip2  # noqa: E402
from vlkit.models.blip2_processor import Blip2Answerer, Blip2Processor  # noqa: E402
from vlkit.train.checkpoint import save_model  # noqa: E402

from _blip2_models import PROMPTS, QUERIES, edit_config, folder_with_files, hf_batch, hf_model, images  # noqa: E402
from _interop_util import convert  # noqa: E402
from _lm_models import hf_positions, real  # noqa: E402

TOL = 1e-4
NEW = 8


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    """``(transformers model, its processor, folder, vlkit's load)`` for the OPT variant."""
    hf = hf_model("opt")
    folder, proc = folder_with_files(hf, tmp_path_factory.mktemp("blip2") / "opt")
    return hf, proc, folder, vlkit.load(folder)


@torch.no_grad()
def hf_logits(hf, batch, **kwargs):
    """transformers' forward with the positions its ``generate`` gives a padded batch."""
    return hf(**batch, position_ids=hf_positions(batch["attention_mask"]), **kwargs)


@pytest.mark.parametrize("lm,architecture", [("opt", "Blip2ForConditionalGeneration"), ("llama", "Blip2ForConditionalGeneration"),
                                             ("opt", "Blip2Model")])
@torch.no_grad()
def test_logits_match_transformers_on_its_processors_left_padded_batch(tmp_path, lm, architecture):
    hf = hf_model(lm, architecture)
    folder, proc = folder_with_files(hf, tmp_path)
    model = vlkit.load(folder)
    assert isinstance(model, Blip2) and model.cfg.lm_type == lm and model.num_image_tokens() == QUERIES
    batch = hf_batch(proc)
    mask = batch["attention_mask"]
    assert bool((mask[:, QUERIES] == 0).any()), "the batch has padding between the image tokens and the text"
    ref = hf_logits(hf, batch).logits
    out = model(**batch).logits
    assert out.shape == ref.shape
    assert (real(out, mask) - real(ref, mask)).abs().max().item() <= TOL


@pytest.mark.parametrize("lm", ["opt", "llama"])
def test_greedy_generation_is_token_identical_to_transformers(tmp_path, lm):
    hf = hf_model(lm, seed=1)
    folder, proc = folder_with_files(hf, tmp_path)
    model = vlkit.load(folder)
    batch = hf_batch(proc)
    with torch.no_grad():
        want = hf.generate(**batch, max_new_tokens=NEW, do_sample=False, eos_token_id=None)[:, batch["input_ids"].shape[1] :]
    got = model.generate(**batch, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    assert got.shape == (3, NEW)
    assert torch.equal(got, want)
    assert len({tuple(r) for r in got.tolist()}) > 1  # the rows differ: images and prompts reach the model


def test_beams_and_image_only_prompts_match_transformers(opt):
    """Beam search runs through the same engine; without input_ids both start from the image tokens and BOS."""
    hf, proc, _, model = opt
    batch = hf_batch(proc)
    with torch.no_grad():
        want = hf.generate(**batch, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None)
        bare = hf.generate(pixel_values=batch["pixel_values"], max_new_tokens=5, do_sample=False, eos_token_id=None)
    got = model.generate(**batch, max_new_tokens=5, num_beams=3, num_return_sequences=2, eos_token_id=None)
    assert torch.equal(got, want[:, batch["input_ids"].shape[1] :])
    got_bare = model.generate(pixel_values=batch["pixel_values"], max_new_tokens=5, eos_token_id=None)
    assert torch.equal(got_bare, bare[:, QUERIES + 1 :])


@torch.no_grad()
def test_padding_between_image_tokens_and_text_changes_nothing(opt):
    """transformers' layout ([image][pad][text]) and padding moved to the front give the same logits and
    tokens as each prompt alone."""
    _, proc, _, model = opt
    batch = hf_batch(proc)
    mask = batch["attention_mask"]
    logits = model(**batch).logits
    for i in range(3):
        keep = mask[i].bool()
        alone = model(batch["input_ids"][i : i + 1, keep], batch["pixel_values"][i : i + 1]).logits[0]
        assert (alone - logits[i, keep]).abs().max().item() <= TOL
        one = model.generate(batch["input_ids"][i : i + 1, keep], batch["pixel_values"][i : i + 1], max_new_tokens=NEW,
                             eos_token_id=None)
        assert torch.equal(one[0], model.generate(**batch, max_new_tokens=NEW, eos_token_id=None)[i])


def test_processor_makes_transformers_inputs(opt):
    hf, proc, _, model = opt
    want = hf_batch(proc)
    got = Blip2Processor.for_model(model)(PROMPTS, images())
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"], want["attention_mask"])
    assert (got["pixel_values"] - want["pixel_values"]).abs().max().item() <= 1e-5
    proc.tokenizer.padding_side = "right"
    right = dict(proc(images=images(), text=PROMPTS, return_tensors="pt", padding=True))
    ours = Blip2Processor.for_model(model)(PROMPTS, images(), padding_side="right")
    assert torch.equal(ours["input_ids"], right["input_ids"]) and torch.equal(ours["attention_mask"], right["attention_mask"])
    text_only = Blip2Processor.for_model(model)(PROMPTS)
    assert set(text_only) == {"input_ids", "attention_mask"} and not bool((text_only["input_ids"] == 260).any())


def test_training_batch_supervises_only_the_target_and_gives_transformers_loss(opt):
    hf, _, _, model = opt
    targets = ["red", "a blue square", "two green things"]
    batch = Blip2Processor.for_model(model).training_batch(images(), PROMPTS, targets)
    text = Blip2Processor.for_model(model).training_text(PROMPTS, targets)
    assert set(text) == {"input_ids", "attention_mask", "labels"} and all(torch.equal(text[k], batch[k]) for k in text)
    tok, ids, labels = model.tokenizer, batch["input_ids"], batch["labels"]
    assert bool((ids[:, :QUERIES] == 260).all()) and bool((labels[:, :QUERIES] == -100).all())
    for i, target in enumerate(targets):
        supervised = labels[i][labels[i] != -100].tolist()
        assert supervised[-1] == tok.eos_token_id and tok.decode(supervised[:-1]).strip() == target
        real_ids = ids[i][batch["attention_mask"][i].bool()].tolist()
        assert real_ids[-len(supervised) :] == supervised  # the target ends the sample, padding after it
    with torch.no_grad():
        ref = hf(**batch).loss
        out = model(**batch).loss
        tail = model(**{**batch, "labels": labels[:, QUERIES:]}).loss  # labels of the text alone, aligned to the end
    assert abs(out.item() - ref.item()) <= TOL and abs(tail.item() - out.item()) <= 1e-6
    logits = model(**batch).logits[:, :-1]
    keep = labels[:, 1:] != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[:, 1:][keep])
    assert abs(out.item() - manual.item()) <= 1e-5


def test_image_positions_are_never_supervised(opt):
    _, _, _, model = opt
    batch = Blip2Processor.for_model(model).training_batch(images(), PROMPTS, ["a", "b", "c"])
    everything = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    no_images = everything.masked_fill(batch["input_ids"] == 260, -100)
    with torch.no_grad():
        assert model(**{**batch, "labels": everything}).loss.item() == model(**{**batch, "labels": no_images}).loss.item()


def test_stage2_trains_the_qformer_and_projection_only(tmp_path):
    hf = hf_model("opt")
    folder, _ = folder_with_files(hf, tmp_path)
    model = vlkit.load(folder)
    assert model.cfg.freeze_vision and model.cfg.freeze_lm
    assert not any(p.requires_grad for p in model.vision.parameters()) and not any(p.requires_grad for p in model.lm.parameters())
    model.train()
    assert model.qformer.training and not model.vision.training and not model.lm.training
    batch = Blip2Processor.for_model(model).training_batch(images(), PROMPTS, ["red", "blue", "green"])
    model(**batch).loss.backward()
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"qformer", "language_projection"}
    assert model.qformer.image_norm.weight.grad.abs().sum() > 0  # the features' LayerNorm trains with the frozen tower


def test_from_parts_takes_a_trained_tower_and_lm(tmp_path):
    """The stage-2 starting point: a CLIP-style tower (its final norm dropped) and a Llama LM keep their
    weights; a fresh Q-Former and projection sit between them and a native folder reloads it."""
    from vlkit.connectors.qformer import QFormerConfig
    from vlkit.lm import LlamaConfig, LlamaLM
    from vlkit.vision.vit import ViT, ViTConfig

    from _interop_util import perturb

    torch.manual_seed(0)
    tower = perturb(ViT(ViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4)), scale=0.1)
    lm = perturb(LlamaLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)), scale=0.1)
    qformer = QFormerConfig(width=32, depth=2, num_heads=4, mlp_dim=48, num_queries=3, context_dim=1)
    model = Blip2.from_parts(tower, lm, qformer, image_token_id=63)
    assert model.cfg.qformer.context_dim == 32 and model.cfg.lm_type == "llama" and not hasattr(model.vision.norm, "weight")
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.cat([torch.full((2, 3), 63), torch.randint(1, 60, (2, 5))], 1)
    with torch.no_grad():
        assert torch.equal(model.vision.transformer(model.vision.embed(pixels))[0], tower.transformer(tower.embed(pixels))[0])
        assert torch.equal(model.lm(ids[:, 3:]).logits, lm(ids[:, 3:]).logits)
    labels = ids.clone()
    model.train()
    model(ids, pixels, labels=labels).loss.backward()
    assert model.language_projection.weight.grad.abs().sum() > 0 and lm.embed_tokens.weight.grad is None
    save_model(tmp_path / "native", model.eval(), "blip2")
    again = vlkit.load(tmp_path / "native")
    with torch.no_grad():
        assert torch.equal(again(ids, pixels).logits, model(ids, pixels).logits)


@torch.no_grad()
def test_native_folder_round_trips_with_its_files(opt, tmp_path):
    _, _, _, model = opt
    batch = Blip2Processor.for_model(model)(PROMPTS, images())
    want = model(**batch).logits
    save_model(tmp_path / "native", model, "blip2")
    again = vlkit.load(tmp_path / "native")
    assert isinstance(again, Blip2) and again.cfg == model.cfg
    assert torch.equal(again(**batch).logits, want)
    assert again.tokenizer.encode("a photo of") == model.tokenizer.encode("a photo of")
    assert again.processor.size == model.processor.size and again.generation_config == model.generation_config


@pytest.mark.parametrize("lm", ["opt", "llama"])
@torch.no_grad()
def test_convert_to_hf_gives_transformers_the_same_logits(tmp_path, lm):
    hf = hf_model(lm)
    src, proc = folder_with_files(hf, tmp_path / "src")
    assert convert("--to", "hf", str(src), str(tmp_path / "out")) == 0
    again, info = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    batch = hf_batch(proc)
    mask = batch["attention_mask"]
    ref = hf_logits(hf, batch).logits
    assert (real(hf_logits(again.eval(), batch).logits, mask) - real(ref, mask)).abs().max().item() <= TOL
    back = vlkit.load(tmp_path / "out")
    assert (real(back(**batch).logits, mask) - real(ref, mask)).abs().max().item() <= TOL
    assert back.processor.size == 32 and back.tokenizer.encode("a photo of") == proc.tokenizer("a photo of").input_ids


# ---------------------------------------------------------------- answering
def test_eval_prompts_become_blip2_prompts():
    assert blip2_prompt(CAPTION_PROMPT) == "a photo of"
    assert blip2_prompt(VQA_PROMPT.format(question="What color is the star?")) == "Question: What color is the star? Short answer:"
    assert blip2_prompt("Describe it in detail.") == "Describe it in detail."
    assert Blip2Answerer.question_prompt(" How many? ") == "Question: How many? Short answer:"


def test_answerer_answers_with_blip2_prompts_as_transformers_decodes(opt):
    hf, proc, _, model = opt
    vlm = answerer(model)
    assert isinstance(vlm, Blip2Answerer)
    questions = ["what color is it?", "how many shapes?", "is there a star?"]
    got = vlm.generate(images(), [CAPTION_PROMPT] * 3, max_new_tokens=NEW)
    got_vqa = vlm.generate(images(), [VQA_PROMPT.format(question=q) for q in questions], max_new_tokens=NEW)
    with torch.no_grad():
        cap = hf_batch(proc, ["a photo of"] * 3)
        want = hf.generate(**cap, max_new_tokens=NEW, do_sample=False)[:, cap["input_ids"].shape[1] :]
        vqa = hf_batch(proc, [f"Question: {q} Short answer:" for q in questions])
        want_vqa = hf.generate(**vqa, max_new_tokens=NEW, do_sample=False)[:, vqa["input_ids"].shape[1] :]
    assert got == [t.strip() for t in proc.batch_decode(want, skip_special_tokens=True)]
    assert got_vqa == [t.strip() for t in proc.batch_decode(want_vqa, skip_special_tokens=True)]
    with pytest.raises(VlkitError, match="no conversation template"):
        answerer(model, "llava_v1")
    with pytest.raises(VlkitError, match="sample 1: no image"):
        vlm.generate([images(1)[0], None], ["a", "b"])


def test_caption_vqa_and_eval_commands_take_a_blip2_folder_and_chat_refuses_it(opt, tmp_path, capsys):
    from vlkit.cli import main
    from vlkit.data.formats.shapes_export import export
    from vlkit.data.shapes import ShapesWorld
    from vlkit.eval.generative import load_samples

    _, _, folder, model = opt
    paths = []
    for i, img in enumerate(images()):
        img.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    vlm = answerer(model)
    assert main(["caption", "--model", str(folder), *paths, "--batch-size", "2", "--max-new-tokens", str(NEW)]) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert [line.split("\t", 1)[1] for line in lines] == vlm.generate(images(), [CAPTION_PROMPT] * 3, max_new_tokens=NEW)
    assert main(["vqa", "--model", str(folder), "--image", paths[0], "what is it?", "how many?", "--max-new-tokens", str(NEW)]) == 0
    answers = capsys.readouterr().out.rstrip("\n").split("\n")
    asked = [Blip2Answerer.question_prompt(q) for q in ("what is it?", "how many?")]
    assert answers == vlm.generate([images(1)[0]] * 2, asked, max_new_tokens=NEW)
    assert main(["chat", "--model", str(folder), "--image", paths[0], "--prompt", "hi"]) == 2
    assert "Blip2 answers single prompts, not conversations; use vlkit caption or vlkit vqa" in capsys.readouterr().err
    for task, fmt in (("caption", "coco"), ("vqa", "vqav2")):
        data = tmp_path / fmt
        export(ShapesWorld(image_size=64, max_objects=2, seed=3), 2, data, fmt)
        out = tmp_path / f"out_{task}"
        assert main(["eval", task, "--model", str(folder), "--data", str(data), "--batch-size", "4", "--max-new-tokens", "4",
                     "--out", str(out)]) == 0
        capsys.readouterr()
        rows = {r["id"]: r["prediction"] for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
        sample = load_samples(task, data)[0]
        assert rows[sample.id] == vlm.generate([sample.image()], [sample.prompt], max_new_tokens=4)[0]


# ---------------------------------------------------------------- bad input
def test_a_query_count_that_differs_from_the_config_is_named(tmp_path):
    hf = hf_model("opt")
    folder, _ = folder_with_files(hf, tmp_path)
    edit_config(folder, num_query_tokens=6)
    with pytest.raises(CheckpointError, match=r"query_tokens holds 4 queries .* num_query_tokens=6"):
        vlkit.load(folder)
    edit_config(folder, num_query_tokens=4)
    processor = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**processor, "num_query_tokens": 5}))
    with pytest.raises(CheckpointError, match=r"processor_config.json: num_query_tokens is 5 but config.json's is 4"):
        vlkit.load(folder)


def test_images_of_the_wrong_size_are_named(opt):
    _, _, _, model = opt
    batch = Blip2Processor.for_model(model)(PROMPTS, images())
    with pytest.raises(VlkitError, match=r"24x24 images; this BLIP-2's vision tower takes 32x32"):
        model(batch["input_ids"], torch.randn(3, 3, 24, 24), batch["attention_mask"])
    with pytest.raises(VlkitError, match=r"40x32 images"):
        model.generate(batch["input_ids"], torch.randn(3, 3, 40, 32), batch["attention_mask"], max_new_tokens=2)
    with pytest.raises(VlkitError, match=r"pixel_values must be \[images, 3, H, W\]"):
        model(batch["input_ids"], batch["pixel_values"][0], batch["attention_mask"])


def test_text_longer_than_the_positions_is_named(opt):
    _, _, _, model = opt
    long = "a photo of " + "many shapes " * 20
    with pytest.raises(VlkitError, match=r"sample 1: 4 image tokens \+ \d+ text tokens = \d+, more than the language model's 128 positions"):
        Blip2Processor.for_model(model)(["a photo of", long], images(2))
    with pytest.raises(VlkitError, match=r"sample 0: .* 128 positions"):
        Blip2Processor.for_model(model).training_batch(images(1), ["a photo of"], [long])
    ids = torch.cat([torch.full((1, QUERIES), 260), torch.randint(3, 250, (1, 130))], 1)
    with pytest.raises(VlkitError, match=r"a sequence of 134 tokens is longer than the 128 positions"):
        model(ids, torch.randn(1, 3, 32, 32))
    with pytest.raises(VlkitError, match=r"prompt's \d+ tokens \+ max_new_tokens=100 .* exceed the model's 128 positions"):
        model.generate(ids[:, :40], torch.randn(1, 3, 32, 32), max_new_tokens=100)


def test_image_tokens_and_images_that_do_not_match_are_named(opt):
    _, _, _, model = opt
    batch = Blip2Processor.for_model(model)(PROMPTS, images())
    ids, pixels, mask = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    with pytest.raises(VlkitError, match=r"2 images for 3 rows of input_ids; BLIP-2 takes one image per row"):
        model(ids, pixels[:2], mask)
    short = ids.clone()
    short[1, 0] = 5
    with pytest.raises(VlkitError, match=r"num_query_tokens=4 image tokens \(id 260\) .* the rows hold \[4, 3, 4\]"):
        model(short, pixels, mask)
    with pytest.raises(VlkitError, match=r"input_ids hold 12 image tokens \(id 260\) but no pixel_values"):
        model(ids, attention_mask=mask)
    right = Blip2Processor.for_model(model)(PROMPTS, images(), padding_side="right")
    with pytest.raises(VlkitError, match="every row must end with a token"):
        model.generate(**right, max_new_tokens=2)
    with pytest.raises(VlkitError, match=r"labels have shape \(3, 99\)"):
        model(ids, pixels, mask, labels=torch.zeros(3, 99, dtype=torch.long))
    with pytest.raises(VlkitError, match="2 images and 3 prompts; expected one image per sample"):
        Blip2Processor.for_model(model).training_batch(images(2), PROMPTS, ["a", "b", "c"])
    with pytest.raises(VlkitError, match="sample 1: prompt 'x' and target ' '; expected strings, the target not empty"):
        Blip2Processor.for_model(model).training_text(["", "x"], ["a", " "])
    with pytest.raises(VlkitError, match="3 prompts but 2 images"):
        Blip2Processor.for_model(model)(PROMPTS, images(2))
    with pytest.raises(VlkitError, match="sample 2: the image is a str"):
        Blip2Processor.for_model(model)(PROMPTS, [*images(2), "cat.png"])


def test_unsupported_folders_are_named(tmp_path):
    hf = hf_model("opt")
    folder, _ = folder_with_files(hf, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    edit_config(folder, text_config={**cfg["text_config"], "model_type": "t5"})
    with pytest.raises(ValueError, match="text_config model_type 't5' is not supported; .* encoder-decoders"):
        vlkit.load(folder)
    edit_config(folder, text_config=cfg["text_config"], architectures=["Blip2VisionModelWithProjection"])
    with pytest.raises(VlkitError, match="architectures 'Blip2VisionModelWithProjection' is not supported"):
        vlkit.load(folder)
    edit_config(folder, architectures=cfg["architectures"], image_token_index=None)
    with pytest.raises(ValueError, match="image_token_index is None"):
        vlkit.load(folder)


def test_config_checks():
    from vlkit.config import from_dict
    from vlkit.connectors.qformer import QFormerConfig
    from vlkit.lm import LlamaConfig, OPTConfig
    from vlkit.models.blip2 import Blip2Config
    from vlkit.vision.vit import ViTConfig

    vision = ViTConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=4)
    qformer = QFormerConfig(width=32, depth=1, num_heads=4, mlp_dim=48, num_queries=2, context_dim=32)
    opt = OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2)
    base = dict(vision=vision, qformer=qformer, lm=opt, image_token_id=49)
    with pytest.raises(ValueError, match="lm is a OPTConfig but lm_type 'llama' needs a LlamaConfig"):
        Blip2Config(**base, lm_type="llama")
    with pytest.raises(ValueError, match="qformer.context_dim 48 differs from the vision tower's width 32"):
        Blip2Config(**{**base, "qformer": QFormerConfig(width=32, depth=1, num_heads=4, num_queries=2, context_dim=48)})
    with pytest.raises(ValueError, match="image_token_id 50 is outside the LM's vocabulary of 50"):
        Blip2Config(**{**base, "image_token_id": 50})
    with pytest.raises(ValueError, match="word_embed_proj_dim \\(8\\) differs from its hidden_size \\(16\\)"):
        Blip2Config(**{**base, "lm": OPTConfig(vocab_size=50, hidden_size=16, word_embed_proj_dim=8, num_hidden_layers=1,
                                               ffn_dim=32, num_attention_heads=2)})
    llama = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    cfg = from_dict(Blip2Config, {"vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 4},
                                  "qformer": {"width": 32, "depth": 1, "num_heads": 4, "num_queries": 2, "context_dim": 32},
                                  "lm": {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                         "num_attention_heads": 2}, "lm_type": "llama", "image_token_id": 49})
    assert cfg.lm == llama and cfg.num_query_tokens == 2
