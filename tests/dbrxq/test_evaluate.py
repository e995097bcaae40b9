"""dbrxq.runtime.evaluate (sliding-window perplexity, KL / top-1 of two models), the eval/compare CLI,
and the embedded default model."""

import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import dbrxq
from dbrxq.cli.app import cli, main
from dbrxq.formats.random import make_random_checkpoint, preset_config
from dbrxq.runtime.evaluate import DataError, compare, perplexity, windows


def _ids(n: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n, window, stride", [(100, 32, 8), (100, 32, 32), (100, 32, 31), (33, 32, 16),
                                               (5, 32, 16), (2, 2, 1), (64, 8, 1)])
def test_windows_score_each_prediction_once_with_context(n, window, stride):
    spans = list(windows(n, window, stride))
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(n - 1))  # predictions of tokens 1..n-1, each exactly once
    for i, (begin, end, first) in enumerate(spans):
        assert end - begin <= window and begin <= first < end
        if i:
            assert first - begin >= window - stride


def test_stride_larger_than_window_is_refused():
    with pytest.raises(DataError, match="stride"):
        list(windows(10, 4, 5))


def test_perplexity_equals_full_forward_when_window_covers_text(tiny_model):
    model = tiny_model(seed=1)
    ids = _ids(30)
    r = perplexity(model, ids, window=40, stride=20)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None], use_cache=False).loss.item()
    assert r["tokens"] == 29
    assert r["nll"] == pytest.approx(loss, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_sliding_window_matches_a_manual_computation(tiny_model):
    model = tiny_model(seed=2)
    ids = _ids(37, seed=3)
    window, stride = 12, 5
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in windows(ids.numel(), window, stride):
            logits = model(input_ids=ids[None, begin:end], use_cache=False).logits[0]  # (T, V)
            rows = slice(first - begin, end - begin)
            total += F.cross_entropy(logits[rows], ids[first + 1:end + 1], reduction="sum").item()
            count += end - first
    r = perplexity(model, ids, window=window, stride=stride)
    assert r["tokens"] == count == 36
    assert r["nll"] == pytest.approx(total / count, rel=1e-5)


def test_compare_with_itself_and_with_a_perturbed_copy(tiny_model):
    a = tiny_model(seed=0)
    ids = _ids(35, seed=4)
    same = compare(a, tiny_model(seed=0), ids, window=16, stride=8)
    assert same["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["top1_agreement"] == 1.0
    assert same["ppl_a"] == pytest.approx(same["ppl_b"])
    assert same["ppl_a"] == pytest.approx(perplexity(a, ids, window=16, stride=8)["ppl"], rel=1e-6)
    b = tiny_model(seed=0)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    diff = compare(a, b, ids, window=16, stride=8)
    assert diff["mean_kl"] > 1e-4
    assert diff["tokens"] == 34 and 0.0 <= diff["top1_agreement"] <= 1.0


def test_too_few_tokens_is_a_data_error(tiny_model):
    with pytest.raises(DataError, match="at least 2 tokens"):
        perplexity(tiny_model(), [3], window=8, stride=4)


# -- CLI --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny checkpoint with the embedded 1536-token vocabulary."""
    out = tmp_path_factory.mktemp("ckpt")
    make_random_checkpoint(out, preset_config("tiny", vocab_size=1536), seed=0, progress=False)
    for p in dbrxq.default_model_dir().glob("tokenizer.tiktoken*"):
        shutil.copy2(p, out / p.name)
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("The for statement is used to iterate over the elements of a sequence. " * 12)
    return path


def test_cli_eval_prints_perplexity(tiny_checkpoint, text_file):
    r = CliRunner().invoke(cli, ["eval", str(tiny_checkpoint), "--data", str(text_file),
                                 "--window", "64", "--stride", "32", "--max-tokens", "100"])
    assert r.exit_code == 0, r.output
    row = [line for line in r.output.splitlines() if line.startswith(f"| {tiny_checkpoint}")][0]
    tokens, nll, ppl = (float(x) for x in row.strip("|").split("|")[1:])
    assert tokens == 99 and ppl == pytest.approx(math.exp(nll), rel=1e-3)
    assert ppl > 100  # random weights over a 1536-token vocabulary


def test_cli_compare_model_with_itself(tiny_checkpoint, text_file):
    r = CliRunner().invoke(cli, ["compare", str(tiny_checkpoint), str(tiny_checkpoint), "--data", str(text_file),
                                 "--window", "64", "--stride", "64", "--max-tokens", "80"])
    assert r.exit_code == 0, r.output
    assert "mean KL(A||B): 0.000e+00" in r.output
    assert "top-1 agreement: 1.0000" in r.output and "tokens: 79" in r.output


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "data file is empty"),
    ("   \n", "data file is empty"),
    ("x", "data too short"),
])
def test_cli_bad_data_is_one_line_error(tiny_checkpoint, tmp_path, content, message, capsys):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_text(content)
    argv = sys.argv
    sys.argv = ["dbrxq", "eval", str(tiny_checkpoint), "--data", str(path), "--window", "64", "--stride", "32"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and str(path) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_default_window_adapts_to_a_short_context(tiny_checkpoint, text_file):
    """The tiny preset's context (256) is below the default window (512): with no --window, eval and
    compare use the context and half of it as stride, and say so."""
    ctx = preset_config("tiny").max_seq_len
    assert ctx < 512
    for args in (["eval", str(tiny_checkpoint)], ["compare", str(tiny_checkpoint), str(tiny_checkpoint)]):
        r = CliRunner().invoke(cli, [*args, "--data", str(text_file), "--max-tokens", "300"])
        assert r.exit_code == 0, (args, r.output, r.exception)
        assert f"window {ctx}, stride {ctx // 2}," in r.output


def test_cli_window_beyond_context_is_refused(tiny_checkpoint, text_file):
    r = CliRunner().invoke(cli, ["eval", str(tiny_checkpoint), "--data", str(text_file), "--window", "4096"])
    assert isinstance(r.exception, DataError) and "--window 4096" in str(r.exception)


# -- the embedded default ----------------------------------------------------------------------
def test_default_model_generates_deterministically_with_seed():
    m = dbrxq.load()
    a = m.generate("The for statement", max_new_tokens=16, temperature=0.8, seed=1)
    b = m.generate("The for statement", max_new_tokens=16, temperature=0.8, seed=1)
    assert a == b and len(a) > 0
