"""OpenAI's error JSON (``{"error": {"message", "type", "param", "code"}}``) with the HTTP status
that fits, for every failure a route meets: the server answers it and keeps serving."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from vlkit.errors import VlkitError

log = logging.getLogger("vlkit.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 422: "invalid_request_error", 500: "server_error"}


class ApiError(Exception):
    """A request the server refuses: ``status`` and the message a client sees, ``code`` (a short
    name such as ``model_not_found``) and ``param`` (the request field at fault) when known."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


def response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(body(status, message, code, param), status_code=status)


def _validation_message(err: RequestValidationError) -> tuple[str, str, str | None]:
    """The error code and message of a bad body (a 400, OpenAI's status for a bad parameter): each bad field
    named with what was expected, or that the body is not JSON."""
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return "invalid_json", f"the request body is not valid JSON ({detail})", None
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = param or (".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return "invalid_value", "invalid request: " + "; ".join(parts), param


def install(app: FastAPI) -> None:
    """Route every error through OpenAI's error JSON."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return response(err.status, err.message, err.code, err.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        code, message, param = _validation_message(err)
        return response(400, message, code, param)

    @app.exception_handler(VlkitError)
    async def vlkit_error(request: Request, err: VlkitError):
        return response(400, str(err), "invalid_value")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return response(err.status_code, str(err.detail), code)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return response(500, f"internal error ({type(err).__name__}); the server keeps serving", "internal_error")
