"""DbrxConfig: reading hub configs, derived fields, and one-line errors naming the field."""

import json

import pytest

from dbrxq.core.errors import ConfigError
from dbrxq.model.config import DbrxConfig

# The real DBRX config.json (databricks/dbrx-instruct), trimmed of nothing that we read.
DBRX = {
    "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "d_model": 6144, "n_heads": 48,
    "n_layers": 40, "max_seq_len": 32768, "vocab_size": 100352, "resid_pdrop": 0.0, "emb_pdrop": 0.0,
    "attn_config": {"kv_n_heads": 8, "clip_qkv": 8, "rope_theta": 500000},
    "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4,
                   "moe_jitter_eps": 0.01, "moe_loss_weight": 0.05, "moe_normalize_expert_weights": 1,
                   "ffn_act_fn": {"name": "silu"}},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "initializer_range": 0.02,
}


def test_real_dbrx_config_and_derived_fields():
    c = DbrxConfig.from_dict(DBRX)
    assert (c.head_dim, c.kv_n_heads, c.qkv_out_features) == (128, 8, 6144 + 2 * 8 * 128)
    assert (c.num_experts, c.top_k, c.ffn_hidden_size, c.activation) == (16, 4, 10752, "silu")
    assert c.attn_config.rope_theta == 500000 and c.attn_config.clip_qkv == 8


def test_rope_theta_read_from_attn_config_and_written_for_transformers():
    c = DbrxConfig.from_dict(DBRX)
    d = c.to_dict()
    assert d["attn_config"]["rope_theta"] == 500000
    assert d["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000}
    # transformers 5.x writes only rope_parameters: we fall back to it
    hf_style = {k: v for k, v in DBRX.items() if k != "attn_config"}
    hf_style["attn_config"] = {"kv_n_heads": 8, "clip_qkv": 8}
    hf_style["rope_parameters"] = {"rope_type": "default", "rope_theta": 123456.0}
    assert DbrxConfig.from_dict(hf_style).attn_config.rope_theta == 123456.0


def test_round_trip_keeps_unknown_keys(tmp_path):
    c = DbrxConfig.from_dict(DBRX)
    c.save(tmp_path / "config.json")
    again = DbrxConfig.from_json(tmp_path / "config.json")
    assert again == c
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_transformers_defaults_for_missing_fields():
    c = DbrxConfig.from_dict({"model_type": "dbrx"})
    assert (c.d_model, c.n_heads, c.n_layers, c.kv_n_heads, c.top_k, c.num_experts) == (2048, 16, 24, 1, 1, 4)
    assert c.ffn_config.moe_loss_weight == 0.01 and c.attn_config.clip_qkv is None


@pytest.mark.parametrize("patch, message", [
    ({"d_model": 6100}, "d_model (6100) must be divisible by n_heads (48)"),
    ({"n_heads": 0}, "field n_heads must be an integer in [1, 1024], got 0"),
    ({"attn_config": {"kv_n_heads": 7}}, "attn_config.kv_n_heads (7) must divide n_heads (48)"),
    ({"ffn_config": {"moe_num_experts": 4, "moe_top_k": 5}}, "field ffn_config.moe_top_k must be an integer in [1, 4], got 5"),
    ({"ffn_config": {"ffn_act_fn": {"name": "swish2"}}}, "ffn_act_fn.name is 'swish2'"),
    ({"attn_config": {"kv_n_heads": 8, "clip_qkv": -1}}, "field attn_config.clip_qkv must be a finite positive number or null, got -1"),
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"vocab_size": "big"}, "field vocab_size must be an integer in [1, 4194304], got 'big'"),
])
def test_bad_config_names_the_field(patch, message):
    d = json.loads(json.dumps(DBRX))
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    with pytest.raises(ConfigError) as e:
        DbrxConfig.from_dict(d)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_json_file_names_the_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        DbrxConfig.from_json(p)
    with pytest.raises(ConfigError, match="config.json: no such file"):
        DbrxConfig.from_json(tmp_path / "nope" / "config.json")
