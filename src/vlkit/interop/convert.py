"""``vlkit convert --to hf|open_clip SRC DST``: load any folder vlkit reads, write it in another
library's layout. ``cli.py`` registers it with :func:`add_parser`."""

from __future__ import annotations

from pathlib import Path


def cmd_convert(args, overrides: list[str]) -> int:
    """Load ``SRC`` (vlkit, transformers or OpenCLIP layout) and export it to ``DST``."""
    import vlkit
    from vlkit.interop.export import EXPORTERS

    if overrides:
        raise ValueError(f"convert takes no --key=value overrides, got {overrides}")
    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()) and not args.force:
        raise ValueError(f"{dst}: exists and is not empty; pass --force to write into it")
    model = vlkit.load(args.src)
    EXPORTERS[args.to](model, dst)
    print(f"wrote {dst} ({args.to} layout) from {args.src}")
    return 0


def add_parser(subparsers) -> None:
    """Register the ``convert`` subcommand on the ``vlkit`` command's subparsers."""
    p = subparsers.add_parser("convert", help="export a model folder to the transformers or OpenCLIP layout")
    p.add_argument("--to", required=True, choices=["hf", "open_clip"], help="target layout")
    p.add_argument("src", metavar="SRC", help="model folder (vlkit, transformers or OpenCLIP layout) or training run")
    p.add_argument("dst", metavar="DST", help="output folder")
    p.add_argument("--force", action="store_true", help="write into a non-empty DST")
    p.set_defaults(fn=cmd_convert)
