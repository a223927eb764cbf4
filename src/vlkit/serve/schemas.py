"""The request bodies of OpenAI's chat completions and embeddings APIs, checked by pydantic (a
field of the wrong type or out of range is a 400 naming it), and the response and stream chunk
shapes, built as plain dicts in OpenAI's field order."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    """Fields OpenAI defines that vlkit does not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    """``max_completion_tokens`` (or the older ``max_tokens``) bounds the answer; the server caps
    it. ``temperature`` 0 is greedy, a positive one (or ``top_p``) samples; neither given: the
    model folder's generation defaults."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list | None = None

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):
        """OpenAI types ``n`` and ``stream`` as nullable, null meaning the default."""
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("expected up to 4 non-empty stop strings")
        return value


TokenIds = list[Annotated[int, Field(ge=0)]]


class EmbeddingRequest(_Body):
    """``input``: a text, a list of texts, a list of token ids or a list of such lists (OpenAI's
    forms). vlkit's extension: a text that is an image ``data:`` URL (``data:image/png;base64,...``)
    is embedded as that image, in the same space as the texts (CLIP, SigLIP)."""

    model: str
    input: Union[str, list[str], TokenIds, list[TokenIds]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class SearchRequest(_Body):
    """The photo search the web page sends: a text ``query`` or an ``image`` (a ``data:`` URL),
    ``k`` results."""

    query: str | None = None
    image: str | None = None
    k: int = 10


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(cid: str, model: str, created: int, choices: list[tuple[str, str]], prompt_tokens: int,
               completion_tokens: int) -> dict:  # fmt: skip
    """A whole ``chat.completion``: ``choices`` as ``(text, finish_reason)``."""
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": why}
                    for i, (text, why) in enumerate(choices)],
        "usage": usage(prompt_tokens, completion_tokens),
    }  # fmt: skip


def chunk(cid: str, model: str, created: int, index: int | None = None, delta: dict | None = None,
          finish_reason: str | None = None, usage_counts: dict | None = None, include_usage: bool = False) -> dict:  # fmt: skip
    """A ``chat.completion.chunk``: one choice's delta (and its finish reason), or with
    ``usage_counts`` the closing chunk of ``stream_options.include_usage`` (no choices). Under
    ``include_usage`` every other chunk has ``"usage": null``, as OpenAI's stream does."""
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": []}
    if index is not None:
        out["choices"] = [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    if usage_counts is not None or include_usage:
        out["usage"] = usage_counts
    return out
