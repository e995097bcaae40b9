"""``dbrxq quantize``: end to end with ``dbrxq run``, the summary, and one-line option errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import dbrxq
from dbrxq import cli as dbrxq_cli
from quantize.config import QuantConfig

SMALL_CALIB = ("--calib-samples", "8", "--calib-seq-len", "64")  # --method gptq is the default: keep it fast
TINY = str(dbrxq.default_model_dir())  # d_model 128, ffn 128: every expert group size


def dbrxq_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dbrxq.cli", *args], capture_output=True, text=True,
                          timeout=120)


def main_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run dbrxq.cli.app.main as the console script does (one-line errors, exit codes), in process."""
    monkeypatch.setattr(sys, "argv", ["dbrxq", *args])
    try:
        dbrxq_cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_then_run(tmp_path):
    out = tmp_path / "q"
    r = dbrxq_cmd("quantize", TINY, str(out), "--method", "rtn", "--group-size", "64", "--asym")
    assert r.returncode == 0, r.stderr
    assert "int4 g64 asym" in r.stdout and "tensors" in r.stdout and "smaller" in r.stdout
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert QuantConfig.from_dict(qc).experts.group_size == 64 and qc["method"] == "rtn"
    r = dbrxq_cmd("run", str(out), "--prompt", "Once upon", "-n", "6", "-t", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon") and len(r.stdout) > len("Once upon\n")
    assert r.stdout == "Once upon" + dbrxq.load(out).generate("Once upon", max_new_tokens=6) + "\n"


def test_options_reach_the_config(tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    code, stdout, err = main_in_process(
        monkeypatch, capsys, "quantize", TINY, str(out), "--expert-bits", "8", "--group-size", "-1",
        "--attn-bits", "16", "--lm-head-bits", "8", *SMALL_CALIB)
    assert code == 0, err
    qc = QuantConfig.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert (qc.experts.bits, qc.experts.group_size, qc.attn.quantized, qc.lm_head.bits) == (8, -1, False, 8)
    assert qc.experts.symmetric and qc.lm_head.group_size == -1
    assert "attention bf16" in stdout and "lm_head int8 per-channel" in stdout
    # An existing OUT is refused without --overwrite, in one line, and replaced with it.
    code, _, err = main_in_process(monkeypatch, capsys, "quantize", TINY, str(out))
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, err = main_in_process(monkeypatch, capsys, "quantize", TINY, str(out), "--overwrite",
                                   "--group-size", "32", *SMALL_CALIB)
    assert code == 0, err


@pytest.mark.parametrize("args, message", [
    (("--expert-bits", "5"), "--expert-bits 5 is not supported; choose one of 2, 3, 4, 8"),
    (("--group-size", "48"), "--group-size 48 is not supported"),
    (("--attn-bits", "2"), "--attn-bits 2 is not supported; choose one of 4, 8, 16"),
    (("--attn-group-size", "100"), "--attn-group-size 100 is not supported"),
    (("--lm-head-bits", "4"), "--lm-head-bits 4 is not supported; choose one of 8, 16"),
    (("--method", "awq"), "--method awq is not supported; choose one of rtn, gptq"),
    (("--method", "rtn", "--resume"), "--resume continues a --method gptq run"),
    (("--rare-experts", "drop"), "--rare-experts drop is not supported; choose one of route-all, rtn"),
    (("--method", "rtn", "--group-size", "128"), "mlp.w1 (input dim 64): input dim K=64 is not divisible by group_size=128"),
])
def test_bad_options_are_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    from dbrxq.formats.random import make_random_checkpoint, preset_config
    src = make_random_checkpoint(tmp_path / "src", preset_config("tiny"), progress=False)  # d_model 64
    out = tmp_path / "q"
    code, _, err = main_in_process(monkeypatch, capsys, "quantize", str(src), str(out), *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "config.json").exists()


def test_broken_quantized_checkpoint_is_one_line_on_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    assert main_in_process(monkeypatch, capsys, "quantize", TINY, str(out), "--group-size", "64")[0] == 0
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 7
    (out / "config.json").write_text(json.dumps(config))
    r = dbrxq_cmd("run", str(out), "--prompt", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "quantization_config.format_version=7 is not supported" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def wide_src(tmp_path_factory):
    """A random float checkpoint whose rows are whole 256-value blocks (K-quants apply to every matrix)."""
    import torch
    from dbrxq.formats.random import make_random_checkpoint, preset_config
    root = tmp_path_factory.mktemp("recipe")
    return make_random_checkpoint(root / "src", preset_config("tiny", d_model=256, ffn_hidden_size=256, n_heads=4,
                                                               vocab_size=1536, n_layers=1),
                                  dtype=torch.float32, tokenizer_dir=dbrxq.default_model_dir(), progress=False)


def test_recipe_writes_one_gguf_file_both_engines_run(wide_src, tmp_path, monkeypatch, capsys):
    """--recipe q4_k_m: llama.cpp's mix, each matrix solved by GPTQ onto its grid; the file is the calibrated
    export's (same bytes as `dbrxq export --type q4_k_m --calibrate` on the same data) and dbrxq runs it.
    --method rtn gives export --type q4_k_m's rounding."""
    import gguf
    from dbrxq.export.gguf import export_gguf
    from calibration.options import CalibrationOptions
    out = tmp_path / "m.gguf"
    code, stdout, err = main_in_process(monkeypatch, capsys, "quantize", str(wide_src), str(out), "--recipe", "q4_k_m",
                                        *SMALL_CALIB)
    assert code == 0, err
    assert "GPTQ onto each tensor's grid" in stdout and "dbrxq run" in stdout
    ref = export_gguf(wide_src, tmp_path / "ref.gguf", type_="q4_k_m",
                      calibrate=CalibrationOptions(samples=8, seq_len=64)).path
    assert out.read_bytes() == ref.read_bytes()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    r = dbrxq.load(out)
    assert len(r.generate_ids([[5, 6, 7]], max_new_tokens=3, stop_tokens=[]).sequences[0]) == 3
    code, _, err = main_in_process(monkeypatch, capsys, "quantize", str(wide_src), str(tmp_path / "r.gguf"), "--recipe",
                                   "q4_k_m", "--method", "rtn")
    assert code == 0, err
    plain = export_gguf(wide_src, tmp_path / "plain.gguf", type_="q4_k_m").path
    assert (tmp_path / "r.gguf").read_bytes() == plain.read_bytes()


@pytest.mark.parametrize("args, message", [
    (("OUT", "--recipe", "q4_k_m"), "writes a GGUF file: OUT must end in .gguf"),
    (("OUT.gguf",), "needs --recipe"),
    (("OUT.gguf", "--recipe", "q4_k_m", "--expert-bits", "3"), "--expert-bits sets dbrxq's own format"),
    (("OUT.gguf", "--recipe", "q4_k_m", "--target-size", "5MB"), "needs --recipe .* one of them"),
])
def test_recipe_options_are_checked(tmp_path, monkeypatch, capsys, args, message):
    args = tuple(str(tmp_path / a) if a.startswith("OUT") else a for a in args)
    code, _, err = main_in_process(monkeypatch, capsys, "quantize", TINY, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
