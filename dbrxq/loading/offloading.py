"""Wiring offloading into a model: build or reuse the prepared-expert file, read the routing priors,
make the :class:`~dbrxq.runtime.offload.OffloadRuntime`, wrap each layer's experts and install the
hooks (phase bookkeeping, timing, speculative prefetch). The model is untouched otherwise: each
``block.ffn.experts`` (a quantize.modules.QExperts) is wrapped by an OffloadedExperts with the same
forward signature.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch import nn

from dbrxq.core.errors import ConfigError
from dbrxq.core.files import remove_stale_temps
from dbrxq.core.units import format_size, parse_size
from dbrxq.model.moe import route
from dbrxq.plan.placement import PlacementPlan, make_plan
from dbrxq.plan.sizes import non_expert_bytes_of, source_nbytes
from dbrxq.plan.slots import SlotLayout, layout_classes, model_layout
from dbrxq.runtime.offload import OffloadedExperts, OffloadRuntime
from dbrxq.runtime.prepared import (
    CheckpointExperts,
    PreparedExpertFile,
    prepared_dir,
    prepared_file_key,
    prepared_identity,
    read_prepared_sidecar,
    reusable_prepared,
    stride_of,
)
from dbrxq.runtime.reader import MissPolicy
from quantize.kernels import CpuQWeight
from quantize.modules import in_place
from dbrxq.runtime.routing import (
    ROUTING_SAVE_EVERY,
    read_observed_routing,
    routing_counts,
    routing_path,
    save_routing,
)

log = logging.getLogger(__name__)


def _install_hooks(model: nn.Module, rt: OffloadRuntime, prefetch: bool) -> None:
    def begin(module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = args[0] if args else kwargs.get("inputs_embeds")
        rt.phase = "decode" if x.shape[1] == 1 else "prefill"
        ph = rt.stats.phases[rt.phase]
        ph.forwards += 1
        ph.tokens += x.shape[0] * x.shape[1]
        rt.forwards_since_save += 1
        if rt.forwards_since_save >= ROUTING_SAVE_EVERY:
            rt.forwards_since_save = 0
            rt.save_routing()

    model.register_forward_pre_hook(begin, with_kwargs=True)
    blocks = model.transformer.blocks
    if rt.timing:
        for b in blocks:
            attn = b.norm_attn_norm

            def pre(module, args):
                rt._sync()
                module._t0 = time.perf_counter()

            def post(module, args, out):
                rt._sync()
                rt.stats.phases[rt.phase].attention_s += time.perf_counter() - module._t0

            attn.register_forward_pre_hook(pre)
            attn.register_forward_hook(post)
    if not prefetch:
        return
    top_k = model.config.top_k
    if not rt.cuda:  # the reader starts block i+1's likely experts once block i's misses are queued
        rt.speculate = [(b.norm_attn_norm.norm_2, b.ffn.router, top_k, b.ffn.norm_p) for b in blocks]
        for i, b in enumerate(blocks[:-1]):
            def stash(module, args, out, i=i):
                rt._resid[i] = out[0]  # (B, T, D): the residual after block i's attention
            b.norm_attn_norm.register_forward_hook(stash)
        return
    for i in range(len(blocks) - 1):
        nxt = blocks[i + 1]

        def guess(module, args, out, nxt=nxt, layer=i + 1):
            x = out[0]  # (B, T, D): block i's output, i.e. block i+1's input
            flat = nxt.norm_attn_norm.norm_2(x.reshape(-1, x.shape[-1]))
            w, ids = route(nxt.ffn.router(flat), top_k, nxt.ffn.norm_p)  # (N, k)
            score = torch.zeros(rt.plan.num_experts, device=w.device).index_add_(0, ids.reshape(-1), w.reshape(-1))
            order = [e for e in torch.argsort(score, descending=True).tolist() if score[e] > 0]
            rt.prefetch(layer, order)

        blocks[i].register_forward_hook(guess)


def reads_in_place(experts: list, layout, device: torch.device) -> bool:
    """Whether the runtime's slots can take the checkpoint's own bytes: experts stored in the kernel's
    blocks (quantize.modules.QBlocksExperts), a CPU run on dbrxq's kernel, and the slot layout the
    stored slot images have (checked offset by offset, so a layout change could never read garbage)."""
    if device.type != "cpu" or not all(in_place(m) for m in experts):
        return False
    layouts = layout.layouts if layout.mixed else [layout]
    if not all(isinstance(w, CpuQWeight) for lay in layouts for w in lay.template):
        return False  # a forced non-CPU-kernel backend: its own layout, from a prepared file
    stored = {(s.bits, s.group_size, s.asym): s for m in experts for s in m.slots.values()}
    for lay in layouts:
        w1 = lay.template[0]
        slot = stored.get((w1.bits, w1.group_size, bool(w1.asym)))
        if slot is None or lay.nbytes != slot.nbytes or [o for o, _, _ in lay.entries] != list(slot.offsets):
            return False
    return True


def enable_offloading(model: nn.Module, plan: PlacementPlan, layout: SlotLayout, *, backend: str | None = None,
                      non_expert_bytes: int, cache_dir: str | os.PathLike | None = None, prefetch: bool | None = None,
                      drop_page_cache: bool = False, direct: bool | None = None, timing: bool = False,
                      miss_policy: MissPolicy | None = None, policy: str = "lfu",
                      warm_start: bool = True, mmap: bool = False, map_cached: bool | None = None) -> OffloadRuntime:
    """Wrap every layer's experts in :class:`OffloadedExperts` per ``plan``; returns the runtime
    (also at ``model.offload``). ``prefetch``: guess the next block's experts and start bringing them
    in early (CUDA: side-stream copies; CPU: the reader thread, behind the current block's own
    misses). Default: on with CUDA, off on CPU, where reads are the bottleneck and a wrong guess
    spends exactly that: on the random-weight real-width 2-layer checkpoint the guesses moved 41%
    more bytes per token and decoding from the page cache took 193 instead of 157 ms/token
    (scripts/bench_offload.py with and without --prefetch). ``direct``: how misses are read on a CPU: True
    with O_DIRECT (bypassing the page cache, so the disk is what is measured), False through the page
    cache, None (default) with O_DIRECT when every read is dropped from the page cache, else either way
    as this source's own reads measure cheaper (dbrxq.runtime.read_choice). ``map_cached``: a miss the
    cache does not admit (it would pass through a staging slot) whose pages the page cache holds
    (mincore) is computed from the mapping, with no copy; default: where the page cache is not dropped and
    ``direct`` is None. ``policy``: which experts stay in the
    slots: "lfu" (default: decayed LFU with frequency-aware admission, seeded with the routing counts
    of the checkpoint's quantize report when it has one; the best hit rate at every budget on the
    demo model's real routing, scripts/bench_placement.py), "lru" or "static" (the report's most-routed experts fill the slots and
    stay; others go through the staging slots). With a report, every policy starts with the hottest
    experts resident (``warm_start``; False starts empty) (scripts/bench_placement.py measures the
    policies on real routing)."""
    experts = [b.ffn.experts for b in model.transformer.blocks]
    assert all(hasattr(m, "expert_weights") for m in experts), "offloading needs quantized experts (QExperts)"
    dev = torch.device(plan.device)
    act_dtype = model.dtype
    src = getattr(model, "source_dir", None)
    key = prepared_file_key(src, backend, dev, layout, act_dtype)
    root = prepared_dir(cache_dir)
    path = root / f"{key}.bin" if key else Path(tempfile.mkdtemp(prefix="dbrxq-prepared-")) / "experts.bin"
    want = plan.n_layers * plan.num_experts * stride_of(layout.nbytes)
    identity = (prepared_identity(src, backend, dev, layout, act_dtype, plan.n_layers, plan.num_experts)
                if key else None)
    in_place = src is not None and reads_in_place(experts, layout, dev)
    crcs = (read_prepared_sidecar(path, identity) if key and not in_place and reusable_prepared(path, want)
            else None)
    if in_place:
        # the checkpoint holds the kernel's slot images: misses read them where they are
        log.info("experts read from the checkpoint itself (%s)", src)
        file = CheckpointExperts(src, experts, drop_page_cache=drop_page_cache, direct=direct)
        if key:
            root.mkdir(parents=True, exist_ok=True)  # for the routing this run observes
    elif crcs is not None:
        log.info("reusing prepared experts %s", path)
        file = PreparedExpertFile(path, layout.nbytes, plan.num_experts, crcs=crcs, drop_page_cache=drop_page_cache,
                                  direct=direct, sizes=layout.sizes() if layout.mixed else None)
    else:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)  # halves of files whose builder was killed
        free = shutil.disk_usage(path.parent).free
        if free < want:
            raise ConfigError(f"{path.parent}: the prepared-expert file needs {format_size(want)}, {format_size(free)} "
                              "free there; choose another place with --cache-dir or DBRXQ_CACHE, or free space "
                              "(`dbrxq cache --clear` removes earlier files)")
        log.warning("writing kernel-ready experts (%s) to %s, once per checkpoint and kernel; `dbrxq cache` lists "
                    "such files, `dbrxq cache --clear` removes them", format_size(want), path)
        file = PreparedExpertFile.build(path, experts, layout, backend, dev, act_dtype, identity=identity,
                                        drop_page_cache=drop_page_cache, direct=direct)
        if key is None:
            os.unlink(path)  # anonymous: the open descriptor keeps it readable until closed
            os.rmdir(path.parent)
    counts = routing_counts(src, plan.n_layers, plan.num_experts)
    observed = read_observed_routing(routing_path(path), plan.n_layers, plan.num_experts) if key else None
    if counts is None and observed is not None:  # no quantize report: what earlier runs of it routed
        log.info("expert placement from the routing observed in earlier runs (%s)", routing_path(path))
        counts = observed
    if map_cached is None:  # where the page cache may hold experts (it is not dropped, the reads' way is measured)
        map_cached = direct is None and not drop_page_cache
    rt = OffloadRuntime(plan, layout, file, experts, act=experts[0].act, act_dtype=act_dtype,
                        non_expert_bytes=non_expert_bytes, miss_policy=miss_policy, timing=timing, policy=policy,
                        routing_counts=counts, mapped=mmap, map_cached=map_cached)
    if key:
        rt.routing_file = routing_path(path)
        if observed is not None:
            rt.observed = [list(r) for r in observed]
        # also at exit (a run of fewer than ROUTING_SAVE_EVERY forwards that never closes the runtime)
        weakref.finalize(rt, save_routing, rt.routing_file, rt.observed)
    if warm_start or policy == "static":
        rt.place_hot()
    rt.model_config = model.config
    for i, block in enumerate(model.transformer.blocks):
        block.ffn.experts = OffloadedExperts(experts[i], i, rt)
    _install_hooks(model, rt, rt.cuda if prefetch is None else prefetch)
    model.offload = rt
    return rt


def offload_model(model: nn.Module, *, device: torch.device | str | None = None, gpu_memory=None, cpu_memory=None,
                  context: int | None = None, batch_size: int = 1, kv_cache: str = "bf16",
                  backend: str | None = None, **kw) -> OffloadRuntime:
    """Offload a quantized model already in memory (e.g. from quantize_model_rtn); budgets as in
    dbrxq.load. ``kw`` goes to :func:`enable_offloading`."""
    dev = torch.device(device) if device is not None else model.device
    experts = [b.ffn.experts for b in model.transformer.blocks]
    canonical = max((m.expert_sources(e) for m in experts for e in range(m.num_experts)), key=source_nbytes)
    layout = model_layout(experts, backend, dev, model.dtype)
    non_expert = non_expert_bytes_of(model)
    plan = make_plan(model.config, device=dev, classes=layout_classes(layout),
                     gpu_memory=None if gpu_memory is None else parse_size(gpu_memory, "gpu_memory"),
                     cpu_memory=None if cpu_memory is None else parse_size(cpu_memory, "cpu_memory"),
                     non_expert_bytes=non_expert, expert_bytes=source_nbytes(canonical),
                     slot_bytes=layout.nbytes, context=context or model.config.max_seq_len,
                     batch_size=batch_size, kv_flavour=kv_cache, dtype=model.dtype)
    return enable_offloading(model, plan, layout, backend=backend, non_expert_bytes=non_expert, **kw)
