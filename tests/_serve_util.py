"""Tiny models for the server tests (a LLaVA saved by transformers with a ChatML tokenizer whose
``<image>`` is the image token, a tiny vlkit CLIP, a tiny Llama chat LM) and request helpers:
images as PNG bytes and data URLs."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from _interop_util import tiny_clip_folder
from _lm_util import chatml_folder
from _llava_models import IMAGE_SIZE, edit_config, hf_model, save

NEW = 8


def vlm_folder(path: Path) -> Path:
    import transformers

    from vlkit.text.lm_tokenizer import LMTokenizer

    text = dict(vocab_size=402, max_position_embeddings=256)
    path = save(hf_model(text_overrides=text), path)
    chatml_folder(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "image_token": "<image>"}))
    edit_config(path, image_token_index=LMTokenizer.from_folder(path).token_to_id("<image>"))
    transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(path)
    return path


def next_vlm_folder(path: Path) -> Path:
    """A LLaVA-NeXT folder (AnyRes tiles of the 32-pixel tower) with the ChatML tokenizer: images of
    other shapes take other token counts."""
    import transformers

    from _llava_next_models import hf_model as next_model

    from vlkit.text.lm_tokenizer import LMTokenizer

    next_model(vocab=402, image_token=400).save_pretrained(path)
    chatml_folder(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "image_token": "<image>"}))
    assert LMTokenizer.from_folder(path).token_to_id("<image>") == 400
    transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(path)
    return path


def lm_folder(path: Path, positions: int = 256) -> Path:
    import transformers

    path = chatml_folder(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                                   initializer_range=0.3, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def clip_folder(path: Path) -> Path:
    return tiny_clip_folder(path)


def picture(color: str = "red", size=(64, 48)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).rectangle([4, 8, 40, 30], fill=color)
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes | Image.Image, media: str = "image/png") -> str:
    raw = png(data) if isinstance(data, Image.Image) else data
    return f"data:{media};base64," + base64.b64encode(raw).decode()


def image_message(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def concurrently(fn, n: int, timeout: float = 60.0) -> list:
    """``[fn(0), ..., fn(n - 1)]``, each called on its own thread, all at once (None where one failed)."""
    import threading

    out: list = [None] * n

    def one(i):
        out[i] = fn(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out
