"""Loading a checkpoint into the model: strict matching, dtype/device handling, bounded memory."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dbrxq.core.errors import CheckpointError, ConfigError
from dbrxq.formats.random import make_random_checkpoint, preset_config
from dbrxq.loading.loader import load_model


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
    with pytest.raises(CheckpointError, match="not in the checkpoint, e.g. transformer.blocks.0.ffn.router.layer.weight"):
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
    with pytest.raises(CheckpointError, match=r"e.g. transformer.blocks.2.norm_attn_norm.norm_1.weight \(config.json says n_layers 3; the checkpoint holds 2 blocks\)"):
        load_model(folder)


def test_not_a_dbrx_config(ckpt, tmp_path):
    folder = _copy(ckpt, tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="config.json: field model_type is 'llama'"):
        load_model(folder)


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak RSS while loading (and running once) stays near one copy of the weights."""
    cfg = preset_config("tiny", d_model=512, n_heads=8, kv_n_heads=2, ffn_hidden_size=1024,
                        moe_num_experts=16, n_layers=4, vocab_size=1000)
    make_random_checkpoint(tmp_path, cfg, dtype=torch.float32, progress=False, max_shard_bytes=100 << 20)
    code = f"""
import resource, torch
from dbrxq.loading.loader import load_model
from dbrxq.formats.random import preset_config
from dbrxq.model.dbrx import DbrxForCausalLM
# one-time runtime initialisation (lazy imports, oneDNN, allocator pools: ~100 MB, varying with the
# environment) happens in a throw-away forward, not inside the measured window
DbrxForCausalLM(preset_config("tiny")).init_weights()(torch.zeros(1, 4, dtype=torch.long))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
m = load_model({str(tmp_path)!r}, dtype="float32")
m(torch.zeros(1, 4, dtype=torch.long))
size = sum(t.numel() * t.element_size() for t in m.state_dict().values())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(size, peak - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    size, grown = map(int, out.stdout.split())
    assert size > 400e6
    # one copy of the weights plus slack; a second copy would make it >= 2 x size
    assert grown <= 1.5 * size, (size, grown)


@pytest.fixture(scope="module")
def quantized(ckpt, tmp_path_factory):
    from quantize.config import ModuleQuant, QuantConfig
    from quantize.writer import quantize_checkpoint
    out = tmp_path_factory.mktemp("q")
    qc = QuantConfig(experts=ModuleQuant(4, 32, True))  # the tiny preset's d_model is 64
    quantize_checkpoint(ckpt, out, qc, overwrite=True, progress=False)
    return out


def test_quantized_checkpoint_loads_in_the_embedding_dtype(quantized):
    # the first float tensor of a quantized checkpoint may be a float16 `scales`: not the model dtype
    assert load_model(quantized).dtype == torch.bfloat16


def test_quantized_tensor_of_wrong_dtype_is_refused(quantized, tmp_path):
    folder = _copy(quantized, tmp_path)
    name = "transformer.blocks.0.ffn.experts.mlp.v1.qweight"
    _rewrite(folder, lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)))
    with pytest.raises(CheckpointError, match=rf"{name} has dtype torch.bfloat16, expected torch.uint8"):
        load_model(folder)


def test_quantized_load_gives_checkpoint_pages_back(tmp_path):
    """After the kernels repack the codes, the file-backed canonical pages leave our RSS."""
    from quantize.config import QuantConfig
    from quantize.writer import quantize_checkpoint
    cfg = preset_config("tiny", d_model=512, n_heads=4, kv_n_heads=2, ffn_hidden_size=1024,
                        moe_num_experts=16, n_layers=2, vocab_size=512)
    make_random_checkpoint(tmp_path / "f", cfg, progress=False)
    quantize_checkpoint(tmp_path / "f", tmp_path / "q", QuantConfig(layout="canonical"), progress=False)
    code = f"""
import sys
def rss_file():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssFile")).split()[1]) * 1024
import dbrxq.core.pages
if sys.argv[1] == "keep":  # the same load with the release switched off, for comparison
    dbrxq.core.pages.PageReleaser.__call__ = lambda self, t: None
from dbrxq.loading.loader import load_model
from quantize import cext
cext.load()
base = rss_file()
m = load_model({str(tmp_path / "q")!r})
print(rss_file() - base)
"""
    grown = {}
    for mode in ("release", "keep"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        grown[mode] = int(out.stdout)
    size = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert size > 25e6
    # kept, every canonical byte the repack read stays mapped; released, at most a few pages remain
    assert grown["keep"] > 0.8 * size, (grown, size)
    assert grown["release"] < grown["keep"] - 0.7 * size, (grown, size)
