"""BLIP-2's generative model (stage 2): a vision tower, the Q-Former's learned queries reading its
layer-normed features, a linear ``language_projection`` to the language model's width, and a
decoder LM (OPT or the Llama family) that reads the projected queries before the text. Vision
tower and LM are frozen by default: stage 2 trains the Q-Former and the projection.

Inputs are transformers' (``Blip2ForConditionalGeneration`` with ``Blip2Processor``): each row of
``input_ids`` holds ``num_query_tokens`` image tokens (``image_token_id``) before the text, and the
projected query outputs replace their embeddings. The processor pads the text and then prepends
the image tokens, so in a left-padded batch the padding sits between them; :meth:`Blip2.generate`
moves it to the front for the generation engine, which changes nothing the model computes
(positions follow the mask and padding is never attended).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated

import torch
from torch import nn

from vlkit.config import NonNegativeInt, OneOf, from_dict, validate
from vlkit.connectors.qformer import QFormer, QFormerConfig
from vlkit.errors import VlkitError
from vlkit.lm.cache import KVCache
from vlkit.lm.generate import generate as generate_tokens
from vlkit.lm.llama import LlamaConfig, LlamaLM
from vlkit.lm.opt import OPTLM, OPTConfig
from vlkit.losses import IGNORE_INDEX, causal_lm_loss
from vlkit.vision.vit import ViT, ViTConfig

LANGUAGE_MODELS = {"opt": (OPTConfig, OPTLM), "llama": (LlamaConfig, LlamaLM)}
"""``Blip2Config.lm_type`` → the language model's config and class."""


def _eva_vit_g() -> ViTConfig:
    """BLIP-2's EVA ViT-g/14 as transformers keeps it (39 layers: LAVIS drops the 40th)."""
    return ViTConfig(image_size=224, patch_size=14, width=1408, depth=39, num_heads=16, mlp_ratio=6144 / 1408, act="gelu",
                     eps=1e-6, patch_bias=True, pre_norm=False, final_norm="all")


def _opt_2_7b() -> OPTConfig:
    return OPTConfig(vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32)


@dataclass
class Blip2Config:
    """Defaults are Salesforce/blip2-opt-2.7b's. ``lm`` is an :class:`OPTConfig` (``lm_type`` "opt") or
    a :class:`LlamaConfig` ("llama"); ``qformer.context_dim`` is the tower's width. ``freeze_vision``
    and ``freeze_lm``: those parts get no gradients and stay in eval mode under ``.train()``."""

    vision: ViTConfig = field(default_factory=_eva_vit_g)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    lm: OPTConfig | LlamaConfig = field(default_factory=_opt_2_7b)
    lm_type: Annotated[str, OneOf(tuple(LANGUAGE_MODELS))] = "opt"
    image_token_id: NonNegativeInt = 50265
    freeze_vision: bool = True
    freeze_lm: bool = True

    def __post_init__(self):
        validate(self)
        cls = LANGUAGE_MODELS[self.lm_type][0]
        if isinstance(self.lm, dict):
            self.lm = from_dict(cls, self.lm, where=f"lm ({self.lm_type})")
        if not isinstance(self.lm, cls):
            raise ValueError(f"lm is a {type(self.lm).__name__} but lm_type {self.lm_type!r} needs a {cls.__name__}")
        if self.qformer.context_dim != self.vision.width:
            raise ValueError(f"qformer.context_dim {self.qformer.context_dim} differs from the vision tower's width {self.vision.width}")
        if isinstance(self.lm, OPTConfig) and self.lm.word_embed_proj_dim != self.lm.hidden_size:
            raise ValueError(f"an OPT whose word_embed_proj_dim ({self.lm.word_embed_proj_dim}) differs from its hidden_size "
                             f"({self.lm.hidden_size}) has no place for BLIP-2's projected queries (transformers' neither)")
        if self.image_token_id >= self.lm.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the LM's vocabulary of {self.lm.vocab_size}")

    @property
    def num_query_tokens(self) -> int:
        return self.qformer.num_queries


@dataclass
class Blip2Output:
    """``logits`` ``[B, n, V]``; ``loss`` the mean next-token cross entropy over the supervised labels;
    ``cache`` the cache passed in, advanced."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    cache: KVCache | None = None


def vision_tower(cfg: ViTConfig) -> ViT:
    """A ViT without a final norm of its own: BLIP-2 normalises the image features in the Q-Former
    (``image_norm``, BLIP-2's ``ln_vision``, which trains while the tower is frozen)."""
    tower = ViT(cfg)
    tower.norm = nn.Identity()
    return tower


def check_pixels(pixel_values, image_size: int) -> None:
    """``pixel_values`` must be floats ``[images, 3, S, S]`` at the tower's size ``S`` (its position
    table has no other)."""
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        what = f"{pixel_values.dtype} tensor" if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise VlkitError(f"pixel_values must be a float tensor [images, 3, H, W] (from the processor), got a {what}")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise VlkitError(f"pixel_values must be [images, 3, H, W], one image per row of input_ids; got shape {tuple(pixel_values.shape)}")
    h, w = pixel_values.shape[2:]
    if (h, w) != (image_size, image_size):
        raise VlkitError(f"pixel_values are {h}x{w} images; this BLIP-2's vision tower takes {image_size}x{image_size} "
                         "(vision image_size): preprocess the images with the model's processor")


def image_embeds(vision: ViT, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[images, N, Dv]``: the tower's last-layer tokens, class token included and not normalised
    (what the Q-Former's ``image_norm`` takes)."""
    check_pixels(pixel_values, vision.cfg.image_size)
    x = vision.embed(pixel_values.to(vision.patch_embed.weight.device))
    return vision.transformer(x)[0]


def padding_first(attention_mask: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The mask and ``tensors`` (``[B, L]`` or ``[B, L, D]``) with each row's padding moved before its
    tokens, the tokens' order kept."""
    order = torch.argsort((attention_mask != 0).int(), dim=1, stable=True)
    out = [attention_mask.gather(1, order)]
    for t in tensors:
        out.append(t.gather(1, order if t.dim() == 2 else order[..., None].expand_as(t)))
    return out


class Blip2(nn.Module):
    """``vision`` (a :class:`ViT`) → ``qformer`` (a :class:`QFormer`) → ``language_projection`` → written
    over the image tokens' embeddings of ``lm``. Loaded models also carry ``tokenizer``,
    ``generation_config`` and ``processor`` (the image preprocessing)."""

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        self.cfg = cfg
        self.vision = vision_tower(cfg.vision)
        self.qformer = QFormer(cfg.qformer)
        self.language_projection = nn.Linear(cfg.qformer.width, cfg.lm.hidden_size)
        self.lm = LANGUAGE_MODELS[cfg.lm_type][1](cfg.lm)
        self.tokenizer = None
        self.generation_config = None
        self.processor = None
        for part in self.frozen_parts():
            part.requires_grad_(False)

    @classmethod
    def from_parts(cls, vision: ViT, lm: OPTLM | LlamaLM, qformer: QFormerConfig, image_token_id: int, **options) -> "Blip2":
        """Stage 2's starting point: a new Q-Former and projection between a trained tower (its final
        norm dropped) and a trained LM, whose weights, tokenizer and generation defaults are taken.
        ``qformer.context_dim`` becomes the tower's width; ``options`` are other config fields."""
        lm_type = next(name for name, (_, lm_cls) in LANGUAGE_MODELS.items() if isinstance(lm, lm_cls))
        cfg = Blip2Config(vision=vision.cfg, qformer=dataclasses.replace(qformer, context_dim=vision.cfg.width), lm=lm.cfg,
                          lm_type=lm_type, image_token_id=image_token_id, **options)
        model = cls(cfg)
        model.vision.load_state_dict({k: v for k, v in vision.state_dict().items() if not k.startswith("norm.")})
        model.lm.load_state_dict(lm.state_dict())
        model.tokenizer = getattr(lm, "tokenizer", None)
        model.generation_config = getattr(lm, "generation_config", None)
        return model

    def frozen_parts(self) -> list[nn.Module]:
        """The parts the config freezes (vision tower, language model)."""
        return [part for part, frozen in ((self.vision, self.cfg.freeze_vision), (self.lm, self.cfg.freeze_lm)) if frozen]

    def train(self, mode: bool = True) -> "Blip2":
        """As ``nn.Module.train``, but frozen parts stay in eval mode."""
        super().train(mode)
        for part in self.frozen_parts():
            part.eval()
        return self

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Image tokens per image in ``input_ids``: the query count, whatever the image."""
        return self.cfg.num_query_tokens

    def image_features(self, pixel_values: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """``[images, num_query_tokens, D_lm]``: the projected query outputs."""
        if image_sizes is not None:
            raise VlkitError("BLIP-2 takes no image_sizes (every image is resized to the tower's size)")
        queries = self.qformer(image_embeds(self.vision, pixel_values))
        return self.language_projection(queries)

    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """The LM's input embeddings with row i's image tokens replaced by image i's features."""
        if not isinstance(input_ids, torch.Tensor):
            raise VlkitError(f"input_ids must be a tensor of token ids [batch, length], got a {type(input_ids).__name__}")
        embeds = self.lm.embed(input_ids)
        mask = input_ids == self.cfg.image_token_id
        token = f"image tokens (id {self.cfg.image_token_id})"
        if image_features is None:
            if mask.any():
                raise VlkitError(f"input_ids hold {int(mask.sum())} {token} but no pixel_values were given")
            return embeds
        if image_features.shape[0] != input_ids.shape[0]:
            raise VlkitError(f"{image_features.shape[0]} images for {input_ids.shape[0]} rows of input_ids; BLIP-2 takes "
                             "one image per row")
        m = self.cfg.num_query_tokens
        per_row = mask.sum(1)
        if not bool((per_row == m).all()):
            raise VlkitError(f"each row of input_ids must hold num_query_tokens={m} {token} before its text, as "
                             f"Blip2Processor writes them; the rows hold {per_row.tolist()}")
        return embeds.masked_scatter(mask[..., None], image_features.to(embeds.dtype))

    def inputs_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, image_sizes=None) -> torch.Tensor:
        """:meth:`embed_inputs` with :meth:`image_features` of ``pixel_values``, on the model's device."""
        device = self.lm.embed_tokens.weight.device
        input_ids = input_ids.to(device) if isinstance(input_ids, torch.Tensor) else input_ids
        features = None if pixel_values is None else self.image_features(pixel_values, image_sizes)
        return self.embed_inputs(input_ids, features)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> Blip2Output:
        """transformers' call. ``labels`` ``[B, L]`` (or ``[B, T]`` for the last T positions, as
        transformers aligns them) give ``.loss``; image positions are never supervised."""
        embeds = self.inputs_embeds(input_ids, pixel_values)
        if attention_mask is not None:
            attention_mask = attention_mask.to(embeds.device)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                      logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            labels = self.text_labels(input_ids.to(embeds.device), labels.to(embeds.device))
            loss = causal_lm_loss(out.logits[:, -labels.shape[1] :], labels)
        return Blip2Output(out.logits, loss, out.cache)

    def text_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with the image positions set to -100; labels shorter than ``input_ids`` cover its
        last positions."""
        b, length = input_ids.shape
        if labels.dim() != 2 or labels.shape[0] != b or labels.shape[1] > length:
            raise VlkitError(f"labels have shape {tuple(labels.shape)}; expected [{b}, at most {length}] like input_ids")
        image = input_ids[:, length - labels.shape[1] :] == self.cfg.image_token_id
        return labels.masked_fill(image, IGNORE_INDEX)

    def start_ids(self, batch: int) -> torch.Tensor:
        """The prompt transformers' ``generate`` builds without ``input_ids``: the image tokens and BOS."""
        bos = self.cfg.lm.bos_token_id
        if bos is None:
            raise VlkitError("generate() without input_ids starts from the LM's BOS token, and its config has none; give input_ids")
        ids = [self.cfg.image_token_id] * self.cfg.num_query_tokens + [bos]
        return torch.tensor([ids] * batch, dtype=torch.long)

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **options,
    ) -> torch.Tensor:
        """The new tokens ``[B · num_return_sequences, new]`` by :func:`vlkit.lm.generate.generate`,
        prefilled from the spliced embeddings (and the ids, which the penalties read). Rows must end
        with a token; padding may come before the image tokens or between them and the text.
        ``options``: that engine's options; defaults come from the model's ``generation_config``."""
        options.setdefault("generation_config", self.generation_config)
        if self.tokenizer:
            options.setdefault("tokenizer", self.tokenizer)
        if input_ids is None:
            if pixel_values is None:
                raise VlkitError("generate() needs input_ids or pixel_values")
            input_ids = self.start_ids(pixel_values.shape[0])
        with torch.inference_mode():
            embeds = self.inputs_embeds(input_ids, pixel_values)
        input_ids = input_ids.to(embeds.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(embeds.device)
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise VlkitError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(input_ids.shape)} like input_ids")
            if not bool((attention_mask[:, -1] != 0).all()):
                raise VlkitError("attention_mask: every row must end with a token (pad on the left, as Blip2Processor "
                                 "does for generation), so that new tokens follow the text")
            attention_mask, input_ids, embeds = padding_first(attention_mask, input_ids, embeds)
        return generate_tokens(self.lm, input_ids, attention_mask, embeds, **options)
