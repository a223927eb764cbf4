"""``vlkit chat --model DIR [--image x.png ...]``: talk to a language model through its chat
template, or to a vision-language model about images, the answer streamed as it is generated.
``cli.py`` registers the command with :func:`add_parser`.

Each line read is a user turn; the conversation so far is rendered by the template every turn.
``--prompt TEXT`` answers once and exits; ``/exit`` or end of input ends a session.
A model folder without a chat template is a base model: each line is then sent as plain text for
the model to continue, with no history (a notice says so), and ``--system`` is refused.

A vision-language model (LLaVA) talks through its processor: its template (``--template``, by
default the tokenizer's chat template, else ``llava_v1``) and the ``--image`` files, which belong
to the first user turn: at its ``<image>`` placeholders when the text has them (one per image),
else one placeholder per image before the text. Its answers are those of
:class:`~vlkit.models.llava_processor.LlavaAnswerer` for the same conversation: generation also
stops at the template's end of turn, and the surrounding whitespace is dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TextIO

from vlkit.errors import VlkitError
from vlkit.text.conversation import IMAGE_TOKEN

DEFAULT_MAX_NEW_TOKENS = 256
"""Used when neither ``--max-new-tokens`` nor the folder's ``generation_config.json`` sets it
(transformers' default total ``max_length`` of 20 leaves no room after a chat prompt)."""

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p")


class ChatSession:
    """A conversation with one model: the messages so far and the generation options of each reply.
    ``images`` (a vision-language model only) belong to the first user turn; ``template`` names a
    vision-language model's conversation template."""

    def __init__(self, model, system: str | None = None, options: dict | None = None, seed: int | None = None,
                 images: list | None = None, template: str | None = None):  # fmt: skip
        import torch

        self.model = model
        self.images = list(images or [])
        self.vlm = is_vlm(model)
        self.options = dict(options or {})
        if self.vlm:
            from vlkit.eval.generative import answerer

            vlm = answerer(model, template)
            if not hasattr(vlm, "with_stops"):  # BLIP-2 continues one prompt; it has no conversation template
                raise VlkitError(f"{type(model).__name__} answers single prompts, not conversations; use vlkit caption or vlkit vqa")
            self.processor, self.tokenizer, self.templated = vlm.processor, vlm.processor.tokenizer, True
            self.options = vlm.with_stops(self.options)  # the template's end of turn stops an answer too
        else:
            if self.images or template is not None:
                flag = "--image" if self.images else "--template"
                raise VlkitError(f"{flag} needs a vision-language model (LLaVA); this folder holds a {type(model).__name__}")
            self.tokenizer = model.tokenizer
            self.templated = self.tokenizer.chat_template is not None  # a Missing tokenizer raises here, naming the folder
        if system is not None and not self.templated:
            raise VlkitError(f"{self.tokenizer.origin}: --system needs a chat template, and this model folder has none")
        self.messages: list[dict] = [{"role": "system", "content": system}] if system is not None else []
        self.forgotten = 0  # exchanges dropped so that the conversation fits the model's positions
        self.generator = torch.Generator(device=_device(model)).manual_seed(seed) if seed is not None else None

    def _user_turn(self, text: str) -> dict:
        """The user's message; the first one carries the images' placeholders."""
        first = not any(m["role"] == "user" for m in self.messages)
        if self.vlm and first and self.images and IMAGE_TOKEN not in text:
            text = f"{IMAGE_TOKEN}\n" * len(self.images) + text
        return {"role": "user", "content": text}

    def _encode(self, turn: dict):
        """The conversation with ``turn`` added and the assistant's turn opened: a vision-language
        model's processed sample, or a language model's ids (``len`` of either is its tokens)."""
        if self.vlm:
            return self.processor.encode(self.messages + [turn], self.images, add_generation_prompt=True,
                                         sample="the conversation")  # fmt: skip
        return self.tokenizer.encode_chat(self.messages + [turn]) if self.templated else self.tokenizer.encode(turn["content"])

    def _prompt(self, encoded) -> dict:
        """``input_ids`` (and for a vision-language model ``inputs_embeds``) of an encoded conversation."""
        import torch

        device = _device(self.model)
        if self.vlm:
            batch = {k: v.to(device) for k, v in self.processor.collate([encoded], "left").items()}
            with torch.inference_mode():
                embeds = self.model.inputs_embeds(batch["input_ids"], batch.get("pixel_values"), batch.get("image_sizes"))
            return {"input_ids": batch["input_ids"], "inputs_embeds": embeds}
        return {"input_ids": torch.tensor([encoded], device=device)}

    def _room(self) -> int:
        """Positions a prompt may take and leave the answer its ``max_new_tokens``."""
        lm = self.model.lm if self.vlm else self.model
        config = getattr(self.model, "generation_config", None)
        answer = self.options.get("max_new_tokens") or getattr(config, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS
        return lm.max_length - answer

    def _forget_oldest(self) -> bool:
        """Drop the oldest exchange (a user turn and its answer) the conversation can lose: not the
        system message, nor the first exchange when it carries the images. False when none is left."""
        start = int(bool(self.messages) and self.messages[0]["role"] == "system") + (2 if self.vlm and self.images else 0)
        if len(self.messages) - start < 2:
            return False
        del self.messages[start : start + 2]
        self.forgotten += 1
        return True

    def reply(self, text: str) -> Iterator[str]:
        """The answer to ``text`` piece by piece; the turn joins the history once the answer is whole."""
        import torch

        from vlkit.lm.generate import generate_text, stream

        turn = self._user_turn(text)
        encoded = self._encode(turn)
        while self.templated and len(encoded) > self._room() and self._forget_oldest():
            encoded = self._encode(turn)
        prompt = self._prompt(encoded)
        mask = torch.ones_like(prompt["input_ids"])
        lm = self.model.lm if self.vlm else self.model
        options = {"generation_config": self.model.generation_config, **self.options} if self.vlm else self.options
        pieces: list[str] = []
        if self.options.get("num_beams", 1) > 1:  # beams settle only at the end: nothing to stream
            answers = generate_text(lm, self.tokenizer, attention_mask=mask, generator=self.generator, **prompt, **options)
            steps: Iterator[str] = iter(answers[:1])
        else:
            steps = stream(lm, self.tokenizer, attention_mask=mask, generator=self.generator, **prompt, **options)
        for piece in _stripped(steps) if self.vlm else steps:
            pieces.append(piece)
            yield piece
        if self.templated:
            self.messages += [turn, {"role": "assistant", "content": "".join(pieces)}]


def _stripped(pieces: Iterator[str]) -> Iterator[str]:
    """The pieces with the whitespace that starts and ends their text dropped, streamed: trailing
    whitespace is held back until more text follows it."""
    started, held = False, ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        body = piece.rstrip()
        if body:
            yield held + body
            held = ""
        held += piece[len(body):]


def is_vlm(model) -> bool:
    """A vision-language model: image features spliced into a language model's input."""
    return hasattr(model, "image_features") and hasattr(model, "lm")


def _device(model):
    return next(model.parameters()).device


def generation_options(args, generation_config) -> dict:
    """The flags given, as generation overrides. A sampling flag turns sampling on;
    ``--temperature 0`` means greedy decoding."""
    options = {k: getattr(args, k) for k in (*SAMPLING_FLAGS, "repetition_penalty", "num_beams") if getattr(args, k) is not None}
    if options.get("temperature") == 0:
        del options["temperature"]
        options["do_sample"] = False
    elif any(k in options for k in SAMPLING_FLAGS):
        options["do_sample"] = True
    options["max_new_tokens"] = (args.max_new_tokens if args.max_new_tokens is not None
                                 else generation_config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
    return options


def _say(session: ChatSession, text: str, out: TextIO) -> None:
    for piece in session.reply(text):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()


def run_chat(args, stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Load the model, then answer ``--prompt`` once or every line of ``stdin`` until ``/exit``
    (the streams default to the process's, read at call time)."""
    import vlkit

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr

    images = load_images(args.image)  # bad files are named before the model loads
    model = vlkit.load(args.model, device=args.device)
    if not hasattr(model, "generation_config"):
        raise VlkitError(f"{args.model}: holds a {type(model).__name__}, not a language model; chat needs one")
    session = ChatSession(model, args.system, generation_options(args, model.generation_config), args.seed, images,
                          args.template)  # fmt: skip
    if not session.templated:
        print(f"vlkit chat: {args.model} has no chat template; each line is sent as plain text for the model to "
              "continue, without history", file=stderr)
    if args.prompt is not None:
        _say(session, args.prompt, stdout)
        return 0
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip():
            forgotten = session.forgotten
            try:
                _say(session, line.rstrip("\n"), stdout)
                if session.forgotten > forgotten:
                    print(f"vlkit chat: the conversation outgrew the model's positions; its {session.forgotten} oldest "
                          "exchange(s) are forgotten", file=stderr)  # fmt: skip
            except VlkitError as err:  # e.g. the conversation outgrew the model's positions: say so, keep the session
                print(f"vlkit chat: {err}", file=stderr)


def load_images(paths: list[str] | None) -> list:
    """The image files, decoded to RGB; a missing or unreadable one is a :class:`BadSample` naming it."""
    from vlkit.data.images import load_image

    return [load_image(p) for p in paths or []]


def cmd_chat(args, overrides: list[str]) -> int:
    if overrides:
        raise VlkitError(f"chat takes no --key=value overrides, got {overrides}")
    return run_chat(args)


def add_parser(subparsers) -> None:
    """Register the ``chat`` subcommand on the ``vlkit`` command's subparsers."""
    p = subparsers.add_parser("chat", help="talk to a language model, or to a vision-language model about images "
                              "(its chat template, the answer streamed)")
    p.add_argument("--model", required=True, help="language or vision-language model folder (vlkit or transformers layout)")
    p.add_argument("--image", action="append", metavar="FILE",
                   help="an image for the first turn (repeat for several; placed at the prompt's <image> placeholders, "
                   "else before its text); needs a vision-language model")
    p.add_argument("--template", help="a vision-language model's conversation template: plain, llava_v1, chatml or "
                   "chat_template (default: the tokenizer's chat template, else llava_v1)")
    p.add_argument("--prompt", help="answer this once and exit (otherwise read a turn per line of stdin; /exit ends)")
    p.add_argument("--system", help="a system message opening the conversation (needs a chat template)")
    add_generation_arguments(p)
    p.set_defaults(fn=cmd_chat)


def add_generation_arguments(p) -> None:
    """The generation flags (read by :func:`generation_options`) and ``--seed``, ``--device``:
    shared by ``chat``, ``caption``, ``vqa`` and ``ground``."""
    from vlkit.cli import device_name, positive_int, seed_int

    p.add_argument("--max-new-tokens", type=positive_int,
                   help=f"tokens per answer at most (default: generation_config.json's, else {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, help="sample at this temperature (0: greedy)")
    p.add_argument("--top-p", type=float, help="sample from the smallest set of tokens holding this probability")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--min-p", type=float, help="sample from tokens at least this fraction of the top token's probability")
    p.add_argument("--repetition-penalty", type=float, help="divide the logits of tokens already seen by this")
    p.add_argument("--num-beams", type=int, help="beam search with this many beams (the answer is printed whole)")
    p.add_argument("--seed", type=seed_int, help="seed of the sampling, for answers that repeat")
    p.add_argument("--device", default="cpu", type=device_name, help="cpu, cuda, cuda:1, ...")
