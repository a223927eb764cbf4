"""Image and text embedding throughput: vlkit vs transformers.CLIPModel, identical weights.

Builds a randomly initialised CLIP ViT-B/32 with transformers, saves it, loads the same
folder with vlkit, checks the embeddings agree, then times both side by side (interleaved
rounds) in fp32 and bf16 autocast, and prints the ratios (best of each side, and the median
of the paired rounds) and the fraction of this machine's matmul peak (measured between the
rounds on the model's own matrix shape). Each side's FLOPs are its own: vlkit computes only
what the pooled embedding reads (see ``tower_flops``).

Cases: ``image`` (224 px), ``text`` (77 real tokens, the end-of-text token last: the issue's
measurement) and ``prompts`` (short prompts padded to 77 tokens with an attention mask, as
zero-shot classification tokenises them).

    python benchmarks/bench_embed.py [--batch 32] [--rounds 8] [--dtypes fp32,bf16] [--cases image,text,prompts] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import vlkit
from vlkit.precision import bf16_is_fast

PROMPT_TOKENS = 12
"""Length of the ``prompts`` case's texts, start and end-of-text tokens included."""


def layer_flops(queries: int, tokens: int, d: int) -> int:
    """Matmul FLOPs of one pre-LN block whose ``queries`` rows attend over ``tokens`` rows."""
    return 2 * (queries * 2 * d * d + tokens * 2 * d * d + queries * 8 * d * d) + 2 * 2 * queries * tokens * d


def tower_flops(case: str, vlkit_side: bool) -> int:
    """Matmul FLOPs per sample of CLIP ViT-B/32's 12-layer image or text tower. vlkit's last block
    computes only the pooled row, and its causal text tower stops at the end-of-text token."""
    if case == "image":
        n, d, extra = 50, 768, 2 * 49 * 3 * 32 * 32 * 768 + 2 * 768 * 512
    else:
        n, d, extra = 77, 512, 2 * 512 * 512
        if case == "prompts" and vlkit_side:
            n = PROMPT_TOKENS
    last = layer_flops(1 if vlkit_side else n, n, d)
    return 11 * layer_flops(n, n, d) + last + extra


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 0.5) -> float:
    """FLOP/s of the model's largest matmul (tokens × 768 × 3072, the weight stored [out, in] as
    in ``nn.Linear``: on a CPU without native bf16 only that layout has a fast bf16 kernel)."""
    a, w = torch.randn(1600, 768, dtype=dtype, device=device), torch.randn(3072, 768, dtype=dtype, device=device)
    out = a @ w.t()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.matmul(a, w.t(), out=out)
        n += 1
    sync(device)
    return n * 2 * 1600 * 768 * 3072 / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def features(out) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` holds the projected features."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def timed(fn, reps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def inputs(batch: int, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Each case's keyword arguments (transformers' names; vlkit takes the same ones)."""
    ids = torch.randint(1, 49000, (batch, 77))
    ids[:, -1] = 49407
    prompt_ids = torch.zeros(batch, 77, dtype=torch.long)
    prompt_ids[:, :PROMPT_TOKENS] = torch.randint(1, 49000, (batch, PROMPT_TOKENS))
    prompt_ids[:, PROMPT_TOKENS - 1] = 49407
    mask = (torch.arange(77) < PROMPT_TOKENS).long().expand(batch, -1)
    cases = {
        "image": {"pixel_values": torch.randn(batch, 3, 224, 224)},
        "text": {"input_ids": ids},
        "prompts": {"input_ids": prompt_ids, "attention_mask": mask},
    }
    return {name: {k: v.to(device) for k, v in kw.items()} for name, kw in cases.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--cases", default="image,text,prompts")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    hf = CLIPModel(CLIPConfig()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = vlkit.load(tmp).eval().to(device)
    hf.to(device)
    every = inputs(args.batch, device)
    cases = {}
    for name in args.cases.split(","):
        kw = every[name]
        if name == "image":
            cases[name] = (lambda kw=kw: hf.get_image_features(**kw), lambda kw=kw: ours.encode_image(kw["pixel_values"]))
        else:
            cases[name] = (lambda kw=kw: hf.get_text_features(**kw), lambda kw=kw: ours.encode_text(**kw))
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"machine: {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}{gpu}, "
          f"native bf16 on {device}: {bf16_is_fast(device)}")
    with torch.no_grad():
        diffs = {name: (features(f_hf()) - f_ours()).abs().max().item() for name, (f_hf, f_ours) in cases.items()}
    print("parity, max |diff|: " + ", ".join(f"{name} {d:.2e}" for name, d in diffs.items()))
    for dname in args.dtypes.split(","):
        dtype = torch.bfloat16 if dname == "bf16" else torch.float32
        peak = 0.0
        print(f"\n[{dname}]")
        for name, (f_hf, f_ours) in cases.items():
            times = {"transformers": [], "vlkit": []}
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dname == "bf16"):
                f_hf(), f_ours()
                for _ in range(args.rounds):
                    peak = max(peak, matmul_peak(dtype, device))
                    times["transformers"].append(timed(f_hf, args.reps, device))
                    times["vlkit"].append(timed(f_ours, args.reps, device))
            unit = "img" if name == "image" else "txt"
            for who, secs in times.items():
                sec, flops = min(secs), tower_flops(name, who == "vlkit") * args.batch
                print(f"  {name:7s} {who:12s} {args.batch / sec:8.1f} {unit}/s   {flops / 1e9 / args.batch:5.2f} "
                      f"GFLOP/{unit} at {flops / sec / 1e9:6.1f} GFLOP/s = {flops / sec / peak:5.1%} of peak")
            paired = statistics.median(t / o for t, o in zip(times["transformers"], times["vlkit"]))
            print(f"  {name:7s} ratio vlkit / transformers: {min(times['transformers']) / min(times['vlkit']):.3f}x "
                  f"(best of each), {paired:.3f}x (median of the {args.rounds} paired rounds)")
        print(f"  matmul peak on 1600x768x3072 (best of {args.rounds * len(cases)} half-second runs "
              f"between the rounds): {peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
