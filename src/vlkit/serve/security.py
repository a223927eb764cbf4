"""The server's guards: the API key on every ``/v1`` route (when one is set), the request body
size limit (413 before a handler reads it), and CORS only for the origins ``--cors-origin`` names."""

from __future__ import annotations

import hmac
import json

from fastapi import FastAPI, Request

from vlkit.serve.errors import ApiError, body
from vlkit.serve.settings import ServeSettings


def api_key_check(settings: ServeSettings):
    """A FastAPI dependency: ``Authorization: Bearer KEY`` must carry the server's key (compared
    in constant time); no key set, no check."""

    async def check(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        sent = given.strip().encode("latin-1")  # the header's bytes as sent (Starlette decodes them as latin-1)
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'", "invalid_api_key")

    return check


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 (by its
    ``Content-Length`` at once, else as soon as the streamed bytes pass the limit); the app reads
    the body only once it is whole and within bounds."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send, int(declared))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            piece = message.get("body", b"")
            size += len(piece)
            if size > self.limit:
                return await self._too_large(send, size)
            chunks.append(piece)
            more = message.get("more_body", False)
        whole = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, send, size: int) -> None:
        payload = json.dumps(body(413, f"the request body is {size}+ bytes; the server takes at most {self.limit}",
                                  "request_too_large")).encode()  # fmt: skip
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})  # fmt: skip
        await send({"type": "http.response.body", "body": payload})


def add_guards(app: FastAPI, settings: ServeSettings) -> None:
    """The body limit on every request; CORS headers only for the configured origins, outside the limit
    (the middleware added last runs first), so that a page can read a 413 too."""
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
