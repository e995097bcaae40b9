"""The HTTP side of ``dbrxq serve``: the FastAPI app (routes, the auth and request-size guard), the
port check, and uvicorn with graceful shutdown.
"""


import asyncio
import hmac
import logging
import signal
import socket
import time
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

access = logging.getLogger("dbrxq.serve.access")  # one line per request: method, path, status, tokens, ms
RETRY_AFTER_S = "1"  # what a 503 (queue full, stopping) tells a client to wait before trying again


class Guard:
    """ASGI middleware in front of every HTTP request: ``Authorization: Bearer KEY`` when a key is
    set (401 otherwise), and a body of at most MAX_BODY bytes (413), whether or not it declares its
    length, that arrives within ``body_timeout`` seconds (408; a client that declares a body and
    never sends it holds nothing longer), and is abandoned (503) when the server starts stopping.
    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which wraps streaming responses in an
    extra task and turns a cancelled stream into an error."""

    POLL_S = 0.25  # how often a body read looks at the clock and at server.stopping
    # The body is read here, whole, before the app sees the request: an error raised while FastAPI
    # itself reads a body becomes its generic 400 "error parsing the body".

    def __init__(self, app, server: Server, body_timeout: float):
        self.app, self.server, self.body_timeout = app, server, body_timeout
        key = server.api_key
        self.want = None if key is None else f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]
        state = scope.setdefault("state", {})

        async def sent(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self._handle(scope, receive, sent, state)
        finally:
            self.server.metrics.request(status[0] or 499)
            path = str(scope.get("path", ""))[:200].encode("unicode_escape").decode("ascii")  # one line, always
            access.info("%s %s %d %d tokens %.0f ms", scope.get("method"), path, status[0] or 499,
                        state.get("tokens", 0), 1e3 * (time.perf_counter() - t0))

    async def _handle(self, scope, receive, send, state):
        headers = dict(scope["headers"])
        state["authorized"] = self.want is None or hmac.compare_digest(headers.get(b"authorization", b""), self.want)
        open_path = scope.get("method") == "GET" and scope.get("path") == "/health"  # liveness, for probes
        if not state["authorized"] and not open_path:
            return await self._refuse(401, "missing or wrong API key (Authorization: Bearer KEY)", scope, receive,
                                      send, "invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY:
            return await self._refuse(413, f"request body over {MAX_BODY} bytes", scope, receive, send)
        try:
            body = await self._read_body(receive)
        except APIError as e:
            return await self._refuse(e.status, e.message, scope, receive, send, e.code, close=True)
        if body is None:  # the client went away before its body was in: nobody to answer
            return
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed():  # the body, then the wait for a disconnect (which has no limit)
            return replay.pop() if replay else await receive()
        await self.app(scope, replayed, send)

    async def _refuse(self, status: int, message: str, scope, receive, send, code: str | None = None,
                      close: bool = False):
        """An error answer from the guard; ``close``: end the connection after it (a body that is
        late, partly read or abandoned leaves nothing to keep the connection alive for)."""
        from fastapi.responses import JSONResponse
        body = error_body(message, ERROR_TYPES.get(status, "invalid_request_error"), None, code)
        headers = {**({"Connection": "close"} if close else {}),
                   **({"Retry-After": RETRY_AFTER_S} if status == 503 else {})}
        await JSONResponse(body, status, headers=headers)(scope, receive, send)

    async def _read_body(self, receive) -> bytes | None:
        """The whole request body (at most MAX_BODY bytes, within body_timeout seconds, abandoned
        when the server starts stopping); None when the client disconnected first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        parts, seen = [], 0
        while True:
            task = asyncio.ensure_future(receive())
            try:
                while not task.done():
                    await asyncio.wait({task}, timeout=self.POLL_S)
                    if task.done():
                        break
                    if self.server.stopping:
                        raise APIError(503, "the server is stopping", "server_error", code="overloaded")
                    if loop.time() >= deadline:
                        raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s "
                                            f"(--body-timeout)", code="timeout")
            finally:
                if not task.done():
                    task.cancel()
            message = task.result()
            if message["type"] == "http.disconnect":
                return None
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > MAX_BODY:
                raise APIError(413, f"request body over {MAX_BODY} bytes")
            if not message.get("more_body", False):
                return b"".join(parts)


def create_app(server: Server, body_timeout: float = 30.0):
    """The FastAPI application for ``server``; ``body_timeout``: seconds a request body may take to arrive."""
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
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), e.status,
                            headers={"Retry-After": RETRY_AFTER_S} if e.status == 503 else None)

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

    app.add_middleware(Guard, server=server, body_timeout=body_timeout)

    @app.get("/health")
    async def health(request: HTTPRequest):
        """Liveness; with the API key (or without one set) also the engine's counters (what
        scripts/bench_serve.py reads)."""
        if not request.state.authorized:
            return {"status": "ok"}
        running, waiting = server.engine.load()
        st = server.engine.stats
        return {"status": "ok", "running": running, "waiting": waiting,
                "stats": {"prefill_tokens": st.prefill_tokens, "decode_steps": st.decode_steps,
                          "decode_tokens": st.decode_tokens, "decode_s": st.decode_s,
                          "expert_reads": st.expert_reads, "expert_bytes": st.expert_bytes,
                          "weight_bytes": st.weight_bytes,
                          "largest_batch": max(st.batch_hist, default=0)}}

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "dbrxq"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != server.model_name:
            raise APIError(404, f"model {model_id!r:.80} does not exist; this server serves {server.model_name!r}",
                           "invalid_request_error", "model", "model_not_found")
        return model_card()

    @app.get("/metrics")
    async def metrics():
        """Prometheus text exposition: requests by status, tokens, queue depth, batch size, step time."""
        from fastapi.responses import PlainTextResponse
        running, waiting = server.engine.load()
        return PlainTextResponse(server.metrics.exposition(server.engine.stats, running, waiting),
                                 media_type="text/plain; version=0.0.4")

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
        try:
            prompt = await asyncio.to_thread(server.tokenizer.encode, p) if isinstance(p, str) else list(p)
        except DbrxqError as e:  # e.g. a split pattern that gives up on this text
            raise APIError(400, str(e), param="prompt")
        return await server.respond(request, body, prompt, "text_completion")

    return app


def check_serve_names(api_key: str | None, model_name: str | None) -> None:
    """Refuse (ConfigError, one line) an API key or model id a client could not send back exactly: an
    empty key (which "Authorization: Bearer " would match), whitespace or control characters in
    either, or more than 256 characters of model id."""
    if api_key is not None and (not api_key or any(c.isspace() or not c.isprintable() for c in api_key)):
        raise ConfigError("--api-key: empty, or with spaces or control characters; give a key of printable "
                          "characters (or none, to serve without one)")
    if model_name is not None and (not model_name or len(model_name) > 256
                                   or any(c.isspace() or not c.isprintable() for c in model_name)):
        raise ConfigError(f"--model-name {model_name!r:.60}: give 1 to 256 printable characters without spaces")


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
          body_timeout: float = 30.0, log_level: str = "info") -> None:
    """Run until SIGTERM/SIGINT: then stop accepting, let in-flight requests finish for up to
    ``shutdown_timeout`` seconds, cancel the rest, stop the engine, return."""
    import uvicorn

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: stop accepting, then drain the engine
            if not self.should_exit:
                server.stopping = True  # request bodies still arriving are abandoned (503)
                server.engine.drain(shutdown_timeout)
            super().handle_exit(sig, frame)

    # The engine cancels what is still running after shutdown_timeout, so streams end with a last
    # event and [DONE]; uvicorn's own limit is only a backstop.
    config = uvicorn.Config(create_app(server, body_timeout), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + 10, access_log=False)
    if not access.handlers:  # our access line (with tokens and milliseconds) replaces uvicorn's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        access.addHandler(handler)
        access.propagate = False
    access.setLevel(logging.INFO if log_level in ("info", "debug") else logging.WARNING)
    # uvicorn shuts down on SIGTERM and SIGINT (Ctrl-C), then raises the signal again for the handler
    # it found; ours just notes it, so a requested shutdown that completed exits with status 0.
    stopped: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stopped.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        Uvicorn(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
