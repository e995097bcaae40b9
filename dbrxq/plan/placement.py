"""Memory budgets and the placement plan: which bytes live in which tier.

Tiers (docs/architecture.md, "Offloading"):

- ``device``: the compute device (the GPU, or the CPU's RAM on a CPU-only run). Holds the
  non-expert weights, the KV cache for the requested context, a workspace, and an LRU cache of
  expert slots (kernel-ready bytes, one fixed storage per expert).
- ``host``: only with CUDA: pinned RAM holding a fixed subset of experts in the GPU's kernel
  layout, so a GPU miss is one non-blocking host-to-device copy.
- ``disk``: every expert, kernel-ready, in a prepared-expert file read with ``pread`` (through the
  OS page cache; see dbrxq.runtime.offload for why a file and not the checkpoint itself).

The order of the fill is fixed: non-expert weights, KV cache and workspace first (the run cannot
start without them), then as many expert slots as fit, spread evenly over the layers (each layer
has its own LRU). Budgets cover dbrxq's own tensors; the Python interpreter and torch's runtime
(~0.3-0.5 GiB of RSS on CPU, the CUDA context on GPU) come on top and are reported, not budgeted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dbrxq.core.errors import BudgetError
from dbrxq.core.units import format_size
from dbrxq.model.kv_cache import KV_FLAVOURS, kv_cache_bytes
from quantize.config import QuantConfig


def workspace_bytes(config, *, batch_size: int, chunk: int, context: int, dtype: torch.dtype) -> int:
    """An upper estimate of what one prefill chunk (B*chunk tokens) allocates beyond the weights and the
    KV cache, from what the code allocates: per token, float32 hidden states and norms (6 x D), qkv, the
    MoE step's gathered inputs and outputs (2 x top-k x D) and one expert's GLU hidden state (2 x F),
    router logits (E), the kernel's int8 activations (D + F bytes); the last position's logits (2 x V
    per row). Prefill attention never builds a (tokens x context) score matrix (causal flash attention,
    dbrxq.model.dbrx.causal_attention), except a padded batch's boolean mask and SDPA's scores for it."""
    tokens = batch_size * min(chunk, context)
    per_token = 4 * (6 * config.d_model + config.qkv_out_features + 2 * config.top_k * config.d_model
                     + 2 * config.ffn_hidden_size + config.num_experts) + config.d_model + config.ffn_hidden_size
    padded = 0 if batch_size == 1 else tokens * context * (1 + 4 * config.n_heads)
    return tokens * per_token + padded + 4 * 2 * batch_size * config.vocab_size


def cuda_dequant_bytes(config) -> int:
    """CUDA: int8 attention weights are turned into bf16 for each matmul (quantize.kernels.
    TorchInt8Weight), so the largest of them, Wqkv, exists twice over for that long: measured on an
    H200 (scripts/bench_gpu.py), peak GPU memory passes the budget by 19 MiB if it is not planned."""
    qc = config.quantization_config
    if not qc:
        return 0
    return 2 * config.qkv_out_features * config.d_model if QuantConfig.from_dict(qc).attn.bits == 8 else 0


@dataclass
class PlacementPlan:
    """What goes where; made by :func:`make_plan`, printed by ``dbrxq run --plan``."""

    device: str  # "cpu" or "cuda[:N]"
    n_layers: int
    num_experts: int
    budgets: dict[str, int | None]  # tier -> bytes (None = unlimited)
    non_expert_bytes: int  # weights that stay on the compute device
    kv_flavour: str
    kv_bytes: dict[str, int]  # flavour -> bytes for the requested context
    context: int
    batch_size: int
    workspace_bytes: int  # includes the expert buffers outside the cache (scratch / staging slots)
    expert_bytes: int  # canonical (checkpoint) bytes of one expert: w1, v1, w2 codes + scales
    slot_bytes: int  # kernel-ready bytes of one expert on the compute device
    slots_per_layer: list[int]  # device LRU capacity per layer
    host_experts: list[list[int]] = field(default_factory=list)  # CUDA: experts pinned in host RAM
    # experts of different sizes (per-expert recipes): each size class's bytes, and slots per layer per class
    class_bytes: list[int] | None = None
    class_slots: list[list[int]] | None = None
    prefill_chunk: int = 512  # tokens of the prompt run at a time (smaller under a tight budget)
    process_bytes: int = 0  # the process outside the plan's tensors (counted in --cpu-memory)

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def device_fixed_bytes(self) -> int:
        return self.non_expert_bytes + self.kv_bytes[self.kv_flavour] + self.workspace_bytes

    def cache_bytes(self) -> int:
        """The expert cache's bytes on the compute device."""
        if self.class_slots is None:
            return sum(self.slots_per_layer) * self.slot_bytes
        return sum(k * b for row in self.class_slots for k, b in zip(row, self.class_bytes))

    def tier_bytes(self) -> dict[str, int]:
        """Planned resident bytes per tier (at most the budgets, by construction); on CPU the device is
        the process, its own bytes included."""
        out = {"device": self.device_fixed_bytes + self.cache_bytes() + (0 if self.on_cuda else self.process_bytes)}
        if self.on_cuda:
            out["host"] = (sum(len(h) for h in self.host_experts) + 1) * self.slot_bytes + self.process_bytes
        out["disk"] = self.n_layers * self.num_experts * self.slot_bytes
        return out

    def describe(self) -> str:
        """Several lines for humans (``dbrxq run --plan``)."""
        dev = "GPU" if self.on_cuda else "RAM"
        lines = [f"placement plan ({self.device}, context {self.context} x batch {self.batch_size}):"]
        for tier, nbytes in self.tier_bytes().items():
            budget = self.budgets.get(tier)
            lim = "" if tier == "disk" else f" of {format_size(budget) if budget is not None else 'unlimited'}"
            lines.append(f"  {tier:6s} {format_size(nbytes):>12s}{lim}")
        lines.append(f"  {dev}: the process {format_size(self.process_bytes)}, non-expert weights "
                     f"{format_size(self.non_expert_bytes)}, KV cache {format_size(self.kv_bytes[self.kv_flavour])} "
                     f"({self.kv_flavour}), workspace {format_size(self.workspace_bytes)} (prefill chunks of "
                     f"{self.prefill_chunk} tokens)")
        kv = ", ".join(f"{k} {format_size(v)}" for k, v in self.kv_bytes.items())
        lines.append(f"  KV cache for {self.context} tokens: {kv}")
        total = self.n_layers * self.num_experts
        cached = sum(self.slots_per_layer)
        lines.append(f"  experts: {format_size(self.expert_bytes)} each in the checkpoint, "
                     f"{format_size(self.slot_bytes)} kernel-ready; {cached}/{total} cached on the "
                     f"{dev} ({cached / total:.0%}), per layer {_runs(self.slots_per_layer)}")
        if self.class_slots is not None:
            per = [sum(row[c] for row in self.class_slots) for c in range(len(self.class_bytes))]
            lines.append("  size classes (per-expert recipes): " + ", ".join(
                f"{format_size(b)} x{k}" for b, k in zip(self.class_bytes, per)))
        if self.on_cuda:
            pinned = sum(len(h) for h in self.host_experts)
            lines.append(f"  host: {pinned}/{total} experts pinned in RAM; the rest read from disk")
        return "\n".join(lines)


def _runs(xs: list[int]) -> str:
    """[3, 3, 3, 2] -> '3 x3, 2 x1'."""
    out: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j < len(xs) and xs[j] == xs[i]:
            j += 1
        out.append(f"{xs[i]} x{j - i}")
        i = j
    return ", ".join(out)


def _spread(total: int, n_layers: int, per_layer_max: int) -> list[int]:
    """``total`` slots over layers as evenly as possible (the first layers get the remainder)."""
    total = min(total, n_layers * per_layer_max)
    base, extra = divmod(total, n_layers)
    return [base + (1 if i < extra else 0) for i in range(n_layers)]


def split_by_class(nbytes: int, sizes: list[int], counts: list[int]) -> list[int]:
    """Slots per size class within ``nbytes``: one at a time to the class whose experts are least
    covered (slots / experts), while one of its slots still fits; never more slots than experts."""
    k = [0] * len(sizes)
    left = nbytes
    while True:
        open_ = [c for c in range(len(sizes)) if k[c] < counts[c] and sizes[c] <= left]
        if not open_:
            return k
        c = min(open_, key=lambda c: (k[c] / counts[c], -counts[c]))
        k[c] += 1
        left -= sizes[c]


PREFILL_CHUNKS = (512, 256, 128, 64, 32, 16)  # the prompt's chunk, smaller when a budget is tight
# What a run adds to the process's RSS beyond its planned tensors and what it held at plan time: torch's
# kernels and allocator pools initialized by the first forward, dbrxq's C kernel, the tokenizer, the
# model's Python objects, heap fragmentation (tests/dbrxq/test_offload.py's peak-RSS test checks the
# whole process against --cpu-memory, from a fresh interpreter).
RUNTIME_ALLOWANCE = 96 << 20


def make_plan(config, *, device: torch.device, gpu_memory: int | None, cpu_memory: int | None,
              non_expert_bytes: int, expert_bytes: int, slot_bytes: int, context: int, batch_size: int,
              kv_flavour: str, dtype: torch.dtype, prefill_chunk: int = 512,
              classes: tuple[list[int], list[list[int]]] | None = None, process_bytes: int = 0) -> PlacementPlan:
    """Fill the tiers in order (see the module doc). ``classes``: for experts of different sizes, each
    size class's kernel-ready bytes and the class of every expert (per layer); the cache then holds
    a pool of slots per class and per layer (:func:`split_by_class`), ``slot_bytes`` being the largest.
    ``process_bytes``: what the process holds outside the plan's tensors (the interpreter, torch,
    dbrxq and the runtime's allowance): ``cpu_memory`` bounds the whole process, so it comes off first.
    A budget that cannot hold a prefill chunk of ``prefill_chunk`` tokens gets a smaller chunk
    (PREFILL_CHUNKS) before it is refused.

    Raises:
        BudgetError: a budget below what must be resident on its tier, naming the option and the
            bytes needed.
    """
    cuda = device.type == "cuda"
    if cpu_memory is not None:
        if cpu_memory <= process_bytes:
            raise BudgetError(f"--cpu-memory {format_size(cpu_memory)} is too small: the process itself holds "
                              f"{format_size(process_bytes)} (the interpreter, torch and dbrxq, with the runtime's "
                              f"allowance) before any weight")
        cpu_memory -= process_bytes
    dev_budget = gpu_memory if cuda else cpu_memory
    for chunk in [c for c in PREFILL_CHUNKS if c <= prefill_chunk] or [prefill_chunk]:
        try:
            plan = _make_plan(config, device=device, gpu_memory=gpu_memory, cpu_memory=cpu_memory,
                              non_expert_bytes=non_expert_bytes, expert_bytes=expert_bytes, slot_bytes=slot_bytes,
                              context=context, batch_size=batch_size, kv_flavour=kv_flavour, dtype=dtype,
                              prefill_chunk=chunk, classes=classes)
        except BudgetError:
            if dev_budget is None or chunk == min(PREFILL_CHUNKS):
                raise
            continue
        plan.process_bytes = process_bytes
        if plan.budgets.get("device") is not None and not cuda:
            plan.budgets["device"] += process_bytes
        if cuda and plan.budgets.get("host") is not None:
            plan.budgets["host"] += process_bytes
        return plan
    raise AssertionError("unreachable")


def _make_plan(config, *, device: torch.device, gpu_memory: int | None, cpu_memory: int | None,
               non_expert_bytes: int, expert_bytes: int, slot_bytes: int, context: int, batch_size: int,
               kv_flavour: str, dtype: torch.dtype, prefill_chunk: int,
               classes: tuple[list[int], list[list[int]]] | None) -> PlacementPlan:

    cuda = device.type == "cuda"
    if gpu_memory is not None and not cuda:
        raise BudgetError("--gpu-memory / gpu_memory needs a CUDA device (--device cuda)")
    L, E = config.n_layers, config.num_experts
    kv = {f: kv_cache_bytes(config, batch_size, context, f, dtype) for f in KV_FLAVOURS}
    # + expert buffers outside the cache: CUDA one scratch slot; CPU the reader's staging slots
    # (dbrxq.runtime.reader.STAGING_SLOTS = 2: one computing while the next is read)
    ws = workspace_bytes(config, batch_size=batch_size, chunk=prefill_chunk, context=context,
                         dtype=dtype) + (1 if cuda else 2) * slot_bytes + (cuda_dequant_bytes(config) if cuda else 0)
    fixed = non_expert_bytes + kv[kv_flavour] + ws
    dev_budget, dev_opt = (gpu_memory, "--gpu-memory") if cuda else (cpu_memory, "--cpu-memory")
    if dev_budget is None:
        slots = [E] * L
    else:
        if dev_budget < fixed:
            raise BudgetError(
                f"{dev_opt} {format_size(dev_budget)} is too small: at least {format_size(fixed)} is needed "
                f"(non-expert weights {format_size(non_expert_bytes)} + KV cache {format_size(kv[kv_flavour])} "
                f"for {context} tokens + workspace {format_size(ws)} for prefill chunks of {prefill_chunk} tokens)"
                + ("" if cuda else " beyond what the process itself holds"))
        slots = _spread((dev_budget - fixed) // slot_bytes, L, E)
    class_slots = None
    if classes is not None:
        sizes, of = classes
        counts = [[row.count(c) for c in range(len(sizes))] for row in of]
        if dev_budget is None:
            class_slots = counts
        else:
            per_layer = _spread(dev_budget - fixed, L, 1 << 62)  # bytes, as evenly as the slots were
            class_slots = [split_by_class(b, sizes, n) for b, n in zip(per_layer, counts)]
        slots = [sum(row) for row in class_slots]
    host: list[list[int]] = []
    if cuda:
        if cpu_memory is None:
            n_host = L * E
        else:
            if cpu_memory < slot_bytes:
                raise BudgetError(f"--cpu-memory {format_size(cpu_memory)} is too small: the host needs at "
                                  f"least one staging buffer of {format_size(slot_bytes)}")
            n_host = (cpu_memory - slot_bytes) // slot_bytes
        # No routing statistics at plan time: every expert is equally likely, so pin the same
        # number per layer (experts 0..k-1; a routing-statistics-driven choice is future work).
        host = [list(range(k)) for k in _spread(n_host, L, E)]
    return PlacementPlan(device=str(device), n_layers=L, num_experts=E,
                         budgets={"device": dev_budget, "host": cpu_memory if cuda else None},
                         non_expert_bytes=non_expert_bytes, kv_flavour=kv_flavour, kv_bytes=kv,
                         context=context, batch_size=batch_size, workspace_bytes=ws, prefill_chunk=prefill_chunk,
                         expert_bytes=expert_bytes, slot_bytes=slot_bytes, slots_per_layer=slots,
                         host_experts=host, class_bytes=None if classes is None else list(classes[0]),
                         class_slots=class_slots)
