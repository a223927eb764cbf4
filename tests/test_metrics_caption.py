"""BLEU, CIDEr-D and ROUGE-L equal coco-caption's scorers (pycocoevalcap) to 1e-9."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlkit.data.shapes import ShapesWorld
from vlkit.eval.metrics import bleu, bleu_scores, caption_metrics, cider, cider_scores, lcs_length, rouge_l, tokenize_caption

coco_bleu = pytest.importorskip("pycocoevalcap.bleu.bleu")
coco_cider = pytest.importorskip("pycocoevalcap.cider.cider")
coco_rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")


def oracle(preds, refs):
    gts = {k: [tokenize_caption(r) for r in v] for k, v in refs.items()}
    res = {k: [tokenize_caption(preds[k])] for k in refs}
    b, b_per = coco_bleu.Bleu(4).compute_score(gts, res, verbose=0)
    c, c_per = coco_cider.Cider().compute_score(gts, res)
    r, _ = coco_rouge.Rouge().compute_score(gts, res)
    return b, b_per, c, c_per, r


def shapes_data(n=60, seed=3):
    world = ShapesWorld(seed=seed)
    refs, preds = {}, {}
    for i in range(n):
        caps = [c.text for c in world.scene(i).captions]
        refs[i] = caps[1:]
        # a prediction from a neighbouring scene: partly right, partly wrong
        preds[i] = world.scene(i + (i % 3)).captions[0].text
    return preds, refs


VOCAB = "a an the red blue green cat dog on under sits big small two of with , . !".split()


def random_data(rng, n):
    refs, preds = {}, {}
    for i in range(n):
        refs[f"img{i}"] = [" ".join(rng.choices(VOCAB, k=rng.randint(1, 14))) for _ in range(rng.randint(1, 5))]
        preds[f"img{i}"] = " ".join(rng.choices(VOCAB, k=rng.randint(0, 14)))
    return preds, refs


def assert_same(preds, refs):
    b, b_per, c, c_per, r = oracle(preds, refs)
    mine_b, mine_b_per = bleu_scores(preds, refs)
    mine_c, mine_c_per = cider_scores(preds, refs)
    assert mine_b == pytest.approx(b, abs=1e-9, rel=0)
    assert mine_c == pytest.approx(float(c), abs=1e-9, rel=0)
    assert rouge_l(preds, refs) == pytest.approx(float(r), abs=1e-9, rel=0)
    for j, k in enumerate(refs):
        assert mine_c_per[k] == pytest.approx(float(c_per[j]), abs=1e-9, rel=0)
        assert mine_b_per[k] == pytest.approx([b_per[m][j] for m in range(4)], abs=1e-9, rel=0)


def test_equal_to_coco_caption_on_shapes():
    preds, refs = shapes_data()
    assert_same(preds, refs)
    scores = bleu(preds, refs)
    assert 0 < scores[3] < scores[0] < 1 and 0 < cider(preds, refs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_coco_caption_on_random_sentences(seed):
    rng = random.Random(seed)
    preds, refs = random_data(rng, 80)
    assert_same(preds, refs)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_equal_to_coco_caption_property(seed):
    rng = random.Random(seed)
    preds, refs = random_data(rng, rng.randint(1, 12))
    assert_same(preds, refs)


def test_perfect_and_empty_predictions():
    refs = {1: ["a red circle on the left"], 2: ["two blue squares"]}
    perfect = {1: "A red circle, on the left.", 2: "two blue squares"}
    b = bleu(perfect, refs)
    assert b[0] == pytest.approx(1.0, abs=1e-8) and b[2] == pytest.approx(1.0, abs=1e-8)
    assert rouge_l(perfect, refs) == pytest.approx(1.0)
    empty = {1: "", 2: ""}
    assert bleu(empty, refs) == pytest.approx([0, 0, 0, 0], abs=1e-9)
    assert cider(empty, refs) == 0.0 and rouge_l(empty, refs) == 0.0


def test_tokenisation_is_documented_behaviour():
    assert tokenize_caption("A Dog's bone, here.  'Quoted' x_y!") == "a dog's bone here quoted x y"
    # tokenize=False scores the text as given (split on whitespace)
    refs = {0: ["A cat."]}
    assert bleu({0: "a cat"}, refs)[0] == pytest.approx(1.0, abs=1e-8)
    assert bleu({0: "a cat"}, refs, tokenize=False)[0] < 0.6


def test_mismatched_ids_name_the_ids():
    with pytest.raises(KeyError, match="no references.*'x'"):
        cider({"x": "a cat"}, {})
    with pytest.raises(KeyError, match="no prediction.*'y'"):
        bleu({}, {"y": ["a cat"]})
    with pytest.raises(ValueError, match="id 3"):
        cider({3: "a"}, {3: []})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=12), st.lists(st.sampled_from("abcd"), max_size=12))
def test_lcs_matches_table(a, b):
    from pycocoevalcap.rouge.rouge import my_lcs

    assert lcs_length(a, b) == (my_lcs(a, b) if a and b else 0)


def test_caption_metrics_bundle():
    preds, refs = shapes_data(20)
    corpus, per = caption_metrics(preds, refs)
    assert set(corpus) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"}
    assert set(per) == set(refs) and all(set(v) == {"bleu4", "cider", "rouge_l"} for v in per.values())
