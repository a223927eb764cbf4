"""The ``vlkit`` command: demo, train, eval, embed, convert, chat, caption, vqa, ground, data."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts and sizes (``--batch-size``, ``--max-new-tokens``, ``-n``):
    a whole number of at least 1, else an error that says so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse ``type=`` for ``--seed``: a whole number a torch generator takes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a whole number from -2**63 to 2**63 - 1, got {value}")
    return value


def device_name(text: str) -> str:
    """argparse ``type=`` for ``--device``: a device torch knows and this machine has."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; expected cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine's torch sees no CUDA device; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine's torch has no MPS device; use cpu")
    return text


def cmd_train(args, overrides: list[str]) -> int:
    from vlkit.config import read

    if args.model == "vlm":  # --stage is the recipe's stage key here
        return cmd_train_vlm(args, [f"--stage={args.stage}"] * (args.stage is not None) + overrides)
    args.stage = args.stage or 1
    if args.model == "lm":
        from vlkit.train.lm import cmd_train_lm

        return cmd_train_lm(args, overrides)
    if args.model == "blip2":
        from vlkit.train.blip2 import cmd_train_blip2

        return cmd_train_blip2(args, overrides)
    if args.model == "diffusion":
        from vlkit.generate_cli import cmd_train_diffusion

        return cmd_train_diffusion(args, overrides)
    from vlkit.train.clip import load_recipe, train_clip
    from vlkit.train.distributed import is_main_process

    recipe = load_recipe(read(args.recipe) if args.recipe else {}, overrides, args.recipe)
    if args.model == "siglip" and recipe.model.loss != "sigmoid":
        recipe.model.loss, recipe.model.logit_bias_init = "sigmoid", -10.0
        recipe.model.logit_scale_init = 2.302585092994046
    summary = train_clip(recipe, args.out, resume=args.resume)
    if not is_main_process():
        return 0
    print(json.dumps(summary))
    out = Path(args.out)
    if summary["samples"] == 0:
        print(f"nothing to train: {out} is already at step {summary['steps']} ({summary['checkpoint']}); wrote {out / 'recipe.json'}")
        return 0
    written = [f"{summary['checkpoint']} (model folder + training state)", "metrics.jsonl", "recipe.json"]
    written += [f"skipped.jsonl ({summary['skipped']} skipped samples)"] if summary["skipped"] else []
    print(f"wrote {out}: {', '.join(written)}; vlkit.load({str(out)!r}) loads the newest checkpoint")
    return 0


def cmd_train_vlm(args, overrides: list[str]) -> int:
    from vlkit.config import read
    from vlkit.train.distributed import is_main_process
    from vlkit.train.vlm import load_recipe, train_vlm

    recipe = load_recipe(read(args.recipe) if args.recipe else {}, overrides, args.recipe)
    summary = train_vlm(recipe, args.out, resume=args.resume)
    if not is_main_process():
        return 0
    print(json.dumps(summary))
    if "model" in summary:
        adapter = f" and the LoRA adapter in peft's layout at {summary['adapter']}" if "adapter" in summary else ""
        print(f"wrote {args.out}: the model at {summary['model']} (vlkit.load reads it){adapter}; checkpoints, metrics.jsonl, recipe.json")
    return 0


class _TrainHelp(argparse.Action):
    """``train --help``: the usual help, then every recipe key with its default, generated
    from the recipe's dataclasses (imported only when asked, so other commands start fast)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "model", None) == "vlm":
            from vlkit.train.vlm import recipe_help
        elif getattr(namespace, "model", None) == "diffusion":
            from vlkit.train.diffusion import recipe_help
        elif getattr(namespace, "model", None) == "lm":
            from vlkit.train.lm import recipe_help
        elif getattr(namespace, "model", None) == "blip2":
            from vlkit.train.blip2 import recipe_help
        else:
            from vlkit.train.clip import recipe_help

        parser.epilog = recipe_help()
        parser.print_help()
        parser.exit()


def cmd_eval(args, overrides: list[str]) -> int:
    from vlkit.eval.tasks import run_eval

    chat_task = args.task in ("caption", "vqa", "grounding", "mcq")
    if args.endpoint is not None and (not chat_task or args.predictions is not None or args.model is None):
        raise ValueError("--endpoint URL evaluates caption, vqa, grounding or mcq with --model NAME (the endpoint's "
                         "model name), not with --predictions")  # fmt: skip
    if args.task == "generation":
        from vlkit.generate_cli import cmd_eval_generation

        return cmd_eval_generation(args)

    options = {}
    if chat_task:
        options = {"split": args.split, **({"box_format": args.box_format} if args.box_format else {})}
        if args.predictions is None:
            options["max_new_tokens"] = args.max_new_tokens
    if args.endpoint is not None:
        from vlkit.eval.endpoint import run_endpoint_eval

        results = run_endpoint_eval(args.task, args.data, args.endpoint, args.model, args.out, args.api_key_env,
                                    args.concurrency, args.cache, on_bad_sample=args.on_bad_sample, **options)  # fmt: skip
    else:
        results = run_eval(
            args.task, args.model, args.data, args.out, args.batch_size, args.precision, args.predictions,
            on_bad_sample=args.on_bad_sample, **options,
        )  # fmt: skip
    print(json.dumps(results, indent=2))
    if args.out:
        out = Path(args.out)
        skipped = f", {out / 'skipped.jsonl'}" if (out / "skipped.jsonl").is_file() else ""
        print(f"wrote {out / 'results.json'}, {out / 'predictions.jsonl'}{skipped} and {out / 'report.md'} (with its plots)")
    return 0


def cmd_embed(args, overrides: list[str]) -> int:
    import vlkit
    from vlkit.eval.embed import embed_images, embed_texts

    texts = _read_texts(args.texts) if args.texts is not None else None
    paths = _image_paths(args.images) if texts is None else None
    model = vlkit.load(args.model)
    if texts is not None:
        feats = embed_texts(model, texts, batch_size=args.batch_size, precision=args.precision, progress=True)
    else:
        from vlkit.data.images import load_image

        batches = (
            model.processor.batch([load_image(p) for p in paths[i : i + args.batch_size]])
            for i in range(0, len(paths), args.batch_size)
        )
        total = (len(paths) + args.batch_size - 1) // args.batch_size
        feats = embed_images(model, batches, precision=args.precision, progress=True, total=total)
    out = _save_npy(Path(args.out), feats.numpy())
    print(f"wrote {out}: {tuple(feats.shape)} L2-normalised float32 embeddings")
    return 0


def _save_npy(path: Path, array) -> Path:
    """``array`` to exactly ``path`` (``np.save`` on a name would append ``.npy``), written to a
    temporary file and renamed, so a failed run leaves no half-written file."""
    import os

    import numpy as np

    from vlkit.errors import VlkitError

    if path.is_dir():
        raise VlkitError(f"--out {path}: is a folder; expected a file name such as {path / 'embeddings.npy'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _read_texts(spec: list[str]) -> list[str]:
    """Texts given inline, or one per line (blank lines skipped) from a single UTF-8 ``.txt`` file."""
    from vlkit.errors import VlkitError

    if len(spec) != 1 or not spec[0].endswith(".txt"):
        return spec
    from vlkit.data.formats.common import read_text

    path = Path(spec[0])
    if not path.is_file():
        raise VlkitError(f"--texts {path}: no such file (a single argument ending in .txt is read as a file of texts, one per line)")
    texts = [line for line in read_text(path, "texts, one per line").splitlines() if line.strip()]
    if not texts:
        raise VlkitError(f"{path}: no texts; expected one text per line")
    return texts


def _image_paths(spec: list[str]) -> list[Path]:
    """Image files given directly, or every image under the given folders (sorted; hidden ones passed over)."""
    from vlkit.data.images import image_files
    from vlkit.errors import VlkitError

    paths: list[Path] = []
    for item in spec:
        p = Path(item)
        paths += image_files(p) if p.is_dir() else [p]
    if not paths:
        raise VlkitError(f"no images found in {spec}; expected image files or folders holding some")
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
    from vlkit.data.formats.shards import PACK_MANIFEST, pack

    summary = pack(args.src, args.out, maxcount=args.maxcount, prefix=args.prefix, on_bad_sample=args.on_bad_sample,
                   allow_outside_paths=args.allow_outside_paths)  # fmt: skip
    print(json.dumps(summary, default=str))
    skipped = summary["skipped"]
    print(f"wrote {args.out}: {summary['samples']} samples in {len(summary['shards'])} shards, {PACK_MANIFEST}, "
          f"{Path(skipped['file']).name} ({skipped['total']} skipped samples, with file and reason)", file=sys.stderr)  # fmt: skip
    return 0


def cmd_demo(args, overrides: list[str]) -> int:
    from vlkit.demo import PARTS, run_demo

    parts = args.parts.split(",") if args.parts else list(PARTS)
    run_demo(Path(args.out), quick=args.quick, parts=parts, overrides=overrides)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlkit", description="Vision-language models end to end.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train and evaluate every system on the shapes world; write a report")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a first look in a few minutes (lower quality)")
    demo.add_argument("--parts", help="comma-separated parts to run, of clip, lm, vlm, blip2, generation (default: all); "
                      "a part runs the earlier parts it needs unless their folders are in --out already; "
                      "recipe overrides name their part: --vlm.loop.steps=100")
    demo.set_defaults(fn=cmd_demo, takes_overrides=True)

    train = sub.add_parser("train", help="train a model from a recipe; --key=value overrides the recipe", add_help=False,
                           allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    train.add_argument("-h", "--help", action=_TrainHelp, help="show this help, with every recipe key and its default")
    train.add_argument("model", choices=["clip", "siglip", "vlm", "diffusion", "lm", "blip2"], help="siglip: clip with the sigmoid loss (and its temperature and "
                       "bias); vlm: a LLaVA-style VLM, stage 1 (align) or 2 (instruct) by the recipe's stage; lm: a causal "
                       "language model on text")
    train.add_argument("--recipe", help="YAML or JSON recipe (see recipes/)")
    train.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl)")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    train.add_argument("--stage", type=int, choices=[1, 2], default=None,
                       help="blip2: stage 1 (ITC + ITM + ITG, frozen tower; the default) or 2 (captions through a frozen LM); "
                       "vlm: sets the recipe's stage")
    train.set_defaults(fn=cmd_train, takes_overrides=True)

    ev = sub.add_parser("eval", help="evaluate a model on a task")
    ev.add_argument("task", choices=["zeroshot", "retrieval", "caption", "vqa", "grounding", "mcq", "generation"])
    ev.add_argument("--model", help="model or run folder")
    ev.add_argument("--data", default="shapes", help="'shapes' (the bundled world; zeroshot, retrieval), or a path: an ImageFolder "
                    "with classnames.json + templates.json (zeroshot), a folder with captions.jsonl (retrieval), or a dataset "
                    "in a standard format (caption: COCO Karpathy JSON, vqa: VQAv2, grounding: RefCOCO, mcq: MMBench/MathVista TSV)")
    ev.add_argument("--predictions", help="score this predictions file instead of running a model (caption, vqa, grounding, mcq)")
    ev.add_argument("--split", help="dataset split to evaluate (default: all)")
    ev.add_argument("--box-format", choices=["pixels", "norm1", "norm1000", "loc1000", "loc1024"],
                    help="how grounding answers write a box (vlkit.boxes); default: norm1000, the 0-999 grid vlkit's VLMs "
                         "answer on and `vlkit ground` reads, for a model or an endpoint; pixels for --predictions files")
    ev.add_argument("--max-new-tokens", type=positive_int, default=32)
    ev.add_argument("--out", help="folder for results.json, predictions.jsonl and report.md (default: print only)")
    ev.add_argument("--batch-size", type=positive_int, default=256)
    ev.add_argument("--on-bad-sample", default="error", choices=["error", "skip"],
                    help="a bad record or image stops the evaluation (error), or is left out and listed in skipped.jsonl (skip)")
    ev.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ev.add_argument("--endpoint", help="evaluate an OpenAI-compatible chat endpoint (e.g. http://127.0.0.1:8000/v1) "
                    "instead of a local model; --model is then the endpoint's model name")
    ev.add_argument("--api-key-env", help="with --endpoint: the environment variable holding the API key")
    ev.add_argument("--concurrency", type=positive_int, default=4, help="with --endpoint: requests in flight at once")
    ev.add_argument("--cache", help="with --endpoint: answers cache file (default OUT/endpoint_answers.jsonl, or "
                    "~/.cache/vlkit/); a re-run asks only what it has no answer for")
    ev.set_defaults(fn=cmd_eval)

    emb = sub.add_parser("embed", help="embed images or texts to a .npy file")
    src = emb.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files or folders")
    src.add_argument("--texts", nargs="+", help="strings, or one .txt file with a text per line")
    emb.add_argument("--model", required=True)
    emb.add_argument("--out", required=True, help="output file, written as given (a .npy array; name it x.npy)")
    emb.add_argument("--batch-size", type=positive_int, default=64)
    emb.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    emb.set_defaults(fn=cmd_embed)

    from vlkit.generate_cli import add_eval_arguments, add_parser as add_generate

    add_eval_arguments(ev, positive_int)
    add_generate(sub, positive_int)

    from vlkit.convert_cli import add_parser as add_convert

    add_convert(sub)

    from vlkit.chat import add_parser as add_chat

    add_chat(sub)

    from vlkit.vlm_cli import add_parsers as add_vlm_commands

    add_vlm_commands(sub, positive_int)

    from vlkit.index.cli import add_parsers as add_index_commands

    add_index_commands(sub, positive_int)

    from vlkit.serve.cli import add_parser as add_serve

    add_serve(sub, positive_int)

    data = sub.add_parser("data", help="datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    shapes = dsub.add_parser("shapes", help="write the shapes world (ImageFolder + captions.jsonl, or --format)")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("-n", type=positive_int, default=1000)
    shapes.add_argument("--image-size", type=positive_int, default=64)
    shapes.add_argument("--max-objects", type=positive_int, default=3)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--format", choices=["coco", "vqav2", "llava", "refcoco", "imagefolder", "mmbench", "mathvista", "shards"],
                        help="write one standard dataset format instead")
    shapes.set_defaults(fn=cmd_data_shapes)
    pack = dsub.add_parser("pack", help="pack a dataset into WebDataset tar shards")
    pack.add_argument("src", help="a Karpathy COCO JSON, LLaVA JSON, ImageFolder or captions.jsonl folder")
    pack.add_argument("--out", required=True)
    pack.add_argument("--maxcount", type=positive_int, default=1000, help="samples per shard")
    pack.add_argument("--prefix", default="data")
    pack.add_argument("--on-bad-sample", choices=["error", "skip"], default="error",
                      help="a bad record (missing or corrupt image, malformed line) stops the pack, or is skipped and "
                      "listed in OUT/skipped.jsonl")  # fmt: skip
    pack.add_argument("--allow-outside-paths", action="store_true",
                      help="read image paths that are absolute or climb out of the dataset folder with '..'")
    pack.set_defaults(fn=cmd_data_pack)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # what was written stays (a run's checkpoints, an evaluation's cache of answers)
        print("vlkit: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    args, rest = parser().parse_known_args(argv)
    takes_overrides = getattr(args, "takes_overrides", False)  # train and demo; any other command refuses them
    overrides = [a for a in rest if takes_overrides and a.startswith("--") and "=" in a]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        hint = " (recipe overrides take the form --key=value)" if takes_overrides and any(a.startswith("--") for a in unknown) else ""
        parser().error(f"unrecognised arguments: {' '.join(unknown)}{hint}")
    try:
        return args.fn(args, overrides)
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as a command killed by SIGPIPE does
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exiting does not flush into it again
        except (OSError, ValueError):  # no file behind sys.stdout (captured): nothing to flush into
            pass
        return 141
    except (ValueError, OSError, KeyError) as err:  # VlkitError is a ValueError
        print(f"vlkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
