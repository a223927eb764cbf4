"""Tiny random transformers BLIP-2 models (a 2-layer tower on 32-pixel images, a 3-layer Q-Former with 4
queries, an OPT or Llama LM) saved by ``save_pretrained`` with an OPT-like tokenizer (``</s>`` as BOS,
``<pad>``) whose ``<image>`` transformers' ``Blip2Processor`` added, and ``BlipImageProcessor``
preprocessing: the BLIP-2 parity tests' reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import processors

from _interop_util import perturb
from _lm_util import _byte_level_bpe

IMAGE_SIZE, QUERIES = 32, 4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
              patch_size=8)
QFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, max_position_embeddings=16)
TEXT = {
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=2),
}
PROMPTS = ["a photo of", "Question: what color is it? Short answer:", ""]
"""Three prompts of different lengths (the last one BOS alone): a left-padded batch."""


def processor(folder: Path):
    """transformers' ``Blip2Processor`` over an OPT-like tokenizer (ids: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2,
    ``<unk>`` 3; ``</s>`` written first, as OPT's tokenizer does), saved in ``folder``; it adds ``<image>``."""
    import transformers

    tok = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"], 200)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B:1", special_tokens=[("</s>", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                                unk_token="<unk>")
    image = transformers.BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    proc = transformers.Blip2Processor(image_processor=image, tokenizer=fast, num_query_tokens=QUERIES)
    proc.save_pretrained(folder)
    return proc


def hf_model(lm: str = "opt", architecture: str = "Blip2ForConditionalGeneration", vocab: int = 272, image_token: int = 260,
             seed: int = 0, queries: int = QUERIES, text_overrides: dict | None = None):
    """A random transformers BLIP-2 in eval mode, its weights moved off their initial values."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER,
                                   text_config={**TEXT[lm], "vocab_size": vocab, **(text_overrides or {})},
                                   num_query_tokens=queries, image_token_index=image_token)
    return perturb(getattr(transformers, architecture)(cfg), seed=seed, scale=0.1)


def folder_with_files(hf, folder: Path):
    """``hf`` saved with the processor's files; returns ``(folder, transformers processor)``."""
    folder = Path(folder)
    hf.save_pretrained(folder)
    proc = processor(folder)
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == hf.config.image_token_index
    return folder, proc


def images(n: int = 3, size=(48, 40)) -> list[Image.Image]:
    """``n`` small images, a differently coloured and placed rectangle on white each."""
    out = []
    for i in range(n):
        img = Image.new("RGB", size, "white")
        ImageDraw.Draw(img).rectangle([2 + 6 * i, 4, 30, 20 + 4 * i], fill=("red", "blue", "green", "purple")[i % 4])
        out.append(img)
    return out


def hf_batch(proc, prompts=PROMPTS, pics=None):
    """transformers' processor on a left-padded batch."""
    proc.tokenizer.padding_side = "left"
    return dict(proc(images=pics or images(len(prompts)), text=list(prompts), return_tensors="pt", padding=True))


def edit_config(folder: Path, **changes) -> Path:
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return Path(folder)
