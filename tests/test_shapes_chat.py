"""The shapes world's VLM conversations: boxes on the 0-999 grid read back within a grid step,
every kind and question type present, a held-out world disjoint from training, records the
conversation dataset encodes, prompts equal to the evaluation's, and the LM texts."""

from __future__ import annotations

import pytest

from vlkit.boxes import iou, parse_box
from vlkit.data.conversations import ChatSample
from vlkit.data.shapes import ShapesWorld
from vlkit.data.shapes_chat import (CAPTION_PROMPT, GROUNDING_PROMPT, KINDS, QUESTION_TYPES, VQA_PROMPT, ShapesChat,
                                    ShapesChatConfig, box_text, caption, eval_captions, eval_grounding, eval_vqa,
                                    export_llava, lm_texts)
from vlkit.errors import ConfigError
from vlkit.text.conversation import check_turns, parse_messages


def test_box_text_reads_back_within_a_grid_step():
    world = ShapesWorld(image_size=64)
    for i in range(50):
        scene = world.scene(i)
        for ref in scene.referring:
            text = box_text(ref["box"], 64)
            assert text.startswith("[") and text.endswith("]") and text.count(",") == 3
            values = [int(v) for v in text[1:-1].split(", ")]
            assert all(0 <= v <= 999 for v in values)
            back = parse_box(text, "norm1000", 64, 64)
            assert max(abs(a - b) for a, b in zip(back, ref["box"])) <= 64 / 1000 + 1e-9
            assert iou(back, ref["box"]) > 0.98
    assert box_text((0, 0, 64, 64), 64) == "[0, 0, 999, 999]"
    assert box_text((16, 0, 32, 48), 64, 128) == "[250, 0, 500, 375]"


def test_conversations_every_kind():
    chat = ShapesChat(ShapesChatConfig(scenes=40, mix={k: 1.0 for k in KINDS}, max_turns=4))
    seen = set()
    for i in range(len(chat)):
        rec = chat[i]
        assert isinstance(rec, ChatSample) and len(rec.images) == 1 and rec.images[0].size == (64, 64)
        check_turns(parse_messages(rec.messages), add_generation_prompt=False)
        assert rec.messages[0]["content"].startswith("<image>\n")
        assert sum(m["content"].count("<image>") for m in rec.messages) == 1
        assert len(rec.messages) <= 8
        for m in rec.messages[::2]:
            seen.add("caption" if CAPTION_PROMPT in m["content"] else "ground" if "bounding box" in m["content"] else "vqa")
        assert chat[i].messages == rec.messages  # deterministic per index
    assert seen == {"caption", "ground", "vqa"}
    assert any(len(chat[i].messages) > 2 for i in range(len(chat)))


def test_questions_kind_asks_only_the_scenes_questions():
    chat = ShapesChat(ShapesChatConfig(scenes=30, mix={"questions": 1.0}, max_turns=5))
    for i in range(len(chat)):
        rec, scene = chat[i], chat.world.scene(i)
        truth = {VQA_PROMPT.format(question=q["question"]): q["answer"] for q in scene.vqa}
        asked = [m["content"].removeprefix("<image>\n") for m in rec.messages[::2]]
        assert len(asked) == min(5, len(truth)) == len(set(asked))
        assert [truth[q] for q in asked] == [m["content"] for m in rec.messages[1::2]]


def test_caption_is_left_to_right_and_true():
    world = ShapesWorld()
    for i in range(30):
        scene = world.scene(i)
        text = caption(scene)
        objs = sorted(scene.objects, key=lambda o: o.cx)
        positions = [text.index(f"{o.color} {o.shape}") for o in objs]
        assert positions == sorted(positions)
        assert (len(objs) == 1) == (": " not in text)


def test_held_out_world_and_eval_sets():
    train = ShapesChatConfig().world
    held = ShapesChatConfig(held_out=True).world
    assert held.seed != train.seed
    train_images = {train.scene(i).render().tobytes() for i in range(200)}
    assert not any(held.scene(i).render().tobytes() in train_images for i in range(200))
    vqa = eval_vqa(held, 100)
    assert [q.type for q in vqa[:5]] == list(QUESTION_TYPES)
    assert {t: sum(q.type == t for q in vqa) for t in QUESTION_TYPES} == {t: 20 for t in QUESTION_TYPES}
    assert len({q.index for q in vqa}) == 100
    for q in vqa[:10]:
        truth = [x for x in held.scene(q.index).vqa if x["question"] == q.text]
        assert truth and truth[0]["answer"] == q.target
        assert q.prompt == VQA_PROMPT.format(question=q.text)
    caps = eval_captions(held, 5)
    assert caps[0].target == [c.text for c in held.scene(0).captions]
    ground = eval_grounding(held, 5)
    assert all(g.prompt == GROUNDING_PROMPT.format(text=g.text) for g in ground)


def test_prompts_are_the_evaluations():
    from vlkit.eval import generative

    assert (CAPTION_PROMPT, VQA_PROMPT, GROUNDING_PROMPT) == (
        generative.CAPTION_PROMPT, generative.VQA_PROMPT, generative.GROUNDING_PROMPT)


def test_lm_texts():
    texts = [t for group in lm_texts(ShapesWorld(), 3) for t in group]
    assert any(t.endswith("? yes") or t.endswith("? no") for t in texts)
    assert any(": [" in t and t.endswith("]") for t in texts)
    assert any(t.startswith("Question: ") and "? Short answer: " in t for t in texts)
    assert caption(ShapesWorld().scene(0)) in texts


def test_lm_texts_one_group_per_scene_captions_first():
    world = ShapesWorld()
    groups = list(lm_texts(world, 4))
    assert len(groups) == 4
    for i, group in enumerate(groups):
        scene = world.scene(i)
        captions = [c.text for c in scene.captions] + [caption(scene)]
        assert sorted(group[:len(captions)]) == sorted(captions)
        assert len(group) == len(captions) + len(scene.vqa) + len(scene.referring)
        assert not set(captions) & set(group[len(captions):])
    assert groups == list(lm_texts(world, 4))


def test_bad_config():
    with pytest.raises(ConfigError, match="mix"):
        ShapesChatConfig(mix={"chitchat": 1.0})
    with pytest.raises(ConfigError, match="mix"):
        ShapesChatConfig(mix={"vqa": 0.0})


def test_export_llava_reads_back(tmp_path):
    from vlkit.data.conversations import LlavaSource

    chat = ShapesChat(ShapesChatConfig(scenes=6, max_turns=3))
    path = export_llava(chat, 6, tmp_path)
    source = LlavaSource(path)
    assert len(source) == 6
    assert source[2].messages == chat[2].messages
