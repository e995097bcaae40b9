"""``dbrxq serve``: the OpenAI HTTP API over :class:`dbrxq.engine.Engine`.

Endpoints: ``POST /v1/chat/completions`` (DBRX-instruct's ChatML template), ``POST
/v1/completions``, ``GET /v1/models``, ``GET /health``. Streaming answers are server-sent events
ending with ``data: [DONE]``. Errors have OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``: 400 for a bad request (including a prompt beyond the context), 401 for a missing or
wrong API key, 404 for an unknown path or model, 503 when the queue is full or the server is
stopping.

The HTTP side is FastAPI (request validation with pydantic, routing) on uvicorn (the event loop,
HTTP/1.1, server-sent events, graceful shutdown on SIGTERM/SIGINT). The event loop never runs the
model: a request is handed to the engine's worker thread, and its tokens come back through an
asyncio queue (``call_soon_threadsafe``). Text-level stop sequences are matched here, on the
detokenized stream: text that could be the start of a stop sequence is held back until it is
decided, and a match cancels the request in the engine, which frees its slot before the next step.
A client that disconnects (streaming or not) cancels its request the same way.

Sampling defaults are OpenAI's: temperature 1, top_p 1, max_tokens up to the context.
"""


import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from .engine import Engine, EngineStopped, Event, QueueFull, Request
from .errors import DbrxqError

log = logging.getLogger(__name__)

# How often a request waiting for tokens checks whether its client is still there (non-streaming;
# a streaming response learns of a disconnect from the server at once).
DISCONNECT_POLL_S = 0.5


def _models():
    """pydantic request models (imported lazily: `dbrxq run` never needs the HTTP stack)."""
    from pydantic import BaseModel, ConfigDict, Field

    class TextPart(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "user", "assistant"]
        content: str | list[TextPart]

        def text(self) -> str:
            return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Common(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0, le=100)
        top_p: float = Field(1.0, gt=0, le=1)
        seed: int | None = Field(None, ge=0, le=2**64 - 1)
        stop: str | list[str] | None = None
        n: int = 1
        stream: bool = False
        stream_options: StreamOptions | None = None
        logprobs: Any = None
        ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past end-of-text

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)

    class CompletionRequest(Common):
        prompt: str | list[str] | list[int] | list[list[int]]
        echo: bool = False

    return ChatRequest, CompletionRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 503: "server_error"}


class StopMatcher:
    """Finds the first of ``stops`` in a growing text; ``push`` returns (text safe to emit, matched)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        keep = 0  # the longest tail of buf that starts some stop sequence
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:k]):
                    keep = k
                    break
        out = self.buf[:len(self.buf) - keep]
        self.buf = self.buf[len(self.buf) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Server:
    """The state behind the app: the engine, the tokenizer and what requests may ask for."""

    def __init__(self, engine: "Engine", tokenizer, *, model_name: str, stop_tokens, api_key: str | None = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.stop_tokens = frozenset(stop_tokens)
        self.api_key = api_key
        self.created = int(time.time())

    # ------------------------------------------------------------------ one request
    def _params(self, body, prompt: list[int]) -> dict:
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           "invalid_request_error", "model", "model_not_found")
        if body.n != 1:
            raise APIError(400, f"n={body.n}: this server returns one choice per request (n=1)", param="n")
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(len(x) > MAX_STOP_CHARS for x in stops):
            raise APIError(400, f"stop: at most 4 sequences of at most {MAX_STOP_CHARS} characters", param="stop")
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        room = self.engine.context - len(prompt)
        max_tokens = limit if limit is not None else max(room, 1)
        kw = dict(max_tokens=max_tokens, temperature=body.temperature, top_p=None if body.top_p >= 1 else body.top_p,
                  seed=body.seed)
        try:
            self.engine.check(prompt, **kw)
            kw["ignore_eos"] = body.ignore_eos
        except DbrxqError as e:
            param = "max_tokens" if "max_tokens" in str(e) else "messages" if hasattr(body, "messages") else "prompt"
            raise APIError(400, str(e), param=param, code="context_length_exceeded" if "context" in str(e) else None)
        return {**kw, "stops": stops}

    async def run(self, prompt: list[int], params: dict, disconnected):
        """Yields ("text", str) pieces, then ("end", finish_reason, completion_tokens)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        stops = params.pop("stops")
        req = Request(prompt=prompt, emit=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), **params)
        try:
            self.engine.submit(req)
        except (QueueFull, EngineStopped) as e:
            raise APIError(503, str(e), "server_error", code="overloaded")
        except DbrxqError as e:
            raise APIError(400, str(e))
        from .tokenizer import StreamDecoder
        dec, matcher, n = StreamDecoder(self.tokenizer), StopMatcher(stops), 0
        finish = None
        try:
            while finish is None:
                try:
                    ev = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await disconnected():
                        log.info("request %d: client went away", req.id)
                        return
                    continue
                if ev.token is not None:
                    n += 1
                    if ev.token in self.stop_tokens:
                        continue
                    text, hit = matcher.push(dec.push(ev.token))
                    if text:
                        yield ("text", text)
                    if hit:
                        finish = "stop"
                elif ev.finish == "error":
                    raise APIError(500, f"generation failed: {ev.error}", "server_error")
                elif ev.finish == "cancelled":
                    raise APIError(503, "the request was cancelled (the server is stopping)", "server_error")
                else:
                    text, hit = matcher.push(dec.flush())
                    text += "" if hit else matcher.flush()
                    if text:
                        yield ("text", text)
                    finish = ev.finish
            yield ("end", finish, n)
        finally:
            if req.finish is None:
                self.engine.cancel(req)  # stop sequence, disconnect, or an error here: free the slot now

    # ------------------------------------------------------------------ responses
    async def respond(self, request, body, prompt: list[int], kind: str):
        """kind: "chat.completion" or "text_completion"."""
        from fastapi.responses import JSONResponse, StreamingResponse
        params = self._params(body, prompt)
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        usage = lambda n: {"prompt_tokens": len(prompt), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(prompt) + n}
        chat = kind == "chat.completion"
        gen = self.run(prompt, params, request.is_disconnected)
        if not body.stream:
            parts, end = [], None
            async for item in gen:
                if item[0] == "text":
                    parts.append(item[1])
                else:
                    end = item
            if end is None:  # the client went away; nobody reads this
                return JSONResponse(error_body("client closed the request", "invalid_request_error"), 499)
            text = "".join(parts)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": end[1]} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": end[1]})
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": self.model_name,
                                 "choices": [choice], "usage": usage(end[2])})

        first = await _first(gen)  # errors before the first token are still HTTP errors
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                d = ({"role": "assistant", "content": ""} if role else {} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return _sse({"id": rid, "object": obj, "created": created, "model": self.model_name,
                         "choices": [choice]})

        async def events():
            try:
                if chat:
                    yield chunk(None, None, role=True)
                async for item in _chain(first, gen):
                    if item[0] == "text":
                        yield chunk(item[1], None)
                    else:
                        yield chunk(None, item[1])
                        if include_usage:
                            yield _sse({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                        "choices": [], "usage": usage(item[2])})
            except APIError as e:
                yield _sse(error_body(e.message, e.type, e.param, e.code))
            finally:
                await gen.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _first(gen):
    """The first item of ``gen`` (None when it is empty), raising its errors here."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first, gen):
    if first is not None:
        yield first
    async for item in gen:
        yield item


MAX_BODY = 4 << 20
MAX_STOP_CHARS = 256  # each stop sequence; matching costs O(its length) per generated token  # bytes of a request body; a whole context of text is far less


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
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    ChatRequest, CompletionRequest = _models()

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
        return JSONResponse(error_body(msg, _TYPES.get(e.status_code, "invalid_request_error")), e.status_code)

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
    import socket

    from .errors import ConfigError
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
    import signal

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
