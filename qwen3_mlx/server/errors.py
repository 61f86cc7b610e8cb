"""The server's refusals: whatever raised them, they are answered in the error shape of the API the route
speaks (OpenAI's `ApiError.body()`; Anthropic's on /v1/messages), and none carries a stack trace."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .anthropic import anthropic_error_body
from .protocol import ApiError


def error_response(e: ApiError, request: HttpRequest | None = None) -> JSONResponse:
    if request is not None and request.url.path.startswith("/v1/messages"):
        return JSONResponse(anthropic_error_body(e), status_code=e.status)
    return JSONResponse(e.body(), status_code=e.status)


async def _api_error(request, e: ApiError):
    return error_response(e, request)


async def _validation_error(request, e: RequestValidationError):
    why = e.errors()[0].get("msg", "bad input") if e.errors() else "bad input"
    return error_response(ApiError(400, f"invalid request: {why}"), request)


async def _http_error(request, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(ApiError(e.status_code, str(e.detail), type=kind), request)


async def _internal_error(request, e: Exception):
    return error_response(ApiError(500, "internal server error", type="server_error"), request)


def install_guards(app: FastAPI, *, api_key: str | None, max_body_bytes: int) -> None:
    """Refuse an announced oversized body before reading it and a missing API key on /v1/, and answer every
    error, down to an unexpected exception, in the shape of the route's API."""

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            too_big = f"request body of {length} bytes exceeds the limit of {max_body_bytes}"
            return error_response(ApiError(413, too_big), request)
        # Bearer (OpenAI's clients) or x-api-key (Anthropic's).
        if (api_key is not None and request.url.path.startswith("/v1/")
                and request.headers.get("authorization") != f"Bearer {api_key}"
                and request.headers.get("x-api-key") != api_key):
            why = "missing or invalid API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')"
            return error_response(ApiError(401, why, type="authentication_error", code="invalid_api_key"), request)
        return await call_next(request)

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
