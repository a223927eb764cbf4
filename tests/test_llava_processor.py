"""The LLaVA processor: image-token expansion and pixel values equal transformers' LlavaProcessor
(centre crop, and LLaVA-1.5's pad to square), training batches with labels, generation prompts,
the evaluation contract end to end against transformers' processor and generate, and bad input
named by sample."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
pytest.importorskip("skimage")

from _interop_util import perturb  # noqa: E402
from _llava_models import TEXT, VISION  # noqa: E402
from test_preprocess_parity import odd_images, photos, vlkit_processor  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

import vlkit  # noqa: E402
from vlkit.errors import VlkitError  # noqa: E402
from vlkit.eval.generative import Sample, generate_predictions  # noqa: E402
from vlkit.models.llava_processor import LlavaAnswerer, LlavaProcessor  # noqa: E402
from vlkit.text.conversation import IGNORE_INDEX, ConversationError, render  # noqa: E402
from vlkit.text.lm_tokenizer import LMTokenizer  # noqa: E402
from vlkit.vision.preprocess import ImageProcessor  # noqa: E402

CORPUS = ["a red circle and a blue star", "What is the color of the circle?", "The circle is red.", "How many shapes are there?",
          "There are two shapes.", "Describe the image.", "A chat between a curious user and an assistant. USER: ASSISTANT:"]
SPECIALS = ["<s>", "</s>", "<pad>", "<image>"]
IMAGE_ID = 3
SIZE, PATCH = 32, 8
TOKENS = (SIZE // PATCH) ** 2  # CLIP: the patches, plus the class token, less the class token ("default")


def tokenizer_folder(folder: Path) -> Path:
    """A byte-level BPE tokenizer trained with ``tokenizers`` (BOS from the post-processor, ``<image>``
    its image token at id 3), saved the way transformers saves one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 0)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         extra_special_tokens={"image_token": "<image>"}).save_pretrained(folder)
    return Path(folder)


def random_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shapes = [(40, 70), (90, 30), (33, 33), (64, 48)]
    return [Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)) for hw in shapes]


IMAGE_PROCESSORS = {
    "crop": lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}),
    "pad": lambda: transformers.LlavaImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                                       do_pad=True),
}


def pair(folder: Path, kind: str, strategy: str = "default", extra: int = 1, max_length: int | None = None):
    """transformers' LlavaProcessor and vlkit's, on the same saved tokenizer and image processor."""
    tokenizer_folder(folder)
    IMAGE_PROCESSORS[kind]().save_pretrained(folder)
    ref = transformers.LlavaProcessor(image_processor=transformers.AutoImageProcessor.from_pretrained(folder, backend="pil"),
                                      tokenizer=transformers.AutoTokenizer.from_pretrained(folder), patch_size=PATCH,
                                      vision_feature_select_strategy=strategy, num_additional_image_tokens=extra)
    count = TOKENS + extra - (strategy == "default")
    ours = LlavaProcessor(vlkit_processor(folder), LMTokenizer.from_folder(folder), image_tokens=count, template="llava_v1",
                          max_length=max_length)
    return ref, ours


PROMPTS = ["USER: <image>\nWhat is the color of the circle? ASSISTANT:",
           "USER: <image> and <image>\nHow many shapes are there? ASSISTANT:",
           "Describe the image.",
           "<image>"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind, strategy, extra", [("crop", "default", 1), ("pad", "default", 1), ("pad", "full", 1),
                                                   ("crop", "full", 0)])
def test_expansion_and_pixels_equal_transformers(tmp_path, kind, strategy, extra, side):
    ref, ours = pair(tmp_path, kind, strategy, extra)
    images = random_images()
    expected = ref(text=PROMPTS, images=images, padding=True, padding_side=side, return_tensors="pt")
    got = ours(PROMPTS, images, padding_side=side)
    assert sorted(got) == ["attention_mask", "input_ids", "pixel_values"]
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    assert got["pixel_values"].shape == expected["pixel_values"].shape == (4, 3, SIZE, SIZE)
    assert (got["pixel_values"] - expected["pixel_values"]).abs().max() <= 1e-4
    assert int((got["input_ids"] == IMAGE_ID).sum()) == 4 * (TOKENS + extra - (strategy == "default"))


def test_images_may_be_given_per_prompt(tmp_path):
    _, ours = pair(tmp_path, "crop")
    images = random_images()
    flat = ours(PROMPTS, images)
    nested = ours(PROMPTS, [images[:1], images[1:3], [], images[3:]])
    assert all(torch.equal(flat[k], nested[k]) for k in flat)


def test_a_subclass_sets_each_images_token_count(tmp_path):
    """AnyRes's hook: one overridden method decides every expansion, in conversations and prompts alike."""

    class BySize(LlavaProcessor):
        def num_image_tokens(self, image):
            return image.size[0] // 10

    _, base = pair(tmp_path, "crop")
    ours = BySize(base.image_processor, base.tokenizer, image_tokens=0, template="llava_v1")
    images = random_images()
    ids = ours(PROMPTS, images)["input_ids"]
    assert [int(n) for n in (ids == IMAGE_ID).sum(1)] == [7, 3 + 3, 0, 4]  # widths 70, 30, 33, 48
    sample = ours.encode(CONVERSATIONS[0], images[:2])
    assert sample.input_ids.count(IMAGE_ID) == 7 + 3


def test_pad_to_square_equals_transformers_llava_image_processor(tmp_path):
    ref = transformers.LlavaImageProcessorPil(do_pad=True, image_mean=[0.2, 0.5, 0.9])
    ref.save_pretrained(tmp_path)
    ours = vlkit_processor(tmp_path)
    assert ours.pad_to_square
    worst = 0.0
    for name, image in {**photos(), **odd_images(), **{f"random{i}": im for i, im in enumerate(random_images())}}.items():
        expected = torch.from_numpy(np.asarray(ref(images=image, return_tensors="np")["pixel_values"][0]))
        diff = (ours(image) - expected).abs().max().item()
        assert diff <= 1e-4, f"{name}: {diff}"
        worst = max(worst, diff)
    print(f"pad to square: worst max-abs difference {worst:.2e}")


def test_pad_to_square_round_trips_and_is_read_only_from_llava_processors():
    padded = ImageProcessor(size=32, crop_size=32, pad_to_square=True)
    assert ImageProcessor.from_hf(padded.to_hf()).pad_to_square
    assert not ImageProcessor.from_hf(ImageProcessor(size=32, crop_size=32).to_hf()).pad_to_square
    clip_with_do_pad = {**ImageProcessor(size=32).to_hf(), "image_processor_type": "CLIPImageProcessor", "do_pad": True}
    assert not ImageProcessor.from_hf(clip_with_do_pad).pad_to_square
    wide = Image.new("RGB", (60, 20), (255, 0, 0))
    square = padded.pad_square(wide)
    assert square.size == (60, 60) and square.getpixel((0, 0)) == tuple(int(m * 255) for m in padded.mean)
    assert square.getpixel((30, 30)) == (255, 0, 0) and square.getpixel((30, 19)) != (255, 0, 0)


def test_a_large_image_is_padded_from_a_shrunk_copy():
    """Past MAX_RESIZE_PIXELS the square is built from the image shrunk first: within two grey levels."""
    wide = photos()["astronaut"].resize((4200, 2000))  # its square, 4200², is past the limit
    ours = ImageProcessor(size=32, crop_size=32, pad_to_square=True)
    ref = transformers.LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_pad=True)
    expected = torch.from_numpy(np.asarray(ref(images=wide, return_tensors="np")["pixel_values"][0]))
    assert (ours(wide) - expected).abs().max() < 2 / 255 / min(ours.std)


CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat is the color of the circle?"}, {"from": "gpt", "value": "The circle is red."},
     {"from": "human", "value": "How many shapes are there?\n<image>"}, {"from": "gpt", "value": "There are two shapes."}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
     {"role": "assistant", "content": "a red circle and a blue star"}],
    [{"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "There are two shapes."}],
]


def test_training_batch_pads_right_and_labels_only_the_answers(tmp_path):
    _, ours = pair(tmp_path, "pad")
    images = random_images()
    per_sample = [images[:2], images[2:3], []]
    samples = [ours.encode(c, imgs, sample=f"record {i}") for i, (c, imgs) in enumerate(zip(CONVERSATIONS, per_sample))]
    batch = ours.collate(samples)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "pixel_values"]
    width = max(len(s) for s in samples)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for row, s in enumerate(samples):
        n = len(s)
        assert batch["input_ids"][row, :n].tolist() == s.input_ids and batch["labels"][row, :n].tolist() == s.labels
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and (batch["input_ids"][row, n:] == ours.tokenizer.pad_token_id).all()
    assert int((batch["input_ids"] == IMAGE_ID).sum()) == 3 * TOKENS
    assert not (batch["labels"] == IMAGE_ID).any()
    answers = [ours.tokenizer.decode([i for i in row if i != IGNORE_INDEX]) for row in batch["labels"].tolist()]
    assert answers == [" The circle is red.</s> There are two shapes.</s>", " a red circle and a blue star</s>",
                       " There are two shapes.</s>"]  # llava_v1 supervises the space before each answer
    pixels = torch.stack([ours.image_processor(im) for im in images[:3]])
    assert torch.equal(batch["pixel_values"], pixels)
    assert "pixel_values" not in ours.collate(samples[2:])


def test_generation_prompts_are_left_padded_through_the_template(tmp_path):
    ref, ours = pair(tmp_path, "crop")
    images = random_images()[:2] + [None]
    prompts = ["What is the color of the circle?", "Describe the image.", "How many shapes are there?"]
    batch = ours.prompt_batch(images, prompts)
    texts = ["".join(s.text for s in render([{"role": "user", "content": (p if im is None else f"<image>\n{p}")}],
                                            ours.tokenizer, "llava_v1", add_generation_prompt=True))
             for im, p in zip(images, prompts)]
    assert texts[0].endswith("USER: <image>\nWhat is the color of the circle? ASSISTANT:")
    expected = ref(text=texts, images=images[:2], padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A tiny transformers LLaVA with the test tokenizer and LLaVA-1.5's padding image processor,
    saved, and loaded by vlkit."""
    folder = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**VISION), image_token_index=IMAGE_ID,
                                      text_config=transformers.LlamaConfig(**{**TEXT, "vocab_size": 400, "max_position_embeddings": 512}))
    hf = perturb(transformers.LlavaForConditionalGeneration(config), seed=0, scale=0.1)
    hf.save_pretrained(folder)
    tokenizer_folder(folder)
    IMAGE_PROCESSORS["pad"]().save_pretrained(folder)
    return hf, vlkit.load(folder), folder


def test_the_eval_contract_answers_as_transformers_does(loaded):
    """``LlavaAnswerer.generate(images, prompts)`` gives the answers transformers' processor and greedy
    ``generate`` give for the same rendered prompts."""
    hf, model, folder = loaded
    answerer = LlavaAnswerer(model, LlavaProcessor.for_model(model, template="llava_v1"))
    images = random_images()[:3]
    prompts = ["What is the color of the circle?", "Describe the image.", "How many shapes are there?"]
    ours = answerer.generate(images, prompts, max_new_tokens=6)
    ref = transformers.LlavaProcessor(image_processor=transformers.AutoImageProcessor.from_pretrained(folder, backend="pil"),
                                      tokenizer=transformers.AutoTokenizer.from_pretrained(folder), patch_size=PATCH,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1)
    expected = transformers_answers(hf, ref, answerer, images, prompts)
    assert ours == expected
    assert any(ours), "every answer empty: the comparison would say nothing"
    samples = [Sample(str(i), p, {}, (lambda im=im: im)) for i, (p, im) in enumerate(zip(prompts, images))]
    assert generate_predictions(answerer, samples, batch_size=2, max_new_tokens=6) == {str(i): a for i, a in enumerate(ours)}


def test_training_batch_runs_through_the_model(loaded):
    _, model, _ = loaded
    processor = LlavaProcessor.for_model(model, template="llava_v1")
    images = random_images()
    samples = [processor.encode(c, imgs) for c, imgs in zip(CONVERSATIONS, [images[:2], images[2:3], []])]
    out = model(**processor.collate(samples))
    assert torch.isfinite(out.loss)


def test_generation_stops_at_the_templates_end_of_turn(loaded):
    _, model, _ = loaded
    chatml = LlavaAnswerer(model, LlavaProcessor.for_model(model, template="chatml"))
    assert "<|im_end|>" in chatml.with_stops({})["stop_strings"]  # not a token of this tokenizer: matched as text
    plain = LlavaAnswerer(model, LlavaProcessor.for_model(model, template="plain"))
    assert plain.with_stops({"stop_strings": ["."]})["stop_strings"] == [".", "\n"]
    v1 = LlavaAnswerer(model, LlavaProcessor.for_model(model, template="llava_v1"))
    assert 1 in v1.with_stops({"eos_token_id": 2})["eos_token_id"]  # </s> ends a Vicuna turn
    assert 2 in v1.with_stops({"eos_token_id": 2})["eos_token_id"]


def truncated_png() -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return Image.open(io.BytesIO(buffer.getvalue()[:200]))  # opens lazily; decoding fails


def test_bad_input_is_named_by_sample(tmp_path):
    _, ours = pair(tmp_path, "crop")
    images = random_images()
    with pytest.raises(ConversationError, match="the batch: 4 <image> placeholder\\(s\\) in the prompts \\(per prompt \\[1, 2, 0, 1\\]\\) but 3"):
        ours(PROMPTS, images[:3])
    with pytest.raises(ConversationError, match="sample 1: 2 <image> placeholder\\(s\\) but 1 image"):
        ours(PROMPTS, [images[:1], images[1:2], [], images[3:]])
    with pytest.raises(ConversationError, match="record 9: 2 <image> placeholder\\(s\\) but 1 image"):
        ours.encode(CONVERSATIONS[0], images[:1], sample="record 9")
    with pytest.raises(ConversationError, match="record 9: 2 <image> placeholder\\(s\\) but 3 image"):
        ours.encode(CONVERSATIONS[0], images[:3], sample="record 9")
    with pytest.raises(ConversationError, match="record 9: an empty conversation"):
        ours.encode([], sample="record 9")
    with pytest.raises(ConversationError, match="record 9, message 1: a user turn where an assistant turn"):
        ours.encode([CONVERSATIONS[2][0], CONVERSATIONS[2][0]], sample="record 9")
    with pytest.raises(VlkitError, match="record 9, image 0: unreadable image"):
        ours.encode(CONVERSATIONS[1], [truncated_png()], sample="record 9")
    with pytest.raises(VlkitError, match="record 9, image 0: a str; expected a PIL image"):
        ours.encode(CONVERSATIONS[1], ["cat.png"], sample="record 9")
    with pytest.raises(VlkitError, match="2 images but 1 prompts"):
        ours.prompt_batch(images[:2], ["Describe the image."])
    with pytest.raises(VlkitError, match="padding_side 'middle'"):
        ours.collate([ours.encode(CONVERSATIONS[2])], "middle")
    ours.max_length = 40
    with pytest.raises(ConversationError, match="record 9: [0-9]+ tokens \\(16 of them image tokens\\) exceed the model's context of 40"):
        ours.encode(CONVERSATIONS[1], images[:1], sample="record 9")


def transformers_answers(hf, ref, answerer, images, prompts, new: int = 6) -> list[str]:
    """What transformers answers to ``prompts`` rendered as ``answerer`` renders them (llava_v1, left
    padding), with its processor ``ref`` and greedy ``generate``, cut at the answerer's stops."""
    options = answerer.with_stops({"max_new_tokens": new})
    texts = ["".join(s.text for s in render([{"role": "user", "content": f"<image>\n{p}"}], answerer.processor.tokenizer,
                                            "llava_v1", add_generation_prompt=True)) for p in prompts]
    inputs = ref(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=options["eos_token_id"],
                          pad_token_id=ref.tokenizer.pad_token_id)
    eos = set(options["eos_token_id"])
    return [ref.tokenizer.decode(row[: next((i for i, t in enumerate(row) if t in eos), len(row))],
                                 skip_special_tokens=True).strip() for row in out[:, inputs["input_ids"].shape[1]:].tolist()]
