"""Photo-index search at scale, and embedding throughput of a folder of images.

Search: N unit vectors of width D (default 1M × 512), queries scored against exact search
(recall@10: the share of the true ten nearest found). The bar is recall@10 ≥ 0.95 at
≤ 10 ms per query. Two datasets:

- ``isotropic``: i.i.d. Gaussian directions, queries drawn the same way — the worst case for
  any approximate index (every point is about equally far from a query; no structure to use);
- ``clustered``: points around ``--clusters`` random centres at cosine ≈ 0.71 (``--spread``; as
  embeddings of real photos cluster by content), queries drawn from the same mixture.

Backends are vlkit's own (:mod:`vlkit.index.backends`): exact (FAISS flat inner product,
the same maths as ``ExactSearch``), PQ and RaBitQ codes re-ranked exactly (swept over the
shortlist factor), HNSW (swept over ``efSearch``) and IVF-Flat (swept over ``nprobe``).
Per-query latency is measured one query at a time (an interactive search), on every thread FAISS
has (``OMP_NUM_THREADS``) and again on one thread: the median wall time, and the CPU time per
query on all threads (``time.process_time``: on a shared, loaded machine the wall time stretches
but the CPU time much less), with the batch throughput alongside. Build times and the bytes per
vector of the saved FAISS index (besides the float vectors every vlkit index keeps) are reported.

Embedding: ``--images FOLDER --model CLIPDIR`` times ``build_index`` (decode, preprocess,
embed) on the folder, written to a temporary index.

    OMP_NUM_THREADS=2 python benchmarks/bench_index.py --n 1000000 --backends exact,pq,rabitq,ivf
    python benchmarks/bench_index.py --n 0 --images /tmp/photos --model runs/demo/clip/model
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def dataset(kind: str, n: int, d: int, q: int, clusters: int, spread: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(base [n, d], queries [q, d])``, float32 unit vectors, generated in chunks."""
    rng = np.random.default_rng(seed)
    base = np.empty((n, d), dtype=np.float32)
    if kind == "isotropic":
        for i in range(0, n, 100_000):
            base[i : i + 100_000] = unit(rng.standard_normal((min(100_000, n - i), d), dtype=np.float32))
        return base, unit(rng.standard_normal((q, d), dtype=np.float32))
    centres = unit(rng.standard_normal((clusters, d), dtype=np.float32))
    scale = spread / np.sqrt(d)  # |offset from the centre| ≈ spread: cosine to the centre ≈ 1/sqrt(1 + spread²)

    def draw(m: int) -> np.ndarray:
        own = rng.integers(0, clusters, m)
        return unit(centres[own] + scale * rng.standard_normal((m, d), dtype=np.float32))

    for i in range(0, n, 100_000):
        base[i : i + 100_000] = draw(min(100_000, n - i))
    return base, draw(q)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)]))


def timed_single(search, queries: np.ndarray, k: int, threads: int) -> tuple[float, float]:
    """Median wall ms and mean CPU ms per query, one query at a time on ``threads`` threads (an
    interactive search)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    times = []
    cpu = time.process_time()
    try:
        for qv in queries:
            t = time.perf_counter()
            search(qv[None], k)
            times.append(time.perf_counter() - t)
    finally:
        cpu = time.process_time() - cpu
        faiss.omp_set_num_threads(before)
    return 1000 * float(np.median(times)), 1000 * cpu / len(queries)


def bytes_per_vector(searcher, n: int) -> float:
    """The saved FAISS index's size per vector (the codes, links or lists it holds)."""
    import faiss

    return round(faiss.serialize_index(searcher.index).size / n, 1)


def bench_search(args, kind: str) -> list[dict]:
    import faiss

    from vlkit.index import backends

    t = time.perf_counter()
    base, queries = dataset(kind, args.n, args.dim, args.queries, args.clusters, args.spread)
    print(f"[{kind}] data {base.shape} in {time.perf_counter() - t:.1f} s", flush=True)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(base)
    t = time.perf_counter()
    truth = flat.search(queries, args.k)[1]
    batch_ms = 1000 * (time.perf_counter() - t) / len(queries)
    threads = faiss.omp_get_max_threads()
    single_ms, cpu_ms = timed_single(flat.search, queries[: args.single], args.k, threads)
    one_ms = timed_single(flat.search, queries[: args.single], args.k, 1)[0]
    rows = [{"data": kind, "backend": "exact", "param": "-", "build_s": 0.0, "bytes_per_vector": 4 * args.dim, "recall@10": 1.0,
             "threads": threads, "ms_per_query": single_ms, "cpu_ms_per_query": cpu_ms, "ms_per_query_1_thread": one_ms,
             "batched_ms_per_query": batch_ms, "load": os.getloadavg()[0]}]  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    for name in args.backends:
        if name == "exact":
            continue
        t = time.perf_counter()
        options = {"hnsw": {"m": args.hnsw_m, "ef_construction": args.hnsw_efc}, "rabitq": {"bits": args.rabitq_bits}}
        searcher = backends.SEARCHERS[name].build(base, **options.get(name, {}))
        build_s = time.perf_counter() - t
        size = bytes_per_vector(searcher, args.n)
        sweep = {"hnsw": ("efSearch", args.ef), "ivf": ("nprobe", args.nprobe), "pq": ("shortlist", args.shortlist),
                 "rabitq": ("shortlist", args.shortlist)}[name]  # fmt: skip
        for p in sweep[1]:
            if name == "hnsw":
                searcher.index.hnsw.efSearch = p
            elif name == "ivf":
                searcher.index.nprobe = p
            else:
                searcher.shortlist = p
            single_ms, cpu_ms = timed_single(searcher.search, queries[: args.single], args.k, threads)
            one_ms = timed_single(searcher.search, queries[: args.single], args.k, 1)[0]
            t = time.perf_counter()
            found_all = searcher.search(queries, args.k)[1]
            batch_ms = 1000 * (time.perf_counter() - t) / len(queries)
            rows.append({"data": kind, "backend": name, "param": f"{sweep[0]}={p}", "build_s": round(build_s, 1),
                         "bytes_per_vector": size, "recall@10": recall(found_all, truth), "threads": threads,
                         "ms_per_query": single_ms, "cpu_ms_per_query": cpu_ms, "ms_per_query_1_thread": one_ms,
                         "batched_ms_per_query": batch_ms, "load": os.getloadavg()[0]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        del searcher
    return rows


def bench_embed(args) -> dict:
    import vlkit
    from vlkit.index import build_index

    model = vlkit.load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        summary = build_index(model, args.model, args.images, os.path.join(tmp, "index"), batch_size=args.batch_size,
                              precision=args.precision, progress=False)  # fmt: skip
        wall = time.perf_counter() - t
    return {"images": summary["images"], "unreadable": summary["unreadable"], "wall_s": round(wall, 2),
            "images_per_s": round(summary["images"] / wall, 1), "embed_images_per_s": summary["images_per_second"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the index (0: skip the search benchmark)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200, help="queries scored for recall (batched)")
    p.add_argument("--single", type=int, default=50, help="of which timed one at a time")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--data", default="isotropic,clustered")
    p.add_argument("--clusters", type=int, default=10_000)
    p.add_argument("--spread", type=float, default=1.0, help="clustered: a point's distance from its centre (1.0: cosine 0.71)")
    p.add_argument("--backends", default="exact,pq,rabitq,ivf,hnsw")
    p.add_argument("--ef", default="64,128,256,512")
    p.add_argument("--nprobe", default="8,16,32,64,128")
    p.add_argument("--shortlist", default="10,20,30,50", help="pq, rabitq: candidates re-ranked exactly, as a multiple of k")
    p.add_argument("--rabitq-bits", type=int, default=2, help="rabitq: bits per dimension (vlkit's default 2)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node (vlkit's default 32)")
    p.add_argument("--hnsw-efc", type=int, default=80, help="HNSW efConstruction (vlkit's default 80)")
    p.add_argument("--images", help="a folder of images for the embedding-throughput run")
    p.add_argument("--model", help="the CLIP folder for --images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args()
    args.backends = args.backends.split(",")
    args.ef = [int(v) for v in args.ef.split(",")]
    args.nprobe = [int(v) for v in args.nprobe.split(",")]
    args.shortlist = [int(v) for v in args.shortlist.split(",")]
    print(f"load average {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    report = {"search": [], "embed": None}
    if args.n:
        for kind in args.data.split(","):
            report["search"] += bench_search(args, kind)
    if args.images:
        report["embed"] = bench_embed(args)
        print(json.dumps(report["embed"]), flush=True)
    print("\n| data | backend | param | build s | bytes/vector | recall@10 | threads | ms/query (one at a time) | CPU ms/query | "
          "ms/query (one at a time, 1 thread) | ms/query (batched) | load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["search"]:
        print(f"| {r['data']} | {r['backend']} | {r['param']} | {r['build_s']} | {r['bytes_per_vector']} | {r['recall@10']:.3f} | "
              f"{r['threads']} | {r['ms_per_query']:.2f} | {r['cpu_ms_per_query']:.2f} | {r['ms_per_query_1_thread']:.2f} | "
              f"{r['batched_ms_per_query']:.2f} | {r['load']:.1f} |")  # fmt: skip
    print(f"load average after: {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
