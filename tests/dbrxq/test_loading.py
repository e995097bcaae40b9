"""Loading a checkpoint into the model: strict matching, dtype/device handling, bounded memory."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dbrxq.errors import CheckpointError, ConfigError
from dbrxq.loading import load_model
from dbrxq.make_checkpoint import make_random_checkpoint, preset_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    make_random_checkpoint(folder, preset_config("tiny"), seed=3, progress=False)
    return folder


def _rewrite(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def _copy(ckpt, tmp_path):
    for f in ckpt.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def test_loads_in_checkpoint_dtype_by_default_and_converts_on_request(ckpt):
    m = load_model(ckpt)
    assert m.dtype == torch.bfloat16
    m32 = load_model(ckpt, dtype="float32")
    assert m32.dtype == torch.float32
    w = "transformer.blocks.1.ffn.experts.mlp.w2"
    assert torch.equal(m32.state_dict()[w], m.state_dict()[w].float())


def test_missing_tensor_is_named(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    _rewrite(folder, lambda t: t.pop("transformer.blocks.0.ffn.router.layer.weight"))
    with pytest.raises(CheckpointError, match="transformer.blocks.0.ffn.router.layer.weight not found"):
        load_model(folder)


def test_misshapen_tensor_is_named(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    name = "transformer.blocks.1.norm_attn_norm.attn.Wqkv.weight"
    _rewrite(folder, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with pytest.raises(CheckpointError, match=rf"{name} has shape .*expected"):
        load_model(folder)


def test_unexpected_tensor_is_named(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    _rewrite(folder, lambda t: t.__setitem__("transformer.blocks.9.extra", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensors transformer.blocks.9.extra"):
        load_model(folder)


def test_config_that_disagrees_with_weights(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_layers"] += 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="transformer.blocks.2.* not found"):
        load_model(folder)


def test_not_a_dbrx_config(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="config.json: config field model_type is 'llama'"):
        load_model(folder)


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak RSS while loading (and running once) stays near one copy of the weights."""
    cfg = preset_config("tiny", d_model=256, n_heads=4, kv_n_heads=2, ffn_hidden_size=512,
                        moe_num_experts=16, n_layers=4, vocab_size=1000)
    make_random_checkpoint(tmp_path, cfg, dtype=torch.float32, progress=False, max_shard_bytes=30 << 20)
    code = f"""
import resource, torch
from dbrxq.loading import load_model
base = int(open("/proc/self/statm").read().split()[1]) * 4096
m = load_model({str(tmp_path)!r}, dtype="float32")
m(torch.zeros(1, 4, dtype=torch.long))
size = sum(t.numel() * t.element_size() for t in m.state_dict().values())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(size, peak - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    size, grown = map(int, out.stdout.split())
    assert size > 100e6
    # one copy of the weights, plus allocator and activation slack; two copies would be 2x size
    assert grown <= 1.3 * size + 100e6, (size, grown)
