"""calibration.tokens: reading text / JSON Lines / hub dataset files, and the seeded window rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dbrxq
from calibration.tokens import (
    DEFAULT_CALIB_FILE,
    CalibrationDataError,
    calibration_tokens,
    load_text,
    sample_windows,
    token_stream,
)
from dbrxq.text.tokenizer import DbrxTokenizer


@pytest.fixture(scope="module")
def tok():
    return DbrxTokenizer.from_pretrained(dbrxq.default_model_dir())


def test_default_is_the_packaged_calibration_text_not_heldout():
    t = load_text(None)
    assert DEFAULT_CALIB_FILE.name == "calib.txt" and t.name == "dbrxq:calib.txt"
    heldout = (DEFAULT_CALIB_FILE.parent / "heldout.txt").read_bytes()
    assert DEFAULT_CALIB_FILE.read_bytes() != heldout and len(t.documents) > 10


def test_plain_text_documents_split_on_two_blank_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first doc\nline two\n\nsame doc\n\n\nsecond doc\n\n\n\n")
    t = load_text(p)
    assert t.documents == ["first doc\nline two\n\nsame doc", "second doc"]
    assert len(t.sha256) == 64


def test_jsonl_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a b", "body": "x"}) + "\n\n" + json.dumps({"text": "c", "body": "y"}) + "\n")
    assert load_text(p).documents == ["a b", "c"]
    assert load_text(p, text_field="body").documents == ["x", "y"]
    with pytest.raises(CalibrationDataError, match=r"d.jsonl:1: no string field 'nope'"):
        load_text(p, text_field="nope")
    p.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CalibrationDataError, match=r"d.jsonl:2: not a JSON object"):
        load_text(p)


@pytest.mark.parametrize("content", ["", "\n\n\n   \n\n\n"])
def test_empty_data(tmp_path, content):
    p = tmp_path / "e.txt"
    p.write_text(content)
    with pytest.raises(CalibrationDataError, match=r"e.txt: no text in it") as e:
        load_text(p)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CalibrationDataError, match=r"nope.txt: no such file"):
        load_text(tmp_path / "nope.txt")


def test_too_short_names_file_and_counts(tmp_path, tok):
    p = tmp_path / "short.txt"
    p.write_text("just a few words")
    n = len(tok.encode("just a few words"))
    with pytest.raises(CalibrationDataError, match=rf"short.txt: {n} tokens, need at least 64 \(4 x 64 = 256"):
        calibration_tokens(p, tok, samples=4, seq_len=64, seed=0)


def test_windows_deterministic_disjoint_and_seeded():
    stream = list(range(1000))
    a, ov = sample_windows(stream, 8, 100, seed=3)
    b, _ = sample_windows(stream, 8, 100, seed=3)
    c, _ = sample_windows(stream, 8, 100, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c) and not ov
    assert a.shape == (8, 100)
    flat = a.reshape(-1)
    assert flat.unique().numel() == flat.numel()  # disjoint: no token twice
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 99, dtype=torch.long))  # contiguous windows
    assert (a[1:, 0] > a[:-1, 0]).all()  # in stream order


def test_windows_overlap_when_text_is_short(caplog):
    w, ov = sample_windows(list(range(150)), 4, 100, seed=0)
    assert ov and w.shape == (4, 100) and "overlap" in caplog.text
    with pytest.raises(CalibrationDataError, match=r"150 tokens, need at least 400"):
        sample_windows(list(range(150)), 4, 100, seed=0, allow_overlap=False)


def test_documents_joined_by_endoftext(tmp_path, tok):
    p = tmp_path / "two.txt"
    p.write_text("alpha beta\n\n\ngamma")
    s = token_stream(load_text(p), tok)
    eot = tok.special_tokens["<|endoftext|>"]
    assert s == tok.encode("alpha beta") + [eot] + tok.encode("gamma")


def test_calibration_tokens_info(tok):
    t, info = calibration_tokens(None, tok, samples=4, seq_len=32, seed=1, vocab_size=1536)
    assert t.shape == (4, 32) and t.dtype == torch.long
    assert info["samples"] == 4 and info["seq_len"] == 32 and info["seed"] == 1 and not info["overlap"]
    assert info["tokens_available"] > 4 * 32 and info["data"] == "dbrxq:calib.txt"
    with pytest.raises(CalibrationDataError, match="vocab_size 100"):
        calibration_tokens(None, tok, samples=4, seq_len=32, seed=1, vocab_size=100)


@pytest.fixture
def offline_dataset(tmp_path, monkeypatch):
    """A huggingface_hub cache holding the dataset org/data with one jsonl file, offline."""
    import huggingface_hub.constants as hf_constants
    commit = "c" * 40
    cache = tmp_path / "hf" / "hub"
    repo = cache / "datasets--org--data"
    snap = repo / "snapshots" / commit / "sub"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snap / "train.jsonl").write_text("\n".join(json.dumps({"text": f"document number {i} " * 20})
                                                for i in range(40)))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return snap / "train.jsonl"


def test_hub_dataset_file_offline(offline_dataset, tok):
    t = load_text("hf://datasets/org/data/sub/train.jsonl")
    assert len(t.documents) == 40 and t.documents[0].startswith("document number 0")
    tokens, info = calibration_tokens("hf://datasets/org/data/sub/train.jsonl", tok, samples=2, seq_len=16, seed=0)
    assert tokens.shape == (2, 16) and info["data"] == "hf://datasets/org/data/sub/train.jsonl"
    with pytest.raises(CalibrationDataError, match="not in the local hub cache"):
        load_text("hf://datasets/org/data/sub/missing.jsonl")
    with pytest.raises(CalibrationDataError, match="expected hf://datasets/ORG/NAME"):
        load_text("hf://datasets/justone")


def test_default_calibration_request_fits_the_shipped_text(tok, tmp_path, caplog):
    """quantize --method gptq's defaults (CalibrationOptions: 64 x 512) take distinct windows of the
    packaged text with the demo tokenizer and with DBRX's (cl100k_base, when available offline:
    32.8K tokens); a larger request warns and says what to pass."""
    import hashlib
    import importlib.util
    import shutil

    from calibration.options import CalibrationOptions
    from dbrxq.text.tokenizer import CL100K_SHA256

    opts = CalibrationOptions()
    toks = [tok]
    spec = importlib.util.find_spec("tiktoken_ext")
    for root in (spec.submodule_search_locations or []) if spec else []:
        f = Path(root) / "data" / "cl100k_base.tiktoken"
        if f.is_file() and hashlib.sha256(f.read_bytes()).hexdigest() == CL100K_SHA256:
            shutil.copy(f, tmp_path / "cl100k_base.tiktoken")
            toks.append(DbrxTokenizer.from_pretrained(tmp_path))
            break
    for t in toks:
        caplog.clear()
        tokens, info = calibration_tokens(None, t, samples=opts.samples, seq_len=opts.seq_len, seed=0)
        assert tokens.shape == (opts.samples, opts.seq_len) and not info["overlap"], info
        assert "overlap" not in caplog.text
    caplog.clear()
    _, info = calibration_tokens(None, tok, samples=128, seq_len=512, seed=0)
    assert info["overlap"] and f"--calib-samples {info['tokens_available'] // 512} at --calib-seq-len 512" in caplog.text
