"""``vlkit caption``, ``vlkit vqa`` and ``vlkit ground``: a vision-language model folder (LLaVA,
BLIP-2) answers about image files. ``cli.py`` registers the commands with :func:`add_parsers`
(``vlkit chat --image`` lives in :mod:`vlkit.chat`).

Every answer goes the way ``vlkit eval caption|vqa|grounding`` sends its prompts: through the
model's processor (each prompt a user turn after its image, rendered by the template, the image
placeholder expanded to the image's visual tokens, batches left-padded) and one ``generate`` call
per batch (:func:`vlkit.eval.generative.answerer`), so a command's answer is the evaluation's.

- ``caption IMAGES...``: a caption per image (files, or the images under folders), batched;
  prints ``PATH<TAB>CAPTION`` per image, in order.
- ``vqa --image x.png QUESTION...``: a short answer per question (batched), a line each: each asked as
  the VQA evaluation asks it, with LLaVA-1.5's "Answer the question using a single word or phrase."
  (free-form answers: ``vlkit chat --image x.png --prompt QUESTION``).
- ``ground --image x.png TEXT [--out boxed.png]``: the box of the object ``TEXT`` describes.
  Boxes are text, Qwen-VL's convention: ``[x1, y1, x2, y2]``, integers on a 0-999 grid over the
  image's width and height (parsed as :func:`vlkit.boxes.parse_box`'s ``norm1000``).
  Prints the reply and the box in pixels, and draws it on a copy of the image. A reply with no
  box, or one that is empty or off the grid, is said so (exit status 1) and nothing is drawn.

Images that are missing or cannot be decoded are named before the model loads (exit status 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vlkit.errors import VlkitError
from vlkit.files import check_file_path

"""The default ``caption`` prompt: the one ``vlkit eval caption`` asks."""
GRID = 1000
"""Box coordinates are integers in ``[0, GRID)`` over the image's width and height."""
BOX_COLOR = (255, 0, 0)


def load_vlm(path: str, device: str, command: str):
    """A loaded vision-language model, or an error naming what the folder holds instead."""
    import vlkit
    from vlkit.chat import is_vlm

    model = vlkit.load(path, device=device)
    if not is_vlm(model):
        raise VlkitError(f"{path}: holds a {type(model).__name__}, not a vision-language model (LLaVA); {command} needs one")
    return model


def _answerer(args, command: str):
    """The model's answerer with the command line's generation options; ``--seed`` seeds torch's
    global generator, the one sampling draws from without its own."""
    import torch

    from vlkit.chat import generation_options
    from vlkit.eval.generative import answerer

    model = load_vlm(args.model, args.device, command)
    options = generation_options(args, model.generation_config)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    max_new_tokens = options.pop("max_new_tokens")
    return answerer(model, args.template, **options), max_new_tokens


def caption(args) -> list[tuple[Path, str]]:
    """``(path, caption)`` for each image of ``args.images``, in batches of ``args.batch_size``."""
    from vlkit.chat import load_images
    from vlkit.cli import _image_paths

    paths = _image_paths(args.images)
    images = load_images(paths)
    vlm, new = _answerer(args, "caption")
    out: list[tuple[Path, str]] = []
    for i in range(0, len(paths), args.batch_size):
        chunk = images[i : i + args.batch_size]
        out += zip(paths[i : i + args.batch_size], vlm.generate(chunk, [args.prompt] * len(chunk), max_new_tokens=new))
    return out


def cmd_caption(args, overrides: list[str]) -> int:
    for path, text in caption(args):
        print(f"{path}\t{text}", flush=True)
    return 0


def cmd_vqa(args, overrides: list[str]) -> int:
    from vlkit.chat import load_images
    from vlkit.eval.generative import VQA_PROMPT

    (image,) = load_images([args.image])
    vlm, new = _answerer(args, "vqa")
    for i in range(0, len(args.questions), args.batch_size):
        chunk = args.questions[i : i + args.batch_size]
        prompts = [VQA_PROMPT.format(question=q) for q in chunk]  # BLIP-2's answerer asks its own "Question: ... Short answer:"
        for answer in vlm.generate([image] * len(chunk), prompts, max_new_tokens=new):
            print(answer, flush=True)
    return 0


def reply_box(reply: str, width: int, height: int) -> tuple[tuple[int, int, int, int] | None, str]:
    """``(box in whole pixels, "")`` for the first four numbers of ``reply`` read on the 0-999
    grid, or ``(None, why not)``."""
    from vlkit.boxes import parse_box

    expected = f"expected [x1, y1, x2, y2], integers on a 0-{GRID - 1} grid"
    box = parse_box(reply, "norm1000", width, height)
    if box is None:
        return None, f"no box in the reply; {expected}"
    inside = all(v == int(v) and 0 <= v < GRID for v in parse_box(reply, "pixels", width, height))  # the numbers as written
    x0, y0, x1, y1 = (round(v) for v in box)
    where = f"[{x0}, {y0}, {x1}, {y1}] in pixels of the {width}x{height} image"
    if not inside:
        return None, f"the reply's box ({where}) is off the grid, so off the image; {expected}"
    if x1 <= x0 or y1 <= y0:
        return None, f"the reply's box ({where}) is empty; {expected}, x1 < x2 and y1 < y2"
    return (x0, y0, x1, y1), ""


def image_format(out: Path) -> str:
    """The PIL format ``out``'s suffix names; an error for a folder or an unknown suffix."""
    from PIL import Image

    if out.is_dir():
        raise VlkitError(f"--out {out}: is a folder; expected an image file name such as {out / 'boxed.png'}")
    check_file_path(out)
    formats = Image.registered_extensions()
    if out.suffix.lower() not in formats:
        raise VlkitError(f"--out {out}: unknown image type {out.suffix!r}; expected a name ending in .png, .jpg, ...")
    return formats[out.suffix.lower()]


def draw_box(image, box: tuple[int, int, int, int], out: Path) -> Path:
    """A copy of ``image`` with ``box`` outlined (its edge pixels inside the box), written to
    exactly ``out`` through a temporary file, so a failure leaves no half-written image."""
    from PIL import ImageDraw

    fmt = image_format(out)
    drawn = image.copy()
    x0, y0, x1, y1 = box
    width = max(1, round(min(image.size) / 100))
    ImageDraw.Draw(drawn).rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_COLOR, width=width)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        drawn.save(tmp, format=fmt)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def cmd_ground(args, overrides: list[str]) -> int:
    from vlkit.chat import load_images
    from vlkit.eval.generative import GROUNDING_PROMPT

    (image,) = load_images([args.image])
    if args.out is not None:
        image_format(Path(args.out))  # a bad --out is named before the model loads
    vlm, new = _answerer(args, "ground")
    (reply,) = vlm.generate([image], [GROUNDING_PROMPT.format(text=args.text)], max_new_tokens=new)
    print(f"reply: {reply}")
    box, problem = reply_box(reply, *image.size)
    if box is None:
        print(f"vlkit ground: {problem}", file=sys.stderr)
        return 1
    print(f"box: [{box[0]}, {box[1]}, {box[2]}, {box[3]}] (pixels of the {image.size[0]}x{image.size[1]} image {args.image})")
    if args.out is not None:
        print(f"wrote {draw_box(image, box, Path(args.out))}")
    return 0


def add_parsers(subparsers, positive_int) -> None:
    """Register ``caption``, ``vqa`` and ``ground`` on the ``vlkit`` command's subparsers."""
    from vlkit.chat import add_generation_arguments
    from vlkit.eval.generative import CAPTION_PROMPT

    def common(p, batched: bool) -> None:
        p.add_argument("--model", required=True, help="vision-language model folder (LLaVA, BLIP-2; vlkit or transformers layout)")
        p.add_argument("--template", help="conversation template: plain, llava_v1, chatml or chat_template "
                       "(default: the tokenizer's chat template, else llava_v1)")
        if batched:
            p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per generate call (left-padded)")
        add_generation_arguments(p)

    cap = subparsers.add_parser("caption", help="caption images with a vision-language model (PATH<TAB>CAPTION per image)")
    cap.add_argument("images", nargs="+", help="image files or folders")
    cap.add_argument("--prompt", default=CAPTION_PROMPT, help=f"what to ask of each image (default: {CAPTION_PROMPT!r})")
    common(cap, batched=True)
    cap.set_defaults(fn=cmd_caption)

    vqa = subparsers.add_parser("vqa", help="answer questions about an image, briefly, as the VQA evaluation asks them (an answer per line)")
    vqa.add_argument("questions", nargs="+", metavar="QUESTION")
    vqa.add_argument("--image", required=True, help="the image file")
    common(vqa, batched=True)
    vqa.set_defaults(fn=cmd_vqa)

    ground = subparsers.add_parser("ground", help="find the box of a described object; print it and draw it")
    ground.add_argument("text", help="the object, as words: 'the red star'")
    ground.add_argument("--image", required=True, help="the image file")
    ground.add_argument("--out", help="write the image with the box drawn here (PNG, JPEG, ... by its suffix)")
    common(ground, batched=False)
    ground.set_defaults(fn=cmd_ground)
