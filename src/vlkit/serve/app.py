"""The FastAPI app of ``vlkit serve``: OpenAI's chat completions (streamed as server-sent events
or whole), embeddings and model list under ``/v1`` (behind the API key when one is set), the
photo search the web page uses, ``/health``, and the web page itself at ``/``.

API::

    from vlkit.serve import ServeSettings, create_app, load_models
    app = create_app(load_models(["runs/demo/vlm", "runs/demo/clip"]), ServeSettings(api_key="..."))
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from vlkit.errors import VlkitError
from vlkit.lm.generate import resolve_config
from vlkit.serve import errors, schemas
from vlkit.serve import cpus
from vlkit.serve.engine import Engine, Job
from vlkit.serve.engine_process import EngineProcess
from vlkit.serve.errors import ApiError
from vlkit.serve.images import ImageFetcher, data_url_bytes
from vlkit.serve.models import ChatModel, EmbeddingModel
from vlkit.serve.security import add_guards, api_key_check
from vlkit.serve.settings import ServeSettings

STATIC = Path(__file__).parent / "static"


def create_app(models: dict, settings: ServeSettings | None = None, searcher=None) -> FastAPI:
    """The app serving ``models`` (by name, from :func:`vlkit.serve.models.load_models`); each chat
    model gets an engine thread while the app runs (started and stopped with it). ``searcher`` (a
    :class:`vlkit.index.Searcher`) answers the photo search."""
    settings = settings or ServeSettings()
    routes = Routes(models, settings, searcher)

    async def close_engines():
        for engine in routes.engines.values():
            await run_in_threadpool(engine.close)
        routes.engines.clear()

    @asynccontextmanager
    async def lifespan(app):
        held = []  # the CPUs this app's engines are bound to: the HTTP handling keeps off them
        try:
            for name, m in models.items():
                if isinstance(m, ChatModel):
                    routes.engines[name] = start_engine(m, settings)
                    held += routes.engines[name].cpus or []
                    if held:
                        cpus.hold(routes, held)
            yield
        finally:  # also when an engine could not start: the others stop with the server
            try:
                await close_engines()
            finally:
                cpus.release(routes)

    app = FastAPI(title="vlkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app)
    add_guards(app, settings)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(api_key_check(settings))])
    v1.add_api_route("/chat/completions", routes.chat, methods=["POST"])
    v1.add_api_route("/embeddings", routes.embeddings, methods=["POST"])
    v1.add_api_route("/models", routes.list_models, methods=["GET"])
    v1.add_api_route("/models/{name:path}", routes.get_model, methods=["GET"])
    v1.add_api_route("/search", routes.search, methods=["POST"])
    v1.add_api_route("/search/image", routes.search_image, methods=["GET"])
    app.include_router(v1)
    app.add_api_route("/v1/{rest:path}", _unrouted(v1), methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    app.add_api_route("/health", routes.health, methods=["GET"])
    if (STATIC / "index.html").is_file():  # the web page: / is index.html, its files beside it (or under /static)
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC), name="static")
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    app.state.models, app.state.settings, app.state.engines = models, settings, routes.engines
    return app


def _unrouted(v1: APIRouter):
    """The handler of a /v1 request no route of ``v1`` takes (else the page's files would answer it):
    405 where one has the path under other methods, else 404."""

    async def unrouted(request: Request):
        path = request.url.path
        allowed = sorted({m for r in v1.routes if isinstance(r, APIRoute) and r.path_regex.match(path)
                          for m in r.methods} - {"HEAD"})  # fmt: skip
        if allowed:
            raise HTTPException(405, f"{request.method} is not allowed on {path}; expected {' or '.join(allowed)}")
        raise HTTPException(404, f"no route {path}")

    return unrouted


def start_engine(served: ChatModel, settings: ServeSettings):
    """The model's engine: a thread of this process, or (``settings.engine == "process"``) a
    process of its own, after which this process keeps the model's config and processor only. A
    process on the CPU is bound to CPUs of its own where ``settings.pin_engines`` and enough are
    free (:func:`vlkit.serve.cpus.engine_cpus`)."""
    if settings.engine == "thread":
        if not served.has_weights:
            raise VlkitError(f"{served.path}: the chat model {served.name!r} was loaded without its weights "
                             "(load_models(..., chat_weights=False)); the thread engine runs it in this process")
        return Engine(served, settings.max_batch)
    threads = torch.get_num_threads()
    on_cpu = torch.device(served.device).type == "cpu"
    bound = cpus.engine_cpus(threads, cpus.free_cpus()) if settings.pin_engines and on_cpu else None
    engine = EngineProcess(served, settings.max_batch, served.device, threads, cpus=bound)
    served.drop_weights()
    return engine


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class Routes:
    """The handlers, sharing the models, the settings and one image fetcher."""

    def __init__(self, models: dict, settings: ServeSettings, searcher=None):
        self.models, self.settings, self.searcher = models, settings, searcher
        self.fetcher = ImageFetcher(settings)
        self.embed_lock = threading.Lock()
        self.engines: dict[str, Engine | EngineProcess] = {}

    def _model(self, name: str, kind: str):
        model = self.models.get(name)
        if model is None:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {sorted(self.models)}", "model_not_found",
                           "model")
        if model.kind != kind:
            what = {"chat": "chat completions", "embedding": "embeddings"}[kind]
            raise ApiError(400, f"the model {name!r} is a {model.kind} model; {what} need a {kind} model "
                           f"({sorted(n for n, m in self.models.items() if m.kind == kind)})", "wrong_model_kind", "model")
        return model

    # ------------------------------------------------------------ chat
    def _generation(self, served: ChatModel, req: schemas.ChatRequest, prompt_len: int):
        """The request's generation config (checked); the answer's length is the request's,
        capped by the server and by the model's context."""
        room = served.max_positions - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_len} tokens; model {served.name!r} has a context of "
                           f"{served.max_positions}, which leaves no room for an answer", "context_length_exceeded", "messages")
        asked = req.max_completion_tokens or req.max_tokens
        default = served.generation_config.max_new_tokens if served.generation_config else None
        options = dict(served.options)
        options.update(max_new_tokens=min(asked or default or self.settings.default_max_tokens, self.settings.max_tokens_cap,
                                          room), max_length=None, num_beams=1, num_return_sequences=1)  # fmt: skip
        if req.temperature == 0:  # greedy, as OpenAI's temperature 0 is meant
            options["do_sample"] = False
        elif req.temperature is not None or req.top_p is not None:
            options["do_sample"] = True
        if req.temperature:
            options["temperature"] = req.temperature
        if req.top_p is not None:
            options["top_p"] = req.top_p
        if req.stop:
            options["stop_strings"] = (options.get("stop_strings") or []) + ([req.stop] if isinstance(req.stop, str) else req.stop)
        try:
            return resolve_config(served.lm, served.generation_config, **options)
        except VlkitError as err:
            raise ApiError(400, str(err), "invalid_value") from None

    async def chat(self, req: schemas.ChatRequest, request: Request):
        """The prompt is built (images fetched, template applied) and sent to the engine off the
        event loop; the answer comes whole or as server-sent events."""
        served = self._model(req.model, "chat")
        if req.tools:
            raise ApiError(400, "tools are not supported by this server", "unsupported_parameter", "tools")
        if req.n > self.settings.max_n:
            raise ApiError(400, f"n={req.n}; this server answers at most {self.settings.max_n} choices per request",
                           "invalid_value", "n")
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()
        engine = self.engines[served.name]

        def deliver(event):
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody waits
                pass

        def submit() -> Job:
            prompt = served.prompt(req.messages, self.fetcher, self.settings)
            job = Job(prompt, self._generation(served, req, len(prompt.ids)), req.n, deliver, req.seed, strip=served.vlm,
                      stream=req.stream)  # fmt: skip
            engine.submit(job)  # a process engine pickles and sends the images
            return job

        job = await run_in_threadpool(submit)  # one trip off the event loop, not one per stage: each costs latency
        cid, created, prompt_tokens = schemas.completion_id(), schemas.now(), len(job.prompt.ids)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(self._stream(engine, job, inbox, cid, served.name, created, prompt_tokens, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})  # fmt: skip
        return await self._whole(engine, job, inbox, request, cid, served.name, created, prompt_tokens)

    async def _whole(self, engine, job: Job, inbox: asyncio.Queue, request: Request, cid, name, created, prompt_tokens):
        texts, finishes, tokens = [""] * job.n, [None] * job.n, 0
        try:
            while any(f is None for f in finishes):
                try:
                    event = await asyncio.wait_for(inbox.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if event[0] == "delta":
                    texts[event[1]] += event[2]
                elif event[0] == "end":
                    finishes[event[1]], tokens = event[2], tokens + event[3]
                else:
                    raise ApiError(500, event[1], "generation_failed")
        finally:
            engine.cancel(job)
        return JSONResponse(schemas.completion(cid, name, created, list(zip(texts, finishes)), prompt_tokens, tokens))

    async def _stream(self, engine, job: Job, inbox: asyncio.Queue, cid, name, created, prompt_tokens, include_usage):
        open_choices, tokens = job.n, 0
        piece = functools.partial(schemas.chunk, cid, name, created, include_usage=include_usage)
        try:
            for i in range(job.n):
                yield _sse(piece(i, {"role": "assistant", "content": ""}))
            while open_choices:
                event = await inbox.get()
                if event[0] == "delta":
                    yield _sse(piece(event[1], {"content": event[2]}))
                elif event[0] == "end":
                    yield _sse(piece(event[1], {}, event[2]))
                    open_choices, tokens = open_choices - 1, tokens + event[3]
                else:
                    yield _sse(errors.body(500, event[1], "generation_failed"))
                    break
            if include_usage:
                yield _sse(schemas.chunk(cid, name, created, usage_counts=schemas.usage(prompt_tokens, tokens)))
            yield _sse("[DONE]")
        finally:
            engine.cancel(job)  # a client that went away: its rows leave at the next step

    # ------------------------------------------------------------ embeddings
    def embeddings(self, req: schemas.EmbeddingRequest):
        served = self._model(req.model, "embedding")
        items = _embedding_items(req.input)
        with self.embed_lock, torch.inference_mode():
            vectors, tokens = self._embed(served, items)
        if req.dimensions is not None and req.dimensions != vectors.shape[1]:
            raise ApiError(400, f"dimensions={req.dimensions}; model {served.name!r} gives {vectors.shape[1]}-dimensional "
                           "embeddings", "invalid_value", "dimensions")
        data = []
        for i, v in enumerate(vectors.numpy()):
            value = base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": served.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _embed(self, served: EmbeddingModel, items: list) -> tuple[torch.Tensor, int]:
        """L2-normalised embeddings in input order and the text tokens read."""
        from vlkit.eval.embed import embed_images, embed_texts

        model = served.model
        out: list = [None] * len(items)
        texts = [(i, x) for i, x in enumerate(items) if isinstance(x, str) and not _is_image(x)]
        images = [(i, x) for i, x in enumerate(items) if isinstance(x, str) and _is_image(x)]
        ids = [(i, x) for i, x in enumerate(items) if isinstance(x, list)]
        tokens = 0
        if texts:
            context, lengths = model.tokenizer.context_length, model.tokenizer.lengths([t for _, t in texts])
            for (i, _), n in zip(texts, lengths):  # else cut off without a word
                if n > context:
                    raise ApiError(400, f"input[{i}]: {n} tokens; model {served.name!r} reads at most {context}",
                                   "context_length_exceeded", "input")
            feats = embed_texts(model, [t for _, t in texts])
            tokens += sum(lengths)  # none was cut
            for (i, _), f in zip(texts, feats):
                out[i] = f
        if images:
            most = self.settings.max_images
            if len(images) > most:
                raise ApiError(400, f"{len(images)} images in one request; this server embeds at most {most} (--max-images)",
                               "invalid_value", "input")  # fmt: skip
            # each image decoded and made model-sized before the next: one full-size picture held at a time
            pixels = [model.processor.batch([self.fetcher.decode(data_url_bytes(u, f"input[{i}]"), f"input[{i}]")]) for i, u in images]
            for (i, _), f in zip(images, embed_images(model, torch.cat(pixels))):
                out[i] = f
        if ids:
            feats = self._embed_ids(model, [x for _, x in ids])
            tokens += sum(len(x) for _, x in ids)
            for (i, _), f in zip(ids, feats):
                out[i] = f
        return torch.stack(out), tokens

    @staticmethod
    def _embed_ids(model, rows: list[list[int]]) -> torch.Tensor:
        """Token-id inputs, taken as the model's tokenizer makes them (its BOS and EOS included)."""
        import torch.nn.functional as F

        vocab = model.cfg.text.vocab_size
        context = model.cfg.text.context_length
        for i, row in enumerate(rows):
            if not row or len(row) > context or max(row) >= vocab:
                raise ApiError(400, f"input[{i}]: {len(row)} token ids in [0, {max(row, default=0)}]; expected 1 to {context} "
                               f"ids below {vocab} (the model's context and vocabulary)", "invalid_value", "input")
        device = next(model.parameters()).device
        out = []
        for start in range(0, len(rows), 256):  # as embed_texts batches texts: memory bounded by the batch
            batch = rows[start : start + 256]
            ids = torch.zeros(len(batch), max(len(r) for r in batch), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(batch):
                ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
            out.append(F.normalize(model.encode_text(ids.to(device), mask.to(device)).float(), dim=-1).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------ models, health
    def _card(self, m) -> dict:
        """OpenAI's model object; ``kind`` ("chat" or "embedding") is vlkit's extension, which tells
        the web page which models chat."""
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "vlkit", "kind": m.kind}

    def list_models(self):
        return {"object": "list", "data": [self._card(m) for m in self.models.values()]}

    def get_model(self, name: str):
        if name not in self.models:
            raise ApiError(404, f"the model {name!r} does not exist; this server has {sorted(self.models)}", "model_not_found",
                           "model")
        return self._card(self.models[name])

    def health(self):
        """Each model's state; 503 (status "down") while a chat model's engine cannot answer."""
        out = {}
        for name, m in self.models.items():
            out[name] = {"kind": m.kind}
            engine = self.engines.get(name)
            if engine is not None:
                out[name].update(engine.health())
        down = any("down" in m for m in out.values())
        body = {"status": "down" if down else "ok", "models": out,
                "index": None if self.searcher is None else str(self.searcher.index.folder)}  # fmt: skip
        return JSONResponse(body, status_code=503 if down else 200)

    # ------------------------------------------------------------ photo search
    def _searcher(self):
        if self.searcher is None:
            raise ApiError(404, "no photo index is served; start the server with --index INDEX", "no_index")
        return self.searcher

    def search(self, req: schemas.SearchRequest):
        """The index's best ``k`` images for a text or an image query, with thumbnails."""
        searcher = self._searcher()
        image = None if req.image is None else self.fetcher.decode(data_url_bytes(req.image, "image"), "image")
        with self.embed_lock, torch.inference_mode():
            try:
                return searcher.search_json(req.query, image, req.k)
            except VlkitError as err:
                raise ApiError(400, str(err), "invalid_value") from None

    def search_image(self, path: str):
        try:
            data, media = self._searcher().image_bytes(path)
        except VlkitError as err:
            raise ApiError(404, str(err), "image_not_found", "path") from None
        return Response(data, media_type=media)


MAX_EMBEDDING_INPUTS = 2048
"""The most texts, images or token-id lists one embeddings request may hold (OpenAI's limit)."""


def _is_image(text: str) -> bool:
    return text[:11].lower() == "data:image/"


def _embedding_items(value) -> list:
    """OpenAI's input forms → a list of texts (or image data URLs) and token-id lists."""
    if isinstance(value, str):
        items = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [list(value)]
    else:
        items = list(value)
    if not items or any(isinstance(v, str) and not v for v in items):
        raise ApiError(400, "input is empty; expected a non-empty text, list of texts or token ids", "invalid_value", "input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"input holds {len(items)} items; at most {MAX_EMBEDDING_INPUTS} a request (as OpenAI's API)",
                       "invalid_value", "input")
    return items
