"""The FastAPI application: settings, limits, auth, error bodies, and the routers that plug in.

Other routers (A1111 `/sdapi/v1`, OpenAI `/v1/images`, the web UI, training jobs) live in easel/serve/a1111.py,
openai_images.py, ui*.py and train.py; each exposes `router(app) -> APIRouter | None` and finds the job queue at
`app.state.queue` and the settings at `app.state.settings`. Submitting (`enqueue`, `wait_for`, `failure`) lives in
easel/serve/service.py, below every router, so that no router imports this module back.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import importlib
import logging
import re
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from easel import __version__
from easel.pipelines.request import GenerationRequest
from easel.serve.jobs import JobQueue, QueueFull
from easel.serve.metrics import CONTENT_TYPE, Metrics
from easel.serve.schema import COMMON_RESPONSES, LimitError
from easel.serve.service import admit, enqueue, failure, wait_for  # noqa: F401  (re-exported)
from easel.serve.settings import MEMORY_FRACTION, TOKEN_COOKIE, Settings  # noqa: F401  (Settings re-exported)
from easel.serve.trust import hide_paths

log = logging.getLogger("easel.serve")
PLUGIN_MODULES = ("a1111", "openai_images", "ui", "train")  # easel.serve.<name>, each optional


def create_app(settings: Settings | None = None, queue: JobQueue | None = None) -> FastAPI:
    """The server application; `queue` defaults to one built from the settings (tests pass their own)."""
    settings = settings or Settings()
    settings.max_memory_bytes = settings.max_memory_bytes or default_max_memory()
    queue = queue or JobQueue(max_queued=settings.max_queue, default_model=settings.model, dtype=settings.dtype,
                              devices=(settings.device,), keep_finished=settings.keep_finished)
    queue.metrics = queue.metrics or Metrics()
    # again in the worker, with the model's defaults
    queue.admit = lambda req, config, inspect=False: admit(req, settings, config, inspect)
    redact_access_log()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, queue.stop)

    app = FastAPI(title="easel", version=__version__, lifespan=lifespan, responses=COMMON_RESPONSES,
                  description="Stable Diffusion you can run, train and see inside: native API under /api/v1.")
    app.state.settings, app.state.queue, app.state.metrics = settings, queue, queue.metrics
    _install_error_handlers(app)
    from easel.serve import api
    app.include_router(api.router(app))
    app.add_api_route("/metrics", lambda: PlainTextResponse(queue.metrics.render(queue), media_type=CONTENT_TYPE),
                      methods=["GET"], tags=["server"], summary="Prometheus metrics", response_class=PlainTextResponse,
                      responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    register_routers(app)
    _install_middleware(app, settings)
    return app


def register_routers(app: FastAPI) -> list[str]:
    """Include the optional routers (easel.serve.a1111 / openai_images / ui) that exist; returns their names."""
    added = []
    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(f"easel.serve.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"easel.serve.{name}":
                continue  # not written (yet): the server runs without it
            raise
        r = module.router(app)
        if r is not None:
            app.include_router(r)
            added.append(name)
    return added


def default_max_memory() -> int:
    """MEMORY_FRACTION of the memory available now (cgroup limit or MemAvailable)."""
    from easel.pipelines.memory import available_memory_bytes
    return int(available_memory_bytes() * MEMORY_FRACTION)


class RedactSecrets(logging.Filter):
    """Replaces `token=...` in access-log lines with `token=[redacted]`: a browser's EventSource and <img> can
    only send the token in the URL, and access logs are read by more people than should hold it."""

    PATTERN = re.compile(r"((?:^|[?&;])(?:token|access_token)=)[^&\s\"]*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        return True

    @classmethod
    def redact(cls, text: str) -> str:
        """`text` with every token query parameter's value replaced."""
        return cls.PATTERN.sub(r"\1[redacted]", text)


def redact_access_log() -> None:
    """Install RedactSecrets on uvicorn's access logger (once)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactSecrets) for f in logger.filters):
        logger.addFilter(RedactSecrets())


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON {"error": message, ...} with the status that says whose fault it is."""
    async def limit(_, e: LimitError):
        return JSONResponse(e.to_dict(), status_code=e.http_status)

    async def bad_value(_, e: ValueError):
        return JSONResponse({"error": hide_paths(str(e))}, status_code=400)

    async def full(_, e: QueueFull):
        return JSONResponse({"error": str(e), "limit": "max_queue", "max": e.max_queued}, status_code=503,
                            headers={"Retry-After": str(e.retry_after)})

    async def invalid(_, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"error": "; ".join(parts), "detail": _jsonable(e.errors())}, status_code=422)

    async def http(_, e: HTTPException):
        body = e.detail if isinstance(e.detail, dict) else {"error": e.detail, "detail": e.detail}
        return JSONResponse(body, status_code=e.status_code, headers=getattr(e, "headers", None))

    app.add_exception_handler(LimitError, limit)
    app.add_exception_handler(ValueError, bad_value)
    app.add_exception_handler(QueueFull, full)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http)


def _jsonable(errors: list[dict]) -> list[dict]:
    """Pydantic's error list without the parts JSON cannot carry (exceptions in ctx, raw input)."""
    return [{"loc": list(err.get("loc", ())), "msg": err.get("msg"), "type": err.get("type")} for err in errors]


def _install_middleware(app: FastAPI, settings: Settings) -> None:
    """Body limit innermost, then auth, then CORS outermost (preflight requests carry no credentials)."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    creds = settings.credentials()
    if creds or settings.token:
        app.add_middleware(AuthMiddleware, credentials=creds, token=settings.token)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in settings.cors_origins)


class AuthMiddleware:
    """HTTP basic auth and/or a bearer token on every route (docs and metrics included)."""

    def __init__(self, app, credentials: list[tuple[str, str]], token: str | None):
        self.app, self.credentials, self.token = app, credentials, token

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        challenge = 'Basic realm="easel"' if self.credentials else 'Bearer realm="easel"'
        how = " or ".join(x for x in ("HTTP basic auth (--api-auth)" if self.credentials else "",
                                      "'Authorization: Bearer <token>' (--token)" if self.token else "") if x)
        response = JSONResponse({"error": f"authentication required: this server needs {how}"}, status_code=401,
                                headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)

    def _allowed(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, value = header.partition(" ")
        if self.token and scheme.lower() == "bearer":
            return secrets.compare_digest(value.strip().encode(), self.token.encode())
        query_token = _query_token(scope) if self.token else None
        if query_token is not None:  # a browser's EventSource and <img> cannot set headers
            return secrets.compare_digest(query_token.encode(), self.token.encode())
        cookie_token = _cookie_token(scope) if self.token else None
        if cookie_token is not None:  # set by POST /api/v1/session: keeps the token out of URLs (and logs)
            return secrets.compare_digest(cookie_token.encode(), self.token.encode())
        if self.credentials and scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            # Compare against every pair so the time taken does not tell which user exists.
            ok = [secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(), p.encode())
                  for u, p in self.credentials]
            return any(ok)
        return False


def _cookie_token(scope) -> str | None:
    """The token cookie's value, if the request carries one."""
    from http.cookies import CookieError, SimpleCookie
    header = dict(scope.get("headers") or []).get(b"cookie")
    if not header:
        return None
    try:
        morsel = SimpleCookie(header.decode("latin-1")).get(TOKEN_COOKIE)
    except CookieError:
        return None
    return morsel.value if morsel is not None else None


def _query_token(scope) -> str | None:
    from urllib.parse import parse_qs
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[0] if values else None


class BodyLimitMiddleware:
    """413 for request bodies over `max_bytes`: at once from Content-Length, else while reading."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse(self._body(int(length)), status_code=413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # An HTTPException passes FastAPI's body parsing untouched, so the client gets a 413, not a 400.
                raise HTTPException(413, detail=self._body(received, partial=True))
            return message

        await self.app(scope, limited_receive, send)

    def _body(self, size: int, partial: bool = False) -> dict:
        what = "the request body (bytes read so far)" if partial else "the request body (bytes)"
        return LimitError("max_body_bytes", size, self.max_bytes, what).to_dict()
