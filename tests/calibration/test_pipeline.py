"""The streaming calibration pipeline end to end on tiny checkpoints (CPU, seconds each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dbrxq
from calibration import pipeline, progress
from calibration.options import CalibrationOptions
from calibration.pipeline import quantize_with_calibration
from calibration.tokens import calibration_tokens
from dbrxq.core.errors import (
    CheckpointError,
    ConfigError,
    DbrxqError,
    QuantizationError,
)
from dbrxq.formats.random import make_random_checkpoint, preset_config
from dbrxq.loading.loader import load_model
from dbrxq.model.moe import route
from dbrxq.runtime.evaluate import compare
from dbrxq.text.tokenizer import DbrxTokenizer
from quantize.config import ModuleQuant, QuantConfig
from quantize.writer import quantize_checkpoint

HELDOUT = Path(__file__).resolve().parents[2] / "calibration" / "data" / "heldout.txt"
OPTS = CalibrationOptions(samples=8, seq_len=64)  # 512 tokens: ~128 per expert at top-4 of 16
QC = {m: QuantConfig(method=m, experts=ModuleQuant(4, 32)) for m in ("rtn", "gptq")}  # d_model 64, ffn 32


def make_src(folder: Path, **kw) -> Path:
    """A random tiny DBRX (d_model 64, 16 experts, top-4, 2 layers) with the demo tokenizer."""
    make_random_checkpoint(folder, preset_config("tiny", vocab_size=1536), progress=False,
                           tokenizer_dir=dbrxq.default_model_dir(), **kw)
    shutil.copy(dbrxq.default_model_dir() / "tokenizer.tiktoken.json", folder)
    return folder


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    # Small shards: every layer's tensors span several files (exercises per-layer shard fetching).
    return make_src(tmp_path_factory.mktemp("src"), max_shard_bytes=100_000)


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory) -> Path:
    """An uninterrupted gptq run, the reference for the resume tests."""
    out = tmp_path_factory.mktemp("clean") / "q"
    quantize_with_calibration(src, out, QC["gptq"], OPTS, progress=False)
    return out


def files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes but the report (whose timings differ from run to run)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != progress.REPORT_NAME}


def one_line(e: pytest.ExceptionInfo) -> str:
    assert isinstance(e.value, DbrxqError) and "\n" not in str(e.value), repr(e.value)
    return str(e.value)


# ------------------------------------------------------------------------------------ results
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_load_generate(src, tmp_path, method):
    out = tmp_path / "q"
    r = quantize_with_calibration(src, out, QC[method], OPTS, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == method and qc["calibration"]["samples"] == 8 and qc["calibration"]["seq_len"] == 64
    assert not (out / progress.MANIFEST_NAME).exists() and not (out / progress.ACTIVATIONS_NAME).exists()
    rep = json.loads((out / "quantize_report.json").read_text())
    assert rep == json.loads(json.dumps(r.report)) and len(rep["layers"]) == 2
    assert set(rep["errors"]) == {"attn.Wqkv", "attn.out_proj", "experts.w1", "experts.v1", "experts.w2"}
    assert "rel. output error" in r.summary and "peak RSS" in r.summary
    m = dbrxq.load(out)
    text = m.generate("def f(x):", max_new_tokens=6)
    assert isinstance(text, str) and text


def test_rtn_through_pipeline_equals_the_rtn_writer(src, tmp_path):
    """One canonical format: the pipeline's rtn tensors are the streaming writer's, byte for byte."""
    quantize_with_calibration(src, tmp_path / "p", QC["rtn"], OPTS, progress=False)
    quantize_checkpoint(src, tmp_path / "w", QC["rtn"], progress=False)

    def tensors(folder):
        out = {}
        for f in folder.glob("*.safetensors"):
            out.update(load_file(str(f)))
        return out
    a, b = tensors(tmp_path / "p"), tensors(tmp_path / "w")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gptq_is_closer_to_the_float_model_than_rtn(src, tmp_path):
    """Same model, same calibration, int3 per-channel experts and attention (where methods separate):
    GPTQ's mean KL to the float model on held-out text is well below RTN's."""
    tok = DbrxTokenizer.from_pretrained(src)
    ids = tok.encode(HELDOUT.read_text())[:2048]
    ref = load_model(src, dtype="float32")
    kl = {}
    for m in ("rtn", "gptq"):
        qc = QuantConfig(method=m, experts=ModuleQuant(3, -1), attn=ModuleQuant(3, -1))
        quantize_with_calibration(src, tmp_path / m, qc, OPTS, progress=False)
        q = load_model(tmp_path / m, dtype="float32", backend="torch")
        kl[m] = compare(ref, q, ids, window=256, stride=256)["mean_kl"]
    # measured 1.07e-4 vs 1.52e-4 (0.70; int4, where the full-range RTN grid closes most of the gap: 0.86);
    # 0.8 leaves room for the thread count's effect on GPTQ's float sums
    assert kl["gptq"] < 0.8 * kl["rtn"], kl


def test_token_counts_are_the_routers(src, clean):
    """Report token counts == an independent recount: the quantized model (reference kernels) run on
    the same calibration windows, routed with the model's own route()."""
    rep = json.loads((clean / "quantize_report.json").read_text())
    tok = DbrxTokenizer.from_pretrained(src)
    tokens, _ = calibration_tokens(None, tok, samples=8, seq_len=64, seed=0)
    q = load_model(clean, dtype="float32", backend="torch")
    c = q.config
    with torch.no_grad():
        logits = q(input_ids=tokens, use_cache=False, output_router_logits=True).router_logits
    for layer, lg in zip(rep["layers"], logits):
        _, ids = route(lg, c.top_k, c.ffn_config.moe_normalize_expert_weights)
        want = torch.bincount(ids.reshape(-1), minlength=c.num_experts).tolist()
        got = [ex["tokens"] for ex in layer["experts"]]
        assert sum(got) == 8 * 64 * c.top_k
        assert sum(abs(a - b) for a, b in zip(got, want)) <= 2, (layer["layer"], got, want)  # float ties only


def test_rare_experts_listed_and_route_all(src, tmp_path):
    opts = CalibrationOptions(samples=8, seq_len=64, min_expert_tokens=130)
    r = quantize_with_calibration(src, tmp_path / "q", QC["gptq"], opts, progress=False)
    rare = r.report["rare_experts"]
    counts = {(L["layer"], ex["expert"]): ex["tokens"] for L in r.report["layers"] for ex in L["experts"]}
    assert rare and {(x["layer"], x["expert"]) for x in rare} == {k for k, n in counts.items() if n < 130}
    assert all(x["strategy"] == "route-all" for x in rare)
    ex = r.report["layers"][rare[0]["layer"]]["experts"][rare[0]["expert"]]
    assert ex["w1"]["nsamples"] == 8 * 64  # route-all: the Hessian saw every token
    assert r.report["totals"]["experts_fallback"] == len(rare) and "rare experts" in r.summary


# ------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("activations", ["stored", "recomputed", "tampered"])
@pytest.mark.parametrize("crash", ["layer1", "head"])
def test_crash_then_resume_is_byte_identical(src, clean, tmp_path, monkeypatch, crash, activations):
    out = tmp_path / "q"
    real_layer, real_head = pipeline.process_layer, pipeline.write_head

    def boom(*a, **k):
        raise KeyboardInterrupt("injected")
    if crash == "layer1":
        monkeypatch.setattr(pipeline, "process_layer", lambda run, i, x: boom() if i == 1 else real_layer(run, i, x))
    else:
        monkeypatch.setattr(pipeline, "write_head", boom)
    with pytest.raises(KeyboardInterrupt):
        quantize_with_calibration(src, out, QC["gptq"], OPTS, progress=False)
    assert not (out / "config.json").exists() and (out / progress.MANIFEST_NAME).exists()
    assert not list(out.glob("*.tmp.*"))
    with pytest.raises(DbrxqError):
        load_model(out)  # no config.json, no index: visibly incomplete
    monkeypatch.setattr(pipeline, "process_layer", real_layer)
    monkeypatch.setattr(pipeline, "write_head", real_head)
    if activations == "recomputed":
        (out / progress.ACTIVATIONS_NAME).unlink(missing_ok=True)
    if activations == "tampered" and (out / progress.ACTIVATIONS_NAME).exists():
        # 64 flipped bytes in the stored activations (a valid file still): resume must not trust them
        act = out / progress.ACTIVATIONS_NAME
        data = bytearray(act.read_bytes())
        for j in range(len(data) - 64, len(data)):
            data[j] ^= 0x5A
        act.write_bytes(bytes(data))
    # Without --resume the unfinished run is refused, pointing at --resume.
    with pytest.raises(QuantizationError) as e:
        quantize_with_calibration(src, out, QC["gptq"], OPTS, progress=False)
    assert "--resume" in one_line(e)
    quantize_with_calibration(src, out, QC["gptq"], OPTS, resume=True, progress=False)
    assert files(out) == files(clean)


@pytest.mark.parametrize("manifest, message", [
    ("not json {", "not valid JSON"),
    ('{"format": "dbrxq-quantize-progress-v1", "parts": {}}', "not a dbrxq progress manifest"),
    ("[1, 2]", "not a dbrxq progress manifest"),
    (None, "is malformed"),  # a part whose file points outside OUT
    ("flip", "does not match the checksum"),  # one recorded size changed, the JSON still valid
])
def test_resume_refuses_a_damaged_manifest(src, tmp_path, monkeypatch, manifest, message):
    out = tmp_path / "q"
    monkeypatch.setattr(pipeline, "write_head", lambda run: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError):
        quantize_with_calibration(src, out, QC["gptq"], OPTS, progress=False)
    path = out / progress.MANIFEST_NAME
    if manifest is None:
        data = json.loads(path.read_text())
        data["parts"]["layer.0"]["file"] = "../../outside/model.safetensors"
        manifest = json.dumps(data)
    elif manifest == "flip":
        data = json.loads(path.read_text())
        data["parts"]["layer.0"]["bytes"] += 1
        manifest = json.dumps(data)
    path.write_text(manifest)
    with pytest.raises(QuantizationError) as e:
        quantize_with_calibration(src, out, QC["gptq"], OPTS, resume=True, progress=False)
    assert message in one_line(e) and "--overwrite" in str(e.value)
    assert not (out / "config.json").exists()


def test_resume_refuses_other_settings(src, tmp_path, monkeypatch):
    out = tmp_path / "q"
    monkeypatch.setattr(pipeline, "write_head", lambda run: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError):
        quantize_with_calibration(src, out, QC["gptq"], OPTS, progress=False)
    other = CalibrationOptions(samples=8, seq_len=64, seed=1)
    with pytest.raises(QuantizationError) as e:
        quantize_with_calibration(src, out, QC["gptq"], other, resume=True, progress=False)
    assert "calibration.seed (0 then, 1 now)" in one_line(e) and "--overwrite" in str(e.value)


def test_complete_out_is_never_silently_replaced(src, clean, tmp_path):
    out = tmp_path / "q"
    shutil.copytree(clean, out)
    with pytest.raises(QuantizationError) as e:
        quantize_with_calibration(src, out, QC["rtn"], OPTS, progress=False)
    assert "--overwrite" in one_line(e)
    # --resume on the very same finished run is a no-op; on another recipe it is refused.
    before = files(out)
    quantize_with_calibration(src, out, QC["gptq"], OPTS, resume=True, progress=False)
    assert files(out) == before
    with pytest.raises(QuantizationError) as e:
        quantize_with_calibration(src, out, QC["rtn"], OPTS, resume=True, progress=False)
    assert "--overwrite" in one_line(e)
    quantize_with_calibration(src, out, QC["rtn"], OPTS, overwrite=True, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == "rtn"


@pytest.mark.parametrize("damage", ["report-not-json", "config-long-integer", "config-not-utf8"])
def test_resume_on_a_complete_out_with_damaged_json_is_never_a_traceback(src, clean, tmp_path, damage):
    """--resume looks at OUT's config.json and report (files a crash, a disk or a person may have
    damaged); JSON that cannot be read is treated as not-this-run or no-report, not a traceback."""
    out = tmp_path / "q"
    shutil.copytree(clean, out)
    if damage == "report-not-json":
        (out / "quantize_report.json").write_text("{not json")
        result = quantize_with_calibration(src, out, QC["gptq"], OPTS, resume=True, progress=False)
        assert "already complete" in result.summary
        return
    cfg = (out / "config.json").read_bytes()
    (out / "config.json").write_bytes(cfg.replace(b'"d_model": 64', b'"d_model": ' + b"1" * 5000, 1)
                                      if damage == "config-long-integer" else b"\xff\xfe" + cfg)
    with pytest.raises(QuantizationError) as e:
        quantize_with_calibration(src, out, QC["gptq"], OPTS, resume=True, progress=False)
    assert "--overwrite" in one_line(e)


def test_disk_space_is_checked_first(src, tmp_path, monkeypatch):
    class Usage:
        free = 1000
    monkeypatch.setattr(progress.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(QuantizationError) as e:
        quantize_with_calibration(src, tmp_path / "q", QC["gptq"], OPTS, progress=False)
    assert "not enough free disk space" in one_line(e)
    assert not list((tmp_path / "q").glob("*.safetensors"))


# ------------------------------------------------------------------------------------ bad input
def test_missing_shard(src, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    victim = sorted(bad.glob("model-*.safetensors"))[3]
    victim.unlink()
    with pytest.raises(CheckpointError) as e:
        quantize_with_calibration(bad, tmp_path / "q", QC["gptq"], OPTS, progress=False)
    assert victim.name in one_line(e)
    assert not (tmp_path / "q").exists()


def test_not_dbrx_or_quantized_or_missing(src, clean, tmp_path):
    bad = tmp_path / "llama"
    shutil.copytree(src, bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises((ConfigError, CheckpointError)) as e:
        quantize_with_calibration(bad, tmp_path / "q1", QC["gptq"], OPTS, progress=False)
    assert "config.json" in one_line(e) or "llama" in str(e.value)
    with pytest.raises(QuantizationError) as e:
        quantize_with_calibration(clean, tmp_path / "q2", QC["gptq"], OPTS, progress=False)
    assert "already quantized" in one_line(e)
    with pytest.raises(CheckpointError) as e:
        quantize_with_calibration(tmp_path / "nowhere", tmp_path / "q3", QC["gptq"], OPTS, progress=False)
    assert "not a folder and not a hub repo id" in one_line(e)


@pytest.mark.parametrize("qc, opts, match", [
    (QC["gptq"], CalibrationOptions(rare_strategy="drop"), "rare expert strategy 'drop'"),
    (QC["gptq"], CalibrationOptions(seq_len=100_000), "--calib-seq-len 100000 exceeds"),
    (QuantConfig(method="gptq"), OPTS, "input dim 64.*group_size=128"),  # g128 does not divide d_model 64
    (QC["gptq"], CalibrationOptions(samples=0, seq_len=64), "--calib-samples 0"),
    (QC["gptq"], CalibrationOptions(samples=100, seq_len=256, data=str(HELDOUT.parent / "missing.txt")),
     "missing.txt: no such file"),
])
def test_bad_options(src, tmp_path, qc, opts, match):
    with pytest.raises(DbrxqError, match=match) as e:
        quantize_with_calibration(src, tmp_path / "q", qc, opts, progress=False)
    one_line(e)


# ------------------------------------------------------------------------------------ hub
@pytest.fixture
def offline_hub_repo(src, tmp_path, monkeypatch):
    """The tiny sharded checkpoint as the cached hub repo org/tiny, in offline mode."""
    import huggingface_hub.constants as hf_constants
    commit = "a" * 40
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--org--tiny"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return repo


def test_hub_repo_streams_shards_layer_by_layer(offline_hub_repo, clean, tmp_path, monkeypatch):
    import huggingface_hub
    real = huggingface_hub.hf_hub_download
    fetched: list[str] = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, fname, **kw: fetched.append(fname) or real(repo, fname, **kw))
    out = tmp_path / "q"
    quantize_with_calibration("org/tiny", out, QC["gptq"], OPTS, progress=False)
    assert files(out) == files(clean)  # same bytes as from the local folder
    index = json.loads((offline_hub_repo / "snapshots" / ("a" * 40) / "model.safetensors.index.json").read_text())
    first_use = list(dict.fromkeys(index["weight_map"][n] for n in index["weight_map"]))
    assert fetched == sorted(set(fetched), key=first_use.index)  # each shard once, when first needed
    with pytest.raises(CheckpointError) as e:
        quantize_with_calibration("org/other", tmp_path / "q2", QC["gptq"], OPTS, progress=False)
    assert "not (completely) in the local cache" in one_line(e)
