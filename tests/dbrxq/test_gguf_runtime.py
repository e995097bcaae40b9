"""A DBRX GGUF file in dbrxq's runtime (dbrxq.loading.gguf): the same file llama.cpp runs.

An F32 file gives the float checkpoint's weights bit for bit (every tensor mapped, transposed and named
right); a K-quant mix gives the logits of the float model holding llama.cpp's dequantization of its
blocks, up to the kernel's activation rounding, which is checked to be a small fraction of the
quantization's own effect; the tokenizer is the checkpoint's; bad files are refused in one line."""

import numpy as np
import pytest
import torch

import dbrxq
from dbrxq.core.errors import CheckpointError, ConfigError
from dbrxq.export.gguf import export_gguf
from dbrxq.formats.gguf_file import is_gguf
from dbrxq.formats.hub import default_model_dir
from dbrxq.formats.random import make_random_checkpoint, preset_config
from dbrxq.loading.loader import load_model
from dbrxq.text.tokenizer import DbrxTokenizer
from quantize import cext

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(cext.load() is None, reason="the C kernel cannot be built here")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_rt")
    cfg = preset_config("tiny", d_model=256, ffn_hidden_size=256, n_heads=4, vocab_size=1536)
    src = make_random_checkpoint(root / "src", cfg, dtype=torch.float32, tokenizer_dir=default_model_dir(),
                                 progress=False)
    out = {"src": src}
    for t in ("f32", "q4_k_m", "q2_k"):
        out[t] = export_gguf(src, root / f"{t}.gguf", type_=t).path
    return out


def _logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].double()


def _kl(p_logits, q_logits):
    p = torch.log_softmax(p_logits, -1)
    return float((p.exp() * (p - torch.log_softmax(q_logits, -1))).sum(-1).mean())


IDS = list(range(3, 60, 2)) + [700, 900, 1200]


def test_an_f32_file_gives_the_float_checkpoints_logits(files):
    """The same weights, bit for bit; the logits to float32 rounding (torch's matmuls may round a last
    bit differently for tensors at other addresses), while one misplaced tensor would move them by O(1)."""
    assert is_gguf(files["f32"]) and not is_gguf(files["src"])
    ref = load_model(files["src"], dtype="float32")
    got = load_model(files["f32"], dtype="float32")
    a, b = ref.state_dict(), got.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    want = _logits(ref, IDS)
    assert (_logits(got, IDS) - want).abs().max() <= 1e-5 * want.abs().max()


def _dequantized_model(path):
    """The float32 model holding llama.cpp's dequantization of every tensor of ``path`` (the reference)."""
    model = load_model(path, dtype="float32")
    ref = load_model(path.with_name("f32.gguf"), dtype="float32")
    deq = {t.name: torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).copy())
           for t in gguf.GGUFReader(path).tensors}
    c = ref.config
    E, F, D = c.num_experts, c.ffn_hidden_size, c.d_model
    with torch.no_grad():
        ref.transformer.wte.weight.copy_(deq["token_embd.weight"].reshape(-1, D))
        ref.lm_head.weight.copy_(deq["output.weight"].reshape(-1, D))
        for i, b in enumerate(ref.transformer.blocks):
            a = b.norm_attn_norm.attn
            a.Wqkv.weight.copy_(deq[f"blk.{i}.attn_qkv.weight"].reshape(a.Wqkv.weight.shape))
            a.out_proj.weight.copy_(deq[f"blk.{i}.attn_output.weight"].reshape(D, D))
            mlp = b.ffn.experts.mlp
            mlp.w1.copy_(deq[f"blk.{i}.ffn_gate_exps.weight"].reshape(E * F, D))
            mlp.v1.copy_(deq[f"blk.{i}.ffn_up_exps.weight"].reshape(E * F, D))
            mlp.w2.copy_(deq[f"blk.{i}.ffn_down_exps.weight"].reshape(E, D, F).transpose(1, 2).reshape(E * F, D))
    return model, ref


@pytest.mark.parametrize("mix", ["q4_k_m", "q2_k"])
def test_a_k_quant_file_computes_with_llama_cpps_dequantized_weights(files, mix):
    model, ref = _dequantized_model(files[mix])
    fl = load_model(files["src"], dtype="float32")
    got, want, flo = _logits(model, IDS), _logits(ref, IDS), _logits(fl, IDS)
    rounding, quantization = _kl(want, got), _kl(flo, want)
    # The kernel's only departure from `want` is rounding activations to int8 (|error| <= amax / 254 per value,
    # 0.4% of the largest), against the weights' own rounding (Q2_K-Q6_K: a few % of each weight); KL grows with
    # the square of a perturbation, so the rounding's share is expected near (0.4 / 4)^2 = 1% of the
    # quantization's: 10% leaves room, while a misread scale or code (the same order as the quantization) fails.
    assert quantization > 0 and rounding < 0.1 * quantization, (rounding, quantization)
    kinds = {type(w).__name__ for b in model.transformer.blocks for w in b.ffn.experts._prepared[0]}
    assert kinds == {"CpuKQWeight"} and model.transformer.blocks[0].ffn.experts._table is not None


def test_the_files_tokenizer_is_the_checkpoints(files):
    r = dbrxq.load(files["q4_k_m"])
    own = DbrxTokenizer.from_pretrained(files["src"])
    text = "Hello, world! <|im_start|>user\nnumbers 12345 and   spaces<|im_end|>"
    assert r.tokenizer.encode(text, allow_special=True) == own.encode(text, allow_special=True)
    assert r.tokenizer.eos_token_ids == own.eos_token_ids
    out = r.generate_ids([own.encode("Once upon")], max_new_tokens=5, stop_tokens=[])
    assert len(out.sequences[0]) == 5


def test_the_cli_runs_a_gguf_file(files):
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "dbrxq.cli", "run", str(files["q4_k_m"]), "--prompt", "Hello",
                          "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("Hello")


def _patched(src, tmp_path, edit):
    """A copy of ``src`` with ``edit(bytearray, reader)`` applied."""
    data = bytearray(src.read_bytes())
    edit(data, gguf.GGUFReader(src))
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(data))
    return out


def test_bad_files_are_refused_in_one_line(files, tmp_path):
    def scale_inf(data, r):  # Q4_K blocks: d, then dmin
        t = next(t for t in r.tensors if t.name == "blk.0.ffn_gate_exps.weight")
        data[t.data_offset + 2 + 144 * 37:t.data_offset + 4 + 144 * 37] = np.float16(np.inf).tobytes()
    with pytest.raises(CheckpointError, match=r"ffn_gate_exps\.weight: Q4_K tensor .* non-finite block scale"):
        load_model(_patched(files["q4_k_m"], tmp_path, scale_inf))

    def scale_nan(data, r):
        t = next(t for t in r.tensors if t.name == "blk.0.ffn_gate_exps.weight")
        data[t.data_offset:t.data_offset + 2] = np.float16(np.nan).tobytes()  # Q4_K: d first
    bad = _patched(files["q4_k_m"], tmp_path, scale_nan)
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_gate_exps\.weight: Q4_K tensor \[256, 256\] holds non-finite block scale"):
        load_model(bad)
    (tmp_path / "short.gguf").write_bytes(files["q4_k_m"].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_model(tmp_path / "short.gguf")
    with pytest.raises(ConfigError, match="offloading takes dbrxq's own checkpoints"):
        load_model(files["q4_k_m"], cpu_memory="1GiB")


def test_a_file_too_big_for_memory_is_refused_before_converting(files, monkeypatch):
    """Loaded whole: a file whose kernel copy (counted exactly: every tensor's blocks) exceeds the memory the
    process may use is refused in one line, not killed part-way."""
    import dbrxq.loading.gguf as g
    from dbrxq.formats.gguf_file import GGUFModelFile
    f = GGUFModelFile(files["q4_k_m"])
    need = g.resident_bytes(f, torch.bfloat16)
    f.close()
    model = load_model(files["q4_k_m"])
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    held += sum(w.w.numel() for m in model.modules() if getattr(m, "_prepared", None) is not None
                for w in ([x for p in m._prepared for x in p] if isinstance(m._prepared, list) else [m._prepared]))
    assert held == need  # the estimate is what loading holds, to the byte
    monkeypatch.setattr(g, "memory_limit", lambda: (need // 2, "test limit"))
    with pytest.raises(ConfigError, match="holds a GGUF file whole .* may use"):
        load_model(files["q4_k_m"])


def test_types_without_an_exact_kernel_and_other_architectures_are_refused(files, tmp_path):
    """An IQ4_NL tensor (llama.cpp's i-quant; zero blocks) and a llama architecture."""
    from gguf import GGMLQuantizationType as T, GGUFReader, GGUFWriter
    r = GGUFReader(files["f32"])
    for case in ("iq", "arch"):
        w = GGUFWriter(tmp_path / f"{case}.gguf", "llama" if case == "arch" else "dbrx")
        for f in r.fields.values():
            if f.name.startswith(("GGUF.", "general.architecture")):
                continue
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
        for t in r.tensors:
            a = np.asarray(t.data)
            if case == "iq" and t.name == "blk.1.attn_output.weight":
                w.add_tensor(t.name, np.zeros((a.shape[0], a.shape[1] // 32 * 18), dtype=np.uint8), raw_dtype=T.IQ4_NL)
            else:
                w.add_tensor(t.name, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    with pytest.raises(CheckpointError, match=r"blk\.1\.attn_output\.weight is IQ4_NL"):
        load_model(tmp_path / "iq.gguf")
    with pytest.raises(CheckpointError, match="general.architecture is 'llama'"):
        load_model(tmp_path / "arch.gguf")


def test_eval_and_export_know_a_gguf_file(files, tmp_path):
    """`dbrxq export` of a GGUF file says it runs as it is; the F32 file's perplexity (dbrxq eval's measure) is
    the float checkpoint's."""
    from dbrxq.runtime.evaluate import perplexity
    with pytest.raises(ConfigError, match="is a GGUF file already"):
        export_gguf(files["q4_k_m"], tmp_path / "again.gguf")
    ids = [(7 * i * i + 3) % 1500 for i in range(300)]
    a = perplexity(load_model(files["f32"], dtype="float32"), ids, window=128, stride=64)
    b = perplexity(load_model(files["src"], dtype="float32"), ids, window=128, stride=64)
    assert a["tokens"] == b["tokens"] == 299 and abs(a["ppl"] - b["ppl"]) <= 1e-4 * b["ppl"]
