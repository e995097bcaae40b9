"""The canonical, device-independent layout of quantized tensors (on disk and in memory).

Every quantized weight W of logical shape [N_out, K_in] (the nn.Linear convention,
``y = x @ W.T``) is stored as up to three tensors next to the weight's name with its
``.weight`` suffix dropped:

    <name>.qweight  uint8  [..., N, K // 2]  bits == 4: two codes per byte, the code of
                                             input column 2j in the LOW nibble and of
                                             column 2j+1 in the HIGH nibble
                    uint8  [..., N, K]       bits == 8: one code per byte
                    uint8  [..., N, K // 4]  bits == 2: four codes per byte, column 4j+i in
                                             bits 2i..2i+1 (format_version 2)
                    uint8  [..., N, K // 4 + K // 8]
                                             bits == 3 (format_version 2): two planes per row,
                                             first the low two bits of every code as at 2 bits,
                                             then the high bit, eight per byte (column 8j+i in
                                             bit i). Why planes: a kernel decodes the 2-bit
                                             plane exactly as a 2-bit weight and adds 4 where
                                             the 1-bit plane says so, streaming both.
    <name>.scales   float16 [..., N, K // G] one scale per group of G consecutive input columns
    <name>.qzeros   uint8  [..., N, K // G]  only when asymmetric: the integer zero point

Codes are always unsigned, 0 .. 2**bits - 1, and dequantize as

    W[n, k] = (code[n, k] - zero[n, k // G]) * scale[n, k // G]

with zero = 2**(bits-1) (8 for int4, 128 for int8) when symmetric (not stored). A symmetric
scale of 2-4 bits may be negative (format_version 5): the grid's 2**(bits-1) steps on one side of
zero then lie on the positive side, so all 2**bits codes are used (llama.cpp's Q4_0 does the same). Groups run
along the input dimension K; G == K is per-channel (one scale per output row). K must be
divisible by G (and by 2 for 4-bit, 4 for 2-bit, 8 for 3-bit); DBRX's dims (6144, 10752, 8192) are multiples of 128.

Experts. The fused DBRX expert tensors ``ffn.experts.mlp.{w1,v1,w2}`` ([E*F, D] each in the hub
layout) are stored with a leading expert dimension, each matrix in its (out, in) orientation:

    w1, v1: [E, F, D]  (out = F, in = D)          w2: [E, D, F]  (out = D, in = F; transposed)

so ``qweight[e]``, ``scales[e]`` (and ``qzeros[e]``) are each one contiguous block: one expert
can be sliced, read or memory-mapped alone. Kernel-specific repacking (torch's int4pack
layouts, bitsandbytes, our C kernel) happens at load time and never reaches the disk.

Unquantized tensors (norms, router, embeddings, lm_head unless asked) keep their hub names and
stay in bf16. The checkpoint's config.json carries a ``quantization_config`` block
(see :mod:`quantize.config`) whose ``format_version`` is :data:`FORMAT_VERSION`.
"""

import re

# 2: adds 2- and 3-bit codes; 3: adds per-expert recipes (quantization_config.expert_mix, expert tensors
# stacked per recipe: MIXED_PART); 4: adds the "blocks" layout (LAYOUTS). Each checkpoint says the lowest
# version its tensors need, so a uniform 4/8-bit canonical one stays version 1 and reads unchanged in an
# older dbrxq; 5: symmetric 2-4 bit weights over all 2**bits levels, their scales signed (quantization_config
# .full_range; the dequantization formula is unchanged, so versions 1-4 read as before).
FORMAT_VERSION = 5
READABLE_FORMAT_VERSIONS = (1, 2, 3, 4, 5)
# How quantized weights are stored: "canonical" (qweight/scales/qzeros, above) or "blocks" (format_version 4:
# the CPU kernel's own layout, quantize.blocks; one <name>.qblocks tensor per weight, one
# ...ffn.experts.mlp.qblocks [E, stride] per layer's experts), which loads as a memory map, no repack.
LAYOUTS = ("blocks", "canonical")
BLOCKS_KERNEL_LAYOUT = 3  # the generation of the C kernel's blocks (dbrxq_layout_version) format_version 4 holds
# A mixed layer stores kind k's experts of recipe j (expert_mix.options[j]), in increasing expert id,
# as ``...ffn.experts.mlp.{k}.o{j}.qweight`` [E_j, N, packed] (+ .scales, .qzeros); no tensor for a
# recipe the layer does not use.
MIXED_PART = "o{}"
_MIXED_RE = re.compile(r"\.ffn\.experts\.mlp\.(w1|v1|w2)\.o(\d+)$")


def mixed_option(base: str) -> int | None:
    """The recipe index j of a per-recipe expert stack ``...ffn.experts.mlp.{k}.o{j}`` (a tensor name
    without its qweight/scales/qzeros suffix), else None."""
    m = _MIXED_RE.search(base)
    return int(m.group(2)) if m else None

QWEIGHT, SCALES, QZEROS = "qweight", "scales", "qzeros"

SUPPORTED_BITS = (2, 3, 4, 8)
# Group sizes a user may ask for; -1 (or K itself) means per-channel.
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
SCALE_DTYPE_NAME = "float16"


REPORT_NAME = "quantize_report.json"
