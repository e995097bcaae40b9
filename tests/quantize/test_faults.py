"""Quantize (and its caches) on a user's bad day: disk full, read-only or bad OUT, runs killed
mid-write, tampered resume state, hostile numbers on the command line.

Each test asserts the one-line message, exit status 2 and what is left on disk. Disk-full and
read-only cases use a real small tmpfs when the test runs as root and may mount one, else a patched
writer that raises the same errno.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from dbrxq.core.files import remove_stale_temps
from dbrxq.formats import shards as dwriter
from dbrxq.formats.hub import default_model_dir

DEMO = default_model_dir()


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name) if folder.exists() else []


@contextlib.contextmanager
def mounted_tmpfs(tmp_path: Path, options: str):
    """A real tmpfs (root only); None when this machine does not allow mounting one."""
    point = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    point.mkdir()
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                              capture_output=True).returncode == 0
    try:
        yield point if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


class _FullDisk:
    """What a full disk does to a file object: writes fail past a budget, and so does close()
    (its flush of buffered bytes), the case that used to leave the temp file behind."""

    def __init__(self, f, budget: list[int]):
        self.f, self.budget = f, budget

    def write(self, data):
        n = memoryview(data).nbytes
        if self.budget[0] < n:
            raise OSError(errno.ENOSPC, "No space left on device", self.f.name)
        self.budget[0] -= n
        return self.f.write(data)

    def close(self):
        self.f.close()
        raise OSError(errno.ENOSPC, "No space left on device", self.f.name)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("how", ["tmpfs", "patched"])
def test_disk_full_is_one_line_and_leaves_no_temp(how, tmp_path, monkeypatch, capsys, dbrxq_main):
    with mounted_tmpfs(tmp_path, "size=2m") as fs:
        if how == "tmpfs":
            if fs is None:
                pytest.skip("cannot mount a tmpfs here (not root, or no permission): the patched case covers it")
            out = fs / "q"
            import quantize.writer as qw
            monkeypatch.setattr(qw, "check_disk_space", lambda out, need: None)  # reach the real write
        else:
            out = tmp_path / "q"
            real_open = open
            budget = [1 << 20]
            monkeypatch.setattr(dwriter, "open", lambda p, mode="r", *a, **k: _FullDisk(real_open(p, mode, *a, **k), budget)
                                if "w" in mode else real_open(p, mode, *a, **k), raising=False)
        code, err = dbrxq_main("quantize", DEMO, out, "--method", "rtn", "--expert-bits", "8")
        line = _one_error(err)
        assert code == 2 and "cannot write (the disk is full)" in line and "the output needs about" in line, line
        assert str(out) in line
        assert _temps(out) == [] and not (out / "config.json").exists()


def test_read_only_out_and_out_below_a_file(tmp_path, monkeypatch, capsys, dbrxq_main):
    (tmp_path / "afile").write_text("x")
    code, err = dbrxq_main("quantize", DEMO, tmp_path / "afile" / "q", "--method", "rtn")
    line = _one_error(err)
    assert code == 2 and "a component of the path is a file" in line and "afile" in line, line
    with mounted_tmpfs(tmp_path, "ro,size=1m") as fs:
        if fs is None:  # no mount here: a read-only file system as the kernel reports it
            def ro(*a, **k):
                raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro" / "q"))
            monkeypatch.setattr(Path, "mkdir", ro)
            target = tmp_path / "ro" / "q"
        else:
            target = fs / "q"
        code, err = dbrxq_main("quantize", DEMO, target, "--method", "rtn")
        line = _one_error(err)
        assert code == 2 and "the file system is read-only" in line, line
        for method in ("gptq",):
            code, err = dbrxq_main(*["quantize", DEMO, target, "--method", method, "--calib-samples", "4",
                              "--calib-seq-len", "32"])
            assert code == 2 and "read-only" in _one_error(err)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from dbrxq.formats import shards as writer
    real = writer.SafetensorsStreamWriter.write
    calls = [0]
    def write(self, name, chunk):
        real(self, name, chunk)
        calls[0] += 1
        if calls[0] == 3:  # a temp shard is half written: die the way an OOM kill does
            self._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    writer.SafetensorsStreamWriter.write = write
    from dbrxq.cli import main
    sys.argv = ["dbrxq", *sys.argv[1:]]
    main()
""")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_killed_run_leftovers_are_removed_by_the_next(method, tmp_path, monkeypatch, capsys, caplog, dbrxq_main):
    out = tmp_path / "q"
    extra = ["--calib-samples", "4", "--calib-seq-len", "32"] if method == "gptq" else []
    r = subprocess.run([sys.executable, "-c", KILLER, "quantize", str(DEMO), str(out), "--method", method, *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    left = _temps(out)
    assert left and not (out / "config.json").exists()
    size = sum((out / n).stat().st_size for n in left)
    resume = ["--resume"] if method == "gptq" else []
    with caplog.at_level("WARNING"):
        code, err = dbrxq_main("quantize", DEMO, out, "--method", method, *extra, *resume)
    assert code == 0, err[-2000:]
    assert any("temporary file(s)" in m and "interrupted run" in m for m in caplog.messages), caplog.messages
    assert _temps(out) == [] and (out / "config.json").exists() and size > 0


def test_stale_temps_of_live_writers_are_kept(tmp_path):
    mine = tmp_path / f"model.safetensors.tmp.{os.getpid()}.abcd0123"
    dead = tmp_path / "model.safetensors.tmp.4194303.abcd0123"
    other = tmp_path / "notes.tmp"
    users = tmp_path / "report.tmp.4194303"  # a user's file that merely looks like one: kept
    for p in (mine, dead, other, users):
        p.write_bytes(b"x" * 100)
    assert remove_stale_temps(tmp_path) == 100
    assert mine.exists() and not dead.exists() and other.exists() and users.exists()


def test_failed_disk_check_leaves_nothing_that_changes_the_next_run(tmp_path, monkeypatch, capsys, dbrxq_main):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    out = tmp_path / "q"
    for method in ("gptq", "rtn"):
        code, err = dbrxq_main("quantize", DEMO, out, "--method", method, "--calib-samples", "4", "--calib-seq-len", "32")
        line = _one_error(err)
        assert code == 2 and "not enough free disk space" in line and "1000 B free" in line and "0.00 GB" not in line
        assert "MiB" in line or "KiB" in line, line
        assert not out.exists()
    monkeypatch.setattr(shutil, "disk_usage", real)
    code, err = dbrxq_main("quantize", DEMO, out, "--method", "gptq", "--calib-samples", "4", "--calib-seq-len", "32")
    assert code == 0, err[-2000:]  # a plain run, not "pass --resume"


def test_code_files_are_not_copied_into_out(tmp_path):
    import shutil

    from quantize.config import QuantConfig
    from quantize.writer import quantize_checkpoint
    src = tmp_path / "src"
    shutil.copytree(DEMO, src)
    (src / "tiktoken.py").write_text("raise SystemExit('ran code from a checkpoint')\n")
    out = quantize_checkpoint(src, tmp_path / "q", QuantConfig(), progress=False)
    assert not (out / "tiktoken.py").exists() and (out / "tokenizer.tiktoken").exists()


@pytest.mark.parametrize("args, message", [
    (["run", "--prompt", "x", "--seed", str(2**64)], "seed must be an integer from 0 to 2**64 - 1"),
    (["run", "--prompt", "x", "--seed", "-1"], "seed must be an integer from 0 to 2**64 - 1"),
    (["run", "--prompt", "x", "-t", "1e-45"], "temperature must be 0 (greedy) or between 0.01 and 100"),
    (["run", "--prompt", "x", "-t", "inf"], "temperature must be 0 (greedy) or between 0.01 and 100, got inf"),
    (["run", "--prompt", "x", "-t", "nan"], "temperature must be 0 (greedy) or between"),
    (["run", "--prompt", "x", "--device", "meta"], "device 'meta' is not supported"),
    (["run", "--prompt", "x", "--device", "mps"], "device 'mps' is not supported"),
    (["quantize", "demo", "OUT", "--seed", str(2**64)], "--seed must be an integer from 0 to 2**64 - 1"),
    (["quantize", "demo", "OUT", "--device", "meta"], "device 'meta' is not supported"),
])
def test_cli_numbers_are_range_checked_once(args, message, tmp_path, monkeypatch, capsys, dbrxq_main):
    args = [str(tmp_path / a) if a == "OUT" else a for a in args]
    code, err = dbrxq_main(*args)
    assert code == 2 and message in _one_error(err)
    assert not (tmp_path / "OUT").exists()
