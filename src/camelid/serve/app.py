"""The FastAPI app: OpenAI's completion and chat routes, models, health, metrics, tokenize.

    app = create_app(engine, model_name="llama-125m", api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

The worker (the continuous-batching scheduler, :mod:`camelid.infer.scheduler`) starts with
the app and, when the app shuts down, finishes the requests still running before it stops: a
SIGTERM to ``camelid serve`` drains. With an API key, every route but ``/health`` needs
``Authorization: Bearer KEY`` (compared in constant time). Every failure, including an unknown
route and a bug, is answered in OpenAI's error shape; a traceback goes to the log only.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from camelid.errors import CamelidError
from camelid.infer import Engine
from camelid.serve import schemas
from camelid.serve.backend import Backend, make_worker
from camelid.serve.errors import APIError, error_body, error_bytes
from camelid.serve.metrics import CONTENT_TYPE, ServerMetrics
from camelid.serve.routes import (
    Limits,
    ServeState,
    chat,
    chat_messages,
    completions,
    parse,
    read_body,
)
from camelid.tokenizer.chat import chat_prompt_ids

log = logging.getLogger("camelid.serve")

# Open without the key: the health check, and the chat page (static; its API calls carry the
# key the user types into it).
OPEN_ROUTES = frozenset({"/health", "/"})
PAGE = Path(__file__).parent / "static" / "index.html"
ROUTES = (
    "/",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/tokenize",
    "/detokenize",
)


class TokenizeRequest(schemas._Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[schemas.Message] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(schemas._Body):
    model: str | None = None
    tokens: list[int]


DIGEST_HEADER = "X-Camelid-Weights-Digest"


class _Guard:
    """Pure ASGI middleware: the API key, requests counted by route and status, and the
    weights digest (when known) as a header on every response, errors included."""

    def __init__(
        self, app, api_key: str | None, metrics: ServerMetrics, digest: str | None
    ) -> None:
        self.app, self.metrics = app, metrics
        self.key = None if api_key is None else f"Bearer {api_key}".encode()
        self.digest = None if digest is None else (DIGEST_HEADER.lower().encode(), digest.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES or path.startswith("/v1/models/") else "other"
        route = "/v1/models" if route.startswith("/v1/models/") else route
        status = {"code": 500}

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if self.digest is not None:
                    message = {**message, "headers": [*message.get("headers", ()), self.digest]}
            await send(message)

        try:
            if self.key is not None and path not in OPEN_ROUTES and not self._authorised(scope):
                await _send_error(counted, "missing or wrong API key (Authorization: Bearer KEY)",
                                  401, code="invalid_api_key")  # fmt: skip
                return
            await self.app(scope, receive, counted)
        finally:
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()

    def _authorised(self, scope) -> bool:
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
        return hmac.compare_digest(given, self.key)


async def _send_error(send, message: str, status: int, code: str | None = None) -> None:
    body = error_bytes(message, status, code=code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def generation_stop_ids(directory: str | Path) -> tuple[int, ...]:
    """The ``eos_token_id`` (an id or a list of them) of a model directory's
    generation_config.json: Llama 3 Instruct ends a turn with ``<|eot_id|>`` while its
    tokenizer's ``eos_token`` says ``<|end_of_text|>``; a server must stop at both."""
    file = Path(directory) / "generation_config.json"
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CamelidError(f"{file}: cannot read it ({e})") from None
    value = data.get("eos_token_id") if isinstance(data, dict) else None
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        raise CamelidError(f"{file}: eos_token_id must be a token id or a list of them")
    return tuple(ids)


def create_app(
    engine: Engine,
    *,
    model_name: str,
    api_key: str | None = None,
    worker: Any = None,
    max_batch: int = 16,
    max_queue: int = 256,
    limits: Limits | None = None,
    extra_stop_ids: Sequence[int] = (),
    digest: str | None = None,
    drain_timeout: float | None = 30.0,
    scheduler: dict[str, Any] | None = None,
) -> FastAPI:
    """The server for one engine. ``worker`` defaults to :func:`make_worker` (the
    continuous-batching scheduler, with ``scheduler``'s other settings: ``prefill_chunk``,
    ``prefix_cache_bytes``, ``batch_invariant``); ``extra_stop_ids`` end every request (the
    model's generation_config.json ``eos_token_id``); ``digest``, the weights digest of the
    model as stored (:func:`camelid.weights.digest.source_digest`: the engine's weights may
    have been upcast on loading, so the app does not compute it), is reported by
    ``/v1/models``, in every response's ``system_fingerprint`` and in the
    ``X-Camelid-Weights-Digest`` header; without it they are null and absent. ``/v1/models``
    always reports the tokenizer's digest."""
    worker = worker if worker is not None else make_worker(
        engine, max_batch=max_batch, max_queue=max_queue, **(scheduler or {})
    )  # fmt: skip
    metrics = ServerMetrics(worker)
    state = ServeState(
        engine=engine,
        backend=Backend(worker),
        metrics=metrics,
        model_name=model_name,
        limits=limits or Limits(),
        extra_stop_ids=tuple(extra_stop_ids),
        digest=digest,
    )
    tokenizer_digest = engine.tokenizer.digest  # computed once, now

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop(drain=True, timeout=drain_timeout)

    app = FastAPI(title="camelid", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(CamelidError)
    async def camelid_error(request: Request, e: CamelidError) -> Response:
        return JSONResponse(error_body(str(e), 400), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: "method not allowed"}.get(
            e.status_code, str(e.detail)
        )
        return JSONResponse(error_body(message, e.status_code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> Response:
        log.error("internal error on %s", request.url.path, exc_info=e)
        return JSONResponse(error_body("internal server error", 500), status_code=500)

    @app.post("/v1/completions")
    async def _completions(request: Request) -> Response:
        return await completions(state, request)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Response:
        return await chat(state, request)

    def card() -> dict[str, Any]:
        out = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "camelid",
            "max_model_len": engine.max_seq_len,
        }
        out["digest"] = digest
        out["tokenizer_digest"] = tokenizer_digest
        return out

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise APIError(f"model {name!r} does not exist", param="model", status=404,
                           code="model_not_found")  # fmt: skip
        return card()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/")
    async def page() -> Response:
        """The web chat: one static page that streams from /v1/chat/completions."""
        return Response(PAGE.read_bytes(), media_type="text/html; charset=utf-8")

    @app.get("/metrics")
    async def _metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(f"model {name!r} does not exist", param="model", status=404,
                           code="model_not_found")  # fmt: skip

    async def body_of(request: Request, kind: type[BaseModel]) -> Any:
        return parse(kind, await read_body(request, state.limits.max_body_bytes))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req: TokenizeRequest = await body_of(request, TokenizeRequest)
        check_model(req.model)
        tok = engine.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise APIError("give prompt or messages (one of them)", param="prompt")
        if req.prompt is not None:
            ids = tok.encode(req.prompt, bos=req.add_special_tokens)
        else:
            chat_req = schemas.ChatCompletionRequest.model_construct(messages=req.messages)
            messages = chat_messages(chat_req)
            try:
                ids = chat_prompt_ids(tok, messages)
            except CamelidError as e:
                raise APIError(str(e), param="messages") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req: DetokenizeRequest = await body_of(request, DetokenizeRequest)
        check_model(req.model)
        vocab = engine.tokenizer.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(f"token id {bad} is outside the vocabulary (0 .. {vocab - 1})",
                           param="tokens")  # fmt: skip
        return {"prompt": engine.tokenizer.decode(req.tokens)}

    app.add_middleware(_Guard, api_key=api_key, metrics=metrics, digest=digest)
    return app
