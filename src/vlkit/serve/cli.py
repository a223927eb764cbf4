"""``vlkit serve --model DIR [--model DIR ...]``: the OpenAI-compatible API, photo search and web page
on 127.0.0.1:8000 by default. ``cli.py`` registers the command with :func:`add_parser`."""

from __future__ import annotations

import argparse
import os
import sys

from vlkit.errors import VlkitError


def cmd_serve(args, overrides: list[str]) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise VlkitError("vlkit serve needs fastapi and uvicorn: pip install 'vlkit[serve]'") from None
    from vlkit.serve.app import create_app
    from vlkit.serve.models import load_models
    from vlkit.serve.server import serve
    from vlkit.serve.settings import ServeSettings

    key = args.api_key if args.api_key is not None else os.environ.get("VLKIT_API_KEY")
    if key is not None and (not key.strip() or key != key.strip()):
        source = "--api-key" if args.api_key is not None else "$VLKIT_API_KEY"
        raise VlkitError(f"{source} is {'empty' if not key.strip() else 'padded with whitespace'}: no client could send "
                         "it; give a key, or none to serve without one")  # fmt: skip
    settings = ServeSettings(
        api_key=key, image_root=args.image_root,
        allow_remote_images=args.allow_remote_images, allow_private_image_hosts=args.allow_private_image_hosts,
        cors_origins=tuple(args.cors_origin or ()),
        max_tokens_cap=args.max_tokens_cap, max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=args.max_image_pixels, max_images=args.max_images, max_batch=args.max_batch,
        remote_timeout_s=args.remote_timeout, engine=args.engine, pin_engines=args.pin_engines,
    )  # fmt: skip
    models = load_models(args.model or [], device=args.device, chat_weights=args.engine == "thread")
    searcher = None
    if args.index is not None:
        from vlkit.index import Searcher

        searcher = Searcher.open(args.index, args.index_model)
    if settings.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"vlkit serve: warning: listening on {args.host} with no API key; anyone who reaches it can use it",
              file=sys.stderr)
    names = ", ".join(f"{n} ({m.kind})" for n, m in models.items())
    print(f"vlkit serve: {names} on http://{args.host}:{args.port} (OpenAI API under /v1, web page at /)", file=sys.stderr)
    serve(create_app(models, settings, searcher), args.host, args.port, args.log_level)
    return 0


def add_parser(subparsers, positive_int) -> None:
    """Register ``serve`` on the ``vlkit`` command's subparsers."""
    from vlkit.cli import device_name

    p = subparsers.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API, with photo search and a web page")
    p.add_argument("--model", action="append", metavar="[NAME=]DIR", required=True,
                   help="a chat model (LLaVA VLM, or an LM with a chat template) or an embedding model (CLIP, SigLIP); "
                   "repeat for several; named by the folder unless NAME= is given")
    p.add_argument("--index", help="a photo index (vlkit index) for the search pane and POST /v1/search")
    p.add_argument("--index-model", help="the index's CLIP folder, if it moved since indexing")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 route (default: $VLKIT_API_KEY)")
    p.add_argument("--image-root", help="serve local image paths in requests, only those under this folder")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs in requests (bounded in size and time); off by default")
    p.add_argument("--allow-private-image-hosts", action="store_true",
                   help="with --allow-remote-images, also fetch from loopback, private and reserved addresses (refused by "
                        "default, so that a request cannot make the server read its own network)")
    p.add_argument("--remote-timeout", type=float, default=10.0, help="seconds a remote image fetch may take")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="allow browser pages from this origin (repeat for several); no CORS without it")
    p.add_argument("--max-tokens-cap", type=positive_int, default=512, help="the most tokens an answer may have")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="the largest request body, in MiB")
    p.add_argument("--max-image-pixels", type=positive_int, default=4096 * 4096,
                   help="the largest image, in pixels (larger ones, and decompression bombs, are refused)")
    p.add_argument("--max-images", type=positive_int, default=8, help="images per chat or embeddings request at most")
    p.add_argument("--max-batch", type=positive_int, default=16, help="answers generated together at most")
    p.add_argument("--engine", choices=["process", "thread"], default="process",
                   help="where each chat model generates: a process of its own (default; the HTTP handling keeps the "
                   "other cores), or a thread of the server's process")
    p.add_argument("--pin-engines", action=argparse.BooleanOptionalAction, default=True,
                   help="bind each engine process on the CPU to CPUs of its own, the last ones, when it runs fewer "
                   "torch threads (OMP_NUM_THREADS) than the CPUs there are; the HTTP handling keeps the others")
    p.add_argument("--device", default="cpu", type=device_name, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(fn=cmd_serve)
