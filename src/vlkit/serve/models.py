"""The models a server holds, by name: chat models (a language model with a chat template, or a
vision-language model with its processor) and embedding models (CLIP, SigLIP). A chat model turns
OpenAI messages into prompt ids and image tensors; its engine (:mod:`.engine`) generates."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlkit.errors import VlkitError
from vlkit.serve.errors import ApiError
from vlkit.serve.images import ImageFetcher
from vlkit.serve.schemas import Message
from vlkit.serve.settings import ServeSettings
from vlkit.text.conversation import IMAGE_TOKEN, ConversationError, special_texts


@dataclass
class Prompt:
    """One request's prompt: ids (image tokens expanded) and the processor's image tensors."""

    ids: list[int]
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    sample: object = None  # the processor's ProcessedSample (VLMs), which the engine collates


class ChatModel:
    """A language or vision-language model answering chat messages. ``options`` are the
    generation options every answer has: the template's end of turn (VLMs) as an EOS id or a
    stop string, as :class:`~vlkit.models.llava_processor.LlavaAnswerer` adds it."""

    kind = "chat"

    def __init__(self, name: str, path: Path, model, device: str | None = None):
        from vlkit.chat import is_vlm

        self.name, self.path, self.model, self.created = name, path, model, int(time.time())
        # where its engine runs it: ``device``, else where its weights are
        self.device = device or str(next(model.parameters()).device)
        self.vlm = is_vlm(model)
        self.lm = model.lm if self.vlm else model
        self.generation_config = model.generation_config
        if self.vlm:
            from vlkit.eval.generative import answerer

            vlm = answerer(model)
            self.processor, self.tokenizer = vlm.processor, vlm.processor.tokenizer
            self.options = vlm.with_stops({})
        else:
            self.processor, self.tokenizer = None, model.tokenizer
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise VlkitError(f"{path}: the language model has no chat template; a chat server needs one "
                                 "(tokenizer_config.json's chat_template)")
            from vlkit.lm.generate import resolve_config

            eos = self.tokenizer.eos_token_id
            has_eos = resolve_config(model, model.generation_config).eos_ids
            self.options = {} if has_eos or eos is None else {"eos_token_id": eos}  # an answer ends at the EOS
        self.max_positions = self.lm.config.max_position_embeddings
        # what a request's text may not hold: the template would read it as structure (a turn, an image)
        self.reserved = sorted({IMAGE_TOKEN, *special_texts(self.tokenizer)} - {""})

    @property
    def has_weights(self) -> bool:
        return next(self.model.parameters()).device.type != "meta"

    def drop_weights(self) -> None:
        """Free the weights when another process generates: prompts need the configs and the
        processor only."""
        self.model.to("meta")

    def image_tokens(self) -> int:
        return self.model.num_image_tokens() if self.vlm else 0

    def prompt(self, messages: list[Message], fetcher: ImageFetcher, settings: ServeSettings) -> Prompt:
        """The request's messages as prompt ids (and images): parts joined by newlines, each image
        part an ``<image>`` placeholder fetched under the server's rules, rendered by the template
        with the assistant's turn opened."""
        turns, images = [], []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for k, part in enumerate(content):
                    if part.type == "text":
                        texts.append(self._literal(part.text, f"messages[{i}].content[{k}]"))
                    else:
                        images.append((f"messages[{i}].content[{k}]", part.image_url.url))
                        texts.append(IMAGE_TOKEN)
                content = "\n".join(texts)
            elif content is None:
                raise ApiError(400, f"messages[{i}]: no content; expected a string or a list of parts", "invalid_value",
                               f"messages[{i}].content")
            else:
                self._literal(content, f"messages[{i}].content")
            turns.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        if images and not self.vlm:
            raise ApiError(400, f"model {self.name!r} is a language model; it takes no images ({images[0][0]})",
                           "images_not_supported", "messages")
        most = self.max_images(settings)
        if len(images) > most:
            raise ApiError(400, f"{len(images)} images in the request; model {self.name!r} takes at most {most} "
                           f"(each is {self.image_tokens()} tokens of its {self.max_positions}-token context)",
                           "too_many_images", "messages")
        pil = [fetcher.fetch(url, where) for where, url in images]
        try:
            if self.vlm:
                sample = self.processor.encode(turns, pil, add_generation_prompt=True, sample="the request")
                return Prompt(sample.input_ids, sample.images, sample)
            return Prompt(self.tokenizer.encode_chat(turns))
        except ConversationError as err:
            raise ApiError(400, str(err), "invalid_messages", "messages") from None

    def _literal(self, text: str, where: str) -> str:
        """``text`` unless it holds a special token of the model (``<image>``, a turn marker): OpenAI's
        text is literal and images come as image parts, but the template would read those as
        structure, so a request could open turns of its own."""
        for token in self.reserved:
            if token in text:
                raise ApiError(400, f"{where}: the text holds {token!r}, a special token of model {self.name!r}; text is "
                               "taken literally and may not hold special tokens (send images as image_url parts)",
                               "invalid_value", where)  # fmt: skip
        return text

    def max_images(self, settings: ServeSettings) -> int:
        if not self.vlm:
            return 0
        return min(settings.max_images, (self.max_positions - 1) // max(1, self.image_tokens()))


class EmbeddingModel:
    """A two-tower model (``encode_image``, ``encode_text``) whose embeddings share one space."""

    kind = "embedding"

    def __init__(self, name: str, path: Path, model):
        self.name, self.path, self.model, self.created = name, path, model, int(time.time())
        if getattr(model, "tokenizer", None) is None:
            raise VlkitError(f"{path}: the embedding model has no tokenizer (tokenizer.json)")


def load_models(specs: list[str], device: str = "cpu", chat_weights: bool = True) -> dict[str, ChatModel | EmbeddingModel]:
    """``--model`` values (``DIR`` or ``NAME=DIR``; the name defaults to the folder's name) →
    loaded models by name; a folder that holds neither kind is named. ``chat_weights=False``
    keeps the chat models without their weights (configs, tokenizer, processor: all prompts need),
    for a server whose engine processes load them onto ``device`` themselves."""
    import vlkit

    out: dict = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or "/" in name:
            name, folder = Path(spec.rstrip("/")).name, spec
        if name in out:
            raise VlkitError(f"--model {spec}: the name {name!r} is taken; name it: --model OTHER={folder}")
        model = vlkit.load(folder)  # read once, on the CPU; then each kind goes where it runs
        if hasattr(model, "encode_text") and hasattr(model, "encode_image"):
            out[name] = EmbeddingModel(name, Path(folder), model.to(device))
        elif hasattr(model, "generation_config"):
            out[name] = ChatModel(name, Path(folder), model.to(device) if chat_weights else model, device)
            if not chat_weights:
                out[name].drop_weights()
        else:
            raise VlkitError(f"--model {folder}: holds a {type(model).__name__}; the server takes chat models (language or "
                             "vision-language) and embedding models (CLIP, SigLIP)")
    if not out:
        raise VlkitError("no --model given; expected at least one model folder")
    return out
