"""The ``vlkit`` command: demo, train, eval, embed, convert, data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _recipe_dict(path: str | None, overrides: list[str]) -> dict:
    from vlkit.config import apply_overrides, read

    return apply_overrides(read(path) if path else {}, overrides)


def cmd_train(args, overrides: list[str]) -> int:
    from vlkit.train.clip import load_recipe, train_clip

    recipe = load_recipe(_recipe_dict(args.recipe, overrides))
    if args.model == "siglip" and recipe.model.loss != "sigmoid":
        recipe.model.loss, recipe.model.logit_bias_init = "sigmoid", -10.0
        recipe.model.logit_scale_init = 2.302585092994046
    summary = train_clip(recipe, args.out, resume=args.resume)
    print(json.dumps(summary))
    return 0


def cmd_eval(args, overrides: list[str]) -> int:
    from vlkit.eval.tasks import run_eval

    options = {}
    if args.task in ("caption", "vqa", "grounding", "mcq"):
        options = {"split": args.split, "box_format": args.box_format}
        if args.predictions is None:
            options["max_new_tokens"] = args.max_new_tokens
    results = run_eval(
        args.task, args.model, args.data, args.out, args.batch_size, args.precision, args.predictions, **options
    )
    print(json.dumps(results, indent=2))
    return 0


def cmd_embed(args, overrides: list[str]) -> int:
    import numpy as np

    import vlkit
    from vlkit.eval.embed import embed_images, embed_texts

    model = vlkit.load(args.model)
    if args.texts is not None:
        texts = _read_texts(args.texts)
        feats = embed_texts(model, texts, batch_size=args.batch_size, precision=args.precision, progress=True)
    else:
        from vlkit.data.images import load_image

        paths = _image_paths(args.images)
        batches = (
            model.processor.batch([load_image(p) for p in paths[i : i + args.batch_size]])
            for i in range(0, len(paths), args.batch_size)
        )
        total = (len(paths) + args.batch_size - 1) // args.batch_size
        feats = embed_images(model, batches, precision=args.precision, progress=True, total=total)
    np.save(args.out, feats.numpy())
    print(f"wrote {args.out}: {tuple(feats.shape)} L2-normalised float32 embeddings")
    return 0


def _read_texts(spec: list[str]) -> list[str]:
    """Texts given inline, or one per line from a .txt file."""
    if len(spec) == 1 and spec[0].endswith(".txt") and Path(spec[0]).is_file():
        return [line for line in Path(spec[0]).read_text().splitlines() if line.strip()]
    return spec


def _image_paths(spec: list[str]) -> list[Path]:
    """Image files given directly, or every image under the given folders (sorted)."""
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    paths: list[Path] = []
    for item in spec:
        p = Path(item)
        paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in exts) if p.is_dir() else [p]
    if not paths:
        raise SystemExit(f"no images found in {spec}")
    return paths


def cmd_data_shapes(args, overrides: list[str]) -> int:
    if args.format is None:
        from vlkit.data.export import export_shapes

        summary = export_shapes(Path(args.out), args.n, image_size=args.image_size, seed=args.seed, max_objects=args.max_objects)
    else:
        from vlkit.data.formats.shapes_export import export
        from vlkit.data.shapes import ShapesWorld

        world = ShapesWorld(image_size=args.image_size, max_objects=args.max_objects, seed=args.seed)
        summary = export(world, args.n, Path(args.out), args.format)
    print(json.dumps(summary, default=str))
    return 0


def cmd_data_pack(args, overrides: list[str]) -> int:
    from vlkit.data.formats.shards import pack

    print(json.dumps(pack(args.src, args.out, maxcount=args.maxcount, prefix=args.prefix), default=str))
    return 0


def cmd_demo(args, overrides: list[str]) -> int:
    from vlkit.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, parts=args.parts.split(","), overrides=overrides)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlkit", description="Vision-language models end to end.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train and evaluate every system on the shapes world; write a report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a first look in a few minutes (lower quality)")
    demo.add_argument("--parts", default="clip", help="comma-separated parts to run (clip)")
    demo.set_defaults(fn=cmd_demo)

    train = sub.add_parser("train", help="train a model from a recipe; --key=value overrides the recipe")
    train.add_argument("model", choices=["clip", "siglip"])
    train.add_argument("--recipe", help="YAML or JSON recipe (see recipes/)")
    train.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl)")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    train.set_defaults(fn=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a model on a task")
    ev.add_argument("task", choices=["zeroshot", "retrieval", "caption", "vqa", "grounding", "mcq"])
    ev.add_argument("--model", help="model or run folder")
    ev.add_argument("--data", default="shapes", help="'shapes', an ImageFolder (zeroshot), a captions.jsonl folder "
                    "(retrieval), or a dataset in a standard format (caption, vqa, grounding, mcq)")
    ev.add_argument("--predictions", help="score this predictions file instead of running a model (caption, vqa, grounding, mcq)")
    ev.add_argument("--split", help="dataset split to evaluate (default: all)")
    ev.add_argument("--box-format", default="pixels", choices=["pixels", "norm1", "norm1000", "loc1000", "loc1024"])
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--out", help="folder for results.json (default: print only)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ev.set_defaults(fn=cmd_eval)

    emb = sub.add_parser("embed", help="embed images or texts to a .npy file")
    src = emb.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files or folders")
    src.add_argument("--texts", nargs="+", help="strings, or one .txt file with a text per line")
    emb.add_argument("--model", required=True)
    emb.add_argument("--out", required=True, help="output .npy")
    emb.add_argument("--batch-size", type=int, default=64)
    emb.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    emb.set_defaults(fn=cmd_embed)

    from vlkit.interop.convert import add_parser as add_convert

    add_convert(sub)

    data = sub.add_parser("data", help="datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    shapes = dsub.add_parser("shapes", help="write the shapes world (ImageFolder + captions.jsonl, or --format)")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("-n", type=int, default=1000)
    shapes.add_argument("--image-size", type=int, default=64)
    shapes.add_argument("--max-objects", type=int, default=3)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--format", choices=["coco", "vqav2", "llava", "refcoco", "imagefolder", "mmbench", "mathvista", "shards"],
                        help="write one standard dataset format instead")
    shapes.set_defaults(fn=cmd_data_shapes)
    pack = dsub.add_parser("pack", help="pack a dataset into WebDataset tar shards")
    pack.add_argument("src", help="a Karpathy COCO JSON, LLaVA JSON, ImageFolder or captions.jsonl folder")
    pack.add_argument("--out", required=True)
    pack.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    pack.add_argument("--prefix", default="data")
    pack.set_defaults(fn=cmd_data_pack)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser().parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "=" in a]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        parser().error(f"unrecognised arguments: {' '.join(unknown)}")
    try:
        return args.fn(args, overrides)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"vlkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
