"""BLIP-2 stage 1: a frozen vision tower, the Q-Former with its text path, and the three objectives
that teach the queries to pull out what text can use.

- ITC: queries and text apart; similarity = the best query's cosine with the text's ``[CLS]``
  output, over a learned temperature (:func:`~vlkit.losses.qformer_itc_loss`).
- ITM: queries and text attend to each other; one hard negative text per image and one hard
  negative image per text (:func:`~vlkit.losses.hard_negatives`); logits = mean over queries of a
  two-way head.
- ITG: ``[DEC]`` replaces ``[CLS]``; the text is causal and sees every query, the queries never
  see the text; a BERT-style LM head predicts the next token.

Retrieval ranks by ITC and re-scores the top k by ITM's log-odds plus the ITC logit
(:meth:`Blip2QFormer.itm_scores`, :meth:`Blip2QFormer.itc_logits`, :func:`vlkit.eval.retrieval.rerank`);
:meth:`Blip2QFormer.caption` writes captions with the ITG head alone, through the one generation
loop (:mod:`vlkit.lm.generate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.config import Fraction, NonNegativeInt, PositiveFloat, PositiveInt, validate
from vlkit.connectors.qformer import QFormer, QFormerConfig
from vlkit.errors import VlkitError
from vlkit.lm.generate import generate
from vlkit.lm.output import LMOutput
from vlkit.losses import (
    IGNORE_INDEX,
    causal_lm_loss,
    gather_with_grad,
    global_rows,
    hard_negatives,
    itm_loss,
    max_query_similarity,
    qformer_itc_loss,
)
from vlkit.models.blip2 import image_embeds, vision_tower
from vlkit.models.inputs import check_tokens
from vlkit.nn.mlp import ACTIVATIONS
from vlkit.vision.vit import ViTConfig


@dataclass
class Blip2QFormerConfig:
    """Defaults follow BLIP-2 (256-d ITC space, temperature 0.07, ITC label smoothing 0.1).

    The Q-Former reads the tower's last layer, un-normed (as in :class:`~vlkit.models.blip2.Blip2`;
    LAVIS's second-to-last layer is a tower with its last layer dropped, as transformers stores it).
    ``decoder``: the ITG language-model head (transformers' retrieval model has none).
    ``dec_token_id``/``eos_token_id``: the Q-Former tokenizer's ``[DEC]`` (ITG's first token) and
    end-of-text ids; training sets them from the tokenizer."""

    vision: ViTConfig = field(default_factory=ViTConfig)
    qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(text=True))
    embed_dim: PositiveInt = 256
    temperature: PositiveFloat = 0.07
    min_temperature: PositiveFloat = 0.001
    max_temperature: PositiveFloat = 0.5
    itc_label_smoothing: Fraction = 0.1
    decoder: bool = True
    dec_token_id: NonNegativeInt | None = None
    eos_token_id: NonNegativeInt | None = None

    def __post_init__(self):
        validate(self)
        if not self.qformer.text:
            raise ValueError("Blip2QFormerConfig.qformer needs its text path (text=true): every stage-1 objective reads text")
        if self.qformer.context_dim != self.vision.width:
            raise ValueError(f"Blip2QFormerConfig.qformer.context_dim {self.qformer.context_dim} differs from the vision width {self.vision.width}")
        if not self.min_temperature <= self.temperature <= self.max_temperature:
            raise ValueError(f"Blip2QFormerConfig.temperature {self.temperature} is outside [{self.min_temperature}, {self.max_temperature}]")
        for key in ("dec_token_id", "eos_token_id"):
            value = getattr(self, key)
            if value is not None and value >= self.qformer.vocab_size:
                raise ValueError(f"Blip2QFormerConfig.{key} {value} is outside the Q-Former's vocabulary of {self.qformer.vocab_size}")


class LMHead(nn.Module):
    """BERT's prediction head: dense, activation, LayerNorm, then the vocabulary projection."""

    def __init__(self, width: int, vocab_size: int, act: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = ACTIVATIONS[act]
        self.norm = nn.LayerNorm(width, eps=eps)
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))


class Blip2QFormer(nn.Module):
    """``forward(pixel_values, input_ids, attention_mask)`` → ITC + ITM + ITG (equal weights);
    :attr:`last_losses` keeps the three parts of the last call (training logs them in
    ``metrics.jsonl`` as ``loss_itc``, ``loss_itm``, ``loss_itg``). The temperature is learned as
    ``logit_scale = log(1 / temperature)`` (0 = plain cosines, as transformers scores ITC)."""

    def __init__(self, cfg: Blip2QFormerConfig):
        super().__init__()
        self.cfg = cfg
        q = cfg.qformer
        self.vision = vision_tower(cfg.vision)
        self.qformer = QFormer(q)
        self.vision_proj = nn.Linear(q.width, cfg.embed_dim)
        self.text_proj = nn.Linear(q.width, cfg.embed_dim)
        self.itm_head = nn.Linear(q.width, 2)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)))
        self.itg_head = LMHead(q.width, q.vocab_size, q.act, q.eps) if cfg.decoder else None
        self.tokenizer = None
        self.processor = None
        self.last_losses: dict[str, float] = {}

    # features -------------------------------------------------------------------------------

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's last-layer tokens ``[B, N, Dv]``, un-normed: what the Q-Former reads."""
        return image_embeds(self.vision, pixel_values)

    def image_features(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Normalised ITC embeddings of every query ``[B, M, E]``."""
        return F.normalize(self.vision_proj(self.qformer(image_tokens)), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, M, E]``: one ITC embedding per query (normalised)."""
        return self.image_features(self.image_tokens(pixel_values))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, E]``: the text's ``[CLS]`` output projected (normalised); the text alone, no queries."""
        self._check_text(input_ids, attention_mask)
        return F.normalize(self.text_proj(self.qformer.encode_text(input_ids, attention_mask)[:, 0]), dim=-1)

    def similarity(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """ITC scores ``[images, texts]``: the best query's cosine with each text (no temperature)."""
        return max_query_similarity(image_features, text_features)

    def itm_logits(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, 2]``: the two-way head over every query's output of the joint pass, averaged."""
        out = self.qformer.encode(image_tokens, input_ids, "itm", text_mask=attention_mask)
        return self.itm_head(out.queries).mean(dim=1)

    def itm_scores(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]``: each pair's match log-odds, ``logit[match] - logit[no match]``. The two-way softmax
        ignores a shift of both logits, so the match logit alone (LAVIS's score) carries a per-pair
        offset the head was never trained to fix; the log-odds is the score ITM learned."""
        self._check_text(input_ids, attention_mask)
        logits = self.itm_logits(image_tokens, input_ids, attention_mask)
        return logits[:, 1] - logits[:, 0]

    def itc_logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """ITC scores ``[images, texts]`` on the scale the contrastive loss trained them: cosines over
        the temperature (:meth:`similarity` times ``logit_scale.exp()``)."""
        return self.similarity(image_features, text_features) * self.logit_scale.exp()

    def itg_logits(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, V]`` next-token logits of the causal text, which sees every query."""
        if self.itg_head is None:
            raise VlkitError("this BLIP-2 Q-Former has no ITG head (Blip2QFormerConfig.decoder=false; a transformers "
                             "Blip2ForImageTextRetrieval folder has none), so it cannot write captions")
        return self.itg_head(self.qformer.encode(image_tokens, input_ids, "itg", text_mask=attention_mask).text)

    # training --------------------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The stage-1 loss. ``input_ids`` start with ``[CLS]`` (the tokenizer's first token);
        ITG swaps it for ``[DEC]``. ``generator`` draws the ITM negatives (default: torch's)."""
        self._check_text(input_ids, attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.cfg.dec_token_id is None:
            raise VlkitError("Blip2QFormerConfig.dec_token_id is not set; ITG needs the [DEC] token's id")
        tokens = self.image_tokens(pixel_values)
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.cfg.dec_token_id
        itg_pass = self.qformer.encode(tokens, dec_ids, "itg", text_mask=attention_mask)  # its queries never saw the text
        queries = F.normalize(self.vision_proj(itg_pass.queries), dim=-1)
        text = F.normalize(self.text_proj(self.qformer.encode_text(input_ids, attention_mask)[:, 0]), dim=-1)
        itc, sim_i2t, sim_t2i = qformer_itc_loss(queries, text, self.logit_scale.exp(), self.cfg.itc_label_smoothing)
        itm = self._itm(tokens, input_ids, attention_mask, sim_i2t, sim_t2i, generator)
        itg = causal_lm_loss(self.itg_head(itg_pass.text), dec_ids.masked_fill(attention_mask == 0, IGNORE_INDEX))
        self.last_losses = {"itc": itc.item(), "itm": itm.item(), "itg": itg.item()}
        return itc + itm + itg

    def _itm(self, tokens, input_ids, attention_mask, sim_i2t, sim_t2i, generator) -> torch.Tensor:
        """Positive pairs, each text with a hard negative image, each image with a hard negative
        text (drawn from every rank's batch); identical texts count as positives."""
        all_tokens, all_ids, all_mask = gather_with_grad(tokens), gather_with_grad(input_ids), gather_with_grad(attention_mask)
        n = input_ids.shape[0]
        text, all_text = input_ids.masked_fill(attention_mask == 0, -1), all_ids.masked_fill(all_mask == 0, -1)
        positives = (text[:, None] == all_text[None]).all(-1)
        positives[torch.arange(n, device=input_ids.device), global_rows(n, input_ids.device)] = True
        negative_image = hard_negatives(sim_t2i, positives, generator)
        negative_text = hard_negatives(sim_i2t, positives, generator)
        image_in = torch.cat([tokens, all_tokens[negative_image], tokens])
        ids_in = torch.cat([input_ids, input_ids, all_ids[negative_text]])
        mask_in = torch.cat([attention_mask, attention_mask, all_mask[negative_text]])
        matched = torch.cat([torch.ones(n), torch.zeros(2 * n)]).to(input_ids.device)
        return itm_loss(self.itm_logits(image_in, ids_in, mask_in), matched)

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Keep the temperature in ``[min_temperature, max_temperature]`` after each step, as LAVIS does."""
        self.logit_scale.clamp_(math.log(1 / self.cfg.max_temperature), math.log(1 / self.cfg.min_temperature))

    # captions --------------------------------------------------------------------------------

    @torch.no_grad()
    def caption(self, pixel_values: torch.Tensor, max_new_tokens: int = 20, **options) -> list[str]:
        """Captions by the Q-Former alone (the ITG head), from ``[DEC]``, through :func:`vlkit.lm.generate.generate`
        (greedy by default; ``num_beams=``, ``do_sample=`` ... as there); at most the Q-Former's positions
        after ``[DEC]``."""
        if self.tokenizer is None:
            raise VlkitError("this model has no tokenizer attached; set model.tokenizer or load the model with vlkit.load")
        if self.cfg.dec_token_id is None:
            raise VlkitError("Blip2QFormerConfig.dec_token_id is not set; captions start from the [DEC] token")
        tokens = self.image_tokens(pixel_values.to(self.logit_scale.device))
        prompt = torch.full((tokens.shape[0], 1), self.cfg.dec_token_id, dtype=torch.long, device=tokens.device)
        options.setdefault("eos_token_id", self.cfg.eos_token_id)
        options.setdefault("pad_token_id", self.cfg.qformer.pad_token_id)
        new = min(max_new_tokens, self.cfg.qformer.max_positions - 1)
        ids = generate(ITGDecoder(self, tokens), prompt, max_new_tokens=new, **options)
        eos = self.cfg.eos_token_id
        rows = [row if eos is None or eos not in row else row[: row.index(eos)] for row in ids.tolist()]
        return [text.strip() for text in self.tokenizer.tok.decode_batch(rows, skip_special_tokens=True)]

    def _check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        check_tokens(input_ids, attention_mask, self.cfg.qformer.vocab_size)


class ITGDecoder(nn.Module):
    """The language-model contract (``DESIGN.md``) over the Q-Former's ITG pass for one batch of
    images, so captions come from the one generation loop. It keeps no key/value cache: each step
    reruns the text so far with the queries (captions are short; the queries' own states do not
    depend on the text, so this is what a cache would give)."""

    def __init__(self, model: Blip2QFormer, image_tokens: torch.Tensor):
        super().__init__()
        self.model, self.image_tokens = model, image_tokens
        self.config = SimpleNamespace(max_position_embeddings=model.cfg.qformer.max_positions, vocab_size=model.cfg.qformer.vocab_size)

    def new_cache(self, batch: int, max_length: int, dtype=None, device=None) -> "TextSoFar":
        if batch % self.image_tokens.shape[0]:
            raise VlkitError(f"{batch} generation rows do not split evenly over {self.image_tokens.shape[0]} images")
        return TextSoFar(self.image_tokens.repeat_interleave(batch // self.image_tokens.shape[0], dim=0), max_length)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None, logits_to_keep=0) -> LMOutput:
        if input_ids is None or cache is None:
            raise VlkitError("the Q-Former's ITG decoder takes token ids and the cache from new_cache()")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise VlkitError("the Q-Former's ITG decoder takes unpadded prompts (every row the same length)")
        cache.append(input_ids)
        logits = self.model.itg_logits(cache.image_tokens, cache.ids)
        return LMOutput(logits[:, -logits_to_keep:] if logits_to_keep else logits, cache)


class TextSoFar:
    """What :class:`ITGDecoder` keeps between steps: each row's image tokens and its text so far."""

    def __init__(self, image_tokens: torch.Tensor, max_length: int):
        self.image_tokens, self.max_length = image_tokens, max_length
        self.ids = torch.zeros(image_tokens.shape[0], 0, dtype=torch.long, device=image_tokens.device)

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def append(self, ids: torch.Tensor) -> None:
        if self.length + ids.shape[1] > self.max_length:
            raise VlkitError(f"the ITG decoder was set up for {self.max_length} positions; {self.length + ids.shape[1]} do not fit")
        self.ids = torch.cat([self.ids, ids], dim=1)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep and reorder rows (beam search)."""
        self.ids, self.image_tokens = self.ids[index], self.image_tokens[index]
