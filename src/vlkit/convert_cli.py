"""``vlkit convert --to hf|open_clip SRC DST``: load any folder vlkit reads, write it in another
library's layout. ``cli.py`` registers it with :func:`add_parser`."""

from __future__ import annotations

from pathlib import Path

from vlkit.errors import VlkitError


def cmd_convert(args, overrides: list[str]) -> int:
    """Load ``SRC`` (vlkit, transformers or OpenCLIP layout) and export it to ``DST``."""
    import vlkit
    from vlkit.interop.export import EXPORTERS

    if overrides:
        raise VlkitError(f"convert takes no --key=value overrides, got {overrides}")
    dst = Path(args.dst)
    _refuse_overlap(Path(args.src), dst)
    if dst.is_dir() and any(dst.iterdir()) and not args.force:
        raise VlkitError(f"{dst}: exists and is not empty; pass --force to replace it")
    model = vlkit.load(args.src)
    EXPORTERS[args.to](model, dst, overwrite=args.force)
    files = ", ".join(sorted(p.name for p in dst.iterdir()))
    print(f"wrote {dst} ({args.to} layout: {files}) from {args.src}")
    return 0


def _refuse_overlap(src: Path, dst: Path) -> None:
    """``--force`` replaces ``dst`` whole, so it must not be (or hold) the folder being read."""
    from vlkit.loading import resolve

    target = dst.resolve()
    for folder in {src.resolve(), resolve(src).resolve()}:
        if target == folder or target in folder.parents:
            raise VlkitError(f"{dst}: holds the source {folder}; replacing it would delete the model being converted; choose another DST")


def add_parser(subparsers) -> None:
    """Register the ``convert`` subcommand on the ``vlkit`` command's subparsers."""
    p = subparsers.add_parser("convert", help="export a model folder to the transformers or OpenCLIP layout")
    p.add_argument("--to", required=True, choices=["hf", "open_clip"], help="target layout")
    p.add_argument("src", metavar="SRC", help="model folder (vlkit, transformers or OpenCLIP layout) or training run")
    p.add_argument("dst", metavar="DST", help="output folder")
    p.add_argument("--force", action="store_true", help="replace a non-empty DST whole (its old files are removed)")
    p.set_defaults(fn=cmd_convert)
