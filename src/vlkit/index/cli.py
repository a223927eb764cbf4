"""``vlkit index`` and ``vlkit search``: build or update a photo index, and query it."""

from __future__ import annotations

import json
import sys


def cmd_index(args, overrides: list[str]) -> int:
    import vlkit
    from vlkit.index.photos import build_index

    model = vlkit.load(args.model)
    summary = build_index(model, args.model, args.images, args.out, kind=args.kind, batch_size=args.batch_size,
                          precision=args.precision)  # fmt: skip
    print(json.dumps(summary))
    print(f"wrote {args.out}: {summary['images']} images ({summary['new']} new and {summary['changed']} changed embedded now, {summary['unchanged']} unchanged, "
          f"{summary['removed']} removed, {summary['unreadable']} unreadable skipped); search: {summary['kind_reason']}",
          file=sys.stderr)  # fmt: skip
    return 0


def cmd_search(args, overrides: list[str]) -> int:
    from vlkit.data.images import load_image
    from vlkit.index.search import Searcher

    if (args.query is None) == (args.image is None):
        raise ValueError("vlkit search takes a text query or --image FILE (exactly one)")
    searcher = Searcher.open(args.index, args.model)
    image = load_image(args.image) if args.image else None
    hits = searcher.search(args.query, image, args.k)
    root = searcher.index.images
    if args.json:
        print(json.dumps([{"path": str(root / h.path), "score": h.score} for h in hits]))
    else:
        for h in hits:
            print(f"{h.score:.4f}\t{_shown(str(root / h.path))}")
    print(f"{len(hits)} of {len(searcher.index)} images ({searcher.index.kind} search)", file=sys.stderr)
    return 0


def _shown(path: str) -> str:
    """A path as one printable line: as is, or JSON-quoted when it holds a newline, another control
    character, or bytes that are not text (a name that is not UTF-8)."""
    return path if path.isprintable() else json.dumps(path)


def add_parsers(sub, positive_int) -> None:
    from vlkit.index.backends import KINDS

    idx = sub.add_parser("index", help="embed every image under a folder into a searchable index (re-run to update)")
    idx.add_argument("--model", required=True, help="CLIP/SigLIP model folder")
    idx.add_argument("--images", required=True, help="folder of images (searched recursively)")
    idx.add_argument("--out", required=True, help="index folder; an existing index of the same folder is updated")
    idx.add_argument("--kind", default="auto", choices=KINDS, help="search backend: exact, FAISS pq / rabitq / ivf / hnsw, or auto (by size: exact, then pq)")
    idx.add_argument("--batch-size", type=positive_int, default=32)
    idx.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    idx.set_defaults(fn=cmd_index)

    search = sub.add_parser("search", help="rank the images of an index by a text or an image")
    search.add_argument("query", nargs="?", help="text to search for")
    search.add_argument("--image", help="search by this image instead of a text")
    search.add_argument("--index", required=True, help="index folder written by vlkit index")
    search.add_argument("--model", help="the model folder, if it moved since indexing (must be the same model)")
    search.add_argument("-k", type=positive_int, default=10, help="how many results (at most 100)")
    search.add_argument("--json", action="store_true", help="print a JSON list of {path, score}")
    search.set_defaults(fn=cmd_search)
