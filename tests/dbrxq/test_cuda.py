"""The CUDA path, run where a GPU is: kernels against a float64 computation, the model against
transformers and against the CPU, offloading (GPU slots, the pinned host tier, the disk tier through
pinned staging, side-stream copies, prefetch) bit for bit against the resident model, generation,
the serving engine and the command line.

Every test skips without CUDA (CI has none); on a GPU machine: ``pytest tests/dbrxq/test_cuda.py``.
``DBRXQ_TEST_DEVICE=cpu`` runs the same checks on the CPU, to check the tests themselves where no
GPU is at hand (there the offloading tests go through the CPU reader instead).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from click.testing import CliRunner

import dbrxq
from dbrxq.cli.app import cli
from dbrxq.formats.random import make_random_checkpoint, preset_config
from dbrxq.loading.loader import load_model
from dbrxq.runtime.reader import AlwaysMove
from quantize import kernels
from quantize.config import QuantConfig
from quantize.primitives import QuantizedTensor, pack_codes
from quantize.writer import quantize_checkpoint

DEV = torch.device(os.environ.get("DBRXQ_TEST_DEVICE", "cuda"))
CUDA = DEV.type == "cuda"
pytestmark = pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="no CUDA device")
U32 = 2.0**-24  # float32 unit roundoff
PROMPT = [[5, 17, 99, 3, 250, 41, 7, 8]]


# ----------------------------------------------------------------------------- kernels
def _representable(bits: int, group_size: int, symmetric: bool, n: int, k: int, seed: int) -> QuantizedTensor:
    """A quantized weight whose every number on the kernel's way is exact in bf16: scales m * 2^-7
    (m in 1..15, 4 significant bits), so (q - z) * s, (q - 8) * s and torch's zero term (8 - z) * s
    need at most 8 significant bits. Then any error of a bf16 kernel is accumulation and output
    rounding only, and the bound below is tight enough to catch a swapped nibble or a wrong zero."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.randint(1, 16, (n, groups), generator=g) * 2.0**-7).half()
    zeros = None if symmetric else torch.randint(0, 2**bits, (n, groups), generator=g, dtype=torch.uint8)
    return QuantizedTensor(pack_codes(codes, bits), scales, zeros, bits, group_size, (n, k))


def _check_bf16_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y = x @ w^T from bf16 x and exactly represented w: float32 accumulation of exact products
    (<= K u32 sum |x||w|) and one rounding of the output to bf16 (<= 2^-8 |y|)."""
    xd, wd = x.double().cpu(), w.double().cpu()
    ref = xd @ wd.t()
    tol = 2.0**-8 * ref.abs() + x.shape[-1] * U32 * (xd.abs() @ wd.abs().t()) + 1e-30
    err = (y.double().cpu() - ref).abs()
    assert (err <= tol).all(), f"max error {float(err.max()):.3e}, over the bound by {float((err - tol).max()):.3e}"


@pytest.mark.parametrize("bits,group_size,symmetric", [
    (4, 32, True), (4, 64, False), (4, 128, True), (4, 128, False), (4, -1, False),  # -1: per channel
    (3, 64, False), (3, 128, True), (2, 32, False), (2, 64, True)])  # 2/3 bits: widened to int4 codes
def test_int4_kernel_on_the_device_is_exact_up_to_float_rounding(bits, group_size, symmetric):
    n, k = 96, 512
    qt = _representable(bits, group_size, symmetric, n, k, seed=bits * 1000 + group_size + symmetric)
    pw = kernels.prepare(qt, "torch_int4", DEV)
    w = qt.dequantize(torch.float32)
    for m in (1, 5, 16, 33):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        y = pw.matmul(x.to(DEV))
        assert y.device.type == DEV.type and y.dtype == torch.bfloat16 and y.shape == (m, n)
        _check_bf16_product(y, x, w)


def test_auto_backend_on_the_device_is_torchs_int4_kernel_for_2_3_4_bits():
    for bits in (2, 3, 4):
        qt = _representable(bits, 64, False, 32, 256, seed=bits)
        pw = kernels.prepare(qt, "auto", DEV)
        assert pw.backend == ("torch_int4" if CUDA else "cpu_q4" if not kernels.cext.unavailable_reason()
                              else "torch_int4")


def test_int8_kernel_on_the_device_is_exact_up_to_float_rounding():
    """torch_int8 (per-channel, symmetric): with power-of-two scales the row scaling is exact too."""
    n, k = 64, 384
    why = kernels.backend_support("torch_int8", DEV, 8, -1, shape=(n, k))
    if why:  # then dbrxq's int8 weights use the torch backend there (choose_backend)
        pytest.skip(why)
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(1, 256, (n, k), generator=g, dtype=torch.uint8)
    scales = (2.0 ** -torch.randint(5, 10, (n, 1), generator=g).float()).half()
    qt = QuantizedTensor(codes, scales, None, 8, -1, (n, k))
    pw = kernels.prepare(qt, "torch_int8", DEV)
    w = qt.dequantize(torch.float32)
    for m in (1, 7, 32):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        _check_bf16_product(pw.matmul(x.to(DEV)), x, w)


def test_torch_backend_on_the_device_is_float32():
    """The reference backend in float32 (TF32 off, torch's default): float32 accumulation only."""
    if CUDA:
        assert not torch.backends.cuda.matmul.allow_tf32
    qt = _representable(4, 128, False, 48, 256, seed=5)
    pw = kernels.prepare(qt, "torch", DEV)
    w = qt.dequantize(torch.float32).double()
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(9))
    y = pw.matmul(x.to(DEV)).double().cpu()
    ref = x.double() @ w.t()
    assert ((y - ref).abs() <= (256 + 2) * U32 * (x.double().abs() @ w.abs().t()) + 1e-30).all()


# ----------------------------------------------------------------------------- models
def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> tuple[bool, float]:
    err = (a.float().cpu() - b.float().cpu()).abs().max().item()
    return err <= rtol * max(a.abs().max().item(), 1.0), err


def test_float_model_on_the_device_matches_transformers(tmp_path):
    """Logits of a whole prompt and of cached decoding, float32 on both sides. Tolerance 1e-4 of the
    largest logit: cuBLAS and the GPU's attention sum in other orders than the CPU (the CPU parity test
    allows 1e-5), while a real bug (RoPE base, clamp, routing) moves logits by more than 1e-2."""
    transformers = pytest.importorskip("transformers")
    from tests.dbrxq.test_parity import CONFIGS, hf_config
    torch.manual_seed(1234)
    ref = transformers.DbrxForCausalLM(hf_config(CONFIGS["gqa_clip"])).eval()
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path, device=DEV, dtype="float32")
    assert ours.device.type == DEV.type
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        ok, err = _close(want, ours(ids.to(DEV)).logits, 1e-4)
        assert ok, err
        cache = ours.new_cache(2, 24)
        ours(ids[:, :16].to(DEV), past_key_values=cache, use_cache=True)
        for t in range(16, 24):
            step = ours(ids[:, t:t + 1].to(DEV), past_key_values=cache, use_cache=True).logits[:, -1]
            ok, err = _close(want[:, t], step, 1e-4)
            assert ok, (t, err)


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    """A random tiny checkpoint RTN-quantized (int4 g128 experts, int8 attention), with the demo's tokenizer."""
    src = make_random_checkpoint(tmp_path_factory.mktemp("src"), preset_config(
        "tiny", d_model=128, ffn_hidden_size=128, vocab_size=1536), seed=1, progress=False)
    out = quantize_checkpoint(src, tmp_path_factory.mktemp("q") / "q", QuantConfig(), progress=False)
    for f in dbrxq.default_model_dir().glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def steps(model, n: int = 5, cache=None) -> list[torch.Tensor]:
    """Greedy prefill + n decode steps with an explicit cache: every step's logits (on the CPU)."""
    cache = cache if cache is not None else model.new_cache(1, 32)
    ids = torch.tensor(PROMPT, device=model.device)
    out = []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        for _ in range(n):
            out.append(logits.float().cpu())
            logits = model(logits.argmax(-1)[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    return out


def test_quantized_model_on_the_device_matches_the_cpu(qdir):
    """The same checkpoint on the CPU and on the device: with the float32 reference backend within
    float32 reordering (1e-4 of the largest logit, as above); with the device's own kernels (bf16
    activations through torch's int4/int8 kernels, each checked above) within bf16's precision
    over two layers (3e-2 of the largest logit; a wrong code or scale moves them by O(1))."""
    cpu = steps(load_model(qdir, device="cpu", dtype="float32", backend="torch"))
    ref_dev = steps(load_model(qdir, device=DEV, dtype="float32", backend="torch"))
    for a, b in zip(cpu, ref_dev):
        ok, err = _close(a, b, 1e-4)
        assert ok, err
    fast = load_model(qdir, device=DEV)
    w = fast.transformer.blocks[0].ffn.experts._prepared[0][0]
    if CUDA:
        assert w.backend == "torch_int4" and w.packed.device.type == "cuda"
    first = steps(fast, n=1)[0]
    ok, err = _close(cpu[0], first, 3e-2)
    assert ok, err


def test_resident_quantized_model_holds_each_weight_once_on_the_device(qdir):
    """After load, the device holds the kernels' weights and the float tensors, not also the
    checkpoint's canonical copy of the quantized ones (those stay file-backed on the CPU)."""
    if not CUDA:
        pytest.skip("device memory: CUDA only")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = load_model(qdir, device=DEV)
    held = torch.cuda.memory_allocated() - before
    prepared = []
    for m in model.modules():
        p = getattr(m, "_prepared", None)
        prepared += [w for t in p for w in t] if isinstance(p, list) else [] if p is None else [p]
    kernel = sum(w.nbytes for w in prepared)
    floats = sum(t.numel() * t.element_size() for t in model.state_dict().values()
                 if t.is_floating_point() and t.dtype != torch.float16 and t.device.type == "cuda")
    canonical = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                    if n.endswith((".qweight", ".scales", ".qzeros")))
    # torch_int4 keeps bf16 scale/zero pairs (2 x 2 bytes per group) where the checkpoint has fp16
    # scales (2 bytes): the kernels' nbytes counts codes + scales as stored, so allow those extra bytes
    assert held <= kernel + floats + canonical // 8 + (1 << 20), (held, kernel, floats, canonical)
    assert all(t.device.type == "cpu" for n, t in model.state_dict().items()
               if n.endswith((".qweight", ".scales", ".qzeros")))


def test_decoding_attention_on_the_device_does_not_use_cudnn(qdir):
    """cuDNN's attention builds a plan per new key length (30-40 ms each on an H200), and every decode
    step has a new one: dbrxq.model.dbrx.sdpa leaves that backend out on CUDA."""
    if not CUDA:
        pytest.skip("CUDA's attention backends")
    from torch.profiler import ProfilerActivity, profile
    model = load_model(qdir, device=DEV)
    cache = model.new_cache(1, 16)
    ids = torch.tensor(PROMPT, device=DEV)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids[:, :1], past_key_values=cache, use_cache=True)
    names = {e.key for e in prof.key_averages()}
    assert any("attention" in n for n in names) and not any("cudnn" in n for n in names), sorted(names)


# ----------------------------------------------------------------------------- offloading
def _budget(qdir, slots: int) -> tuple[dict, int]:
    """Budget keywords that hold the non-expert part and ``slots`` expert slots per layer on DEV, from
    the plan (headers and one expert only); and one slot's bytes."""
    from dbrxq.formats.checkpoint import CheckpointReader, checkpoint_float_dtype
    from dbrxq.model.config import DbrxConfig
    from dbrxq.plan.checkpoint import plan_offload

    cfg = DbrxConfig.from_json(qdir / "config.json")
    with CheckpointReader(qdir) as r:
        plan, layout = plan_offload(r, cfg, device=DEV, dtype=checkpoint_float_dtype(r), backend=None,
                                    gpu_memory="1GiB" if CUDA else None, cpu_memory=None if CUDA else "1GiB",
                                    context=32, batch_size=1, kv_cache="bf16")
    n = plan.device_fixed_bytes + slots * cfg.n_layers * layout.nbytes
    return ({"gpu_memory": n} if CUDA else {"cpu_memory": n}), layout.nbytes


@pytest.fixture(scope="module")
def resident(qdir):
    return steps(load_model(qdir, device=DEV))


@pytest.mark.parametrize("slots,host,prefetch", [(1, "all", True), (3, "all", False), (2, "none", True),
                                                 (0, "all", True)])
def test_offloaded_on_the_device_equals_resident_bitwise(qdir, resident, tmp_path, slots, host, prefetch):
    """Experts in GPU slots, the rest pinned in host RAM (host="all") or read from the prepared file
    through the pinned staging buffer (host="none"), copied on the side stream, with and without
    prefetch: the same kernels on the same bytes, so the logits are the resident model's, bit for bit;
    the device's tracked bytes stay within the budget, and so does what torch allocated there while
    generating (loading also prepares each expert once on the device for the prepared-expert file)."""
    kw, slot_bytes = _budget(qdir, slots)
    if CUDA and host == "none":
        kw["cpu_memory"] = slot_bytes  # the staging buffer alone: every miss comes from the file
    if CUDA:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    runner = dbrxq.load(qdir, device=DEV, context=32, **kw,
                        offload_options={"cache_dir": tmp_path, "miss_policy": AlwaysMove(), "prefetch": prefetch})
    rt = runner.offload
    assert rt is not None and rt.plan.slots_per_layer == [slots] * 2
    if CUDA:
        assert sum(len(h) for h in rt.plan.host_experts) == (0 if host == "none" else 32)
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    got = steps(runner.model, cache=rt.kv_factory(1, 32))
    for a, b in zip(got, resident):
        assert torch.equal(a, b)
    d = rt.stats.phases["decode"]
    assert d.misses > 0 and d.bytes_moved >= d.misses * rt.layout.nbytes
    if prefetch and slots and CUDA:
        assert rt.cache.counters.prefetched > 0
    budget = kw["gpu_memory" if CUDA else "cpu_memory"]
    assert rt.stats.peak["device"] <= budget
    if CUDA:
        peak = torch.cuda.max_memory_allocated() - base
        assert peak <= budget, (peak, budget)


def test_measured_miss_policy_on_the_device_picks_and_stays_close(qdir, resident, tmp_path):
    """CUDA's default miss policy times a copy + GPU compute against CPU compute and picks one; either
    way the logits stay within the bf16 kernels' precision of the resident model's (3e-2, as above)."""
    if not CUDA:
        pytest.skip("the measured miss policy is CUDA's")
    kw, _ = _budget(qdir, 1)
    runner = dbrxq.load(qdir, device=DEV, context=32, **kw, offload_options={"cache_dir": tmp_path})
    got = steps(runner.model, cache=runner.offload.kv_factory(1, 32))
    assert runner.offload.miss_policy.choice  # it measured
    for a, b in zip(got, resident):
        ok, err = _close(b, a, 3e-2)
        assert ok, err


@pytest.fixture(scope="module")
def mixed_dir(qdir, tmp_path_factory):
    """The same random model with per-expert recipes (format_version 3) at an average of 2.5 bits."""
    from calibration.options import CalibrationOptions
    from calibration.pipeline import quantize_with_calibration
    src = make_random_checkpoint(tmp_path_factory.mktemp("msrc"), preset_config(
        "tiny", d_model=128, ffn_hidden_size=128, vocab_size=1536), seed=1, progress=False,
        tokenizer_dir=dbrxq.default_model_dir())
    shutil.copy(dbrxq.default_model_dir() / "tokenizer.tiktoken.json", src)
    out = tmp_path_factory.mktemp("mixed") / "q"
    quantize_with_calibration(src, out, QuantConfig(method="rtn"),
                              CalibrationOptions(samples=8, seq_len=64, target_bits=2.5), progress=False)
    return out


def test_mixed_recipes_on_the_device_resident_and_offloaded(mixed_dir, tmp_path):
    """Per-expert recipes (2/3/4-bit experts in one layer) on the device: within bf16 precision of the
    CPU's float32 reference (3e-2 of the largest logit, as above), and offloaded with a pool of slots
    per size class, bit for bit the resident model's."""
    cpu = steps(load_model(mixed_dir, device="cpu", dtype="float32", backend="torch"), n=1)[0]
    resident = steps(load_model(mixed_dir, device=DEV))
    ok, err = _close(cpu, resident[0], 3e-2)
    assert ok, err
    kw, _ = _budget(mixed_dir, 2)
    runner = dbrxq.load(mixed_dir, device=DEV, context=32, **kw,
                        offload_options={"cache_dir": tmp_path, "miss_policy": AlwaysMove()})
    assert runner.offload.layout.mixed and runner.offload.plan.class_slots is not None
    assert all(n >= 2 for n in runner.offload.plan.slots_per_layer)
    for a, b in zip(steps(runner.model, cache=runner.offload.kv_factory(1, 32)), resident):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- generation and serving
@pytest.fixture(scope="module")
def demo_pair():
    return dbrxq.load(None, device="cpu", dtype="float32"), dbrxq.load(None, device=DEV, dtype="float32")


@pytest.mark.parametrize("kv", ["bf16", "int8"])
def test_demo_generates_the_cpus_tokens_on_the_device(demo_pair, kv):
    """The trained demo model, float32, greedy: the same 24 tokens on both devices, with the model's
    KV cache and with the int8 one (float32 reordering is far below the demo's top-2 logit gaps)."""
    cpu, dev = demo_pair
    prompts = [cpu.tokenizer.encode(t) for t in ("The function returns", "A list of")]
    a = cpu.generate_ids(prompts, max_new_tokens=24, kv_cache=kv).sequences
    b = dev.generate_ids(prompts, max_new_tokens=24, kv_cache=kv).sequences
    assert a == b


def test_engine_on_the_device_equals_generate_alone(demo_pair):
    """Continuous batching on the device (float weights applied row by row under batch invariance):
    each request's greedy tokens are those of generate alone, with one request joining mid-run."""
    from dbrxq.serve.engine import Engine
    from tests.dbrxq.engine_helpers import collect
    dev = demo_pair[1]
    prompts = [dev.tokenizer.encode(t) for t in ("The function returns", "If the file", "def")]
    engine = Engine(dev, max_batch=4, context=128)
    try:
        out, _ = collect(engine, [dict(prompt=p, max_tokens=12) for p in prompts], stagger=1)
    finally:
        engine.shutdown()
    for p, got in zip(prompts, out):
        assert got == dev.generate_ids([p], max_new_tokens=12).sequences[0]


def test_cli_runs_on_the_device(qdir):
    r = CliRunner().invoke(cli, ["run", "--device", DEV.type, "-p", "The function returns", "-n", "8", "--stats"])
    assert r.exit_code == 0, r.output
    if CUDA:
        assert "peak GPU" in r.output
    kw, _ = _budget(qdir, 1)
    opt = ["--gpu-memory" if CUDA else "--cpu-memory", f"{-(-next(iter(kw.values())) // 1024)}KiB"]
    r = CliRunner().invoke(cli, ["run", str(qdir), "--device", DEV.type, *opt, "--context", "32", "-p", "The",
                                 "-n", "4", "--stats"])
    assert r.exit_code == 0, r.output
