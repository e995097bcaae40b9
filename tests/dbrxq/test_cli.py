"""The dbrxq command line: runs on the embedded default, streams, and turns user errors into one line."""

import subprocess
import sys

import pytest

import dbrxq
from dbrxq.cli.app import cli


def dbrxq_cmd(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dbrxq.cli", *args], capture_output=True, text=True,
                          input=input, timeout=120)


def test_run_default_model_is_deterministic_with_seed():
    args = ("run", "--prompt", "The value of", "-n", "12", "-t", "0.9", "--seed", "3")
    a, b = dbrxq_cmd(*args), dbrxq_cmd(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("The value of")
    assert len(a.stdout) > len("The value of")
    c = dbrxq_cmd("run", "--prompt", "The value of", "-n", "12", "-t", "0.9", "--seed", "4")
    assert c.stdout != a.stdout  # the seed matters (12 sampled tokens from a 1.5k vocabulary)


def test_cli_output_equals_python_api():
    r = dbrxq_cmd("run", "--prompt", "Hello", "-n", "10", "-t", "0")
    assert r.returncode == 0, r.stderr
    text = dbrxq.load().generate("Hello", max_new_tokens=10)
    assert r.stdout == "Hello" + text + "\n"


def test_stats_line():
    r = dbrxq_cmd("run", "--prompt", "Hi", "-n", "5", "--stats")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr and "peak RSS" in r.stderr


def test_chat_one_shot_and_interactive():
    r = dbrxq_cmd("run", "--chat", "--prompt", "Hello", "-n", "5")
    assert r.returncode == 0, r.stderr
    r = dbrxq_cmd("run", "--chat", "-n", "4", input="hi\nthere\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(">>>") == 3  # two turns, then EOF at the third prompt


@pytest.mark.parametrize("args, message", [
    (("run", "/no/such/folder", "--prompt", "x"), "is not a folder and not a hub repo id"),
    (("run", "--prompt", "x", "-n", "5000"), "exceeds the model's context of 1024 tokens"),
    (("run", "--prompt", "x", "--dtype", "int3"), "unknown dtype 'int3'"),
    (("run", "--prompt", "x", "--device", "cuda"), "no CUDA device"),
    (("run", "--prompt", ""), "empty prompt"),
])
def test_user_errors_are_one_line(args, message):
    r = dbrxq_cmd(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_prompt_is_a_usage_error():
    r = dbrxq_cmd("run")
    assert r.returncode == 2 and "--prompt" in r.stderr and "Traceback" not in r.stderr


def test_help_reads_well():
    from click.testing import CliRunner
    out = CliRunner().invoke(cli, ["--help"]).output
    assert "run" in out
    out = CliRunner().invoke(cli, ["run", "--help"]).output
    for opt in ("--prompt", "--chat", "--system", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                "--seed", "--device", "--dtype", "--stats"):
        assert opt in out


def test_tokenizer_larger_than_the_model_is_one_line_at_load(tmp_path):
    """A checkpoint whose tokenizer has ids past the model's vocab_size (the demo vocabulary,
    ids to 1535, on a 512-row embedding) is refused when it is loaded, by the API and by every
    command, in one line naming the file, the largest id and vocab_size: no IndexError from
    inside the embedding on the first prompt that reaches an id above 511."""
    from dbrxq.core.errors import TokenizerError
    from dbrxq.formats.hub import default_model_dir
    from dbrxq.formats.random import make_random_checkpoint, preset_config

    ckpt = make_random_checkpoint(tmp_path / "ckpt", preset_config("tiny"), tokenizer_dir=default_model_dir(),
                                  progress=False)
    with pytest.raises(TokenizerError, match=r"tokenizer\.tiktoken: token ids run to 1535, but the model's vocab_size is 512"):
        dbrxq.load(ckpt)
    text = tmp_path / "text.txt"
    text.write_text("The function returns a dictionary of exceptions and descriptors. " * 20)
    data = ("--data", str(text), "--window", "64", "--stride", "32")
    for args in (("run", str(ckpt), "-p", "The function returns a dictionary of exceptions and descriptors"),
                 ("eval", str(ckpt), *data), ("compare", str(ckpt), str(ckpt), *data)):
        r = dbrxq_cmd(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "token ids run to 1535" in lines[0] and "vocab_size is 512" in lines[0], r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_version():
    r = dbrxq_cmd("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dbrxq {dbrxq.__version__}", (r.stdout, r.stderr)


def test_prompt_beyond_context_is_refused_before_it_is_echoed():
    ctx = dbrxq.load().model.config.max_seq_len
    r = dbrxq_cmd("run", "-p", "The value of the function " * ctx, "-n", "4")
    assert r.returncode == 2 and r.stdout == "", r.stdout[:200]
    assert len(r.stderr.strip().splitlines()) == 1 and f"context of {ctx} tokens" in r.stderr


def test_demo_names_the_embedded_model(tmp_path, monkeypatch):
    """"demo" is the shipped model for run, eval, compare and quantize; a local folder named demo
    wins over the name."""
    from click.testing import CliRunner

    from dbrxq.formats.hub import default_model_dir, resolve_model_name

    monkeypatch.chdir(tmp_path)
    assert resolve_model_name("demo") == default_model_dir() and resolve_model_name(None) == default_model_dir()
    text = tmp_path / "t.txt"
    text.write_text("The function returns a dictionary of exceptions. " * 30)
    r = CliRunner().invoke(cli, ["quantize", "demo", str(tmp_path / "q"), "--method", "rtn"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q" / "config.json").is_file()
    r = CliRunner().invoke(cli, ["compare", "demo", str(tmp_path / "q"), "--data", str(text), "--max-tokens", "100"])
    assert r.exit_code == 0 and "top-1 agreement" in r.output, r.output
    r = CliRunner().invoke(cli, ["run", "demo", "-p", "The value", "-n", "3"])
    assert r.exit_code == 0 and r.output.startswith("The value"), r.output
    (tmp_path / "demo").mkdir()  # a local folder of that name wins (and, empty, is refused as one)
    assert resolve_model_name("demo") == "demo"
    r = CliRunner().invoke(cli, ["eval", "demo", "--data", str(text)])
    assert r.exit_code != 0 and "demo" in str(r.exception or r.output)


def test_chat_past_the_context_drops_the_oldest_turns():
    """Interactive chat on the demo model (context 1024): three ~430-token messages cannot all
    stay; the oldest turns go (the system prompt stays), with a one-line notice, and the session
    goes on to answer every message."""
    msg = "Describe the for statement and the while statement in detail please. " * 12
    r = dbrxq_cmd("run", "--chat", "-n", "8", input="\n".join([msg, msg, msg, "and briefly?"]) + "\n")
    assert r.returncode == 0, r.stderr
    notices = [line for line in r.stderr.splitlines() if line.startswith("[context full: dropped the")]
    assert notices and "Traceback" not in r.stderr
    assert r.stdout.count(">>>") == 5  # four replies, then the prompt that read end of input
    too_long = dbrxq_cmd("run", "--chat", "-p", msg * 3, "-n", "8")
    assert too_long.returncode == 2 and "beyond the model's context of 1024" in too_long.stderr


def test_ctrl_c_during_a_reply_returns_to_the_prompt(monkeypatch):
    from click.testing import CliRunner

    from dbrxq.api import DbrxRunner

    real, calls = DbrxRunner.chat, []

    def chat(self, messages, **kw):
        calls.append(len(messages))
        if len(calls) == 1:
            kw["on_text"]("partial")
            raise KeyboardInterrupt
        return real(self, messages, **kw)

    monkeypatch.setattr(DbrxRunner, "chat", chat)
    r = CliRunner().invoke(cli, ["run", "--chat", "-n", "4"], input="hi\nthere\n")
    assert r.exit_code == 0, r.output
    assert "[reply interrupted]" in r.output and calls == [1, 3]  # the partial reply stayed in the conversation
