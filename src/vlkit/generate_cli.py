"""The text-to-image commands: ``vlkit generate``, ``vlkit train diffusion`` and ``vlkit eval generation``."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from vlkit.errors import VlkitError
from vlkit.eval.generation import ETA, GUIDANCE, STEPS
from vlkit.files import check_file_path


def add_parser(subparsers, positive_int) -> None:
    """Register ``generate`` on the ``vlkit`` command's subparsers."""
    from vlkit.cli import device_name, seed_int

    p = subparsers.add_parser("generate", help="draw images from a text prompt with a text-to-image model")
    p.add_argument("prompt", nargs="+", help="one or more prompts (quote each); -n images of each")
    p.add_argument("--model", required=True, help="text-to-image model or run folder (vlkit train diffusion)")
    p.add_argument("-n", type=positive_int, default=8, help="images per prompt")
    p.add_argument("--guidance", type=float, default=GUIDANCE,
                   help=f"classifier-free guidance scale (1: none, 0: unconditional; {GUIDANCE:g} suits the shapes recipe)")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM sampling steps")
    p.add_argument("--eta", type=float, default=ETA, help="DDIM's eta: 0 deterministic, 1 as much fresh noise as DDPM "
                   "(cleaner images from a briefly trained model; still reproducible by --seed)")
    p.add_argument("--seed", type=seed_int, default=0, help="image i starts from the noise of seed + i")
    p.add_argument("--out", default="grid.png", help="the grid image (a row per prompt); a .png or .jpg file")
    p.add_argument("--device", default="cpu", type=device_name, help="cpu, cuda, cuda:1, ...")
    p.set_defaults(fn=cmd_generate)


def add_eval_arguments(ev, positive_int) -> None:
    """``vlkit eval generation``'s own options, on the eval parser."""
    ev.add_argument("--scorer", help="generation: the shapes CLIP that scores the images (default: the CLIP whose text tower "
                    "the model uses, as recorded at training)")  # fmt: skip
    ev.add_argument("--samples", type=positive_int, default=200, help="generation: single-object prompts to generate for")
    ev.add_argument("--guidance", type=float, default=GUIDANCE,
                    help=f"generation: classifier-free guidance scale ({GUIDANCE:g}: chosen for the shapes recipe)")
    ev.add_argument("--steps", type=positive_int, default=STEPS, help="generation: DDIM sampling steps")
    ev.add_argument("--noise-seed", type=int, default=0, help="generation: image i starts from the noise of seed + i; "
                    "another seed gives validation samples of the same prompts (e.g. to choose --guidance)")  # fmt: skip
    ev.add_argument("--eta", type=float, default=ETA, help="generation: DDIM's eta (0 deterministic, 1 as much noise as DDPM, "
                    "which samples the short-trained shapes model better)")


def cmd_generate(args, overrides: list[str]) -> int:
    from vlkit.eval.generation import image_grid, load_diffusion, to_pil

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise VlkitError(f"--out {out}: expected an image file name ending in .png or .jpg")
    if out.is_dir():
        raise VlkitError(f"--out {out}: is a folder; expected an image file name such as {out / 'grid.png'}")
    check_file_path(out)
    model = load_diffusion(args.model, args.device)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.tokenize(args.prompt)
    for w in caught:
        print(f"vlkit: warning: {w.message}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said once above
        images = model.generate(prompts, guidance=args.guidance, steps=args.steps, seed=args.seed, eta=args.eta, progress=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(to_pil(images), args.n).save(out)
    print(f"wrote {out}: {len(args.prompt)} row(s) of {args.n} images ({model.cfg.image_size}px), guidance {args.guidance}, "
          f"{args.steps} steps, seed {args.seed}")  # fmt: skip
    return 0


def cmd_train_diffusion(args, overrides: list[str]) -> int:
    from vlkit.config import read
    from vlkit.train.diffusion import load_recipe, train_diffusion
    from vlkit.train.distributed import is_main_process

    recipe = load_recipe(read(args.recipe) if args.recipe else {}, overrides, args.recipe)
    summary = train_diffusion(recipe, args.out, resume=args.resume)
    if not is_main_process():
        return 0
    print(json.dumps(summary))
    print(f"wrote {args.out}: {summary['checkpoint']} (model + EMA weights and training state), metrics.jsonl, recipe.json; "
          f'vlkit generate --model {args.out} "a red circle" draws from it')  # fmt: skip
    return 0


def cmd_eval_generation(args) -> int:
    import vlkit
    from vlkit.eval.generation import ShapesJudge, evaluate, load_diffusion, reference_check, write_results

    if args.model is None:
        raise VlkitError("eval generation needs --model DIR (a text-to-image model or run folder)")
    model = load_diffusion(args.model)
    scorer = args.scorer or model.cfg.text_source
    if not scorer or not Path(scorer).exists():
        raise VlkitError(f"no scorer CLIP: the model records {model.cfg.text_source!r}, which does not exist here; pass --scorer DIR "
                         "(the shapes CLIP, e.g. runs/demo/clip)")  # fmt: skip
    judge = ShapesJudge(vlkit.load(scorer))
    results = evaluate(model, judge, n_single=args.samples, guidance=args.guidance, steps=args.steps, seed=args.noise_seed, eta=args.eta,
                       progress=True)  # fmt: skip
    results["judge_on_rendered"] = reference_check(judge, args.samples)  # the ceiling each metric can reach
    print(json.dumps({k: v for k, v in results.items() if k != "images"}, indent=2))
    out = Path(args.out) if args.out else Path(args.model) / "eval_generation"
    write_results(out, results)
    print(f"wrote {out / 'results.json'}, {out / 'samples.png'} and {out / 'prompts.txt'}")
    return 0
