"""``vlkit chat --model DIR``: talk to a language model through its chat template, the answer
streamed as it is generated. ``cli.py`` registers the command with :func:`add_parser`.

Each line read is a user turn; the conversation so far is rendered by the template every turn.
``--prompt TEXT`` answers once and exits; ``/exit`` or end of input ends a session.
A model folder without a chat template is a base model: each line is then sent as plain text for
the model to continue, with no history (a notice says so), and ``--system`` is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TextIO

from vlkit.errors import VlkitError

DEFAULT_MAX_NEW_TOKENS = 256
"""Used when neither ``--max-new-tokens`` nor the folder's ``generation_config.json`` sets it
(transformers' default total ``max_length`` of 20 leaves no room after a chat prompt)."""

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p")


class ChatSession:
    """A conversation with one model: the messages so far and the generation options of each reply."""

    def __init__(self, model, system: str | None = None, options: dict | None = None, seed: int | None = None):
        import torch

        self.model = model
        self.tokenizer = model.tokenizer
        self.templated = self.tokenizer.chat_template is not None  # a Missing tokenizer raises here, naming the folder
        if system is not None and not self.templated:
            raise VlkitError(f"{self.tokenizer.origin}: --system needs a chat template, and this model folder has none")
        self.messages: list[dict] = [{"role": "system", "content": system}] if system is not None else []
        self.options = dict(options or {})
        self.generator = torch.Generator(device=_device(model)).manual_seed(seed) if seed is not None else None

    def _prompt(self, text: str) -> list[int]:
        if not self.templated:
            return self.tokenizer.encode(text)
        return self.tokenizer.encode_chat(self.messages + [{"role": "user", "content": text}])

    def reply(self, text: str) -> Iterator[str]:
        """The answer to ``text`` piece by piece; the turn joins the history once the answer is whole."""
        import torch

        from vlkit.lm.generate import generate_text, stream

        ids = torch.tensor([self._prompt(text)], device=_device(self.model))
        mask = torch.ones_like(ids)
        pieces: list[str] = []
        if self.options.get("num_beams", 1) > 1:  # beams settle only at the end: nothing to stream
            pieces += generate_text(self.model, self.tokenizer, ids, mask, generator=self.generator, **self.options)
            yield pieces[0]
        else:
            for piece in stream(self.model, self.tokenizer, ids, mask, generator=self.generator, **self.options):
                pieces.append(piece)
                yield piece
        if self.templated:
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]


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
    options["max_new_tokens"] = args.max_new_tokens or generation_config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
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

    model = vlkit.load(args.model, device=args.device)
    if not hasattr(model, "generation_config"):
        raise VlkitError(f"{args.model}: holds a {type(model).__name__}, not a language model; chat needs one")
    session = ChatSession(model, args.system, generation_options(args, model.generation_config), args.seed)
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
            try:
                _say(session, line.rstrip("\n"), stdout)
            except VlkitError as err:  # e.g. the conversation outgrew the model's positions: say so, keep the session
                print(f"vlkit chat: {err}", file=stderr)


def cmd_chat(args, overrides: list[str]) -> int:
    if overrides:
        raise VlkitError(f"chat takes no --key=value overrides, got {overrides}")
    return run_chat(args)


def add_parser(subparsers) -> None:
    """Register the ``chat`` subcommand on the ``vlkit`` command's subparsers."""
    p = subparsers.add_parser("chat", help="talk to a language model (its chat template, the answer streamed)")
    p.add_argument("--model", required=True, help="language model folder (vlkit or transformers layout)")
    p.add_argument("--prompt", help="answer this once and exit (otherwise read a turn per line of stdin; /exit ends)")
    p.add_argument("--system", help="a system message opening the conversation (needs a chat template)")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"tokens per answer at most (default: generation_config.json's, else {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, help="sample at this temperature (0: greedy)")
    p.add_argument("--top-p", type=float, help="sample from the smallest set of tokens holding this probability")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--min-p", type=float, help="sample from tokens at least this fraction of the top token's probability")
    p.add_argument("--repetition-penalty", type=float, help="divide the logits of tokens already seen by this")
    p.add_argument("--num-beams", type=int, help="beam search with this many beams (the answer is printed whole)")
    p.add_argument("--seed", type=int, help="seed of the sampling, for answers that repeat")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.set_defaults(fn=cmd_chat)
