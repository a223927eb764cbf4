"""The shapes world: determinism, geometry, the truth of its annotations, and its export."""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlkit.data.export import export_shapes
from vlkit.data.pairs import CaptionFolder, Collate, ShapesPairs
from vlkit.data.shapes import (
    BACKGROUND,
    CLASS_NAMES,
    COLOR_NAMES,
    COLORS,
    SHAPES,
    Scene,
    ShapesWorld,
    class_index,
    holds,
    render,
)
from vlkit.errors import VlkitError
from vlkit.data.shapes import TEMPLATES
from vlkit.eval.shapes import mirror_accuracy, mirror_split
from vlkit.text.tokenizer import word_level, words_of
from vlkit.vision.preprocess import ImageProcessor

N_SCENES = 150


def png_bytes(scene: Scene) -> bytes:
    buf = io.BytesIO()
    scene.render().save(buf, format="PNG")
    return buf.getvalue()


def object_mask(obj, image_size: int) -> np.ndarray:
    """Pixels the object covers when drawn alone."""
    return (np.asarray(render([obj], image_size)) != BACKGROUND).any(axis=-1)


def center_pixel(scene: Scene, obj) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(scene.render())[int(obj.cy), int(obj.cx)])


def test_same_seed_gives_same_scenes_and_image_bytes():
    a, b = ShapesWorld(seed=7), ShapesWorld(seed=7)
    for i in range(20):
        assert a.scene(i).to_dict() == b.scene(i).to_dict()
        assert png_bytes(a.scene(i)) == png_bytes(b.scene(i))
        assert a.single(i).to_dict() == b.single(i).to_dict()


def test_different_seeds_give_different_scenes():
    a, b = ShapesWorld(seed=0), ShapesWorld(seed=1)
    differing = sum(png_bytes(a.scene(i)) != png_bytes(b.scene(i)) for i in range(20))
    assert differing >= 18
    assert [a.scene(i).to_dict() for i in range(20)] != [b.scene(i).to_dict() for i in range(20)]


@pytest.mark.parametrize("image_size", [32, 64, 100, 224])
def test_objects_lie_inside_the_image_and_never_overlap(image_size):
    world = ShapesWorld(image_size=image_size, max_objects=4, seed=3)
    n = 60 if image_size <= 100 else 20
    for i in range(n):
        scene = world.scene(i)
        image = scene.render()
        assert image.size == (image_size, image_size) and image.mode == "RGB"
        assert 1 <= len(scene.objects) <= 4
        masks = []
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
            mask = object_mask(obj, image_size)
            ys, xs = np.nonzero(mask)
            assert xs.min() >= np.floor(x0) and xs.max() <= np.ceil(x1)
            assert ys.min() >= np.floor(y0) and ys.max() <= np.ceil(y1)
            assert center_pixel(scene, obj) == COLORS[obj.color]
            masks.append(mask)
        coverage = np.sum(masks, axis=0)
        assert coverage.max() <= 1, f"scene {i}: objects overlap"


@settings(max_examples=25, deadline=None)
@given(image_size=st.integers(24, 300), seed=st.integers(0, 2**31), index=st.integers(0, 10**6))
def test_any_image_size_gives_a_valid_scene(image_size, seed, index):
    scene = ShapesWorld(image_size=image_size, seed=seed).scene(index)
    assert scene.render().size == (image_size, image_size)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
    for caption in scene.captions:
        assert caption.describes(scene), caption.text


def test_every_caption_describes_its_own_scene():
    world = ShapesWorld(max_objects=4, seed=11)
    for i in range(N_SCENES):
        scene = world.scene(i)
        assert len(scene.captions) >= 2
        for caption in scene.captions:
            assert caption.describes(scene), f"scene {i}: {caption.text!r}"


def test_captions_are_false_of_scenes_they_do_not_describe():
    world = ShapesWorld(seed=5)
    one, three = world.single(0), ShapesWorld(min_objects=3, max_objects=3, seed=5).scene(0)
    assert not any(c.describes(three) for c in one.captions if c.count == 1)
    sized = [c for c in one.captions if c.refs and c.refs[0].size is not None]
    flipped = Scene(one.image_size, [replace(one.objects[0], size="small" if one.objects[0].size == "large" else "large")])
    assert sized and not sized[0].describes(flipped)


def mirrored(scene: Scene, axis: str) -> Scene:
    s = scene.image_size
    if axis == "x":
        return Scene(s, [replace(o, cx=s - o.cx) for o in scene.objects])
    return Scene(s, [replace(o, cy=s - o.cy) for o in scene.objects])


def test_relation_captions_are_false_for_the_mirrored_scene():
    world = ShapesWorld(min_objects=2, max_objects=3, seed=2)
    checked = 0
    for i in range(N_SCENES):
        scene = world.scene(i)
        for caption in scene.captions:
            if caption.relation is None:
                continue
            rel = caption.relation[1]
            axis = "x" if rel in ("left of", "right of") else "y"
            assert caption.describes(scene)
            assert not caption.describes(mirrored(scene, axis)), f"scene {i}: {caption.text!r}"
            checked += 1
    assert checked > 100


def test_mirror_split_pairs_each_left_right_caption_with_a_scene_it_is_false_of():
    world = ShapesWorld(seed=0)
    scenes, mirrors, captions = mirror_split(world, 60)
    assert len(scenes) == len(mirrors) == len(captions) == 60
    for scene, mirror, caption in zip(scenes, mirrors, captions):
        assert caption.relation[1] in ("left of", "right of")
        assert caption.describes(scene) and not caption.describes(mirror)
        assert [(o.color, o.shape, o.size, o.cy) for o in mirror.objects] == [(o.color, o.shape, o.size, o.cy) for o in scene.objects]
        flipped = np.asarray(mirror.render())[:, ::-1].astype(int) - np.asarray(scene.render()).astype(int)
        assert (np.abs(flipped).max(axis=-1) > 0).mean() < 0.05, "the mirror is not the scene drawn left to right"
    truth = torch.tensor([float(c.describes(s)) for s, c in zip(scenes, captions)])
    false = torch.tensor([float(c.describes(m)) for m, c in zip(mirrors, captions)])
    assert mirror_accuracy(truth, false) == 1.0
    assert mirror_accuracy(false, truth) == 0.0
    assert mirror_accuracy(torch.zeros(60), torch.zeros(60)) == 0.5  # blind to left and right: chance


def test_shapes_pairs_caption_each_member_with_what_its_siblings_refute():
    world = ShapesWorld(seed=0)
    pairs = ShapesPairs(world, lambda image: None, 200)
    drawn = [(world.family(world.scene(i), i, 4), [text for _, text in pairs[i]]) for i in range(200)]
    refuted = []
    for family, texts in drawn:
        for k, (scene, text) in enumerate(zip(family, texts)):
            assert any(c.text == text and c.describes(scene) for c in scene.captions), text
            refuted.append(not any(c.text == text and c.describes(s) for j, s in enumerate(family) if j != k for c in s.captions))
    assert sum(refuted) / len(refuted) > 0.95  # all but members no caption tells apart


def test_variant_differs_from_its_source_and_stays_valid():
    world = ShapesWorld(max_objects=3, seed=4)
    for i in range(N_SCENES):
        scene = world.scene(i)
        variant = world.variant(scene, i)
        assert variant.objects != scene.objects
        assert png_bytes(variant) != png_bytes(scene)
        assert [(o.cx, o.cy) for o in variant.objects] == [(o.cx, o.cy) for o in scene.objects]
        kinds = [(o.color, o.shape) for o in variant.objects]
        assert len(set(kinds)) == len(kinds)
        masks = [object_mask(o, world.image_size) for o in variant.objects]
        assert np.sum(masks, axis=0).max() <= 1
        for caption in variant.captions:
            assert caption.describes(variant)
    assert world.variant(world.scene(3), 3).to_dict() == world.variant(world.scene(3), 3).to_dict()


def test_class_labels_cover_40_color_shape_classes():
    assert len(CLASS_NAMES) == len(set(CLASS_NAMES)) == 40
    for color in COLOR_NAMES:
        for shape in SHAPES:
            assert CLASS_NAMES[class_index(color, shape)] == f"{color} {shape}"
    world = ShapesWorld(seed=0)
    seen = set()
    for i in range(400):
        scene = world.single(i)
        (obj,) = scene.objects
        assert scene.label == class_index(obj.color, obj.shape)
        seen.add(scene.label)
    assert seen == set(range(40))
    for label in range(40):
        assert world.single(label, label=label).label == label
    with pytest.raises(ValueError, match="label"):
        world.single(0, label=40)
    multi = ShapesWorld(min_objects=2, max_objects=3).scene(0)
    assert multi.label is None


NAME = r"(?P<{0}color>\w+) (?P<{0}shape>\w+)"


def find(scene: Scene, color: str | None = None, shape: str | None = None, size: str | None = None) -> list[int]:
    return [
        k
        for k, o in enumerate(scene.objects)
        if (color is None or o.color == color) and (shape is None or o.shape == shape) and (size is None or o.size == size)
    ]


def check_vqa(scene: Scene, qa: dict) -> None:
    q, a = qa["question"], qa["answer"]
    objs = scene.objects
    if m := re.fullmatch(r"how many objects are there\?", q):
        assert a == str(len(objs))
    elif m := re.fullmatch(r"how many (\w+) objects are there\?", q):
        assert a == str(sum(o.color == m[1] for o in objs))
    elif m := re.fullmatch(r"is there an? " + NAME.format("") + r"\?", q):
        assert a == ("yes" if find(scene, m["color"], m["shape"]) else "no")
    elif m := re.fullmatch(r"what color is the (\w+)\?", q):
        (k,) = find(scene, shape=m[1])
        assert a == objs[k].color
    elif m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        (k,) = find(scene, color=m[1])
        assert a == objs[k].shape
    elif m := re.fullmatch(r"is the " + NAME.format("a") + r" (left of|right of|above|below) the " + NAME.format("b") + r"\?", q):
        (i,), (j,) = find(scene, m["acolor"], m["ashape"]), find(scene, m["bcolor"], m["bshape"])
        assert a == ("yes" if holds(m[3], objs[i], objs[j], scene.image_size) else "no")
    else:
        raise AssertionError(f"unrecognised question {q!r}")


def test_vqa_answers_are_consistent_with_the_scene():
    world = ShapesWorld(max_objects=4, seed=8)
    types_seen = set()
    for i in range(N_SCENES):
        scene = world.scene(i)
        for qa in scene.vqa:
            check_vqa(scene, qa)
            types_seen.add((qa["type"], qa["answer"] if qa["type"] in ("yesno", "relation") else None))
        counts = [qa for qa in scene.vqa if qa["question"] == "how many objects are there?"]
        assert len(counts) == 1 and counts[0]["answer"] == str(len(scene.objects))
    assert {("yesno", "yes"), ("yesno", "no"), ("relation", "yes"), ("relation", "no"), ("count", None)} <= types_seen


def resolve_expression(scene: Scene, text: str) -> int:
    """The index of the one object a referring expression picks out, read independently."""
    objs = scene.objects
    if text in ("the leftmost object", "the rightmost object"):
        pick = min if text == "the leftmost object" else max
        return pick(range(len(objs)), key=lambda k: objs[k].cx)
    words = text.removeprefix("the ").split()
    if len(words) == 3:
        matches = find(scene, color=words[1], shape=words[2], size=words[0])
    elif len(words) == 2 and words[1] == "object":
        matches = find(scene, color=words[0])
    elif len(words) == 2:
        matches = find(scene, color=words[0], shape=words[1])
    else:
        matches = find(scene, shape=words[0])
    assert len(matches) == 1, f"{text!r} is ambiguous or matches nothing"
    return matches[0]


def test_referring_expressions_pick_out_their_object_and_its_box():
    world = ShapesWorld(max_objects=4, seed=9)
    for i in range(N_SCENES):
        scene = world.scene(i)
        assert {r["object"] for r in scene.referring} == set(range(len(scene.objects)))
        for ref in scene.referring:
            k = resolve_expression(scene, ref["text"])
            assert k == ref["object"], f"scene {i}: {ref['text']!r}"
            obj = scene.objects[k]
            assert ref["box"] == pytest.approx(list(obj.box), abs=0.01)
            x0, y0, x1, y1 = ref["box"]
            assert center_pixel(scene, obj) == COLORS[obj.color]
            assert x0 <= obj.cx <= x1 and y0 <= obj.cy <= y1


def test_scene_generation_and_render_throughput():
    """Images per second of scene generation + render on one core (printed; run with -s)."""
    world = ShapesWorld(seed=0)
    world.scene(0).render()
    n = 300
    t0 = time.perf_counter()
    images = [world.scene(i).render() for i in range(n)]
    rate = n / (time.perf_counter() - t0)
    print(f"\nshapes world: {rate:.0f} images/s (64 px, 1-3 objects, scene + captions/VQA + render, one core)")
    assert all((np.asarray(im) != BACKGROUND).any() for im in images)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "shapes"
    summary = export_shapes(out, 50, image_size=32, seed=3, max_objects=3)
    return out, summary


def test_export_writes_an_image_folder_of_the_40_classes(exported):
    out, summary = exported
    root = out / "classification"
    assert summary["classification"] == {"path": str(root), "images": 50, "classes": 40}
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(folders) == 40 and "red_star" in folders
    classnames = json.loads((root / "classnames.json").read_text())
    assert classnames == [f"{'an' if f[0] in 'aeiou' else 'a'} {f.replace('_', ' ')}" for f in folders]
    assert json.loads((root / "templates.json").read_text()) == TEMPLATES
    images = sorted(root.glob("*/*.png"))
    assert len(images) == 50
    for path in images:
        color, shape = path.parent.name.split("_")
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape == (32, 32, 3)
        colored = (pixels != BACKGROUND).any(-1)
        assert colored.any()
        assert (pixels[colored] == COLORS[color]).all(), path


def test_export_writes_captions_and_scenes_that_match_the_world(exported):
    out, summary = exported
    root = out / "captions"
    assert summary["captions"]["images"] == 50
    records = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    scenes = [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines()]
    assert len(records) == len(scenes) == 50
    assert summary["captions"]["captions"] == sum(len(r["captions"]) for r in records)
    world = ShapesWorld(32, 1, 3, 3)
    for i, (rec, sc) in enumerate(zip(records, scenes)):
        scene = world.scene(i)
        assert rec["image"] == sc["image"] == f"images/{i:06d}.png"
        assert rec["captions"] == [c.text for c in scene.captions]
        assert sc == {"image": rec["image"], **json.loads(json.dumps(scene.to_dict()))}
        assert np.array_equal(np.asarray(Image.open(root / rec["image"])), np.asarray(scene.render()))
    assert json.loads((out / "shapes_export.json").read_text()) == summary


def test_export_is_deterministic_and_replaces_an_earlier_export(tmp_path, exported):
    first, _ = exported
    again = tmp_path / "again"
    export_shapes(again, 50, image_size=32, seed=3, max_objects=3)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file() and p.name != "shapes_export.json")
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file() and p.name != "shapes_export.json")
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    export_shapes(again, 10, image_size=32, seed=4)
    assert len(list((again / "captions" / "images").iterdir())) == 10
    assert (again / "captions" / "images" / "000000.png").read_bytes() != (first / "captions" / "images" / "000000.png").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_export_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        export_shapes(tmp_path, 5)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_caption_folder_reads_the_export_end_to_end(exported):
    out, _ = exported
    processor = ImageProcessor(size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    folder = CaptionFolder(out / "captions", processor)
    records = [json.loads(line) for line in folder.records]
    assert len(folder) == 50
    tokenizer = word_level(words_of(c for r in records for c in r["captions"]), context_length=32)
    items = [folder[i] for i in range(8)]
    for i, [(pixels, caption)] in enumerate(items):
        assert pixels.shape == (3, 32, 32)
        assert caption in records[i]["captions"]
        expected = processor(Image.open(out / "captions" / records[i]["image"]))
        assert pixels.equal(expected)
    batch = Collate(tokenizer)(items)
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 8 and batch["skipped"] == []
    assert (batch["input_ids"] != tokenizer.token_id("[UNK]")).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 3}, "image_size 3 leaves no room for objects of 0.4 of the side; expected at least 4 pixels"),
        ({"image_size": 39, "sizes": (0.9, 0.95)}, "expected at least 40 pixels"),
        ({"min_objects": 0}, "min_objects 0, max_objects 3; expected 1 <= min_objects <= max_objects"),
        ({"min_objects": 4}, "min_objects 4, max_objects 3"),
        ({"sizes": (0.2, 1.0)}, r"object sizes \(0.2, 1.0\); expected two fractions"),
    ],
)
def test_settings_no_scene_can_be_drawn_with_are_named(kwargs, message):
    """Before: ``vlkit data shapes --image-size 2`` ended in numpy's 'high - low < 0'."""
    with pytest.raises(VlkitError, match=message):
        ShapesWorld(**kwargs)


@pytest.mark.parametrize("kwargs", [{"image_size": 4}, {"image_size": 40, "sizes": (0.9, 0.95)}])
def test_the_smallest_allowed_world_draws_scenes(kwargs):
    world = ShapesWorld(**kwargs)
    for i in range(30):
        assert world.scene(i).render().size == (kwargs["image_size"],) * 2 and world.single(i).objects
