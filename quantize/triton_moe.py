"""A layer's routed experts on a GPU in two Triton launches, int4 codes dequantized in registers.

For the quantized experts of one MoE layer (dbrxq's stacks as :class:`quantize.modules.QExperts` holds
them: ``qweight`` uint8 ``[E, N, K/2]``, even column in the low nibble; ``scales`` fp16 ``[E, N, K/G]``;
``qzeros`` uint8 or None for the implicit 8; ``W = (code - zero) * scale``) and one step's routing:

1. :func:`align` groups the step's (token, expert) pairs by expert, in increasing expert id, and pads each
   expert's run to whole blocks of ``BLOCK_M`` pairs (vLLM's ``moe_align_block_size``): every block of
   pairs belongs to one expert.
2. ``_gate_up``: per block of pairs and block of ``F``, ``h = silu(x W1^T) * (x V1^T)``: w1 and v1 codes
   are loaded as bytes, split into nibbles, scaled and given to ``tl.dot`` in registers; each weight byte
   is read once per block of pairs (one block for a decode step of up to ``BLOCK_M`` tokens per expert).
3. ``_down``: per block of pairs and block of ``D``, ``y = h W2^T`` the same way.
4. The pairs' outputs times their routing weights are summed per token in float32, in increasing expert
   id (torch ``index_add_`` over the sorted pairs).

One launch of each kernel serves all of a layer's routed experts. Accumulation is float32; on a GPU the
dequantized weights and the activations meet in ``tl.dot`` in the activation dtype (bf16/fp16: the
tensor cores), in float32 elsewhere. 2- and 3-bit codes run as int4 with zero points
(:func:`quantize.kernels.widen_to_int4`). Triton's interpreter (``TRITON_INTERPRET=1``) runs the same
kernels on CPU tensors, which is how the tests check their arithmetic without a GPU.
"""

from __future__ import annotations

import torch

from dbrxq.core.errors import QuantizationError
from quantize.kernels import widen_to_int4
from quantize.modules import QBlocksExperts, QExperts

# triton is optional (the test extra; torch's CUDA builds bring it) and takes 0.2 s to import: it is imported
# at the kernels' first use (_jit), never by loading a model that does not use them
triton = tl = None

BLOCK_M = 16  # routed (token, expert) pairs per block: a decode step's tokens of one expert
BLOCK_N = 64
BLOCK_K = 64


def _dequant(q_ptr, s_ptr, z_ptr, e, rows, cols, N, K, G: tl.constexpr, HAS_Z: tl.constexpr):
    """W[rows, cols] of expert e (float32): the byte holding each code, its nibble, scale and zero."""
    base = e.to(tl.int64) * N
    m = (rows[:, None] < N) & (cols[None, :] < K)
    b = tl.load(q_ptr + (base + rows[:, None]) * (K // 2) + cols[None, :] // 2, mask=m, other=0).to(tl.int32)
    c = (b >> ((cols[None, :] % 2) * 4)) & 15
    g = cols[None, :] // G
    s = tl.load(s_ptr + (base + rows[:, None]) * (K // G) + g, mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + (base + rows[:, None]) * (K // G) + g, mask=m, other=0).to(tl.int32)
    else:
        z = 8
    return (c - z).to(tl.float32) * s


def _gate_up(x_ptr, tok_ptr, blk_e_ptr, h_ptr, w1q, w1s, w1z, v1q, v1s, v1z, F, D, stride_x,
             G: tl.constexpr, HAS_Z: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             DOT_DTYPE: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(blk_e_ptr + pid_m)
    if e < 0:  # a block past the last expert's (align's fixed size)
        return
    pairs = pid_m * BM + tl.arange(0, BM)
    tok = tl.load(tok_ptr + pairs)
    live = tok >= 0
    n = pid_n * BN + tl.arange(0, BN)
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + tl.arange(0, BK)
        xk = tl.load(x_ptr + tl.where(live, tok, 0).to(tl.int64)[:, None] * stride_x + k[None, :],
                     mask=live[:, None] & (k[None, :] < D), other=0.0).to(DOT_DTYPE)
        w1 = _dequant(w1q, w1s, w1z, e, n, k, F, D, G, HAS_Z).to(DOT_DTYPE)
        v1 = _dequant(v1q, v1s, v1z, e, n, k, F, D, G, HAS_Z).to(DOT_DTYPE)
        acc1 += tl.dot(xk, tl.trans(w1))
        acc2 += tl.dot(xk, tl.trans(v1))
    h = acc1 / (1.0 + tl.exp(-acc1)) * acc2
    tl.store(h_ptr + pairs.to(tl.int64)[:, None] * F + n[None, :], h, mask=live[:, None] & (n[None, :] < F))


def _down(h_ptr, tok_ptr, blk_e_ptr, y_ptr, w2q, w2s, w2z, F, D,
          G: tl.constexpr, HAS_Z: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          DOT_DTYPE: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(blk_e_ptr + pid_m)
    if e < 0:
        return
    pairs = pid_m * BM + tl.arange(0, BM)
    live = tl.load(tok_ptr + pairs) >= 0
    d = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, F, BK):
        k = k0 + tl.arange(0, BK)
        hk = tl.load(h_ptr + pairs.to(tl.int64)[:, None] * F + k[None, :], mask=live[:, None] & (k[None, :] < F),
                     other=0.0).to(DOT_DTYPE)
        w2 = _dequant(w2q, w2s, w2z, e, d, k, D, F, G, HAS_Z).to(DOT_DTYPE)
        acc += tl.dot(hk, tl.trans(w2))
    tl.store(y_ptr + pairs.to(tl.int64)[:, None] * D + d[None, :], acc, mask=live[:, None] & (d[None, :] < D))


_JIT = False


def _jit() -> None:
    """Make the kernels Triton functions, at first use: Triton reads ``TRITON_INTERPRET`` then (the tests set
    it to run them on CPU tensors), and the module imports where triton is missing."""
    global _JIT, _dequant, _gate_up, _down, triton, tl
    if _JIT:
        return
    why = available()
    if why is not None:
        raise QuantizationError(f"the fused MoE kernels need triton ({why}; pip install triton)")
    import triton as triton_
    import triton.language as tl_

    triton, tl = triton_, tl_  # the kernels' globals: Triton resolves tl.* there when it compiles them
    _dequant, _gate_up, _down = triton.jit(_dequant), triton.jit(_gate_up), triton.jit(_down)
    _JIT = True


def available() -> str | None:
    """None when the kernels can run here (triton imports), else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def align(expert_ids: torch.Tensor, num_experts: int, block: int = BLOCK_M):
    """The step's (token, expert) pairs grouped by expert (increasing id, tokens in order), each expert's run
    padded to whole blocks, in arrays whose sizes depend only on the shapes (no host sync: a CUDA graph can
    hold the step): (token of each slot ``[S]`` int32, -1 for padding; pair index of each slot ``[S]`` int64,
    -1 for padding; expert of each block ``[S / block]`` int32, -1 for the blocks past the last expert's,
    which the kernels leave at once). ``S = block * ceil((pairs + E (block - 1)) / block)``."""
    n, k = expert_ids.shape
    dev = expert_ids.device
    flat = expert_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat * (n * k) + torch.arange(n * k, device=dev))  # by expert, then pair
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    # (scatter_add, not bincount: bincount's output size depends on the values, a host sync on a GPU)
    padded = (counts + block - 1) // block * block
    starts = torch.cumsum(padded, 0) - padded
    cstarts = torch.cumsum(counts, 0) - counts
    nblk = -(-(n * k + num_experts * (block - 1)) // block)
    sorted_e = flat[order]
    slot = starts[sorted_e] + (torch.arange(n * k, device=dev) - cstarts[sorted_e])
    pair = torch.full((nblk * block,), -1, dtype=torch.int64, device=dev)
    pair[slot] = order
    token = torch.where(pair >= 0, pair // k, torch.full_like(pair, -1)).to(torch.int32)
    ends = torch.cumsum(padded // block, 0)  # blocks up to and including each expert's
    block_e = torch.searchsorted(ends, torch.arange(nblk, device=dev), right=True).to(torch.int32)
    block_e = torch.where(block_e < num_experts, block_e, torch.full_like(block_e, -1))
    return token, pair, block_e


class Int4Stack:
    """One layer's experts as stacked int4 tensors (w1, v1: ``[E, F, D]``; w2: ``[E, D, F]``), each a
    (qweight, scales, qzeros or None) triple with one group size."""

    def __init__(self, w1, v1, w2, group: int):
        self.w1, self.v1, self.w2, self.group = w1, v1, w2, group
        self.num_experts, self.ffn = w1[0].shape[0], w1[0].shape[1]
        self.d_model = w2[0].shape[1]
        self.has_z = w1[2] is not None
        if not all((t[2] is not None) == self.has_z for t in (v1, w2)):
            raise ValueError("w1, v1 and w2 must all have zero points or none")


def moe(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, stack: Int4Stack) -> torch.Tensor:
    """The layer's MoE of x ``[n, D]``: expert_ids and weights ``[n, k]`` -> ``[n, D]`` in x's dtype."""
    _jit()
    n, D = x.shape
    F, E, G = stack.ffn, stack.num_experts, stack.group
    token, pair, block_e = align(expert_ids, E)
    slots = token.numel()
    x = x.contiguous()
    dot = tl.float32 if x.dtype == torch.float32 or x.device.type == "cpu" else (
        tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16)  # tl is imported by _jit
    h = torch.empty(slots, F, dtype=torch.float32, device=x.device)
    y = torch.empty(slots, D, dtype=torch.float32, device=x.device)
    nblk = slots // BLOCK_M
    if nblk:
        (w1q, w1s, w1z), (v1q, v1s, v1z), (w2q, w2s, w2z) = stack.w1, stack.v1, stack.w2
        dummy = w1q  # an unused zeros pointer without zero points
        _gate_up[(nblk, triton.cdiv(F, BLOCK_N))](
            x, token, block_e, h, w1q, w1s, w1z if stack.has_z else dummy, v1q, v1s, v1z if stack.has_z else dummy,
            F, D, x.stride(0), G=G, HAS_Z=stack.has_z, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, DOT_DTYPE=dot)
        _down[(nblk, triton.cdiv(D, BLOCK_N))](
            h, token, block_e, y, w2q, w2s, w2z if stack.has_z else dummy, F, D, G=G, HAS_Z=stack.has_z,
            BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, DOT_DTYPE=dot)
    live = pair >= 0  # padding slots add zero rows to token 0: no boolean indexing, so no host sync
    p = torch.where(live, pair, torch.zeros_like(pair))
    wts = torch.where(live, weights.reshape(-1).float()[p], torch.zeros_like(p, dtype=torch.float32))
    contrib = torch.where(live[:, None], y, torch.zeros_like(y)) * wts[:, None]  # each product rounded, then summed
    out = torch.zeros(n, D, dtype=torch.float32, device=x.device)
    out.index_add_(0, p // expert_ids.shape[1], contrib)
    return out.to(x.dtype)


def stack_of(experts, device: torch.device | str) -> Int4Stack | None:
    """An experts module's weights (``expert_weights(e)``: QExperts, QBlocksExperts) as one Int4Stack on
    ``device``, 2- and 3-bit codes widened to int4 with zero points; None when its experts differ in recipe
    (per-expert recipes) or are 8-bit."""
    for e in range(experts.num_experts) if hasattr(experts, "check_expert") else []:
        experts.check_expert(e)  # the blocks layout checks an expert's scales on first use: all of them, now
    qts = [experts.expert_weights(e) for e in range(experts.num_experts)]
    parts, kinds = [], set()  # kinds: (group, zero points or not) over all three weights
    for kind in range(3):
        ws = [widen_to_int4(q[kind]) if q[kind].bits in (2, 3) else q[kind] for q in qts]
        if {w.bits for w in ws} != {4}:
            return None
        kinds |= {(w.group, w.qzeros is None) for w in ws}
        z = None if ws[0].qzeros is None else torch.stack([w.qzeros for w in ws]).to(device)
        parts.append((torch.stack([w.qweight for w in ws]).to(device), torch.stack([w.scales for w in ws]).to(device), z))
    if len(kinds) != 1:
        return None
    return Int4Stack(*parts, group=kinds.pop()[0])


def use_triton_moe(model: torch.nn.Module, device: torch.device | str) -> int:
    """Route every quantized experts module of ``model`` whose experts share one 2-4 bit recipe through the
    fused kernels (their stacks copied to ``device``); returns how many took it."""
    count = 0
    for m in model.modules():
        if isinstance(m, (QExperts, QBlocksExperts)):
            stack = stack_of(m, device)
            if stack is not None:
                m.fused_moe = lambda x, ids, w, stack=stack: moe(x, ids, w, stack)
                count += 1
    return count
