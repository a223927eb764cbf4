"""Conversations for a chat model: templates that render them, and token ids whose labels cover
the assistant's turns only.

Messages come in LLaVA's format (``{"from": "human" | "gpt" | "system", "value": str}``) or
OpenAI's (``{"role": "user" | "assistant" | "system", "content": str | parts}``, the parts
``{"type": "text", "text": ...}`` and ``{"type": "image"}`` / ``"image_url"``, an image part
standing for an ``<image>`` placeholder and parts joined by newlines). An optional system turn
comes first, then user and assistant turns alternate, starting with the user.

A template renders a conversation as :class:`Segment` s of text, each supervised (an assistant's
answer and its end-of-turn token) or not. The ids are each segment tokenised on its own and
concatenated; the labels copy the ids of the supervised segments and are -100 elsewhere, so they
line up with the ids by construction. (The LLaVA repo tokenises the whole prompt and masks it by
lengths measured on separately tokenised pieces; when the two disagree it masks the whole sample,
its "tokenization mismatch".) Each ``<image>`` placeholder becomes the tokenizer's image token,
repeated as many times as the image has visual tokens.

Templates (:data:`TEMPLATES`, or ``"chat_template"``: the tokenizer's own jinja template):

- ``plain``: LLaVA's stage-1 alignment, ``<image>{caption}\\n``: the user turn keeps only its
  image placeholders (its text, and any system turn, are dropped, as LLaVA drops them);
- ``llava_v1``: Vicuna v1, ``{system} USER: {question} ASSISTANT: {answer}</s>USER: ...``;
- ``chatml``: ``<|im_start|>{role}\\n{text}<|im_end|>\\n`` per turn;
- ``chat_template``: the jinja template rendered turn by turn; the text each assistant turn adds
  is supervised up to its last special token (the end of turn), what follows it is not.

Segment boundaries sit where byte-level pre-tokenizers split anyway (at special tokens and image
placeholders, before a space, after a newline), so with byte-level BPE (GPT-2, Llama-3, Qwen) the
ids equal those of the whole rendered text. SentencePiece-style tokenizers differ at boundaries:
Llama-2's legacy ``tokenizer.json`` prepends "▁" to every piece it is given, and metaspace with
``prepend_scheme="first"`` prepends it to a segment though not to text that follows a special
token inside a whole text (and its merges may cross a space). The ids then differ from the whole
text's around a boundary; the labels still cover exactly the assistant's tokens, and prompts
built here for generation are tokenised as the training data was.

A jinja template receives each message's content as given: a string from LLaVA messages, parts
from OpenAI messages (multimodal templates that render image parts themselves need the latter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vlkit.errors import VlkitError
from vlkit.losses import IGNORE_INDEX

IMAGE_TOKEN = "<image>"
"""The placeholder for an image in a message's text (LLaVA's data convention)."""
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""Speaker names of both formats → the role a template sees."""
IMAGE_PARTS = ("image", "image_url", "input_image")


class ConversationError(VlkitError):
    """A conversation that cannot be rendered or tokenised; the message names the sample."""


@dataclass(frozen=True)
class Turn:
    """One message: its role, its text with image placeholders, and its content as given (a
    string, or OpenAI parts, which a jinja template may render itself)."""

    role: str
    text: str
    content: str | list


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool


@dataclass
class Encoded:
    """A tokenised conversation: ``input_ids`` (image tokens expanded), ``labels`` (-100 where not
    supervised), the rendered ``text`` (placeholders not expanded) and its ``num_images``."""

    input_ids: list[int]
    labels: list[int]
    text: str
    num_images: int


# ---------------------------------------------------------------- messages
def parse_messages(messages, sample: str = "the conversation") -> list[Turn]:
    """``messages`` in LLaVA or OpenAI format → turns; anything malformed is a
    :class:`ConversationError` naming ``sample`` and the message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConversationError(f"{sample}: an empty conversation; expected a non-empty list of messages")
    return [_turn(m, sample, i) for i, m in enumerate(messages)]


def _turn(message, sample: str, i: int) -> Turn:
    where = f"{sample}, message {i}"
    if not isinstance(message, dict):
        raise ConversationError(f"{where}: expected a mapping ({{'from', 'value'}} or {{'role', 'content'}}), got {message!r:.80}")
    if "from" in message:
        speaker, content = message.get("from"), message.get("value")
    elif "role" in message:
        speaker, content = message.get("role"), message.get("content")
    else:
        raise ConversationError(f"{where}: no 'from' or 'role' key; expected {{'from': 'human'|'gpt', 'value': ...}} "
                                f"or {{'role': 'user'|'assistant', 'content': ...}}, got {message!r:.80}")
    if speaker not in ROLES:
        raise ConversationError(f"{where}: speaker {speaker!r}; expected one of {sorted(ROLES)}")
    if isinstance(content, str):
        return Turn(ROLES[speaker], content, content)
    if isinstance(content, (list, tuple)):
        return Turn(ROLES[speaker], "\n".join(_part_text(p, where, k) for k, p in enumerate(content)), list(content))
    raise ConversationError(f"{where}: content is a {type(content).__name__}; expected a string or a list of parts")


def _part_text(part, where: str, k: int) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
        return IMAGE_TOKEN
    raise ConversationError(f"{where}, part {k}: {part!r:.80}; expected {{'type': 'text', 'text': str}} or {{'type': 'image'}}")


def check_turns(turns: list[Turn], add_generation_prompt: bool, sample: str = "the conversation") -> None:
    """An optional system turn, then user and assistant alternating from the user; the last turn is
    the user's when a generation prompt follows, else the assistant's (the answer to learn)."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if not body:
        raise ConversationError(f"{sample}: no user turn; expected user and assistant turns after the system turn")
    for k, turn in enumerate(body):
        want = "user" if k % 2 == 0 else "assistant"
        if turn.role != want:
            index = k + len(turns) - len(body)
            raise ConversationError(f"{sample}, message {index}: {_a(turn.role)} turn where {_a(want)} turn was expected; "
                                    "turns must alternate user/assistant, starting with the user (a system turn only first)")
        if turn.role == "assistant" and IMAGE_TOKEN in turn.text:
            raise ConversationError(f"{sample}, message {k + len(turns) - len(body)}: an {IMAGE_TOKEN} placeholder in an "
                                    "assistant turn; images go in user turns")
    last = body[-1].role
    if add_generation_prompt and last != "user":
        raise ConversationError(f"{sample}: ends with an assistant turn; a prompt for generation must end with the user's turn")
    if not add_generation_prompt and last != "assistant":
        raise ConversationError(f"{sample}: ends with a user turn and no answer; training needs the assistant's answer last "
                                "(or ask for a generation prompt)")


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


# ---------------------------------------------------------------- templates
class Template:
    """Renders turns as segments. ``wraps_specials``: the tokenizer's own special tokens (the BOS
    its post-processor adds) wrap the ids, as tokenising the whole text would; a jinja template
    writes them itself."""

    name = ""
    wraps_specials = True

    def segments(self, turns: list[Turn], add_generation_prompt: bool, tokenizer) -> list[Segment]:
        raise NotImplementedError

    def end_of_turn(self, tokenizer) -> str:
        """The text that ends an assistant's turn (generation stops at it)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Plain(Template):
    """LLaVA's ``plain``: ``<image>`` placeholders then the answer and a newline, nothing else."""

    name = "plain"

    def segments(self, turns, add_generation_prompt, tokenizer):
        out = []
        for turn in turns:
            if turn.role == "user":
                out.append(Segment(IMAGE_TOKEN * turn.text.count(IMAGE_TOKEN), False))
            elif turn.role == "assistant":
                out.append(Segment(turn.text + "\n", True))
        return out

    def end_of_turn(self, tokenizer):
        return "\n"


class LlavaV1(Template):
    """Vicuna v1 (LLaVA's ``llava_v1``): ``{system} USER: {q} ASSISTANT: {a}{eos}USER: ...``; the
    answer's segment starts at the space before it and ends with the EOS token."""

    name = "llava_v1"

    def __init__(self, system: str = VICUNA_SYSTEM):
        self.system = system

    def segments(self, turns, add_generation_prompt, tokenizer):
        system = turns[0].text if turns[0].role == "system" else self.system
        eos = self.end_of_turn(tokenizer)
        pending = system + " "
        out = []
        for turn in turns:
            if turn.role == "user":
                pending += f"USER: {turn.text} ASSISTANT:"
            elif turn.role == "assistant":
                out += [Segment(pending, False), Segment(f" {turn.text}{eos}", True)]
                pending = ""
        if pending.strip():
            out.append(Segment(pending, False))
        return out

    def end_of_turn(self, tokenizer):
        return tokenizer.eos_token or "</s>"


class ChatML(Template):
    """``<|im_start|>{role}\\n{text}<|im_end|>\\n`` per turn (Qwen, Hermes); no default system turn."""

    name = "chatml"

    def segments(self, turns, add_generation_prompt, tokenizer):
        out, pending = [], ""
        for turn in turns:
            if turn.role == "assistant":
                out += [Segment(pending + "<|im_start|>assistant\n", False), Segment(f"{turn.text}<|im_end|>", True)]
                pending = "\n"
            else:
                pending += f"<|im_start|>{turn.role}\n{turn.text}<|im_end|>\n"
        out.append(Segment(pending + ("<|im_start|>assistant\n" if add_generation_prompt else ""), False))
        return out

    def end_of_turn(self, tokenizer):
        return "<|im_end|>"


class JinjaTemplate(Template):
    """The tokenizer's jinja ``chat_template``, rendered once per assistant turn: the text an
    assistant turn adds to the conversation before it (opened by the generation prompt) is its
    answer, supervised up to and including its last special token."""

    name = "chat_template"
    wraps_specials = False

    def segments(self, turns, add_generation_prompt, tokenizer):
        messages = [{"role": t.role, "content": t.content} for t in turns]

        def render(k: int, prompt: bool) -> str:
            return tokenizer.apply_chat_template(messages[:k], add_generation_prompt=prompt)

        out, done = [], ""
        for j, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            before = _extends(done, render(j, True), tokenizer, j)
            after = _extends(before, render(j + 1, False), tokenizer, j + 1)
            answer = after[len(before):]
            cut = _end_of_last_special(answer, tokenizer)
            out += [Segment(before[len(done):], False), Segment(answer[:cut], True), Segment(answer[cut:], False)]
            done = after
        if add_generation_prompt:
            out.append(Segment(_extends(done, render(len(turns), True), tokenizer, len(turns))[len(done):], False))
        return out

    def end_of_turn(self, tokenizer):
        return tokenizer.eos_token or ""


def _extends(prefix: str, text: str, tokenizer, k: int) -> str:
    if not text.startswith(prefix):
        raise VlkitError(
            f"{tokenizer.chat_template.origin}: the chat template renders the first {k} messages differently once more "
            "follow, so each turn's text cannot be told apart; per-turn labels need a template whose output for a "
            "conversation extends its output for the turns before (use the llava_v1 or chatml template)")
    return text


def _end_of_last_special(text: str, tokenizer) -> int:
    """Where the last special token in ``text`` ends (0 when it has none: then all of it counts)."""
    ends = [text.rfind(s) + len(s) for s in special_texts(tokenizer) if s and s in text]
    return max(ends) if ends else len(text)


def special_texts(tokenizer) -> list[str]:
    """The text of every special added token of the tokenizer."""
    return [t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special]


TEMPLATES: dict[str, type[Template]] = {"plain": Plain, "llava_v1": LlavaV1, "chatml": ChatML}
"""The built-in templates by name; ``"chat_template"`` names the tokenizer's own."""


def get_template(template: str | Template, tokenizer=None) -> Template:
    """A template by name (:data:`TEMPLATES` or ``"chat_template"``), or one given as is."""
    if isinstance(template, Template):
        return template
    if template == JinjaTemplate.name:
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            origin = getattr(tokenizer, "origin", "the tokenizer")
            raise VlkitError(f"{origin}: template 'chat_template' needs the tokenizer's chat template, and it has none; "
                             f"use one of {sorted(TEMPLATES)}")
        return JinjaTemplate()
    if template not in TEMPLATES:
        raise VlkitError(f"unknown conversation template {template!r}; expected one of {sorted(TEMPLATES) + [JinjaTemplate.name]}")
    return TEMPLATES[template]()


# ---------------------------------------------------------------- tokens
def render(messages, tokenizer, template: str | Template = "llava_v1", *, add_generation_prompt: bool = False,
           sample: str = "the conversation") -> list[Segment]:  # fmt: skip
    """The conversation's segments (checked: see :func:`check_turns`)."""
    turns = parse_messages(messages, sample)
    check_turns(turns, add_generation_prompt, sample)
    template = get_template(template, tokenizer)
    try:
        return template.segments(turns, add_generation_prompt, tokenizer)
    except VlkitError as err:  # a jinja template refused the conversation, or cannot be rendered turn by turn
        raise ConversationError(f"{sample}: {err}") from None


def encode_conversation(messages, tokenizer, template: str | Template = "llava_v1", *, add_generation_prompt: bool = False,
                        image_counts: Sequence[int] | None = None, sample: str = "the conversation") -> Encoded:  # fmt: skip
    """Ids and labels of a conversation: each segment tokenised on its own, concatenated, and
    the answers' ids copied into the labels. ``image_counts[i]`` image tokens stand for the i-th
    ``<image>`` placeholder (one each by default); a count per placeholder is required."""
    template = get_template(template, tokenizer)
    segments = render(messages, tokenizer, template, add_generation_prompt=add_generation_prompt, sample=sample)
    ids, labels = tokenize_segments(segments, tokenizer, image_counts, template.wraps_specials, sample)
    text = "".join(s.text for s in segments)
    return Encoded(ids, labels, text, count_images(text, tokenizer))


def tokenize_segments(segments: Sequence[Segment], tokenizer, image_counts: Sequence[int] | None = None,
                      add_special_tokens: bool = True, sample: str = "the conversation") -> tuple[list[int], list[int]]:  # fmt: skip
    """``(ids, labels)``: each segment tokenised on its own (an ``<image>`` placeholder written as
    the tokenizer's image token), the i-th image token repeated ``image_counts[i]`` times; with
    ``add_special_tokens`` the ids the tokenizer's post-processor adds (BOS) wrap the whole."""
    token = image_token(tokenizer)
    texts = [s.text.replace(IMAGE_TOKEN, token) for s in segments]
    total = sum(count_images(t, tokenizer) for t in texts)
    counts = [1] * total if image_counts is None else list(image_counts)
    if len(counts) != total:
        raise ConversationError(f"{sample}: {total} {IMAGE_TOKEN} placeholder(s) but {len(counts)} image(s); "
                                "expected one placeholder per image")
    image_id = image_token_id(tokenizer) if total else None
    encoded = [tokenizer.encode(text, add_special_tokens=False) if text else [] for text in texts]
    found = sum(e.count(image_id) for e in encoded) if total else 0
    if found != total:
        raise VlkitError(f"{tokenizer.origin}: the image token {token!r} is not kept as one token ({total} in the text of "
                         f"{sample}, {found} in its ids); it must be an added special token of the tokenizer")
    prefix, suffix = special_affixes(tokenizer) if add_special_tokens else ([], [])
    ids, labels, k = list(prefix), [IGNORE_INDEX] * len(prefix), 0
    for segment, piece in zip(segments, encoded):
        for idx in piece:
            if idx == image_id:
                ids += [image_id] * counts[k]
                labels += [IGNORE_INDEX] * counts[k]
                k += 1
            else:
                ids.append(idx)
                labels.append(idx if segment.supervised else IGNORE_INDEX)
    return ids + suffix, labels + [IGNORE_INDEX] * len(suffix)


def count_images(text: str, tokenizer) -> int:
    """Image placeholders in ``text``: ``<image>`` and the tokenizer's image token."""
    return text.replace(IMAGE_TOKEN, image_token(tokenizer)).count(image_token(tokenizer))


def image_token(tokenizer) -> str:
    """The text of the tokenizer's image token: its ``image_token``, else ``<image>``."""
    return tokenizer.special_tokens.get("image_token") or IMAGE_TOKEN


def image_token_id(tokenizer) -> int:
    """The id of the tokenizer's image token (:func:`image_token`)."""
    token = image_token(tokenizer)
    idx = tokenizer.token_to_id(token)
    if idx is None:
        raise VlkitError(f"{tokenizer.origin}: no {token!r} token in the vocabulary; a tokenizer for images needs it "
                         "as one added special token (name it image_token in tokenizer_config.json)")
    return idx


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a text (BOS, EOS)."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    raise VlkitError(f"{tokenizer.origin}: the post-processor changes the text's own tokens ({bare} → {full}); "
                     "expected it only to add special tokens around them")
