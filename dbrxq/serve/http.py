"""The HTTP side of ``dbrxq serve``: the FastAPI app (routes, the auth and request-size guard), the
port check, and uvicorn with graceful shutdown.
"""


import asyncio
import hmac
import signal
import socket
from contextlib import asynccontextmanager

from dbrxq.core.errors import ConfigError, DbrxqError
from dbrxq.serve.schema import (
    ERROR_TYPES,
    MAX_BODY,
    APIError,
    error_body,
    request_models,
)
from dbrxq.serve.server import Server


class Guard:
    """ASGI middleware in front of every HTTP request: ``Authorization: Bearer KEY`` when a key is
    set (401 otherwise), and a body of at most MAX_BODY bytes (413), whether or not it declares its
    length. Plain ASGI rather than Starlette's BaseHTTPMiddleware, which wraps streaming responses
    in an extra task and turns a cancelled stream into an error."""

    def __init__(self, app, key: str | None):
        self.app, self.want = app, None if key is None else f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse
        headers = dict(scope["headers"])
        if self.want is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.want):
            body = error_body("missing or wrong API key (Authorization: Bearer KEY)", "invalid_request_error",
                              None, "invalid_api_key")
            return await JSONResponse(body, 401)(scope, receive, send)
        too_big = JSONResponse(error_body(f"request body over {MAX_BODY} bytes", "invalid_request_error"), 413)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:
                raise APIError(413, f"request body over {MAX_BODY} bytes")
            return message
        await self.app(scope, limited, send)


def create_app(server: Server):
    """The FastAPI application for ``server``."""
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    ChatRequest, CompletionRequest = request_models()

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(server.engine.wait_ready)
        yield
        await asyncio.to_thread(server.engine.shutdown, 30.0)

    app = FastAPI(title="dbrxq", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        msg = f"{request.method} {request.url.path}: no such endpoint" if e.status_code == 404 else str(e.detail)
        return JSONResponse(error_body(msg, ERROR_TYPES.get(e.status_code, "invalid_request_error")), e.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        return JSONResponse(error_body(f"{where}: {err.get('msg')}", "invalid_request_error", where or None), 400)

    app.add_middleware(Guard, key=server.api_key)

    @app.get("/health")
    async def health():
        """Liveness plus the engine's counters (what scripts/bench_serve.py reads)."""
        running, waiting = server.engine.load()
        st = server.engine.stats
        return {"status": "ok", "running": running, "waiting": waiting,
                "stats": {"prefill_tokens": st.prefill_tokens, "decode_steps": st.decode_steps,
                          "decode_tokens": st.decode_tokens, "decode_s": st.decode_s,
                          "expert_reads": st.expert_reads, "expert_bytes": st.expert_bytes,
                          "weight_bytes": st.weight_bytes,
                          "largest_batch": max(st.batch_hist, default=0)}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "dbrxq"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest, body: ChatRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = await asyncio.to_thread(server.tokenizer.apply_chat_template, messages, add_generation_prompt=True)
        except DbrxqError as e:
            raise APIError(400, str(e), param="messages")
        return await server.respond(request, body, prompt, "chat.completion")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest, body: CompletionRequest):
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"prompt: one prompt per request, got {len(p)}", param="prompt")
            p = p[0]
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompt = await asyncio.to_thread(server.tokenizer.encode, p) if isinstance(p, str) else list(p)
        return await server.respond(request, body, prompt, "text_completion")

    return app


def check_port(host: str, port: int) -> None:
    """Refuse (ConfigError, one line) a host/port this process cannot listen on, before loading."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"--host {host}: cannot resolve it ({e.strerror or e})")
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})")


def serve(server: Server, *, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 10.0,
          log_level: str = "info") -> None:
    """Run until SIGTERM/SIGINT: then stop accepting, let in-flight requests finish for up to
    ``shutdown_timeout`` seconds, cancel the rest, stop the engine, return."""
    import uvicorn

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: stop accepting, then drain the engine
            if not self.should_exit:
                server.engine.drain(shutdown_timeout)
            super().handle_exit(sig, frame)

    # The engine cancels what is still running after shutdown_timeout, so streams end with a last
    # event and [DONE]; uvicorn's own limit is only a backstop.
    config = uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + 10, access_log=log_level == "debug")
    # uvicorn shuts down on SIGTERM, then raises the signal again for the handler it found; ours
    # just notes it, so a requested shutdown that completed exits with status 0.
    stopped = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    try:
        Uvicorn(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
