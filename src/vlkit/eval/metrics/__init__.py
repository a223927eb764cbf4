"""Evaluation metrics, each computed the way the field reports it.

One concept per module: :mod:`.text` (vlkit's caption tokenisation), :mod:`.bleu`,
:mod:`.cider` (CIDEr-D), :mod:`.rouge` (ROUGE-L) — all three equal to coco-caption's
scorers on the same tokens — :mod:`.vqa` (VQAv2 accuracy), :mod:`.choice` (multiple
choice and numeric answers), :mod:`.boxes` (grounding). Retrieval recall@K and zero-shot
top-k / mean per-class recall live in :mod:`vlkit.eval.retrieval` and
:mod:`vlkit.eval.zeroshot` and are re-exported here.
"""

from vlkit.eval.metrics.bleu import bleu, bleu_scores
from vlkit.boxes import format_box, iou, parse_box, xywh_to_xyxy
from vlkit.eval.metrics.boxes import grounding_accuracy
from vlkit.eval.metrics.choice import extract_choice, extract_number, numeric_match
from vlkit.eval.metrics.cider import cider, cider_scores
from vlkit.eval.metrics.rouge import lcs_length, rouge_l, rouge_l_scores
from vlkit.text.caption import tokenize_caption
from vlkit.eval.metrics.vqa import accuracy_by_type, normalize_answer, vqa_accuracy
from vlkit.eval.retrieval import recall_at_k, retrieval
from vlkit.eval.zeroshot import classification_metrics


def caption_metrics(predictions: dict, references: dict, tokenize: bool = True) -> tuple[dict, dict]:
    """BLEU-1..4, CIDEr-D and ROUGE-L in one call: ``(corpus scores, {id: per-sample scores})``."""
    b, b_per = bleu_scores(predictions, references, tokenize=tokenize)
    c, c_per = cider_scores(predictions, references, tokenize=tokenize)
    r, r_per = rouge_l_scores(predictions, references, tokenize=tokenize)
    corpus = {**{f"bleu{k + 1}": v for k, v in enumerate(b)}, "cider": c, "rouge_l": r}
    per = {k: {"bleu4": b_per[k][3], "cider": c_per[k], "rouge_l": r_per[k]} for k in c_per}
    return corpus, per


__all__ = [
    "accuracy_by_type", "bleu", "bleu_scores", "caption_metrics", "cider", "cider_scores", "classification_metrics",
    "extract_choice", "extract_number", "format_box", "grounding_accuracy", "iou", "lcs_length",
    "normalize_answer", "numeric_match", "parse_box", "recall_at_k", "retrieval", "rouge_l",
    "rouge_l_scores", "tokenize_caption", "vqa_accuracy", "xywh_to_xyxy",
]  # fmt: skip
