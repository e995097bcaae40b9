"""`dbrxq serve` end to end: a server process on a free localhost port, the official `openai`
client (and raw HTTP where the client hides what is tested), the demo model."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

import dbrxq

KEY = "sk-dbrxq-test"
TEXTS = ["The function returns", "A list of", "If the file", "Return the value of the", "This module provides",
         "The default is", "Raise an exception when", "An object that"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, tmp_path, *args):
        self.port = free_port()
        self.log = tmp_path / f"serve-{self.port}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "dbrxq.cli", "serve", "--port", str(self.port), *args],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "DBRXQ_API_KEY": ""})
        self.headers = {"Authorization": f"Bearer {KEY}"} if KEY in args else {}
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"dbrxq serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                status, _ = self.get("/health")
                if status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                pytest.fail(f"dbrxq serve did not come up:\n{self.log.read_text()}")
            time.sleep(0.25)

    def conn(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path: str, headers: dict | None = None):
        c = self.conn(5)
        c.request("GET", path, headers=self.headers if headers is None else headers)
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, json.loads(body)

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=120)

    def open_stream(self, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        c = self.conn()
        c.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                  headers={**self.headers, "Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200, r.read()
        return c, r

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("serve"), "--api-key", KEY, "--max-batch", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def demo():
    return dbrxq.load()


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["demo"]
    status, body = server.get("/health")
    assert status == 200 and body["status"] == "ok"


def test_completion_is_generate_greedy_with_usage(server, demo):
    r = server.client().completions.create(model="demo", prompt=TEXTS[0], max_tokens=16, temperature=0)
    ids = demo.tokenizer.encode(TEXTS[0])
    ref = demo.generate_ids([ids], max_new_tokens=16).sequences[0]
    assert r.choices[0].text == demo.generate(TEXTS[0], max_new_tokens=16)
    assert r.choices[0].finish_reason == ("stop" if ref[-1] in demo.stop_tokens else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref))
    assert r.usage.total_tokens == len(ids) + len(ref)


def test_chat_streaming_equals_chat_and_reports_usage(server, demo):
    messages = [{"role": "user", "content": "What does the function return?"}]
    c = server.client()
    r = c.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == demo.chat(messages, max_new_tokens=12)
    prompt = demo.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(prompt)
    chunks = list(c.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_cuts_the_text(server, demo, stream):
    full = demo.generate(TEXTS[3], max_new_tokens=24)
    words = full.split()
    stop = " " + words[len(words) // 2]  # a word in the middle, with its leading space
    assert stop in full
    want = full[:full.index(stop)]
    c = server.client()
    r = c.completions.create(model="demo", prompt=TEXTS[3], max_tokens=24, temperature=0, stop=[stop, "zzzz"],
                             stream=stream)
    if stream:
        chunks = list(r)
        text, finish = "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert (text, finish) == (want, "stop")


def test_seed_makes_sampling_reproducible(server, demo):
    c = server.client()
    kw = dict(model="demo", prompt=TEXTS[1], max_tokens=16, temperature=1.0)
    a = c.completions.create(seed=7, **kw).choices[0].text
    assert a == c.completions.create(seed=7, **kw).choices[0].text
    assert a == demo.generate(TEXTS[1], max_new_tokens=16, temperature=1.0, seed=7)
    others = {c.completions.create(seed=s, **kw).choices[0].text for s in (8, 9, 10)}
    assert others != {a}


def test_eight_concurrent_streams_each_equal_alone(server, demo):
    out = [None] * 8

    def run(i):
        stream = server.client().completions.create(model="demo", prompt=TEXTS[i], max_tokens=20, temperature=0,
                                                    stream=True)
        out[i] = "".join(ch.choices[0].text for ch in stream)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(8):
        assert out[i] == demo.generate(TEXTS[i], max_new_tokens=20), i
    _, health = server.get("/health")
    assert health["stats"]["largest_batch"] > 1  # they really decoded together


def test_errors_have_openai_shape_and_status(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="demo", prompt="word " * 1100, max_tokens=8)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="exceeds the context"):
        c.completions.create(model="demo", prompt=TEXTS[0], max_tokens=5000)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt=TEXTS[0], max_tokens=4)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="stop: at most 4 sequences of at most 256"):
        c.completions.create(model="demo", prompt=TEXTS[0], max_tokens=4, stop=["x" * 300])
    with pytest.raises(openai.BadRequestError, match="n=2"):
        c.completions.create(model="demo", prompt=TEXTS[0], max_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="demo", prompt=TEXTS[0], max_tokens=4, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="demo", messages=[], max_tokens=4)
    status, body = server.get("/v1/nothing-here")
    assert status == 404 and body["error"]["type"] == "not_found_error" and "/v1/nothing-here" in body["error"]["message"]


def test_oversized_body_is_refused_before_it_is_read(server):
    c = server.conn()
    c.request("POST", "/v1/completions", body=json.dumps({"model": "demo", "prompt": "x" * (5 << 20)}),
              headers={**server.headers, "Content-Type": "application/json"})
    r = c.getresponse()
    body = json.loads(r.read())
    assert r.status == 413 and "request body over" in body["error"]["message"]


def test_api_key_is_checked_on_every_request(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client("sk-wrong").completions.create(model="demo", prompt=TEXTS[0], max_tokens=4)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    for path in ("/v1/models", "/metrics"):
        status, body = server.get(path, headers={})
        assert status == 401 and "API key" in body["error"]["message"]
    assert server.get("/health", headers={}) == (200, {"status": "ok"})  # liveness is open, counters are not


def wait_idle(server, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, h = server.get("/health")
        if h["running"] == 0 and h["waiting"] == 0:
            return
        time.sleep(0.1)
    pytest.fail(f"the server still has requests after {timeout}s: {h}")


def test_disconnect_mid_stream_frees_the_slot(server):
    conn, resp = server.open_stream({"model": "demo", "prompt": TEXTS[2], "max_tokens": 1000, "temperature": 0})
    assert resp.readline().startswith(b"data: ")  # generating
    _, h = server.get("/health")
    assert h["running"] == 1
    before = h["stats"]["decode_tokens"]
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_idle(server)
    _, h = server.get("/health")
    assert h["stats"]["decode_tokens"] - before < 900  # stopped long before its 1000 tokens
    r = server.client().completions.create(model="demo", prompt=TEXTS[0], max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_full_queue_answers_503_and_sigterm_exits_cleanly(tmp_path):
    s = ServerProcess(tmp_path, "--max-batch", "1", "--max-queue", "0", "--shutdown-timeout", "1")
    try:
        conn, resp = s.open_stream({"model": "demo", "prompt": TEXTS[0], "max_tokens": 1000, "temperature": 0})
        assert resp.readline().startswith(b"data: ")
        with pytest.raises(openai.InternalServerError) as e:
            s.client().completions.create(model="demo", prompt=TEXTS[1], max_tokens=4)
        assert e.value.status_code == 503 and "--max-batch" in str(e.value)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(60) == 0, s.log.read_text()
        rest = resp.read()  # after the 1 s grace the engine cancelled it: a last event, then [DONE]
        assert b"the server is stopping" in rest and rest.endswith(b"data: [DONE]\n\n"), rest[-300:]
        log = s.log.read_text()
        assert "Shutting down" in log and "Traceback" not in log, log
    finally:
        s.stop()


def test_bad_options_are_one_line_errors_before_listening(dbrxq_main, tmp_path):
    code, err = dbrxq_main("serve", "--port", str(free_port()), "--context", "5000")
    assert code == 2 and err.strip() == "error: context 5000 must be between 1 and the model's max_seq_len 1024"
    code, err = dbrxq_main("serve", str(tmp_path / "missing"), "--port", str(free_port()))
    assert code == 2 and err.startswith("error: ") and "missing" in err and "Traceback" not in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = dbrxq_main("serve", "--port", str(port))
    assert code == 2 and err.strip() == f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use)"
