"""Peak memory and time to load a CLIP ViT-B/32 checkpoint (random weights, transformers layout):
vlkit.load against transformers' CLIPModel.from_pretrained, each in a fresh subprocess.

    python benchmarks/bench_load.py [--dir /tmp/vitb32] [--repeats 3]

Peak RSS is the subprocess's VmHWM; "growth" is the peak minus the RSS just before loading (the
interpreter, torch and the library already imported), divided by the checkpoint's size. Tensors
may stay memory-mapped, so the RSS after reading every weight once is reported too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)
which, path = sys.argv[1], sys.argv[2]
import torch
if which == "vlkit":
    import vlkit, warnings
    warnings.simplefilter("ignore")
    load = lambda: vlkit.load(path)
else:
    import transformers
    transformers.logging.set_verbosity_error()
    load = lambda: transformers.CLIPModel.from_pretrained(path)
before = rss("VmRSS:")
t0 = time.perf_counter()
model = load()
seconds = time.perf_counter() - t0
peak = rss("VmHWM:")
with torch.no_grad():  # read every weight once: memory-mapped pages count as resident only when touched
    total = sum(float(p.sum()) for p in model.parameters())
print(json.dumps({"seconds": seconds, "before": before, "peak": peak, "touched": rss("VmRSS:"),
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def make_checkpoint(folder: Path) -> None:
    """A random CLIP ViT-B/32 saved with save_pretrained (fp32, one model.safetensors)."""
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig()).save_pretrained(folder)


def measure(which: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(folder)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to write (or reuse) the checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="vitb32-"))
    if not (folder / "model.safetensors").is_file():
        make_checkpoint(folder)
    size = (folder / "model.safetensors").stat().st_size
    print(f"checkpoint: {folder / 'model.safetensors'} ({size / 2**20:.0f} MiB)")
    results = {}
    for which in ("vlkit", "transformers"):
        runs = [measure(which, folder) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        growth = max(r["peak"] - r["before"] for r in runs)
        touched = max(r["touched"] - r["before"] for r in runs)
        results[which] = dict(seconds=best["seconds"], growth=growth, peak=max(r["peak"] for r in runs))
        print(f"{which:>12}: load {best['seconds']:.2f} s (best of {args.repeats}); peak RSS {results[which]['peak'] / 2**20:.0f} MiB; "
              f"growth while loading {growth / 2**20:.0f} MiB = {growth / size:.2f}x checkpoint; "
              f"resident after reading every weight {touched / 2**20:.0f} MiB = {touched / size:.2f}x")
    v, t = results["vlkit"], results["transformers"]
    print(f"vlkit/transformers: time {v['seconds'] / t['seconds']:.2f}x, load-time memory growth {v['growth'] / t['growth']:.2f}x")
    print(f"vlkit peak memory while loading / checkpoint size: {v['growth'] / size:.2f} (target < 1.3)")


if __name__ == "__main__":
    main()
