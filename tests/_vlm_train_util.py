"""Tiny pieces for the VLM-training tests: a byte-level BPE tokenizer with ``<image>`` and a ChatML
template, a tiny vlkit Llama saved as an LM folder, a tiny vlkit CLIP folder, and a LLaVA JSON
folder of small synthetic images (one and several images per sample)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vlkit.lm.llama import LlamaConfig, LlamaLM
from vlkit.text.lm_tokenizer import LMTokenizer
from vlkit.train.checkpoint import save_model

CORPUS = ["a red circle and a blue star", "What color is the circle?", "The circle is red.", "How many shapes are there?",
          "There are two shapes.", "Describe the image.", "Compare the two images.", "The first is red, the second blue."]
SPECIALS = ["<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
IMAGE_SIZE, PATCH = 32, 8
VISION = {"image_size": IMAGE_SIZE, "patch_size": PATCH, "width": 32, "depth": 2, "num_heads": 4}
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2  # "default" drops the class token


def tokenizer_folder(folder: Path) -> Path:
    """A byte-level BPE with ``<image>`` (id 3) and ChatML turns, saved as transformers saves one."""
    import transformers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                         chat_template=CHATML, additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                         extra_special_tokens={"image_token": "<image>"}).save_pretrained(folder)
    return Path(folder)


def lm_folder(folder: Path, seed: int = 0, max_positions: int = 256) -> Path:
    """A 2-layer, 32-wide vlkit Llama over :func:`tokenizer_folder`'s ids, saved with its tokenizer."""
    tokenizer_folder(folder / "tok")
    tokenizer = LMTokenizer.from_folder(folder / "tok")
    torch.manual_seed(seed)
    lm = LlamaLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                             bos_token_id=0, eos_token_id=tokenizer.eos_token_id))
    lm.tokenizer = tokenizer
    save_model(folder / "lm", lm, "llama")
    return folder / "lm"


def clip_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny vlkit CLIP (its tower is :data:`VISION`) with its image preprocessing."""
    from vlkit.models.clip import CLIP, CLIPConfig
    from vlkit.text.encoder import TextConfig
    from vlkit.vision.preprocess import ImageProcessor
    from vlkit.vision.vit import ViTConfig

    torch.manual_seed(seed)
    model = CLIP(CLIPConfig(vision=ViTConfig(**VISION), text=TextConfig(vocab_size=50, width=32, depth=1, num_heads=4,
                                                                         context_length=16), embed_dim=16))
    model.processor = ImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    save_model(folder, model, "clip")
    return folder


def image(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


RECORDS = [
    {"id": "one", "image": "images/a.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "The circle is red."}]},
    {"id": "two", "image": ["images/a.png", "images/b.png"],
     "conversations": [{"from": "human", "value": "Compare <image> and <image> please."},
                       {"from": "gpt", "value": "The first is red, the second blue."},
                       {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "There are two shapes."}]},
    {"id": "text", "conversations": [{"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": "a red circle"}]},
    {"id": "three", "image": ["images/b.png", "images/c.png", "images/a.png"],
     "conversations": [{"from": "human", "value": "<image>\n<image>\nHow many shapes are there?"},
                       {"from": "gpt", "value": "There are two shapes."},
                       {"from": "human", "value": "And here? <image>"}, {"from": "gpt", "value": "a blue star"}]},
]


def llava_folder(folder: Path, records: list[dict] = RECORDS, repeat: int = 1) -> Path:
    """``folder/data.json`` with ``records`` (ids suffixed per repeat) and their images under ``images/``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k, name in enumerate("abc"):
        image(k).save(folder / "images" / f"{name}.png")
    recs = [{**r, "id": f"{r['id']}-{n}"} for n in range(repeat) for r in records] if repeat > 1 else records
    (folder / "data.json").write_text(json.dumps(recs, indent=1))
    return folder / "data.json"


def recipe(lm: Path, source: Path, stage: int = 1, steps: int = 4, **sections) -> dict:
    """A tiny recipe dict: a random tower (or ``model.vision``), ``lm``, ``source``; sections merged in."""
    base = {
        "stage": stage,
        "model": {"vision_config": VISION, "lm": str(lm), "connector": "mlp"},
        "data": {"source": str(source)},
        "train": {"connector_lr": 1e-3} if stage == 1 else {"connector_lr": 1e-3, "lm": "full", "lm_lr": 5e-4},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "loop": {"steps": steps, "batch_size": 2, "log_every": 1, "precision": "fp32"},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base
