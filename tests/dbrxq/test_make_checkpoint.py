"""The random checkpoint maker: seeded, chunk-size independent, hub layout, loadable by transformers,
and its CLI script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dbrxq.core.errors import CheckpointError, ConfigError
from dbrxq.formats.checkpoint import CheckpointReader, hub_tensor_shapes, read_config
from dbrxq.formats.random import make_random_checkpoint, preset_config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_checkpoint.py"


def _tensors(folder) -> dict[str, torch.Tensor]:
    with CheckpointReader(folder) as r:
        return {name: r.get(name) for name in r.keys()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = preset_config("tiny")
    return config, make_random_checkpoint(tmp_path_factory.mktemp("tiny"), config, seed=1, progress=False)


def test_shapes_dtype_and_init(tiny):
    config, folder = tiny
    shapes = hub_tensor_shapes(config)
    with CheckpointReader(folder) as r:
        assert r.keys() == list(shapes)
        assert {n: r.shape(n) for n in r.keys()} == shapes
        assert all(r.dtype(n) == torch.bfloat16 for n in r.keys())
        assert torch.equal(r.get("transformer.blocks.1.norm_attn_norm.norm_2.weight").float(), torch.ones(64))
        w1 = r.get("transformer.blocks.0.ffn.experts.mlp.w1", dtype=torch.float32)
        assert abs(w1.std().item() - config.initializer_range) < 0.002 and abs(w1.mean().item()) < 0.002
    assert read_config(folder).to_dict() == config.to_dict() | {"torch_dtype": "bfloat16"}


def test_deterministic_for_a_seed(tiny, tmp_path):
    config, folder = tiny
    again = make_random_checkpoint(tmp_path / "again", config, seed=1, progress=False)
    for name in ("model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes()
    other = _tensors(make_random_checkpoint(tmp_path / "other", config, seed=2, progress=False))
    assert not torch.equal(other["transformer.wte.weight"], _tensors(folder)["transformer.wte.weight"])


def test_independent_of_chunk_and_shard_size(tmp_path):
    # vocab 4096 x d 64: wte spans 4 RNG blocks, written 1 block per chunk vs all at once.
    config = preset_config("tiny", vocab_size=4096, n_layers=1)
    a = make_random_checkpoint(tmp_path / "a", config, seed=3, chunk_bytes=1, progress=False)
    b = make_random_checkpoint(tmp_path / "b", config, seed=3, max_shard_bytes=300_000, progress=False)
    assert (b / "model.safetensors.index.json").exists() and not (a / "model.safetensors.index.json").exists()
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[n], tb[n]) for n in ta)


def test_loads_into_transformers(tiny):
    from transformers import DbrxForCausalLM
    config, folder = tiny
    model, info = DbrxForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    for name, t in _tensors(folder).items():
        assert torch.equal(state[name].to(t.dtype), t), name


def test_pad_row_zero_and_float32(tmp_path):
    config = preset_config("tiny", n_layers=1)
    config.pad_token_id = 5
    t = _tensors(make_random_checkpoint(tmp_path, config, dtype=torch.float32, progress=False))
    wte = t["transformer.wte.weight"]
    assert wte.dtype == torch.float32 and torch.all(wte[5] == 0) and torch.all(wte[4] != 0)


def test_tokenizer_files_copied(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "cl100k_base.tiktoken").write_text("x")
    (tok / "unrelated.txt").write_text("x")
    out = make_random_checkpoint(tmp_path / "out", preset_config("tiny", n_layers=1), tokenizer_dir=tok,
                                 progress=False)
    assert (out / "tokenizer.json").exists() and (out / "cl100k_base.tiktoken").exists()
    assert not (out / "unrelated.txt").exists()
    (tok / "tokenizer.json").unlink()
    (tok / "cl100k_base.tiktoken").unlink()
    with pytest.raises(CheckpointError, match=r"tok: no tokenizer files"):
        make_random_checkpoint(tmp_path / "out2", preset_config("tiny", n_layers=1), tokenizer_dir=tok,
                               progress=False)


def test_presets():
    dbrx = preset_config("dbrx")
    assert (dbrx.d_model, dbrx.n_heads, dbrx.kv_n_heads, dbrx.n_layers, dbrx.vocab_size) == (6144, 48, 8, 40, 100352)
    assert (dbrx.num_experts, dbrx.ffn_hidden_size, dbrx.top_k, dbrx.qkv_out_features) == (16, 10752, 4, 8192)
    two = preset_config("dbrx", n_layers=2, vocab_size=1024, moe_top_k=2)
    assert (two.n_layers, two.vocab_size, two.top_k, two.d_model) == (2, 1024, 2, 6144)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset_config("huge")
    with pytest.raises(ConfigError, match="unknown preset override 'layers'"):
        preset_config("tiny", layers=3)


def test_script(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_checkpoint_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "ck"
    assert script.main([str(out), "--preset", "tiny", "--layers", "1", "--vocab-size", "256",
                        "--max-shard-size", "100KB", "--seed", "7", "--no-progress"]) == 0
    config = read_config(out)
    assert (config.n_layers, config.vocab_size) == (1, 256)
    assert (out / "model.safetensors.index.json").exists()
    assert _tensors(out).keys() == hub_tensor_shapes(config).keys()
    assert script.main([str(tmp_path / "bad"), "--preset", "tiny", "--n-heads", "3", "--no-progress"]) == 2
    assert "field d_model (64) must be divisible by n_heads (3)" in capsys.readouterr().err
    assert script.parse_size("5GiB") == 5 * 2**30 and script.parse_size("100KB") == 100_000
    # --random-codes: one recipe, or per-expert recipes in expert order (docs/benchmarks.md's mixed real-width run)
    mixed = tmp_path / "mixed"
    assert script.main([str(mixed), "--preset", "tiny", "--d-model", "128", "--ffn-hidden-size", "128",
                        "--random-codes", "4:4,3:6,2:6", "--no-progress"]) == 0
    mix = read_config(mixed).quantization_config["expert_mix"]
    assert mix["choice"] == [[2] * 4 + [1] * 6 + [0] * 6] * 2
    assert script.main([str(tmp_path / "b2"), "--preset", "tiny", "--random-codes", "4:5,2:5", "--no-progress"]) == 2
    assert "counts summing to the 16 experts" in capsys.readouterr().err


@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, False)])
def test_random_quantized_checkpoint_loads_with_the_float_spread(tmp_path, bits, symmetric):
    """The benchmarks' direct quantized checkpoint: every tensor the format names, loadable, and the
    dequantized experts spread like make_random_checkpoint's (std within 15% of initializer_range:
    uniform codes of std sqrt((4^b - 1) / 12) times scales of mean initializer_range / that std)."""
    from dbrxq import DbrxForCausalLM
    from quantize.config import ModuleQuant, QuantConfig
    from quantize.random import make_random_quantized_checkpoint

    config = preset_config("tiny")
    qc = QuantConfig(experts=ModuleQuant(bits=bits, group_size=32, symmetric=symmetric))
    out = make_random_quantized_checkpoint(tmp_path / "q", config, qc, seed=3, progress=False)
    again = make_random_quantized_checkpoint(tmp_path / "q2", config, qc, seed=3, progress=False)
    assert _tensors(out).keys() == _tensors(again).keys()
    assert all(torch.equal(a, b) for a, b in zip(_tensors(out).values(), _tensors(again).values()))  # seeded
    model = DbrxForCausalLM.from_pretrained(out)
    w = model.transformer.blocks[0].ffn.experts.expert_weights(2)[0].dequantize(torch.float32)
    assert abs(w.std().item() / config.initializer_range - 1) < 0.15
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_random_quantized_checkpoint_with_per_expert_recipes(tmp_path):
    """With an expert_mix each expert is written in its recipe's stack and loads with its recipe."""
    from dbrxq import DbrxForCausalLM
    from quantize.config import ExpertMix, ModuleQuant, QuantConfig
    from quantize.random import make_random_quantized_checkpoint

    config = preset_config("tiny", d_model=128, ffn_hidden_size=128)
    options = (ModuleQuant(2, 64, False), ModuleQuant(3, 64, False), ModuleQuant(4, 128, True))
    choice = tuple(tuple((e + i) % 3 for e in range(16)) for i in range(2))
    out = make_random_quantized_checkpoint(tmp_path / "q", config, QuantConfig(expert_mix=ExpertMix(options, choice)),
                                           progress=False)
    model = DbrxForCausalLM.from_pretrained(out)
    for i, block in enumerate(model.transformer.blocks):
        for e in range(16):
            qt = block.ffn.experts.expert_weights(e)[0]
            assert qt.bits == options[choice[i][e]].bits
            w = qt.dequantize(torch.float32)
            assert abs(w.std().item() / config.initializer_range - 1) < 0.2
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
