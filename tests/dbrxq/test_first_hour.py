"""What a llama.cpp, Ollama or vLLM user reaches for first: penalties, stop strings, prompts from
files, the chat REPL's commands (through a pseudo-terminal), sampling defaults, and the server's
model card, open health check, Retry-After, access log, metrics and Ctrl-C."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import openai
import pytest
import torch

import dbrxq
from dbrxq.core.errors import GenerationError
from dbrxq.runtime.generate import Penalties
from tests.dbrxq.test_serve import KEY, ServerProcess

PROMPT = "The function returns"


@pytest.fixture(scope="module")
def demo():
    return dbrxq.load()


# ----------------------------------------------------------------------------- penalties

def reference_penalties(logits: torch.Tensor, seen: list[int], generated: list[int], r: float, p: float,
                        f: float) -> torch.Tensor:
    """The formulas, one token at a time, in float64."""
    out = logits.double().clone()
    for t in set(seen):
        out[t] = out[t] / r if out[t] > 0 else out[t] * r
    for t in set(generated):
        out[t] -= f * generated.count(t) + p
    return out


def test_penalties_equal_their_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=g) * 3
    seen, gen = [[1, 2, 3, 3, 40], [7, 7, 7]], [[3, 3, 40], [7]]
    got = Penalties(1.3, 0.5, 0.25).apply(logits, seen, gen)
    for b in range(2):
        want = reference_penalties(logits[b], seen[b], gen[b], 1.3, 0.5, 0.25)
        torch.testing.assert_close(got[b].double(), want, rtol=0, atol=1e-5)
    assert torch.equal(Penalties().apply(logits, seen, gen), logits)  # off: untouched
    for bad in (Penalties(0.0), Penalties(float("nan")), Penalties(presence=2.5), Penalties(frequency=float("inf"))):
        with pytest.raises(GenerationError, match="penalty must be"):
            bad.check()


def test_greedy_with_penalties_equals_a_step_by_step_reference(demo):
    """generate() with penalties equals re-running the whole sequence each step, penalizing the last
    logits by the formulas, and taking the argmax."""
    ids = demo.tokenizer.encode(PROMPT)
    pen = Penalties(1.2, 0.3, 0.4)
    got = demo.generate_ids([ids], max_new_tokens=10, penalties=pen, stop_tokens=()).sequences[0]
    seq, new = list(ids), []
    with torch.no_grad():
        for _ in range(10):
            logits = demo.model(torch.tensor([seq])).logits[0, -1]
            t = int(reference_penalties(logits, seq, new, 1.2, 0.3, 0.4).argmax())
            seq.append(t)
            new.append(t)
    assert got == new
    assert got != demo.generate_ids([ids], max_new_tokens=10, stop_tokens=()).sequences[0]  # they changed something


# ----------------------------------------------------------------------------- stop strings, prompts from files

def test_stop_string_ends_generation_where_it_completes(demo):
    full = demo.generate(PROMPT, max_new_tokens=30)
    stop = full[8:12]  # a string that first completes mid-reply
    said = []
    got = demo.generate(PROMPT, max_new_tokens=30, stop=[stop], on_text=said.append)
    assert got == full[:full.find(stop)] and "".join(said) == got
    assert len(demo.last_output.sequences[0]) < len(demo.tokenizer.encode(full))  # stopped early
    assert demo.generate([PROMPT, "A list"], max_new_tokens=30, stop=[stop])[0] == got  # a batch is cut


def run_cli(*args, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dbrxq.cli", *args], capture_output=True, text=True, input=input,
                          timeout=300)


def test_prompt_from_a_file_or_stdin_and_stop_on_the_command_line(tmp_path, demo):
    want = run_cli("run", "-p", PROMPT, "-n", "12", "-t", "0")
    assert want.returncode == 0, want.stderr
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT)
    assert run_cli("run", "-f", str(path), "-n", "12", "-t", "0").stdout == want.stdout
    assert run_cli("run", "-f", "-", "-n", "12", "-t", "0", input=PROMPT).stdout == want.stdout
    reply = want.stdout[len(PROMPT):]
    stop = reply.strip()[:3]
    cut = run_cli("run", "-p", PROMPT, "-n", "12", "-t", "0", "--stop", stop)
    assert cut.stdout == PROMPT + reply[:reply.find(stop)] + "\n"
    both = run_cli("run", "-p", PROMPT, "-f", str(path))
    assert both.returncode == 2 and "not both" in both.stderr


def test_default_sampling_is_ollamas_and_t0_is_exact_greedy(demo):
    from dbrxq.cli.commands import DEFAULT_SAMPLING
    assert DEFAULT_SAMPLING == {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1}
    help_text = run_cli("run", "--help").stdout
    assert "0.8" in help_text and "exact greedy" in help_text and "Examples" in help_text
    greedy = run_cli("run", "-p", PROMPT, "-n", "8", "-t", "0").stdout
    assert greedy == PROMPT + demo.generate(PROMPT, max_new_tokens=8) + "\n"


# ----------------------------------------------------------------------------- the chat REPL, in a terminal

def test_chat_repl_commands_through_a_pseudo_terminal(tmp_path):
    pid, fd = pty.fork()
    if pid == 0:  # the child: dbrxq's chat on the terminal
        os.execv(sys.executable, [sys.executable, "-m", "dbrxq.cli", "run", "--chat", "-n", "4", "-t", "0"])
    out = b""

    def read_until(marker: bytes, start: int = 0, timeout: float = 120) -> bytes:
        """Read the terminal until ``marker`` appears after byte ``start`` of what was read."""
        nonlocal out
        end = time.time() + timeout
        while marker not in out[start:] and time.time() < end:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        assert marker in out[start:], out.decode(errors="replace")[-2000:]
        return out

    try:
        read_until(b">>> ")
        assert b"/help for commands, /bye to leave" in out
        for line, expect in ((b"/help", b"/set temperature T"), (b"/set temperature 0.5", b"temperature = 0.5"),
                             (b"/set temperature 500", b"temperature must be 0"),
                             (b"/set system", b"system prompt removed"),
                             (b"/show", b"system prompt: none"), (b"hi", b"tokens used]"),
                             (b"/clear", b"conversation cleared"), (b"/nope", b"unknown command /nope")):
            start = len(out)
            os.write(fd, line + b"\n")
            read_until(expect, start)
            read_until(b">>> ", start)  # the next prompt, before the next line is typed
        os.write(fd, b"/bye\n")
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert b"[context: " in out and b"of 1024 tokens used]" in out
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_empty_system_prompt_means_none(demo):
    msgs = [{"role": "user", "content": "hi"}]
    none = demo.tokenizer.apply_chat_template(msgs, tokenize=False, system_prompt="")
    default = demo.tokenizer.apply_chat_template(msgs, tokenize=False)
    assert "system" not in none and "<|im_start|>system" in default
    assert none == default[default.index("<|im_start|>user"):]


# ----------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("serve"), "--api-key", KEY)
    yield s
    s.stop()


def test_model_card_open_health_and_metrics(server):
    client = server.client()
    card = client.models.retrieve("demo")
    assert card.id == "demo" and card.owned_by == "dbrxq"
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.models.retrieve("gpt-4")
    status, body = server.get("/health", headers={})  # no key: liveness only
    assert status == 200 and body == {"status": "ok"}
    status, body = server.get("/health")
    assert status == 200 and "stats" in body
    status, _ = server.get("/v1/models", headers={})
    assert status == 401
    client.completions.create(model="demo", prompt=PROMPT, max_tokens=3, temperature=0)
    c = server.conn(10)
    c.request("GET", "/metrics", headers=server.headers)
    r = c.getresponse()
    text = r.read().decode()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain")
    for name in ('dbrxq_requests_total{status="200"}', 'dbrxq_requests_total{status="401"}',
                 "dbrxq_completion_tokens_total", "dbrxq_requests_waiting 0", "dbrxq_decode_step_seconds_mean"):
        assert name in text, text
    status, _ = server.get("/v1/x%0Aforged%20line")  # a path that decodes to a newline stays on one log line
    assert status == 404
    log = server.log.read_text()
    assert "POST /v1/completions 200 " in log and " tokens " in log and " ms" in log, log[-2000:]
    assert "GET /v1/x\\nforged line 404" in log and not any(line.startswith("forged") for line in log.splitlines())


def test_penalties_are_honoured_and_unsupported_fields_refused(server, demo):
    client = server.client()
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0, frequency_penalty=1.5,
                                  presence_penalty=0.5)
    want = demo.generate(PROMPT, max_new_tokens=12, penalties=Penalties(1.0, 0.5, 1.5))
    assert r.choices[0].text == want
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"repetition_penalty": 1.3})
    assert r.choices[0].text == demo.generate(PROMPT, max_new_tokens=12, penalties=Penalties(1.3))
    for extra in ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                  {"response_format": {"type": "json_object"}}, {"logit_bias": {"5": 10}}):
        with pytest.raises(openai.BadRequestError, match="is not supported by this server"):
            client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2, extra_body=extra)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=2, presence_penalty=3)


def test_retry_after_on_503_and_ctrl_c_exits_0(tmp_path):
    s = ServerProcess(tmp_path, "--max-batch", "1", "--max-queue", "0", "--shutdown-timeout", "1")
    try:
        conn, resp = s.open_stream({"model": "demo", "prompt": PROMPT, "max_tokens": 1000, "temperature": 0})
        assert resp.readline().startswith(b"data: ")
        c = s.conn(10)
        c.request("POST", "/v1/completions", body=json.dumps({"model": "demo", "prompt": "x", "max_tokens": 2}),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        assert r.status == 503 and r.getheader("Retry-After") == "1"
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(60) == 0, s.log.read_text()
        assert "Traceback" not in s.log.read_text()
    finally:
        s.stop()


# ----------------------------------------------------------------------------- quantizing

def test_target_size_bounds_the_files_written(tmp_path, dbrxq_main):
    """--target-size counts what OUT holds (headers, alignment, config, index, report, tokenizer), not
    only the tensors' bytes."""
    out = tmp_path / "q"
    code, err = dbrxq_main("quantize", "demo", str(out), "--method", "rtn", "--target-size", "2600000")
    assert code == 0, err
    written = sum(p.stat().st_size for p in out.iterdir())
    assert 2_400_000 < written <= 2_600_000, written  # within the target, and not far below it


@pytest.mark.parametrize("bits, args, experts_sym, attn_sym", [
    ("2", [], True, True), ("3", [], True, True), ("4", [], True, True), ("2", ["--asym"], False, True),
    ("4", ["--asym"], False, True), ("4", ["--attn-asym"], True, False)])
def test_symmetric_by_default_and_attention_apart(tmp_path, dbrxq_main, bits, args, experts_sym, attn_sym):
    from quantize.config import QuantConfig
    out = tmp_path / "q"
    code, err = dbrxq_main("quantize", "demo", str(out), "--method", "rtn", "--expert-bits", bits, *args)
    assert code == 0, err
    qc = QuantConfig.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert (qc.experts.symmetric, qc.attn.symmetric) == (experts_sym, attn_sym)
    if args == ["--asym"] and bits == "4":  # int4 asym experts + int8 attention: the README's Q4_1 + Q8_0 export
        code, err = dbrxq_main("export", str(out), str(tmp_path / "m.gguf"))
        assert code == 0, err
    if args == ["--attn-asym"]:  # int8 asym attention has no exact GGML type: the refusal names the way out
        code, err = dbrxq_main("export", str(out), str(tmp_path / "m.gguf"))
        assert code == 2 and "--attn-bits 8 without --attn-asym" in err and "--attn-bits 16" in err, err


def test_a_busy_machine_is_named_after_a_run_on_every_core(monkeypatch, dbrxq_main):
    from dbrxq.core import sysinfo
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(sysinfo.os, "cpu_count", lambda: 2)
        monkeypatch.setattr(sysinfo.os, "getloadavg", lambda: (0.4, 0.4, 0.4))
        assert sysinfo.busy_before(None) is None
        monkeypatch.setattr(sysinfo.os, "getloadavg", lambda: (2.6, 2.0, 1.0))
        assert sysinfo.busy_before(1) is None  # a thread count was chosen
        said = sysinfo.busy_before(None)
        assert "load average was 2.6 on 2 CPUs" in said and "--threads 1" in said
        code, err = dbrxq_main("run", "-p", PROMPT, "-n", "2")
        assert code == 0 and err.strip().endswith("may be much faster"), err
    finally:
        torch.set_num_threads(before)
