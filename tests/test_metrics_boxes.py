"""Grounding IoU, Acc@0.5 and the box-as-text formats; retrieval and zero-shot metrics."""

import pytest
import torch

from vlkit.eval.metrics import classification_metrics, format_box, grounding_accuracy, iou, parse_box, recall_at_k, retrieval


def test_iou_worked_examples():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # empty boxes


def test_grounding_accuracy_counts_unparsed_as_misses():
    targets = [(0, 0, 10, 10)] * 4
    preds = [(0, 0, 10, 10), (0, 0, 10, 6), (0, 0, 10, 4), None]  # IoU 1, 0.6, 0.4, unparsed
    g = grounding_accuracy(preds, targets)
    assert g["acc@0.5"] == 0.5 and g["unparsed"] == 1
    assert g["mean_iou"] == pytest.approx((1 + 0.6 + 0.4) / 4)


@pytest.mark.parametrize("fmt", ["pixels", "norm1", "norm1000", "loc1000", "loc1024"])
def test_box_text_round_trip(fmt):
    box = (12.0, 30.0, 40.0, 61.0)
    back = parse_box(format_box(box, fmt, 64, 64), fmt, 64, 64)
    assert iou(box, back) > 0.9


def test_box_formats_by_hand():
    assert parse_box("<loc_0><loc_500><loc_999><loc_999>", "loc1000", 1000, 1000) == pytest.approx((0.5, 500.5, 999.5, 999.5))
    # PaliGemma orders y0 x0 y1 x1 on 1024 bins
    assert parse_box("<loc0256><loc0512><loc0768><loc1023> cat", "loc1024", 1024, 512) == (512, 128, 1023, 384)
    assert parse_box("(100,200),(300,400)", "norm1000", 500, 1000) == (50, 200, 150, 400)
    assert parse_box("no box here", "pixels", 64, 64) is None
    with pytest.raises(ValueError, match="unknown box format"):
        parse_box("1 2 3 4", "yolo", 1, 1)


def test_image_to_text_recall_counts_any_caption():
    # 2 images, 4 captions: image 0 owns captions 0 and 1, image 1 owns 2 and 3
    pos = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    sim = torch.tensor([[0.1, 0.9, 0.8, 0.0], [0.9, 0.1, 0.2, 0.3]])
    r = recall_at_k(sim, pos, ks=(1, 2, 3))
    # image 0: its caption 1 is top-1 -> hit at 1; image 1: its best caption (3) ranks 2nd
    assert r == {1: 0.5, 2: 1.0, 3: 1.0}
    both = retrieval(torch.eye(2), torch.eye(2), torch.eye(2, dtype=torch.bool), ks=(1,))
    assert both == {"i2t_r1": 1.0, "t2i_r1": 1.0}


def test_zero_shot_top_k_and_mean_per_class_recall():
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[2.0, 1, 0], [2, 1, 0], [0, 1, 2], [0, 2, 1]])
    m = classification_metrics(logits, labels, 3)
    assert m["top1"] == 0.75
    assert m["mean_per_class_recall"] == pytest.approx((2 / 3 + 1) / 2)  # classes with support only
    assert m["confusion"].tolist() == [[2, 0, 1], [0, 1, 0], [0, 0, 0]]
