"""The HTTP layer (Starlette): routes, the bearer token, JSON errors, OpenAI shapes.

Everything the app needs lives on the objects `create_app` is given; nothing is global.
Generation runs in worker threads (it is blocking torch code), so requests are served
concurrently, each with its own routing decision.

Without a token (served on loopback only) a web page the user visits must not reach the
service: the ``Host`` header must name the loopback or the bound host (DNS rebinding),
a POST must say ``Content-Type: application/json`` (a page cannot send that cross-origin
without a CORS preflight, which is never granted) and a write with an ``Origin`` must
come from the server's own.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import schema
from .prompts import chat_prompt
from .schema import BadRequest, Limits
from .service import Completion, EditService, Question, Unanswerable, Unavailable

PAGE_SIZE = 50
# the largest id SQLite stores (a larger one is no edit: 404, not an OverflowError)
MAX_ID = 2**63 - 1
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


class Api:
    """The route handlers of one service."""

    def __init__(
        self, service: EditService, model_name: str, token: str | None, limits: Limits
    ) -> None:
        self.service, self.model_name, self.token, self.limits = service, model_name, token, limits

    # ------------------------------------------------------------------ plumbing
    def _authorize(self, request: Request) -> None:
        """Write endpoints: ``Authorization: Bearer <token>`` when a token was set; else
        no foreign ``Origin`` (a page elsewhere writing through the user's browser)."""
        if self.token is None:
            origin = request.headers.get("origin")
            if origin is not None and not _same_origin(origin, request):
                raise BadRequest(
                    f"cross-origin write from {origin} refused (give the server a --token "
                    "to accept writes from elsewhere)",
                    "Origin",
                    403,
                )
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), self.token):
            raise BadRequest("missing or wrong bearer token", "Authorization", 401)

    async def _body(self, request: Request) -> Any:
        if self.token is None and not _is_json(request):
            raise BadRequest("Content-Type must be application/json", "Content-Type", 415)
        declared = request.headers.get("content-length")
        if _digits(declared) and (len(declared) > 12 or int(declared) > self.limits.max_body_bytes):
            raise BadRequest(f"body is over {self.limits.max_body_bytes} bytes", "body", 413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limits.max_body_bytes:
                raise BadRequest(f"body is over {self.limits.max_body_bytes} bytes", "body", 413)
        return schema.parse_json(body, self.limits)

    def _edit_id(self, request: Request) -> tuple[int, dict[str, Any]]:
        """The edit the path names: ASCII digits only (``"²".isdigit()`` is true, but
        no int), within SQLite's integer range."""
        raw = request.path_params["edit_id"]
        if not _digits(raw):
            raise BadRequest("edit id must be a positive integer", "id", 404)
        if len(raw) > 19 or int(raw) > MAX_ID:
            raise BadRequest(f"no edit with id {raw}", "id", 404)
        edit = self.service.log.get(int(raw))
        if edit is None:
            raise BadRequest(f"no edit with id {raw}", "id", 404)
        return int(raw), edit

    # ------------------------------------------------------------------ edits
    async def post_edits(self, request: Request) -> Response:
        self._authorize(request)
        records = schema.edits(await self._body(request), self.limits)
        ids = await run_in_threadpool(self.service.submit, records)
        return JSONResponse({"ids": ids, "status": "pending"}, status_code=202)

    async def get_edit(self, request: Request) -> Response:
        return JSONResponse(self._edit_id(request)[1])

    async def list_edits(self, request: Request) -> Response:
        after = _query_int(request, "after", 0, 0, MAX_ID)
        limit = _query_int(request, "limit", PAGE_SIZE, 1, 1000)
        items = self.service.log.page(after, limit)
        more = len(items) == limit
        return JSONResponse(
            {"data": items, "next_after": items[-1]["id"] if more else None, "has_more": more}
        )

    async def delete_edit(self, request: Request) -> Response:
        self._authorize(request)
        edit_id, edit = self._edit_id(request)
        if not self.service.editor.retractable:
            raise BadRequest(f"{self.service.editor.method} cannot retract edits", "id", 409)
        if edit["status"] in ("failed", "retracted") or edit["retract_requested"]:
            raise BadRequest(f"edit {edit_id} is {edit['status']}; nothing to retract", "id", 409)
        await run_in_threadpool(self.service.retract, edit_id)
        return JSONResponse(
            {"id": edit_id, "status": edit["status"], "retract_requested": True}, 202
        )

    # ------------------------------------------------------------------ OpenAI
    async def completions(self, request: Request) -> Response:
        body = schema.json_object(await self._body(request), "body")
        prompt = schema.completion_prompt(body, self.limits)
        return await self._answer(body, prompt, True, "text_completion")

    async def chat(self, request: Request) -> Response:
        body = schema.json_object(await self._body(request), "body")
        messages = schema.messages(body, self.limits)
        prompt, special = chat_prompt(self.service.editor.tokenizer, messages)
        return await self._answer(body, prompt, special, "chat.completion")

    async def _answer(
        self, body: dict[str, Any], prompt: str, special: bool, kind: str
    ) -> Response:
        ask = schema.sampling(body, self.limits, self.model_name)
        question = Question(
            prompt, ask.max_tokens, ask.temperature, tuple(ask.stop), ask.unedited, special
        )
        head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": ask.model,
        }
        if ask.stream:  # `stream` checks the question before the response starts
            pieces = await run_in_threadpool(self.service.stream, question)
            return StreamingResponse(_sse(pieces, head, kind), media_type="text/event-stream")
        done: Completion = await run_in_threadpool(self.service.complete, question)
        return JSONResponse({**head, "object": kind, **_choices(done, kind), "usage": _usage(done)})

    # ------------------------------------------------------------------ reports
    async def health(self, request: Request) -> Response:
        """200 "ok"; 503 naming the failure while edits cannot be made durable (a
        failing checkpoint, a full disk, the state folder gone)."""
        method = self.service.editor.method
        problem = self.service.problem()
        if problem is None:
            return JSONResponse({"status": "ok", "method": method})
        error = _error(problem.message, "server_error", None, 503)
        return JSONResponse({"status": "failing", "method": method, **error}, 503)

    async def metrics(self, request: Request) -> Response:
        return JSONResponse(self.service.metrics())

    async def models(self, request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": self.model_name, "object": "model"}]}
        )

    async def dashboard(self, request: Request) -> Response:
        page = resources.files("wise_edit.serve").joinpath("static/index.html").read_text()
        return HTMLResponse(page)


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not _digits(raw) or len(raw) > len(str(high)) or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}", name)
    return int(raw)


def _digits(raw: str | None) -> bool:
    """Whether ``raw`` is a decimal number in ASCII (`str.isdigit` takes ``²``)."""
    return raw is not None and raw.isascii() and raw.isdigit()


def _is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return media == "application/json"


def _same_origin(origin: str, request: Request) -> bool:
    """Whether ``Origin`` is this server as the request reached it (scheme and
    ``Host``, which `TrustedHostMiddleware` has already checked)."""
    parts = urlsplit(origin)
    host = request.headers.get("host", "")
    return parts.scheme == request.url.scheme and parts.netloc.lower() == host.lower()


def _choices(done: Completion, kind: str, text: str | None = None) -> dict[str, Any]:
    """One choice in the OpenAI shape, plus which edit memory answered."""
    content = done.text if text is None else text
    choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": content}
    else:
        choice.update(text=content, logprobs=None)
    choice["wise_memory"] = done.memory
    return {"choices": [choice]}


def _usage(done: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


async def _sse(pieces: Iterator[Any], head: dict[str, Any], kind: str) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: chunks, then ``data: [DONE]``."""
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    async for piece in iterate_in_threadpool(pieces):
        if isinstance(piece, Completion):
            choice: dict[str, Any] = {"index": 0, "finish_reason": piece.finish_reason}
            choice.update({"delta": {}} if kind == "chat.completion" else {"text": ""})
            choice["wise_memory"] = piece.memory
            yield _event({**head, "object": chunk_kind, "choices": [choice]})
            break
        delta: dict[str, Any] = (
            {"delta": {"role": "assistant", "content": piece}}
            if kind == "chat.completion"
            else {"text": piece}
        )
        yield _event({**head, "object": chunk_kind, "choices": [{"index": 0, **delta}]})
    yield "data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _error(message: str, kind: str, param: str | None, status: int) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


async def _bad_request(request: Request, err: Exception) -> Response:
    assert isinstance(err, BadRequest)
    kind = "authentication_error" if err.status == 401 else "invalid_request_error"
    return JSONResponse(_error(err.message, kind, err.param, err.status), err.status)


async def _unavailable(request: Request, err: Exception) -> Response:
    """507/503: the edit could not be made durable; nothing was accepted."""
    assert isinstance(err, Unavailable)
    return JSONResponse(_error(err.message, "server_error", None, err.status), err.status)


async def _unanswerable(request: Request, err: Exception) -> Response:
    assert isinstance(err, Unanswerable)
    return JSONResponse(_error(err.message, "invalid_request_error", err.param, 400), 400)


async def _http_error(request: Request, err: Exception) -> Response:
    """Unknown paths and methods answer JSON too."""
    assert isinstance(err, HTTPException)
    error = {"message": err.detail, "type": "invalid_request_error", "param": "path"}
    return JSONResponse({"error": {**error, "code": err.status_code}}, err.status_code)


def create_app(
    service: EditService,
    model_name: str,
    token: str | None = None,
    limits: Limits | None = None,
    host: str = "127.0.0.1",
) -> Starlette:
    """The ASGI app of ``service``, served on ``host``. Without a token only requests
    whose ``Host`` is the loopback or ``host`` are served (any port)."""
    api = Api(service, model_name, token, limits or Limits())
    routes = [
        Route("/", api.dashboard),
        Route("/health", api.health),
        Route("/metrics", api.metrics),
        Route("/v1/models", api.models),
        Route("/v1/edits", api.post_edits, methods=["POST"]),
        Route("/v1/edits", api.list_edits, methods=["GET"]),
        Route("/v1/edits/{edit_id}", api.get_edit, methods=["GET"]),
        Route("/v1/edits/{edit_id}", api.delete_edit, methods=["DELETE"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
    ]
    middleware = []
    if token is None:
        bound = f"[{host}]" if ":" in host else host
        hosts = sorted({*LOOPBACK_HOSTS, bound.lower()})
        middleware.append(
            Middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
        )
    handlers = {
        BadRequest: _bad_request,
        Unavailable: _unavailable,
        Unanswerable: _unanswerable,
        HTTPException: _http_error,
    }
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
