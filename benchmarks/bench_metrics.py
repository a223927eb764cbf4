"""Caption metrics on 5,000 COCO-format captions: vlkit vs coco-caption (pycocoevalcap),
measured side by side in one run.

Data: a Karpathy-layout captions JSON of N images x 5 references, COCO-like sentences
(8-14 words from a 2,000-word Zipf vocabulary; predictions share about half their words with
a reference), written and read back through vlkit.data.formats.coco. Both libraries get the
same vlkit-tokenised text; the script checks the scores agree to 1e-9, then times each
scorer (best of --repeat runs).

    python benchmarks/bench_metrics.py [--n 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def make_data(n: int, seed: int = 0):
    from vlkit.data.formats.coco import CaptionRecord, read_karpathy, write_karpathy

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]

    def sentence():
        return " ".join(rng.choices(vocab, weights, k=rng.randint(8, 14)))

    recs, preds = [], {}
    for i in range(n):
        refs = [sentence() for _ in range(5)]
        recs.append(CaptionRecord(i, Path(f"images/{i:012d}.jpg"), refs))
        base = refs[0].split()
        preds[i] = " ".join(w if rng.random() < 0.5 else rng.choices(vocab, weights)[0] for w in base)
    with tempfile.TemporaryDirectory() as d:
        path = write_karpathy(Path(d) / "captions_karpathy.json", recs, image_root=d)
        back = read_karpathy(path)
    return preds, {r.id: r.captions for r in back}


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    from vlkit.eval.metrics import bleu, cider, rouge_l, tokenize_caption

    preds, refs = make_data(args.n)
    t_tok, _ = best(lambda: [tokenize_caption(r) for rs in refs.values() for r in rs], 1)
    gts = {k: [tokenize_caption(r) for r in v] for k, v in refs.items()}
    res = {k: [tokenize_caption(preds[k])] for k in refs}
    toks_p = {k: v[0] for k, v in res.items()}

    rows = []
    for name, mine, theirs, get in (
        ("BLEU-1..4", lambda: bleu(toks_p, gts, tokenize=False), lambda: Bleu(4).compute_score(gts, res, verbose=0), lambda o: o[0]),
        ("CIDEr-D", lambda: cider(toks_p, gts, tokenize=False), lambda: Cider().compute_score(gts, res), lambda o: float(o[0])),
        ("ROUGE-L", lambda: rouge_l(toks_p, gts, tokenize=False), lambda: Rouge().compute_score(gts, res), lambda o: float(o[0])),
    ):
        tv, v = best(mine, args.repeat)
        tc, c = best(theirs, args.repeat)
        c = get(c)
        diff = max(abs(a - b) for a, b in zip(v, c)) if isinstance(v, list) else abs(v - c)
        assert diff < 1e-9, f"{name}: vlkit and coco-caption differ by {diff}"
        rows.append((name, tv, tc, diff))
    print(f"{args.n} images x 5 references (vlkit tokenisation of all references: {t_tok:.2f} s)")
    print(f"{'metric':<10} {'vlkit s':>8} {'coco s':>8} {'speed-up':>9} {'max |diff|':>11}")
    for name, tv, tc, diff in rows:
        print(f"{name:<10} {tv:8.3f} {tc:8.3f} {tc / tv:8.2f}x {diff:11.1e}")
    tv, tc = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{'all three':<10} {tv:8.3f} {tc:8.3f} {tc / tv:8.2f}x")


if __name__ == "__main__":
    main()
