"""``dbrxq serve``: the OpenAI HTTP API over :class:`dbrxq.serve.engine.Engine`.

Endpoints: ``POST /v1/chat/completions`` (DBRX-instruct's ChatML template), ``POST
/v1/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (liveness without
the key, counters with it), ``GET /metrics`` (Prometheus text). Streaming answers are server-sent events
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
import collections
import json
import logging
import time
import uuid

from dbrxq.core.errors import DbrxqError
from dbrxq.runtime.generate import Penalties
from dbrxq.serve.engine import Engine, EngineStopped, Event, QueueFull, Request
from dbrxq.serve.schema import MAX_STOP_CHARS, APIError, error_body
from dbrxq.text.stops import StopMatcher
from dbrxq.text.tokenizer import StreamDecoder

log = logging.getLogger(__name__)

# How often a request waiting for tokens checks whether its client is still there (non-streaming;
# a streaming response learns of a disconnect from the server at once).
DISCONNECT_POLL_S = 0.5


class Metrics:
    """Counters for ``GET /metrics`` (Prometheus' text format): requests by status, and tokens served."""

    def __init__(self):
        self.requests: collections.Counter = collections.Counter()
        self.prompt_tokens = self.completion_tokens = 0

    def request(self, status: int) -> None:
        self.requests[status] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion

    def exposition(self, stats, running: int, waiting: int) -> str:
        lines = []

        def metric(name: str, kind: str, doc: str, samples) -> None:
            lines.extend([f"# HELP dbrxq_{name} {doc}", f"# TYPE dbrxq_{name} {kind}"])
            lines.extend(f"dbrxq_{name}{labels} {value}" for labels, value in samples)
        metric("requests_total", "counter", "HTTP requests answered, by status.",
               [(f'{{status="{code}"}}', n) for code, n in sorted(self.requests.items())] or [("", 0)])
        metric("prompt_tokens_total", "counter", "Prompt tokens of completed requests.", [("", self.prompt_tokens)])
        metric("completion_tokens_total", "counter", "Tokens generated for completed requests.",
               [("", self.completion_tokens)])
        metric("requests_running", "gauge", "Requests decoding now (KV cache slots in use).", [("", running)])
        metric("requests_waiting", "gauge", "Requests queued for a slot.", [("", waiting)])
        metric("decode_steps_total", "counter", "Decode steps run.", [("", stats.decode_steps)])
        metric("decode_tokens_total", "counter", "Tokens decoded (rows of decode steps).", [("", stats.decode_tokens)])
        metric("decode_seconds_total", "counter", "Seconds spent in decode steps.", [("", f"{stats.decode_s:.6f}")])
        metric("prefill_tokens_total", "counter", "Prompt tokens prefilled.", [("", stats.prefill_tokens)])
        steps = stats.decode_steps
        metric("decode_batch_size_mean", "gauge", "Mean requests per decode step.",
               [("", f"{stats.decode_tokens / steps:.4f}" if steps else "0")])
        metric("decode_step_seconds_mean", "gauge", "Mean seconds per decode step.",
               [("", f"{stats.decode_s / steps:.6f}" if steps else "0")])
        return "\n".join(lines) + "\n"


class Server:
    """The state behind the app: the engine, the tokenizer and what requests may ask for."""

    def __init__(self, engine: "Engine", tokenizer, *, model_name: str, stop_tokens, api_key: str | None = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.stop_tokens = frozenset(stop_tokens)
        self.api_key = api_key
        self.created = int(time.time())
        self.stopping = False  # set at SIGTERM/SIGINT
        self.metrics = Metrics()

    # ------------------------------------------------------------------ one request
    def _params(self, body, prompt: list[int]) -> dict:
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           "invalid_request_error", "model", "model_not_found")
        if body.n != 1:
            raise APIError(400, f"n={body.n}: this server returns one choice per request (n=1)", param="n")
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        for name, asks in (("logit_bias", bool(body.logit_bias)), ("tools", bool(body.tools)),
                           ("functions", bool(body.functions)),
                           ("tool_choice", body.tool_choice not in (None, "none", "auto")),
                           ("response_format", (body.response_format or {"type": "text"}).get("type") != "text"),
                           ("best_of", body.best_of not in (None, 1)), ("suffix", bool(body.suffix))):
            if asks:
                raise APIError(400, f"{name} is not supported by this server (it would be ignored, so it is refused)",
                               param=name)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(len(x) > MAX_STOP_CHARS for x in stops):
            raise APIError(400, f"stop: at most 4 sequences of at most {MAX_STOP_CHARS} characters", param="stop")
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        room = self.engine.context - len(prompt)
        max_tokens = limit if limit is not None else max(room, 1)
        kw = dict(max_tokens=max_tokens, temperature=body.temperature, top_p=None if body.top_p >= 1 else body.top_p,
                  seed=body.seed)
        penalties = Penalties(body.repetition_penalty, body.presence_penalty, body.frequency_penalty)
        try:
            self.engine.check(prompt, **kw)
            kw["ignore_eos"] = body.ignore_eos
            kw["penalties"] = penalties.check()
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
    def _served(self, request, prompt_tokens: int, completion_tokens: int) -> None:
        """A request completed: count its tokens (for /metrics and the access log line)."""
        self.metrics.tokens(prompt_tokens, completion_tokens)
        request.state.tokens = prompt_tokens + completion_tokens

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
            self._served(request, len(prompt), end[2])
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
                        self._served(request, len(prompt), item[2])
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
