"""Tests of expert offloading (dbrxq.runtime.offload, dbrxq.runtime.expert_cache, dbrxq.plan.placement) on CPU with
tiny quantized models: offloaded outputs are bitwise those of the resident model (same kernel,
same device), tracked bytes stay within the budget after every step, the LRU matches a hand trace,
prefetch never changes results, and budgets / sizes fail with one clear line."""

from __future__ import annotations

import json
import os
import threading
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dbrxq
from dbrxq.cli.app import cli
from dbrxq.core.errors import BudgetError, ConfigError
from dbrxq.core.units import parse_size
from dbrxq.formats.random import make_random_checkpoint, preset_config
from dbrxq.loading import offloading
from dbrxq.loading.offloading import offload_model
from dbrxq import DbrxForCausalLM
from dbrxq.plan.placement import make_plan
from dbrxq.plan.sizes import non_expert_bytes_of
from dbrxq.plan.slots import SlotLayout, expert_layout
from dbrxq.runtime import prepared
from dbrxq.runtime.expert_cache import LRU, ExpertCache
from quantize import kernels
from quantize.config import QuantConfig
from quantize.modules import quantize_model_rtn
from quantize.writer import quantize_checkpoint

CFG = preset_config("tiny", d_model=128, ffn_hidden_size=128)  # 2 layers, 16 experts, top-4
PROMPT = [[5, 17, 99, 3, 250, 41, 7, 8]]


def quantized_model(backend: str | None = None) -> DbrxForCausalLM:
    torch.manual_seed(0)
    m = DbrxForCausalLM(CFG).init_weights().eval()
    return quantize_model_rtn(m, QuantConfig(), backend=backend)


def budget_for(slots_per_layer: int, context: int = 32, kv: str = "bf16") -> int:
    """The CPU budget that leaves exactly ``slots_per_layer`` expert slots in each layer."""
    m = quantized_model()
    inner = m.transformer.blocks[0].ffn.experts
    layout = expert_layout(inner.expert_weights(0), None, torch.device("cpu"), m.dtype)
    plan = make_plan(m.config, device=torch.device("cpu"), gpu_memory=None, cpu_memory=None,
                     non_expert_bytes=non_expert_bytes_of(m), expert_bytes=1, slot_bytes=layout.nbytes,
                     context=context, batch_size=1, kv_flavour=kv, dtype=m.dtype)
    return plan.device_fixed_bytes + slots_per_layer * m.config.n_layers * layout.nbytes


def run_steps(model, kv_factory=None, steps: int = 5, check=None) -> list[torch.Tensor]:
    """Greedy prefill + decode with explicit caches; the logits of every step."""
    cache = (kv_factory or model.new_cache)(1, 32)
    ids = torch.tensor(PROMPT)
    out = []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        for _ in range(steps):
            out.append(logits)
            if check:
                check()
            tok = logits.argmax(-1)
            logits = model(tok[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    return out


@pytest.fixture(scope="module")
def reference() -> list[torch.Tensor]:
    return run_steps(quantized_model())


@pytest.mark.parametrize("slots", [0, 1, 3, 16])
def test_offloaded_logits_equal_resident_and_stay_in_budget(reference, slots, tmp_path):
    budget = budget_for(slots)
    m = quantized_model()
    rt = offload_model(m, cpu_memory=budget, context=32, cache_dir=tmp_path)
    assert rt.plan.slots_per_layer == [slots] * CFG.n_layers

    def check():
        tracked = rt.tracked_bytes()["device"]
        assert tracked <= budget, (tracked, budget)
        assert rt.cache.resident_bytes() <= slots * CFG.n_layers * rt.layout.nbytes

    got = run_steps(m, rt.kv_factory, check=check)
    for a, b in zip(got, reference):
        assert torch.equal(a, b)  # the same kernel (auto: cpu_q4) on the same bytes: bitwise
    c = rt.cache.counters
    assert c.misses > 0 and (slots < 16 or c.hits > 0)


def test_forced_torch_backend_bitwise(tmp_path):
    ref = run_steps(quantized_model("torch"), steps=2)
    m = quantized_model("torch")
    rt = offload_model(m, cpu_memory=budget_for(1), context=32, backend="torch", cache_dir=tmp_path)
    for a, b in zip(run_steps(m, rt.kv_factory, steps=2), ref):
        assert torch.equal(a, b)


def test_hits_and_misses_follow_a_hand_computed_lru_trace(tmp_path):
    m = quantized_model()
    rt = offload_model(m, cpu_memory=budget_for(2), context=32, cache_dir=tmp_path, policy="lru")
    experts = m.transformer.blocks[0].ffn.experts
    x = torch.randn(1, CFG.d_model)
    # One token, top-1 routing, experts in this order; LRU with 2 slots:
    # 0 m [0] | 1 m [0 1] | 0 h [1 0] | 2 m [0 2] | 1 m [2 1] | 0 m [1 0] | 3 m [0 3] | 3 h | 0 h
    for e in [0, 1, 0, 2, 1, 0, 3, 3, 0]:
        experts(x, torch.tensor([[e]]), torch.ones(1, 1))
    c = rt.cache.counters
    assert (c.hits, c.misses, c.evictions) == (3, 6, 4)
    assert rt.cache.cached(0) == [0, 3]


def test_lru_policy_alone():
    lru = LRU()
    for k in (1, 2, 3):
        lru.insert(k)
    lru.touch(1)
    assert lru.victim() == 2


def test_prefetch_never_changes_results(reference, tmp_path):
    m = quantized_model()
    rt = offload_model(m, cpu_memory=budget_for(4), context=32, prefetch=True, cache_dir=tmp_path)
    got = run_steps(m, rt.kv_factory)
    for a, b in zip(got, reference):
        assert torch.equal(a, b)
    assert rt.cache.counters.prefetched > 0


def test_slot_layout_roundtrip():
    m = quantized_model()
    inner = m.transformer.blocks[1].ffn.experts
    layout = expert_layout(inner.expert_weights(0), None, torch.device("cpu"), m.dtype)
    storage = torch.empty(layout.nbytes, dtype=torch.uint8)
    cache = ExpertCache(layout, [1], torch.device("cpu"))
    slot = cache.new_slot()
    from dbrxq.plan.slots import prepare_expert
    layout.pack(prepare_expert(inner.expert_weights(5), None, torch.device("cpu"), m.dtype), slot.storage)
    x = torch.randn(3, CFG.d_model)
    assert torch.equal(kernels.glu(x, *slot.weights, inner.act), inner.expert(5, x))
    assert storage.numel() == layout.nbytes
    # the layout keeps shapes, not the bytes of the expert it was taken from (they would sit outside the budget)
    from dbrxq.plan.slots import _map_tensors
    held = []
    _map_tensors(layout.template, lambda t: held.append(t) or t, {})
    assert held and all(t.is_meta for t in held)


def test_budget_too_small_for_non_expert_weights():
    m = quantized_model()
    with pytest.raises(BudgetError, match=r"--cpu-memory .* too small: at least .* is needed"):
        offload_model(m, cpu_memory="64KiB", context=32)


def test_gpu_budget_needs_cuda():
    with pytest.raises(BudgetError, match="needs a CUDA device"):
        offload_model(quantized_model(), device="cpu", gpu_memory="1GiB")


def test_cuda_plan_reserves_the_int8_attention_scratch():
    """On CUDA an int8 attention weight is widened to bf16 for its matmul: the plan's workspace holds
    the largest one (Wqkv) twice over, and only for int8 attention on CUDA."""
    import dataclasses

    from quantize.config import ModuleQuant

    def ws(device, attn_bits):
        qc = dataclasses.replace(QuantConfig(layout="canonical"), attn=ModuleQuant(bits=attn_bits, group_size=-1 if attn_bits == 8 else 32))
        cfg = dataclasses.replace(CFG, quantization_config=qc.to_dict())
        return make_plan(cfg, device=torch.device(device), gpu_memory=None, cpu_memory=None, non_expert_bytes=0,
                         expert_bytes=1, slot_bytes=1000, context=32, batch_size=1, kv_flavour="bf16",
                         dtype=torch.bfloat16).workspace_bytes
    wqkv = CFG.qkv_out_features * CFG.d_model
    assert ws("cuda", 8) - ws("cuda", 4) == 2 * wqkv
    assert ws("cpu", 8) == ws("cpu", 4)


@pytest.mark.parametrize("text,want", [("20GiB", 20 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                       ("4096b", 4096), (" 2 kib ", 2048), (123, 123),
                                       ("39937488", 39937488), (" 12 ", 12)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "1.5", "GiB", "1.2.3GiB", "-1GiB", "5 parsecs", "1e3MB", "9" * 400 + "GB"])
def test_parse_size_errors(text):
    with pytest.raises(BudgetError, match="--cpu-memory: cannot read"):
        parse_size(text, "--cpu-memory")


@pytest.mark.parametrize("text", ["2EiB", "9" * 30 + "TB", 2**61, -1])
def test_parse_size_refuses_sizes_beyond_any_machine(text):
    with pytest.raises(BudgetError, match="--cpu-memory: .*(1 EiB|cannot read)"):
        parse_size(text, "--cpu-memory")


def test_float_checkpoint_refuses_offloading():
    with pytest.raises(ConfigError, match="needs a dbrxq-quantized checkpoint"):
        dbrxq.load(cpu_memory="1GiB")


def _quantized_dir(tmp_path_factory, layout: str) -> Path:
    # the embedded tokenizer's ids run to 1535: the checkpoint's vocabulary must hold them
    src = make_random_checkpoint(tmp_path_factory.mktemp("src"), preset_config("tiny", d_model=128, ffn_hidden_size=128,
                                 vocab_size=1536), seed=1, progress=False)
    out = quantize_checkpoint(src, tmp_path_factory.mktemp(layout) / "q", QuantConfig(layout=layout), progress=False)
    for f in dbrxq.default_model_dir().glob("tokenizer*"):  # dbrxq.load wants a tokenizer
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module", params=["canonical", "blocks"])
def qdir(request, tmp_path_factory):
    """The same RTN checkpoint in each layout: every offloading test runs on both."""
    return _quantized_dir(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def cdir(tmp_path_factory):
    """The canonical layout only: its experts go through a prepared-expert file."""
    return _quantized_dir(tmp_path_factory, "canonical")


def _budget(qdir, slots: int, **kw) -> int:
    """A --cpu-memory budget that holds the non-expert part and `slots` expert slots, from the plan
    (headers and one expert only)."""
    from dbrxq.formats.checkpoint import CheckpointReader, checkpoint_float_dtype
    from dbrxq.model.config import DbrxConfig
    from dbrxq.plan.checkpoint import plan_offload

    with CheckpointReader(qdir) as r:
        plan, layout = plan_offload(r, DbrxConfig.from_json(qdir / "config.json"), device=torch.device("cpu"),
                                    dtype=checkpoint_float_dtype(r), backend=None, gpu_memory=None,
                                    cpu_memory="1GiB", **{"context": 32, "batch_size": 1, "kv_cache": "bf16", **kw})
    return plan.process_bytes + plan.device_fixed_bytes + slots * layout.nbytes


def test_loaded_checkpoint_offloads_to_the_same_logits(qdir, tmp_path):
    full = DbrxForCausalLM.from_pretrained(qdir)
    ref = run_steps(full, steps=3)
    runner = dbrxq.load(qdir, cpu_memory=_budget(qdir, 2), context=32, kv_cache="int8",
                        offload_options={"cache_dir": tmp_path, "timing": True})
    rt = runner.offload
    assert rt.plan.slots_per_layer == [1, 1]
    # canonical: a prepared-expert file, made once; blocks: none (the checkpoint is read where it is)
    blocks = QuantConfig.from_dict(json.loads((qdir / "config.json").read_text())["quantization_config"]).layout
    assert len(list((tmp_path / "prepared").glob("*.bin"))) == (blocks != "blocks")
    got = run_steps(runner.model, steps=3)  # float KV here: compare experts only
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    out = runner.generate_ids(PROMPT, max_new_tokens=4)
    assert len(out.sequences[0]) == 4 and rt.stats.phases["decode"].misses > 0


def test_cli_plan_and_bad_size(qdir):
    r = CliRunner().invoke(cli, ["run", str(qdir), "--plan", "--cpu-memory", "1GiB", "--context", "64"])
    assert r.exit_code == 0, r.output
    assert "KV cache for 64 tokens: bf16" in r.output and "int8" in r.output and "per layer" in r.output
    r = CliRunner().invoke(cli, ["run", str(qdir), "--plan", "--cpu-memory", "lots"])
    assert r.exit_code == 2 and "--cpu-memory" in r.output and "20GiB" in r.output


def test_load_takes_batch_size_for_batched_offloaded_generation(qdir, tmp_path):
    """The memory plan reserves KV cache for batch_size prompts: dbrxq.load(batch_size=2) then
    generates two prompts at once with offloading (before, load took no batch_size, and a batch
    of two was refused by the plan, whose error asked for a larger batch at load)."""
    runner = dbrxq.load(qdir, cpu_memory=_budget(qdir, 4, batch_size=2), context=32, batch_size=2,
                        offload_options={"cache_dir": tmp_path})
    assert runner.offload.plan.batch_size == 2
    out = runner.generate_ids([PROMPT[0], PROMPT[0][:3]], max_new_tokens=3)
    assert [len(s) for s in out.sequences] == [3, 3]
    alone = runner.generate_ids([PROMPT[0]], max_new_tokens=3)
    assert out.sequences[0] == alone.sequences[0]


def test_threads_keyword_and_option():
    import torch

    before = torch.get_num_threads()
    try:
        dbrxq.load(threads=1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ConfigError, match="threads=0"):
            dbrxq.load(threads=0)
    finally:
        torch.set_num_threads(before)
    for args in (["run", "--threads", "1", "-p", "Hi", "-n", "2"], ["quantize", "--help"], ["eval", "--help"]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0 and ("--threads" in r.output or args[0] == "run"), r.output


def test_plan_on_a_float_checkpoint_describes_it_and_a_budget_says_how_to_quantize():
    r = CliRunner().invoke(cli, ["run", "--plan"])  # the embedded default is float
    assert r.exit_code == 0, r.output
    assert "every weight resident" in r.output and "KV cache for" in r.output and "MiB" in r.output
    r = CliRunner().invoke(cli, ["run", "demo", "--plan", "--cpu-memory", "1GiB"])
    assert r.exit_code != 0 and "dbrxq quantize" in str(r.exception)


def test_prepared_expert_file_only_when_needed_where_asked_listed_and_cleared(cdir, tmp_path, caplog, monkeypatch):
    """A budget that holds every expert runs fully resident and writes no file; a smaller one writes
    the prepared-expert file where --cache-dir says, saying so once; `dbrxq cache` lists it and
    `--clear` removes it; a disk that cannot hold it is refused with the size needed."""
    import logging


    cache = tmp_path / "cache"
    runner = dbrxq.load(cdir, cpu_memory="1GiB", context=32, offload_options={"cache_dir": cache})
    assert runner.offload is None and not (cache / "prepared").exists()
    with caplog.at_level(logging.WARNING, logger="dbrxq.runtime.prepared"):
        r = CliRunner().invoke(cli, ["run", str(cdir), "-p", "Hi", "-n", "2", "--cpu-memory", f"{_budget(cdir, 2)}B",
                                     "--context", "32", "--cache-dir", str(cache)])
    assert r.exit_code == 0, r.output
    files = list((cache / "prepared").glob("*.bin"))
    assert len(files) == 1 and any(str(files[0]) in m and "dbrxq cache" in m for m in caplog.messages)
    r = CliRunner().invoke(cli, ["cache", "--cache-dir", str(cache)])
    assert r.exit_code == 0 and str(files[0]) in r.output and "1 file(s)" in r.output
    r = CliRunner().invoke(cli, ["cache", "--cache-dir", str(cache), "--clear"])
    assert r.exit_code == 0 and "removed 1 file(s)" in r.output and not files[0].exists()
    monkeypatch.setattr(offloading.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(ConfigError, match=r"the prepared-expert file needs .* 1000 B free there.*--cache-dir"):
        dbrxq.load(cdir, cpu_memory=_budget(cdir, 2), context=32, offload_options={"cache_dir": cache})


def test_cache_lists_checkpoint_size_and_use_and_clears_one_or_the_stale(cdir, tmp_path):
    """`dbrxq cache` names the checkpoint each file was built from, its size and last use; a file whose
    checkpoint changed (or is gone) is listed as stale; --clear MODEL removes that checkpoint's files
    only, --clear-stale the stale ones."""
    cache = tmp_path / "cache"
    other = tmp_path / "other"
    shutil.copytree(cdir, other)
    for folder in (cdir, other):
        r = CliRunner().invoke(cli, ["run", str(folder), "-p", "Hi", "-n", "2", "--cpu-memory",
                                     f"{_budget(folder, 2)}B", "--context", "32", "--cache-dir", str(cache)])
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["cache", "--cache-dir", str(cache)])
    assert r.exit_code == 0 and "2 file(s)" in r.output and "stale" not in r.output, r.output
    assert str(cdir.resolve()) in r.output and str(other.resolve()) in r.output and "last used " in r.output
    shard = sorted(other.glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # the checkpoint changed
    r = CliRunner().invoke(cli, ["cache", "--cache-dir", str(cache)])
    assert "STALE: its checkpoint changed since" in r.output and "1 stale" in r.output, r.output
    r = CliRunner().invoke(cli, ["cache", "--cache-dir", str(cache), "--clear-stale"])
    assert r.exit_code == 0 and "removed 1 file(s)" in r.output
    r = CliRunner().invoke(cli, ["cache", "--cache-dir", str(cache)])
    assert "1 file(s)" in r.output and str(cdir.resolve()) in r.output and str(other.resolve()) not in r.output
    r = CliRunner().invoke(cli, ["cache", "--cache-dir", str(cache), "--clear", str(other)])
    assert r.exit_code != 0 and "no file" in str(r.exception)
    r = CliRunner().invoke(cli, ["cache", "--cache-dir", str(cache), "--clear", str(cdir)])
    assert r.exit_code == 0 and "removed 1 file(s)" in r.output
    assert not list((cache / "prepared").iterdir())


def test_prepared_expert_file_is_checked_like_a_checkpoint(cdir, tmp_path, caplog):
    """The prepared-expert file is a cache, so untrusted: a damaged expert is caught on its first
    read (CRC-32 from the sidecar), the file removed and the error one line; the next load rebuilds
    it. A sidecar recording another source (or none at all) makes the file be rebuilt, not used."""
    import json
    import logging

    from dbrxq.core.errors import CheckpointError

    def load():
        return dbrxq.load(cdir, cpu_memory=_budget(cdir, 1), context=32, offload_options={"cache_dir": tmp_path})

    runner = load()
    ref = runner.generate_ids(PROMPT, max_new_tokens=3).sequences
    (binfile,) = (tmp_path / "prepared").glob("*.bin")
    side = binfile.with_suffix(".json")
    assert len(json.loads(side.read_text())["crc32"]) == 2 * 16
    stride = runner.offload.file.stride
    runner.offload.close()
    # flip bytes inside the last expert of layer 1 (an expert a 1-slot budget must read)
    with open(binfile, "r+b") as f:
        f.seek(binfile.stat().st_size - stride + 100)
        f.write(b"\x00" * 50)
    runner = load()
    with pytest.raises(CheckpointError, match=r"prepared-expert file damaged at layer 1 expert \d+ .*CRC-32.*rerun"):
        for seed in range(50):  # until that expert is routed to
            g = torch.Generator().manual_seed(seed)
            runner.generate_ids([torch.randint(0, 250, (16,), generator=g).tolist()], max_new_tokens=8)
    assert not binfile.exists() and not side.exists()
    runner = load()
    assert runner.generate_ids(PROMPT, max_new_tokens=3).sequences == ref
    # a sidecar that records another source: rebuilt, with a warning
    data = json.loads(side.read_text())
    data["source"] = "/somewhere/else"
    side.write_text(json.dumps(data))
    runner.offload.file.close()
    with caplog.at_level(logging.WARNING, logger="dbrxq.runtime.prepared"):
        load()
    assert any("built from something else" in m for m in caplog.messages)
    assert json.loads(side.read_text())["source"] != "/somewhere/else"
    side.unlink()  # no sidecar: an older or interrupted file, rebuilt
    with caplog.at_level(logging.WARNING, logger="dbrxq.runtime.prepared"):
        load()
    assert side.exists()


def test_prepared_file_that_is_a_link_a_folder_or_unreadable(cdir, tmp_path, caplog, monkeypatch):
    """The prepared-expert file's name in the cache may hold something else: a symbolic link (to a file
    outside the cache, even one with the right bytes) is removed, never followed, and the file rebuilt;
    a folder is refused in one line; a file that cannot be read is removed and rebuilt, so the next run
    does not fail the same way."""
    import logging

    def load():
        return dbrxq.load(cdir, cpu_memory=_budget(cdir, 1), context=32, offload_options={"cache_dir": tmp_path})

    runner = load()
    ref = runner.generate_ids(PROMPT, max_new_tokens=3).sequences
    (binfile,) = (tmp_path / "prepared").glob("*.bin")
    runner.offload.close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(binfile, elsewhere / "experts.bin")
    binfile.symlink_to(elsewhere / "experts.bin")
    with caplog.at_level(logging.WARNING, logger="dbrxq.runtime.prepared"):
        runner = load()
    assert any("symbolic link" in m and "not followed" in m for m in caplog.messages)
    assert binfile.is_file() and not binfile.is_symlink() and runner.offload.file.path == binfile
    assert runner.generate_ids(PROMPT, max_new_tokens=3).sequences == ref
    runner.offload.close()

    real_open, refused = os.open, []

    def unreadable(path, flags, *a, **k):  # as a file of another user would be (the tests run as root)
        if Path(path) == binfile and not refused:
            refused.append(path)
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(prepared.os, "open", unreadable)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dbrxq.runtime.prepared"):
        runner = load()
    assert refused and any("cannot read it (Permission denied)" in m and "rebuilding" in m for m in caplog.messages)
    assert runner.generate_ids(PROMPT, max_new_tokens=3).sequences == ref
    runner.offload.close()
    monkeypatch.undo()

    binfile.unlink()
    binfile.mkdir()
    with pytest.raises(ConfigError, match=r"\.bin: a folder where dbrxq keeps a prepared-expert file; remove it"):
        load()


def test_simulate_matches_the_expert_cache_and_lfu_keeps_hot_experts():
    """dbrxq.runtime.expert_cache.simulate takes the cache's own steps (checked against ExpertCache on one
    trace); DecayedLFU with decay 0 is LRU; on a trace with one hot expert, LRU evicts it between
    uses and decayed LFU does not."""
    from dbrxq.runtime.expert_cache import LRU, DecayedLFU, simulate

    g = torch.Generator().manual_seed(0)
    trace = [sorted(torch.randperm(16, generator=g)[:4].tolist()) for _ in range(300)]
    layout = SlotLayout((torch.zeros(8),))
    cache = ExpertCache(layout, [5], torch.device("cpu"))
    for experts in trace:  # the runtime's step: look every expert up, then admit the misses
        missed = [e for e in experts if cache.lookup(0, e) is None]
        for e in missed:
            cache.admit(0, e, set(experts))
    assert simulate(trace, 5, LRU()) == (cache.counters.hits, cache.counters.misses)
    assert simulate(trace, 5, DecayedLFU(decay=0.0)) == simulate(trace, 5, LRU())
    # expert 0 in every other token, two cold experts (cycling through 15) in between
    hot = [[0, 1 + (i % 15)] if i % 2 == 0 else [1 + (i + 3) % 15, 1 + (i + 7) % 15] for i in range(300)]
    lru_hits, _ = simulate(hot, 2, LRU())
    lfu_hits, _ = simulate(hot, 2, DecayedLFU())
    # LRU evicts expert 0 between its uses. LFU misses it twice: its first use, and token 2, because at
    # token 1 expert 0 and expert 1 tie at one use and the less recent (0) goes; then 0 leads for good.
    assert lru_hits == 0 and lfu_hits == 150 - 2
    assert simulate(hot, 0, LRU()) == (0, 600)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """The demo model RTN-quantized through the calibration pipeline: a quantize report with routing counts."""
    from calibration.options import CalibrationOptions
    from calibration.pipeline import quantize_with_calibration
    from quantize.config import QuantConfig
    out = tmp_path_factory.mktemp("reported") / "q"
    quantize_with_calibration(dbrxq.default_model_dir(), out, QuantConfig(method="rtn"),
                              CalibrationOptions(samples=16, seq_len=128), progress=False)
    return out


def test_expert_policies_change_hits_not_results(reported, tmp_path):
    """Every policy gives the resident model's tokens; with the report's routing counts the cache
    starts hot (static keeps it), and the runtime's hits and misses are exactly those of the
    simulator scripts/bench_placement.py measures the policies with (there, over 16,000 held-out
    tokens, static hits 51% vs a cold LRU's 47% at 4 of 16), replayed on the steps this run took.
    Speculative prefetch is off here: its guesses would count as hits."""
    from dbrxq.runtime.expert_cache import LRU, DecayedLFU, simulate
    from dbrxq.runtime.routing import routing_counts, routing_prior
    counts = routing_counts(reported, 4, 16)
    assert counts and all(sum(c) == 16 * 128 * 4 for c in counts)
    text = (Path(dbrxq.__file__).parents[1] / "calibration" / "data" / "heldout.txt").read_text()[:2000]
    resident = dbrxq.load(reported)
    prompt = [resident.tokenizer.encode(text)[:48]]
    want = resident.generate_ids(prompt, max_new_tokens=24).sequences
    hot = [sorted(range(16), key=lambda e: -c[e])[:4] for c in counts]
    for policy, warm in (("lru", True), ("lfu", True), ("static", True), ("lru", False)):
        runner = dbrxq.load(reported, cpu_memory=_budget(reported, 16, context=96), context=96,
                            offload_options={"cache_dir": tmp_path, "policy": policy, "prefetch": False,
                                             "warm_start": warm})
        rt = runner.offload
        assert [rt.cache.cached(i) for i in range(4)] == ([sorted(h) for h in hot] if warm else [[]] * 4)
        steps = [[] for _ in range(4)]  # per layer, per forward: the distinct experts routed to

        def record(module, args, out, i):
            steps[i].append(sorted(set(args[1].reshape(-1).tolist())))
        hooks = [b.ffn.experts.register_forward_hook(lambda m, a, o, i=i: record(m, a, o, i))
                 for i, b in enumerate(runner.model.transformer.blocks)]
        assert runner.generate_ids(prompt, max_new_tokens=24).sequences == want
        for h in hooks:
            h.remove()
        if policy == "static":
            assert [rt.cache.cached(i) for i in range(4)] == [sorted(h) for h in hot]  # never evicted
            hits = sum(e in hot[i] for i in range(4) for step in steps[i] for e in step)
            total = sum(len(step) for i in range(4) for step in steps[i])
            expected = (hits, total - hits)
        else:
            expected = [0, 0]
            for i in range(4):
                pol = LRU() if policy == "lru" else DecayedLFU(prior=routing_prior(counts[i], 16))
                h, m = simulate(steps[i], 4, pol, hot[i] if warm else ())
                expected[0] += h
                expected[1] += m
            expected = tuple(expected)
        c = rt.cache.counters
        assert (c.hits, c.misses) == expected, (policy, warm)
    with pytest.raises(ConfigError, match="expert policy 'mru'"):
        dbrxq.load(reported, cpu_memory=_budget(reported, 4), context=32,
                   offload_options={"cache_dir": tmp_path, "policy": "mru"})


# ---------------------------------------------------------------------------- the CPU reader
def test_a_slow_reader_never_hands_compute_an_expert_early(reference, tmp_path):
    """Reads take 20 ms each (longer than computing an expert here), so compute always gets ahead
    of the reader; every expert it computes must already hold that expert's bytes."""
    m = quantized_model()
    rt = offload_model(m, cpu_memory=budget_for(2), context=32, cache_dir=tmp_path, prefetch=True)
    rt.reader.delay = 0.02
    stride, n = rt.file.stride, rt.layout.nbytes
    data = os.pread(rt.file.fd, 2 * 16 * stride, 0)  # the file is anonymous (unlinked) here
    layer_now = []
    compute, moe = rt._compute, rt.moe

    def checked_compute(slot, x, layer, e):
        idx = layer * rt.plan.num_experts + e
        assert layer == layer_now[-1]
        assert slot.storage.numpy().tobytes() == data[idx * stride: idx * stride + n], (layer, e)
        return compute(slot, x, layer, e)

    def tracked_moe(layer, *a):
        layer_now.append(layer)
        return moe(layer, *a)
    rt._compute, rt.moe = checked_compute, tracked_moe
    got = run_steps(m, rt.kv_factory)
    for a, b in zip(got, reference):
        assert torch.equal(a, b)
    assert rt.cache.counters.misses > 0 and rt.cache.counters.prefetched > 0


def test_a_step_needing_a_queued_background_read_does_not_wait_behind_its_own_misses(reference, tmp_path):
    """Background reads (warm start, prefetch) queue behind a step's misses; a step that uses an
    expert whose background read is still queued has it promoted. Without that, the step's misses
    fill both staging slots, the reader waits for one to be freed, and compute waits for the hit."""
    m = quantized_model()
    rt = offload_model(m, cpu_memory=budget_for(3), context=32, cache_dir=tmp_path)
    rt.reader.delay = 0.1
    for layer in range(CFG.n_layers):  # experts 0-2 of every layer, still queued when the prompt runs
        rt.prefetch(layer, list(range(16)))
    got, done = [], threading.Event()

    def steps():
        got.extend(run_steps(m, rt.kv_factory, steps=2))
        done.set()
    threading.Thread(target=steps, daemon=True).start()
    assert done.wait(60), "the step never finished"
    for a, b in zip(got, reference):
        assert torch.equal(a, b)
    assert rt.cache.counters.hits > 0


def test_a_wrong_prefetch_changes_only_counters(reference, tmp_path):
    m = quantized_model()
    rt = offload_model(m, cpu_memory=budget_for(3), context=32, cache_dir=tmp_path, prefetch=True)
    guessed = []
    right = rt.prefetch

    def wrong(layer, experts):  # the experts the router ranks last, instead of first
        bad = [e for e in range(rt.plan.num_experts) if e not in experts][: len(experts)]
        guessed.append(bad)
        right(layer, bad)
    rt.prefetch = wrong
    got = run_steps(m, rt.kv_factory)
    for a, b in zip(got, reference):
        assert torch.equal(a, b)
    assert guessed and rt.cache.counters.prefetched > 0


def refuse_o_direct(monkeypatch) -> None:
    """The runtime's os.open refuses O_DIRECT from here on, as some file systems do."""
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)
    monkeypatch.setattr(prepared.os, "open", no_direct)


def test_direct_reads_and_their_fallback(reference, tmp_path, monkeypatch, caplog):
    """O_DIRECT (page-aligned slots and a 4 KiB stride in the file) reads the same bytes; where the
    file system refuses O_DIRECT the file is read through the page cache, dropped after each read."""
    import logging
    m = quantized_model()
    rt = offload_model(m, cpu_memory=budget_for(1), context=32, cache_dir=tmp_path, direct=True)
    assert rt.file.stride % 4096 == 0 and os.fstat(rt.file.fd).st_size == 2 * 16 * rt.file.stride
    got = run_steps(m, rt.kv_factory)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))
    refuse_o_direct(monkeypatch)
    m = quantized_model()
    with caplog.at_level(logging.WARNING, logger="dbrxq.runtime.prepared"):
        rt = offload_model(m, cpu_memory=budget_for(1), context=32, cache_dir=tmp_path, direct=True)
    assert rt.file.dfd == -1 and rt.file.drop_page_cache
    assert any("O_DIRECT is not supported here" in msg for msg in caplog.messages)
    got = run_steps(m, rt.kv_factory)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))


def test_mapped_misses_compute_in_place(reference, tmp_path):
    """mmap: a miss is computed from the prepared file's pages, no slot, no copy; the same bits."""
    m = quantized_model()
    rt = offload_model(m, cpu_memory=budget_for(2), context=32, cache_dir=tmp_path, mmap=True)
    got = run_steps(m, rt.kv_factory)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))
    c = rt.cache.counters
    assert c.misses > 0 and c.evictions == 0  # misses are never admitted


RSS_CHILD = """
import json, sys
import torch
folder, cache = sys.argv[1], sys.argv[2]
import dbrxq
from dbrxq.core.memory import process_rss
from dbrxq.formats.checkpoint import CheckpointReader, checkpoint_float_dtype
from dbrxq.model.config import DbrxConfig
from dbrxq.plan.checkpoint import plan_offload
from dbrxq.plan.placement import RUNTIME_ALLOWANCE
with CheckpointReader(folder) as r:  # the budget: this process, the fixed part and 3/4 of the experts
    plan, layout = plan_offload(r, DbrxConfig.from_json(folder + "/config.json"), device=torch.device("cpu"),
                                dtype=checkpoint_float_dtype(r), backend=None, gpu_memory=None, cpu_memory=None,
                                context=32, batch_size=1, kv_cache="bf16")
budget = process_rss() + RUNTIME_ALLOWANCE + plan.device_fixed_bytes + plan.n_layers * plan.num_experts * 3 // 4 * layout.nbytes
r = dbrxq.load(folder, cpu_memory=budget, context=32, offload_options={"cache_dir": cache})
r.generate_ids([[5, 17, 99, 3, 250, 41, 7, 8] * 3], max_new_tokens=8)
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps([peak, budget, sum(r.offload.plan.slots_per_layer), r.offload.plan.n_layers * r.offload.plan.num_experts]))
"""


@pytest.mark.parametrize("width", ["d512", "real"])
def test_peak_rss_of_the_whole_process_stays_within_the_budget(tmp_path, width):
    """--cpu-memory bounds the whole process: from a fresh interpreter, a run's peak RSS (VmHWM: the
    interpreter, torch, dbrxq, the model and everything the run touched) stays within the budget, while
    experts are offloaded (fewer slots than experts, more than none). Two widths: d_model 512 with 16
    experts of 1024, and DBRX's real width (d_model 6144, experts of 10752: 102 MB each in int4; one
    layer of 4 experts, random codes), each in the blocks layout (read from the checkpoint itself) and
    the canonical one (through a prepared-expert file)."""
    import json
    import subprocess
    import sys
    if width == "real":
        from quantize.random import make_random_quantized_checkpoint
        config = preset_config("dbrx", n_layers=1, vocab_size=1536, moe_num_experts=4, moe_top_k=2, max_seq_len=64)
        folders = [make_random_quantized_checkpoint(tmp_path / lay, config, QuantConfig(layout=lay), progress=False)
                   for lay in ("blocks", "canonical")]
    else:
        src = make_random_checkpoint(tmp_path / "src", preset_config("tiny", d_model=512, ffn_hidden_size=1024,
                                     vocab_size=1536), seed=1, progress=False)
        folders = [quantize_checkpoint(src, tmp_path / lay, QuantConfig(layout=lay), progress=False)
                   for lay in ("blocks", "canonical")]
    for folder in folders:
        for f in dbrxq.default_model_dir().glob("tokenizer*"):
            shutil.copy(f, folder / f.name)
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(folder), str(tmp_path / "cache")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        peak, budget, slots, experts = json.loads(out.stdout.strip().splitlines()[-1])
        assert 0 < slots < experts, (folder, slots, experts)
        assert peak <= budget, (folder.name, peak, budget)


def test_routing_observed_in_one_run_places_the_next(qdir, tmp_path, caplog):
    """A checkpoint without a quantize report (qdir is RTN) starts cold; the routing its runs observe
    is saved beside the prepared file (periodically and at close), and the next load starts with each
    layer's most-routed experts resident and goes on counting from there. A damaged file is ignored
    with a warning."""
    import json
    budget = _budget(qdir, 2)
    runner = dbrxq.load(qdir, cpu_memory=budget, context=32, offload_options={"cache_dir": tmp_path})
    rt = runner.offload
    assert rt.hot is None and rt.routing_file is not None
    runner.generate_ids(PROMPT, max_new_tokens=6)
    rt.close()
    saved = json.loads(rt.routing_file.read_text())["counts"]
    # 8 prompt tokens + 5 decoded ones, each routed to top_k experts in every layer
    assert [sum(r) for r in saved] == [13 * CFG.top_k] * CFG.n_layers
    again = dbrxq.load(qdir, cpu_memory=budget, context=32, offload_options={"cache_dir": tmp_path}).offload
    for layer, counts in enumerate(saved):
        cap = again.cache.capacity[layer]
        assert cap >= 1 and again.hot[layer] == sorted(range(CFG.num_experts), key=lambda e: -counts[e])
        assert sorted(again.cache.cached(layer)) == sorted(again.hot[layer][:cap])  # warm start
    assert again.observed == saved
    rt.routing_file.write_text('{"format": "dbrxq-observed-routing-v1", "counts": [[-1]]}')
    third = dbrxq.load(qdir, cpu_memory=budget, context=32, offload_options={"cache_dir": tmp_path}).offload
    assert third.hot is None and "not usable routing counts" in caplog.text
