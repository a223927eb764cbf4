"""Text generation speed and memory: vlkit's ``generate`` vs transformers' ``generate``, identical weights.

Builds a randomly initialised model with transformers, saves it, loads the same folder with vlkit,
checks the greedy tokens agree, then times both side by side in interleaved rounds (the side that
goes first alternates), fp32, greedy, EOS off so every row makes all its new tokens:

- prefill: ``generate`` of 1 new token (the prompt's forward plus one pick), ``B * prompt`` tokens
  (for LLaVA the image's tokens count in the prompt, and the vision tower and connector run inside
  the timed call, as ``generate`` runs them);
- decode: ``generate`` of ``new`` tokens minus the 1-token run, ``B * (new - 1)`` tokens (best
  of the rounds of each run; the paired ratio takes each round's difference);
- peak memory: each side in a fresh process (so neither inherits the other's freed memory), the
  highest resident memory (CPU, sampled every 0.5 ms) or allocated memory (CUDA) during one
  ``generate`` above what the loaded model held before it;
- the bandwidth floor: a decode step reads every weight once (the embedding table only a row of
  it, unless tied to the head), so it cannot beat ``weight bytes / bandwidth``, the bandwidth of a
  large fp32 mat-vec measured here between the rounds: the fastest of ``torch.mv`` (MKL) and, on a
  CPU, oneDNN's linear (which vlkit's language models use; on AMD CPUs MKL's mat-vec reaches well
  under the memory bandwidth, so a floor from it alone is one vlkit runs below), the latter also
  on a matrix in 2 MiB pages (Linux transparent huge pages, where the kernel grants them: fewer
  TLB misses make the same mat-vec read faster, so a floor without them is not the machine's).

Sizes: ``35m`` (width 512, 8 layers, 8 heads, 4 KV heads, vocabulary 8000, MLP 1536) and ``150m``
(width 768, 12 layers, 12 heads, vocabulary 32000, MLP 2560), untied heads; ``tiny`` for a smoke run.
``llava``: LLaVA-1.5's layout (``LlavaForConditionalGeneration``: CLIP vision tower, second-to-last
layer, class token dropped, two-layer MLP connector) with a small CLIP tower (width 384, 6 layers,
112-pixel images in 14-pixel patches: 64 image tokens) and the ``35m`` Llama; each prompt is its
image's 64 tokens then ``--prompt`` text tokens (``llava-tiny`` for a smoke run). The LLaVA rows are
meant for batch 1 (``--models llava --batches 1``); the vlkit side calls ``Llava.generate(input_ids,
pixel_values, attention_mask, ...)``, transformers' the same inputs.

    python benchmarks/bench_generate.py [--models 35m,150m,llava] [--batches 1,8] [--rounds 5] [--prompt 64] [--new 128] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "35m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=8000),
    "150m": dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
}

VISION = {
    "llava": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                  image_size=112, patch_size=14),
    "llava-tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=56, patch_size=14),
}
"""The LLaVA cases' CLIP towers: ``(image_size / patch_size)²`` image tokens (64 and 16)."""

LLAVA_LM = {"llava": "35m", "llava-tiny": "tiny"}
"""The Llama of each LLaVA case (a key of :data:`SIZES`)."""

IMAGE_TOKEN_OFFSET = 1
"""The image token is the vocabulary's last id (``vocab_size - IMAGE_TOKEN_OFFSET``): text ids are drawn below it."""


def is_llava(size: str) -> bool:
    return size in VISION


def lm_sizes(size: str) -> dict:
    return SIZES[LLAVA_LM.get(size, size)]


def image_tokens(size: str) -> int:
    v = VISION[size]
    return (v["image_size"] // v["patch_size"]) ** 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(size: str, folder: Path, max_positions: int) -> None:
    """A random transformers Llama (or LLaVA) of ``size`` saved to ``folder``; no EOS, so nothing stops early."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**lm_sizes(size), max_position_embeddings=max_positions, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if not is_llava(size):
        LlamaForCausalLM(cfg).save_pretrained(folder)
        return
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(**VISION[size])
    llava = LlavaConfig(vision_config=vision, text_config=cfg, image_token_index=cfg.vocab_size - IMAGE_TOKEN_OFFSET,
                        image_seq_length=image_tokens(size), vision_feature_layer=-2,
                        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(llava)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)


def load(side: str, folder: Path, device: torch.device):
    if side == "vlkit":
        import vlkit

        return vlkit.load(folder, device=str(device)).eval()
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    llava = json.loads((folder / "config.json").read_text()).get("model_type") == "llava"
    cls = LlavaForConditionalGeneration if llava else AutoModelForCausalLM
    model = cls.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    model.generation_config.eos_token_id = None
    return model


def generator_of(side: str, model):
    """``fn(inputs, new) -> new tokens [B, new]``, greedy, EOS off; ``inputs`` holds ``input_ids``,
    ``attention_mask`` and, for LLaVA, ``pixel_values``."""
    if side == "vlkit":
        if hasattr(model, "image_features"):  # a VLM: its own generate runs the vision tower, then the one loop
            return lambda inputs, new: model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                                      max_new_tokens=new, do_sample=False, eos_token_id=None)
        from vlkit.lm.generate import generate

        return lambda inputs, new: generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=new,
                                            do_sample=False, eos_token_id=None)

    def hf(inputs, new):
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new, do_sample=False, num_beams=1, pad_token_id=0)
        return out[:, inputs["input_ids"].shape[1]:]

    return hf


def prompt(size: str, batch: int, length: int, device: torch.device) -> dict:
    """Random text ids (for LLaVA: after the image's tokens, with random pixels) and a full mask."""
    g = torch.Generator().manual_seed(1)
    vocab = lm_sizes(size)["vocab_size"]
    if not is_llava(size):
        ids = torch.randint(1, vocab, (batch, length), generator=g).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    image_id = vocab - IMAGE_TOKEN_OFFSET
    text = torch.randint(1, image_id, (batch, length), generator=g)
    ids = torch.cat([torch.full((batch, image_tokens(size)), image_id), text], dim=1).to(device)
    side = VISION[size]["image_size"]
    pixels = torch.randn(batch, 3, side, side, generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def streamed_bytes(model) -> int:
    """Bytes of weights a batch-1 decode step reads: every parameter of the language model (a
    LLaVA's vision tower and connector run only in the prefill), but of an untied input embedding
    only the looked-up row."""
    emb = model.get_input_embeddings().weight
    tied = any(p is emb for n, p in model.named_parameters() if "lm_head" in n) or model.config.tie_word_embeddings
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if "vision_tower" not in n and "multi_modal_projector" not in n)
    if not tied:
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return total


HUGE_PAGE = 2 * 2**20


def huge_page_matrix(rows: int, cols: int) -> torch.Tensor | None:
    """A random fp32 CPU matrix in private anonymous memory advised for 2 MiB pages (Linux transparent
    huge pages; the kernel grants them in its "always" or "madvise" mode), or None where Python
    cannot ask for them."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return None
    nbytes = rows * cols * 4
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
    skip = -base.data_ptr() % HUGE_PAGE
    try:
        region.madvise(advice, skip, nbytes)
    except OSError:
        return None
    return base[skip : skip + nbytes].view(torch.float32).view(rows, cols).normal_()


def matvec_bandwidth(device: torch.device, megabytes: int, seconds: float = 0.5) -> dict[str, float]:
    """Bytes/s of an fp32 mat-vec on a matrix of ``megabytes`` (bigger than the caches), by each
    implementation: ``torch.mv`` (MKL on a CPU) and, on a CPU with it, oneDNN's linear, on ordinary
    memory and on 2 MiB pages."""
    rows = megabytes * 2**20 // (4 * 4096)
    w, x = torch.randn(rows, 4096, device=device), torch.randn(4096, device=device)
    out = torch.mv(w, x)
    ways = {"torch.mv": lambda: torch.mv(w, x, out=out)}
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if device.type == "cpu" else None
    if onednn is not None and torch.backends.mkldnn.is_available():
        ways["oneDNN"] = lambda: onednn(x[None], w, None, "none", [], "")
        huge = huge_page_matrix(rows, 4096)
        if huge is not None:
            ways["oneDNN on 2 MiB pages"] = lambda: onednn(x[None], huge, None, "none", [], "")
    rates = {}
    for name, fn in ways.items():
        best = float("inf")
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            best = min(best, timed(fn, device))
        rates[name] = w.numel() * 4 / best
    return rates


class PeakRSS:
    """The highest resident set size while the block runs, sampled from /proc every 0.5 ms."""

    def __enter__(self):
        self.peak = self.base = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.0005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def memory_probe(side: str, size: str, folder: Path, batch: int, length: int, new: int, device: torch.device) -> dict:
    """In this (fresh) process: load ``side``'s model, run one generate, report its peak memory."""
    model = load(side, folder, device)
    inputs = prompt(size, batch, length, device)
    fn = generator_of(side, model)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(inputs, new)
        sync(device)
        return {"peak_extra": torch.cuda.max_memory_allocated(device) - base, "kind": "allocated"}
    with torch.no_grad(), PeakRSS() as rss:
        fn(inputs, new)
    return {"peak_extra": rss.peak - rss.base, "kind": "resident"}


def peak_memory(side: str, size: str, folder: Path, batch: int, args) -> dict:
    cmd = [sys.executable, __file__, "--probe", side, "--probe-folder", str(folder), "--models", size,
           "--batches", str(batch), "--prompt", str(args.prompt), "--new", str(args.new), "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench(size: str, batches: list[int], args, device: torch.device, folder: Path) -> None:
    images = image_tokens(size) if is_llava(size) else 0
    build(size, folder, images + args.prompt + args.new)
    models = {side: load(side, folder, device) for side in ("transformers", "vlkit")}
    fns = {side: generator_of(side, m) for side, m in models.items()}
    hf = models["transformers"]
    n_params = sum(p.numel() for p in hf.parameters())
    read = streamed_bytes(hf)
    image_note = f"; each prompt: {images} image tokens + {args.prompt} text tokens" if images else ""
    print(f"\n[{size}] {n_params / 1e6:.1f}M parameters ({n_params * 4 / 1e6:.1f} MB fp32); a decode step reads "
          f"{read / 1e6:.1f} MB of weights{image_note}")
    prompt_len = images + args.prompt
    for batch in batches:
        inputs = prompt(size, batch, args.prompt, device)
        same = torch.equal(fns["transformers"](inputs, 16).cpu(), fns["vlkit"](inputs, 16).cpu())
        times = {side: {"prefill": [], "total": []} for side in fns}
        for fn in fns.values():  # warm up: first-call allocations and kernel selection stay out of the rounds
            fn(inputs, 2)
        bandwidths: dict[str, float] = {}
        for r in range(args.rounds):
            for name, rate in matvec_bandwidth(device, args.matvec_mb).items():
                bandwidths[name] = max(bandwidths.get(name, 0.0), rate)
            for side in (("transformers", "vlkit") if r % 2 == 0 else ("vlkit", "transformers")):
                fn = fns[side]
                times[side]["prefill"].append(timed(lambda fn=fn: fn(inputs, 1), device))
                times[side]["total"].append(timed(lambda fn=fn: fn(inputs, args.new), device))
        floor_step = read / max(bandwidths.values())
        each = ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in bandwidths.items())
        print(f"  batch {batch}: greedy tokens identical (16 new): {'yes' if same else 'NO'}; mat-vec bandwidth "
              f"{each} GB/s (best of the rounds) -> floor {floor_step * 1e3:.2f} ms/step")
        rates = {}
        for side, t in times.items():
            prefill = min(t["prefill"])
            decode = min(t["total"]) - prefill
            step = decode / (args.new - 1)
            mem = peak_memory(side, size, folder, batch, args)
            rates[side] = (batch * prompt_len / prefill, batch * (args.new - 1) / decode)
            print(f"  batch {batch} {side:12s} prefill {rates[side][0]:9.0f} tok/s   decode {rates[side][1]:8.1f} tok/s "
                  f"({step * 1e3:6.2f} ms/step = {step / floor_step:4.2f}x the floor)   peak {mem['kind']} memory "
                  f"+{mem['peak_extra'] / 2**20:.0f} MiB over the loaded model")
        paired = statistics.median(
            (th - ph) / (tv - pv) for th, ph, tv, pv in zip(times["transformers"]["total"], times["transformers"]["prefill"],
                                                            times["vlkit"]["total"], times["vlkit"]["prefill"]))
        print(f"  batch {batch} ratio vlkit / transformers: prefill {rates['vlkit'][0] / rates['transformers'][0]:.2f}x, "
              f"decode {rates['vlkit'][1] / rates['transformers'][1]:.2f}x (best of each), "
              f"{paired:.2f}x (median of the {args.rounds} paired rounds)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="35m,150m", help=f"comma-separated sizes from {list(SIZES) + list(VISION)}")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=128, help="new tokens per row")
    ap.add_argument("--matvec-mb", type=int, default=256, help="size of the mat-vec that measures bandwidth")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--probe", choices=["vlkit", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--probe-folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args.models, Path(args.probe_folder), batches[0], args.prompt, args.new, device)))
        return
    import transformers

    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"machine: {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}{gpu}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}; fp32, greedy, EOS off, "
          f"{args.prompt}-token prompt, {args.new} new tokens, {args.rounds} interleaved rounds")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.models.split(","):
            bench(size, batches, args, device, Path(tmp) / size)


if __name__ == "__main__":
    main()
