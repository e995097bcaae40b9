"""Continuous batching (dbrxq.serve.engine): rows of a batched decode step are computed bit for bit as
each request alone, each expert is read once per step, slots come back, the queue is bounded."""

import threading

import pytest
import torch

import dbrxq
from dbrxq.formats.random import preset_config
from dbrxq.loading.offloading import offload_model
from dbrxq.model.batch import batch_invariant, by_rows
from dbrxq import DbrxForCausalLM
from dbrxq.model.kv_cache import SlotPool, make_kv_cache
from dbrxq.runtime.generate import prefill
from dbrxq.serve.engine import Engine, QueueFull, Request
from dbrxq.serve.server import StopMatcher
from quantize import cext
from quantize.config import QuantConfig
from quantize.modules import quantize_model_rtn
from tests.dbrxq.engine_helpers import collect

PROMPTS = [[5, 17, 99, 3, 250, 41, 7, 8], [12, 4], [300, 301, 302, 5, 6], [9]]
STEPS = 6


def float_model(dtype=torch.float32) -> DbrxForCausalLM:
    torch.manual_seed(0)
    cfg = preset_config("tiny", d_model=128, ffn_hidden_size=128)  # 2 layers, 16 experts, top-4
    return DbrxForCausalLM(cfg).init_weights().eval().to(dtype)


def quantized_model() -> DbrxForCausalLM:
    return quantize_model_rtn(float_model(torch.bfloat16), QuantConfig())  # auto: dbrxq's C kernels when built


@torch.no_grad()
def alone(model, prompt: list[int], steps: int = STEPS) -> list[torch.Tensor]:
    """Greedy logits of one request through the plain path (generate's prefill and decode)."""
    cache = model.new_cache(1, len(prompt) + steps)
    ids = torch.tensor([prompt])
    logits = prefill(model, ids, torch.ones_like(ids), cache)
    out = []
    for i in range(steps):
        out.append(logits)
        tok = logits.argmax(-1)
        logits = model(tok[:, None], position_ids=torch.tensor([[len(prompt) + i]]), past_key_values=cache,
                       use_cache=True).logits[:, -1]
    return out


@torch.no_grad()
def batched(model, prompts, steps: int = STEPS, invariant: bool = True) -> list[list[torch.Tensor]]:
    """The same requests in one slot pool: each prefilled alone, then decoded together."""
    pool = SlotPool(make_kv_cache(model.config, len(prompts), 64, dtype=model.dtype, device="cpu"))
    slots = [pool.acquire() for _ in prompts]
    logits = []
    for s, p in zip(slots, prompts):
        view = pool.view([s])
        logits.append(model(torch.tensor([p]), position_ids=torch.arange(len(p))[None], past_key_values=view,
                            use_cache=True, logits_to_keep=1).logits[:, -1])
        view.commit()
    logits = torch.cat(logits)
    out = [[] for _ in prompts]
    for i in range(steps):
        for r in range(len(prompts)):
            out[r].append(logits[r:r + 1])
        tok = logits.argmax(-1)
        pos = torch.tensor([[len(p) + i] for p in prompts])
        view = pool.view(slots)
        with batch_invariant(invariant):
            logits = model(tok[:, None], position_ids=pos, past_key_values=view, use_cache=True).logits[:, -1]
        view.commit()
    return out


def needs_kernel():
    if cext.load() is None:
        pytest.skip("dbrxq's C kernel is not built here")


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "quantized"])
def test_batched_rows_equal_each_request_alone_bitwise(kind):
    if kind == "quantized":
        needs_kernel()
    model = quantized_model() if kind == "quantized" else float_model(getattr(torch, kind))
    got = batched(model, PROMPTS)
    for r, p in enumerate(PROMPTS):
        for step, (a, b) in enumerate(zip(got[r], alone(model, p))):
            assert torch.equal(a, b), (kind, r, step, (a - b).abs().max())


def rows_seen(model, invariant: bool) -> dict[str, set[int]]:
    """The row counts each weight of block 0 (and the head) received during batched decode steps."""
    seen: dict[str, set[int]] = {}
    blk = model.transformer.blocks[0]
    parts = {"Wqkv": blk.norm_attn_norm.attn.Wqkv, "router": blk.ffn.router.layer, "lm_head": model.lm_head}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, set()).add(
        args[0].reshape(-1, args[0].shape[-1]).shape[0])) for n, m in parts.items()]
    batched(model, PROMPTS, steps=2, invariant=invariant)
    for h in hooks:
        h.remove()
    return seen


def test_batch_invariance_applies_float_weights_row_by_row_and_batches_the_c_kernel():
    """The mechanism behind the bitwise test above, independent of whether this CPU's float kernels
    happen to round rows alike: under batch_invariant every float weight sees one row at a time in a
    decode step (prefill rows are one request: they stay batched), a C-kernel weight sees the batch."""
    model = float_model()
    free = rows_seen(model, invariant=False)
    assert len(PROMPTS) in free["Wqkv"] and len(PROMPTS) in free["lm_head"]
    inv = rows_seen(model, invariant=True)
    decode_rows = {1}  # plus the prefill lengths of the prompts (one request per prefill)
    assert inv["Wqkv"] <= decode_rows | {len(p) for p in PROMPTS} and len(PROMPTS) not in inv["lm_head"]
    if cext.load() is not None:
        q = quantized_model()  # attention int8 on the C kernel, router float
        inv = rows_seen(q, invariant=True)
        assert len(PROMPTS) in inv["Wqkv"] and len(PROMPTS) not in inv["router"]


def test_by_rows_splits_only_what_is_not_row_independent():
    seen = []
    fn = lambda x: seen.append(x.shape[0]) or x * 2  # noqa: E731
    x = torch.ones(3, 4)
    by_rows(fn, x, False)
    with batch_invariant():
        by_rows(fn, x, False)
        by_rows(fn, x, True)
    assert seen == [3, 1, 1, 1, 3]


def test_quantized_experts_serve_the_batch_in_one_call_per_expert():
    needs_kernel()
    model = quantized_model()
    experts = model.transformer.blocks[0].ffn.experts
    assert experts.row_independent
    rows = []  # per call of the layer: the most tokens one expert got (the layer is one call into C)

    def count(module, args, out):
        rows.append(int(torch.bincount(args[1].reshape(-1)).max()))
    experts.register_forward_hook(count)
    batched(model, PROMPTS, steps=2)
    assert max(rows) > 1  # the decode steps grouped several requests' tokens on one expert


def test_offloaded_batch_loads_each_expert_once_per_step(tmp_path):
    needs_kernel()
    ref = quantized_model()
    model = quantized_model()
    rt = offload_model(model, cpu_memory="1TiB", context=64, batch_size=len(PROMPTS), cache_dir=tmp_path)
    touched = []

    def count(module, args, out):
        touched.append(int(args[1].unique().numel()))  # distinct experts routed in this call
    hooks = [b.ffn.experts.register_forward_hook(count) for b in model.transformer.blocks]
    c = rt.cache.counters
    got = batched(model, PROMPTS, steps=3)
    for h in hooks:
        h.remove()
    assert c.hits + c.misses == sum(touched)  # one lookup (load) per distinct expert per call
    for r, p in enumerate(PROMPTS):
        for a, b in zip(got[r], alone(ref, p, 3)):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def demo():
    return dbrxq.load()


TEXTS = ["The function returns", "A list of", "If the file", "Return the value of the", "This module provides",
         "def", "The default is", "Raise an exception when"]


def test_engine_requests_equal_alone_with_joins_and_seeds(demo):
    tok = demo.tokenizer
    greedy = [dict(prompt=tok.encode(t), max_tokens=12) for t in TEXTS[:6]]
    sampled = [dict(prompt=tok.encode(t), max_tokens=12, temperature=0.8, top_p=0.9, seed=100 + i)
               for i, t in enumerate(TEXTS[6:])]
    engine = Engine(demo, max_batch=8)
    try:
        out, ends = collect(engine, greedy + sampled, stagger=3)  # two sampled + one greedy join mid-run
    finally:
        engine.shutdown()
    assert max(engine.stats.batch_hist) > 1
    for kw, got, end in zip(greedy + sampled, out, ends):
        ref = demo.generate_ids([kw["prompt"]], max_new_tokens=kw["max_tokens"], temperature=kw.get("temperature", 0),
                                top_p=kw.get("top_p"), seed=kw.get("seed")).sequences[0]
        assert got == ref
        assert end == ("stop" if ref[-1] in demo.stop_tokens else "length")


def test_engine_queue_bound_and_cancel_free_the_slot(demo):
    engine = Engine(demo, max_batch=1, max_queue=1)
    try:
        events = {"a": [], "b": []}
        b_done = threading.Event()
        a_started = threading.Event()

        def emit_a(ev):
            events["a"].append(ev)
            a_started.set()

        def emit_b(ev):
            events["b"].append(ev)
            if ev.finish:
                b_done.set()
        a = Request(prompt=[5, 6, 7], max_tokens=1000, emit=emit_a)
        engine.submit(a)
        assert a_started.wait(60)
        engine.submit(Request(prompt=[8, 9], max_tokens=3, emit=emit_b))  # waits for the slot
        with pytest.raises(QueueFull, match="--max-batch"):
            engine.submit(Request(prompt=[1], max_tokens=3, emit=lambda ev: None))
        engine.cancel(a)
        assert b_done.wait(60)
        assert events["a"][-1].finish == "cancelled" and len(events["a"]) < 1000
        assert events["b"][-1].finish in ("stop", "length") and len(events["b"]) >= 2
        assert engine.load() == (0, 0) and len(engine.pool.free) == 1
    finally:
        engine.shutdown()


def test_engine_refuses_before_queueing(demo):
    engine = Engine(demo, max_batch=2, context=64)
    try:
        for kw, msg in ((dict(prompt=[], max_tokens=3), "empty prompt"),
                        (dict(prompt=[1] * 60, max_tokens=5), "exceeds the context of 64"),
                        (dict(prompt=[10**6], max_tokens=5), "not an id"),
                        (dict(prompt=[1], max_tokens=3, temperature=0.001), "temperature")):
            with pytest.raises(dbrxq.core.errors.GenerationError, match=msg):
                engine.submit(Request(emit=lambda ev: None, **kw))
        assert engine.load() == (0, 0)
    finally:
        engine.shutdown()


def test_stop_matcher_holds_back_prefixes_and_finds_the_earliest():
    m = StopMatcher(["END", "xy"])
    assert m.push("abc E") == ("abc ", False)  # "E" could start END
    assert m.push("N") == ("", False)
    assert m.push("D and xy") == ("", True)  # END completes first
    m = StopMatcher(["END"])
    assert m.push("EN") == ("", False)
    assert m.push("d") == ("ENd", False)
    assert m.flush() == ""
    m = StopMatcher(["ab"])
    assert m.push("xa") == ("x", False) and m.flush() == "a"
    assert StopMatcher([]).push("anything") == ("anything", False)
