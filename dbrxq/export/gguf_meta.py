"""GGUF metadata for a DBRX checkpoint: llama.cpp's hyperparameter keys, the tokenizer (gpt2 BPE with the
dbrx pre-tokenizer, tokens padded to the embedding rows, specials as CONTROL, merges) and
DBRX-instruct's chat template.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from dbrxq.core.errors import TokenizerError
from dbrxq.model.config import DbrxConfig
from dbrxq.text.tokenizer import (
    CL100K_PATTERN,
    CL100K_PATTERN_HF,
    DEFAULT_SYSTEM_PROMPT,
    DbrxTokenizer,
    bytes_to_unicode,
)
from dbrxq.text.vocab import bpe_merges

# gguf token types (llama.cpp's llama_token_type)
NORMAL, CONTROL, UNUSED = 1, 3, 5
LAYER_NORM_EPS = 1e-5  # DBRX's LayerNorms (dbrxq.model)


# DBRX instruct's chat template, the one dbrxq.tokenizer.apply_chat_template renders (tested equal).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% elif not 'system' in messages[0]['role'] %}{% set loop_messages = messages %}"
    "{% set system_message = DEFAULT_SYSTEM %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 %}"
    "{% if system_message != false %}{{ '<|im_start|>system\\n' + system_message | trim + '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% else %}{{ '\\n<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}{% endif %}"
    "{% if (add_generation_prompt and loop.last) %}{{ '\\n<|im_start|>assistant\\n' }}{% endif %}{% endfor %}"
)


def chat_template() -> str:
    """CHAT_TEMPLATE with DBRX's default system prompt spelled out as a jinja string literal."""
    return CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", json.dumps(DEFAULT_SYSTEM_PROMPT))


def gguf_vocab(tok: DbrxTokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for llama.cpp's ``gpt2`` tokenizer, ``n_vocab`` entries.

    Token i is the byte-level spelling (GPT-2's byte -> character table) of the BPE token of
    rank i, or the special token's text, or ``[PADi]`` for an id without a token.
    """

    if tok.pat_str not in (CL100K_PATTERN, CL100K_PATTERN_HF):
        raise TokenizerError(f"{tok.source}: its split pattern is not cl100k_base's, and GGUF's 'dbrx' "
                             f"pre-tokenizer splits text only that way; cannot export this tokenizer")
    if tok.vocab_size > n_vocab:
        raise TokenizerError(f"{tok.source}: {tok.vocab_size} token ids but the model's embedding has "
                             f"{n_vocab} rows")
    b2u = bytes_to_unicode()
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for t, i in tok.mergeable_ranks.items():
        tokens[i] = "".join(b2u[b] for b in t)
        types[i] = NORMAL
    for s, i in tok.special_tokens.items():
        tokens[i] = s
        types[i] = CONTROL
    merges = ["".join(b2u[b] for b in a) + " " + "".join(b2u[b] for b in b_) for a, b_ in bpe_merges(tok.mergeable_ranks)]
    return tokens, types, merges


def add_hparams(w, config: DbrxConfig) -> None:
    """The ``dbrx.*`` keys llama.cpp's DBRX loader reads, on a gguf.GGUFWriter."""
    c = config
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.ffn_hidden_size)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.kv_n_heads)
    w.add_rope_freq_base(float(c.attn_config.rope_theta))
    clip = c.attn_config.clip_qkv
    # llama.cpp's DBRX clamps unconditionally: no clip is a clamp at float32's largest value.
    w.add_clamp_kqv(float(clip) if clip is not None else float(np.finfo(np.float32).max))
    w.add_layer_norm_eps(LAYER_NORM_EPS)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.top_k)


def add_metadata(w, config: DbrxConfig, tok: DbrxTokenizer, file_type, name: str, qcfg) -> None:
    import gguf
    c = config
    w.add_name(name)
    add_hparams(w, c)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = gguf_vocab(tok, c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("dbrx")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    special = tok.special_tokens
    eos = tok.eos_token_ids
    if eos:
        w.add_bos_token_id(eos[0])  # DBRX has no BOS and adds none (add_bos_token false below)
        w.add_eos_token_id(eos[0])
    if "<|im_end|>" in special:
        w.add_eot_token_id(special["<|im_end|>"])
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template())
    if qcfg is not None:
        # the recipe of the codes: how the source stored them (its layout) is not the GGUF's business
        canonical = dataclasses.replace(qcfg, layout="canonical").to_dict()
        w.add_string("dbrxq.quantization_config", json.dumps(canonical, sort_keys=True))
