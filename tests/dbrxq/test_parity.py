"""Parity with the reference: transformers' DbrxForCausalLM (5.23), float32.

Checkpoints are written by transformers' own save_pretrained (single file and sharded) and loaded
by dbrxq's loader. Tolerance: both sides run the same float32 operations in a different order
(grouped expert matmuls, SDPA with an explicit mask), so differences are a few float32 ulps of
the largest magnitude involved; we allow 1e-5 relative to that magnitude (about 80 ulps), which
still catches any real bug (a wrong RoPE base or a missing clamp moves logits by >1e-2 relative).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dbrxq import DbrxForCausalLM  # noqa: E402
from dbrxq.runtime.generate import generate  # noqa: E402

RTOL = 1e-5

CONFIGS = {
    # GQA 4:2, clamp active, DBRX's RoPE base, top-3 of 8 with L1-normalised weights.
    "gqa_clip": dict(d_model=64, n_heads=4, n_layers=3, max_seq_len=96, vocab_size=131,
                     attn_config=dict(kv_n_heads=2, clip_qkv=0.25, rope_theta=500000.0),
                     ffn_config=dict(ffn_hidden_size=48, moe_num_experts=8, moe_top_k=3, moe_loss_weight=0.05)),
    # MQA, DBRX's clamp (8: inactive at these magnitudes), RoPE base 10000, top-1 of 4 without weight
    # normalisation, wider heads. (clip_qkv=None crashes transformers 5.23's own forward:
    # clamp(min=None, max=None); test_no_clip_equals_huge_clip covers that path on our side.)
    "mqa_top1": dict(d_model=96, n_heads=3, n_layers=2, max_seq_len=64, vocab_size=77,
                     attn_config=dict(kv_n_heads=1, clip_qkv=8.0, rope_theta=10000.0),
                     ffn_config=dict(ffn_hidden_size=40, moe_num_experts=4, moe_top_k=1,
                                     moe_normalize_expert_weights=None, moe_loss_weight=0.01)),
}


def hf_config(d: dict):
    d = dict(d, initializer_range=0.1)  # larger than the default so logits are not all ~0
    # transformers 5.x reads RoPE's base from rope_parameters; the hub's field is attn_config.rope_theta.
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": d["attn_config"]["rope_theta"]}
    return transformers.DbrxConfig(**d)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= RTOL * max(a.abs().max().item(), 1.0)


@pytest.fixture(scope="module", params=["gqa_clip", "mqa_top1", "gqa_clip-sharded"])
def pair(request, tmp_path_factory):
    """(reference model, our model loaded from the checkpoint the reference saved)."""
    name, _, sharded = request.param.partition("-")
    torch.manual_seed(1234)
    ref = transformers.DbrxForCausalLM(hf_config(CONFIGS[name])).eval()
    folder = tmp_path_factory.mktemp(request.param)
    if sharded:
        ref.save_pretrained(folder, max_shard_size="60KB")
        assert (folder / "model.safetensors.index.json").exists()
    else:
        ref.save_pretrained(folder)
        assert (folder / "model.safetensors").exists()
    return ref, DbrxForCausalLM.from_pretrained(folder, dtype="float32")


def _ids(vocab, shape, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_forward_outputs_match(pair):
    ref, ours = pair
    ids = _ids(ref.config.vocab_size, (2, 21))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        r = ref(ids, labels=labels, output_router_logits=True, output_hidden_states=True)
        o = ours(ids, labels=labels, output_router_logits=True, output_hidden_states=True)
    assert close(r.logits, o.logits)
    assert len(r.router_logits) == len(o.router_logits) == ref.config.n_layers
    for a, b in zip(r.router_logits, o.router_logits):
        assert a.shape == b.shape and close(a, b)
    assert len(r.hidden_states) == len(o.hidden_states)
    for a, b in zip(r.hidden_states, o.hidden_states):
        assert close(a, b)
    assert abs(r.aux_loss.item() - o.aux_loss.item()) <= RTOL * abs(r.aux_loss.item())
    assert abs(r.loss.item() - o.loss.item()) <= RTOL * abs(r.loss.item())
    # the aux loss really is in the loss (weighted), as in transformers
    plain = ours(ids, labels=labels, output_router_logits=False).loss
    assert abs((o.loss - plain).item() - ours.config.ffn_config.moe_loss_weight * o.aux_loss.item()) < 1e-5


def test_padded_forward_and_aux_loss_match(pair):
    ref, ours = pair
    ids = _ids(ref.config.vocab_size, (3, 13), seed=1)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    with torch.no_grad():
        r = ref(ids, attention_mask=mask, output_router_logits=True)
        o = ours(ids, attention_mask=mask, output_router_logits=True)
    keep = mask.bool()
    assert close(r.logits[keep], o.logits[keep])
    assert abs(r.aux_loss.item() - o.aux_loss.item()) <= RTOL * abs(r.aux_loss.item())


def test_logits_to_keep_and_tuple_return(pair):
    _, ours = pair
    ids = _ids(ours.config.vocab_size, (1, 9), seed=2)
    full = ours(ids).logits
    assert close(ours(ids, logits_to_keep=3).logits, full[:, -3:])
    assert close(ours(ids, logits_to_keep=torch.tensor([0, 4])).logits, full[:, [0, 4]])
    out = ours(ids, return_dict=False, use_cache=False)
    assert isinstance(out, tuple) and torch.equal(out[0], full)


def test_inputs_embeds_equals_input_ids(pair):
    _, ours = pair
    ids = _ids(ours.config.vocab_size, (2, 7), seed=3)
    a = ours(ids).logits
    b = ours(inputs_embeds=ours.transformer.wte(ids)).logits
    assert torch.equal(a, b)


def test_incremental_decoding_equals_full_forward(pair):
    _, ours = pair
    ids = _ids(ours.config.vocab_size, (2, 19), seed=4)
    full = ours(ids, use_cache=False).logits
    cache = ours.new_cache(2, 8)  # deliberately too small: it must grow, not fail
    parts = [ours(ids[:, :8], past_key_values=cache).logits]
    parts += [ours(ids[:, t:t + 1], past_key_values=cache).logits for t in range(8, 15)]
    parts.append(ours(ids[:, 15:], past_key_values=cache).logits)  # a multi-token chunk after decode steps
    assert cache.get_seq_length() == 19
    assert close(full, torch.cat(parts, dim=1))


def test_greedy_generation_matches_transformers(pair):
    ref, ours = pair
    prompt = _ids(ref.config.vocab_size, (1, 7), seed=5)
    n = 24
    r = ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                     pad_token_id=0)
    o = generate(ours, [prompt[0].tolist()], max_new_tokens=n)
    assert o.sequences[0] == r[0, prompt.shape[1]:].tolist()


def test_padded_batch_generation_equals_single_prompts(pair):
    _, ours = pair
    v = ours.config.vocab_size
    prompts = [_ids(v, (n,), seed=10 + n).tolist() for n in (3, 11, 6)]
    batch = generate(ours, prompts, max_new_tokens=16)
    for p, seq in zip(prompts, batch.sequences):
        assert seq == generate(ours, [p], max_new_tokens=16).sequences[0]


def test_tied_head_matches_reference_with_copied_embedding(tmp_path):
    # transformers 5.23 refuses tie_word_embeddings for DBRX; a tied head is an untied one whose
    # weight is the embedding, so compare against the reference with lm_head := wte.
    torch.manual_seed(7)
    ref = transformers.DbrxForCausalLM(hf_config(CONFIGS["gqa_clip"])).eval()
    with torch.no_grad():
        ref.lm_head.weight.copy_(ref.transformer.wte.weight)
    ref.save_pretrained(tmp_path)
    import json
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = DbrxForCausalLM.from_pretrained(tmp_path, dtype="float32")
    assert ours.lm_head is None
    ids = _ids(ref.config.vocab_size, (1, 10), seed=6)
    with torch.no_grad():
        assert close(ref(ids).logits, ours(ids).logits)


def test_no_clip_equals_huge_clip(pair):
    _, ours = pair
    ids = _ids(ours.config.vocab_size, (1, 9), seed=8)
    clips = [attn.clip_qkv for attn in (b.norm_attn_norm.attn for b in ours.transformer.blocks)]
    try:
        for b in ours.transformer.blocks:
            b.norm_attn_norm.attn.clip_qkv = None
        a = ours(ids).logits
        for b in ours.transformer.blocks:
            b.norm_attn_norm.attn.clip_qkv = 1e9
        assert torch.equal(a, ours(ids).logits)
    finally:
        for b, c in zip(ours.transformer.blocks, clips):
            b.norm_attn_norm.attn.clip_qkv = c
