"""LLaVA: a vision tower, a connector and a language model. Image tokens in ``input_ids`` (one
``image_token_id`` per visual token, as transformers' processor expands them) are replaced by
the connector's outputs, and the language model reads the spliced embeddings.

The pieces a successor replaces are separate methods: :meth:`Llava.vision_features` (tower and
layer selection), :meth:`Llava.image_features` (features per image, the connector applied) and
:meth:`Llava.embed_inputs` (where the features go). ``forward`` and ``generate`` only compose them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlkit.config import NonNegativeInt, OneOf, from_dict, validate
from vlkit.connectors import CONNECTORS, build_connector
from vlkit.errors import VlkitError
from vlkit.lm.cache import KVCache
from vlkit.lm.generate import generate as generate_tokens
from vlkit.lm.llama import LlamaConfig, LlamaLM
from vlkit.losses import causal_lm_loss
from vlkit.vision.vit import ViT, ViTConfig

"""Label value the loss skips (transformers' and PyTorch's convention)."""


def _clip_vit_l14_336() -> ViTConfig:
    return ViTConfig(image_size=336, patch_size=14, width=1024, depth=24, num_heads=16)


@dataclass
class LlavaConfig:
    """Defaults are llava-1.5-7b's (transformers' ``LlavaConfig``): CLIP ViT-L/14 at 336 px, a
    Llama-7B with 32064 ids, the two-layer GELU connector.

    ``vision_feature_layer``: the tower layer the features come from (an index into
    ``[embeddings, layer 1, ..., layer L]``, negative from the end), or several, concatenated on
    the channel dimension. ``vision_feature_select_strategy``: "default" drops the first token
    (the class token; transformers drops it whatever the tower), "full" keeps every token.
    ``connector_options`` are the fields of the connector kind's config (see
    :data:`vlkit.connectors.CONNECTORS`)."""

    vision: ViTConfig = field(default_factory=_clip_vit_l14_336)
    lm: LlamaConfig = field(default_factory=lambda: LlamaConfig(vocab_size=32064))
    connector: Annotated[str, OneOf(tuple(CONNECTORS))] = "mlp"
    connector_options: dict = field(default_factory=dict)
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: Annotated[str, OneOf(("default", "full"))] = "default"
    image_token_id: NonNegativeInt = 32000

    def __post_init__(self):
        validate(self)
        layers = self.vision_feature_layer
        if isinstance(layers, list):
            layers = self.vision_feature_layer = tuple(layers)
        states = self.vision.depth + 1
        items = layers if isinstance(layers, tuple) else (layers,)
        if not items or not all(isinstance(i, int) and not isinstance(i, bool) and -states <= i < states for i in items):
            raise ValueError(
                f"vision_feature_layer must be an index or a non-empty list of indices into the tower's {states} "
                f"hidden states ({-states}..{states - 1}), got {layers!r}"
            )
        if self.image_token_id >= self.lm.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the LM's vocabulary of {self.lm.vocab_size}")
        options_cls = CONNECTORS[self.connector][0]
        from_dict(options_cls, self.connector_options, where=f"{self.connector} connector options")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The selected hidden states as non-negative indices (0 = the embeddings)."""
        layers = self.vision_feature_layer
        return tuple(i % (self.vision.depth + 1) for i in (layers if isinstance(layers, tuple) else (layers,)))


@dataclass
class LlavaOutput:
    """``logits`` ``[B, n, V]``; ``loss`` the mean next-token cross entropy over labels that are
    not -100 (with ``labels``); ``cache`` the cache passed in, advanced."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    cache: KVCache | None = None


def _check_pixels(pixel_values) -> None:
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        what = f"{pixel_values.dtype} tensor" if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise VlkitError(f"pixel_values must be a float tensor [images, 3, H, W] (from the processor), got a {what}")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise VlkitError(
            f"pixel_values must be [images, 3, H, W] (every image of the batch, in the order of their image "
            f"tokens), got shape {tuple(pixel_values.shape)}"
        )


class Llava(nn.Module):
    """``vision`` (a :class:`ViT`) → layer selection → ``connector`` → spliced into the embeddings of
    ``lm`` (a :class:`LlamaLM`). Loaded models also carry ``tokenizer``, ``generation_config`` and
    ``processor``."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = ViT(cfg.vision)
        dim = cfg.vision.width * len(cfg.feature_layers)
        self.connector = build_connector(cfg.connector, dim, cfg.lm.hidden_size, **cfg.connector_options)
        self.lm = LlamaLM(cfg.lm)
        self.tokenizer = None
        self.generation_config = None
        self.processor = None

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Image tokens one image of ``height`` × ``width`` pixels (default the tower's size) takes in
        ``input_ids``: what a processor expands each ``<image>`` to."""
        v = self.cfg.vision
        grid = ((height or v.image_size) // v.patch_size) * ((width or v.image_size) // v.patch_size)
        tokens = grid + v.num_prefix - (self.cfg.vision_feature_select_strategy == "default")
        return self.connector.num_tokens(tokens)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[images, N, Dv · layers]``: the selected hidden states of the tower (the class token
        dropped for "default"), concatenated on channels. Blocks past the deepest selected layer
        are not run."""
        _check_pixels(pixel_values)
        layers = self.cfg.feature_layers
        x = self.vision.embed(pixel_values)
        states = {0: x}
        run = self._checkpointed if self.vision.transformer.gradient_checkpointing and self.training else self._call
        for i, block in enumerate(self.vision.transformer.blocks[: max(layers)], start=1):
            x = states[i] = run(block, x)
        chosen = [states[i] for i in layers]
        if self.cfg.vision_feature_select_strategy == "default":
            chosen = [s[:, 1:] for s in chosen]
        return chosen[0] if len(chosen) == 1 else torch.cat(chosen, dim=-1)

    def image_features(self, pixel_values: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """``[images, M, D_lm]``: each image's visual tokens, in the order their image tokens come.
        Plain LLaVA resizes every image to the tower's size, so it takes no ``image_sizes``."""
        if image_sizes is not None:
            raise VlkitError(f"{type(self).__name__} takes no image_sizes (every image is resized to one size)")
        return self.connector(self.vision_features(pixel_values))

    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor | list[torch.Tensor] | None) -> torch.Tensor:
        """The LM's input embeddings ``[B, L, D]`` with the visual tokens written, in order, over the
        positions of ``image_token_id`` (a masked scatter). ``image_features``: ``[images, M, D]``,
        ``[tokens, D]`` or a list of per-image ``[M_i, D]``; their token count must equal the number
        of image tokens."""
        if not isinstance(input_ids, torch.Tensor):
            raise VlkitError(f"input_ids must be a tensor of token ids [batch, length], got a {type(input_ids).__name__}")
        embeds = self.lm.embed(input_ids)
        mask = input_ids == self.cfg.image_token_id
        tokens = int(mask.sum())
        if image_features is None:
            if tokens:
                raise VlkitError(
                    f"input_ids hold {tokens} image tokens (id {self.cfg.image_token_id}) but no pixel_values were given"
                )
            return embeds
        flat = _flatten_features(image_features, embeds.shape[-1])
        if flat.shape[0] != tokens:
            per_row = mask.sum(1).tolist()
            raise VlkitError(
                f"input_ids hold {tokens} image tokens (id {self.cfg.image_token_id}; per row {per_row}) but the images "
                f"give {flat.shape[0]} features ({_feature_counts(image_features)}); each image needs exactly its "
                "visual tokens' count of image tokens"
            )
        return embeds.masked_scatter(mask[..., None], flat.to(embeds.dtype))

    def inputs_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, image_sizes=None,
                      pixel_values_videos: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """:meth:`embed_inputs` with :meth:`image_features` of ``pixel_values`` (none without images), on
        the model's device: what ``inputs_embeds`` of :func:`vlkit.lm.generate.stream` takes. Plain
        LLaVA takes no videos (LLaVA-NeXT does)."""
        if pixel_values_videos is not None:
            raise VlkitError(f"{type(self).__name__} takes no pixel_values_videos; expected images only")
        device = self.lm.embed_tokens.weight.device
        input_ids = input_ids.to(device) if isinstance(input_ids, torch.Tensor) else input_ids
        features = None
        if pixel_values is not None:
            _check_pixels(pixel_values)
            features = self.image_features(pixel_values.to(device), image_sizes)
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
        image_sizes=None,
        pixel_values_videos: torch.Tensor | None = None,
        loss_reduction: str = "token",
    ) -> LlavaOutput:
        """transformers' LLaVA call: ``input_ids`` ``[B, L]`` with the image tokens expanded, every
        image of the batch in ``pixel_values``, padding (left or right) in ``attention_mask``;
        positions follow the mask. ``labels`` ``[B, L]`` (-100 where not supervised) give ``.loss``,
        averaged as ``loss_reduction`` says (:func:`vlkit.losses.causal_lm_loss`)."""
        embeds = self.inputs_embeds(input_ids, pixel_values, image_sizes, pixel_values_videos)
        if attention_mask is not None:
            attention_mask = attention_mask.to(embeds.device)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                      logits_to_keep=logits_to_keep)
        loss = None if labels is None else causal_lm_loss(out.logits, labels, loss_reduction)
        return LlavaOutput(out.logits, loss, out.cache)

    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_sizes=None,
        pixel_values_videos: torch.Tensor | None = None,
        **options,
    ) -> torch.Tensor:
        """The new tokens ``[B · num_return_sequences, new]`` for a left-padded batch, by
        :func:`vlkit.lm.generate.generate` prefilled from the spliced embeddings (and the ids, which
        the penalties read). ``options``: every option of that engine (``max_new_tokens``,
        ``do_sample``, ``num_beams``, ``stop_strings``, ``generation_config``, ``generator``, ...);
        defaults come from the model's ``generation_config``."""
        options.setdefault("generation_config", self.generation_config)
        if self.tokenizer:
            options.setdefault("tokenizer", self.tokenizer)
        with torch.inference_mode():
            embeds = self.inputs_embeds(input_ids, pixel_values, image_sizes, pixel_values_videos)
        return generate_tokens(self.lm, input_ids, attention_mask, embeds, **options)

    @staticmethod
    def _call(block, x):
        return block(x)

    @staticmethod
    def _checkpointed(block, x):
        return checkpoint(block, x, use_reentrant=False)


def _flatten_features(features, dim: int) -> torch.Tensor:
    if isinstance(features, (list, tuple)):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]) if features else torch.zeros(0, dim)
    if not isinstance(features, torch.Tensor) or features.dim() not in (2, 3) or features.shape[-1] != dim:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise VlkitError(f"image_features must be [images, M, {dim}], [tokens, {dim}] or a list of [M, {dim}], got {shape}")
    return features.reshape(-1, dim)


def _feature_counts(features) -> str:
    if isinstance(features, (list, tuple)):
        return f"{len(features)} images: {[int(f.reshape(-1, f.shape[-1]).shape[0]) for f in features]}"
    if features.dim() == 3:
        return f"{features.shape[0]} images × {features.shape[1]}"
    return "given flat"
