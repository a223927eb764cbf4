"""Load on ``vlkit serve``: N concurrent ``openai`` clients for T seconds against a VLM served on
127.0.0.1, then one client for T seconds (one request at a time), R rounds of the two in turn:
requests/s, tokens/s, p50/p95 latency and errors of each (its rounds pooled), and the ratio of their
throughputs, pooled and per round (the bar: 8 clients give at least 3x one client, with zero
errors). Every phase sends the same requests in the same order. Alternating rounds keep a machine
whose speed drifts from minute to minute (a shared VM's) from favouring one side of the ratio.

CPU time per request is reported for the server process and for the clients' process (both from
the kernel's accounting, so a loaded machine stretches wall times but not these): it says where the
work goes, and whether the clients themselves hold the two cores the server needs.

    python benchmarks/bench_serve.py                       # builds a small random VLM (see --size)
    python benchmarks/bench_serve.py --model runs/demo/vlm --clients 8 --seconds 20 --rounds 3 [--requests shapes]

The server runs as its own process (``vlkit serve``), so the clients' Python does not share its
interpreter. ``--engine-only`` sends the same requests to the server's engine in this process
instead (no HTTP): the ratio the model and its batching allow, which the HTTP ratio cannot beat.
Each request is one user turn with an image (a ``data:`` URL) and a question, greedy,
``--max-tokens`` new tokens at most: by default a numbered question about a drawn ellipse;
``--requests shapes`` sends the demo VLM's held-out prompts instead (questions of every type,
captions and referring expressions, 2 : 1 : 1), whose answers are as long as the model's real ones.
Bounded: each phase stops sending after ``--seconds`` (requests in flight finish) or
``--max-requests``; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SIZES = {
    # vision (image px, patch, width, depth), lm (hidden, intermediate, layers, heads)
    "tiny": dict(image=32, patch=8, vwidth=32, vdepth=2, hidden=64, inter=128, layers=2, heads=4),
    "small": dict(image=64, patch=8, vwidth=128, vdepth=4, hidden=256, inter=688, layers=4, heads=4),
}


def build_vlm(folder: Path, size: str) -> Path:
    """A random LLaVA (CLIP-style tower, MLP connector, Llama LM) with a ChatML tokenizer that has
    ``<image>``, saved as a vlkit folder; answers are noise, the work per token is real."""
    import torch

    from vlkit.lm.generation_config import GenerationConfig
    from vlkit.lm.llama import LlamaConfig
    from vlkit.models.llava import Llava, LlavaConfig
    from vlkit.text.train_tokenizer import train_tokenizer
    from vlkit.train.checkpoint import save_model
    from vlkit.vision.preprocess import ImageProcessor
    from vlkit.vision.vit import ViTConfig

    s = SIZES[size]
    corpus = [f"a {c} {shape} at the {w} of the picture" for c in ("red", "green", "blue", "white")
              for shape in ("circle", "square", "star") for w in ("left", "right", "top")] * 4  # fmt: skip
    tok = train_tokenizer(corpus, vocab_size=512, min_frequency=1)
    cfg = LlavaConfig(
        vision=ViTConfig(image_size=s["image"], patch_size=s["patch"], width=s["vwidth"], depth=s["vdepth"], num_heads=4),
        lm=LlamaConfig(vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], num_key_value_heads=s["heads"], max_position_embeddings=512),
        connector="mlp", image_token_id=tok.token_to_id("<image>"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = Llava(cfg)
    model.tokenizer = tok
    model.generation_config = GenerationConfig(eos_token_id=tok.token_to_id("<|im_end|>"))
    model.processor = ImageProcessor(size=s["image"], crop_size=s["image"])
    save_model(folder, model, "llava")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, threads: int, max_tokens: int, engine: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "vlkit.cli", "serve", "--model", f"vlm={model}", "--port", str(port),
           "--max-tokens-cap", str(max_tokens), "--engine", engine, "--log-level", "warning"]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}; see its log")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready within {timeout} s")


def image_urls(n: int) -> list[str]:
    from PIL import Image, ImageDraw

    colors = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
    out = []
    for i in range(n):
        img = Image.new("RGB", (96, 96), "black")
        ImageDraw.Draw(img).ellipse([8 + i % 5 * 6, 10, 60 + i % 3 * 9, 70], fill=colors[i % len(colors)])
        out.append(png_url(img))
    return out


def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds so far of process ``pid`` and the processes it started (its
    engine processes) (Linux's /proc; None elsewhere)."""
    fields = _proc_stat(pid)
    if fields is None:
        return None
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    stats = [fields] + [f for f in map(_proc_stat, children) if f is not None and int(f[1]) == pid]
    return sum(int(f[11]) + int(f[12]) for f in stats) / os.sysconf("SC_CLK_TCK")


def png_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ellipse_requests(n: int = 16):
    """Request ``i``'s user turn: one of ``n`` ellipses and a numbered question (the same in every phase)."""
    images = image_urls(n)

    def content(i: int) -> list[dict]:
        question = f"Question {i}: what shape is in the picture, and what color is it?"
        return [{"type": "image_url", "image_url": {"url": images[i % n]}}, {"type": "text", "text": question}]

    return content


def shapes_requests(n: int = 40):
    """The demo VLM's own held-out prompts, in its evaluation's proportions and interleaved (two
    questions, a caption, a box, ...): the questions' types in turn, so the answers run from one
    token to a ~20-token box as they do when the model is used for what it was trained on."""
    from vlkit.data.shapes_chat import ShapesChatConfig, eval_captions, eval_grounding, eval_vqa

    world = ShapesChatConfig(held_out=True).world
    quarter = n // 4
    vqa, caps, boxes = eval_vqa(world, 2 * quarter), eval_captions(world, quarter), eval_grounding(world, quarter)
    items = [it for k in range(quarter) for it in (vqa[2 * k], vqa[2 * k + 1], caps[k], boxes[k])]
    parts = [[{"type": "image_url", "image_url": {"url": png_url(world.scene(it.index).render())}},
              {"type": "text", "text": it.prompt}] for it in items]  # fmt: skip
    return lambda i: parts[i % len(parts)]


class HttpTarget:
    """``vlkit serve`` at ``url`` (process ``pid``), asked by ``openai`` clients."""

    in_process = False

    def __init__(self, url: str, pid: int, max_tokens: int):
        self.url, self.pid, self.max_tokens = url, pid, max_tokens

    def client(self):
        """One client's ``send(content) -> completion tokens``."""
        import openai

        c = openai.OpenAI(base_url=f"{self.url}/v1", api_key="bench", max_retries=0, timeout=300)

        def send(parts: list[dict]) -> int:
            r = c.chat.completions.create(model="vlm", messages=[{"role": "user", "content": parts}], max_tokens=self.max_tokens,
                                          temperature=0)  # fmt: skip
            return r.usage.completion_tokens

        return send

    def stats(self) -> dict:
        """The served VLM's engine counters (``/health``): requests, steps, rows, the engine thread's CPU."""
        import httpx

        return httpx.get(f"{self.url}/health", timeout=30).json()["models"]["vlm"]

    def cpu(self) -> float | None:
        return cpu_seconds(self.pid)


class EngineTarget:
    """The server's engine in this process, without HTTP: each client thread builds the prompt
    (image decoded, template applied) as the server's worker thread does and submits it. What the
    model and its batching allow, the ceiling of the HTTP figures."""

    in_process = True

    def __init__(self, model: Path, max_tokens: int, threads: int):
        import torch

        from vlkit.lm.generate import resolve_config
        from vlkit.serve.engine import Engine
        from vlkit.serve.images import ImageFetcher
        from vlkit.serve.models import load_models
        from vlkit.serve.settings import ServeSettings

        torch.set_num_threads(threads)
        self.served = load_models([f"vlm={model}"])["vlm"]
        self.settings = ServeSettings(max_tokens_cap=max_tokens)
        self.fetcher = ImageFetcher(self.settings)
        self.engine = Engine(self.served, self.settings.max_batch)
        # as the server resolves a temperature-0 request
        options = dict(self.served.options, max_new_tokens=max_tokens, max_length=None, num_beams=1, num_return_sequences=1,
                       do_sample=False)  # fmt: skip
        self.config = resolve_config(self.served.lm, self.served.generation_config, **options)

    def client(self):
        from vlkit.serve.engine import Job
        from vlkit.serve.schemas import ChatRequest

        def send(parts: list[dict]) -> int:
            req = ChatRequest(model="vlm", messages=[{"role": "user", "content": parts}], temperature=0)
            prompt = self.served.prompt(req.messages, self.fetcher, self.settings)
            done, out = threading.Event(), {}

            def deliver(event: tuple) -> None:
                if event[0] != "delta":
                    out["event"] = event
                    done.set()

            self.engine.submit(Job(prompt, self.config, 1, deliver, strip=True, stream=False))
            if not done.wait(300) or out["event"][0] == "error":
                raise RuntimeError(f"the engine failed: {out.get('event')}")
            return out["event"][3]

        return send

    def stats(self) -> dict:
        return dict(self.engine.stats)

    def cpu(self) -> float | None:
        return None  # the engine shares this process with the clients: its own CPU is in stats()

    def close(self) -> None:
        self.engine.close()


@dataclass
class Phase:
    """What one phase measured: each request's latency, the tokens answered, the errors, the wall time,
    the CPU seconds of the server (None when unknown), of the clients and of the engine's counters."""

    clients: int
    latencies: list[float]
    tokens: int
    errors: list[str]
    wall: float
    server_cpu: float | None
    client_cpu: float
    engine: dict

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.wall

    def __add__(self, other: "Phase") -> "Phase":
        """Two phases of the same clients as one (their requests, times and counts added)."""
        cpu = None if self.server_cpu is None or other.server_cpu is None else self.server_cpu + other.server_cpu
        return Phase(self.clients, self.latencies + other.latencies, self.tokens + other.tokens, self.errors + other.errors,
                     self.wall + other.wall, cpu, self.client_cpu + other.client_cpu,
                     {k: v + other.engine[k] for k, v in self.engine.items()})  # fmt: skip

    def summary(self) -> dict:
        lat, n, engine = sorted(self.latencies), len(self.latencies), self.engine
        per_request = lambda cpu: None if cpu is None or not n else round(1000 * cpu / n, 2)  # noqa: E731
        pct = lambda q: lat[min(n - 1, int(q * n))] if lat else float("nan")  # noqa: E731
        return {"clients": self.clients, "requests": n, "errors": len(self.errors), "first_errors": self.errors[:3],
                "wall_s": round(self.wall, 2), "requests_per_s": round(self.requests_per_s, 3),
                "tokens_per_s": round(self.tokens / self.wall, 1), "tokens_per_request": round(self.tokens / max(1, n), 1),
                "p50_s": round(statistics.median(lat), 3) if lat else None, "p95_s": round(pct(0.95), 3),
                "server_cpu_ms_per_request": per_request(self.server_cpu),
                "client_cpu_ms_per_request": per_request(self.client_cpu),
                "engine_cpu_ms_per_request": per_request(engine["cpu_s"]),
                "engine_prefill_cpu_ms_per_request": per_request(engine["prefill_cpu_s"]),
                "rows_per_step": round(engine["rows_stepped"] / max(1, engine["steps"]), 2),
                "server_cores_busy": None if self.server_cpu is None else round(self.server_cpu / self.wall, 2),
                "client_cores_busy": round(self.client_cpu / self.wall, 2)}  # fmt: skip


def phase(target, clients: int, seconds: float, max_requests: int, content) -> Phase:
    """``clients`` threads, each sending one request after another until ``seconds`` pass."""
    latencies: list[float] = []
    tokens, errors, sent = [0], [], [0]
    lock = threading.Lock()
    engine = target.stats()
    server_cpu, client_cpu = target.cpu(), time.process_time()
    start = time.monotonic()
    stop_at = start + seconds

    def client(k: int) -> None:
        send = target.client()
        while time.monotonic() < stop_at:
            with lock:
                if sent[0] >= max_requests:
                    return
                i = sent[0]
                sent[0] += 1
            t0 = time.monotonic()
            try:
                n = send(content(i))
                with lock:
                    latencies.append(time.monotonic() - t0)
                    tokens[0] += n
            except Exception as err:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    errors.append(f"{type(err).__name__}: {err}"[:200])

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 600)
    wall = time.monotonic() - start
    client_cpu = time.process_time() - client_cpu
    server_cpu = None if server_cpu is None else target.cpu() - server_cpu
    engine = {k: v - engine[k] for k, v in target.stats().items() if k in ("steps", "rows_stepped", "cpu_s", "prefill_cpu_s")}
    if target.in_process:
        client_cpu -= engine["cpu_s"]
    return Phase(clients, latencies, tokens[0], errors, wall, server_cpu, client_cpu, engine)


REQUESTS = {"ellipse": ellipse_requests, "shapes": shapes_requests}


def phases(target, args) -> tuple[list[Phase], list[Phase], dict]:
    """A warm-up, then ``--rounds`` rounds of ``--clients`` clients and of one, in turn: the same
    requests in the same order in every phase. Alternating keeps a machine whose speed drifts from
    minute to minute from favouring one side of the ratio."""
    content = REQUESTS[args.requests]()
    phase(target, 1, min(5.0, args.seconds), 3, content)
    many, one = [], []
    for _ in range(args.rounds):
        many.append(phase(target, args.clients, args.seconds, args.max_requests, content))
        one.append(phase(target, 1, args.seconds, args.max_requests, content))
    return many, one, target.stats()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a VLM folder (default: build a random one of --size)")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the two phases, alternating")
    p.add_argument("--max-requests", type=int, default=2000, help="requests per phase at most")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests", choices=sorted(REQUESTS), default="ellipse",
                   help="ellipse: a numbered question about one of 16 drawn ellipses; shapes: the demo VLM's held-out "
                        "questions, captions and boxes (2 : 1 : 1)")
    p.add_argument("--threads", type=int, default=2, help="the server's OMP_NUM_THREADS")
    p.add_argument("--server-engine", choices=["process", "thread"], default="process",
                   help="vlkit serve --engine: the model in a process of its own (the default) or a thread of the server")
    p.add_argument("--out", help="append the result as a JSON line to this file")
    p.add_argument("--engine-only", action="store_true",
                   help="send the same requests to the server's engine in this process, without HTTP (the ceiling)")
    args = p.parse_args()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_vlm(Path(tmp) / f"vlm_{args.size}", args.size)
        if args.engine_only:
            target = EngineTarget(model, args.max_tokens, args.threads)
            try:
                many, one, engine = phases(target, args)
            finally:
                target.close()
        else:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = Path(tmp) / "server.log"
            proc = start_server(model, port, args.threads, args.max_tokens, args.server_engine, log)
            try:
                wait_ready(url, proc, 180)
                many, one, engine = phases(HttpTarget(url, proc.pid, args.max_tokens), args)
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                if proc.returncode not in (0, -15, None):
                    print(log.read_text()[-3000:], file=sys.stderr)
    pooled_many, pooled_one = sum(many[1:], many[0]), sum(one[1:], one[0])
    result = {"model": str(args.model or f"random {args.size}"),
              "target": "engine" if args.engine_only else f"http ({args.server_engine} engine)",
              "threads": args.threads, "requests": args.requests, "max_tokens": args.max_tokens, "seconds": args.seconds,
              "rounds": args.rounds, "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
              "one": pooled_one.summary(), "many": pooled_many.summary(),
              "throughput_ratio": round(pooled_many.requests_per_s / max(pooled_one.requests_per_s, 1e-9), 2),
              "rounds_requests_per_s": [[round(m.requests_per_s, 1), round(o.requests_per_s, 1)] for m, o in zip(many, one)],
              "round_ratios": [round(m.requests_per_s / max(o.requests_per_s, 1e-9), 2) for m, o in zip(many, one)],
              "engine": {k: engine.get(k) for k in ("requests", "steps", "rows_stepped", "max_rows", "joins_packed",
                                                    "joins_apart", "cpus")}}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
