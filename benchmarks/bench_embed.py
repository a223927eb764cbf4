"""Image and text embedding throughput: vlkit vs transformers.CLIPModel, identical weights.

Builds a randomly initialised CLIP ViT-B/32 with transformers, saves it, loads the same
folder with vlkit, checks the embeddings agree, then times both side by side (interleaved
rounds, best of each) in fp32 and bf16 autocast, and prints the ratios and the fraction of
this machine's matmul peak (measured between the rounds on the model's own matrix shapes).
Each side's FLOPs are its own: vlkit's last block computes only the pooled row.

    python benchmarks/bench_embed.py [--batch 32] [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import vlkit
from vlkit.precision import bf16_is_fast


def layer_flops(queries: int, tokens: int, d: int) -> int:
    """Matmul FLOPs of one pre-LN block whose ``queries`` rows attend over ``tokens`` rows."""
    return 2 * (queries * 2 * d * d + tokens * 2 * d * d + queries * 8 * d * d) + 2 * 2 * queries * tokens * d


def vit_b32_flops(batch: int, image: bool, pooled_row_only: bool) -> float:
    """Matmul FLOPs of one forward pass of CLIP ViT-B/32's image (224 px, 50 tokens) or text
    (77 tokens) tower; ``pooled_row_only``: the last block computes only the pooled row, as vlkit's does."""
    n, d, extra = (50, 768, 2 * 49 * 3 * 32 * 32 * 768 + 2 * 768 * 512) if image else (77, 512, 2 * 512 * 512)
    last = layer_flops(1 if pooled_row_only else n, n, d)
    return batch * (11 * layer_flops(n, n, d) + last + extra)


def matmul_peak(dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of the model's largest matmul (tokens × 768 × 3072, the weight stored [out, in] as
    in ``nn.Linear``: on a CPU without native bf16 only that layout has a fast bf16 kernel)."""
    a, w = torch.randn(1600, 768, dtype=dtype), torch.randn(3072, 768, dtype=dtype)
    out = a @ w.t()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.matmul(a, w.t(), out=out)
        n += 1
    return n * 2 * 1600 * 768 * 3072 / (time.perf_counter() - t0)


def features(out) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` holds the projected features."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    hf = CLIPModel(CLIPConfig()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = vlkit.load(tmp).eval()
    pixels = torch.randn(args.batch, 3, 224, 224)
    ids = torch.randint(1, 49000, (args.batch, 77))
    ids[:, -1] = 49407
    with torch.no_grad():
        diff = (features(hf.get_image_features(pixel_values=pixels)) - ours.encode_image(pixels)).abs().max().item()
        tdiff = (features(hf.get_text_features(input_ids=ids)) - ours.encode_text(ids)).abs().max().item()
    print(f"machine: {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {bf16_is_fast(torch.device('cpu'))}")
    print(f"parity: image max |diff| {diff:.2e}, text max |diff| {tdiff:.2e}")
    cases = {
        "image": (lambda: hf.get_image_features(pixel_values=pixels), lambda: ours.encode_image(pixels), True),
        "text": (lambda: hf.get_text_features(input_ids=ids), lambda: ours.encode_text(ids), False),
    }
    for dname in args.dtypes.split(","):
        dtype = torch.bfloat16 if dname == "bf16" else torch.float32
        peak = 0.0
        print(f"\n[{dname}]")
        for name, (f_hf, f_ours, image) in cases.items():
            times = {"transformers": [], "vlkit": []}
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dname == "bf16"):
                f_hf(), f_ours()
                for _ in range(args.rounds):
                    peak = max(peak, matmul_peak(dtype))
                    times["transformers"].append(timed(f_hf, args.reps))
                    times["vlkit"].append(timed(f_ours, args.reps))
            flops = {"transformers": vit_b32_flops(args.batch, image, False), "vlkit": vit_b32_flops(args.batch, image, True)}
            unit = "img" if image else "txt"
            for who, secs in times.items():
                sec = min(secs)
                print(f"  {name:5s} {who:12s} {args.batch / sec:8.1f} {unit}/s   {flops[who] / 1e9 / args.batch:5.2f} "
                      f"GFLOP/{unit} at {flops[who] / sec / 1e9:6.1f} GFLOP/s = {flops[who] / sec / peak:5.1%} of peak")
            paired = statistics.median(t / o for t, o in zip(times["transformers"], times["vlkit"]))
            print(f"  {name:5s} ratio vlkit / transformers: {min(times['transformers']) / min(times['vlkit']):.3f}x "
                  f"(best of each), {paired:.3f}x (median of the {args.rounds} paired rounds)")
        print(f"  matmul peak on 1600x768x3072 (best of {args.rounds * len(cases)} half-second runs "
              f"between the rounds): {peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
