"""Hostile and careless input beyond checkpoints: numbers in JSON files, routing statistics, tokenizer
files, data files, the server's sockets and options, and what transformers loads that dbrxq must not
refuse. Each case names the one-line error (or the warning) it expects; the server cases run against
a real `dbrxq serve` process on a localhost port.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

import dbrxq
from calibration.tokens import CalibrationDataError, load_text
from dbrxq.core.errors import CheckpointError, ConfigError, TokenizerError
from dbrxq.core.untrusted import parse_json
from dbrxq.runtime.routing import read_observed_routing, routing_counts
from dbrxq.text.tokenizer import DbrxTokenizer
from quantize.format import REPORT_NAME
from tests.dbrxq.test_serve import ServerProcess, free_port

DEMO = dbrxq.default_model_dir()
LONG = "1" * 5000


def demo_copy(tmp_path: Path, name: str = "model") -> Path:
    out = tmp_path / name
    shutil.copytree(DEMO, out)
    return out


# ----------------------------------------------------------------------------- numbers in JSON

@pytest.mark.parametrize("text, message", [
    (f'{{"a": {LONG}}}', "an integer of 5000 digits (at most 20)"),
    (f'{{"a": [-{LONG}]}}', "an integer of 5000 digits"),
    ('{"a": 1' + "0" * 400 + "}", "an integer of 401 digits"),
    ('{"a": 1e400}', "the number 1e400 is beyond the range of a double"),
    ('{"a": -1e400}', "beyond the range of a double"),
])
def test_json_numbers_beyond_any_real_field_are_refused_in_one_line(text, message):
    with pytest.raises(CheckpointError) as e:
        parse_json(text.encode(), "f.json")
    assert str(e.value).startswith("f.json: ") and message in str(e.value) and "\n" not in str(e.value)


def test_json_numbers_that_real_files_hold_still_parse():
    assert parse_json(b'{"a": 18446744073709551615, "b": -9223372036854775808, "c": 1.5e300, "d": 0.0001}', "f") == \
        {"a": 2**64 - 1, "b": -2**63, "c": 1.5e300, "d": 0.0001}


def test_config_with_a_5000_digit_integer_is_one_line(tmp_path, dbrxq_main):
    folder = demo_copy(tmp_path)
    cfg = (folder / "config.json").read_text()
    (folder / "config.json").write_text(cfg.replace('"n_layers": 4', f'"n_layers": {LONG}', 1))
    code, err = dbrxq_main("run", str(folder), "-p", "Hi", "-n", "2")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "config.json: an integer of 5000 digits" in err


@pytest.mark.parametrize("count", [LONG, "1" + "0" * 400, str(2**60)])
def test_damaged_routing_statistics_are_ignored_with_a_warning(tmp_path, caplog, count):
    path = tmp_path / "x.routing.json"
    path.write_text('{"format": "dbrxq-observed-routing-v1", "counts": [[1, 2], [3, ' + count + ']]}')
    with caplog.at_level(logging.WARNING, logger="dbrxq.runtime.routing"):
        assert read_observed_routing(path, 2, 2) is None
    assert any("not usable routing counts; ignored" in m for m in caplog.messages)
    path.write_text('{"format": "dbrxq-observed-routing-v1", "counts": [[1, 2], [3, 4]]}')
    assert read_observed_routing(path, 2, 2) == [[1, 2], [3, 4]]
    # the quantize report's counts, which seed placement, are read the same way
    (tmp_path / REPORT_NAME).write_text('{"layers": [{"layer": 0, "experts": [{"expert": 0, "tokens": ' + count
                                        + '}]}]}')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dbrxq.runtime.routing"):
        assert routing_counts(tmp_path, 1, 2) is None
    assert any("no usable per-expert routing counts" in m for m in caplog.messages)


def test_prepared_sidecar_with_a_5000_digit_crc_is_rebuilt_not_a_traceback(tmp_path, caplog):
    from dbrxq.runtime.prepared import read_prepared_sidecar
    path = tmp_path / "x.bin"
    path.write_bytes(b"\0" * 16)
    identity = {"n_layers": 1, "num_experts": 1}
    path.with_suffix(".json").write_text('{"n_layers": 1, "num_experts": 1, "crc32": [' + LONG + ']}')
    with caplog.at_level(logging.WARNING, logger="dbrxq.runtime.prepared"):
        assert read_prepared_sidecar(path, identity) is None
    assert any("an integer of 5000 digits" in m and "rebuilding" in m for m in caplog.messages)


# ----------------------------------------------------------------------------- tokenizer files

def _own_tokenizer(tmp_path: Path, *, lines: list[bytes] | None = None, pat_str: str | None = None) -> Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    vocab = (DEMO / "tokenizer.tiktoken").read_bytes()
    (folder / "tokenizer.tiktoken").write_bytes(vocab + b"".join(lines or []))
    meta = json.loads((DEMO / "tokenizer.tiktoken.json").read_text())
    if pat_str is not None:
        meta["pat_str"] = pat_str
    (folder / "tokenizer.tiktoken.json").write_text(json.dumps(meta))
    return folder


def test_tiktoken_vocabulary_listing_the_same_bytes_twice_is_refused(tmp_path):
    first = (DEMO / "tokenizer.tiktoken").read_bytes().splitlines()[300]
    token = first.split()[0]
    n = len((DEMO / "tokenizer.tiktoken").read_bytes().splitlines())
    folder = _own_tokenizer(tmp_path, lines=[token + b" 1520\n"])
    with pytest.raises(TokenizerError) as e:
        DbrxTokenizer.from_pretrained(folder)
    assert f"tokenizer.tiktoken:{n + 1}: token" in str(e.value) and "is listed twice (ranks 300 and 1520)" in str(e.value)


def test_split_pattern_that_gives_up_is_refused_at_load_or_at_encode(tmp_path):
    with pytest.raises(TokenizerError, match=r"split pattern \(pat_str\) fails on ordinary text.*backtracking"):
        DbrxTokenizer.from_pretrained(_own_tokenizer(tmp_path, pat_str=r"(\w+\s?)+(?=\d)|\s+|[\s\S]"))
    # one that splits ordinary text but gives up on a run of q's: refused when it meets one
    shutil.rmtree(tmp_path / "tok")
    tok = DbrxTokenizer.from_pretrained(_own_tokenizer(tmp_path, pat_str=r"(?:(q|qq)+)\1(?=x)|[\s\S]"))
    assert tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(TokenizerError, match=r"cannot tokenize this text .*the tokenizer is unusable"):
        tok.encode("q" * 60)


# ----------------------------------------------------------------------------- data files

@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def test_eval_data_must_be_a_bounded_regular_file(tmp_path, fifo, dbrxq_main):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # sparse: 1 GiB + 1 byte, never written
        f.truncate((1 << 30) + 1)
    for data, message in (("/dev/zero", "--data /dev/zero: not a regular file; refused"),
                          (fifo, f"--data {fifo}: not a regular file; refused"),
                          (tmp_path, f"--data {tmp_path}: not a regular file; refused"),
                          (big, f"--data {big}: 1073741825 bytes, more than the 1073741824")):
        code, err = dbrxq_main("eval", "demo", "--data", str(data), "--max-tokens", "64")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_calibration_data_must_be_a_bounded_regular_file(tmp_path, fifo):
    for spec, message in (("/dev/zero", "not a regular file"), (fifo, "not a regular file"),
                          (tmp_path / "missing.txt", "no such file")):
        with pytest.raises(CalibrationDataError, match=f"calibration data {spec}: {message}"):
            load_text(spec)
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(CalibrationDataError, match=r"deep.jsonl:2: JSON nested 100000 levels deep"):
        load_text(deep)


# ----------------------------------------------------------------------------- valid input, not refused

def test_special_ids_beyond_the_vocabulary_load_with_one_warning(tmp_path, caplog):
    """transformers' DbrxConfig accepts eos/bos/pad ids beyond vocab_size (a small model carrying
    DBRX's real special ids); the forward never meets them: load, warn once, never stop on them."""
    folder = demo_copy(tmp_path)
    d = json.loads((folder / "config.json").read_text())
    d.update(eos_token_id=[100257, 100279], bos_token_id=100257, pad_token_id=100277)
    (folder / "config.json").write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING, logger="dbrxq.model.config"):
        runner = dbrxq.load(folder)
    said = [m for m in caplog.messages if "outside the vocabulary" in m]
    assert len(said) == 1 and "eos_token_id[0] 100257, eos_token_id[1] 100279" in said[0], caplog.messages
    assert "bos_token_id 100257" in said[0] and "treated as absent" in said[0]
    assert runner.config.eos_token_ids == [] and runner.stop_tokens == sorted(runner.tokenizer.eos_token_ids)
    ref = dbrxq.load()
    ids = torch.tensor([ref.tokenizer.encode("The function returns")])
    assert torch.equal(runner.model(ids).logits, ref.model(ids).logits)
    assert runner.generate("The function", max_new_tokens=5) == ref.generate("The function", max_new_tokens=5)


def test_rtn_of_a_weights_only_checkpoint_writes_and_says_out_needs_a_tokenizer(tmp_path, dbrxq_main, caplog):
    src = tmp_path / "weights"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(DEMO / name, src)
    (src / "generation_config.json").write_text('{"max_new_tokens": 16}')  # tokenizer-ish, no vocabulary
    out = tmp_path / "q"
    with caplog.at_level(logging.WARNING, logger="quantize.writer"):
        code, err = dbrxq_main("quantize", str(src), str(out), "--method", "rtn")
    assert code == 0, err
    assert any("has no tokenizer vocabulary" in m and str(out) in m for m in caplog.messages)
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    code, err = dbrxq_main("run", str(out), "-p", "Hi", "-n", "2")
    assert code == 2 and "no tokenizer vocabulary" in err and len(err.strip().splitlines()) == 1


def test_a_bare_number_is_bytes_for_every_size_option(dbrxq_main, tmp_path):
    code, err = dbrxq_main("quantize", "demo", str(tmp_path / "q"), "--method", "rtn", "--target-size", "1.5")
    assert code == 2 and "--target-size: cannot read '1.5' as a size" in err and "whole number of bytes" in err
    code, err = dbrxq_main("run", "--plan", "--cpu-memory", "1073741824")  # read as 1 GiB: then the float
    assert "cannot read" not in err and "a memory budget offloads experts" in err, err  # demo is refused for it


# ----------------------------------------------------------------------------- server options

@pytest.mark.parametrize("args, message", [
    (["--max-batch", "10000000"], "a KV cache of 10000000 sequence(s) x 1024 positions needs 9.54 TiB, more than"),
    (["--max-batch", "3000000", "--kv-cache", "int8"], "a KV cache of 3000000 sequence(s)"),
    (["--shutdown-timeout", "inf"], "'inf' is not a number of seconds from 0 to 3600"),
    (["--shutdown-timeout", "nan"], "'nan' is not a number of seconds from 0 to 3600"),
    (["--body-timeout", "-1"], "'-1' is not a number of seconds from 0 to 3600"),
    (["--threads", "10000"], "'--threads': 10000 is not in the range 1<=x<="),
    (["--threads", "2147483648"], "'--threads': 2147483648 is not in the range"),
    (["--api-key", ""], "--api-key: empty, or with spaces or control characters"),
    (["--api-key", "sk key"], "--api-key: empty, or with spaces"),
    (["--model-name", ""], "--model-name '': give 1 to 256 printable characters"),
    (["--port", "0"], "'--port': 0 is not in the range 1<=x<=65535"),
])
def test_serve_options_beyond_reason_are_one_line_errors(dbrxq_main, args, message):
    code, err = dbrxq_main("serve", *(["--port", str(free_port())] if "--port" not in args else []), *args)
    assert code == 2 and "Traceback" not in err and message in err, err


def test_threads_beyond_reason_are_refused_by_the_api():
    with pytest.raises(ConfigError, match=r"threads=1000000: expected an integer from 1 to \d+ \(4 per CPU"):
        dbrxq.load(threads=1_000_000)


# ----------------------------------------------------------------------------- server sockets

def _raw(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head)
    return s


def _answer(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


POST = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("serve"), "--body-timeout", "1.5", "--shutdown-timeout", "1")
    yield s
    s.stop()


def test_a_body_that_never_comes_gets_408_in_the_body_timeout(slow_server):
    s = _raw(slow_server.port, POST + b"Content-Length: 100\r\n\r\n")
    status, body = _answer(s)  # within the socket's 30 s: the server answers, it does not hold the connection
    assert status == 408 and "did not arrive within 1.5 s (--body-timeout)" in body["error"]["message"]


def test_a_body_dribbled_byte_by_byte_is_bounded_by_the_same_timeout(slow_server):
    s = _raw(slow_server.port, POST + b"Content-Length: 100\r\n\r\n")
    t0 = time.perf_counter()
    for _ in range(40):  # 1 byte every 0.25 s would take 25 s for the body
        try:
            s.sendall(b" ")
        except OSError:  # the server answered and closed
            break
        time.sleep(0.25)
        if time.perf_counter() - t0 > 4:
            break
    status, body = _answer(s)
    assert status == 408, body


def test_a_chunked_body_over_the_limit_is_413_not_400(slow_server):
    s = _raw(slow_server.port, POST + b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * (1 << 20)
    try:
        for _ in range(6):
            s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
    except OSError:
        pass
    status, body = _answer(s)
    assert status == 413 and "request body over" in body["error"]["message"]


def test_a_chunked_body_without_its_end_gets_408(slow_server):
    s = _raw(slow_server.port, POST + b"Transfer-Encoding: chunked\r\n\r\n" + b"4\r\n{\"a\"\r\n")
    status, _ = _answer(s)
    assert status == 408


def test_sigterm_with_a_body_pending_exits_at_once_and_cleanly(tmp_path):
    """The default body timeout (30 s) is longer than a shutdown should take: a stopping server
    answers a request still waiting for its body with 503 and exits 0, without a traceback (uvicorn's
    backstop, which cancels the task, would log a CancelledError and send no answer)."""
    server = ServerProcess(tmp_path, "--shutdown-timeout", "1")
    try:
        s = _raw(server.port, POST + b"Content-Length: 100\r\n\r\n")
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
        status, body = _answer(s)  # answered by the guard, not cut off by uvicorn's backstop
        assert status == 503 and body["error"]["message"] == "the server is stopping"
        log = server.log.read_text()
        assert "Traceback" not in log and "CancelledError" not in log, log
    finally:
        server.stop()


def test_a_prompt_the_split_pattern_cannot_tokenize_is_400_not_500(tmp_path):
    folder = demo_copy(tmp_path)
    meta = json.loads((folder / "tokenizer.tiktoken.json").read_text())
    meta["pat_str"] = r"(?:(q|qq)+)\1(?=x)|[\s\S]"
    (folder / "tokenizer.tiktoken.json").write_text(json.dumps(meta))
    server = ServerProcess(tmp_path, str(folder), "--model-name", "m")
    try:
        c = server.conn()
        for path, body in (("/v1/completions", {"prompt": "q" * 60, "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "q" * 60}],
                                                     "max_tokens": 2})):
            c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            r = c.getresponse()
            answer = json.loads(r.read())
            assert r.status == 400 and "cannot tokenize this text" in answer["error"]["message"], answer
        c.request("POST", "/v1/completions", body=json.dumps({"prompt": "hello", "max_tokens": 2, "temperature": 0}),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200, r.read()
        r.read()
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()


def test_cache_listing_survives_hostile_sidecars(tmp_path, dbrxq_main):
    """`dbrxq cache` reads each prepared file's sidecar (untrusted, like the file): a source path the
    file system refuses, or a files record of mixed types, lists the file as stale, never a traceback."""
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for key, side in (("a" * 20, {"source": "/tmp/x\u0000y", "files": []}),
                      ("b" * 20, {"source": str(tmp_path), "files": [["m.safetensors", 1], [1, "m"], "z", [None]]})):
        (prepared / f"{key}.bin").write_bytes(b"\0" * 16)
        (prepared / f"{key}.json").write_text(json.dumps(side))
    code, err = dbrxq_main("cache", "--cache-dir", str(tmp_path))
    assert code == 0 and "Traceback" not in err, err
    code, err = dbrxq_main("cache", "--cache-dir", str(tmp_path), "--clear-stale")
    assert code == 0 and not list(prepared.iterdir()), err
