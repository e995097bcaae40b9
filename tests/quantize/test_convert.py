"""dbrxq convert: a quantized checkpoint in the other layout, number for number, either way."""

import json

import pytest
import torch

import dbrxq
from dbrxq.core.errors import DbrxqError
from dbrxq.formats.checkpoint import CheckpointReader
from dbrxq.loading.loader import load_model
from quantize.config import ExpertMix, ModuleQuant, QuantConfig
from quantize.convert import convert_checkpoint
from quantize.writer import quantize_checkpoint

IDS = torch.tensor([[5, 17, 99, 3, 250, 7]])


def tensors(folder):
    with CheckpointReader(folder) as r:
        return {n: r.get(n).clone() for n in r.keys()}


@pytest.mark.parametrize("recipe", [QuantConfig(), QuantConfig(experts=ModuleQuant(3, 64, False),
                                                               attn=ModuleQuant(4, 32, True))])
def test_round_trip_is_exact_and_equals_a_direct_write(tmp_path, recipe):
    import dataclasses
    canonical = quantize_checkpoint(dbrxq.default_model_dir(), tmp_path / "c",
                                    dataclasses.replace(recipe, layout="canonical"), progress=False)
    direct = quantize_checkpoint(dbrxq.default_model_dir(), tmp_path / "b",
                                 dataclasses.replace(recipe, layout="blocks"), progress=False)
    blocks = convert_checkpoint(canonical, tmp_path / "to_blocks", progress=False)
    back = convert_checkpoint(blocks, tmp_path / "back", layout="canonical", progress=False)
    a, b = tensors(blocks), tensors(direct)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    c, d = tensors(canonical), tensors(back)
    assert c.keys() == d.keys() and all(torch.equal(c[n], d[n]) for n in c)
    assert json.loads((back / "config.json").read_text())["quantization_config"] == \
        json.loads((canonical / "config.json").read_text())["quantization_config"]
    ref = load_model(canonical)(IDS).logits
    assert torch.equal(load_model(blocks)(IDS).logits, ref)


def test_per_expert_recipes_convert(tmp_path):
    from quantize.random import make_random_quantized_checkpoint
    from dbrxq.formats.random import preset_config
    config = preset_config("tiny", d_model=128, ffn_hidden_size=128)
    options = (ModuleQuant(2, 64, False), ModuleQuant(4, 128, True))
    mix = ExpertMix(options, tuple(tuple((e + i) % 2 for e in range(16)) for i in range(2)))
    src = make_random_quantized_checkpoint(tmp_path / "c", config, QuantConfig(expert_mix=mix, layout="canonical"),
                                           progress=False)
    out = convert_checkpoint(src, tmp_path / "b", progress=False)
    assert "transformer.blocks.0.ffn.experts.mlp.o1.qblocks" in tensors(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(load_model(out)(ids).logits, load_model(src)(ids).logits)


def test_refusals_are_one_line(tmp_path):
    c = quantize_checkpoint(dbrxq.default_model_dir(), tmp_path / "c", QuantConfig(layout="canonical"), progress=False)
    with pytest.raises(DbrxqError, match="a float checkpoint"):
        convert_checkpoint(dbrxq.default_model_dir(), tmp_path / "x", progress=False)
    with pytest.raises(DbrxqError, match="already in the canonical layout"):
        convert_checkpoint(c, tmp_path / "x", layout="canonical", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(DbrxqError, match="--overwrite"):
        convert_checkpoint(c, tmp_path / "full", progress=False)


def test_cli(dbrxq_main, tmp_path):
    code, err = dbrxq_main("quantize", "demo", tmp_path / "c", "--method", "rtn", "--layout", "canonical")
    assert code == 0, err
    assert "layout" not in json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    code, err = dbrxq_main("convert", tmp_path / "c", tmp_path / "b")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]["layout"] == "blocks"
    code, err = dbrxq_main("quantize", "demo", tmp_path / "d", "--method", "rtn")  # the default: blocks here
    assert code == 0 and json.loads((tmp_path / "d" / "config.json").read_text())["quantization_config"]["layout"] == "blocks"


def test_a_report_linked_from_outside_the_folder_is_not_copied(tmp_path, caplog):
    """The quantize report rides along with a conversion; a link in its place that leaves the folder
    is not followed (its target would otherwise be copied into OUT)."""
    import logging
    src = quantize_checkpoint(dbrxq.default_model_dir(), tmp_path / "c", QuantConfig(layout="canonical"),
                              progress=False)
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": "SECRET-CONTENT"}')
    (src / "quantize_report.json").unlink(missing_ok=True)
    (src / "quantize_report.json").symlink_to(secret)
    with caplog.at_level(logging.WARNING, logger="quantize.convert"):
        out = convert_checkpoint(src, tmp_path / "b", layout="blocks", progress=False)
    assert not (out / "quantize_report.json").exists()
    assert any("is a link to a file outside" in m and "not copied" in m for m in caplog.messages)
    (src / "quantize_report.json").unlink()
    (src / "quantize_report.json").write_text('{"layers": []}')
    out = convert_checkpoint(src, tmp_path / "b2", layout="blocks", progress=False)
    assert (out / "quantize_report.json").read_text() == '{"layers": []}'
