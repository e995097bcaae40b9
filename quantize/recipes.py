"""llama.cpp's K-quant mixes (``llama-quantize``'s Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K) for DBRX's tensors.

``llama_tensor_get_type`` in llama.cpp picks a type per tensor from the file type, the tensor's
name and its layer. For DBRX's tensors (16 experts, the fused ``attn_qkv`` taking ``attn_v``'s rules)
it comes to (checked tensor by tensor against ``llama_model_quantize`` of llama-cpp-python 0.3.36):

| tensor | Q2_K | Q3_K_M | Q4_K_M | Q5_K_M | Q6_K |
|---|---|---|---|---|---|
| output | Q6_K | Q6_K | Q6_K | Q6_K | Q6_K |
| token_embd | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K |
| attn_qkv | Q4_K (Q3_K below 4 query heads per KV head) | Q5_K in layers 0-1, else Q4_K | Q6_K where more bits, else Q4_K | Q6_K where more bits, else Q5_K | Q6_K |
| attn_output | Q3_K | Q4_K | Q4_K | Q5_K | Q6_K |
| ffn_down_exps | Q3_K | Q5_K in the first n/16 layers, else Q4_K | Q6_K where more bits, else Q4_K | Q6_K where more bits, else Q5_K | Q6_K |
| ffn_gate_exps, ffn_up_exps | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K |

"Where more bits" is llama.cpp's ``use_more_bits(i, n)``: the first and last eighth of the layers and
every third layer between. A row that is not whole 256-value blocks cannot hold a K-type: llama.cpp
falls back to Q5_0/Q5_1/IQ4_NL/Q8_0, dbrxq (which writes none of the first three) to Q8_0, or F16
when the row is not whole 32-blocks either.
"""

from __future__ import annotations

from quantize.kquants import QK_K

RECIPES = {"q2_k": "Q2_K", "q3_k_m": "Q3_K", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}  # -> base type
FILE_TYPES = {"q2_k": "MOSTLY_Q2_K", "q3_k_m": "MOSTLY_Q3_K_M", "q4_k_m": "MOSTLY_Q4_K_M",
              "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}  # gguf.LlamaFileType names


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(recipe: str, gguf_name: str, n_layers: int, gqa: int) -> str:
    """The GGML type llama.cpp's ``recipe`` gives the DBRX tensor ``gguf_name`` (``gqa``: query heads
    per KV head) before the fallback for rows that are not whole blocks (:func:`fit_type`)."""
    base = RECIPES[recipe]
    if gguf_name == "output.weight":
        return "Q6_K"
    if gguf_name == "token_embd.weight":
        return base
    layer = int(gguf_name.split(".")[1])
    if "attn_qkv" in gguf_name:  # llama.cpp treats the fused QKV as it treats attn_v
        if recipe == "q2_k":
            return "Q4_K" if gqa >= 4 else "Q3_K"
        if recipe == "q3_k_m":
            return "Q5_K" if layer < 2 else "Q4_K"
        if recipe in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            return "Q6_K"
        return base
    if "attn_output" in gguf_name:
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K"}.get(recipe, base)
    if "ffn_down" in gguf_name:
        if recipe == "q2_k":
            return "Q3_K"
        if recipe == "q3_k_m":
            return "Q5_K" if layer < n_layers // 16 else "Q4_K"
        if recipe in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            return "Q6_K"
    return base


def fit_type(ggml_type: str, k: int) -> str:
    """``ggml_type``, or what dbrxq writes instead for rows of ``k`` values that are not whole blocks."""
    if ggml_type.endswith("_K") and k % QK_K:
        return "Q8_0" if k % 32 == 0 else "F16"
    return ggml_type
