"""Tests of quantize.writer: the quantized checkpoint's names, dtypes, shapes and bytes follow
quantize/format.py; it loads through dbrxq's loader to the same logits as in-memory RTN; bad
checkpoints and bad outputs fail with one line; a failed run never leaves a config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dbrxq
import quantize.writer as qwriter
from dbrxq.core.errors import CheckpointError, DbrxqError, QuantizationError
from dbrxq.formats.checkpoint import CheckpointReader
from dbrxq.formats.random import make_random_checkpoint, preset_config
from quantize.config import ModuleQuant, QuantConfig
from quantize.modules import quantize_model_rtn
from quantize.primitives import unpack_int4
from quantize.rtn import experts_to_canonical, quantize_experts_rtn
from quantize.specs import quantized_tensor_specs
from quantize.writer import quantize_checkpoint

load_model = dbrxq.DbrxForCausalLM.from_pretrained
IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
RECIPES = {  # the canonical layout, whose tensors these tests spell out (the blocks layout: below)
    "default": QuantConfig(layout="canonical"),  # experts int4 g128, attn int8 per-channel, lm_head bf16
    "asym-lmhead": QuantConfig(experts=ModuleQuant(8, 32, False), attn=ModuleQuant(4, 64, False),
                               lm_head=ModuleQuant(8, -1, True), layout="canonical"),
    "attn-bf16": QuantConfig(experts=ModuleQuant(4, -1, True), attn=ModuleQuant(None), layout="canonical"),
    "int3": QuantConfig(experts=ModuleQuant(3, 64, True), layout="canonical"),  # format_version 5 (2 with positive scales)
    "int2-asym": QuantConfig(experts=ModuleQuant(2, 32, False), layout="canonical"),
}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A random bf16 DBRX checkpoint whose dims (128) take every group size."""
    config = preset_config("tiny", d_model=128, ffn_hidden_size=128)
    return make_random_checkpoint(tmp_path_factory.mktemp("src"), config, seed=3, progress=False)


@pytest.fixture(scope="module")
def quantized(src, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("q")
    return {k: quantize_checkpoint(src, root / k, qc, progress=False) for k, qc in RECIPES.items()}


@pytest.mark.parametrize("recipe", RECIPES)
def test_tensors_follow_the_format(src, quantized, recipe):
    qc, out = RECIPES[recipe], quantized[recipe]
    config = dbrxq.model.config.DbrxConfig.from_json(out / "config.json")
    with CheckpointReader(out) as r:
        got = [(n, r.shape(n), r.dtype(n)) for n in r.keys()]
        want = [(n, tuple(s), d) for n, s, d in quantized_tensor_specs(config, qc)]
        assert got == want  # names, shapes, dtypes and order (unquantized tensors stay bf16)
        base = "transformer.blocks.1.ffn.experts.mlp"
        with CheckpointReader(src) as s:
            for kind in ("w1", "v1", "w2"):  # the bytes are RTN of the canonical orientation
                mq = qc.experts
                qt = quantize_experts_rtn(s.get(f"{base}.{kind}"), kind, config.num_experts, mq.bits,
                                          mq.group_size, mq.symmetric)
                assert torch.equal(r.get(f"{base}.{kind}.qweight"), qt.qweight)
                assert torch.equal(r.get(f"{base}.{kind}.scales"), qt.scales)
            assert torch.equal(r.get("transformer.wte.weight"), s.get("transformer.wte.weight"))
        if recipe == "default":  # spell the formula out by hand for w2 of expert 5, int4 g128 sym
            w = experts_to_canonical(s_get(src, f"{base}.w2"), "w2", config.num_experts)[5].float()
            packed, scales = r.get(f"{base}.w2.qweight")[5], r.get(f"{base}.w2.scales")[5].float()
            low, high = (packed & 15).float(), (packed >> 4).float()  # columns 2j, 2j+1
            codes = torch.stack((low, high), -1).reshape(w.shape)
            w_hat = (codes - 8) * scales.repeat_interleave(128, dim=-1)
            assert torch.equal(codes, unpack_int4(packed).float())
            # all 16 levels: within |scale| / 2 of the grid, or clamped at its short end (<= 1.5 |scale|)
            err, step = (w_hat - w).abs(), scales.abs().repeat_interleave(128, -1)
            assert (err <= 1.5 * step * (1 + 1e-6)).all() and codes.min() == 0 and codes.max() == 15
            inside = (w / scales.repeat_interleave(128, -1)).abs() <= 7.5
            assert (err[inside] <= step[inside] / 2 * (1 + 1e-6)).all()


def s_get(folder, name):
    with CheckpointReader(folder) as r:
        return r.get(name)


def test_quantization_config_round_trips(src, quantized):
    for recipe, out in quantized.items():
        d = json.loads((out / "config.json").read_text())
        # symmetric 2-4 bit weights have signed scales (5); else a 4/8-bit checkpoint stays format_version 1
        # (older readers take it), and 2- and 3-bit need 2
        want = 5 if RECIPES[recipe].signed_scales else 2 if recipe.startswith("int") else 1
        assert d["quantization_config"]["format_version"] == want
        assert d.pop("quantization_config") == RECIPES[recipe].to_dict()
        assert QuantConfig.from_dict(RECIPES[recipe].to_dict()) == RECIPES[recipe]
        assert d == json.loads((src / "config.json").read_text())  # everything else as in SRC


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("backend", ["torch", None])
def test_loaded_logits_equal_in_memory_rtn(src, quantized, recipe, backend):
    for dtype in ("float32", None):  # None: the checkpoint's bf16
        loaded = load_model(quantized[recipe], dtype=dtype, backend=backend)
        ref = quantize_model_rtn(load_model(src, dtype=dtype), RECIPES[recipe], backend=backend)
        assert torch.equal(loaded(IDS).logits, ref(IDS).logits), (recipe, backend, dtype)


def test_sharded_and_chunked_output_is_the_same(src, quantized, tmp_path):
    out = quantize_checkpoint(src, tmp_path / "q", RECIPES["default"], progress=False,
                              max_shard_bytes=100_000, chunk_bytes=4096)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*"))) > 2
    with CheckpointReader(out) as a, CheckpointReader(quantized["default"]) as b:
        assert a.keys() == b.keys()
        assert all(torch.equal(a.get(n), b.get(n)) for n in a.keys())
    assert torch.equal(load_model(out)(IDS).logits, load_model(quantized["default"])(IDS).logits)


# ------------------------------------------------------------------------------------ bad inputs
def _broken_copy(folder: Path, tmp_path: Path, edit) -> Path:
    """Copy a single-file checkpoint, applying ``edit(tensors, config_dict)``."""
    out = tmp_path / "broken"
    out.mkdir()
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    return out


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_scales_is_one_line(quantized, tmp_path):
    name = "transformer.blocks.0.ffn.experts.mlp.v1.scales"
    broken = _broken_copy(quantized["default"], tmp_path, lambda t, c: t.pop(name))
    with pytest.raises(CheckpointError) as e:
        load_model(broken)
    assert name in _one_line(e)


def test_wrong_packed_shape_is_one_line(quantized, tmp_path):
    name = "transformer.blocks.1.norm_attn_norm.attn.Wqkv.qweight"

    def edit(t, c):  # int8 attn -> pretend it was packed like int4: [N, K/2]
        t[name] = t[name][:, ::2].contiguous()
    broken = _broken_copy(quantized["default"], tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(broken)
    assert name in _one_line(e) and "shape" in _one_line(e)


@pytest.mark.parametrize("field, value, match", [
    ("format_version", 6, "format_version=6"),  # a version newer than this dbrxq reads
    ("method", "awq", "method='awq'"),
])
def test_bad_quantization_config_is_one_line(quantized, tmp_path, field, value, match):
    broken = _broken_copy(quantized["default"], tmp_path,
                          lambda t, c: c["quantization_config"].__setitem__(field, value))
    with pytest.raises(QuantizationError) as e:
        load_model(broken)
    assert match in _one_line(e)


def test_existing_out_is_refused_without_overwrite(src, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(src, out, RECIPES["attn-bf16"], progress=False)
    with pytest.raises(QuantizationError, match="not empty; pass --overwrite") as e:
        quantize_checkpoint(src, out, RECIPES["default"], progress=False)
    _one_line(e)
    quantize_checkpoint(src, out, RECIPES["default"], progress=False, overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == RECIPES["default"].to_dict()
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", RECIPES["default"], progress=False)
    with pytest.raises(QuantizationError, match="is the source"):
        quantize_checkpoint(src, src, RECIPES["default"], progress=False, overwrite=True)
    with pytest.raises(QuantizationError, match=r"mlp\.w2 \(input dim 64\).*group_size=128"):
        small = preset_config("tiny", d_model=128, ffn_hidden_size=64)
        quantized_tensor_specs(small, RECIPES["default"])


def test_failure_midway_leaves_no_config_json(src, tmp_path, monkeypatch):
    out = tmp_path / "q"
    quantize_checkpoint(src, out, RECIPES["default"], progress=False)  # a complete earlier run
    calls = {"n": 0}
    real = qwriter.quantize_rtn

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)
    monkeypatch.setattr(qwriter, "quantize_rtn", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_checkpoint(src, out, RECIPES["asym-lmhead"], progress=False, overwrite=True)
    assert not (out / "config.json").exists()
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.tmp.*"))
    with pytest.raises(DbrxqError):  # and the folder does not load
        load_model(out)


def test_rtn_and_gptq_summaries_use_one_size_formatter(tmp_path):
    """Both quantize methods print sizes and rates with dbrxq.core.units.format_size (binary
    units): RTN printed MiB and MB/s, GPTQ "0.007 GB in" and GB per minute."""
    import re

    from click.testing import CliRunner

    from dbrxq.cli.app import cli

    outs = {}
    for method, extra in (("rtn", []), ("gptq", ["--calib-samples", "4", "--calib-seq-len", "32"])):
        r = CliRunner().invoke(cli, ["quantize", "demo", str(tmp_path / method), "--method", method, *extra])
        assert r.exit_code == 0, r.output
        outs[method] = r.output
    for method, out in outs.items():
        assert re.search(r"bytes +\d+\.\d\d MiB in, \d+\.\d\d MiB out", out), (method, out)
        assert re.search(r"\(\d+\.\d\d (KiB|MiB|GiB)/s of source\)", out), (method, out)
        summary = [line for line in out.splitlines() if line.startswith(("  bytes", "  time"))]
        assert len(summary) == 2 and not any(" GB" in line or "MB/s" in line for line in summary), (method, summary)


# ----------------------------------------------------------------------------- the blocks layout
@pytest.fixture(scope="module")
def in_blocks(src, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("b")
    return {k: quantize_checkpoint(src, root / k, dataclasses.replace(qc, layout="blocks"), progress=False)
            for k, qc in RECIPES.items()}


@pytest.mark.parametrize("recipe", RECIPES)
def test_blocks_layout_holds_the_same_codes_page_aligned(quantized, in_blocks, recipe):
    """The blocks layout writes the canonical writer's codes and scales in the kernel's bytes (unpacked:
    equal, tensor by tensor), every qblocks tensor starting on a 4 KiB page of its file."""
    from quantize.layout import to_canonical
    qc = dataclasses.replace(RECIPES[recipe], layout="blocks")
    config = dbrxq.model.config.DbrxConfig.from_json(in_blocks[recipe] / "config.json")
    with CheckpointReader(in_blocks[recipe]) as r, CheckpointReader(quantized[recipe]) as c:
        got = {n: r.get(n) for n in r.keys()}
        assert [(n, r.shape(n), r.dtype(n)) for n in r.keys()] == \
            [(n, tuple(s), d) for n, s, d in quantized_tensor_specs(config, qc)]
        blocks_names = [n for n in r.keys() if n.endswith(".qblocks")]
        assert blocks_names and all(r.data_offset(n) % 4096 == 0 for n in blocks_names)
        canonical = to_canonical(got, config, qc)
        assert sorted(canonical) == sorted(c.keys())
        for n in c.keys():
            assert torch.equal(canonical[n], c.get(n)), n
    d = json.loads((in_blocks[recipe] / "config.json").read_text())["quantization_config"]
    assert d["format_version"] == (5 if qc.signed_scales else 4) and d["layout"] == "blocks"


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("backend", ["torch", None])
def test_blocks_layout_loads_to_the_same_logits(quantized, in_blocks, recipe, backend):
    """The blocks layout is the canonical one in other bytes: the same logits, bit for bit, on the CPU
    kernel (which reads it in place) and on the torch reference (which unpacks it)."""
    for dtype in ("float32", None):
        a = load_model(quantized[recipe], dtype=dtype, backend=backend)(IDS).logits
        b = load_model(in_blocks[recipe], dtype=dtype, backend=backend)(IDS).logits
        assert torch.equal(a, b), (recipe, backend, dtype)


def test_checkpoints_of_positive_scales_still_load(src, tmp_path, monkeypatch):
    """What an older dbrxq wrote (format_version 1, symmetric int4 scales amax / 7 > 0, no full_range) still
    loads, to the same logits as the same numbers with signed scales: the grid d = q - 1 written now,
    each group of negative scale mirrored (code 16 - c, scale -s: (c' - 8) s' = (c - 8) s exactly)."""
    import quantize.primitives as prim
    monkeypatch.setattr(prim, "FULL_RANGE_OFFSETS", (-1.0,))  # only the old grid's width (codes 1..15)
    new = quantize_checkpoint(src, tmp_path / "new", RECIPES["default"], progress=False)
    old = tmp_path / "old"
    old.mkdir()
    flipped = 0
    for f in new.iterdir():
        if f.suffix != ".safetensors":
            (old / f.name).write_bytes(f.read_bytes())
            continue
        t = load_file(str(f))
        for name in [n for n in t if n.endswith(".scales") and ".ffn.experts." in n]:
            base = name[: -len(".scales")]
            s, codes = t[name], prim.unpack_codes(t[f"{base}.qweight"], 4)
            neg = (s < 0).repeat_interleave(codes.shape[-1] // s.shape[-1], dim=-1)
            assert int(codes.min()) >= 1  # the old grid: 15 levels
            t[f"{base}.qweight"] = prim.pack_codes(torch.where(neg, 16 - codes, codes), 4)
            t[name] = s.abs()
            flipped += int((s < 0).sum())
        save_file(t, str(old / f.name), metadata={"format": "pt"})
    assert flipped > 0
    d = json.loads((old / "config.json").read_text())
    assert d["quantization_config"].pop("full_range") is True
    d["quantization_config"]["format_version"] = 1
    (old / "config.json").write_text(json.dumps(d))
    for backend in ("torch", None):
        a, b = load_model(new, backend=backend), load_model(old, backend=backend)
        assert "full_range" not in b.config.quantization_config and a.config.quantization_config["full_range"]
        assert torch.equal(a(IDS).logits, b(IDS).logits), backend


def test_the_positive_only_grid_is_not_written(src, tmp_path):
    with pytest.raises(QuantizationError, match="full_range=false .* no longer written") as e:
        quantize_checkpoint(src, tmp_path / "q", dataclasses.replace(RECIPES["default"], full_range=False),
                            progress=False)
    _one_line(e)
