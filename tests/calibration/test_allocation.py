"""Per-expert recipes under a size budget (calibration.allocation, format_version 3) end to end on a tiny
checkpoint: the budget is never exceeded, each expert is stored and loaded with its own recipe, the
predicted errors match an independent recount, resume gives the same bytes, and what cannot handle
mixed experts (offloading, GGUF export, the RTN writer) says so in one line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import dbrxq
from calibration import allocation, pipeline, progress
from calibration.options import CalibrationOptions
from calibration.pipeline import quantize_with_calibration
from dbrxq.core.errors import ConfigError, DbrxqError, QuantizationError
from dbrxq.formats.shards import tensor_nbytes
from dbrxq.loading.loader import load_model
from dbrxq.model.config import DbrxConfig
from quantize.config import ExpertMix, ModuleQuant, QuantConfig
from quantize.specs import quantized_tensor_specs
from quantize.writer import quantize_checkpoint
from tests.calibration.test_pipeline import files, one_line

OPTS = CalibrationOptions(samples=8, seq_len=64, target_bits=2.5)
QC = QuantConfig(method="gptq", layout="canonical")  # experts int4 g128 where uniform; the canonical tensors are checked below


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A random DBRX of 2 layers, 16 experts, top-4, d_model and ffn 128 (the recipes' groups: 64, 128)."""
    import shutil

    from dbrxq.formats.random import make_random_checkpoint, preset_config
    folder = tmp_path_factory.mktemp("src")
    make_random_checkpoint(folder, preset_config("tiny", vocab_size=1536, d_model=128, ffn_hidden_size=128),
                           progress=False, tokenizer_dir=dbrxq.default_model_dir())
    shutil.copy(dbrxq.default_model_dir() / "tokenizer.tiktoken.json", folder)
    return folder


@pytest.fixture(scope="module")
def mixed(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "q"
    return out, quantize_with_calibration(src, out, QC, OPTS, progress=False)


def tensors(folder):
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def test_budget_met_recipes_stored_and_loaded(src, mixed):
    out, result = mixed
    config = DbrxConfig.from_json(out / "config.json")
    qc = QuantConfig.from_dict(config.quantization_config)
    alloc = qc.calibration["allocation"]
    budget = allocation.budget_from_bits(config, 2.5)
    assert alloc["budget_bytes"] == budget and alloc["expert_bytes"] <= budget
    assert qc.format_version == 5 and qc.expert_mix is not None  # per-expert recipes, symmetric (signed) options
    used = {j for row in qc.expert_mix.choice for j in row}
    assert len(used) >= 2  # a real mix at 2.5 bits (2 and 3 at least)
    t = tensors(out)
    expert_bytes = sum(v.numel() * v.element_size() for k, v in t.items() if ".ffn.experts.mlp." in k)
    assert expert_bytes == alloc["expert_bytes"]  # what the allocator counted is what was written
    model = load_model(out, dtype="float32", backend="torch")
    for i, block in enumerate(model.transformer.blocks):
        for e in range(config.num_experts):
            want = qc.expert_mix.recipe(i, e)
            for qt in block.ffn.experts.expert_weights(e):
                assert (qt.bits, qt.group_size, qt.symmetric) == (want.bits, want.group_size, want.symmetric)
    # the loaded expert is the stored one: its dequantized weights are those of its stack's slice
    j = qc.expert_mix.choice[1][5]
    rank = qc.expert_mix.members(1, j).index(5)
    stored = t[f"transformer.blocks.1.ffn.experts.mlp.w2.o{j}.qweight"][rank]
    assert torch.equal(model.transformer.blocks[1].ffn.experts.expert_weights(5)[2].qweight, stored)
    rep = result.report
    ex = rep["layers"][1]["experts"][5]
    assert ex["recipe"] == qc.expert_mix.recipe(1, 5).to_dict() and ex["predicted_error"] >= 0
    assert ex["achieved_error"] == pytest.approx(sum(ex[k]["output_error"] for k in ("w1", "v1", "w2")))
    # the kernels (C, where built) agree with the float reference on the mixed model
    fast = dbrxq.load(out)
    assert fast.generate("def f(x):", max_new_tokens=4)


def test_predicted_errors_are_the_routed_tokens_rtn_errors(src, mixed):
    """measure() against a recount: one expert's error at each option from the float model's own MoE
    input (a forward hook) and its router, tr(dW H dW^T) summed over its three matrices."""
    from calibration.tokens import calibration_tokens
    from dbrxq.model.moe import route
    from dbrxq.text.tokenizer import DbrxTokenizer
    from quantize.primitives import quantize_tensor
    from quantize.rtn import experts_to_canonical

    out, result = mixed
    tokens, _ = calibration_tokens(None, DbrxTokenizer.from_pretrained(src), samples=8, seq_len=64, seed=0)
    ref = load_model(src, dtype="float32")
    c = ref.config
    seen = {}
    ref.transformer.blocks[1].ffn.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        ref(tokens, use_cache=False)
        x = seen["x"].reshape(-1, c.d_model)
        _, ids = route(ref.transformer.blocks[1].ffn.router(x), c.top_k, c.ffn_config.moe_normalize_expert_weights)
        e = 3
        xe = x[(ids == e).any(-1)]
        mlp = ref.transformer.blocks[1].ffn.experts.mlp
        w = {k: experts_to_canonical(getattr(mlp, k).data.float(), k, c.num_experts)[e] for k in ("w1", "v1", "w2")}
        a = torch.nn.functional.silu(xe @ w["w1"].T) * (xe @ w["v1"].T)
        want = []
        for o in allocation.OPTIONS:
            total = 0.0
            for k, inp in (("w1", xe), ("v1", xe), ("w2", a)):
                d = w[k] - quantize_tensor(w[k], o.bits, o.group_size, o.symmetric).dequantize()
                total += float((inp @ d.T).double().pow(2).sum())
            want.append(total)
    rec = result.report["layers"][1]["experts"][e]
    j = allocation.OPTIONS.index(ModuleQuant(**rec["recipe"]))
    # float32 sums in another order (H vs X): 1e-4 relative
    # (rec["tokens"] is the quantizing pass's count, routed after a quantized layer 0: it may differ)
    assert rec["predicted_error"] == pytest.approx(want[j], rel=1e-4)


def test_target_size_counts_the_other_tensors(src, tmp_path):
    """--target-size: the whole checkpoint's tensor bytes stay within it."""
    size = 1_650_000  # the other tensors take 0.9 MB, all experts at 2 bits 0.47 MB, at 3 bits 0.66 MB
    out = tmp_path / "q"
    quantize_with_calibration(src, out, QuantConfig(method="rtn"),
                              CalibrationOptions(samples=8, seq_len=64, target_size=size), progress=False)
    t = tensors(out)
    assert sum(v.numel() * v.element_size() for v in t.values()) <= size
    with pytest.raises(QuantizationError) as e:
        quantize_with_calibration(src, tmp_path / "small", QuantConfig(method="rtn"),
                                  CalibrationOptions(samples=8, seq_len=64, target_size=1_000_000), progress=False)
    assert "--target-size" in one_line(e) and "too small" in str(e.value)


def test_resume_of_a_mixed_run_is_byte_identical(src, mixed, tmp_path, monkeypatch):
    out = tmp_path / "q"
    real = pipeline.process_layer
    monkeypatch.setattr(pipeline, "process_layer",
                        lambda run, i, x: (_ for _ in ()).throw(KeyboardInterrupt()) if i == 1 else real(run, i, x))
    with pytest.raises(KeyboardInterrupt):
        quantize_with_calibration(src, out, QC, OPTS, progress=False)
    monkeypatch.setattr(pipeline, "process_layer", real)
    quantize_with_calibration(src, out, QC, OPTS, resume=True, progress=False)
    assert files(out) == files(mixed[0])


@pytest.mark.parametrize("edit, match", [
    (lambda q: q.update(format_version=2), "format_version=2 cannot hold signed"),  # full-range sym int4 base
    (lambda q: q.update(format_version=2, full_range=False), "format_version=2 cannot hold per-expert recipes"),
    (lambda q: q["expert_mix"]["choice"].pop(), "rows"),
    (lambda q: q["expert_mix"]["choice"][0].append(0), "the model has 2 layers of 16"),
    (lambda q: q["expert_mix"]["choice"][1].__setitem__(0, 9), "an index into the"),
    (lambda q: q["expert_mix"]["choice"][1].__setitem__(0, 1.0), "lists of integers"),
    (lambda q: q["expert_mix"].update(options=[]), "1 to 16 recipes"),
    (lambda q: q["expert_mix"]["options"][0].update(bits=5), "expert_mix.options[0]"),
    (lambda q: q["expert_mix"].update(extra=1), "exactly the fields"),
])
def test_hostile_expert_mix_is_refused_in_one_line(mixed, tmp_path, edit, match):
    import shutil
    out = tmp_path / "q"
    shutil.copytree(mixed[0], out)
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DbrxqError) as e:
        load_model(out)
    assert match in one_line(e)


@pytest.mark.parametrize("slots, options", [(1, {}), (5, {}), (3, {"mmap": True}), (2, {"direct": True})])
def test_mixed_experts_offload_to_the_resident_logits(mixed, tmp_path, slots, options):
    """Experts of different sizes: a pool of slots per size class and layer, each slot its class's
    bytes, within the budget of ``slots`` largest-class slots per layer (so at least that many experts
    stay); the logits are the resident model's, bit for bit, and the bytes moved are the missed
    experts' own sizes."""
    from dbrxq.plan.slots import MixedLayout
    from tests.dbrxq.test_offload import _budget, run_steps
    out = mixed[0]
    ref = run_steps(load_model(out), steps=4)
    runner = dbrxq.load(out, cpu_memory=_budget(out, slots * 2), context=32,
                        offload_options={"cache_dir": tmp_path, **options})
    rt = runner.offload
    assert isinstance(rt.layout, MixedLayout) and len({lay.nbytes for lay in rt.layout.layouts}) >= 2
    assert all(n >= slots for n in rt.plan.slots_per_layer) and rt.plan.class_slots is not None
    assert rt.plan.tier_bytes()["device"] <= _budget(out, slots * 2)
    for a, b in zip(run_steps(runner.model, kv_factory=rt.kv_factory, steps=4), ref):
        assert torch.equal(a, b)
    d = rt.stats.phases["decode"]
    assert d.misses > 0 and d.bytes_moved < d.misses * rt.layout.nbytes  # smaller classes move fewer bytes
    assert rt.stats.peak["device"] <= _budget(out, slots * 2)
    # a second load reuses the prepared file (each expert's own length read back from the sidecar's shape)
    again = dbrxq.load(out, cpu_memory=_budget(out, slots * 2), context=32,
                       offload_options={"cache_dir": tmp_path, **options})
    assert len(list((tmp_path / "prepared").glob("*.bin"))) == 1
    for a, b in zip(run_steps(again.model, kv_factory=again.offload.kv_factory, steps=4), ref):
        assert torch.equal(a, b)


def test_size_class_pools_hold_more_experts_than_largest_slots():
    """The split of a layer's bytes over size classes: within the bytes, never more slots than a class
    has experts, coverage balanced, and more experts cached than slots of the largest size would hold."""
    from dbrxq.plan.placement import split_by_class
    sizes, counts = [59, 84, 102], [8, 6, 2]
    k = split_by_class(408, sizes, counts)
    assert sum(a * b for a, b in zip(k, sizes)) <= 408 and all(a <= n for a, n in zip(k, counts))
    assert sum(k) > 408 // 102 and min(k) >= 1
    assert split_by_class(10_000, sizes, counts) == counts  # room for all: every expert
    assert split_by_class(58, sizes, counts) == [0, 0, 0]


def test_what_cannot_take_mixed_experts_says_so(mixed, src, tmp_path):
    out = mixed[0]
    from dbrxq.export.gguf import export_gguf
    with pytest.raises(ConfigError) as e:
        export_gguf(out, tmp_path / "m.gguf")
    assert "per-expert recipes" in one_line(e) and not (tmp_path / "m.gguf").exists()
    qc = QuantConfig.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    with pytest.raises(QuantizationError, match="calibration"):
        quantize_checkpoint(src, tmp_path / "w", dataclasses_replace(qc, method="rtn"), progress=False)


def dataclasses_replace(qc, **kw):
    import dataclasses
    return dataclasses.replace(qc, **kw)


def test_specs_stack_each_recipe_and_version_one_still_loads(tmp_path):
    """The canonical specs of a mixed layer: one stack per recipe in use, sized by its members; a
    uniform recipe keeps version 1 (older readers) and its stacked [E, ...] names."""
    from dbrxq.formats.random import preset_config
    config = preset_config("tiny", d_model=128, ffn_hidden_size=128)
    options = (ModuleQuant(2, 64, False), ModuleQuant(4, 128, True))
    choice = ((0,) * 16, (1, 0) * 8)
    qc = QuantConfig(expert_mix=ExpertMix(options, choice), layout="canonical", full_range=False)
    specs = {n: (s, d) for n, s, d in quantized_tensor_specs(config, qc)}
    assert "transformer.blocks.0.ffn.experts.mlp.w1.o1.qweight" not in specs  # layer 0 uses recipe 0 only
    assert specs["transformer.blocks.0.ffn.experts.mlp.w1.o0.qweight"][0] == (16, 128, 32)  # 2-bit: 4 per byte
    assert specs["transformer.blocks.1.ffn.experts.mlp.w2.o1.qweight"][0] == (8, 128, 64)
    assert specs["transformer.blocks.1.ffn.experts.mlp.w2.o0.qzeros"][0] == (8, 128, 2)
    assert qc.required_version == 3 and QuantConfig(layout="canonical", full_range=False).required_version == 1
    assert dataclasses.replace(qc, full_range=True).required_version == 5  # option 1: symmetric int4, signed
    total = sum(tensor_nbytes(s, d) for n, (s, d) in specs.items() if ".ffn.experts." in n)
    assert total == sum(allocation.expert_bytes(config, options[j]) for row in choice for j in row)
    assert QuantConfig.from_dict(qc.to_dict()) == qc


def test_cli_target_bits_and_its_errors(dbrxq_main, tmp_path):
    code, err = dbrxq_main("quantize", "demo", tmp_path / "q", "--method", "rtn", "--target-bits", "2.5",
                           "--calib-samples", "8", "--calib-seq-len", "64")
    assert code == 0, err
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "rtn" and qc["layout"] == "blocks"  # the CLI default
    assert qc["format_version"] == 5 and qc["full_range"] is True  # blocks with symmetric (signed) options
    assert not (tmp_path / "q" / progress.MANIFEST_NAME).exists()
    for args, msg in ((["--target-bits", "9"], "--target-bits 9.0: expected a number from 2 to 8"),
                      (["--target-bits", "3", "--target-size", "1GB"], "give one budget"),
                      (["--target-size", "lots"], "--target-size")):
        code, err = dbrxq_main("quantize", "demo", tmp_path / "bad", *args)
        assert code != 0 and msg in err and "Traceback" not in err, err
