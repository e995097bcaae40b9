"""Float experts through the C kernel: a layer's MoE step over bf16 or float32 weights in one call.

A float model small enough that a decode step's weights stay in cache (the embedded demo: 4 layers of
width 128) spends a step in tensor dispatch, not arithmetic: gathering the routed experts, widening
them to float32 and five batched matmuls per layer. ``dbrxq_moe_float`` (quantize/csrc/fmoe.c) does
the same float32 arithmetic on the hub's own tensors in one call, reading each routed expert's bytes
once. The loader gives it to the float experts of a CPU model (:func:`use_float_kernel`); the model
keeps its torch path for everything the kernel does not take (another activation, dtype or device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dbrxq.model.moe import DbrxExperts
from quantize import cext

DTYPES = {torch.bfloat16: 1, torch.float32: 0}


class FloatMoE:
    """``experts``' step (x ``[N, D]``, expert_ids and weights ``[N, k]``) in one call into the C kernel, or
    None when the kernel cannot take it (the caller then uses its torch path). Row-independent: each token
    is computed alone, so a batch gives every row the bits it gets alone."""

    def __init__(self, experts: DbrxExperts, lib, path: str):
        self.experts, self.lib, self.path = experts, lib, cext.PATHS[path]

    def __call__(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        mlp = self.experts.mlp
        w1, v1, w2 = mlp.w1, mlp.v1, mlp.w2
        bf16 = DTYPES.get(w1.dtype)
        if (bf16 is None or x.device.type != "cpu" or not (w1.dtype == v1.dtype == w2.dtype)
                or not all(w.is_contiguous() and w.device.type == "cpu" for w in (w1, v1, w2))):
            return None
        n, k = expert_ids.shape
        d, f = x.shape[-1], self.experts.ffn_hidden_size
        if not (w1.shape == v1.shape == w2.shape == (self.experts.num_experts * f, d)):
            return None  # the kernel reads [E, F, D] from each pointer: anything else goes to torch, which says why
        x2 = x.float().contiguous()
        ids = expert_ids.to(torch.int64).contiguous()
        wts = weights.float().contiguous()
        out = torch.empty(n, d, dtype=torch.float32)
        rc = self.lib.dbrxq_moe_float(x2.data_ptr(), n, d, f, k, ids.data_ptr(), wts.data_ptr(), w1.data_ptr(),
                                      v1.data_ptr(), w2.data_ptr(), self.experts.num_experts, bf16,
                                      out.data_ptr(), self.path, torch.get_num_threads())
        if rc == -1:
            raise MemoryError(f"dbrxq_moe_float could not allocate its buffers (D={d}, F={f})")
        if rc != 0:
            return None
        return out.to(x.dtype)


def use_float_kernel(model: nn.Module, path: str | None = None) -> int:
    """Give every float :class:`DbrxExperts` of ``model`` whose activation is silu the one-call C kernel
    (``path``: a quantize.cext path, default the CPU's best). Returns how many took it (0 without the C
    library)."""
    lib = cext.load()
    if lib is None:
        return 0
    path = path or cext.cpu_path()
    count = 0
    for m in model.modules():
        if type(m) is DbrxExperts and m.act is F.silu:
            m.fused = FloatMoE(m, lib, path)
            count += 1
    return count
