"""Continuous batching: several requests decoding together on one model, on one worker thread.

What a step is. The worker loop admits queued requests into free slots of a preallocated KV
cache (:class:`~dbrxq.model.kv_cache.SlotPool`, ``max_batch`` slots of ``context`` positions), runs ONE
prefill chunk of one newly admitted request (its own pass, ``prefill_chunk`` tokens, so a long
prompt does not stall the others for more than a chunk), then ONE decode step for every request
that is decoding: a forward of B rows, one token each, at each row's own position. Requests join
and leave between steps.

Why batching pays for a mixture of experts. In the decode step the MoE layer groups the B tokens
by expert (dbrxq.model.moe.moe_dispatch), so each routed expert's weights are read once for all the
tokens routed to it (with offloading: loaded once). B tokens route to at most min(16, 4B)
distinct experts per layer, so the bytes per generated token fall as B grows.

A request's tokens do not depend on what else is in the batch. Each row attends over its own
slot only (dbrxq.model.dbrx.DbrxAttention._per_row), and the decode step runs under
:func:`dbrxq.model.batch.batch_invariant` (default): weights whose kernel is row-independent (dbrxq's C
kernels, i.e. quantized layers on CPU) serve the whole batch in one pass; any other weight (float
layers: the router, a float head, float attention or experts) is applied one row at a time,
exactly the call a request alone makes. Greedy outputs, and seeded samples, are therefore
identical to the same request run alone (tests/dbrxq/test_serve.py checks the logits bit for bit).
``batch_invariant=False`` batches float layers too (faster for float models; rows may then differ
from a lone run in the last bits).

Threads. Everything that touches the model runs on the worker thread; :meth:`Engine.submit` and
:meth:`Engine.cancel` may be called from any thread (an HTTP server's event loop). A request's
events (each token, then its end) go to its ``emit`` callback on the worker thread, which must
not block (the server hands them to its event loop).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dbrxq.core.errors import DbrxqError, GenerationError
from dbrxq.model.batch import batch_invariant, row_independent
from dbrxq.model.kv_cache import SlotPool, make_kv_cache
from dbrxq.runtime.generate import NO_PENALTIES, Penalties, check_sampling, sample

log = logging.getLogger(__name__)


class QueueFull(DbrxqError):
    """More requests than ``max_batch`` running plus ``max_queue`` waiting (HTTP 503)."""


class EngineStopped(DbrxqError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class Event:
    token: int | None = None  # a new token, or None for the end
    finish: str | None = None  # "stop" (a stop token), "length", "cancelled", "error"
    error: str | None = None


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool = False  # run to max_tokens through stop tokens (benchmarks; vLLM's extension)
    penalties: Penalties = NO_PENALTIES
    id: int = field(default_factory=itertools.count().__next__)
    # state, owned by the worker thread
    tokens: list[int] = field(default_factory=list)
    slot: int | None = None
    prefilled: int = 0
    finish: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0  # rows of decode steps (one token each)
    decode_s: float = 0.0
    expert_reads: int = 0  # distinct (layer, expert) pairs the decode steps routed to, summed over steps
    expert_bytes: int = 0  # expert_reads x bytes of one expert
    weight_bytes: int = 0  # every weight byte the decode steps read (experts + the rest; see Engine._step_bytes)
    batch_hist: collections.Counter = field(default_factory=collections.Counter)


def expert_nbytes(model) -> int:
    """Bytes of one expert's weights as stored (all experts of a layer are the same size)."""
    ex = model.transformer.blocks[0].ffn.experts
    inner = getattr(ex, "inner", ex)  # offloaded: the QExperts it wraps
    total = sum(t.numel() * t.element_size() for t in list(inner.parameters()) + list(inner.buffers())
                if not t.is_meta)
    return total // inner.num_experts


def other_weights(model) -> list[tuple[int, bool]]:
    """(bytes, row-independent) of each weight matrix a decode step reads outside the experts: the
    attention projections, routers and the output head (the embedding only gathers rows; norms are
    vectors)."""
    out = []
    for b in model.transformer.blocks:
        for m in (b.norm_attn_norm.attn.Wqkv, b.norm_attn_norm.attn.out_proj, b.ffn.router.layer):
            out.append((module_nbytes(m), row_independent(m)))
    head = model.lm_head if model.lm_head is not None else model.transformer.wte
    out.append((module_nbytes(head), row_independent(head)))
    return out


def module_nbytes(m) -> int:
    prepared = getattr(m, "_prepared", None)  # a quantized layer reads its kernel's copy
    if prepared is not None and hasattr(prepared, "nbytes"):
        return int(prepared.nbytes)
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()) if not t.is_meta)


class Engine:
    """Serve generation requests for ``model`` with continuous batching (module docstring).

    Args:
        max_batch: requests decoding together (KV cache slots).
        max_queue: requests waiting for a slot; beyond, :meth:`submit` raises QueueFull.
        context: positions per slot (prompt + new tokens); default min(max_seq_len, 4096).
        kv_cache: "bf16" or "int8" (dbrxq.model.kv_cache), or a factory (batch_size, length) -> cache.
        stop_tokens: token ids that end a request (its eos ids).
    """

    def __init__(self, model, *, stop_tokens=(), max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None, kv_cache="bf16", prefill_chunk: int = 512,
                 invariant: bool = True):
        """``model``: a DbrxForCausalLM or a dbrxq.api.DbrxRunner, or a callable returning one, which
        then runs on the worker thread (see :meth:`wait_ready`)."""
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise GenerationError(f"max_batch must be >= 1, max_queue >= 0, prefill_chunk >= 1; got {max_batch}, "
                                  f"{max_queue}, {prefill_chunk}")
        self.max_batch, self.max_queue, self.prefill_chunk, self.invariant = max_batch, max_queue, prefill_chunk, invariant
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._stopping = self._draining = False
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._touched: list[int] | None = None  # per decode step: distinct experts per layer
        self._hooks: list = []
        self._setup = (model, context, kv_cache)
        self._thread = threading.Thread(target=self._main, name="dbrxq-engine", daemon=True)
        self._thread.start()

    def _prepare(self, model, context, kv_cache) -> None:
        """(Worker thread.) Load the model if given a loader, then allocate the slots.

        Why the worker loads: with OpenMP, once one thread has run torch's parallel regions, its
        idle pool competes with any other thread's: an 8-row decode step of the demo model took 3.3-3.8x
        longer on a second thread than on the first (2-core machine; scripts/bench_threads.py). Keeping every torch call on
        this one thread avoids that."""
        if callable(model) and not isinstance(model, torch.nn.Module):
            model = model()
        self.runner = None
        if hasattr(model, "tokenizer"):  # a dbrxq.api.DbrxRunner: its stop tokens, and its offloading plan's KV cache
            self.runner, model = model, model.model
            self.stop_tokens |= frozenset(self.runner.stop_tokens)
            if self.runner.offload is not None and not callable(kv_cache):
                kv_cache = self.runner.offload.kv_factory
        self.model = model
        ctx = model.config.max_seq_len
        self.context = min(ctx, 4096) if context is None else context
        if not 1 <= self.context <= ctx:
            raise GenerationError(f"context {self.context} must be between 1 and the model's max_seq_len {ctx}")
        if callable(kv_cache):
            cache = kv_cache(self.max_batch, self.context)
        else:
            cache = make_kv_cache(model.config, self.max_batch, self.context, flavour=kv_cache, dtype=model.dtype,
                                  device=model.device)
        self.pool = SlotPool(cache)
        self._expert_bytes = expert_nbytes(model)
        self._other = other_weights(model)
        self._hooks = [b.ffn.register_forward_hook(self._count_experts) for b in model.transformer.blocks]

    def wait_ready(self, timeout: float | None = None) -> Engine:
        """Block until the model is loaded and the slots allocated; re-raises a load error."""
        if not self._ready.wait(timeout):
            raise TimeoutError("the model is still loading")
        if self._load_error is not None:
            raise self._load_error
        return self

    def _main(self) -> None:
        torch.set_grad_enabled(False)
        try:
            self._prepare(*self._setup)
        except BaseException as e:  # reported by wait_ready
            self._load_error = e
            self._ready.set()
            return
        self._setup = None
        self._ready.set()
        self._loop()

    # ------------------------------------------------------------------ any thread
    def check(self, prompt: list[int], max_tokens: int, temperature: float = 0.0, top_k=None, top_p=None,
              seed=None) -> None:
        """What :meth:`submit` refuses (GenerationError, one line), checked before anything is queued."""
        self.wait_ready()
        if not prompt:
            raise GenerationError("empty prompt: at least one token is needed (DBRX adds no BOS token)")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise GenerationError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        check_sampling(temperature, top_k, top_p, seed)
        if len(prompt) + max_tokens > self.context:
            raise GenerationError(f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} = "
                                  f"{len(prompt) + max_tokens} exceeds the context of {self.context} tokens")
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab)), None)
        if bad is not None:
            raise GenerationError(f"prompt token {bad!r} is not an id of this model's vocabulary (0..{vocab - 1})")

    def submit(self, req: Request) -> None:
        """Queue ``req`` (checked first). Raises GenerationError, QueueFull or EngineStopped."""
        self.check(req.prompt, req.max_tokens, req.temperature, req.top_k, req.top_p, req.seed)
        req.penalties.check()
        with self._cv:
            if self._stopping or self._draining:
                raise EngineStopped("the server is shutting down")
            if len(self._active) >= self.max_batch and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_batch} requests running and {len(self._waiting)} waiting (--max-batch, "
                                f"--max-queue); try again later")
            self._waiting.append(req)
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """Stop ``req`` (a client went away, or a stop sequence matched): its slot is free before the
        next step; its last event is finish="cancelled" unless it had already ended."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._cv:
            return len(self._active), len(self._waiting)

    def drain(self, grace: float) -> None:
        """Take no new requests (EngineStopped); after ``grace`` seconds cancel those still running or
        waiting (their streams end with finish "cancelled"). The worker keeps running until :meth:`shutdown`."""
        with self._cv:
            self._draining = True

        def cancel_all() -> None:
            with self._cv:
                for r in list(self._waiting) + self._active:
                    r.cancelled = True
                self._cv.notify()
        t = threading.Timer(grace, cancel_all)
        t.daemon = True
        t.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Cancel everything still queued or running, stop the worker, remove the hooks."""
        with self._cv:
            self._stopping = True
            for r in list(self._waiting) + self._active:
                r.cancelled = True
            self._cv.notify()
        self._thread.join(timeout)
        for h in self._hooks:
            h.remove()

    # ------------------------------------------------------------------ worker thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._active or self._stopping):
                    self._cv.wait()
                while self._waiting and len(self._active) < self.max_batch:
                    r = self._waiting.popleft()
                    r.slot = self.pool.acquire()
                    self._active.append(r)
                if self._stopping:
                    for r in list(self._waiting):
                        self._end(r, "cancelled")
                    self._waiting.clear()
                for r in [r for r in self._active if r.cancelled]:
                    self._end(r, "cancelled")
                if self._stopping and not self._active:
                    return
            try:
                self._step()
            except Exception as e:  # a bug or an allocation failure: end the requests in it, keep serving
                log.exception("generation step failed")
                with self._cv:
                    for r in list(self._active):
                        self._end(r, "error", f"{type(e).__name__}: {e}")

    def _end(self, r: Request, finish: str, error: str | None = None) -> None:
        """(Under the lock.) r leaves: its slot goes back, its last event is sent."""
        if r in self._active:
            self._active.remove(r)
        if r.slot is not None:
            self.pool.release(r.slot)
            r.slot = None
        if r.finish is None:
            r.finish = finish
            self._send(r, Event(finish=finish, error=error))

    @staticmethod
    def _send(r: Request, ev: Event) -> None:
        """r.emit(ev); a callback that fails (its event loop is gone) cancels r instead of the step."""
        try:
            r.emit(ev)
        except Exception:
            log.warning("request %d: its event callback failed; cancelling it", r.id, exc_info=True)
            r.cancelled = True

    def _step(self) -> None:
        with self._cv:
            active = list(self._active)
        pre = next((r for r in active if r.prefilled < len(r.prompt)), None)
        if pre is not None:
            self._prefill_chunk(pre)
        rows = [r for r in active if r.prefilled == len(r.prompt) and r.tokens and r.finish is None
                and not r.cancelled]
        if rows:
            self._decode(rows)

    def _prefill_chunk(self, r: Request) -> None:
        t0 = time.perf_counter()
        s = r.prefilled
        e = min(s + self.prefill_chunk, len(r.prompt))
        dev = self.model.device
        ids = torch.tensor([r.prompt[s:e]], dtype=torch.long, device=dev)
        pos = torch.arange(s, e, device=dev)[None]
        view = self.pool.view([r.slot])
        with torch.inference_mode():
            out = self.model(ids, position_ids=pos, past_key_values=view, use_cache=True, logits_to_keep=1)
        view.commit()
        r.prefilled = e
        self.stats.prefill_tokens += e - s
        self.stats.prefill_s += time.perf_counter() - t0
        if e == len(r.prompt):
            if r.seed is not None:
                r.generator = torch.Generator(device=dev).manual_seed(r.seed)
            self._take(r, out.logits[:, -1])

    def _decode(self, rows: list[Request]) -> None:
        t0 = time.perf_counter()
        dev = self.model.device
        tok = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=dev)
        pos = torch.tensor([[len(r.prompt) + len(r.tokens) - 1] for r in rows], dtype=torch.long, device=dev)
        view = self.pool.view([r.slot for r in rows])
        self._touched = []
        try:
            with batch_invariant(self.invariant), torch.inference_mode():
                out = self.model(tok, position_ids=pos, past_key_values=view, use_cache=True)
        finally:
            touched, self._touched = self._touched, None
        view.commit()
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(rows)
        self.stats.batch_hist[len(rows)] += 1
        self.stats.expert_reads += sum(touched)
        self.stats.expert_bytes += sum(touched) * self._expert_bytes
        self.stats.weight_bytes += sum(touched) * self._expert_bytes + self._step_bytes(len(rows))
        logits = out.logits[:, -1]
        for i, r in enumerate(rows):
            self._take(r, logits[i:i + 1])
        self.stats.decode_s += time.perf_counter() - t0

    def _step_bytes(self, rows: int) -> int:
        """Bytes of the non-expert weights one decode step of ``rows`` reads: each once, except, under
        batch invariance, those whose kernel is not row-independent, read once per row."""
        return sum(n if (indep or not self.invariant) else n * rows for n, indep in self._other)

    def _count_experts(self, module, args, out) -> None:
        if self._touched is not None:
            ids = torch.topk(out[1], module.top_k, dim=-1).indices  # same top-k as route()
            self._touched.append(int(ids.unique().numel()))

    def _take(self, r: Request, logits: torch.Tensor) -> None:
        """Sample r's next token from its logits (1, V) and send it; r ends on a stop token or its length."""
        if not bool(torch.isfinite(logits).all()):
            with self._cv:
                self._end(r, "error", "the model's output is not finite (NaN/Inf); stopping instead of generating "
                                      "from it")
            return
        if r.penalties.active:
            logits = r.penalties.apply(logits, [r.prompt + r.tokens], [r.tokens])
        t = int(sample(logits, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, generator=r.generator)[0])
        r.tokens.append(t)
        self._send(r, Event(token=t))
        stop = t in self.stop_tokens and not r.ignore_eos
        if stop or len(r.tokens) >= r.max_tokens:
            with self._cv:
                self._end(r, "stop" if stop else "length")
