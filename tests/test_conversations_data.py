"""Conversation data for VLM training: LLaVA JSON with several images per sample, labels on the
answers only, truncation and skips named by file and sample, length bucketing, pickling for
spawned DataLoader workers."""

from __future__ import annotations

import dataclasses
import json
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from _vlm_train_util import RECORDS, TOKENS_PER_IMAGE, VISION, image, llava_folder, tokenizer_folder
from vlkit.data.conversations import (
    ChatSample,
    ConversationCollate,
    ConversationDataset,
    LengthBuckets,
    LlavaSource,
    padding_fraction,
)
from vlkit.data.formats.common import BadRecord, FormatError, Skips
from vlkit.data.formats.llava import Conversation, index_llava, llava_record, read_llava
from vlkit.data.images import BadSample
from vlkit.data.pairs import Skipped
from vlkit.errors import VlkitError
from vlkit.lm.llama import LlamaConfig
from vlkit.losses import IGNORE_INDEX, causal_lm_loss
from vlkit.models.llava import Llava, LlavaConfig
from vlkit.models.llava_processor import LlavaProcessor
from vlkit.text.lm_tokenizer import LMTokenizer
from vlkit.train.loop import LoopConfig, OptimConfig, fit
from vlkit.vision.vit import ViTConfig
from vlkit.vision.preprocess import ImageProcessor

PIXELS = ImageProcessor(size=32, crop_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return LMTokenizer.from_folder(tokenizer_folder(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def processor(tokenizer):
    return LlavaProcessor(PIXELS, tokenizer, TOKENS_PER_IMAGE)  # the tokenizer's chat template (ChatML)


def dataset(source, processor, max_length=512, micro=2, rule="error", window=0):
    return ConversationDataset(source, processor, max_length, micro, rule, window)


# ---------------------------------------------------------------- the LLaVA JSON reader
def test_llava_records_may_hold_several_images_with_placeholders_kept_in_place(tmp_path):
    convs = read_llava(llava_folder(tmp_path))
    one, two, text, three = convs
    assert one.image == tmp_path / "images/a.png" and one.images == [one.image]
    assert one.turns == [("What color is the circle?", "The circle is red.")]  # the one-image view as before
    assert two.images == [tmp_path / "images/a.png", tmp_path / "images/b.png"] and two.image == two.images[0]
    assert two.messages[0] == {"role": "user", "content": "Compare <image> and <image> please."}
    assert [m["role"] for m in two.messages] == ["user", "assistant"] * 2
    assert three.images == [tmp_path / f"images/{n}.png" for n in "bca"]
    assert three.messages[2]["content"] == "And here? <image>"
    assert text.images == [] and text.image is None
    written = two.to_json(tmp_path)
    assert written["image"] == ["images/a.png", "images/b.png"]
    assert written["conversations"][0]["value"] == "Compare <image> and <image> please."
    old = Conversation("x", tmp_path / "a.png", [("q", "a")])  # built as shapes_export builds one
    assert old.to_json(tmp_path)["conversations"][0]["value"] == "<image>\nq" and old.messages[0]["content"] == "<image>\nq"


@pytest.mark.parametrize("image, turns, message", [
    (["a.png", "b.png"], [("<image> one", "x")], r"record 0 \(id 'r'\): 1 '<image>' placeholders; expected 2, one per image"),
    ([], [("<image>", "x")], r"record 0 \(id 'r'\): 'image' is an empty list"),
    ("a.png", [("<image>", "x <image>")], r"record 0 \(id 'r'\): turn 1: an '<image>' placeholder in a gpt turn"),
    (["a.png", 4], [("<image><image>", "x")], r"record 0 \(id 'r'\), image 1: image path 4; expected a file path"),
    ("a.png", [("<image>", "  ")], r"record 0 \(id 'r'\): turn 1: a blank gpt answer"),
])
def test_bad_image_lists_are_named(tmp_path, image, turns, message):
    conv = [t for q, a in turns for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "r", "image": image, "conversations": conv}]))
    with pytest.raises(BadRecord, match=rf"d\.json, {message}"):
        read_llava(path)


def test_records_are_read_again_from_their_byte_spans(tmp_path):
    path = llava_folder(tmp_path)
    text = path.read_text().replace("circle", "círcle ☺")  # multi-byte characters before later records
    path.write_text(text.replace("\n", "\r\n"), newline="")
    rows = list(index_llava(path))
    assert [c.id for c, *_ in rows] == [r["id"] for r in RECORDS]
    for conv, i, start, end in rows:
        assert llava_record(path, i, start, end) == conv
    source = LlavaSource(path)
    assert len(source) == 4 and source[1].images == rows[1][0].images and source[1].source == str(path)
    assert source[0].messages[0]["content"] == "<image>\nWhat color is the círcle ☺?"


# ---------------------------------------------------------------- tokenised samples
def test_several_images_expand_in_place_and_only_answers_are_supervised(tmp_path, processor, tokenizer):
    data = dataset(LlavaSource(llava_folder(tmp_path)), processor)
    sample = data.encode(1)  # "two": two images, two turns
    image_id = processor.image_token_id
    ids, labels = sample.input_ids, sample.labels
    assert ids.count(image_id) == 2 * TOKENS_PER_IMAGE
    collapsed = [t for k, t in enumerate(ids) if t != image_id or ids[k - 1] != image_id]
    assert "<|im_start|>user\nCompare <image> and <image> please.<|im_end|>" in tokenizer.decode(collapsed)
    supervised = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels))
    assert tokenizer.decode(supervised) == "The first is red, the second blue.<|im_end|>There are two shapes.<|im_end|>"
    assert all(labels[k] == IGNORE_INDEX for k, t in enumerate(ids) if t == image_id)
    expected = torch.stack([PIXELS(image(0)), PIXELS(image(1))])
    assert torch.equal(sample.images["pixel_values"], expected)  # a.png then b.png, the list's order
    three = data.encode(3)
    assert torch.equal(three.images["pixel_values"], torch.stack([PIXELS(image(k)) for k in (1, 2, 0)]))
    batch = ConversationCollate(processor)([data.encode(0), sample])
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["input_ids"].shape == (2, len(sample))
    assert batch["attention_mask"][0].sum() == len(data.encode(0)) and batch["skipped"] == []


def test_the_answer_loss_weighs_every_answer_alike():
    """``causal_lm_loss(..., "answer")``: the mean over answers (runs of supervised labels, across
    rows) of each answer's mean token loss; "token" is the plain mean over supervised tokens."""
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 7)
    labels = torch.full((2, 9), IGNORE_INDEX)
    labels[0, 2:4], labels[0, 7:], labels[1, 1:6] = torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([4, 5, 6, 0, 1])
    token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="none")
    token = token.view(2, 8)  # token[r, t]: position t predicting label t + 1
    answers = [token[0, 1:3].mean(), token[0, 6:8].mean(), token[1, 0:5].mean()]
    assert torch.allclose(causal_lm_loss(logits, labels, "answer"), torch.stack(answers).mean(), atol=1e-6)
    supervised = labels[:, 1:] != IGNORE_INDEX
    assert torch.allclose(causal_lm_loss(logits, labels), token[supervised].mean(), atol=1e-6)
    assert not torch.allclose(causal_lm_loss(logits, labels, "answer"), causal_lm_loss(logits, labels))


def test_the_collate_carries_the_loss_reduction_to_the_model(tmp_path, processor, tokenizer):
    data = dataset(LlavaSource(llava_folder(tmp_path)), processor)
    samples = [data.encode(0), data.encode(1)]
    assert "loss_reduction" not in ConversationCollate(processor)(samples)
    batch = ConversationCollate(processor, "answer")(samples)
    assert batch.pop("loss_reduction") == "answer" and batch.pop("skipped") == []
    torch.manual_seed(0)
    lm = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = Llava(LlavaConfig(vision=ViTConfig(**VISION), lm=lm, image_token_id=processor.image_token_id))
    logits = model(**batch).logits
    assert torch.equal(model(**batch, loss_reduction="answer").loss, causal_lm_loss(logits, batch["labels"], "answer"))


def test_a_long_sample_is_cut_only_past_its_last_answer_token(tmp_path, processor, tokenizer):
    source = LlavaSource(llava_folder(tmp_path))
    full = dataset(source, processor).encode(0)
    last = max(k for k, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert last < len(full) - 1  # the ChatML turn's closing newline is not supervised
    cut = dataset(source, processor, max_length=last + 1).encode(0)
    assert cut.input_ids == full.input_ids[: last + 1] and cut.labels == full.labels[: last + 1]
    with pytest.raises(BadSample, match=rf"data\.json, record 0 \(id 'one'\): {len(full)} tokens \({TOKENS_PER_IMAGE} of them "
                                        rf"image tokens\) exceed max_length {last}, and cutting there would lose an answer token"):
        dataset(source, processor, max_length=last).encode(0)
    with pytest.raises(BadSample, match="would lose an image token"):
        dataset(source, processor, max_length=TOKENS_PER_IMAGE // 2).encode(0)
    item = dataset(source, processor, max_length=last, rule="skip")[0]
    assert isinstance(item, Skipped) and item.skip.reason == "too long" and item.skip.record == "record 0 (id 'one')"


def test_text_only_samples_are_left_out_when_only_the_connector_trains(tmp_path, processor):
    source = LlavaSource(llava_folder(tmp_path))
    assert source.image_counts.tolist() == [1, 2, 0, 3]
    data = ConversationDataset(source, processor, 512, 1, images_only=True, bucket_window=0)
    assert len(data) == 3 and data.left_out == 1
    assert sorted(len(data[k].images["pixel_values"]) for k in range(3)) == [1, 2, 3]
    memory = [ChatSample("t", [], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a red circle"}])]
    item = ConversationDataset(memory, processor, 512, 1, images_only=True, bucket_window=0)[0]  # even under "error"
    assert isinstance(item, Skipped) and item.skip.reason == "no image"


def test_bad_samples_are_skipped_and_named_or_stop(tmp_path, processor):
    recs = [RECORDS[0], {**RECORDS[1], "image": ["images/a.png", "images/gone.png"]},
            {"id": "half", "conversations": [{"from": "human", "value": "Describe the image."}]}]
    path = llava_folder(tmp_path, recs)
    skips = Skips("skip")
    source = LlavaSource(path, skips=skips)  # the record with no answer is a bad record of the file
    assert len(source) == 2 and skips.total == 1 and "record 2 (id 'half'): 1 turns; expected human/gpt pairs" in str(skips.items[0])
    with pytest.raises(BadRecord, match=r"record 2 \(id 'half'\): 1 turns"):
        LlavaSource(path)
    item = dataset(source, processor, rule="skip")[1]
    assert isinstance(item, Skipped) and item.skip.reason == "missing image"
    assert (item.skip.source, item.skip.record) == (str(path), "record 1 (id 'two')")
    assert "image 1" in item.skip.detail and "gone.png: file not found" in item.skip.detail
    with pytest.raises(BadSample, match=r"data\.json, record 1 \(id 'two'\): image 1 .*gone\.png: file not found"):
        dataset(source, processor)[1]
    batch = ConversationCollate(processor)([dataset(source, processor, rule="skip")[k] for k in (0, 1)])
    assert [s.reason for s in batch["skipped"]] == ["missing image"] and batch["input_ids"].shape[0] == 1
    memory = [ChatSample("q", [], [{"role": "user", "content": "Describe the image."}], "made in memory")]
    item = dataset(memory, processor, rule="skip")[0]
    assert item.skip.reason == "bad conversation" and item.skip.source == "made in memory"
    assert item.skip.record == "sample 0 (id 'q')" and "no answer" in item.skip.detail
    with pytest.raises(BadSample, match=r"made in memory, sample 0 \(id 'q'\): ends with a user turn and no answer"):
        dataset(memory, processor)[0]


# ---------------------------------------------------------------- bucketing
def chat(i: int, words: int) -> ChatSample:
    return ChatSample(f"s{i}", [], [{"role": "user", "content": "How many shapes are there?"},
                                    {"role": "assistant", "content": " ".join(["red"] * words)}])


def test_length_buckets_keep_padding_small_and_cover_every_sample(processor):
    rng = np.random.default_rng(0)
    source = [chat(i, int(w)) for i, w in enumerate(rng.integers(1, 60, 96))]
    micro = 4
    bucketed = dataset(source, processor, micro=micro, window=8)
    shuffled = dataset(source, processor, micro=micro, window=0)

    def padding(data) -> float:
        batches = [[len(data[k]) for k in range(c * micro, (c + 1) * micro)] for c in range(len(source) // micro)]
        return padding_fraction(batches)

    assert padding(shuffled) > 0.15  # measured: 0.20 in random batches, 0.04 bucketed (window 8)
    assert padding(bucketed) < 0.25 * padding(shuffled)
    assert bucketed.planned_padding() == pytest.approx((padding(bucketed), padding(shuffled)), abs=1e-9)
    assert shuffled.planned_padding() is None
    plan = bucketed.buckets.plan(0)
    assert sorted(plan.ravel().tolist()) == list(range(96))  # each sample once per epoch
    assert not np.array_equal(plan, bucketed.buckets.plan(1))  # a new order each epoch
    again = dataset(source, processor, micro=micro, window=8)
    assert [again.buckets.sample(k) for k in range(200)] == [bucketed.buckets.sample(k) for k in range(200)]


def test_an_epoch_tops_up_its_last_micro_batch():
    buckets = LengthBuckets(np.arange(10), 10, 4, 2, seed=0)
    plan = buckets.plan(0)
    assert plan.shape == (3, 4) and set(plan.ravel().tolist()) == set(range(10))
    assert [buckets.sample(k) for k in range(12, 24)] == [10 + i for i in buckets.plan(1).ravel().tolist()]


class ByEpoch:
    """A procedural source: sample ``i`` of epoch ``e`` is asked for as ``e · len + i`` and answers differently."""

    def __init__(self):
        self.asked = []

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> ChatSample:
        self.asked.append(index)
        return ChatSample(f"s{index}", [], [{"role": "user", "content": "How many shapes are there?"},
                                            {"role": "assistant", "content": f"{index // 3} shapes"}])


def test_a_procedural_source_is_asked_by_epoch_and_a_list_modulo_its_length(processor):
    source = ByEpoch()
    data = dataset(source, processor, micro=1)
    [data[k] for k in range(6)]
    assert sorted(source.asked[:3]) == [0, 1, 2] and sorted(source.asked[3:]) == [3, 4, 5]
    listed = dataset([chat(i, i + 1) for i in range(3)], processor, micro=1)
    epochs = [sorted(len(listed[k]) for k in range(e * 3, e * 3 + 3)) for e in (0, 1)]
    assert epochs[0] == epochs[1] and len(set(epochs[0])) == 3  # the same three samples again


# ---------------------------------------------------------------- workers under spawn
def test_tokenizer_and_dataset_survive_a_spawn_pickle_round_trip(tmp_path, tokenizer, processor):
    again = pickle.loads(ForkingPickler.dumps(tokenizer))
    messages = [{"role": "user", "content": "What color is the circle?"}]
    assert again.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    assert again.encode("a red <image> circle") == tokenizer.encode("a red <image> circle")
    data = dataset(LlavaSource(llava_folder(tmp_path)), processor, window=4)
    loader = DataLoader(data, batch_size=2, collate_fn=ConversationCollate(processor), num_workers=1,
                        multiprocessing_context="spawn")
    first = next(iter(loader))
    expected = ConversationCollate(processor)([data[0], data[1]])
    assert torch.equal(first["input_ids"], expected["input_ids"]) and torch.equal(first["labels"], expected["labels"])


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json: missing"):
        LlavaSource(tmp_path / "nope.json")
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(FormatError, match="e.json: no records"):
        LlavaSource(tmp_path / "e.json")


@pytest.mark.parametrize("reduction", ["token", "answer"])
def test_length_groups_give_the_whole_batchs_gradient_from_less_padding(tmp_path, processor, reduction):
    """A batch collated as length-sorted parts, each padded to its own longest and its loss weighted by
    its share of the batch's tokens or answers, gives the whole batch's loss and gradient (images
    travel with their samples)."""
    data = dataset(LlavaSource(llava_folder(tmp_path)), processor)
    samples = [data.encode(k) for k in range(len(data))]
    lengths = sorted(len(s) for s in samples)
    assert len(samples) == 4 and lengths[1] < lengths[3]
    whole = ConversationCollate(processor, reduction)(samples)
    split = ConversationCollate(processor, reduction, length_groups=2)(samples)
    assert whole.pop("skipped") == split.pop("skipped") == [] and list(split) == ["parts", "rows"] and split["rows"] == 4
    parts = split["parts"]
    assert [tuple(p["input_ids"].shape) for p, _ in parts] == [(2, lengths[1]), (2, lengths[3])]
    assert sum(w for _, w in parts) == pytest.approx(1.0)
    torch.manual_seed(0)
    lm = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = Llava(LlavaConfig(vision=ViTConfig(**VISION), lm=lm, image_token_id=processor.image_token_id))

    def gradient(batches) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = sum(model(**b).loss * w for b, w in batches)
        loss.backward()
        return loss.item(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]

    (loss, grads), (parted, parted_grads) = gradient([(whole, 1.0)]), gradient(parts)
    assert parted == pytest.approx(loss, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads, parted_grads))
    assert ConversationCollate(processor, reduction, length_groups=9)([samples[0]]).keys() == whole.keys() | {"skipped"}


def test_a_part_with_nothing_supervised_is_left_out_and_its_samples_still_counted(tmp_path, processor):
    data = dataset(LlavaSource(llava_folder(tmp_path)), processor)
    samples = sorted((data.encode(k) for k in range(len(data))), key=len)
    quiet = [dataclasses.replace(s, labels=[-100] * len(s.labels)) for s in samples[:2]]  # the short part
    batch = ConversationCollate(processor, "answer", length_groups=2)(quiet + samples[2:])
    assert batch["rows"] == 4 and [w for _, w in batch["parts"]] == [1.0]
    assert batch["parts"][0][0]["input_ids"].shape[0] == 2
    class Quiet(torch.utils.data.Dataset):  # the same four samples every epoch
        shuffle = False

        def __len__(self):
            return 4

        def __getitem__(self, k):
            return (quiet + samples[2:])[k % 4]

    lm = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    seen = []
    for groups in (1, 2):
        torch.manual_seed(0)
        model = Llava(LlavaConfig(vision=ViTConfig(**VISION), lm=lm, image_token_id=processor.image_token_id))
        loop = LoopConfig(steps=2, batch_size=4, log_every=1, precision="fp32")
        summary = fit(model, Quiet(), ConversationCollate(processor, "answer", groups), loop, OptimConfig(lr=1e-2),
                      tmp_path / f"run{groups}", "llava")  # fmt: skip
        seen.append(summary["samples"])
    assert seen == [8, 8]  # the loop counts the samples a left-out part held
    for bad in (0, -1, 1.5, True):
        with pytest.raises(VlkitError, match=f"length_groups must be a positive integer, got {bad!r}"):
            ConversationCollate(processor, length_groups=bad)


def test_an_images_key_is_taken_for_image_but_not_both(tmp_path):
    conv = [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "two"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "r", "images": ["a.png", "b.png"], "conversations": conv}]))
    (record,) = read_llava(path)
    assert record.images == [tmp_path / "a.png", tmp_path / "b.png"]
    path.write_text(json.dumps([{"id": "r", "image": "a.png", "images": ["b.png"], "conversations": conv}]))
    with pytest.raises(BadRecord, match=r"record 0 \(id 'r'\): both 'image' and 'images'"):
        read_llava(path)
